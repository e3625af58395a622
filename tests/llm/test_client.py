"""The chat-completions client against a real scripted model server on loopback, and the tool server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app.llm.client import (
    MAX_RESPONSE_BYTES,
    ChatResult,
    ModelError,
    Price,
    chat,
    cost_usd,
    estimate_input_tokens,
    tool_spec,
)
from tests.fakes.model_server import ModelServer, Turn
from tests.fakes.tool_server import ToolServer

MODEL = "scripted-1"
KEY = "sk-test-0123456789abcdef-secret"
LOOKUP = tool_spec(
    "lookup", "Look something up", {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
)


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


@pytest.fixture
def models(model_server: ModelServer) -> Iterator[ModelServer]:
    model_server.reset()
    yield model_server
    model_server.reset()


@pytest.fixture(scope="module")
def tool_server() -> Iterator[ToolServer]:
    with ToolServer() as server:
        yield server


@pytest.fixture
def tools(tool_server: ToolServer) -> Iterator[ToolServer]:
    tool_server.reset()
    yield tool_server
    tool_server.reset()


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


async def call(
    http: httpx.AsyncClient, server: ModelServer, messages: list[dict[str, Any]], **kwargs: Any
) -> ChatResult:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("model", MODEL)
    return await chat(http, base_url=server.url, messages=messages, **kwargs)


async def model_error(
    http: httpx.AsyncClient, server: ModelServer, messages: list[dict[str, Any]] | None = None, **kwargs: Any
) -> ModelError:
    with pytest.raises(ModelError) as info:
        await call(http, server, messages or user("hi"), **kwargs)
    return info.value


# --- answers ------------------------------------------------------------------------------------------------


async def test_tool_call_turn_is_parsed(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.tool_calls([("lookup", {"q": "x"}), ("lookup", {"q": "y", "n": 2})], usage=(100, 20))])

    result = await call(http, models, user("find x and y"), tools=[LOOKUP])

    assert [(c.id, c.name, c.arguments, c.arguments_error) for c in result.tool_calls] == [
        ("call_0_0", "lookup", {"q": "x"}, None),
        ("call_0_1", "lookup", {"q": "y", "n": 2}, None),
    ]
    assert result.finish_reason == "tool_calls"
    assert result.content is None
    assert (result.input_tokens, result.output_tokens, result.usage_reported) == (100, 20, True)
    assert result.message["role"] == "assistant"
    assert [c["function"]["arguments"] for c in result.message["tool_calls"]] == ['{"q": "x"}', '{"q": "y", "n": 2}']
    [request] = models.calls(MODEL)
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["tools"] == [LOOKUP]


async def test_conversation_feeds_tool_results_back(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.tool_calls([("lookup", {"q": "x"})]), Turn.final("x is 42")])
    messages = user("what is x?")

    first = await call(http, models, messages, tools=[LOOKUP])
    messages += [first.message, {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"x": 42}'}]
    second = await call(http, models, messages, tools=[LOOKUP])

    assert (second.content, second.finish_reason, second.tool_calls) == ("x is 42", "stop", ())
    # The strict server accepted the assistant message as the client rebuilt it, and saw the result.
    assert [r.status for r in models.calls(MODEL)] == [200, 200]
    assert models.calls(MODEL)[1].tool_messages == [
        {"role": "tool", "tool_call_id": "call_0_0", "content": '{"x": 42}'}
    ]


async def test_invalid_json_arguments_are_reported_not_raised(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.tool_calls([("lookup", '{"q": "x",'), ("lookup", "")])])

    result = await call(http, models, user("find x"), tools=[LOOKUP])

    broken, empty = result.tool_calls
    assert broken.arguments == '{"q": "x",'
    assert broken.arguments_error is not None and "not valid JSON" in broken.arguments_error
    assert (empty.arguments, empty.arguments_error) == ({}, None)
    assert result.message["tool_calls"][0]["function"]["arguments"] == '{"q": "x",'


async def test_final_answer(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.final("Paris.", usage=(12, 3))])

    result = await call(http, models, user("Capital of France?"), max_tokens=50)

    assert (result.content, result.finish_reason, result.tool_calls) == ("Paris.", "stop", ())
    assert result.message == {"role": "assistant", "content": "Paris."}
    assert (result.input_tokens, result.output_tokens, result.model) == (12, 3, MODEL)
    assert 0 < result.latency_s < 5
    assert models.calls(MODEL)[0].body["max_tokens"] == 50


async def test_usage_prices_exactly(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.final("ok", usage=(1_000_000, 0)), Turn.final("ok", usage=(1234, 567))])
    price = Price(Decimal("3"), Decimal("15"))

    result = await call(http, models, user("hi"))

    assert cost_usd(price, result.input_tokens, result.output_tokens) == Decimal("3")
    assert cost_usd(price, 1234, 567) == Decimal("0.012207")
    assert cost_usd(Price.from_mapping({"input_per_mtok": "0.1", "output_per_mtok": 0.3}), 10, 10) == Decimal(
        "0.000004"
    )
    assert cost_usd(price, 0, 0) == 0
    with pytest.raises(ValueError):
        Price.from_mapping({"input_per_mtok": "-1", "output_per_mtok": "1"})


async def test_missing_usage_falls_back_to_the_estimate(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.final("an answer of some length", usage=None)])
    messages = user("hello there")

    result = await call(http, models, messages, tools=[LOOKUP], max_tokens=1000)

    assert result.usage_reported is False
    assert result.input_tokens == estimate_input_tokens(messages, [LOOKUP])
    assert result.output_tokens >= len("an answer of some length") / 4


async def test_model_name_reported_by_server_else_requested(http: httpx.AsyncClient, models: ModelServer) -> None:
    body = {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
    models.script(MODEL, [Turn.raw({**body, "model": "gpt-x-2025-01-01"})])
    models.script("other", [Turn.raw(body)])

    assert (await call(http, models, user("hi"))).model == "gpt-x-2025-01-01"
    assert (await call(http, models, user("hi"), model="other")).model == "other"


async def test_estimate_is_an_upper_bound_for_ordinary_text(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.final("fine")])
    text = "The quick brown fox jumps over the lazy dog. " * 40 + "Ünïcødé, 日本語, emoji 🚀."
    messages = [*user(text), {"role": "assistant", "content": "Noted."}, {"role": "user", "content": "Go on."}]

    result = await call(http, models, messages, tools=[LOOKUP])

    assert result.usage_reported
    estimate = estimate_input_tokens(messages, [LOOKUP])
    assert estimate >= result.input_tokens
    # chars/4 is how real tokenizers count English; the estimate must not undercut even one token per char.
    assert estimate >= len(text) + len(messages)


async def test_concurrent_conversations_share_a_script(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.tool_calls([("lookup", {"q": "x"})]), Turn.final("done")])

    async def conversation(i: int) -> str | None:
        messages = user(f"task {i}")
        first = await call(http, models, messages)
        messages += [first.message, {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": str(i)}]
        return (await call(http, models, messages)).content

    assert await asyncio.gather(*(conversation(i) for i in range(20))) == ["done"] * 20
    assert len(models.calls(MODEL)) == 40


async def test_past_the_end_of_the_script(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.final("again")])
    models.script("loops", [Turn.tool_calls([("lookup", {"q": "x"})])])
    replayed = [*user("hi"), {"role": "assistant", "content": "once"}, {"role": "user", "content": "more"}]

    assert (await call(http, models, replayed)).content == "again"
    exc = await model_error(http, models, replayed, model="loops")
    assert exc.error_class == "http_500" and "ran out" in exc.message


async def test_callable_turn(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, lambda request: Turn.final(f"you said {request['messages'][-1]['content']}"))

    assert (await call(http, models, user("ping"))).content == "you said ping"


# --- errors -------------------------------------------------------------------------------------------------


async def test_429_is_transient_with_retry_after(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.error(429, retry_after=2)])

    exc = await model_error(http, models)

    assert (exc.error_class, exc.transient, exc.retry_after) == ("http_429", True, 2.0)
    assert "429" in str(exc) and "Rate limit" in str(exc)


async def test_retry_after_as_http_date(http: httpx.AsyncClient, models: ModelServer) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    models.script(MODEL, [Turn.error(503, retry_after=when)])

    exc = await model_error(http, models)

    assert exc.error_class == "http_503" and exc.transient
    assert exc.retry_after is not None and 25 < exc.retry_after <= 30


async def test_500_is_transient(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.error(500)])

    exc = await model_error(http, models)

    assert (exc.error_class, exc.transient, exc.status_code) == ("http_500", True, 500)
    assert str(exc).startswith("model server returned 500: The server had an error")


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_4xx_is_permanent_with_a_short_message(http: httpx.AsyncClient, models: ModelServer, status: int) -> None:
    models.script(MODEL, [Turn.error(status, "bad things " * 200, retry_after=5)])

    exc = await model_error(http, models)

    assert (exc.error_class, exc.transient, exc.retry_after) == (f"http_{status}", False, None)
    assert str(exc).startswith(f"model server returned {status}: bad things bad things")
    assert len(str(exc)) < 350


async def test_401_never_shows_the_key(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.final("ok")])
    models.require_key = "sk-the-right-key"

    exc = await model_error(http, models)  # with KEY, which the server quotes back in full

    assert (exc.error_class, exc.transient) == ("http_401", False)
    assert "Incorrect API key" in str(exc)
    assert KEY not in str(exc) and KEY not in repr(exc) and KEY not in str(exc.args)
    assert (await call(http, models, user("hi"), api_key="sk-the-right-key")).content == "ok"


async def test_unknown_model_is_permanent(http: httpx.AsyncClient, models: ModelServer) -> None:
    exc = await model_error(http, models, model="nope")

    assert (exc.error_class, exc.transient) == ("http_404", False) and "nope" in exc.message


async def test_hang_past_the_timeout(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.hang(10)])
    started = time.monotonic()

    exc = await model_error(http, models, timeout_s=0.3)

    assert (exc.error_class, exc.transient) == ("timeout", True)
    assert time.monotonic() - started < 2
    assert "0.3s" in exc.message


async def test_slow_body_cannot_outlast_the_timeout(http: httpx.AsyncClient, models: ModelServer) -> None:
    # Headers and half a body come at once: per-read timeouts would never fire on a steady drip.
    models.script(MODEL, [Turn.hang(10, during="body")])
    started = time.monotonic()

    exc = await model_error(http, models, timeout_s=0.3)

    assert exc.error_class == "timeout" and time.monotonic() - started < 2


async def test_connection_refused_is_transient(http: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ModelError) as info:
        await chat(http, base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, model=MODEL, messages=user("hi"))

    assert (info.value.error_class, info.value.transient) == ("connection", True)
    assert f"127.0.0.1:{port}" in info.value.message and KEY not in repr(info.value)


async def test_dropped_connection_is_transient(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.disconnect()])

    exc = await model_error(http, models)

    assert (exc.error_class, exc.transient) == ("connection", True)
    assert [r.status for r in models.calls(MODEL)] == [0]  # recorded, never answered


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_response_over_4_mib_is_refused(http: httpx.AsyncClient, models: ModelServer, chunked: bool) -> None:
    models.script(MODEL, [Turn.final("x" * (MAX_RESPONSE_BYTES + 1), chunked=chunked)])

    exc = await model_error(http, models)

    assert (exc.error_class, exc.transient) == ("bad_response", False)
    assert "larger than 4194304 bytes" in exc.message


async def test_just_under_the_limit_is_fine(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.final("x" * (MAX_RESPONSE_BYTES - 1000), chunked=True)])

    result = await call(http, models, user("hi"))

    assert result.content is not None and len(result.content) == MAX_RESPONSE_BYTES - 1000


@pytest.mark.parametrize(
    "body",
    ["not json {", [], {"choices": []}, {"choices": [{"finish_reason": "stop"}]}, {"error": {"message": "upstream"}}],
    ids=["not-json", "array", "no-choices", "no-message", "error-body"],
)
async def test_malformed_responses_are_bad_response(http: httpx.AsyncClient, models: ModelServer, body: Any) -> None:
    models.script(MODEL, [Turn.raw(body)])

    exc = await model_error(http, models)

    assert (exc.error_class, exc.transient) == ("bad_response", False)


async def test_the_server_rejects_unanswered_tool_calls(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script(MODEL, [Turn.tool_calls([("lookup", {"q": "x"})]), Turn.final("done")])
    first = await call(http, models, user("find x"))

    exc = await model_error(http, models, [*user("find x"), first.message, {"role": "user", "content": "well?"}])

    assert exc.error_class == "http_400" and "call_0_0" in exc.message


async def test_models_endpoint(http: httpx.AsyncClient, models: ModelServer) -> None:
    models.script("b", [Turn.final("ok")]).script("a", [Turn.final("ok")])

    response = await http.get(models.url + "/models")

    assert [m["id"] for m in response.json()["data"]] == ["a", "b"]


def test_tool_spec_and_estimate() -> None:
    assert tool_spec("f", "does f", {"type": "object"}) == {
        "type": "function",
        "function": {"name": "f", "description": "does f", "parameters": {"type": "object"}},
    }
    # Emoji are several tokens each: the estimate counts bytes, not characters.
    assert estimate_input_tokens([{"role": "user", "content": "🚀" * 100}], None) >= 400


# --- the tool server ----------------------------------------------------------------------------------------


async def test_flaky_fails_per_idempotency_key(http: httpx.AsyncClient, tools: ToolServer) -> None:
    async def status(key: str) -> int:
        return (await http.post(tools.url + "/flaky?times=2", json={}, headers={"Idempotency-Key": key})).status_code

    assert [await status("a"), await status("a"), await status("b"), await status("a"), await status("b")] == [
        503,
        503,
        503,
        200,
        503,
    ]
    assert await status("b") == 200
    assert len(tools.calls_to("/flaky")) == 6


async def test_ratelimit_sends_retry_after(http: httpx.AsyncClient, tools: ToolServer) -> None:
    url = tools.url + "/ratelimit?times=1&retry_after=7"
    first = await http.post(url, json={}, headers={"Idempotency-Key": "k"})
    second = await http.post(url, json={}, headers={"Idempotency-Key": "k"})

    assert (first.status_code, first.headers["retry-after"]) == (429, "7")
    assert second.status_code == 200


async def test_hang_does_not_block_other_requests(http: httpx.AsyncClient, tools: ToolServer) -> None:
    hanging = asyncio.create_task(http.post(tools.url + "/hang?seconds=1", json={}))
    await asyncio.sleep(0.1)
    started = time.monotonic()

    echoed = await http.post(tools.url + "/echo", json={"a": 1}, headers={"Idempotency-Key": "k1", "X-Trace": "t"})

    assert time.monotonic() - started < 0.5
    assert not hanging.done()
    assert echoed.json() == {
        "received": {"a": 1},
        "headers": {
            "idempotency-key": "k1",
            "x-trace": "t",
            "content-type": "application/json",
            "user-agent": echoed.json()["headers"]["user-agent"],
        },
    }
    assert (await hanging).status_code == 200


async def test_writes_are_recorded(http: httpx.AsyncClient, tools: ToolServer) -> None:
    for key in ("w1", "w1", "w2"):
        response = await http.post(tools.url + "/write", json={"amount": 5}, headers={"Idempotency-Key": key})
        assert response.json()["ok"] is True

    assert [(w.idempotency_key, w.n, w.body) for w in tools.writes] == [
        ("w1", 1, {"amount": 5}),
        ("w1", 2, {"amount": 5}),
        ("w2", 1, {"amount": 5}),
    ]


async def test_fail_huge_and_down(http: httpx.AsyncClient, tools: ToolServer) -> None:
    assert (await http.post(tools.url + "/fail")).status_code == 500
    assert (await http.post(tools.url + "/fail-400")).json()["error"]
    huge = await http.post(tools.url + "/huge?bytes=200000")
    assert huge.status_code == 200 and abs(len(huge.content) - 200_000) < 100 and huge.json()["data"][:3] == "xxx"

    tools.down = True
    assert (await http.post(tools.url + "/echo", json={})).status_code == 503
    tools.down = False
    assert (await http.post(tools.url + "/echo", json={})).status_code == 200
