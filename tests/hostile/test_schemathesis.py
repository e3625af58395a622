"""Schemathesis over the whole API, in-process: no server error, every status documented, every body as
documented. Bounded (derandomized: a fixed seed; a few examples per operation) so it stays a small part of
the suite."""

from __future__ import annotations

import os

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, seed, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from app.config import Settings
from app.main import create_app
from tests.support.tenants import MakeTenant, TenantKey

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
# A longer hunt by hand: FUZZ_EXAMPLES=200 FUZZ_SEED=<n> pytest tests/hostile/test_schemathesis.py
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "6"))
SEED = os.environ.get("FUZZ_SEED")

# The document only: loaded at collection, before any fixture (the app it describes needs a database).
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@pytest.fixture(scope="session")
def fuzzed_app(settings: Settings) -> FastAPI:
    """An app of its own: schemathesis runs its lifespan on its own event loop thread."""
    return create_app(settings)


@pytest.fixture(scope="session")
async def fuzz_admin(make_tenant: MakeTenant) -> TenantKey:
    return await make_tenant()


@schema.parametrize()
@(seed(int(SEED)) if SEED is not None else (lambda test: test))
@settings(max_examples=EXAMPLES, derandomize=SEED is None, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms(case: schemathesis.Case, fuzzed_app: FastAPI, fuzz_admin: TenantKey) -> None:
    case.call_and_validate(
        app=fuzzed_app, base_url="http://testserver", headers=fuzz_admin.headers, checks=CHECKS
    )
