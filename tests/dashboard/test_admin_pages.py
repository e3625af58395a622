"""The admin pages in-process against the real database: members, API keys, settings, providers, secrets.

Each form is the API's call: the same rules (the last admin stays), the same audit events, the same
tenant scoping (another tenant's ids are the 404 page), and secrets stay write-only in every page.
"""

from __future__ import annotations

import re
import secrets
import uuid
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from tests.support.signin import SignIn, audit_events, csrf_token
from tests.support.tenants import MakeApiKey, MakeTenant, TenantKey

XSS = "<img src=x onerror=alert(1)>"
PRICES = {"input_per_mtok": "1", "output_per_mtok": "2"}


async def post(browser: httpx.AsyncClient, url: str, **fields: Any) -> httpx.Response:
    return await browser.post(url, data={"csrf_token": await csrf_token(browser), **fields})


def is_page(response: httpx.Response, status: int) -> bool:
    return response.status_code == status and response.headers["content-type"].startswith("text/html")


async def admin_key_id(client: httpx.AsyncClient, tenant: TenantKey) -> str:
    keys = (await client.get("/api/v1/api-keys", headers=tenant.headers)).json()["items"]
    return str(next(k["id"] for k in keys if tenant.key.startswith(k["prefix"])))


# --- members -----------------------------------------------------------------------------------------


async def test_an_admin_adds_changes_and_removes_a_member_each_audited(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    browser = await sign_in(tenant, ("admin",))
    page = await browser.get("/admin/members")
    assert is_page(page, 200), page.text
    assert 'href="/admin/members" aria-current="page">Admin</a>' in page.text  # the header's link
    subject = f"sub-{secrets.token_hex(4)}"

    added = await post(browser, "/admin/members", subject=subject, name=XSS, issuer="https://idp.example",
                       role_operator="on", role_viewer="on")
    assert (added.status_code, added.headers["location"]) == (303, "/admin/members"), added.text
    members = (await client.get("/api/v1/members", headers=tenant.headers)).json()["items"]
    member = next(m for m in members if m["subject"] == subject)
    assert (member["issuer"], member["roles"], member["name"]) == ("https://idp.example", ["operator", "viewer"], XSS)
    listed = (await browser.get("/admin/members")).text
    assert XSS not in listed and "&lt;img src=x onerror=alert(1)&gt;" in listed

    changed = await post(browser, f"/admin/members/{member['user_id']}", role_approver="on")
    assert changed.status_code == 303, changed.text
    got = (await client.get(f"/api/v1/members/{member['user_id']}", headers=tenant.headers)).json()
    assert got["roles"] == ["approver"]

    again = await post(browser, "/admin/members", subject=subject, issuer="https://idp.example", role_viewer="on")
    assert is_page(again, 409) and "a member already" in again.text

    removed = await post(browser, f"/admin/members/{member['user_id']}/remove")
    assert removed.status_code == 303, removed.text
    gone = await client.get(f"/api/v1/members/{member['user_id']}", headers=tenant.headers)
    assert gone.status_code == 404

    target = f"user:{member['user_id']}"
    for action, data in (("member.add", {"issuer": "https://idp.example", "subject": subject,
                                         "roles": ["operator", "viewer"]}),
                         ("member.update", {"from": ["operator", "viewer"], "to": ["approver"]}),
                         ("member.remove", {"roles": ["approver"]})):
        events = [e for e in await audit_events(sessionmaker, tenant.tenant_id, action) if e["target"] == target]
        assert [(e["data"], e["actor"].startswith("user:")) for e in events] == [(data, True)], (action, events)


async def test_a_member_form_without_roles_or_subject_is_a_422_page(tenant: TenantKey, sign_in: SignIn) -> None:
    browser = await sign_in(tenant, ("admin",))
    refused = await post(browser, "/admin/members", subject="someone")
    assert is_page(refused, 422) and "/form/roles" in refused.text, refused.text
    refused = await post(browser, "/admin/members", subject="x" * 300, role_viewer="on")
    assert is_page(refused, 422) and "/form/subject" in refused.text, refused.text


async def test_the_last_admin_is_never_demoted_or_removed(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    browser = await sign_in(tenant, ("admin",))
    me = (await browser.get("/auth/me")).json()["user"]["id"]
    # Revoke the tenant's admin key from the keys page: the signed-in admin is now the last admin.
    revoked = await post(browser, f"/admin/keys/{await admin_key_id(client, tenant)}/revoke")
    assert revoked.status_code == 303, revoked.text

    demoted = await post(browser, f"/admin/members/{me}", role_viewer="on")
    assert is_page(demoted, 409) and "last admin" in demoted.text, demoted.text
    removed = await post(browser, f"/admin/members/{me}/remove")
    assert is_page(removed, 409) and "last admin" in removed.text
    still = await browser.get("/admin/members")
    assert still.status_code == 200  # still an admin


# --- API keys ----------------------------------------------------------------------------------------


async def test_a_new_key_is_shown_once_works_and_is_revoked(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    browser = await sign_in(tenant, ("admin",))
    created = await post(browser, "/admin/keys", name="ci <deploy>", role_viewer="on", expires_in_days="30")
    assert is_page(created, 201), created.text
    assert created.headers["cache-control"] == "no-store" and "location" not in created.headers
    found = re.search(r'id="new-key-value"[^>]* value="([^"]+)"', created.text)
    assert found, created.text
    key = found.group(1)
    assert key not in str(created.url) and key not in created.headers.get("set-cookie", "")

    works = await client.get("/api/v1/runs", headers={"Authorization": f"Bearer {key}"})
    assert works.status_code == 200, works.text
    listed = await browser.get("/admin/keys")
    assert key not in listed.text and "ci &lt;deploy&gt;" in listed.text and key[:10] in listed.text
    key_id = next(k["id"] for k in (await client.get("/api/v1/api-keys", headers=tenant.headers)).json()["items"]
                  if k["name"] == "ci <deploy>")
    events = await audit_events(sessionmaker, tenant.tenant_id, "api_key.create")
    assert [e["data"]["roles"] for e in events if e["target"] == f"key:{key_id}"] == [["viewer"]]

    revoked = await post(browser, f"/admin/keys/{key_id}/revoke")
    assert revoked.status_code == 303, revoked.text
    refused = await client.get("/api/v1/runs", headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 401
    assert [e["target"] for e in await audit_events(sessionmaker, tenant.tenant_id, "api_key.revoke")] == [
        f"key:{key_id}"]


async def test_a_key_form_with_bad_fields_is_a_422_page(tenant: TenantKey, sign_in: SignIn) -> None:
    browser = await sign_in(tenant, ("admin",))
    for fields, pointer in (({"name": "k"}, "/form/roles"), ({"name": "", "role_viewer": "on"}, "/form/name"),
                            ({"name": "k", "role_viewer": "on", "expires_in_days": "soon"}, "/form/expires_in_days"),
                            ({"name": "k", "role_viewer": "on", "expires_in_days": "99999"}, "/form/expires_in_days")):
        refused = await post(browser, "/admin/keys", **fields)
        assert is_page(refused, 422) and pointer in refused.text, (fields, refused.text)


# --- settings ----------------------------------------------------------------------------------------


async def test_the_settings_form_round_trips_the_policy(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    browser = await sign_in(tenant, ("admin",))
    page = await browser.get("/admin/settings")
    assert is_page(page, 200) and 'name="four_eyes" value="on" checked' in page.text, page.text

    saved = await post(browser, "/admin/settings", shadow="on", http_allowlist="Tools.internal:8443\n\n*.corp\n",
                       alert_webhook="https://alerts.example/hook", approval_timeout_s="3600",
                       approval_on_expiry="flag", role_mapping="payments:oncall: operator, approver\nops: viewer")
    assert (saved.status_code, saved.headers["location"]) == (303, "/admin/settings?saved=1"), saved.text
    policy = (await client.get("/api/v1/settings", headers=tenant.headers)).json()
    assert policy == {"shadow": True, "four_eyes": False, "http_allowlist": ["tools.internal:8443", "*.corp"],
                      "alert_webhook": "https://alerts.example/hook", "approval_timeout_s": 3600.0,
                      "approval_on_expiry": "flag",
                      "role_mapping": {"payments:oncall": ["approver", "operator"], "ops": ["viewer"]}}
    [event] = await audit_events(sessionmaker, tenant.tenant_id, "settings.update")
    assert event["data"] == policy

    shown = await browser.get("/admin/settings?saved=1")
    assert "Saved." in shown.text and "payments:oncall: approver, operator" in shown.text
    assert 'name="shadow" value="on" checked' in shown.text and 'name="four_eyes" value="on" checked' not in shown.text
    assert 'value="3600"' in shown.text and '<option value="flag" selected>' in shown.text


async def test_refused_settings_come_back_with_each_error_by_its_field(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn
) -> None:
    browser = await sign_in(tenant, ("admin",))
    before = (await client.get("/api/v1/settings", headers=tenant.headers)).json()
    refused = await post(browser, "/admin/settings", four_eyes="on", http_allowlist="not a host!",
                         alert_webhook="ftp://x", approval_timeout_s="-5", approval_on_expiry="shrug",
                         role_mapping="ops: wizard")
    assert is_page(refused, 422), refused.text
    for field in ("http_allowlist", "alert_webhook", "approval_timeout_s", "approval_on_expiry", "role_mapping"):
        assert f'id="{field}-error"' in refused.text and f'aria-describedby="{field}-error"' in refused.text, field
    assert "not a host!" in refused.text  # what was typed comes back, to be mended
    assert "Nothing was saved" in refused.text
    assert (await client.get("/api/v1/settings", headers=tenant.headers)).json() == before

    unparsable = await post(browser, "/admin/settings", approval_timeout_s="60", approval_on_expiry="reject",
                            role_mapping="no colon here")
    assert is_page(unparsable, 422) and "line 1: write" in unparsable.text


# --- providers and secrets ---------------------------------------------------------------------------


async def test_providers_and_secrets_from_their_pages(
    client: httpx.AsyncClient, tenant: TenantKey, sign_in: SignIn,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    browser = await sign_in(tenant, ("admin",))
    value = f"sk-{secrets.token_hex(16)}"
    secret, provider = f"key_{secrets.token_hex(3)}", f"p{secrets.token_hex(3)}"
    answers = [await post(browser, "/admin/secrets", name=secret, value=value)]
    assert answers[0].status_code == 303, answers[0].text

    answers.append(await post(browser, "/admin/providers", name=provider, base_url="http://127.0.0.1:9/v1",
                              api_key_secret=secret, max_tokens_param="max_completion_tokens",
                              models="gpt-x 2.50 10\nmini 0.1 0.4"))
    assert (answers[-1].status_code, answers[-1].headers["location"]) == (303, f"/admin/providers/{provider}")
    got = (await client.get(f"/api/v1/providers/{provider}", headers=tenant.headers)).json()
    assert (got["api_key_secret"], got["max_tokens_param"], got["models"]) == (
        secret, "max_completion_tokens", {"gpt-x": {"input_per_mtok": "2.50", "output_per_mtok": "10"},
                                          "mini": {"input_per_mtok": "0.1", "output_per_mtok": "0.4"}})
    edit = await browser.get(f"/admin/providers/{provider}")
    models = re.search(r'name="models"[^>]*>([^<]*)</textarea>', edit.text)
    assert is_page(edit, 200) and models, edit.text
    assert sorted(models.group(1).splitlines()) == ["gpt-x 2.50 10", "mini 0.1 0.4"]

    answers.append(await post(browser, f"/admin/providers/{provider}", base_url="https://api.example/v1",
                              api_key_secret=secret, models="gpt-x 3 12"))
    assert answers[-1].status_code == 303
    got = (await client.get(f"/api/v1/providers/{provider}", headers=tenant.headers)).json()
    assert (got["base_url"], list(got["models"]), got["max_tokens_param"]) == (
        "https://api.example/v1", ["gpt-x"], "max_tokens")

    in_use = await post(browser, f"/admin/secrets/{secret}/delete")
    assert is_page(in_use, 409) and f"provider {provider}" in in_use.text and "even if in use" in in_use.text

    pages = [await browser.get(url) for url in ("/admin/secrets", "/admin/providers", f"/admin/providers/{provider}",
                                                "/admin/members", "/admin/keys", "/admin/settings")]
    assert all(p.status_code == 200 for p in pages) and secret in pages[0].text
    for answer in [*answers, *pages, in_use]:
        assert value not in answer.text and value not in str(answer.headers)
    events = await audit_events(sessionmaker, tenant.tenant_id, "secret.put")
    assert [e["target"] for e in events] == [f"secret:{secret}"] and value not in str(events)

    forced = await post(browser, f"/admin/secrets/{secret}/delete", force="on")
    assert forced.status_code == 303, forced.text
    [deleted] = await audit_events(sessionmaker, tenant.tenant_id, "secret.delete")
    assert deleted["data"]["used_by"] == [{"kind": "provider", "name": provider}]
    gone = await post(browser, f"/admin/providers/{provider}/delete")
    assert gone.status_code == 303
    assert (await client.get(f"/api/v1/providers/{provider}", headers=tenant.headers)).status_code == 404
    assert [e["target"] for e in await audit_events(sessionmaker, tenant.tenant_id, "provider.delete")] == [
        f"provider:{provider}"]


async def test_refused_provider_forms_come_back_with_errors_by_field(tenant: TenantKey, sign_in: SignIn) -> None:
    browser = await sign_in(tenant, ("admin",))
    cases = [
        ({"name": "p1", "base_url": "ftp://x", "models": "m 1 2"}, "base_url"),
        ({"name": "p1", "base_url": "http://h/v1", "models": "m 1"}, "models"),
        ({"name": "p1", "base_url": "http://h/v1", "models": "m one 2"}, "models"),
        ({"name": "p1", "base_url": "http://h/v1", "models": "m -1 2"}, "models"),
        ({"name": "p1", "base_url": "http://h/v1", "models": ""}, "models"),
        ({"name": "p1", "base_url": "http://h/v1", "models": "m 1 2", "api_key_secret": "nope"}, "api_key_secret"),
        ({"name": "1bad", "base_url": "http://h/v1", "models": "m 1 2"}, "name"),
    ]
    for fields, field in cases:
        refused = await post(browser, "/admin/providers", **fields)
        assert is_page(refused, 422) and f'id="{field}-error"' in refused.text, (fields, refused.text)
        assert f'value="{fields["base_url"]}"' in refused.text
    secret = await post(browser, "/admin/secrets", name="bad name", value="v")
    assert is_page(secret, 422) and "/form/name" in secret.text
    secret = await post(browser, "/admin/secrets", name="ok", value="two\nlines")
    assert is_page(secret, 422) and "/form/value" in secret.text and "two\nlines" not in secret.text


# --- isolation and permissions -----------------------------------------------------------------------


async def test_another_tenants_ids_are_404_pages(
    client: httpx.AsyncClient, make_tenant: MakeTenant, sign_in: SignIn
) -> None:
    tenant, other = await make_tenant(), await make_tenant()
    member = (await client.post("/api/v1/members", json={"subject": f"s-{secrets.token_hex(4)}", "roles": ["viewer"]},
                                headers=other.headers)).json()
    key = (await client.post("/api/v1/api-keys", json={"name": "theirs", "roles": ["viewer"]},
                             headers=other.headers)).json()
    secret, provider = f"s_{secrets.token_hex(3)}", f"p{secrets.token_hex(3)}"
    stored = await client.put(f"/api/v1/secrets/{secret}", json={"value": "v"}, headers=other.headers)
    assert stored.status_code == 204
    assert (await client.put(f"/api/v1/providers/{provider}", json={"base_url": "http://h/v1", "models": {"m": PRICES}},
                             headers=other.headers)).status_code == 201
    browser = await sign_in(tenant, ("admin",))
    for answer in (await post(browser, f"/admin/members/{member['user_id']}", role_admin="on"),
                   await post(browser, f"/admin/members/{member['user_id']}/remove"),
                   await post(browser, f"/admin/keys/{key['id']}/revoke"),
                   await browser.get(f"/admin/providers/{provider}"),
                   await post(browser, f"/admin/providers/{provider}/delete"),
                   await post(browser, f"/admin/secrets/{secret}/delete", force="on"),
                   await post(browser, f"/admin/keys/{uuid.uuid4()}/revoke")):
        assert is_page(answer, 404), (answer.request.url, answer.status_code, answer.text[:300])
    # Untouched in their tenant.
    assert (await client.get(f"/api/v1/members/{member['user_id']}", headers=other.headers)).json()["roles"] == [
        "viewer"]
    assert (await client.get(f"/api/v1/providers/{provider}", headers=other.headers)).status_code == 200
    keys = (await client.get("/api/v1/api-keys", headers=other.headers)).json()["items"]
    assert next(k for k in keys if k["id"] == key["id"])["revoked_at"] is None


async def test_non_admins_get_403_pages_and_no_admin_link(tenant: TenantKey, sign_in: SignIn) -> None:
    operator = await sign_in(tenant, ("operator",))
    runs = await operator.get("/runs")
    assert 'href="/admin/members"' not in runs.text
    for url in ("/admin/members", "/admin/keys", "/admin/settings", "/admin/secrets"):
        page = await operator.get(url)
        assert is_page(page, 403), (url, page.status_code)
    page = await operator.get("/admin/members")
    assert "members:read" in page.text
    refused = await post(operator, "/admin/keys", name="mine", role_admin="on")
    assert is_page(refused, 403) and "members:write" in refused.text
    providers = await operator.get("/admin/providers")  # every role may read providers, not change them
    assert is_page(providers, 200) and 'action="/admin/providers"' not in providers.text

    author = await sign_in(tenant, ("author",))
    names = await author.get("/admin/secrets")  # authors see secret names, to name them in tools
    assert is_page(names, 200) and 'name="value"' not in names.text
    refused = await post(author, "/admin/secrets", name="x", value="y")
    assert is_page(refused, 403) and "secrets:write" in refused.text


async def test_forms_need_the_sessions_csrf_token(tenant: TenantKey, sign_in: SignIn) -> None:
    browser = await sign_in(tenant, ("admin",))
    for url in ("/admin/keys", "/admin/secrets", "/admin/settings", "/admin/members", "/admin/providers"):
        refused = await browser.post(url, data={"name": "x", "value": "y", "role_admin": "on"})
        assert refused.status_code == 403 and "CSRF" in refused.text, url


async def test_admin_lists_come_a_keyset_page_at_a_time(
    tenant: TenantKey, sign_in: SignIn, make_api_key: MakeApiKey, settings: Settings
) -> None:
    for _ in range(settings.page_size_default):
        await make_api_key(tenant.tenant_id, roles=("viewer",))
    browser = await sign_in(tenant, ("admin",))
    first = await browser.get("/admin/keys")
    more = re.search(r'<a rel="next" href="(/admin/keys\?cursor=[^"]+)"', first.text)
    assert is_page(first, 200) and more, first.text[-800:]
    second = await browser.get(more.group(1).replace("&amp;", "&"))
    revoke = re.compile(r'action="/admin/keys/([0-9a-f-]+)/revoke"')
    ids = revoke.findall(first.text), revoke.findall(second.text)
    assert (len(ids[0]), len(ids[1])) == (settings.page_size_default, 1)  # the tenant's own key, and 50 more
    assert ids[0] == sorted(ids[0]) and ids[0][-1] < ids[1][0] and 'rel="next"' not in second.text

    for url in ("/admin/members", "/admin/keys", "/admin/providers", "/admin/secrets"):
        junk = await browser.get(url, params={"cursor": "junk"})
        assert is_page(junk, 422) and "not a cursor from this list" in junk.text, url
