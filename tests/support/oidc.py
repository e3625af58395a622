"""A real OpenID provider for the tests: npm ``oidc-provider`` (tests/oidc/provider.mjs) in a node subprocess.

It runs on a free 127.0.0.1 port with a fresh RSA signing key per start (``restart()`` rotates it). It
also publishes a PS256 key the tests hold (``TEST_KEY``), so tests can mint tokens with claims of their
choosing (expired, future ``nbf``...) that verify against the provider's JWKS; the provider never signs
with it.

Accounts: any login id works at the provider's login form; ``"<name>~<group>~<group>"`` signs in a user
in those groups (see :func:`tests.support.signin.new_account`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from joserfc.jwk import RSAKey

from tests.support.env import ROOT

OIDC_DIR = ROOT / "tests" / "oidc"
# The in-process app's address (httpx ASGI transport: nothing listens there, but it is what the provider
# redirects to and what the app believes it is reached at).
APP_URL = "http://127.0.0.1:8000"
API_AUDIENCE = "https://api.steward.test"
OTHER_AUDIENCE = "https://other.steward.test"
DASHBOARD_CLIENT = "steward-dashboard"
DASHBOARD_SECRET = secrets.token_urlsafe(24)
# client_credentials clients: `robot` carries groups ["robots"], `solo` and `nobody` carry none.
ROBOT, SOLO, NOBODY = "robot", "solo", "nobody"
CLIENT_SECRET = secrets.token_urlsafe(24)
TEST_KID = "steward-test-key"
TEST_KEY = RSAKey.generate_key(2048, parameters={"kid": TEST_KID, "alg": "PS256", "use": "sig"}, private=True)
START_TIMEOUT_S = 20.0


# --- the provider ------------------------------------------------------------------------------------


def _npm_ci() -> None:
    """Install tests/oidc/node_modules from package-lock.json once (a lock: xdist workers start together)."""
    marker = OIDC_DIR / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is needed for the OpenID provider of tests/auth (apt-get install -y nodejs npm)")
    with open(OIDC_DIR / ".npm-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=OIDC_DIR, check=True,
                           timeout=600)


def provider_config(app_url: str) -> dict[str, Any]:
    """Clients: the dashboard (code + PKCE, redirecting to ``app_url``) and three client_credentials ones."""
    machine = {"client_secret": CLIENT_SECRET, "grant_types": ["client_credentials"], "redirect_uris": [],
               "response_types": []}
    return {
        "clients": [
            {
                "client_id": DASHBOARD_CLIENT,
                "client_secret": DASHBOARD_SECRET,
                "redirect_uris": [f"{app_url}/auth/callback"],
                "post_logout_redirect_uris": [f"{app_url}/auth/login"],
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
            },
            {"client_id": ROBOT, **machine},
            {"client_id": SOLO, **machine},
            {"client_id": NOBODY, **machine},
        ],
        "resources": [API_AUDIENCE, OTHER_AUDIENCE],
        "clientGroups": {ROBOT: ["robots"]},
        "extraKeys": [TEST_KEY.as_dict(private=True)],
    }


class OidcProvider:
    """A running ``node provider.mjs``; ``issuer`` is its URL."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.port = 0
        self.issuer = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    def start(self) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is needed for the OpenID provider of tests/auth")
        _npm_ci()
        env = {**os.environ, "OIDC_PROVIDER_CONFIG": json.dumps(self.config)}
        self._proc = subprocess.Popen([node, str(OIDC_DIR / "provider.mjs"), str(self.port)], cwd=OIDC_DIR, env=env,
                                      stdout=subprocess.PIPE, stderr=self._log)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while not line.startswith(b"READY "):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._proc.poll() is not None:
                self._log.seek(0)
                self.stop()
                pytest.fail(f"the OpenID provider did not start: {self._log.read().decode(errors='replace')[-2000:]}")
            if select.select([self._proc.stdout], [], [], remaining)[0]:
                line = self._proc.stdout.readline()
        self.issuer = line.decode().split()[1]
        self.port = int(self.issuer.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: same issuer, a fresh signing key, no sessions."""
        self.stop()
        self.start()

    async def client_credentials(self, client_id: str = ROBOT, resource: str = API_AUDIENCE) -> str:
        """A JWT access token from the provider's token endpoint (client_credentials + resource indicator)."""
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                f"{self.issuer}/token", auth=(client_id, CLIENT_SECRET),
                data={"grant_type": "client_credentials", "resource": resource, "scope": "api"},
            )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    async def jwks(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(f"{self.issuer}/jwks")
        response.raise_for_status()
        keys: dict[str, Any] = response.json()
        return keys


@contextlib.contextmanager
def running_provider(config: dict[str, Any]) -> Iterator[OidcProvider]:
    provider = OidcProvider(config)
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


