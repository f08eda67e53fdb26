"""Keep secrets out of everything vlmlab writes: config.yaml, result.json, stage keys, MLflow, logs.

A secret is
* a value under a key that has a secret word among its words (``HF_TOKEN``, ``db_password``, ``apiKey``,
  ``aws_secret_access_key``, ``auth``; never ``max_new_tokens``);
* the userinfo of a URL of any scheme, up to the last ``@`` (``https://ghp_x@github.com``, ``postgresql://bob:a/b@db``);
* a string shaped like a known token (``hf_…``, ``ghp_…``, ``github_pat_…``, ``sk-…``, ``AKIA…``, ``xoxb-…``...);
* the value of an environment variable whose name has a secret word or ``KEY`` among its words.

In free text a secret becomes ``***``. In a config tree it becomes ``${secret:NAME}``, NAME being the environment
variable `harness reproduce` reads it back from: the variable it came from, else one named after its config key.
"""
from __future__ import annotations

import os
import re
import threading

MASK = "***"
SECRET_WORDS = {"token", "secret", "secrets", "password", "passwords", "passwd", "credential", "credentials", "auth",
                "authorization", "apikey", "accesskey", "privatekey"}
SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key")}
ENV_WORDS = (SECRET_WORDS - {"auth"}) | {"key"}  # RAY_AUTH_MODE=disabled is a switch, not a secret
TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|sk-[A-Za-z0-9_-]{20,}"
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}|xox[abeprs]-[A-Za-z0-9-]{10,}|glpat-[A-Za-z0-9_-]{20,}|AIza[A-Za-z0-9_-]{35})")
# scheme://userinfo@ ; the userinfo runs to the last '@' before whitespace or a quote (a password may hold '/' or '@').
# One slash counts too: a URL given where a path is expected comes back from pathlib as `http:/user:pass@host`
URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*:/{1,3})(?P<userinfo>[^\s\"'<>]*)@", re.IGNORECASE)
# key=value, key: value, "key": "value" (a ':' only counts when followed by a space or quote: not `secret:NAME`)
ASSIGNMENT = re.compile(r"""(?P<key>[\w.-]+)(?P<sep>["']?\s*(?:=|:(?=[\s"']))\s*["']?)(?P<value>[^\s"',;&)}\]]+)""")
BEARER = re.compile(r"\b(?P<key>Bearer|Basic)\s+(?P<value>[A-Za-z0-9._~+/=-]{8,})")
PLACEHOLDER = re.compile(r"\$\{secret:(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}")


def key_words(name: str) -> list[str]:
    """'AWS_SECRET_ACCESS_KEY' -> aws secret access key; 'apiKey' -> api key; 'max_new_tokens' -> max new tokens."""
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", str(name))]


def _has_words(name: str, words: set[str]) -> bool:
    parts = key_words(name)
    return bool(words.intersection(parts)) or bool(SECRET_PAIRS.intersection(zip(parts, parts[1:], strict=False)))


def is_secret_key(name: str) -> bool:
    return _has_words(name, SECRET_WORDS)


def environ_snapshot() -> dict[str, str]:
    """A copy of os.environ that other threads may be changing meanwhile (MLflow's telemetry thread sets and
    deletes variables): iterating os.environ then raises KeyError for a key deleted mid-iteration."""
    for _ in range(100):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)


def secret_env() -> dict[str, str]:
    """value -> name of the environment variables that hold secrets (HF_TOKEN, AWS_SECRET_ACCESS_KEY...),
    longest value first."""
    found = {v: k for k, v in environ_snapshot().items() if len(v) >= 6 and _has_words(k, ENV_WORDS)}
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def secret_values() -> list[str]:
    return list(secret_env())


def _mask(text: str, replace) -> str:
    """Every secret span of ``text`` replaced by ``replace(span)``; placeholders already there are kept."""
    for value, name in secret_env().items():
        text = text.replace(value, replace(value, name))

    def kept(span: str, new: str) -> str:
        return span if span == MASK or PLACEHOLDER.fullmatch(span) else new

    text = URL_USERINFO.sub(lambda m: m["scheme"] + kept(m["userinfo"], replace(m["userinfo"], None)) + "@", text)
    text = TOKEN_SHAPES.sub(lambda m: replace(m[0], None), text)
    text = BEARER.sub(lambda m: f"{m['key']} {kept(m['value'], replace(m['value'], None))}", text)
    return ASSIGNMENT.sub(lambda m: m["key"] + m["sep"] + kept(m["value"], replace(m["value"], None))
                          if is_secret_key(m["key"]) else m[0], text)


def redact_text(text: str) -> str:
    """``text`` with every secret replaced by ``***``."""
    return _mask(str(text), lambda span, name: MASK)


def _env_name(path: tuple) -> str:
    """The variable a secret found at config ``path`` is read back from: an env_vars entry's own name, else
    VLMLAB_SECRET_<PATH>."""
    if len(path) >= 2 and path[-2] == "env_vars":
        return re.sub(r"\W", "_", str(path[-1]))
    return "VLMLAB_SECRET_" + re.sub(r"\W", "_", "_".join(map(str, path))).upper()


def _placeholder(name: str) -> str:
    return "${secret:" + name + "}"


def redact(obj, path: tuple = ()):
    """A deep copy of a config tree with every secret replaced by a ``${secret:NAME}`` placeholder."""
    if isinstance(obj, dict):
        return {redact_text(k): redact(v, (*path, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, (*path, i)) for i, v in enumerate(obj))
    own = _env_name(path)
    if path and is_secret_key(path[-1]) and isinstance(obj, (str, int, float)) and not isinstance(obj, bool):
        text = str(obj)
        if text and not PLACEHOLDER.fullmatch(text):
            return _placeholder(secret_env().get(text, own))
        return obj
    if not isinstance(obj, str):
        return obj
    spans: list[str] = []

    def placeholder(span: str, name: str | None) -> str:
        if name is None:
            spans.append(span)
            name = own if len(spans) == 1 else f"{own}_{len(spans)}"
        return _placeholder(name)

    return _mask(obj, placeholder)


def placeholders(obj) -> set[str]:
    """Names of the ``${secret:NAME}`` placeholders in a (redacted) config tree."""
    if isinstance(obj, dict):
        return set().union(*(placeholders(v) for v in obj.values()))
    if isinstance(obj, (list, tuple)):
        return set().union(*(placeholders(v) for v in obj))
    return {m["name"] for m in PLACEHOLDER.finditer(obj)} if isinstance(obj, str) else set()


def restore(obj, env: dict[str, str]):
    """The inverse of ``redact``: every placeholder replaced by its environment variable's value."""
    if isinstance(obj, dict):
        return {k: restore(v, env) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(restore(v, env) for v in obj)
    return PLACEHOLDER.sub(lambda m: env[m["name"]], obj) if isinstance(obj, str) else obj


class RedactingStream:
    """Wraps stdout/stderr: every line written is redacted before it reaches the terminal or a log file. Text is
    held until its line ends (or flush), so a secret split across writes of one line is still caught. Everything
    else (encoding, isatty, fileno...) is the wrapped stream's."""

    def __init__(self, stream):
        self.stream, self._pending, self._lock = stream, "", threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:  # Ray prints its workers' output from another thread
            self._pending += text
            end = max(self._pending.rfind("\n"), self._pending.rfind("\r")) + 1
            if end:
                self.stream.write(redact_text(self._pending[:end]))
                self._pending = self._pending[end:]
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self.stream.write(redact_text(self._pending))
                self._pending = ""
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)
