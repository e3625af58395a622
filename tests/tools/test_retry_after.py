"""One ``Retry-After`` parser for both callers: a model server's refusal and a tool's, as real HTTP replies."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import pytest_asyncio

from app.config import Settings
from app.llm.client import ModelError, chat
from app.retry_after import MAX_RETRY_AFTER_S, retry_after_seconds
from app.tools.builtins import ToolCall, ToolError, http
from tests.fakes.model_server import ModelServer, Turn
from tests.fakes.tool_server import ToolServer

# Dates are compared within this many seconds: the clock moves between writing the date and reading it.
SLACK_S = 5.0


def in_60_s(form: Callable[[datetime], str]) -> Callable[[], str]:
    """A date 60 s after the test starts, in ``form``: made when the test runs, not when it is collected."""
    return lambda: form(datetime.now(UTC) + timedelta(seconds=60))


CASES = [
    # delta-seconds
    ("7", 7.0),
    ("0", 0.0),
    ("1.5", 1.5),  # not RFC 9110, but sent in the wild: read as meant
    ("86400", MAX_RETRY_AFTER_S),  # a valid but long delay is capped
    # HTTP-date in its three forms (RFC 9110 section 5.6.7)
    pytest.param(in_60_s(lambda t: format_datetime(t, usegmt=True)), 60.0, id="IMF-fixdate in 60 s"),
    pytest.param(in_60_s(lambda t: t.strftime("%A, %d-%b-%y %H:%M:%S GMT")), 60.0, id="RFC 850 date in 60 s"),
    pytest.param(in_60_s(lambda t: t.strftime("%a %b %d %H:%M:%S %Y")), 60.0, id="asctime date in 60 s"),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: retry now
    ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER_S),
    # no hint at all
    ("-3", None),
    ("+5", None),
    ("nan", None),
    ("NaN", None),
    ("inf", None),
    ("-inf", None),
    ("1e3", None),
    ("0x10", None),
    ("1_000", None),
    pytest.param("9" * 400, None, id="400 nines"),  # too large for a float
    ("soon", None),
    ("Mon, 1", None),
    ("Sun, 06 Nov 99999 08:49:37 GMT", None),
]


def agrees(seen: float | None, expected: float | None) -> bool:
    if expected is None or seen is None:
        return seen is expected
    return expected - SLACK_S <= seen <= expected + 0.001


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


@pytest.fixture(scope="module")
def tool_server() -> Iterator[ToolServer]:
    with ToolServer() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as h:
        yield h


@pytest.mark.parametrize(("value", "expected"), CASES)
async def test_model_servers_and_tools_read_retry_after_alike(
    value: str | Callable[[], str], expected: float | None, client: httpx.AsyncClient, model_server: ModelServer,
    tool_server: ToolServer,
) -> None:
    if callable(value):
        value = value()
    assert agrees(retry_after_seconds(value), expected)

    model = f"m-{uuid.uuid4().hex[:8]}"
    model_server.script(model, [Turn.error(429, retry_after=value)])
    with pytest.raises(ModelError) as refused_model:
        await chat(client, base_url=model_server.url, api_key="k", model=model,
                   messages=[{"role": "user", "content": "hi"}])
    assert refused_model.value.error_class == "http_429"
    assert agrees(refused_model.value.retry_after, expected), refused_model.value.retry_after

    url = str(httpx.URL(tool_server.url + "/ratelimit", params={"times": 1, "retry_after": value}))
    call = ToolCall({"url": url, "method": "POST"}, 1, uuid.uuid4().hex,
                    Settings(http_allow_private_networks=True), client)
    with pytest.raises(ToolError) as refused_tool:
        await http(call)
    assert refused_tool.value.error_class == "http_429" and refused_tool.value.transient
    assert agrees(refused_tool.value.retry_after, expected), refused_tool.value.retry_after


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1500", 1.5), ("0", 0.0), ("2.5", 0.0025), ("-1", None), ("nan", None), ("soon", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("86400000", MAX_RETRY_AFTER_S)],
)
def test_retry_after_ms_has_no_date_form(value: str, expected: float | None) -> None:
    """OpenAI's ``retry-after-ms``, which model servers send besides ``Retry-After``."""
    assert retry_after_seconds(value, milliseconds=True) == expected
