"""What every subcommand needs: settings, the URLs it requires, pre-flight checks reported as one line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from app.config import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

CONNECT_TIMEOUT_S = 10.0
EXIT_USAGE = 2


class CliError(Exception):
    """A failure to report as one line on stderr, without a traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def load_settings() -> Settings:
    from pydantic import ValidationError

    try:
        return get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise CliError(f"invalid setting {field}: {first['msg']}", EXIT_USAGE) from None


def require_urls(settings: Settings, *, redis: bool) -> tuple[str, str | None]:
    missing = [
        name
        for name, value in (("DATABASE_URL", settings.database_url), ("REDIS_URL", settings.redis_url))
        if not value and (redis or name == "DATABASE_URL")
    ]
    if missing:
        one = len(missing) == 1
        what = "is not set: set it to your server" if one else "are not set: set them to your servers"
        raise CliError(
            f"{' and '.join(missing)} {what}, or use `steward up` to run everything with embedded servers",
            EXIT_USAGE,
        )
    assert settings.database_url is not None
    return settings.database_url, settings.redis_url


def safe_url(url: str) -> str:
    """The URL without its password, fit for an error message."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"


def reason(exc: BaseException) -> str:
    """A one-line description of a connection failure, digging through SQLAlchemy's wrapping."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    orig = getattr(exc, "orig", None)
    if orig is not None:
        exc = orig.__cause__ or orig
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def check_database(url: str) -> None:
    """Fail with one line, not a traceback, when the database is unreachable or the URL is wrong."""
    from app.db import async_url

    try:
        async_url(url)
    except ValueError as exc:
        raise CliError(f"DATABASE_URL: {exc}", EXIT_USAGE) from None
    try:
        asyncio.run(_ping_database(url))
    except Exception as exc:
        raise CliError(f"cannot connect to the database at {safe_url(url)} ({reason(exc)})") from None


async def _ping_database(url: str) -> None:
    from sqlalchemy import text

    from app.db import make_engine

    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


def check_redis(url: str) -> None:
    try:
        asyncio.run(_ping_redis(url))
    except Exception as exc:
        raise CliError(f"cannot connect to Redis at {safe_url(url)} ({reason(exc)})") from None


async def _ping_redis(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await client.ping()
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def session(database_url: str) -> AsyncIterator[AsyncSession]:
    from app.db import make_engine, make_sessionmaker

    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        async with make_sessionmaker(engine)() as db:
            yield db
    finally:
        await engine.dispose()


def raise_if_not_migrated(exc: BaseException) -> None:
    if "does not exist" in str(exc) and "relation" in str(exc):
        raise CliError("the database has no Steward tables yet: run `steward migrate` first") from None
