"""What a person may set on a babysat trial, and what the job makes of each value (tuner.steering)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from tuner.optim import build_optimizer
from tuner.schema import OptimizerConfig
from tuner.steering import (
    STOP_KEY,
    Request,
    apply_request,
    clear_requests,
    current_settings,
    pending_requests,
    register_widgets,
    set_value,
)


def _optimizer(name: str, **settings: float) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = torch.nn.Linear(3, 2)
    return build_optimizer(model.parameters(), OptimizerConfig(name=name, **settings), device=torch.device("cpu"))


def test_pending_requests_read_the_dashboards_strings_and_the_terminals_values_and_skip_empty_fields() -> None:
    attrs = {
        STOP_KEY: 0,  # the dashboard's choice, "keep training"
        "set:optimizer.lr": "0.01",  # the dashboard's text field
        "set:optimizer.momentum": "",  # a field left empty
        "set:optimizer.weight_decay": set_value(1e-4),
        "train_loss": 0.3,
    }
    requests = pending_requests(attrs)
    assert requests == [  # "keep training" asks nothing: every submission of the form writes it
        Request("set:optimizer.lr", "0.01", "dashboard"),
        Request("set:optimizer.weight_decay", 1e-4, "terminal"),
    ]
    stop = pending_requests({**attrs, STOP_KEY: 1})
    assert stop[-1] == Request(STOP_KEY, 1, "dashboard")  # last: the values before it are recorded first
    assert Request(STOP_KEY, 1, "dashboard").stops and Request(STOP_KEY, True, "terminal").stops


def test_a_key_written_again_after_the_job_read_it_is_not_emptied_but_read_at_the_next_boundary(
    tmp_path: Path,
) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'steer.db'}")
    study = optuna.create_study(storage=storage)
    number = study.ask().number
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    for key, value in {"set:optimizer.lr": "0.01", "set:optimizer.momentum": "0.5", STOP_KEY: 0}.items():
        storage.set_trial_user_attr(trial_id, key, value)
    read = pending_requests(storage.get_trial(trial_id).user_attrs)
    storage.set_trial_user_attr(trial_id, "set:optimizer.lr", "0.02")  # the person submits while the job applies
    storage.set_trial_user_attr(trial_id, STOP_KEY, 1)
    clear_requests(storage, trial_id, read)
    attrs = storage.get_trial(trial_id).user_attrs
    assert attrs["set:optimizer.momentum"] == ""  # applied: emptied
    assert pending_requests(attrs) == [
        Request("set:optimizer.lr", "0.02", "dashboard"),
        Request(STOP_KEY, 1, "dashboard"),
    ]


def test_a_new_learning_rate_applies_now_and_the_decay_goes_on_from_it() -> None:
    optimizer, scheduler = _optimizer("sgd", lr=0.1, lr_decay=0.5)
    for _ in range(2):  # two epochs done: lr = 0.1 / (1 + 0.5 * 2)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    event = apply_request(Request("set:optimizer.lr", "0.02", "dashboard"), optimizer, scheduler, "sgd", epoch=2)
    assert event == {
        "epoch": 2,
        "key": "optimizer.lr",
        "source": "dashboard",
        "old": pytest.approx(0.05),
        "new": 0.02,
        "applied": True,
    }
    assert optimizer.param_groups[0]["lr"] == 0.02
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * (1 + 0.5 * 2) / (1 + 0.5 * 3))


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("lr", "abc", "optimizer.lr must be a number, but got 'abc'."),
        ("lr", "-0.1", "optimizer.lr must be a number in (0, inf), but got -0.1."),
        ("lr", "0", "optimizer.lr must be a number in (0, inf), but got 0.0."),
        ("lr", "inf", "optimizer.lr must be a finite number, but got 'inf'."),
        ("lr", "nan", "optimizer.lr must be a finite number, but got 'nan'."),
        ("lr", True, "optimizer.lr must be a number, but got True."),
        ("momentum", "1", "optimizer.momentum must be a number in [0, 1), but got 1.0."),
        ("weight_decay", -1, "optimizer.weight_decay must be a number in [0, inf), but got -1."),
        ("beta1", "0.8", "set:optimizer.beta1 cannot be set on a sgd run"),
        ("eps", "1e-6", "set:optimizer.eps cannot be set on a sgd run"),
    ],
)
def test_a_bad_value_is_rejected_with_its_reason_and_the_optimizer_keeps_its_value(
    key: str, value: object, reason: str
) -> None:
    optimizer, scheduler = _optimizer("sgd", lr=0.1, momentum=0.9)
    before = current_settings(optimizer, "sgd")
    event = apply_request(Request(f"set:optimizer.{key}", value, "terminal"), optimizer, scheduler, "sgd", epoch=4)
    assert event["applied"] is False and event["new"] == value and event["epoch"] == 4
    assert event["reason"].startswith(reason)
    assert current_settings(optimizer, "sgd") == before


def test_adams_betas_and_rmsprops_squared_gradient_average_are_set_where_torch_reads_them() -> None:
    adam, adam_decay = _optimizer("adam", beta1=0.9, beta2=0.999)
    apply_request(Request("set:optimizer.beta1", "0.8", "dashboard"), adam, adam_decay, "adam", epoch=1)
    apply_request(Request("set:optimizer.beta2", 0.99, "terminal"), adam, adam_decay, "adam", epoch=1)
    assert adam.param_groups[0]["betas"] == (0.8, 0.99)
    rmsprop, rms_decay = _optimizer("rmsprop", beta2=0.99, momentum=0.0)
    apply_request(Request("set:optimizer.beta2", "0.9", "dashboard"), rmsprop, rms_decay, "rmsprop", epoch=1)
    apply_request(Request("set:optimizer.momentum", "0.5", "dashboard"), rmsprop, rms_decay, "rmsprop", epoch=1)
    assert rmsprop.param_groups[0]["alpha"] == 0.9 and rmsprop.param_groups[0]["momentum"] == 0.5
    assert current_settings(rmsprop, "rmsprop")["beta2"] == 0.9


@pytest.mark.parametrize(
    ("optimizer", "keys"),
    [
        ("sgd", ["set:optimizer.lr", "set:optimizer.momentum", "set:optimizer.weight_decay", STOP_KEY]),
        (
            "adam",
            ["set:optimizer.lr", "set:optimizer.beta1", "set:optimizer.beta2", "set:optimizer.weight_decay", STOP_KEY],
        ),
    ],
)
def test_the_dashboard_form_has_a_field_per_steerable_value_and_stop(
    optimizer: str, keys: list[str], tmp_path: Path
) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'form.db'}")
    study = optuna.create_study(storage=storage, study_name="babysat")
    register_widgets(study, optimizer)
    # Where optuna-dashboard 0.21 reads the form (tests/test_dashboard.py submits it in a browser).
    form = storage.get_study_system_attrs(storage.get_study_id_from_name("babysat"))["dashboard:form_widgets:v2"]
    assert form["output_type"] == "user_attr"
    assert [w["user_attr_key"] for w in form["widgets"]] == keys
    assert all(w["optional"] for w in form["widgets"] if w["type"] == "text")  # an empty field keeps the value
