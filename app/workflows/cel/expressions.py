"""CEL expressions embedded in workflow definitions as ``${{ <CEL> }}``.

Evaluation context keys: ``input`` (the run input), ``steps`` (step id -> ``{"output": ...}``) and, inside
map args, ``item`` and ``index``.

Notes on the ``cel`` package (common-expression-language 0.10) that shape this module:

* ``cel.compile`` raises ``ValueError`` for syntax errors; ``Program.execute`` raises a spread of builtin
  exceptions (``KeyError`` for a missing map key, ``IndexError``, ``TypeError`` for a missing overload,
  ``RuntimeError`` for an undefined variable or a failing function, ``ZeroDivisionError``,
  ``OverflowError``, and ``ValueError`` when a context value cannot be converted). All of them become
  :class:`ExpressionError` here.
* Results may be ``bytes``, ``datetime``, ``timedelta`` or ``cel.OptionalValue`` and maps may have int
  keys, so every result goes through :func:`_to_json` before anyone sees it.
* The library has no AST access (``Program.variables()`` lists only top-level identifiers), so
  :func:`referenced_steps` uses a small tokenizer that understands CEL string literals and comments.
* Every execution converts the context values it is given to CEL values in full, at roughly 5-15 us per
  value (a 200 KB step output costs ~300 ms), even for variables the expression never reads. Evaluation
  therefore hands CEL only the variables, and where possible only the step outputs, an expression names.
* The parser and the value converter recurse on the native stack and segfault (no exception) on deep
  input: ~20 nested brackets or ~200 chained operators on a 128-256 KB thread stack, ~10k on the 8 MB
  main thread. Expression size/nesting and context depth are capped below those levels.
* ``Program.execute`` holds the GIL and cannot be interrupted: nested comprehensions can run for
  minutes, and a thread does not keep an event loop responsive meanwhile. The functions here evaluate
  in the calling thread; :mod:`app.workflows.cel.evaluation` decides, from the static :class:`Cost` of each
  expression and the size of its data, whether that is safe or the killable sandbox
  (:mod:`app.workflows.cel.sandbox`) must do it. Expressions being posted are also held to
  :meth:`Cost.problem` (:func:`check_expression`); stored ones are not, so they keep loading.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeAlias

import cel

from app.workflows.cel.cost import MACROS, Cost, analyse

__all__ = [
    "CompiledExpr",
    "ExpressionError",
    "ExpressionLimit",
    "check_expression",
    "compile_expression",
    "condition_source",
    "evaluate_condition",
    "extract_expressions",
    "is_template",
    "referenced_steps",
    "render",
    "whole_expression",
]

OPEN = "${{"
CLOSE = "}}"
MAX_EXPRESSION_LENGTH = 2000
MAX_EXPRESSION_TOKENS = 400
MAX_EXPRESSION_DEPTH = 16  # nesting of (), [] and {}
MAX_VALUE_DEPTH = 100  # nesting of dicts/lists handed to CEL


class ExpressionError(Exception):
    """An expression failed to parse or evaluate; ``expression`` is the CEL text (or template) at fault."""

    def __init__(self, expression: str, message: str) -> None:
        super().__init__(f"expression `{expression}`: {message}")
        self.expression = expression
        self.reason = message


class ExpressionLimit(ExpressionError):
    """An evaluation went past a limit (its time budget, the size of its data, the sandbox's memory).

    Unlike other evaluation errors, where a caller may have a fallback (a tool's condition that cannot be
    decided asks a person), this one always fails the step with error class ``expression``."""


@dataclass(frozen=True, eq=False)
class CompiledExpr:
    """A parsed CEL program, reusable across evaluations."""

    source: str
    program: cel.Program
    # Top-level identifiers the expression mentions: only those context entries are handed to CEL.
    variables: frozenset[str]
    # The step ids named literally (steps.x / steps['x']), or None when `steps` is also used as a whole
    # (size(steps), steps[expr], ...) and so must be passed complete.
    step_ids: frozenset[str] | None
    cost: Cost
    # Names bound by comprehensions (`x` in `list.all(x, ...)`): ``variables`` lists them too.
    bound: frozenset[str] = frozenset()

    def evaluate(self, context: Mapping[str, Any], *, checked: bool = False) -> Any:
        """Run the program against ``context`` and return a plain JSON value (in this thread: see above).

        ``checked``: the caller has already made sure the context is not nested too deeply."""
        scoped = scope(context, self.variables, self.step_ids)
        if not checked and _too_deep(scoped.values(), MAX_VALUE_DEPTH):
            raise ExpressionError(self.source, f"data is nested too deeply (over {MAX_VALUE_DEPTH} levels)")
        try:
            result = self.program.execute(scoped)
        except Exception as exc:  # cel raises a zoo of builtin exceptions; see the module docstring.
            raise ExpressionError(self.source, _describe_runtime_error(exc)) from exc
        return _to_json(result, self.source)


def scope(
    context: Mapping[str, Any], variables: frozenset[str], step_ids: frozenset[str] | None
) -> dict[str, Any]:
    """The part of ``context`` an expression can read: its variables and, when named, only those steps."""
    scoped = {name: context[name] for name in variables if name in context}
    steps = scoped.get("steps")
    if step_ids is not None and isinstance(steps, Mapping):
        # Missing ids stay missing, so a lookup fails (or has() answers) exactly as with the full map.
        scoped["steps"] = {step: steps[step] for step in step_ids if step in steps}
    return scoped


def check_expression(text: str) -> CompiledExpr:
    """:func:`compile_expression`, also refusing what may not be stored: see :meth:`Cost.problem`."""
    compiled = compile_expression(text)
    problem = compiled.cost.problem()
    if problem is not None:
        raise ExpressionError(compiled.source, f"too costly: {problem}")
    return compiled


@lru_cache(maxsize=4096)
def compile_expression(text: str) -> CompiledExpr:
    """Compile a bare CEL expression (no ``${{ }}``); raises :class:`ExpressionError` on a syntax error."""
    source = text.strip()
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(source[:80] + "...", f"too long (over {MAX_EXPRESSION_LENGTH} characters)")
    tokens = list(_tokenize(source))
    _check_complexity(source, tokens)
    try:
        program = cel.compile(source)
    except ValueError as exc:
        raise ExpressionError(source, _describe_syntax_error(str(exc))) from exc
    names, static = _step_uses(tokens)
    return CompiledExpr(
        source=source,
        program=program,
        variables=frozenset(program.variables()),
        step_ids=frozenset(names) if static else None,
        cost=analyse(tokens),
        bound=frozenset(_bound_names(tokens)),
    )


def _check_complexity(source: str, tokens: list[_Token]) -> None:
    # Guards against the native-stack overflow described in the module docstring.
    if len(tokens) > MAX_EXPRESSION_TOKENS:
        raise ExpressionError(source, f"too complex (over {MAX_EXPRESSION_TOKENS} tokens)")
    depth = 0
    for token in tokens:
        if token.kind != "punct":
            continue
        depth += 1 if token.text in "([{" else -1 if token.text in ")]}" else 0
        if depth > MAX_EXPRESSION_DEPTH:
            raise ExpressionError(
                source, f"nested too deeply (over {MAX_EXPRESSION_DEPTH} levels of brackets)"
            )


def _too_deep(values: Iterable[Any], limit: int) -> bool:
    todo = [(value, 1) for value in values]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict | list | tuple):
            if depth > limit:
                return True
            todo.extend((item, depth + 1) for item in (node.values() if isinstance(node, dict) else node))
    return False


# --- templates -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Expr:
    source: str


_Part: TypeAlias = str | _Expr


def is_template(value: str) -> bool:
    """True when ``value`` contains at least one ``${{`` (i.e. it must be rendered, not used verbatim)."""
    return OPEN in value


def extract_expressions(value: str) -> list[str]:
    """The CEL texts inside each ``${{ }}`` of ``value``, whitespace-trimmed, in order of appearance."""
    return [part.source for part in _parse_template(value) if isinstance(part, _Expr)]


def whole_expression(value: str) -> str | None:
    """The CEL text when ``value`` is exactly one ``${{ expr }}`` (surrounding whitespace allowed)."""
    if not is_template(value):
        return None
    return _whole(_parse_template(value))


def condition_source(text: str) -> str:
    """The CEL text of a condition written either as ``${{ expr }}`` or as a bare expression."""
    if not is_template(text):
        return text.strip()
    source = whole_expression(text)
    if source is None:
        raise ExpressionError(text, "a condition must be a single ${{ }} expression or a bare expression")
    return source


def _whole(parts: tuple[_Part, ...]) -> str | None:
    exprs = [part for part in parts if isinstance(part, _Expr)]
    if len(exprs) == 1 and all(isinstance(part, _Expr) or not part.strip() for part in parts):
        return exprs[0].source
    return None


def _parse_template(value: str) -> tuple[_Part, ...]:
    # Templates are parsed on every render; only short ones are cached, or a few thousand megabyte-long
    # strings (one request body each) would stay in memory for good.
    return _parse_short(value) if len(value) <= 4096 else _parse(value)


@lru_cache(maxsize=4096)
def _parse_short(value: str) -> tuple[_Part, ...]:
    return _parse(value)


def _parse(value: str) -> tuple[_Part, ...]:
    parts: list[_Part] = []
    pos = 0
    while (start := value.find(OPEN, pos)) != -1:
        if start > pos:
            parts.append(value[pos:start])
        end = _find_close(value, start + len(OPEN))
        if end == -1:
            raise ExpressionError(value, f"unterminated '{OPEN}': missing '{CLOSE}'")
        parts.append(_Expr(value[start + len(OPEN) : end].strip()))
        pos = end + len(CLOSE)
    if pos < len(value):
        parts.append(value[pos:])
    return tuple(parts)


def _find_close(text: str, pos: int) -> int:
    """Index of the ``}}`` ending an expression that starts at ``pos``, or -1.

    A plain search would stop inside ``{'a': {'b': 1}}`` or ``'}}'``, so braces are counted and string
    literals skipped.
    """
    depth = 0
    while pos < len(text):
        char = text[pos]
        if char in "'\"":
            pos = _string_end(text, pos)
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            if depth:
                depth -= 1
            elif text.startswith(CLOSE, pos):
                return pos
        pos += 1
    return -1


def _string_end(text: str, start: int) -> int:
    """Index just past the CEL string literal whose opening quote is at ``start`` (len(text) if open)."""
    quote = text[start]
    delim = quote * 3 if text.startswith(quote * 3, start) else quote
    raw = _has_raw_prefix(text, start)
    pos = start + len(delim)
    while pos < len(text):
        if text.startswith(delim, pos):
            return pos + len(delim)
        pos += 2 if text[pos] == "\\" and not raw else 1
    return len(text)


def _has_raw_prefix(text: str, quote_at: int) -> bool:
    # A literal prefix is up to two of r/b (r'', b'', rb'', br''); it must not be the tail of an identifier.
    begin = quote_at
    while begin > 0 and quote_at - begin < 2 and text[begin - 1] in "rRbB":
        begin -= 1
    if begin > 0 and (text[begin - 1].isalnum() or text[begin - 1] == "_"):
        return False
    return "r" in text[begin:quote_at].lower()


# --- rendering -----------------------------------------------------------------------------------------


def render(value: Any, context: Mapping[str, Any], *, checked: bool = False) -> Any:
    """Substitute every ``${{ }}`` in ``value``, walking dicts and lists.

    A string that is exactly one expression becomes the expression's value with its own type; a string
    mixing text and expressions becomes a string (string values as-is, others as compact JSON). Dict keys
    and non-string scalars pass through untouched.
    """
    if isinstance(value, str):
        return _render_string(value, context, checked) if is_template(value) else value
    if isinstance(value, dict):
        return {key: render(item, context, checked=checked) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [render(item, context, checked=checked) for item in value]
    return value


def _render_string(value: str, context: Mapping[str, Any], checked: bool) -> Any:
    parts = _parse_template(value)
    source = _whole(parts)
    if source is not None:
        return compile_expression(source).evaluate(context, checked=checked)
    chunks: list[str] = []
    for part in parts:
        if isinstance(part, str):
            chunks.append(part)
            continue
        result = compile_expression(part.source).evaluate(context, checked=checked)
        chunks.append(result if isinstance(result, str) else _compact_json(result))
    return "".join(chunks)


def evaluate_condition(text: str, context: Mapping[str, Any], *, checked: bool = False) -> bool:
    """Evaluate a ``when``-style condition (``${{ expr }}`` or bare CEL); the result must be a bool."""
    source = condition_source(text)
    result = compile_expression(source).evaluate(context, checked=checked)
    if not isinstance(result, bool):
        raise ExpressionError(source, f"condition must evaluate to a bool, got {_type_name(result)}")
    return result


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _type_name(value: Any) -> str:
    # CEL's names where they differ from Python's, since that is the language the author wrote in.
    names = {type(None): "null", str: "string", float: "double", dict: "map"}
    return names.get(type(value), type(value).__name__)


# --- conversions and error messages --------------------------------------------------------------------


def _to_json(value: Any, source: str) -> Any:
    """Turn a CEL result into dict/list/str/int/float/bool/None; results are stored as JSON(B)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            # JSON (and Postgres JSONB) have no NaN/Infinity; failing loudly beats storing garbage.
            raise ExpressionError(source, f"result is not a finite number ({value})")
        return value
    if isinstance(value, dict):
        return {_json_key(key): _to_json(item, source) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(item, source) for item in value]
    if isinstance(value, cel.OptionalValue):
        return _to_json(value.value(), source) if value.has_value() else None
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.timedelta):
        # CEL's own string form of a duration, e.g. "1.5s".
        return f"{value.total_seconds():.9f}".rstrip("0").rstrip(".") + "s"
    return str(value)


def _json_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return key if isinstance(key, str) else str(key)


def _describe_runtime_error(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        # cel's KeyError carries only the key, which reads badly on its own.
        return f"no such key: {exc.args[0]!r}" if exc.args else "no such key"
    return str(exc) or type(exc).__name__


_SYNTAX_LINE = re.compile(r"ERROR: <input>:(\d+:\d+): (?:Syntax error: )?(.*)")


def _describe_syntax_error(message: str) -> str:
    # cel's message repeats the source and draws a caret diagram; the first "ERROR:" line says it all.
    match = _SYNTAX_LINE.search(message)
    if match is None:
        return f"syntax error: {message}"
    return f"syntax error at {match.group(1)}: {match.group(2)}"


# --- static analysis -----------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_]*(?:\.[0-9][0-9A-Za-z_]*)?")
# r'..', b'..', rb'..', br'..': the prefix belongs to the literal, not to an identifier.
_STRING_PREFIX = re.compile(r"(?:[rR][bB]?|[bB][rR]?)(?=['\"])")


@dataclass(frozen=True)
class _Token:
    kind: str  # "ident", "string", "number" or "punct"
    text: str


def referenced_steps(text: str) -> set[str]:
    """Step ids ``X`` used as ``steps.X`` or ``steps["X"]`` in a bare CEL expression.

    ``x.steps.y`` (a field of something else) and method calls on the map (``steps.exists(...)``) do not
    count. For a template string, call this on each of :func:`extract_expressions`.
    """
    return _step_uses(list(_tokenize(text)))[0]


def _step_uses(tokens: list[_Token]) -> tuple[set[str], bool]:
    """The step ids named literally, and whether every use of ``steps`` is such a literal one."""
    found: set[str] = set()
    static = True
    for i, token in enumerate(tokens):
        if token != _Token("ident", "steps") or (i > 0 and tokens[i - 1] == _Token("punct", ".")):
            continue
        step = _step_after(tokens, i + 1)
        if step is None:
            static = False
        else:
            found.add(step)
    return found, static


def _bound_names(tokens: list[_Token]) -> Iterator[str]:
    for i in range(1, len(tokens) - 3):
        if (tokens[i].kind == "ident" and tokens[i].text in MACROS and tokens[i - 1] == _Token("punct", ".")
                and tokens[i + 1] == _Token("punct", "(") and tokens[i + 2].kind == "ident"
                and tokens[i + 3] == _Token("punct", ",")):
            yield tokens[i + 2].text


def _step_after(tokens: list[_Token], i: int) -> str | None:
    window = tokens[i : i + 3] + [_Token("punct", "")] * 3
    first, second, third = window[0], window[1], window[2]
    if first == _Token("punct", ".") and second.kind == "ident" and third != _Token("punct", "("):
        return second.text
    if first == _Token("punct", "[") and second.kind == "string" and third == _Token("punct", "]"):
        return _string_value(second.text)
    return None


def _string_value(literal: str) -> str | None:
    # Let CEL itself decode escapes so steps['\x61'] resolves exactly as it will at run time.
    try:
        value = cel.evaluate(literal)
    except Exception:  # an odd literal (e.g. bytes or a bad escape) simply names no step
        return None
    return value if isinstance(value, str) else None


def _tokenize(text: str) -> Iterator[_Token]:
    pos = 0
    while pos < len(text):
        char = text[pos]
        prefix = _STRING_PREFIX.match(text, pos)
        if char.isspace():
            pos += 1
        elif text.startswith("//", pos):
            newline = text.find("\n", pos)
            pos = len(text) if newline == -1 else newline
        elif char in "'\"" or prefix is not None:
            end = _string_end(text, prefix.end() if prefix is not None else pos)
            yield _Token("string", text[pos:end])
            pos = end
        elif match := _IDENT.match(text, pos) or _NUMBER.match(text, pos):
            yield _Token("ident" if match.re is _IDENT else "number", match.group())
            pos = match.end()
        else:
            yield _Token("punct", char)
            pos += 1
