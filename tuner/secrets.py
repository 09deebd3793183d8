"""Storage passwords, masked in every spelling wherever tuner or Hydra writes: as written in the URL, decoded,
encoded again, escaped for Hydra's overrides, YAML, JSON or a repr, and folded across two lines by YAML.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from tuner._compat import LAUNCHER_LOGGERS

__all__ = [
    "MaskPasswords",
    "mask",
    "mask_password",
    "mask_password_in_files",
    "mask_passwords_in_logs",
    "mask_streams",
    "password_spellings",
    "remember",
    "safe_url",
]

MASK = "***"
# A spelling shorter than this is masked only where it stands as a URL's password (":" before, "@" after):
# masked everywhere, a password "ab1" would take every "ab1" out of the logs and the saved configs.
MIN_BARE = 4

# scheme://user:password@ in any text; Hydra writes the ':' of an override value as '\:'.
_URL_PASSWORD = re.compile(r"(://[^\s:/@\\]+\\?:)[^\s@]+@")
# The password as written: what SQLAlchemy's URL pattern (2.0) reads between "user:" and "@".
_WRITTEN_PASSWORD = re.compile(r"^[\w+]+://[^:/]*:([^@]*)@")
# What Hydra escapes with a backslash in an unquoted override value (hydra-core 1.3.8, OverrideLexer.g4's ESC).
_HYDRA_ESCAPED = re.compile(r"([\\()\[\]{}:=, \t])")
# YAML folds a long plain or single-quoted scalar at a space: a line break and the indentation instead.
_FOLDED_SPACE = r"(?:\ |\n\ *)"

_remembered: list[str] = []  # the URLs whose passwords mask() hides


def _hydra_escaped(text: str) -> str:
    return _HYDRA_ESCAPED.sub(r"\\\1", text)


def _sqlalchemy_quoted(password: str) -> str:
    """The password as ``URL.render_as_string(hide_password=False)`` writes it (Optuna gets that string)."""
    rendered = URL.create("x", username="u", password=password).render_as_string(hide_password=False)
    return rendered[len("x://u:") : -1]


def password_spellings(written: str, decoded: str | None = None) -> set[str]:
    """Every way ``written`` (a password as it stands in a URL) or its decoded form may appear in text."""
    plain = {written, unquote(written)} | ({decoded} if decoded else set())
    forms = set(plain)
    for p in plain:
        forms |= {quote(p, safe=""), quote(p), quote_plus(p), _sqlalchemy_quoted(p)}
    # In Hydra's overrides: unquoted (special characters escaped) or inside '...' or "..." (the quote escaped).
    forms |= {escaped for f in forms for escaped in (_hydra_escaped(f), f.replace("'", "\\'"), f.replace('"', '\\"'))}
    # Inside a YAML single-quoted scalar, a JSON string (ensure_ascii or not) or a Python repr.
    forms |= {
        quoted
        for f in forms
        for quoted in (
            f.replace("'", "''"),
            json.dumps(f)[1:-1],
            json.dumps(f, ensure_ascii=False)[1:-1],
            repr(f)[1:-1],
        )
    }
    return {f for f in forms if f}


def _secrets(url: str) -> list[tuple[str, str | None]]:
    """The passwords in ``url``: (as written, decoded), from its user part and from ``?password=``."""
    found: list[tuple[str, str | None]] = []
    written = _WRITTEN_PASSWORD.match(url)
    if written and written.group(1):
        try:
            decoded = make_url(url).password
        except ArgumentError:
            decoded = None
        found.append((written.group(1), None if decoded is None else str(decoded)))
    for pair in url.partition("?")[2].split("&"):
        key, _, value = pair.partition("=")
        if key == "password" and value:  # libpq takes one from the query too: postgresql://u@host/db?password=...
            found.append((value, unquote_plus(value)))
    return found


@functools.lru_cache(maxsize=64)
def _pattern(url: str) -> re.Pattern[str] | None:
    """One regex of every spelling of ``url``'s passwords, longest first; a space also matches a YAML fold."""
    forms: set[str] = set()
    for written, decoded in _secrets(url):
        forms |= password_spellings(written, decoded)
    if not forms:
        return None
    alternatives = []
    for form in sorted(forms, key=len, reverse=True):
        spelled = _FOLDED_SPACE.join(map(re.escape, form.split(" ")))
        alternatives.append(spelled if len(form) >= MIN_BARE else rf"(?<=:){spelled}(?=@)")
    return re.compile("|".join(alternatives))


def mask_password(text: str, url: str) -> str:
    """``text`` with every spelling of the storage URL's password replaced by ***."""
    pattern = _pattern(url) if "://" in url else None
    return pattern.sub(MASK, text) if pattern is not None else text


def safe_url(url: str) -> str:
    """The storage URL with its password masked in every spelling, for logs and messages; a value without
    ``://`` holds no password and is shown as typed."""
    if "://" not in url:
        return url
    try:
        parsed: URL | None = make_url(url)
    except ArgumentError:
        parsed = None
    if parsed is not None and "@" not in (parsed.host or ""):
        shown = parsed.render_as_string(hide_password=True)
    else:  # not SQLAlchemy's URL form, or an unencoded "@" in the password: hide all from "user:" to the last "@"
        shown = re.sub(r"(://[^:/@]*:).*@", rf"\1{MASK}@", url, count=1)
    return mask_password(shown, url)


def remember(url: str) -> None:
    """Mask ``url``'s password in every log record and wrapped stream (``mask``) from now on."""
    if "://" in url and url not in _remembered:
        _remembered.append(url)


def mask(text: str) -> str:
    """``text`` with the password of every remembered URL, and of any ``scheme://user:password@``, masked."""
    for url in list(_remembered):
        text = mask_password(text, url)
    return _URL_PASSWORD.sub(rf"\1{MASK}@", text)


class MaskPasswords(logging.Filter):
    """Mask passwords in a log record (``mask``): Hydra's launchers log every job's overrides first."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:  # the handlers' formatters use exc_text once it is set
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        return True


def mask_passwords_in_logs(url: str | None = None) -> None:
    """``remember`` ``url``; put ``MaskPasswords`` on the root logger's handlers and the job-override loggers."""
    if url is not None:
        remember(url)
    for target in [*logging.getLogger().handlers, *map(logging.getLogger, LAUNCHER_LOGGERS)]:
        if not any(isinstance(f, MaskPasswords) for f in target.filters):
            target.addFilter(MaskPasswords())


class _MaskedStream:
    """A text stream that masks passwords (``mask``) in what is written to it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(mask(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def mask_streams() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` to mask each write whole (Hydra prints ``--cfg job`` and its errors
    before tuner's code runs); ``print`` and logging write each message at once."""
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), _MaskedStream):
            setattr(sys, name, _MaskedStream(getattr(sys, name)))


def mask_password_in_files(url: str, paths: Iterable[Path]) -> None:
    """Mask the storage URL's password in files that copied the command line (Hydra's .hydra/*.yaml,
    multirun.yaml), each replaced whole (temp file + rename): parallel jobs mask one multirun.yaml at once."""
    for path in paths:
        text = path.read_text(encoding="utf-8")
        masked = mask_password(text, url)
        if masked != text:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(masked)
            os.replace(tmp, path)
