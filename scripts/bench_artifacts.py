"""What the dashboard feed costs a study: artifact uploads, study notes and custom plots, as shares of one run.

Runs a real study (data=digits by default) in a temporary folder with timers wrapped around the functions
tuner.objective and tuner.tune call for the dashboard, and prints each one's total against the study's wall
time. Usage: python scripts/bench_artifacts.py [n_trials] [epochs]
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import tuner.objective
import tuner.tune
from tuner.__main__ import config_dir

SPENT: dict[str, list[float]] = defaultdict(list)


def timed(module: Any, name: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[name].append(time.perf_counter() - start)

    setattr(module, name, wrapper)


def main() -> None:
    n_trials = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    timed(tuner.objective, "upload_best_artifacts")
    for name in ("write_start_note", "write_end_note", "save_dashboard_plots"):
        timed(tuner.tune, name)
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "data=digits",
                f"study.storage=sqlite:///{Path(tmp) / 'bench.db'}",
                f"study.output_dir={tmp}/out",
                f"study.n_trials={n_trials}",
                f"trainer.epochs={epochs}",
                "trainer.threads=1",
            ],
        )
        raw = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(raw, dict)
        start = time.perf_counter()
        summary = tuner.tune.tune(*tuner.tune.prepare({str(k): v for k, v in raw.items()}))
        wall = time.perf_counter() - start
    complete = summary.states.get("COMPLETE", 0)
    print(f"\nstudy: {n_trials} trials ({complete} complete), {epochs} epochs, digits, wall {wall:.1f} s")
    print(f"{'part':<24}{'calls':>6}{'total s':>10}{'per call ms':>13}{'share of wall':>15}")
    total = 0.0
    for name, calls in SPENT.items():
        total += sum(calls)
        print(
            f"{name:<24}{len(calls):>6}{sum(calls):>10.2f}{1000 * sum(calls) / len(calls):>13.0f}"
            f"{sum(calls) / wall:>14.1%}"
        )
    print(f"{'all of the above':<24}{'':>6}{total:>10.2f}{'':>13}{total / wall:>14.1%}")
    print(f"per trial on average: {1000 * total / n_trials:.0f} ms")
    uploads = [round(1000 * s) for s in SPENT["upload_best_artifacts"]]
    print("upload_best_artifacts calls (ms; the first one imports matplotlib):", uploads)


if __name__ == "__main__":
    main()
