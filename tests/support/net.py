"""Loopback ports for servers a test (or a bench script) starts, and waiting for them to answer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick; free until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def get_once_up(url: str, *, ready: Callable[[httpx.Response], bool] = lambda _: True,
                      timeout: float = 60) -> httpx.Response:
    """``GET url`` from a process that is starting: tried again while its port refuses connections (or the
    answer is not ``ready``), for up to ``timeout`` seconds; the first answer that is."""
    async with httpx.AsyncClient() as http, asyncio.timeout(timeout):
        while True:
            try:
                answer = await http.get(url)
                if ready(answer):
                    return answer
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)  # a starting process: nothing to wait on but its port
