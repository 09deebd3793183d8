"""``python -m tuner.dashboard``: optuna-dashboard on the study's own storage and artifact folder."""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Any

from tuner.__main__ import cli, command
from tuner.config import parse_command_section, parse_run
from tuner.secrets import safe_url

__all__ = ["dashboard", "exposure_warning", "main"]

log = logging.getLogger("tuner")


def exposure_warning(host: str) -> str | None:
    """A warning for any bind address other than loopback; ``None`` for 127.0.0.0/8, ::1 and localhost."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"dashboard.host={host!r} is not loopback: optuna-dashboard has no authentication and its write endpoints "
        "(create and delete studies, tell trials, edit notes) are open to anyone who can reach the port. "
        "Prefer the default 127.0.0.1 and an SSH tunnel from your own machine: "
        "ssh -L 8080:127.0.0.1:8080 <this host>, then open http://127.0.0.1:8080/dashboard/"
    )


def dashboard(raw: dict[str, Any]) -> None:
    """``python -m tuner.dashboard``: serve ``study.storage`` with its artifacts until interrupted."""
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    from tuner.artifacts import artifact_dir
    from tuner.paths import check_folder
    from tuner.stored import open_existing_storage, study_names

    run = parse_run(raw)
    settings = parse_command_section(raw, "dashboard")
    host, port = settings.host, settings.port
    storage = open_existing_storage(run.study.storage)
    check_folder("study.artifact_dir", artifact_dir(run.study))  # made below when missing
    if warning := exposure_warning(host):
        log.warning("%s", warning)
    folder = artifact_dir(run.study).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/dashboard/"
    stored = study_names(storage)
    shown_study = next((n for n in (run.study.name, parse_command_section(raw, "babysit").study) if n in stored), None)
    if shown_study is not None:  # the study, else its babysit study (python -m tuner.babysit <the same overrides>)
        url += f"studies/{storage.get_study_id_from_name(shown_study)}"
    # A plain line on stdout: the one thing a person (or a test) reads from this command.
    print(f"optuna-dashboard for {safe_url(run.study.storage)} (artifacts: {folder}) at {url}", flush=True)
    print(
        f"same as: optuna-dashboard {safe_url(run.study.storage)} --host {host} --port {port} --artifact-dir {folder}",
        flush=True,
    )
    try:
        optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=FileSystemArtifactStore(folder))
    except OSError as err:
        log.error("dashboard.host=%r dashboard.port=%d cannot be served: %s", host, port, err)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


main = command(dashboard)

if __name__ == "__main__":
    cli(main)
