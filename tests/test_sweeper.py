"""``hydra/sweeper=tuner``: Hydra's sweep grammar as Optuna distributions, pruned jobs, slots, resume."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from tests.conftest import SECRETS, Secret, compose_raw, leaks_in_files, postgres_dump
from tuner.config import ConfigError
from tuner.space import parse_space
from tuner.sweeper import encode_value, space_from_overrides

LESSON_SPACE = [
    "optimizer.lr=tag(log, interval(1e-4, 1))",
    "optimizer.momentum=tag(reverse_log, interval(0.9, 0.999))",
    "model.hidden_units=tag(log, int(interval(32, 512)))",
    "data.batch_size=choice(32, 64, 128, 256)",
]


def distributions(*overrides: str) -> dict[str, Any]:
    space, _ = space_from_overrides(OverridesParser.create().parse_overrides(list(overrides)))
    return {p.name: p.distribution for p in parse_space(space, compose_raw())}


def test_sweeper_grammar_maps_to_optuna_distributions() -> None:
    found = distributions(
        *LESSON_SPACE, "model.num_layers=int(interval(1, 3))", "optimizer.weight_decay=interval(0, 0.1)"
    )
    assert found == {
        "optimizer.lr": FloatDistribution(1e-4, 1.0, log=True),
        "1-optimizer.momentum": FloatDistribution(0.001, 0.1, log=True),
        "model.hidden_units": IntDistribution(32, 512, log=True),
        "data.batch_size": CategoricalDistribution((32, 64, 128, 256)),
        "model.num_layers": IntDistribution(1, 3),
        "optimizer.weight_decay": FloatDistribution(0.0, 0.1),
    }


def test_sweeper_range_excludes_its_end_like_hydras_basic_sweeper() -> None:
    found = distributions(
        "model.num_layers=range(1, 4)",
        "model.hidden_units=range(32, 300, 64)",
        "optimizer.lr=range(0.5, 2.0, 0.5)",
        "data.batch_size=shuffle(range(32, 65, 32))",
        "optimizer.name=sgd,adam",
    )
    assert found["model.num_layers"] == IntDistribution(1, 3)
    assert found["model.hidden_units"] == IntDistribution(32, 288, step=64)  # 32, 96, 160, 224, 288
    assert found["optimizer.lr"] == CategoricalDistribution((0.5, 1.0, 1.5))  # float ranges: the values Hydra lists
    assert isinstance(found["data.batch_size"], CategoricalDistribution)
    assert set(found["data.batch_size"].choices) == {32, 64}
    assert found["optimizer.name"] == CategoricalDistribution(("sgd", "adam"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=tag(loglog, interval(1e-4, 1))", "optimizer.lr: unknown tag ['loglog']"),
        ("data.batch_size=tag(log, choice(32, 64))", "tags (log) apply to interval(...) only"),
        ("model.hidden_units=tag(reverse_log, int(interval(32, 512)))", "reverse_log is for floats close to 1"),
        ("optimizer.lr=tag(log, interval(0, 1))", "space.optimizer.lr.low must be > 0 with log: true"),
        ("optimizer.nesterov=choice(true, false)", "names the config path 'optimizer.nesterov'"),
    ],
)
def test_sweeper_bad_sweep_names_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        distributions(override)
    assert message in str(info.value)


def test_sweeper_encoded_values_parse_back() -> None:
    values = [0.000123456789, 1e-05, 3, True, None, "adam", "it's"]
    parsed = OverridesParser.create().parse_overrides([f"x{i}={encode_value(v)}" for i, v in enumerate(values)])
    assert [o.value() for o in parsed] == values


def run_sweep(tmp_path: Path, *overrides: str, storage: str | None = None) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "tuner.train",
        "-m",
        "hydra/sweeper=tuner",
        f"study.storage={storage or 'sqlite:///' + str(tmp_path / 'study.db')}",
        f"study.output_dir={tmp_path / 'out'}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "data=digits",
        *overrides,
    ]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ))


def load(tmp_path: Path, name: str = "digits-mlp") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'study.db'}")


# The median pruner acts from the second trial on, at every epoch: on this budget it must prune.
PRUNE_EARLY = ["pruner.n_startup_trials=1", "pruner.n_warmup_steps=0", "trainer.epochs=3"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "secret", [SECRETS["unicode-space-quoted"], SECRETS["hydra-escaped"]], ids=["quoted", "escaped"]
)
def test_sweeper_on_postgresql_leaves_no_password_on_disk(tmp_path: Path, postgres_url: str, secret: Secret) -> None:
    result = run_sweep(
        tmp_path,
        "study.n_trials=2",
        "trainer.epochs=1",
        "optimizer.lr=tag(log, interval(1e-3, 1e-1))",
        storage=secret.override(postgres_url),
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # multirun.yaml, each job's .hydra/*.yaml and log; the sweeper's and the launcher's log lines.
    assert leaks_in_files(tmp_path, secret) == {} and secret.leaks(out) == []
    assert secret.leaks(postgres_dump(postgres_url)) == []
    assert "in postgresql://tuner:***@127.0.0.1:" in out
    assert len(optuna.load_study(study_name="digits-mlp", storage=postgres_url).trials) == 2


@pytest.mark.slow
def test_sweeper_prunes_jobs_and_a_rerun_continues_the_study(tmp_path: Path) -> None:
    result = run_sweep(tmp_path, *PRUNE_EARLY, "study.n_trials=6", *LESSON_SPACE)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Error executing job" not in out and "Traceback" not in out
    (table_line,) = [line for line in out.splitlines() if line.startswith("digits-mlp ")]
    assert table_line.endswith(" pruned)") and "6 (" in table_line  # the table at the end, from storage
    study = load(tmp_path)
    scored = study.user_attrs["test_accuracy"]  # the best trial scored once on the test split, at the end
    assert scored["trial"] == study.best_trial.number and scored["samples"] == 360 and scored["value"] > 0.5
    assert f"{scored['value']:.4f}" in table_line.split()
    trials = study.trials
    assert [t.number for t in trials] == list(range(6))
    states = [t.state for t in trials]
    assert TrialState.FAIL not in states and TrialState.RUNNING not in states
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "the median pruner had to stop at least one job"
    assert all(len(t.intermediate_values) < 3 for t in pruned)  # stopped before the last epoch
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete and all(sorted(t.intermediate_values) == [1, 2, 3] for t in complete)
    for t in trials:
        assert t.distributions["optimizer.lr"] == FloatDistribution(1e-4, 1.0, log=True)
        assert t.distributions["1-optimizer.momentum"] == FloatDistribution(0.001, 0.1, log=True)
        assert t.distributions["model.hidden_units"] == IntDistribution(32, 512, log=True)
        assert isinstance(t.params["model.hidden_units"], int)
        assert t.distributions["data.batch_size"] == CategoricalDistribution((32, 64, 128, 256))
        assert t.user_attrs["optimizer.momentum"] == pytest.approx(1 - t.params["1-optimizer.momentum"])
        assert t.user_attrs["seed"] is not None  # the job wrote to its trial through the handoff
    # Each job trained the values its trial holds: its Hydra config carries them.
    job_cfg = (tmp_path / "multirun" / "0" / ".hydra" / "overrides.yaml").read_text()
    assert f"model.hidden_units={trials[0].params['model.hidden_units']}" in job_cfg

    again = run_sweep(tmp_path, *PRUNE_EARLY, "study.n_trials=9", *LESSON_SPACE)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = load(tmp_path).trials
    assert [t.number for t in trials] == list(range(9))
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 9, "the rerun repeated parameters"


@pytest.mark.slow
def test_sweeper_with_joblib_frees_each_slot_as_its_job_ends(tmp_path: Path) -> None:
    result = run_sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "pruner=none",
        "study.n_trials=6",
        "trainer.epochs=choice(1, 150)",  # short and long jobs side by side (an epoch of digits: ~50 ms; a
        # long job must outlast two short ones with their process start-up, also on a loaded CI machine)
        "optimizer.lr=tag(log, interval(1e-2, 0.3))",
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert {t.params["trainer.epochs"] for t in trials} == {1, 150}
    # In batches of 2, trial n could start only after trials n-2 and n-1 ended. Here some trial started
    # while a trial two or more places before it still ran: its slot did not wait for the batch.
    assert any(
        later.datetime_start < earlier.datetime_complete
        for later in trials
        for earlier in trials
        if earlier.number <= later.number - 2
    ), [(t.number, t.params["trainer.epochs"], t.datetime_start, t.datetime_complete) for t in trials]
    # Two jobs at once: some trials overlapped in time.
    assert any(b.datetime_start < a.datetime_complete for a, b in itertools.pairwise(trials))


@pytest.mark.slow
def test_sweeper_takes_its_space_from_the_space_group_and_refuses_bad_sweeps(tmp_path: Path) -> None:
    result = run_sweep(tmp_path, "space=lr", "study.n_trials=2", "trainer.epochs=1")
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(tmp_path).trials
    assert len(trials) == 2
    assert all(t.distributions == {"optimizer.lr": FloatDistribution(1e-4, 1.0, log=True)} for t in trials)

    elsewhere = tmp_path / "bad"
    elsewhere.mkdir()
    bad = run_sweep(elsewhere, "study.n_trials=2", "optimizer.lr=tag(loglog, interval(1e-4, 1))")
    out = bad.stdout + bad.stderr
    assert bad.returncode == 2
    assert "optimizer.lr: unknown tag ['loglog']" in out and "Traceback" not in out
    assert not (elsewhere / "study.db").exists(), "bad input must not create the storage"

    packed = run_sweep(elsewhere, "study.n_trials=2", "space=lr", "trainer.pack=4")
    assert (
        packed.returncode == 2 and "trainer.pack=4 packs the trials of python -m tuner" in packed.stdout + packed.stderr
    )
    assert not (elsewhere / "study.db").exists()


@pytest.mark.slow
def test_sweeper_plugin_ships_in_the_wheel_and_hydra_discovers_it(
    tmp_path: Path, installed_wheel: tuple[Path, Path]
) -> None:
    wheel, site = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "hydra_plugins/tuner_sweeper/tuner_sweeper.py" in names
    assert "hydra_plugins/__init__.py" not in names  # Hydra's plugin namespace must stay open to others
    # Hydra's own scan, without importing tuner.train (which registers the plugin by hand for editable installs).
    discover = (
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "print(sorted(f'{c.__module__}.{c.__name__}' for c in Plugins.instance().discover(Sweeper)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", discover],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "hydra_plugins.tuner_sweeper.tuner_sweeper.TunerSweeper" in result.stdout, result.stdout + result.stderr
