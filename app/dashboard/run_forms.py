"""A run's forms: send it a signal, start it again with edited input (with a preview of the changes), and
raise its limits and resume it. Each is the API's call (same service, permission and audit event)."""

from __future__ import annotations

import difflib
import json
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from app.auth.deps import require
from app.auth.sessions import form_fields
from app.auth.web import templates
from app.context import Ctx
from app.dashboard.common import SignedIn, page_router
from app.db import Db
from app.errors import Invalid
from app.http import AppSettings
from app.input_guard import check_json
from app.request_work import Work
from app.runs import service as runs_service
from app.runs.schemas import RunLimits

router = page_router()
Starter = Annotated[Ctx, Depends(require("runs:start"))]
BudgetAdmin = Annotated[Ctx, Depends(require("budgets:write"))]
MAX_JSON_CHARS = 100_000  # a form's JSON field (the textarea's maxlength says so too)
MAX_NAME = 128


def parse_json(text: str, field: str) -> Any:
    """A form field's JSON, strictly (no NaN, duplicate keys or NUL); a clear 422 naming the field, not a 500."""
    if len(text) > MAX_JSON_CHARS:
        raise Invalid(f"the {field} is too long", errors=[
            {"pointer": f"/form/{field}", "message": f"at most {MAX_JSON_CHARS} characters"}])
    try:
        json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Invalid(f"the {field} is not JSON", errors=[{"pointer": f"/form/{field}", "message": str(exc)}]) from exc
    checked = check_json(text.encode("utf-8", "surrogatepass"))
    if checked is None:
        raise Invalid(f"the {field} is not JSON", errors=[{"pointer": f"/form/{field}", "message": "not JSON"}])
    value, errors = checked
    if errors:
        raise Invalid(f"the {field} is not acceptable JSON", errors=[
            {"pointer": f"/form/{field}" + error["pointer"].removeprefix("/body"), "message": error["message"]}
            for error in errors])
    return value


@router.post("/runs/{run_id}/signal")
async def signal(request: Request, run_id: uuid.UUID, ctx: Starter, work: Work, db: Db,
                 settings: AppSettings) -> Response:
    """Send the run a signal: the steps waiting for it succeed with the payload as their output."""
    form = await form_fields(request)
    name = form.get("name", "").strip()
    if not name or len(name) > MAX_NAME:
        raise Invalid("a signal needs a name", errors=[
            {"pointer": "/form/name", "message": f"1 to {MAX_NAME} characters"}])
    payload_text = form.get("payload", "").strip()
    payload = parse_json(payload_text, "payload") if payload_text else None
    await runs_service.signal_run(db, work, ctx, settings, run_id, name, payload)
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


@dataclass(frozen=True)
class DiffLine:
    mark: str  # "+", "-", " " or "@" (a new hunk)
    words: str  # the mark in words, for screen readers
    text: str


def input_diff(original: Any, edited: Any) -> list[DiffLine]:
    """The lines that differ between two JSON values (canonical: indented, keys sorted), with context."""
    def lines(value: Any) -> list[str]:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).splitlines()

    found: list[DiffLine] = []
    for line in difflib.unified_diff(lines(original), lines(edited), lineterm="", n=2):
        if line.startswith(("---", "+++")):
            continue
        mark = line[:1]
        words = {"+": "added", "-": "removed", "@": "lines"}.get(mark, "unchanged")
        found.append(DiffLine(mark, words, line[1:].strip() if mark == "@" else line[1:]))
    return found


def _again(request: Request, me: Any, run: dict[str, Any], text: str, *, diff: list[DiffLine] | None = None,
           errors: list[dict[str, Any]] | None = None, message: str | None = None, status_code: int = 200) -> Response:
    return templates.TemplateResponse(request, "dashboard/run_again.html", {
        "me": me, "run": run, "text": text, "diff": diff, "errors": errors or [], "message": message,
        "max_chars": MAX_JSON_CHARS,
    }, status_code=status_code)


@router.get("/runs/{run_id}/again")
async def again_form(request: Request, run_id: uuid.UUID, ctx: Starter, me: SignedIn, db: Db) -> Response:
    """A form holding the run's input, to start its workflow (same version) again with the input edited."""
    run = await runs_service.get_run(db, ctx, run_id)
    return _again(request, me, run, json.dumps(run["input"], indent=2, sort_keys=True, ensure_ascii=False))


@router.post("/runs/{run_id}/again/preview")
async def again_preview(request: Request, run_id: uuid.UUID, ctx: Starter, me: SignedIn, db: Db) -> Response:
    """The edited input next to the original: the lines that change."""
    form = await form_fields(request)
    text = form.get("input", "")
    run = await runs_service.get_run(db, ctx, run_id)
    try:
        edited = parse_json(text, "input")
    except Invalid as exc:
        return _again(request, me, run, text, errors=exc.errors, message=exc.detail, status_code=422)
    return _again(request, me, run, text, diff=input_diff(run["input"], edited))


@router.post("/runs/{run_id}/again")
async def start_again(request: Request, run_id: uuid.UUID, ctx: Starter, me: SignedIn, work: Work, db: Db,
                      settings: AppSettings) -> Response:
    """Start the new run and go to it; an input that is not JSON, or that the schema refuses, stays on the
    form with every error."""
    form = await form_fields(request)
    text = form.get("input", "")
    try:
        started = await runs_service.start_again(db, work, ctx, settings, run_id, parse_json(text, "input"))
    except Invalid as exc:  # raised before anything was written
        run = await runs_service.get_run(db, ctx, run_id)
        return _again(request, me, run, text, errors=exc.errors, message=exc.detail, status_code=422)
    return RedirectResponse(f"/runs/{started['id']}", status_code=303)


@router.post("/runs/{run_id}/limits")
async def raise_limits(request: Request, run_id: uuid.UUID, ctx: BudgetAdmin, work: Work, db: Db,
                       settings: AppSettings) -> Response:
    """Raise a run's limits and resume it (one transaction): a run paused because a budget ran out goes on."""
    form = await form_fields(request)
    given = {key: form[key].strip() for key in RunLimits.model_fields if form.get(key, "").strip()}
    if any(len(value) > 32 for value in given.values()):
        raise Invalid("a limit is too long", errors=[{"pointer": "/form", "message": "at most 32 characters"}])
    try:
        limits = RunLimits.model_validate(given).given()
    except ValidationError as exc:
        raise Invalid("not run limits", errors=[
            {"pointer": "/form/" + "/".join(str(part) for part in error["loc"]), "message": error["msg"]}
            for error in exc.errors()]) from exc
    await runs_service.raise_limits_and_resume(db, work, ctx, settings, run_id, limits)
    return RedirectResponse(f"/runs/{run_id}?tab=budget", status_code=303)
