"""Redaction before anything is recorded: values a JSON Schema marks ``writeOnly`` (passwords, card numbers...)
and secret values that a tool echoes back."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

REDACTED = "[redacted]"
MAX_DEPTH = 32


def redact_write_only(schema: Any, value: Any, depth: int = 0) -> Any:
    """``value`` with every part its schema marks ``writeOnly: true`` replaced by ``"[redacted]"``.

    Follows ``properties``, ``additionalProperties``, ``items`` and the branches of ``allOf``/``anyOf``/
    ``oneOf`` (a branch marking a property writeOnly redacts it). ``patternProperties`` and ``$ref`` are
    not followed.
    """
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return value
    if schema.get("writeOnly") is True:
        return REDACTED
    for branch_key in ("allOf", "anyOf", "oneOf"):
        for branch in schema.get(branch_key, []) if isinstance(schema.get(branch_key), list) else []:
            value = redact_write_only(branch, value, depth + 1)
    if isinstance(value, dict):
        found = schema.get("properties")
        props: dict[str, Any] = found if isinstance(found, dict) else {}
        extra = schema.get("additionalProperties")
        return {
            key: redact_write_only(props[key], item, depth + 1) if key in props
            else redact_write_only(extra, item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [redact_write_only(schema["items"], item, depth + 1) for item in value]
    return value


# --- secret values echoed back by a tool ---------------------------------------------------------------


def scrub(value: Any, secrets: Collection[str]) -> Any:
    """``value`` with every occurrence of a secret's value replaced, in keys as in values (a service may
    echo a credential back anywhere)."""
    if isinstance(value, str):
        # Longest first: a secret that contains another is replaced whole, not around the shorter one.
        for secret in sorted(secrets, key=len, reverse=True):
            if secret and secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {scrub(key, secrets): scrub(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub(item, secrets) for item in value]
    return value


def secret_forms(secrets: Iterable[str]) -> list[bytes]:
    """The byte strings a secret may appear as in a response body: as is, and escaped inside a JSON string."""
    forms = {
        form.encode()
        for secret in secrets
        if secret
        for form in (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1])
    }
    return sorted(forms, key=len, reverse=True)


def cut_scrubbed(raw: bytes, limit: int, forms: Sequence[bytes]) -> tuple[bytes, bool]:
    """``raw`` with every secret form replaced, then cut to ``limit`` bytes; True when it was cut.

    Replacing before cutting matters: a cut through a secret would keep its prefix. The caller reads at
    least the longest form's length past ``limit`` so a secret that starts before the cut is whole; a
    body that stops in the middle of one (or a cut that lands in a replaced span) leaves a prefix of a
    secret at the very end, which is dropped.
    """
    for form in forms:
        raw = raw.replace(form, _REDACTED_BYTES)
    if len(raw) <= limit:
        return raw, False
    cut = raw[:limit]
    partial = max((k for form in forms for k in range(1, min(len(form), len(cut) + 1)) if cut.endswith(form[:k])),
                  default=0)
    return cut[: len(cut) - partial], True


_REDACTED_BYTES = REDACTED.encode()


# --- a tool's definition, shown to people ------------------------------------------------------------------

# Header names whose literal values are credentials (secrets belong in ``${{ secrets.<name> }}``, which
# the registry keeps as a reference; a literal written there anyway is never shown back).
_SENSITIVE_HEADER = re.compile(r"auth|cookie|token|secret|key|pass|credential|signature", re.IGNORECASE)
_TEMPLATE = re.compile(r"\$\{\{.*?\}\}", re.DOTALL)
_SCHEME_ONLY = re.compile(r"\s*(?:[A-Za-z-]+\s*)?")
# Values a JSON Schema may carry for a property: redacted under ``writeOnly: true``.
_SCHEMA_VALUES = ("default", "examples", "example", "const", "enum")


def redact_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored tool definition as people may read it: secret references kept (they are names, not values),
    literal values of credential-like headers replaced, and the example/default values of ``writeOnly``
    schema parts replaced by ``"[redacted]"``."""
    shown = dict(spec)
    executor = spec.get("executor")
    if isinstance(executor, dict) and isinstance(executor.get("headers"), dict):
        shown["executor"] = {**executor, "headers": {
            name: _header_value(name, value) for name, value in executor["headers"].items()
        }}
    for key in ("input_schema", "output_schema"):
        if isinstance(spec.get(key), dict):
            shown[key] = _schema_values(spec[key], False, 0)
    return shown


def _header_value(name: str, value: Any) -> Any:
    if not isinstance(value, str) or not _SENSITIVE_HEADER.search(name):
        return value
    literal = _TEMPLATE.sub("", value)
    return value if _SCHEME_ONLY.fullmatch(literal) else REDACTED


def _schema_values(schema: Any, write_only: bool, depth: int) -> Any:
    if depth > MAX_DEPTH:
        return REDACTED
    if isinstance(schema, list):
        return [_schema_values(item, write_only, depth + 1) for item in schema]
    if not isinstance(schema, dict):
        return schema
    write_only = write_only or schema.get("writeOnly") is True
    return {
        key: REDACTED if write_only and key in _SCHEMA_VALUES else _schema_values(value, write_only, depth + 1)
        for key, value in schema.items()
    }
