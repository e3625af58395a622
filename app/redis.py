"""Redis connection settings for arq from a URL (``redis://``, ``rediss://`` or ``unix://``)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from arq.connections import RedisSettings


def redis_settings(url: str) -> RedisSettings:
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        db = int(parse_qs(parsed.query).get("db", ["0"])[0])
        return RedisSettings(unix_socket_path=parsed.path, database=db, conn_timeout=2, conn_retries=0)
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 2
    settings.conn_retries = 0
    return settings
