"""Application errors and their problem+json rendering.

AppError                    500 internal
├── BadRequest              400 bad-request
├── Unauthorized            401 unauthorized
├── Forbidden               403 forbidden
├── NotFound                404 not-found
├── Conflict                409 conflict
│   ├── IllegalTransition   (engine) a move the state machine does not allow
│   └── StaleTransition     (engine) someone else moved the row first
└── Invalid                 422 invalid   (``errors``: [{"pointer", "message"}])
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_BASE = "https://steward.dev/problems/"


class AppError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, errors: list[dict[str, str]] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.extra = extra

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors is not None:
            body["errors"] = self.errors
        body.update(self.extra)
        return body


class BadRequest(AppError):
    status = 400
    type = "bad-request"
    title = "Bad request"


class Unauthorized(AppError):
    status = 401
    type = "unauthorized"
    title = "Unauthorized"


class Forbidden(AppError):
    status = 403
    type = "forbidden"
    title = "Forbidden"


class NotFound(AppError):
    status = 404
    type = "not-found"
    title = "Not found"


class Conflict(AppError):
    status = 409
    type = "conflict"
    title = "Conflict"


class Invalid(AppError):
    status = 422
    type = "invalid"
    title = "Invalid request"
