"""Server-Sent Events that tell an open page "something changed": the page then fetches its live part.

The notifier's event (set on each Postgres NOTIFY of the page's subject, and whenever its listening
connection was lost) becomes ``changed`` events: a burst closer together than ``coalesce_s`` is one, a
comment line every ``KEEPALIVE_S`` keeps an idle stream open through proxies, and a reconnect carrying
``Last-Event-ID`` is told at once, for whatever it missed meanwhile. A stream holds no database connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

KEEPALIVE_S = 15.0
COALESCE_S = 0.2


def change_stream(
    request: Request, watch: contextlib.AbstractContextManager[asyncio.Event], coalesce_s: float = COALESCE_S
) -> StreamingResponse:
    """``changed`` events whenever ``watch``'s event is set, coalesced, with keep-alives."""
    resumed = request.headers.get("last-event-id") is not None

    async def events() -> AsyncIterator[str]:
        sequence = 0
        yield "retry: 2000\n\n"
        with watch as changed:
            if resumed:
                changed.set()
            while True:
                try:
                    await asyncio.wait_for(changed.wait(), timeout=KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                changed.clear()
                sequence += 1
                yield f"id: {sequence}\nevent: changed\ndata: {{}}\n\n"
                await asyncio.sleep(coalesce_s)  # a burst of changes is one refresh

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})
