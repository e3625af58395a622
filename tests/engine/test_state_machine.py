"""Every (from, to) pair: allowed moves pass the check, the rest raise IllegalTransition."""

from __future__ import annotations

import pytest

from app.engine.state_machine import (
    RUN_MOVES,
    RUN_TERMINAL,
    STEP_MOVES,
    IllegalTransition,
    RunStatus,
    StepStatus,
    check_run_move,
    check_step_move,
)


@pytest.mark.parametrize("src", list(RunStatus))
@pytest.mark.parametrize("dst", list(RunStatus))
def test_run_moves(src: RunStatus, dst: RunStatus) -> None:
    if dst in RUN_MOVES[src]:
        check_run_move(src, dst)
    else:
        with pytest.raises(IllegalTransition):
            check_run_move(src, dst)


@pytest.mark.parametrize("src", list(StepStatus))
@pytest.mark.parametrize("dst", list(StepStatus))
def test_step_moves(src: StepStatus, dst: StepStatus) -> None:
    if dst in STEP_MOVES[src]:
        check_step_move(src, dst)
    else:
        with pytest.raises(IllegalTransition):
            check_step_move(src, dst)


def test_succeeded_and_cancelled_runs_are_final() -> None:
    assert RUN_MOVES[RunStatus.SUCCEEDED] == frozenset() and RUN_MOVES[RunStatus.CANCELLED] == frozenset()
    assert RunStatus.FAILED in RUN_TERMINAL and RUN_MOVES[RunStatus.FAILED] == {RunStatus.RUNNING}


def test_completed_steps_never_move_again() -> None:
    assert STEP_MOVES[StepStatus.SUCCEEDED] == frozenset() and STEP_MOVES[StepStatus.SKIPPED] == frozenset()
