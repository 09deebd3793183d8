"""What a stored study means: the settings that decide what its trials are, and the data they train on.

A study is one experiment: a later command on it compares its definition with the stored one and stops on a
difference before anything is trained; ``study.accept_changes=true`` records the change, except of the data.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from tuner.config import ConfigError
from tuner.space import parse_space

__all__ = ["CHANGES_ATTR", "DEFINITION_ATTR", "check_definition", "data_content", "definition", "differences"]

DEFINITION_ATTR = "definition"
CHANGES_ATTR = "definition_changes"
# The sections whose settings decide what a trial is; study.direction decides what "best" means.
_SECTIONS = ("model", "data", "optimizer", "trainer", "sampler", "pruner")
# Where or how a trial runs, not what it is: these may differ between the commands on one study.
# The data's files may move (data.root, data.path): data.content fingerprints what was loaded.
FREE = frozenset(
    {
        "trainer.device",
        "trainer.workers",
        "trainer.threads",
        "trainer.pack",  # a packed trial trains as it would alone (tuner.pack)
        "trainer.eval_batch_size",
        "data.root",
        "data.path",
        "data.download",
    }
)
CONTENT_KEY = "data.content"
_ABSENT = "(absent)"


def data_content(arrays: Sequence[Any]) -> str:
    """A fingerprint of the tensors a study trains, validates and tests on (their bytes, dtypes and shapes)."""
    digest = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
        digest.update(f"{a.dtype}{a.shape}".encode())
        digest.update(a.data)
    return "sha256:" + digest.hexdigest()[:16]


def _flat(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, path))
        else:
            out[path] = value
    return out


def _entry(param: Any) -> str:
    """A space entry in words, exact (repr of each bound) so that any change of range shows."""
    dist = param.distribution
    if isinstance(dist, CategoricalDistribution):
        text = f"one of {list(dist.choices)!r}"
    else:
        assert isinstance(dist, (FloatDistribution, IntDistribution))
        kind = "float" if isinstance(dist, FloatDistribution) else "int"
        step = f"step {dist.step!r}" if dist.step else ""
        scale = "reverse_log" if param.reverse_log else "log" if dist.log else step
        low, high = (1 - dist.high, 1 - dist.low) if param.reverse_log else (dist.low, dist.high)
        text = f"{kind} [{low!r}, {high!r}]" + (f" {scale}" if scale else "")
    for path, allowed in sorted(param.when.items()):
        text += f" when {path} in {list(allowed)!r}"
    return text


def definition(raw: Mapping[str, Any], params: Sequence[Any], content: str | None) -> dict[str, str]:
    """``{key: value in words}``: every setting that changes what a trial is, each searched path as its space
    entry (``space.<path>``) instead of its config value, the study's direction and the data's fingerprint."""
    searched = {p.path for p in params}
    out: dict[str, str] = {"study.direction": json.dumps(raw.get("study", {}).get("direction"))}
    for section in _SECTIONS:
        for key, value in _flat(raw.get(section) or {}, section).items():
            if key not in FREE and key not in searched:
                out[key] = json.dumps(value, sort_keys=True, default=str)
    for param in params:
        out[f"space.{param.path}"] = _entry(param)
    if content is not None:
        out[CONTENT_KEY] = content
    return dict(sorted(out.items()))


def differences(
    stored: Mapping[str, str], now: Mapping[str, str], *, ignore: Sequence[str] = ()
) -> dict[str, tuple[str, str]]:
    """``{key: (stored, now)}`` for each key whose value differs; a key under an ``ignore`` prefix is skipped."""
    keys = sorted(set(stored) | set(now))
    return {
        k: (stored.get(k, _ABSENT), now.get(k, _ABSENT))
        for k in keys
        if stored.get(k) != now.get(k) and not any(k == p or k.startswith(p + ".") for p in ignore)
    }


def _stored_definition(study: optuna.Study) -> tuple[dict[str, str] | None, bool]:
    """The study's stored definition, or one rebuilt from the config an earlier tuner stored (without the data's
    fingerprint: ``(definition, rebuilt)``); ``None`` for a study with no trace of either."""
    attrs = study.user_attrs
    if isinstance(attrs.get(DEFINITION_ATTR), dict):
        return dict(attrs[DEFINITION_ATTR]), False
    config = attrs.get("config")
    if isinstance(config, dict):
        try:
            params = parse_space(config.get("space"), config)
        except ConfigError:  # a config this tuner no longer reads: compare it value by value, never accept it blindly
            params = []
        return definition(config, params, None), True
    return None, False


def check_definition(
    study: optuna.Study,
    now: dict[str, str],
    *,
    url: str,
    accept: bool = False,
    ignore: Sequence[str] = (),
    record: bool = True,
) -> None:
    """Stop with one line if ``study``'s stored definition differs from ``now``; store it on a new study.
    ``accept`` (``study.accept_changes``) stores ``now`` and records the change instead, unless the data differ;
    ``ignore``: key prefixes not compared (tuner.report loads no data); ``record=False`` only compares."""
    stored, rebuilt = _stored_definition(study)
    if stored is None:  # a new study, or one tuner did not write
        if record:
            study.set_user_attr(DEFINITION_ATTR, now)
        return
    if rebuilt:  # an earlier tuner stored no fingerprint of its data: compare the rest, then add it
        ignore = (*ignore, CONTENT_KEY)
    diff = differences(stored, now, ignore=ignore)
    if not diff:
        if rebuilt and record:
            study.set_user_attr(DEFINITION_ATTR, now)
        return
    listed = "; ".join(f"{k}: {old} -> {new}" for k, old, new in ((k, *v) for k, v in diff.items()))
    # The fingerprint says what the data is; its keys only name it (an earlier tuner's data.num_samples on every set).
    same_data = CONTENT_KEY in stored and CONTENT_KEY in now and CONTENT_KEY not in diff
    data_changed = not same_data and any(k.startswith("data.") and k != "data.batch_size" for k in diff)
    if accept and not data_changed and record:
        changes = list(study.user_attrs.get(CHANGES_ATTR) or [])
        at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        changes.append({"at": at, "changes": {k: [old, new] for k, (old, new) in diff.items()}})
        study.set_user_attr(CHANGES_ATTR, changes)
        study.set_user_attr(DEFINITION_ATTR, now)
        return
    how = (
        "other data is another experiment: use a new study.name"
        if data_changed
        else "use a new study.name, or study.accept_changes=true to add these trials to it (recorded on the study)"
    )
    raise ConfigError(f"study {study.study_name!r} in {url} was defined otherwise ({listed}); {how}.")
