"""The "start a run" form of a workflow version, generated from its ``input_schema``; and reading it back.

Each property becomes a field by its schema: strings, numbers, integers and booleans as inputs, an ``enum``
as a select, an object with ``properties`` as a fieldset of its own fields. Anything else (arrays, ``oneOf``,
``$ref``, objects without properties, a schema too deep or too wide) is a JSON editor for that value. A
field's form name is ``in`` + the JSON pointer of its value in the input, so an error at a pointer lands
next to the field it belongs to. Reading the form back checks the values against the schema the way a run
start does, with a missing required property reported at the property itself (JSON Schema reports it at the
object). Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from referencing.exceptions import Unresolvable

from app.json_schema import schema_errors
from app.workflows.document import pointer

MAX_DEPTH = 4  # objects nested deeper are edited as JSON
MAX_FIELDS = 100  # a schema with more fields is edited as one JSON document
STRING_MAX = 10000  # a string field's length limit when its schema sets none (or a larger one)
JSON_MAX = 100000  # a JSON editor's length limit
SCALARS = (str, int, float, bool, type(None))
_ID = re.compile(r"[^A-Za-z0-9_]")


@dataclass
class FormField:
    pointer: str  # of the value in the input ("" for the input itself)
    label: str
    kind: str  # string | number | integer | boolean | enum | object | json
    required: bool = False
    description: str | None = None
    max_length: int = STRING_MAX
    choices: list[Any] = field(default_factory=list)  # an enum's values
    children: list[FormField] = field(default_factory=list)
    value: str = ""  # the text in the field (a default, or what was sent)
    checked: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "in" + self.pointer

    @property
    def id(self) -> str:
        return "f" + _ID.sub(lambda m: f"-{ord(m.group()):x}-", self.pointer)

    def choice_label(self, value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)


@dataclass
class RunForm:
    workflow: str
    version: int
    schema: Any  # the version's input_schema (None: the workflow takes any input)
    fields: list[FormField]
    generated: bool  # False: the schema is edited as one JSON document only
    request_key: str = ""  # a hidden field: the same form sent twice starts one run
    mode: str = "form"  # which of the two editors was sent: "form" or "json"
    json_value: str = "{}"
    json_errors: list[str] = field(default_factory=list)  # errors of the JSON editor, at their pointers
    errors: list[str] = field(default_factory=list)  # errors no field owns

    @property
    def has_errors(self) -> bool:
        return bool(self.errors or self.json_errors or any(_errors_in(f) for f in self.fields))

    def all_fields(self) -> list[FormField]:
        return [f for top in self.fields for f in _walk(top)]


def _walk(f: FormField) -> list[FormField]:
    return [f, *(g for child in f.children for g in _walk(child))]


def _errors_in(f: FormField) -> bool:
    return any(g.errors for g in _walk(f))


# --- building --------------------------------------------------------------------------------------------


def build_form(workflow: str, version: int, schema: Any) -> RunForm:
    """The form for ``schema``; with no schema, or one that is no object with properties, a JSON editor."""
    counter = [0]
    fields = _properties(schema, (), 0, counter) if _has_properties(schema) else None
    if fields is None or counter[0] > MAX_FIELDS:
        default = schema.get("default") if isinstance(schema, dict) else None
        return RunForm(workflow, version, schema, [], False, json_value=_json(default if default is not None else {}))
    return RunForm(workflow, version, schema, fields, True, json_value=_json(_defaults(fields)))


def _has_properties(schema: Any) -> bool:
    return isinstance(schema, dict) and isinstance(schema.get("properties"), dict) and schema.get("type", "object") \
        == "object"


def _properties(schema: dict[str, Any], path: tuple[str, ...], depth: int, counter: list[int]) -> list[FormField]:
    required = schema.get("required")
    required = set(required) if isinstance(required, list) else set()
    return [_field(str(key), sub, (*path, str(key)), key in required, depth, counter)
            for key, sub in schema["properties"].items()]


def _field(key: str, schema: Any, path: tuple[str, ...], required: bool, depth: int, counter: list[int]) -> FormField:
    counter[0] += 1
    sub = schema if isinstance(schema, dict) else {}
    title = sub.get("title")
    made = FormField(pointer(path), title if isinstance(title, str) and title else key, "json", required,
                     sub.get("description") if isinstance(sub.get("description"), str) else None, JSON_MAX)
    kind = sub.get("type")
    enum = sub.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, SCALARS) for v in enum):
        made.kind, made.choices = "enum", list(enum)
    elif kind == "string":
        limit = sub.get("maxLength")
        made.kind = "string"
        made.max_length = min(limit, STRING_MAX) if type(limit) is int and limit > 0 else STRING_MAX
    elif kind in ("number", "integer", "boolean"):
        made.kind, made.max_length = kind, 64
    elif _has_properties(sub) and depth + 1 < MAX_DEPTH:
        made.kind, made.children = "object", _properties(sub, path, depth + 1, counter)
    _prefill(made, sub.get("default"))
    return made


def _prefill(f: FormField, default: Any) -> None:
    if default is None:
        return
    if f.kind == "boolean":
        f.checked = default is True
    elif f.kind == "enum":
        f.value = next((str(i) for i, v in enumerate(f.choices) if _same(v, default)), "")
    elif f.kind in ("string", "number", "integer") and isinstance(default, (str, int, float)) \
            and not isinstance(default, bool):
        f.value = str(default)
    elif f.kind == "json":
        f.value = _json(default)


def _defaults(fields: list[FormField]) -> dict[str, Any]:
    """What the generated form would send untouched: the JSON editor starts from it."""
    value, _ = _read_object(fields, {}, errors=False)
    return value


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


# --- reading back ----------------------------------------------------------------------------------------


def read_form(form: RunForm, sent: dict[str, str]) -> Any:
    """The input the form describes, with the sent values kept in the fields to show again; every problem is
    put on the field it belongs to (``form.has_errors``), the schema checked too."""
    form.mode = "json" if sent.get("mode") == "json" or not form.generated else "form"
    if form.mode == "json":
        form.json_value = sent.get("input_json", "")
        if len(form.json_value) > JSON_MAX:
            form.json_errors.append(f"at most {JSON_MAX} characters")
            return None
        try:
            value = json.loads(form.json_value) if form.json_value.strip() else {}
        except ValueError as exc:
            form.json_errors.append(f"not JSON: {exc}")
            return None
    else:
        value, _ = _read_object(form.fields, sent, errors=True)
    place_errors(form, input_errors(form.schema, value))
    return value


def _read_object(fields: list[FormField], sent: dict[str, str], *, errors: bool) -> tuple[dict[str, Any], bool]:
    value: dict[str, Any] = {}
    for f in fields:
        present, item = _read(f, sent, errors)
        if present:
            value[f.pointer.rsplit("/", 1)[1].replace("~1", "/").replace("~0", "~")] = item
    return value, bool(value)


def _read(f: FormField, sent: dict[str, str], errors: bool) -> tuple[bool, Any]:
    if f.kind == "object":
        value, any_set = _read_object(f.children, sent, errors=errors)
        return any_set or f.required, value
    if f.kind == "boolean":
        if errors:
            f.checked = f.name in sent
        return True, f.checked
    text = sent.get(f.name, "") if errors else f.value
    if errors:
        f.value = text
    if not text.strip() and f.kind != "string" or not text:
        return False, None
    # The schema's own maxLength is the schema check's to report; this only bounds what is parsed.
    hard_limit = STRING_MAX if f.kind == "string" else JSON_MAX
    if len(text) > hard_limit:
        if errors:
            f.errors.append(f"at most {hard_limit} characters")
        return False, None
    try:
        return True, _parse(f, text)
    except ValueError as exc:
        if errors:
            f.errors.append(str(exc))
        return False, None


def _parse(f: FormField, text: str) -> Any:
    if f.kind == "string":
        return text
    if f.kind == "integer":
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError("not a whole number") from None
    if f.kind == "number":
        try:
            return int(text.strip())
        except ValueError:
            pass
        try:
            number = float(text.strip())
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(number):
            raise ValueError("not a finite number")
        return number
    if f.kind == "enum":
        if not text.isdigit() or int(text) >= len(f.choices):
            raise ValueError("not one of the choices")
        return f.choices[int(text)]
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None


def input_errors(schema: Any, value: Any) -> list[dict[str, str]]:
    """``value`` against ``schema`` as a run start checks it, a missing required property at its own pointer."""
    if schema is None:
        return []
    found: list[dict[str, str]] = []
    try:
        for error in schema_errors(Draft202012Validator(schema), value):
            at = tuple(str(part) for part in error.absolute_path)
            if error.validator == "required" and isinstance(error.instance, dict) \
                    and isinstance(error.validator_value, list):
                missing = [p for p in error.validator_value if isinstance(p, str) and p not in error.instance
                           and repr(p) in error.message]
                if missing:
                    found.append({"pointer": pointer((*at, missing[0])), "message": "required"})
                    continue
            found.append({"pointer": pointer(at), "message": error.message})
    except Unresolvable as exc:
        return [{"pointer": "", "message": f"input_schema cannot be applied: unresolvable $ref ({exc})"}]
    return found


def place_errors(form: RunForm, errors: list[dict[str, str]]) -> None:
    """Each error on the field whose value holds its pointer (the deepest), else on the form."""
    if form.mode == "json":
        form.json_errors += [f"{e['pointer'] or '/'}: {e['message']}" for e in errors]
        return
    by_pointer = {f.pointer: f for f in form.all_fields()}
    # A field whose text could not be read is missing from the value: the schema would only call it missing.
    unread = {f.pointer for f in form.all_fields() if f.errors}
    for error in errors:
        if error["pointer"] in unread:
            continue
        at = error["pointer"]
        while at and at not in by_pointer:
            at = at.rsplit("/", 1)[0]
        owner = by_pointer.get(at)
        # An object's fieldset takes the errors about the object itself; deeper ones belong to its fields.
        if owner is not None and (owner.kind != "object" or at == error["pointer"]):
            inner = error["pointer"][len(at):]
            owner.errors.append(f"{inner}: {error['message']}" if inner else error["message"])
        else:
            form.errors.append(f"{error['pointer'] or '/'}: {error['message']}")
