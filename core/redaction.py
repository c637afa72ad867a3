"""Credentials recognised in values, and kept out of every file, log line and command line the project writes.

Secret *keys* (``token``, ``api_key``, ``password``, ``secret``) are refused in configs (:mod:`core.config`);
this module finds secrets inside *values*, where a key name does not give them away:

- user-info in a URL: ``http://user:password@host/v1`` → ``http://***@host/v1``;
- Hugging Face tokens ``hf_…``, OpenAI-style keys ``sk-…``, GitHub tokens ``ghp_…``/``github_pat_…``;
- ``Bearer <token>`` and ``Authorization: <token>`` headers;
- query parameters named like a credential (``?api_key=…``, ``&token=…``, ``&access_token=…``, ``&key=…``).

:func:`redact` replaces each with ``***``; :class:`RedactingFilter` applies it to every log record of the process
(installed by :func:`core.common.setup_logging`); :func:`split_secret_overrides` keeps command-line overrides
that hold a credential off a child process's command line (they travel in :data:`SECRET_OVERRIDES_ENV`).
The rule is the project's own (no maintained library recognises credentials in free text on this stack).
"""
from __future__ import annotations

import json
import logging
import os
import re

SECRET_OVERRIDES_ENV = "STAGED_ALIGNMENT_SECRET_OVERRIDES"

_PATTERNS = [
    (re.compile(r"(?<=://)[^/\s@:]+(?::[^/\s@]*)?@"), "***@"),  # URL user-info
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_***"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{12,}"), "sk-***"),
    (re.compile(r"\b(?:ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{12,}"), "gh_***"),
    (re.compile(r"(?i)\b(bearer|authorization:)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 ***"),
    (re.compile(r"(?i)([?&](?:api_?key|access_token|token|key|password|secret)=)[^&#\s]+"), r"\1***"),
]


def redact(text: str) -> str:
    """``text`` with every credential of the module's list replaced by ``***`` (idempotent)."""
    if not isinstance(text, str) or not text:
        return text
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def has_secret(text) -> bool:
    """Whether ``text`` (any value; non-strings are False) holds a credential :func:`redact` would hide."""
    return isinstance(text, str) and redact(text) != text


def redact_tree(value):
    """A copy of a nested dict/list/str value with every string passed through :func:`redact` (keys too)."""
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def secret_paths(value, prefix: str = "") -> list[str]:
    """Dotted paths of every string in a nested dict/list that holds a credential."""
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            out += secret_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += secret_paths(v, f"{prefix}.{i}")
    elif has_secret(value):
        out.append(prefix)
    return out


class RedactingFilter(logging.Filter):
    """Rewrites each record's formatted message (and its exception text) through :func:`redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logged as logging would
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if has_secret(text):
                record.exc_info, record.exc_text = None, redact(text)
        return True


def install_log_redaction() -> None:
    """Add :class:`RedactingFilter` to every handler of the root logger (once)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def split_secret_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``(public, secret)``: the ``key=value`` overrides whose value holds a credential go to ``secret``."""
    public, secret = [], []
    for item in overrides:
        (secret if has_secret(item.partition("=")[2]) else public).append(item)
    return public, secret


def child_env(secret_overrides: list[str], env: dict | None = None) -> dict:
    """The environment for a stage subprocess: ``env`` (default ``os.environ``) plus the secret overrides as JSON
    under :data:`SECRET_OVERRIDES_ENV`, so that they never appear on a command line (``ps`` shows those)."""
    out = dict(os.environ if env is None else env)
    if secret_overrides:
        out[SECRET_OVERRIDES_ENV] = json.dumps(secret_overrides)
    else:
        out.pop(SECRET_OVERRIDES_ENV, None)
    return out


def overrides_from_env() -> list[str]:
    """The overrides a parent process passed in :data:`SECRET_OVERRIDES_ENV` (empty when unset or malformed)."""
    raw = os.environ.get(SECRET_OVERRIDES_ENV)
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [x for x in items if isinstance(x, str)] if isinstance(items, list) else []
