"""The step graph's layout: layers from dependencies, no overlaps, a bounded size for long and wide graphs."""

from __future__ import annotations

import itertools
from typing import Any

from app.dashboard import graph
from app.dashboard.graph import GraphLayout, StepState, layout
from app.workflows.definition import parse_definition
from app.workflows.steps import Definition


def definition(steps: list[dict[str, Any]]) -> Definition:
    return parse_definition({"steps": steps}, max_steps=1000)


def tool(step_id: str, *needs: str) -> dict[str, Any]:
    return {"id": step_id, "tool": "echo", "args": {}, **({"needs": list(needs)} if needs else {})}


def overlapping(drawn: GraphLayout) -> list[tuple[str, str]]:
    found = []
    for a, b in itertools.combinations(drawn.nodes, 2):
        apart = (a.x + drawn.node_w <= b.x or b.x + drawn.node_w <= a.x
                 or a.y + drawn.node_h <= b.y or b.y + drawn.node_h <= a.y)
        if not apart:
            found.append((a.id, b.id))
    return found


def test_layers_are_longest_paths_and_every_edge_points_down() -> None:
    # d needs a directly and through b: the longest path puts it below b, not beside it.
    drawn = layout(definition([tool("a"), tool("b", "a"), tool("c", "a"), tool("d", "a", "b")]))
    assert drawn.layers == (("a",), ("b", "c"), ("d",))
    at = {node.id: node for node in drawn.nodes}
    assert {(e.source, e.target) for e in drawn.edges} == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "d")}
    for edge in drawn.edges:
        assert at[edge.source].y + drawn.node_h < at[edge.target].y
        assert edge.path.startswith("M")
    assert overlapping(drawn) == []
    for node in drawn.nodes:  # everything inside the drawing
        assert 0 <= node.x and node.x + drawn.node_w <= drawn.width
        assert 0 <= node.y and node.y + drawn.node_h <= drawn.height


def test_the_barycentre_pass_uncrosses_listed_order() -> None:
    # Listed as x1, x2 above and y2, y1 below (y1 needs x1): the lower layer follows the upper one.
    drawn = layout(definition([tool("x1"), tool("x2"), tool("y2", "x2"), tool("y1", "x1")]))
    assert drawn.layers == (("x1", "x2"), ("y1", "y2"))


def test_a_chain_of_100_steps_stays_narrow_and_grows_one_row_a_step() -> None:
    steps = [tool("s0")] + [tool(f"s{i}", f"s{i - 1}") for i in range(1, 100)]
    drawn = layout(definition(steps))
    assert len(drawn.layers) == 100
    assert drawn.width <= graph.NODE_W + 2 * graph.MARGIN
    assert drawn.height <= 100 * (graph.NODE_H + graph.GAP_Y) + 2 * graph.MARGIN
    assert overlapping(drawn) == []


def test_a_wide_fan_out_wraps_its_layer_instead_of_growing_wider() -> None:
    leaves = [f"leaf{i}" for i in range(300)]
    steps = [tool("root"), *(tool(leaf, "root") for leaf in leaves), tool("join", *leaves)]
    drawn = layout(definition(steps))
    assert len(drawn.layers) == 3 and len(drawn.layers[1]) == 300
    assert drawn.width <= graph.COLUMNS * (graph.NODE_W + graph.GAP_X) + 2 * graph.MARGIN
    rows = 1 + 300 // graph.COLUMNS + 1
    assert drawn.height <= rows * (graph.NODE_H + graph.GAP_Y) + 2 * graph.MARGIN
    assert overlapping(drawn) == []
    assert len(drawn.edges) == 600


def test_states_give_each_node_its_status_in_words_and_an_accessible_label() -> None:
    steps = [tool("fetch"), {"id": "each", "needs": ["fetch"], "map": {"items": [1, 2, 3], "tool": "echo", "args": {}}},
             tool("a_very_long_step_identifier_indeed", "each")]
    drawn = layout(definition(steps), {"fetch": StepState("succeeded"), "each": StepState("running", 2, 3)})
    at = {node.id: node for node in drawn.nodes}
    assert at["fetch"].aria_label == "fetch succeeded (step fetch, tool, succeeded)"
    assert at["fetch"].detail == "succeeded"
    assert at["each"].aria_label == "each running · 2/3 (step each, map, running, 2 of 3 items done)"
    assert at["each"].detail == "running · 2/3"
    long = at["a_very_long_step_identifier_indeed"]
    assert long.state is None and long.detail == "tool"  # no state: the kind
    assert len(long.label) == graph.LABEL_CHARS and long.label.endswith("…")
    assert "a_very_long_step_identifier_indeed" in long.aria_label
