"""A workflow's step graph laid out for an SVG drawn on the server: layers top to bottom, edges as paths.

Layers are longest paths from the steps that need nothing, so every edge points down. Within a layer the
steps are ordered by one downward and one upward barycentre pass (the mean position of their neighbours),
which removes most crossings of ordinary workflows cheaply. A layer wider than :data:`COLUMNS` wraps onto
more rows, so the drawing's width is bounded whatever the fan-out; its height grows with the number of
rows, at most one per step. Pure: a definition (and optionally each step's state) in, coordinates out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.workflows.steps import Definition

COLUMNS = 6
NODE_W = 168.0
NODE_H = 46.0
GAP_X = 20.0
GAP_Y = 44.0
MARGIN = 12.0
LABEL_CHARS = 20


@dataclass(frozen=True)
class StepState:
    """What a run knows of a step: its status and, for a map, how many of its items are done."""

    status: str
    done: int | None = None
    total: int | None = None


@dataclass(frozen=True)
class Node:
    id: str
    kind: str
    layer: int
    x: float
    y: float
    state: StepState | None

    @property
    def label(self) -> str:
        """The step's id, shortened to fit its box (the accessible label has it whole)."""
        return self.id if len(self.id) <= LABEL_CHARS else self.id[: LABEL_CHARS - 1] + "…"

    @property
    def detail(self) -> str:
        """The second line of the box: the status in words (colour is never the only signal), else the kind."""
        if self.state is None:
            return self.kind
        if self.state.total is not None:
            return f"{self.state.status} · {self.state.done or 0}/{self.state.total}"
        return self.state.status

    @property
    def aria_label(self) -> str:
        """The box's visible text first (a name that starts as it reads), then the step in words."""
        words = [f"step {self.id}", self.kind]
        if self.state is not None:
            words.append(self.state.status)
            if self.state.total is not None:
                words.append(f"{self.state.done or 0} of {self.state.total} items done")
        return f"{self.label} {self.detail} ({', '.join(words)})"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: str  # SVG path data, from the bottom of the source to the top of the target


@dataclass(frozen=True)
class GraphLayout:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    layers: tuple[tuple[str, ...], ...]
    width: float
    height: float
    node_w: float = NODE_W
    node_h: float = NODE_H


def layout(definition: Definition, states: Mapping[str, StepState] | None = None) -> GraphLayout:
    """The drawing of ``definition``'s step graph; ``states`` (by step id) adds each step's status."""
    ids = [step.id for step in definition.steps]
    needs = {step.id: step.needs for step in definition.steps}
    layer_of: dict[str, int] = {}
    for step_id in definition.order:  # dependencies first
        layer_of[step_id] = 1 + max((layer_of[need] for need in needs[step_id]), default=-1)
    layers: list[list[str]] = [[] for _ in range(max(layer_of.values(), default=-1) + 1)]
    for step_id in ids:  # listed order first: the starting point the passes improve on
        layers[layer_of[step_id]].append(step_id)
    _order(layers, needs, {step.id: definition.dependents(step.id) for step in definition.steps})
    kinds = {step.id: step.kind for step in definition.steps}
    states = states or {}
    columns = min(COLUMNS, max((len(layer) for layer in layers), default=1))
    width = 2 * MARGIN + columns * NODE_W + (columns - 1) * GAP_X
    nodes: dict[str, Node] = {}
    y = MARGIN
    for number, layer in enumerate(layers):
        for start in range(0, len(layer), COLUMNS):
            row = layer[start:start + COLUMNS]
            x = (width - len(row) * NODE_W - (len(row) - 1) * GAP_X) / 2
            for step_id in row:
                nodes[step_id] = Node(step_id, kinds[step_id], number, x, y, states.get(step_id))
                x += NODE_W + GAP_X
            y += NODE_H + GAP_Y
    height = max(y - GAP_Y + MARGIN, 2 * MARGIN)
    edges = tuple(
        Edge(need, step_id, _path(nodes[need], nodes[step_id])) for step_id in ids for need in needs[step_id]
    )
    return GraphLayout(
        nodes=tuple(nodes[step_id] for step_id in ids), edges=edges,
        layers=tuple(tuple(layer) for layer in layers), width=width, height=height,
    )


def _order(
    layers: list[list[str]], needs: Mapping[str, Sequence[str]], dependents: Mapping[str, Sequence[str]]
) -> None:
    """Reorder each layer in place: down by the mean position of what a step needs, then up by its dependents."""
    position: dict[str, float] = {}

    def place(layer: list[str]) -> None:
        for index, step_id in enumerate(layer):
            position[step_id] = (index + 0.5) / len(layer)

    def sort(layer: list[str], neighbours: Mapping[str, Sequence[str]]) -> None:
        def key(step_id: str) -> float:
            near = [position[n] for n in neighbours[step_id] if n in position]
            return sum(near) / len(near) if near else position.get(step_id, 0.5)
        layer.sort(key=key)  # stable: ties keep their order
        place(layer)

    for layer in layers:
        place(layer)
    for layer in layers[1:]:
        sort(layer, needs)
    for layer in reversed(layers[:-1]):
        sort(layer, dependents)


def _path(source: Node, target: Node) -> str:
    x1, y1 = source.x + NODE_W / 2, source.y + NODE_H
    x2, y2 = target.x + NODE_W / 2, target.y
    bend = max((y2 - y1) / 2, GAP_Y / 2)
    return f"M{x1:.1f} {y1:.1f} C{x1:.1f} {y1 + bend:.1f} {x2:.1f} {y2 - bend:.1f} {x2:.1f} {y2:.1f}"
