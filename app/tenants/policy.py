"""A tenant's guardrail settings, stored as JSON on the tenant row and edited by admins."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

ROLES = ("viewer", "operator", "approver", "author", "auditor", "admin")
Role = Literal["viewer", "operator", "approver", "author", "auditor", "admin"]
_MAX_URL_CHARS = 2083  # pydantic's HttpUrl limit, which it applies before normalising
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
        max_length=100,
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
    def _webhook(cls, url: HttpUrl | None) -> HttpUrl | None:
        # Normalising (a trailing "/", punycode) can lengthen a URL past the limit it was checked against.
        if url is not None and len(str(url)) > _MAX_URL_CHARS:
            raise ValueError(f"URL too long (over {_MAX_URL_CHARS} characters once normalised)")
        return url

    @field_validator("http_allowlist")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not _HOST.fullmatch(host):
                raise ValueError(f"{host!r} is not a host, host:port or *.domain")
        return [host.lower() for host in hosts]


def load_policy(raw: dict[str, Any] | None) -> TenantPolicy:
    return TenantPolicy.model_validate(raw or {})


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
