"""Decoding submitted JSON or YAML text into plain JSON data (dicts, lists, str, int, float, bool, None).

The result is always a tree: no value is shared or contains itself, so every later walk (validation,
hashing, storing, rendering) is linear in its size, and that size is capped. What JSON cannot express
is refused with a pointer: a repeated key, a YAML alias that makes a cycle, non-string keys, binary,
sets, timestamps, NaN.

YAML is composed here from the parser's events rather than by PyYAML's composer and constructor: those
recurse, would follow a cyclic alias for ever, expand exponential aliases without a bound and keep the
last of repeated keys silently.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

from app.input_guard import DUPLICATE_KEY, duplicate_keys, object_pairs
from app.workflows.document import DefinitionError, ErrorList, Link, pointer, unlink

__all__ = ["MAX_DOCUMENT_DEPTH", "MAX_DOCUMENT_VALUES", "load_document", "load_json", "load_yaml"]

# List items and mapping entries, each time an alias repeats them. A 1 MiB body can hold ~500k, and
# decoding YAML costs ~5 us each; the largest sensible definitions hold a few thousand.
MAX_DOCUMENT_VALUES = 50_000
MAX_DOCUMENT_DEPTH = 128
_MAX_ERRORS = 50

def _fail(link: Link, message: str) -> DefinitionError:
    return DefinitionError([{"pointer": pointer(unlink(link)), "message": message}])


def _too_large(what: str = "values") -> DefinitionError:
    return _fail(None, f"document too large (over {MAX_DOCUMENT_VALUES} {what})")


def _too_deep(link: Link) -> DefinitionError:
    return _fail(link, f"nested too deeply (over {MAX_DOCUMENT_DEPTH} levels)")


def load_document(text: str, content_type: str | None) -> Any:
    """Decode JSON or YAML text (chosen by ``content_type``, else sniffed); raises DefinitionError."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media.endswith(("/json", "+json")):
        return load_json(text)
    if media.endswith(("/yaml", "/x-yaml", "+yaml")):
        return load_yaml(text)
    try:
        return load_json(text)
    except DefinitionError as json_error:
        if json_error.errors[0]["pointer"]:
            raise  # it was JSON, with a problem at some place in it
        try:
            return load_yaml(text)
        except DefinitionError as yaml_error:
            # Report in the language the author evidently meant to write.
            raise (json_error if text.lstrip().startswith(("{", "[")) else yaml_error) from None


# --- JSON ----------------------------------------------------------------------------------------------


def load_json(text: str) -> Any:
    """Strict JSON: no NaN/Infinity (not storable), no repeated keys (one of them would be lost silently)."""
    try:
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=object_pairs)
    except json.JSONDecodeError as exc:
        message = f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    except ValueError as exc:
        message = f"invalid JSON: {exc}"
    except RecursionError:
        message = "invalid JSON: nested too deeply"
    else:
        check_json(data)
        return data
    raise DefinitionError([{"pointer": "", "message": message}])


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def check_json(data: Any) -> None:
    """Size, depth and repeated keys of decoded JSON, in one pass with O(1) work per value."""
    errors: ErrorList = []
    todo: list[tuple[Any, Link, int]] = [(data, None, 0)]
    values = 1
    while todo:
        node, link, depth = todo.pop()
        if not isinstance(node, dict | list):
            continue
        # Counted before they are queued, so a huge flat list is refused without walking it.
        values += len(node)
        if values > MAX_DOCUMENT_VALUES:
            raise _too_large()
        if depth >= MAX_DOCUMENT_DEPTH:
            raise _too_deep(link)
        errors += [{"pointer": pointer((*unlink(link), key)), "message": DUPLICATE_KEY}
                   for key in duplicate_keys(node)]
        items = node.items() if isinstance(node, dict) else enumerate(node)
        todo.extend((value, (link, key), depth + 1) for key, value in items)
    if errors:
        raise DefinitionError(sorted(errors, key=lambda e: e["pointer"])[:_MAX_ERRORS])


# --- YAML ----------------------------------------------------------------------------------------------

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: ~4x faster
# The safe loader minus the timestamp resolver, so `2024-01-01` stays the string JSON would have made it.
# Built with type() because PyYAML ships no type stubs here and mypy refuses to subclass Any.
_YamlLoader: Any = type(
    "_YamlLoader",
    (_Base,),
    {
        "yaml_implicit_resolvers": {
            first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
            for first, resolvers in _Base.yaml_implicit_resolvers.items()
        }
    },
)

_TAG = "tag:yaml.org,2002:"
_MAP, _SEQ, _MERGE = _TAG + "map", _TAG + "seq", _TAG + "merge"
_SCALARS = frozenset(_TAG + name for name in ("str", "int", "float", "bool", "null"))
_NOT_JSON = {"binary": "bytes"}  # how a YAML type that JSON lacks is named in the message


def load_yaml(text: str) -> Any:
    """YAML restricted to what JSON can express; aliases are expanded into copies, within the caps."""
    loader = _YamlLoader(text)
    try:
        root = _Composer(loader).document()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise DefinitionError([{"pointer": "", "message": f"invalid YAML: {exc.problem}{where}"}]) from exc
    except yaml.YAMLError as exc:
        raise DefinitionError([{"pointer": "", "message": f"invalid YAML: {exc}"}]) from exc
    finally:
        loader.dispose()
    return None if root is None else _Builder(loader).build(root)


class _Composer:
    """Builds the node graph from parser events, without recursion; an alias of a collection that is
    still open would make a cycle and is refused on the spot."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.anchors: dict[str, yaml.Node] = {}
        self.open: set[str] = set()  # anchors of collections not yet closed

    def document(self) -> yaml.Node | None:
        loader = self.loader
        loader.get_event()  # stream start
        if loader.check_event(yaml.StreamEndEvent):
            return None
        loader.get_event()  # document start
        root = self._node()
        loader.get_event()  # document end
        if not loader.check_event(yaml.StreamEndEvent):
            event = loader.get_event()
            raise yaml.composer.ComposerError(
                None, None, "expected a single document, but found another", event.start_mark
            )
        return root

    def _node(self) -> yaml.Node:
        loader = self.loader
        # The open collections, innermost last, with their anchors.
        stack: list[tuple[yaml.Node, str | None]] = []
        values = 0
        while True:
            event = loader.get_event()
            # Counted as the builder counts (list items and mapping entries), so parsing stops early too.
            if not isinstance(event, yaml.CollectionEndEvent) and not (
                stack and isinstance(stack[-1][0], yaml.MappingNode) and len(stack[-1][0].value) % 2 == 0
            ):
                values += 1
                if values > MAX_DOCUMENT_VALUES:
                    raise _too_large()
            if isinstance(event, yaml.CollectionEndEvent):
                node, anchor = stack.pop()
                if anchor is not None:
                    self.open.discard(anchor)
                if isinstance(node, yaml.MappingNode):
                    node.value = list(zip(node.value[::2], node.value[1::2], strict=True))
            elif isinstance(event, yaml.AliasEvent):
                node = self._alias(event, stack)
            elif isinstance(event, yaml.ScalarEvent):
                tag = event.tag if event.tag not in (None, "!") else loader.resolve(
                    yaml.ScalarNode, event.value, event.implicit)
                node = self._anchor(event, yaml.ScalarNode(tag, event.value, style=event.style))
            else:
                kind = yaml.SequenceNode if isinstance(event, yaml.SequenceStartEvent) else yaml.MappingNode
                tag = event.tag if event.tag not in (None, "!") else loader.resolve(kind, None, event.implicit)
                node = self._anchor(event, kind(tag, []))
                if len(stack) >= MAX_DOCUMENT_DEPTH:
                    raise _too_deep(_stack_link(stack))
                if event.anchor is not None:
                    self.open.add(event.anchor)
                stack.append((node, event.anchor))
                continue
            if not stack:
                return node
            stack[-1][0].value.append(node)

    def _anchor(self, event: Any, node: yaml.Node) -> yaml.Node:
        if event.anchor is not None:
            if event.anchor in self.anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"found duplicate anchor {event.anchor!r}", event.start_mark
                )
            self.anchors[event.anchor] = node
        return node

    def _alias(self, event: Any, stack: list[tuple[yaml.Node, str | None]]) -> yaml.Node:
        if event.anchor in self.open:
            raise _fail(
                _stack_link(stack),
                f"the YAML alias *{event.anchor} refers to a value that contains it (a cycle): "
                "JSON cannot express that",
            )
        if event.anchor not in self.anchors:
            raise yaml.composer.ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
        return self.anchors[event.anchor]


def _stack_link(stack: list[tuple[yaml.Node, str | None]]) -> Link:
    """The path of the node being composed under the open collections (for error pointers)."""
    link: Link = None
    for node, _ in stack:
        items = node.value  # flat while open: key, value, key, value... for a mapping
        if isinstance(node, yaml.SequenceNode):
            link = (link, len(items))
        elif len(items) % 2 and isinstance(items[-1], yaml.ScalarNode):
            link = (link, items[-1].value)
        else:
            link = (link, "?")  # a key that is itself a collection: no JSON name for it
    return link


class _Builder:
    """Turns the node graph into plain data, copying what aliases repeat, within MAX_DOCUMENT_VALUES."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.errors: ErrorList = []
        self.values = 0

    def build(self, root: yaml.Node) -> Any:
        holder: list[Any] = [None]
        todo: list[tuple[yaml.Node, Any, Any, Link, int]] = [(root, holder, 0, None, 0)]
        self._count()
        while todo:
            node, into, key, link, depth = todo.pop()
            if isinstance(node, yaml.ScalarNode):
                into[key] = self._scalar(node, link)
                continue
            if depth >= MAX_DOCUMENT_DEPTH:
                raise _too_deep(link)
            if node.tag not in (_MAP, _SEQ):
                self._error(link, _not_json(node.tag))
            elif isinstance(node, yaml.SequenceNode):
                self._count(len(node.value))  # before copying: an alias may repeat a long list
                into[key] = items = [None] * len(node.value)
                children = list(enumerate(node.value))
                todo.extend((child, items, i, (link, i), depth + 1) for i, child in reversed(children))
            elif isinstance(node, yaml.MappingNode):
                pairs = self._pairs(node, link)
                into[key] = obj = dict.fromkeys(name for name, _ in pairs)
                todo.extend((child, obj, name, (link, name), depth + 1) for name, child in reversed(pairs))
        if self.errors:
            raise DefinitionError(sorted(self.errors, key=lambda e: e["pointer"])[:_MAX_ERRORS])
        return holder[0]

    def _count(self, n: int = 1) -> None:
        self.values += n
        if self.values > MAX_DOCUMENT_VALUES:
            raise _too_large("values once YAML aliases are expanded")

    def _error(self, link: Link, message: str) -> None:
        self.errors.append({"pointer": pointer(unlink(link)), "message": message})

    def _scalar(self, node: yaml.ScalarNode, link: Link) -> Any:
        """The scalar's value; None (and an error) when JSON has no such value."""
        if node.tag not in _SCALARS:
            self._error(link, _not_json(node.tag))
            return None
        try:
            value = self.loader.yaml_constructors[node.tag](self.loader, node)
        except (ValueError, yaml.YAMLError) as exc:  # e.g. an integer of more digits than Python converts
            self._error(link, f"not a valid {node.tag.removeprefix(_TAG)}: {exc}")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self._error(link, "must be a finite number")
            return None
        return value

    def _pairs(self, node: yaml.MappingNode, link: Link) -> list[tuple[str, yaml.Node]]:
        """The mapping's keys and value nodes; ``<<`` merges add the keys it lacks, the first source winning.

        A key repeated within one mapping (merged ones included) is an error: one of the two would be lost.
        """
        pairs: list[tuple[str, yaml.Node]] = []
        seen: set[str] = set()
        merged: set[int] = {id(node)}
        sources: list[yaml.MappingNode] = [node]
        while sources:
            source = sources.pop()
            own: set[str] = set()
            merges: list[yaml.MappingNode] = []
            self._count(len(source.value))
            for key_node, value_node in source.value:
                if key_node.tag == _MERGE:
                    merges += self._merge_sources(value_node, link)
                    continue
                name = self._key(key_node, link)
                if name is None:
                    continue
                if name in own:
                    self._error((link, name), DUPLICATE_KEY)
                own.add(name)
                if name not in seen:
                    seen.add(name)
                    pairs.append((name, value_node))
            fresh = [m for m in merges if id(m) not in merged]
            merged.update(id(m) for m in fresh)
            sources.extend(reversed(fresh))
        return pairs

    def _merge_sources(self, value: yaml.Node, link: Link) -> list[yaml.MappingNode]:
        nodes = value.value if isinstance(value, yaml.SequenceNode) else [value]
        if not all(isinstance(n, yaml.MappingNode) for n in nodes):
            self._error(link, "a merge key (<<) takes a mapping or a list of mappings")
            return []
        return list(nodes)

    def _key(self, node: yaml.Node, link: Link) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self._error(link, "keys must be strings")
            return None
        value = self._scalar(node, link)
        if not isinstance(value, str):
            self._error((link, str(value)), "keys must be strings")
            return None
        return value


def _not_json(tag: str) -> str:
    name = tag.removeprefix(_TAG)
    return f"not a JSON value ({_NOT_JSON.get(name, name)})"
