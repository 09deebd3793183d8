"""The commands that read studies (dashboard, report, refine) never create a storage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs a command in a fresh interpreter


@pytest.mark.parametrize("command", ["tuner.report", "tuner.refine", "tuner.dashboard"])
def test_stored_missing_journal_file_is_one_error_and_no_file(tmp_path: Path, command: str) -> None:
    journal = tmp_path / "typo.log"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            command,
            f"study.storage=journal:///{journal}",
            f"report.dir={tmp_path / 'rep'}",
            f"refine.space_dir={tmp_path / 'spaces'}",
            "dashboard.port=1",  # never served: the storage is refused first
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, out
    assert len(out.splitlines()) == 1
    assert f"study.storage='journal:///{journal}': there is no such journal file" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # Hydra's run folder, nothing of tuner's
