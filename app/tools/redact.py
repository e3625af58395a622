"""Redaction of values a JSON Schema marks ``writeOnly`` (passwords, card numbers...) before they are recorded."""

from __future__ import annotations

from typing import Any

REDACTED = "[redacted]"
MAX_DEPTH = 32


def redact(schema: Any, value: Any, depth: int = 0) -> Any:
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
            value = redact(branch, value, depth + 1)
    if isinstance(value, dict):
        found = schema.get("properties")
        props: dict[str, Any] = found if isinstance(found, dict) else {}
        extra = schema.get("additionalProperties")
        return {
            key: redact(props[key], item, depth + 1) if key in props else redact(extra, item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [redact(schema["items"], item, depth + 1) for item in value]
    return value
