"""The run and step state machines: the moves the product documents, written out here independently of
the table in app/engine/state_machine.py, and every (from, to) pair checked against them.

Sources: docs/api.md (run and step statuses, operator actions), docs/workflows.md (how a run proceeds,
limits, timeouts, approvals). A move added to or dropped from the table fails these tests until this list
(and, if the lifecycle changed, the docs) say so too.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import pytest

from app.engine.state_machine import (
    RUN_MOVES,
    RUN_TERMINAL,
    STEP_ACTIVE,
    STEP_DONE,
    STEP_MOVES,
    STEP_TERMINAL,
    IllegalTransition,
    RunStatus,
    StepStatus,
    check_run_move,
    check_step_move,
)

RUN_STATUSES = ("queued", "running", "waiting", "paused", "succeeded", "failed", "cancelled")
STEP_STATUSES = ("pending", "queued", "running", "waiting", "succeeded", "failed", "skipped", "cancelled")

RUN_EXPECTED: frozenset[tuple[str, str]] = frozenset({
    # queued: no step has started yet.
    ("queued", "running"),  # a worker claims the first step
    ("queued", "waiting"),  # the first steps are waits (a signal, an approval): nothing to claim
    ("queued", "paused"),  # pause: from queued, running, waiting
    ("queued", "succeeded"),  # every step skipped (`when` false) before any started
    ("queued", "failed"),  # a step failed while planning (an expression, a map too large), or timeout_s
    ("queued", "cancelled"),  # cancel
    ("running", "waiting"),  # every active step now waits
    ("running", "paused"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("waiting", "running"),  # a signal or a decision made work runnable again
    ("waiting", "paused"),
    ("waiting", "succeeded"),  # the last step was a wait, and its signal came
    ("waiting", "failed"),  # a wait or approval deadline passed, a call was rejected, or timeout_s
    ("waiting", "cancelled"),
    ("paused", "running"),  # resume
    # Steps in flight when the run was paused still finish and are recorded, so a paused run can end.
    ("paused", "succeeded"),
    ("paused", "failed"),
    ("paused", "cancelled"),
    ("failed", "running"),  # retry resumes from the failed steps
    # succeeded and cancelled are final.
})

STEP_EXPECTED: frozenset[tuple[str, str]] = frozenset({
    ("pending", "queued"),  # its needs succeeded: dispatched
    ("pending", "running"),  # claimed inline by the worker that finished its need (no queue round trip),
    # and a map step expanding into items
    ("pending", "waiting"),  # a wait or approval step becomes ready
    ("pending", "succeeded"),  # a retried map whose items had all succeeded completes at once
    ("pending", "failed"),  # its args or map items failed to render, a map was too large, an item failed
    ("pending", "skipped"),  # `when` false, or a need was skipped
    ("pending", "cancelled"),  # the run was cancelled
    ("queued", "running"),  # a worker claims it
    ("queued", "cancelled"),  # the run was cancelled, failed or timed out
    ("running", "queued"),  # a transient failure: the next attempt waits out its backoff
    ("running", "waiting"),  # the call it was about to make needs approval
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),  # the run was cancelled: the worker's job is aborted
    ("waiting", "queued"),  # an approved call is dispatched again
    ("waiting", "waiting"),  # its deadline changed (a new approval for the next call)
    ("waiting", "succeeded"),  # its signal came, or an approval step was approved
    ("waiting", "failed"),  # rejected, or its deadline passed
    ("waiting", "cancelled"),
    # Retrying a run puts its failed and cancelled steps back to pending; succeeded and skipped are final.
    ("failed", "pending"),
    ("cancelled", "pending"),
})


def moves(table: Mapping[StrEnum, frozenset[StrEnum]]) -> set[tuple[str, str]]:
    return {(src.value, dst.value) for src, targets in table.items() for dst in targets}


def test_the_statuses_are_the_documented_ones() -> None:
    assert {s.value for s in RunStatus} == set(RUN_STATUSES) and set(RUN_MOVES) == set(RunStatus)
    assert {s.value for s in StepStatus} == set(STEP_STATUSES) and set(STEP_MOVES) == set(StepStatus)


def test_the_run_table_is_the_documented_lifecycle() -> None:
    table = moves(RUN_MOVES)
    assert table - RUN_EXPECTED == set(), "moves the lifecycle does not have"
    assert RUN_EXPECTED - table == set(), "documented moves the table lacks"


def test_the_step_table_is_the_documented_lifecycle() -> None:
    table = moves(STEP_MOVES)
    assert table - STEP_EXPECTED == set(), "moves the lifecycle does not have"
    assert STEP_EXPECTED - table == set(), "documented moves the table lacks"


@pytest.mark.parametrize("src", RUN_STATUSES)
@pytest.mark.parametrize("dst", RUN_STATUSES)
def test_run_moves(src: str, dst: str) -> None:
    if (src, dst) in RUN_EXPECTED:
        check_run_move(src, RunStatus(dst))
    else:
        with pytest.raises(IllegalTransition) as refused:
            check_run_move(src, RunStatus(dst))
        assert refused.value.status == 409


@pytest.mark.parametrize("src", STEP_STATUSES)
@pytest.mark.parametrize("dst", STEP_STATUSES)
def test_step_moves(src: str, dst: str) -> None:
    if (src, dst) in STEP_EXPECTED:
        check_step_move(src, StepStatus(dst))
    else:
        with pytest.raises(IllegalTransition) as refused:
            check_step_move(src, StepStatus(dst))
        assert refused.value.status == 409


def test_the_status_sets_are_the_documented_ones() -> None:
    assert {s.value for s in RUN_TERMINAL} == {"succeeded", "failed", "cancelled"}
    assert {s.value for s in STEP_TERMINAL} == {"succeeded", "failed", "skipped", "cancelled"}
    assert {s.value for s in STEP_DONE} == {"succeeded", "skipped"}  # what a step's dependents may start after
    assert {s.value for s in STEP_ACTIVE} == {"queued", "running"}


def test_only_a_failed_run_leaves_a_terminal_status_and_only_by_retry() -> None:
    leaving = {(src, dst) for src, dst in RUN_EXPECTED if src in {"succeeded", "failed", "cancelled"}}
    assert leaving == {("failed", "running")}


def test_done_steps_never_move_and_finished_ones_only_back_to_pending() -> None:
    leaving = {(src, dst) for src, dst in STEP_EXPECTED if src in {"succeeded", "failed", "skipped", "cancelled"}}
    assert leaving == {("failed", "pending"), ("cancelled", "pending")}


def test_every_status_is_reachable_from_the_start() -> None:
    for expected, start in ((RUN_EXPECTED, "queued"), (STEP_EXPECTED, "pending")):
        statuses = {s for move in expected for s in move}
        reached, frontier = {start}, [start]
        while frontier:
            src = frontier.pop()
            for a, b in expected:
                if a == src and b not in reached:
                    reached.add(b)
                    frontier.append(b)
        assert reached == statuses


def test_operator_actions_apply_to_the_documented_statuses() -> None:
    # docs/api.md's table of run actions; the dashboard offers exactly these.
    from app.engine.actions import ACTION_FROM

    assert {action: {s.value for s in statuses} for action, statuses in ACTION_FROM.items()} == {
        "pause": {"queued", "running", "waiting"},
        "resume": {"paused"},
        "cancel": {"queued", "running", "waiting", "paused"},
        "retry": {"failed"},
    }
