"""``python -m tuner.dashboard`` serving a study tuner wrote, read in a real headless Chromium.

The browser is Debian's chromium driven by Selenium through Debian's chromedriver; nothing downloads a
browser or a driver. Without chromium the browser test skips, except in CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tuner.dashboard import exposure_warning

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Keep the browser off the network and out of the user's profile.
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1400,1000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serve(overrides: list[str], tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``python -m tuner.dashboard`` on a free loopback port; yields (study URL, the command's first line)."""
    port = _free_port()
    log = tmp_path / "dashboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuner.dashboard", *overrides, f"dashboard.port={port}"],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the dashboard did not start: {log.read_text()}")
                time.sleep(0.5)
        first = next(line for line in log.read_text().splitlines() if line.startswith("optuna-dashboard for "))
        yield first.rsplit(" at ", 1)[1], first
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def dashboard(digits_study: tuple[list[str], Any], tmp_path: Path) -> Iterator[tuple[str, str]]:
    overrides, _ = digits_study
    with _serve(overrides, tmp_path) as served:
        yield served


def _browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: install chromium and chromium-driver ({CHROMIUM} missing)")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager (which can download browsers and drivers) must never run: point it at nothing.
    monkeypatch.setenv("SE_MANAGER_PATH", str(tmp_path / "no-selenium-manager"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, Selenium Manager downloads nothing
    for flag in [*BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _page_text(driver: Any, url: str, *wanted: str, timeout: float = 60) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    body: list[str] = [""]

    def rendered(d: Any) -> bool:
        body[0] = d.find_element(By.TAG_NAME, "body").text
        return all(w in body[0] for w in wanted)

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(rendered)
    except Exception:
        pytest.fail(f"{url} never showed {wanted}; it showed:\n{body[0][:3000]}")
    return body[0]


@pytest.mark.slow
def test_dashboard_shows_study_trial_count_note_and_best_trials_artifacts(
    digits_study: tuple[list[str], Any], dashboard: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides, study = digits_study
    study_url, first_line = dashboard
    assert study_url.startswith("http://127.0.0.1:") and "/dashboard/studies/" in study_url
    storage = next(o for o in overrides if o.startswith("study.storage=")).split("sqlite:///", 1)[1]
    assert f"(artifacts: {Path(storage).with_name('study_artifacts')})" in first_line
    best = study.best_trial.number
    driver = _browser(tmp_path, monkeypatch)
    try:
        root = study_url.split("/dashboard/")[0] + "/dashboard/"
        _page_text(driver, root, "digits-mlp", "Direction: MAXIMIZE")
        # The study page, with tuner's custom plots beside the built-in ones.
        _page_text(driver, study_url, "val_accuracy vs optimizer.lr", "Learning curves: val_accuracy per epoch")
        note = _page_text(driver, study_url + "/note", "Search space", "What mattered")
        assert "Study digits-mlp" in note and "PED-ANOVA importance" in note
        assert f"Best trial: #{best}, val_accuracy {study.best_value:.4f}" in note
        trials = _page_text(
            driver, f"{study_url}/trials?numbers={best}", f"{len(study.trials)} Trials", "Artifacts", "best_model.pt"
        )
        assert "learning_curve.png" in trials and "confusion_matrix.png" in trials
        from selenium.webdriver.common.by import By

        listed = driver.find_element(By.XPATH, "//*[text()='best_model.pt']")  # the artifact's own list entry
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", listed)
        shot = tmp_path / "dashboard-best-trial.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    finally:
        driver.quit()


@pytest.mark.slow
def test_dashboard_missing_storage_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "typo.db"
    result = subprocess.run(
        [sys.executable, "-m", "tuner.dashboard", f"study.storage=sqlite:///{db}", "dashboard.port=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "there is no such SQLite file" in result.stdout + result.stderr
    assert not db.exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_dashboard_loopback_binds_without_warning(host: str) -> None:
    assert exposure_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "myhost.example"])
def test_dashboard_other_hosts_warn_of_open_write_endpoints_and_suggest_a_tunnel(host: str) -> None:
    warning = exposure_warning(host)
    assert warning is not None
    assert "no authentication" in warning and "write endpoints" in warning and "ssh -L" in warning


@pytest.mark.slow
def test_a_learning_rate_submitted_in_the_dashboards_form_reaches_the_running_babysat_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna
    from selenium.webdriver.common.by import By

    db = tmp_path / "babysit.db"
    overrides = ["data=digits", "model.hidden_units=32", "model.num_layers=1", f"study.storage=sqlite:///{db}"]
    command = [sys.executable, "-m", "tuner.babysit", *overrides, "trainer.epochs=5000", "babysit.keep_checkpoints=2"]
    job_log = (tmp_path / "job.log").open("w")
    job = subprocess.Popen(command, cwd=tmp_path, stdout=job_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not _running_epochs(db) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.poll() is None, (tmp_path / "job.log").read_text()
        driver = _browser(tmp_path, monkeypatch)
        with _serve(overrides, tmp_path) as (study_url, _):
            try:
                _page_text(driver, f"{study_url}/trials?numbers=0", "Set User Attributes Form", "set:optimizer.lr")
                field = driver.find_element(
                    By.XPATH,
                    "//label[starts-with(normalize-space(), 'set:optimizer.lr')]/following-sibling::div//input",
                )
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
                field.send_keys("0.0123")
                time.sleep(1.5)  # the form takes a field's text 500 ms after the last key
                shot = tmp_path / "babysit-form.png"
                assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
                _click(driver, "//button[normalize-space()='Submit']")
                events = _events(db, 1)
                assert events[0]["key"] == "optimizer.lr" and events[0]["new"] == 0.0123
                assert events[0]["applied"] and events[0]["source"] == "dashboard"
                # Then stop it from the same form: the choice, submitted with the text fields left empty.
                _click(driver, "//label[normalize-space()='stop after this epoch']//input")
                _click(driver, "//button[normalize-space()='Submit']")
                job.wait(timeout=120)
                _page_text(driver, study_url, "Babysat runs: val_accuracy per epoch")  # the custom plot
            finally:
                driver.quit()
        assert job.returncode == 0, (tmp_path / "job.log").read_text()
    finally:
        if job.poll() is None:
            job.kill()
        job_log.close()
    (trial,) = optuna.load_study(study_name="digits-mlp-babysit", storage=f"sqlite:///{db}").get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE
    at = events[0]["epoch"]
    lrs = {h["epoch"]: h["lr"] for h in trial.user_attrs["history"]}
    assert lrs[at] == 0.05 and lrs[at + 1] == 0.0123  # applied at the next epoch boundary
    keys = [(e["key"], e["source"]) for e in trial.user_attrs["babysit_events"]]
    assert keys == [("optimizer.lr", "dashboard"), ("stop", "dashboard")]


def _click(driver: Any, xpath: str) -> None:
    """Click the element at ``xpath``, found again while the page re-renders it (a submitted form does)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + 30
    while True:
        try:
            driver.execute_script("arguments[0].click()", driver.find_element(By.XPATH, xpath))
            return
        except (NoSuchElementException, StaleElementReferenceException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _running_epochs(db: Path) -> int:
    import optuna

    from tuner.storage import make_storage  # its schema lock: the job may be creating the schema now

    try:
        storage = make_storage(f"sqlite:///{db}")
        (trial,) = optuna.load_study(study_name="digits-mlp-babysit", storage=storage).get_trials()
    except (KeyError, ValueError):
        return 0
    return len(trial.intermediate_values)


def _events(db: Path, n: int) -> list[dict[str, Any]]:
    import optuna

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        (trial,) = optuna.load_study(study_name="digits-mlp-babysit", storage=f"sqlite:///{db}").get_trials()
        events = list(trial.user_attrs.get("babysit_events") or [])
        if len(events) >= n:
            return events
        time.sleep(0.2)
    pytest.fail(f"the babysit job recorded {n} event(s) in 60 s: {trial.user_attrs}")
