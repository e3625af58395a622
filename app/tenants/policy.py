"""A tenant's guardrail settings, stored as JSON on the tenant row and edited by admins.

What is stored is the model's own JSON dump, so every field is checked in its normalised form (an URL gains
a trailing ``/``, hosts are lower-cased): a value that validates when written validates when read. Should a
stored value stop validating all the same (written by an older release, or by hand), :func:`load_policy`
drops that field alone, choosing the stricter setting where there is one, so the tenant's runs go on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, field_validator

log = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "approver", "author", "auditor", "admin")
# pydantic's own cap for URLs, which it checks before adding the trailing "/" of an empty path.
MAX_URL_LENGTH = 2083
MAX_GROUPS = 100
Role = Literal["viewer", "operator", "approver", "author", "auditor", "admin"]
_HOST = re.compile(r"(\*\.)?[A-Za-z0-9.-]{1,253}(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


class TenantPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shadow: bool = Field(
        default=False,
        description="Write tools are validated, gated and recorded as 'would have run', but not executed",
    )
    four_eyes: bool = Field(default=True, description="Whoever started a run cannot approve its requests")
    http_allowlist: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Hosts HTTP tools may reach although they resolve to private, loopback or link-local "
        "addresses: `host`, `host:port` or `*.domain`",
    )
    alert_webhook: HttpUrl | None = Field(default=None, description="Receives a POST for every guardrail rejection")
    approval_timeout_s: float = Field(default=86_400, gt=0, le=30 * 86_400)
    approval_on_expiry: Literal["reject", "flag"] = Field(
        default="reject", description="reject: the gated action is rejected; flag: it stays pending, flagged"
    )
    role_mapping: dict[str, list[Role]] = Field(
        default_factory=dict,
        max_length=MAX_GROUPS,
        description="Identity-provider groups (the `oidc_groups_claim` claim) and the roles they give in this "
        "tenant, e.g. {\"payments-oncall\": [\"operator\", \"approver\"]}; on top of members' own roles",
    )

    @field_validator("role_mapping")
    @classmethod
    def _groups(cls, mapping: dict[str, list[str]]) -> dict[str, list[str]]:
        for group, roles in mapping.items():
            if not 1 <= len(group) <= 255:
                raise ValueError("group names have 1 to 255 characters")
            if len(roles) > len(ROLES):
                raise ValueError(f"group {group!r}: at most {len(ROLES)} roles")
        return {group: sorted(set(roles)) for group, roles in mapping.items()}

    @field_validator("alert_webhook")
    @classmethod
    def _normalised_url(cls, url: HttpUrl | None) -> HttpUrl | None:
        if url is not None and len(str(url)) > MAX_URL_LENGTH:
            raise ValueError(f"URL should have at most {MAX_URL_LENGTH} characters (as normalised: {len(str(url))})")
        return url

    @field_validator("http_allowlist")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not _HOST.fullmatch(host):
                raise ValueError(f"{host!r} is not a host, host:port or *.domain")
        return [host.lower() for host in hosts]


# Where a stored value is unreadable, the setting that allows less: shadow mode runs no write tool.
_STRICTER: dict[str, Any] = {"shadow": True}


def load_policy(raw: Any) -> TenantPolicy:
    """The stored policy; a field that no longer validates is replaced (logged), never fatal to the tenant."""
    try:
        return TenantPolicy.model_validate(raw or {})
    except ValidationError as exc:
        bad = sorted({str(err["loc"][0]) for err in exc.errors() if err["loc"]})
    log.warning("stored tenant settings no longer validate (%s): using safe values", ", ".join(bad) or "not an object")
    if not isinstance(raw, Mapping):
        return TenantPolicy.model_validate(_STRICTER)
    kept = {key: value for key, value in raw.items() if key not in bad}
    for key in bad:
        if key in _STRICTER:
            kept[key] = _STRICTER[key]
        elif key == "role_mapping":
            kept[key] = _readable_groups(raw[key])
    try:
        return TenantPolicy.model_validate(kept)
    except ValidationError:
        return TenantPolicy.model_validate(_STRICTER)


def _readable_groups(raw: Any) -> dict[str, list[str]]:
    # Salvage what can be read, group by group: one bad entry must not lock every group's users out.
    if not isinstance(raw, Mapping):
        return {}
    readable = {
        group: sorted({role for role in roles if role in ROLES})
        for group, roles in raw.items()
        if isinstance(group, str) and 1 <= len(group) <= 255 and isinstance(roles, list)
    }
    return dict(list(readable.items())[:MAX_GROUPS])


def host_allowed(allowlist: list[str], host: str, port: int) -> bool:
    host = host.lower().strip("[]")
    for entry in allowlist:
        name, _, entry_port = entry.strip("[").partition("]:") if entry.startswith("[") else entry.partition(":")
        name = name.strip("[]")
        if entry_port and int(entry_port) != port:
            continue
        if name == host or (name.startswith("*.") and host.endswith(name[1:])):
            return True
    return False
