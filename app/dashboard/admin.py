"""The admin pages: members and roles, API keys, tenant settings, model providers, secrets.

Each area has its own module (``admin_access``, ``admin_settings``, ``admin_providers``); this one holds
what they share: reading forms into the API's own request models (so the browser is held to the same
limits and rules), and field errors keyed by form field. (Templates show only what the
signed-in user may do with ``may(me, permission)``, from :mod:`app.dashboard.common`.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from app.errors import Invalid
from app.tenants.policy import ROLES

M = TypeVar("M", bound=BaseModel)

def checked_roles(form: Mapping[str, str]) -> list[str]:
    """The roles ticked in a form (one checkbox per role, named ``role_<role>``)."""
    return [role for role in ROLES if form.get(f"role_{role}")]


def field_errors(exc: ValidationError) -> dict[str, str]:
    """The first message per top-level field of a model's validation error (``""``: the form as a whole)."""
    errors: dict[str, str] = {}
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        errors.setdefault(field, message)
    return errors


def parse(model: type[M], data: Mapping[str, Any]) -> M:
    """``data`` as ``model``, or a 422 page naming each offending form field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Invalid("the form has errors", errors=[
            {"pointer": f"/form/{field}" if field else "/form", "message": message}
            for field, message in field_errors(exc).items()
        ]) from exc

