"""Redis connection settings for arq from a URL (``redis://``, ``rediss://`` or ``unix://``)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from arq.connections import ArqRedis, RedisSettings


def redis_settings(url: str) -> RedisSettings:
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        db = int(parse_qs(parsed.query).get("db", ["0"])[0])
        return RedisSettings(unix_socket_path=parsed.path, database=db, conn_timeout=2, conn_retries=0)
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 2
    settings.conn_retries = 0
    return settings


def connect(url: str) -> ArqRedis:
    """An arq client that connects on first use: a process can start while Redis is down (the relay
    keeps its jobs and retries; /readyz says Redis is not answering)."""
    client: ArqRedis = ArqRedis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)
    client.default_queue_name = "arq:queue"
    client.expires_extra_ms = 86_400_000
    return client
