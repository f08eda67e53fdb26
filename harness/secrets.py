"""Keep secrets out of everything vlmlab writes: MLflow params/tags, result.json, manifests, logs."""
from __future__ import annotations

import os
import re

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)
_ASSIGNMENT = re.compile(r"(?P<key>[\w.-]*(?:token|secret|password|passwd|key|credential)[\w.-]*)=(?P<value>\S+)",
                         re.IGNORECASE)
MASK = "***"


def environ_snapshot() -> dict[str, str]:
    """A copy of os.environ that other threads may be changing meanwhile (MLflow's telemetry thread sets and
    deletes variables): iterating os.environ then raises KeyError for a key deleted mid-iteration."""
    for _ in range(100):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)


def secret_values() -> list[str]:
    """Values of environment variables whose names look secret (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...)."""
    return sorted({v for k, v in environ_snapshot().items() if SECRET_NAME.search(k) and len(v) >= 6}, key=len,
                  reverse=True)


def redact_text(text: str) -> str:
    text = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _ASSIGNMENT.sub(lambda m: f"{m.group('key')}={MASK}", text)
    for value in secret_values():
        text = text.replace(value, MASK)
    return text


def redact(obj):
    """A deep copy of ``obj`` with every string redacted."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj
