"""Whole studies with and without packs: wall time, best validation and test accuracy of ``python -m tuner``.

For each sampler seed, the script runs the same study once per ``trainer.pack`` value, interleaved seed by seed
(each a fresh ``python -m tuner`` process on its own SQLite file), and prints one row per run and the median wall
time of each pack setting against ``trainer.pack=1``.

    python scripts/bench_study.py                                   # mnist1d mlp, packs 1 and 4, seeds 0-2
    python scripts/bench_study.py --packs 1 4 8 --seeds 0 1 2 -- model=cnn
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState


def _run(folder: Path, pack: str, seed: int, overrides: list[str]) -> dict[str, float | int | str]:
    name = f"bench-{pack}-{seed}"
    url = f"sqlite:///{folder / 'bench.db'}"
    cmd = [
        sys.executable,
        "-m",
        "tuner",
        f"study.name={name}",
        f"study.storage={url}",
        f"study.seed={seed}",
        f"trainer.pack={pack}",
        f"study.output_dir={folder / name}",
        f"study.artifact_dir={folder / 'artifacts'}",
        *overrides,
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    study = optuna.load_study(study_name=name, storage=url)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    shapes = {tuple(v for k, v in sorted(t.params.items()) if k.startswith(("model.", "data."))) for t in study.trials}
    test = study.user_attrs.get("test_accuracy", {}).get("value", float("nan"))
    return {
        "pack": pack,
        "seed": seed,
        "wall": wall,
        "best": study.best_value,
        "test": test,
        "complete": len(complete),
        "shapes": len(shapes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--packs", nargs="+", default=["1", "4"], help="trainer.pack values (numbers or auto)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*", help="more overrides for every run, after --")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print("pack  seed  wall s  best val  test acc  complete  distinct shapes", flush=True)
        for seed in args.seeds:
            for pack in args.packs:
                row = _run(Path(tmp), pack, seed, args.overrides)
                rows.append(row)
                print(
                    f"{pack:>4}  {seed:4d}  {row['wall']:6.1f}  {row['best']:8.4f}  {row['test']:8.4f}  "
                    f"{row['complete']:8d}  {row['shapes']:15d}",
                    flush=True,
                )
    reference = statistics.median(float(r["wall"]) for r in rows if r["pack"] == args.packs[0])
    for pack in args.packs:
        mine = [r for r in rows if r["pack"] == pack]
        wall = statistics.median(float(r["wall"]) for r in mine)
        best = [float(r["best"]) for r in mine]
        test = [float(r["test"]) for r in mine]
        print(
            f"trainer.pack={pack}: median wall {wall:.1f} s ({reference / wall:.2f}x pack={args.packs[0]}), "
            f"best val {min(best):.4f}-{max(best):.4f}, test {min(test):.4f}-{max(test):.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
