"""Settings from the environment: a variable set but empty is unset (docs/operations.md)."""

from __future__ import annotations

import os

import pytest

from app.config import Settings

OPTIONAL = {
    "DATABASE_URL": "database_url",
    "REDIS_URL": "redis_url",
    "STEWARD_PUBLIC_URL": "public_url",
    "STEWARD_OIDC_ISSUER": "oidc_issuer",
    "STEWARD_OIDC_CLIENT_ID": "oidc_client_id",
    "STEWARD_OIDC_CLIENT_SECRET": "oidc_client_secret",
    "STEWARD_OIDC_AUDIENCE": "oidc_audience",
    "STEWARD_SECRET_KEYS": "secret_keys",
    "STEWARD_WORKER_METRICS_PORT": "worker_metrics_port",
    "STEWARD_AUDIT_RETENTION_DAYS": "audit_retention_days",
    "STEWARD_TRACE_URL": "trace_url",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("STEWARD_") or name in {"DATABASE_URL", "REDIS_URL", "PORT"}:
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("variable", sorted(OPTIONAL))
def test_an_empty_optional_setting_is_unset(clean_env: pytest.MonkeyPatch, variable: str) -> None:
    clean_env.setenv(variable, "")
    assert getattr(Settings(), OPTIONAL[variable]) is None


def test_empty_numbers_and_paths_take_their_defaults(clean_env: pytest.MonkeyPatch) -> None:
    for variable in ("PORT", "STEWARD_DATA_DIR", "STEWARD_WORKER_CONCURRENCY", "STEWARD_HTTP_ALLOW_PRIVATE_NETWORKS"):
        clean_env.setenv(variable, "")
    settings, defaults = Settings(), Settings.model_fields
    assert settings.port == defaults["port"].default
    assert settings.data_dir == defaults["data_dir"].default
    assert settings.worker_concurrency == defaults["worker_concurrency"].default
    assert settings.http_allow_private_networks is False


def test_an_empty_text_setting_keeps_its_meaning(clean_env: pytest.MonkeyPatch) -> None:
    # docs/security.md: `STEWARD_DB_APP_ROLE=` turns the application role (and its RLS wall) off.
    clean_env.setenv("STEWARD_DB_APP_ROLE", "")
    assert Settings().db_app_role == ""


def test_a_set_value_is_used(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DATABASE_URL", "postgresql://db.example/steward")
    clean_env.setenv("STEWARD_WORKER_METRICS_PORT", "9100")
    settings = Settings()
    assert settings.database_url == "postgresql://db.example/steward"
    assert settings.worker_metrics_port == 9100
