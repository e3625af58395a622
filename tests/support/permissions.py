"""Which permission a route requires, read from its dependencies (the API's and the pages' walks use it)."""

from __future__ import annotations

from fastapi.routing import APIRoute


def route_permission(route: APIRoute) -> str | None:
    """The permission a route's dependencies require (the `require(...)` check carries it)."""
    found: list[str] = []
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        permission = getattr(dependant.call, "permission", None)
        if permission is not None:
            found.append(permission)
        stack.extend(dependant.dependencies)
    assert len(found) <= 1, f"{route.path} requires several permissions: {found}"
    return found[0] if found else None
