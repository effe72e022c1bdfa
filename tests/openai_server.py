"""A local OpenAI-compatible HTTP server, so tests drive the real ``openai`` client.

The server speaks OpenAI's wire format over real HTTP on 127.0.0.1 (an
ephemeral port), standard library only. Tests script what it answers and read
back what it received::

    def test_reply(openai_server: FakeOpenAI) -> None:
        openai_server.reply("hello there")
        hi = [{"role": "user", "content": "hi"}]
        with openai.OpenAI(base_url=openai_server.base_url, api_key="k") as client:
            r = client.chat.completions.create(model="m", messages=hi)
        assert r.choices[0].message.content == "hello there"
        assert openai_server.requests[0].body["messages"][0]["content"] == "hi"

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain
JSON or, with ``"stream": true``, Server-Sent Events in chunked encoding, split
one chunk per word; tool calls stream as OpenAI's do, a chunk naming each call
by index, id and function name, then its arguments a word a chunk),
``POST /v1/responses`` (the Responses API, which the OpenAI Agents SDK's
default model calls: a ``response`` object whose ``output`` is one assistant
``message`` with an ``output_text`` part, or ``function_call`` items, after a
``reasoning`` item when ``reply_reasoning`` asks for one; with
``"stream": true``, its named events — ``response.created``, each item's
``output_item.added``, a delta per word, ``.done`` events, then
``response.completed``), ``GET /v1/models``; anything else is a 404 with an
OpenAI-style error body.

A chat request's ``messages`` must keep OpenAI's rules (``check_messages`` in
``tests/openai_rules.py``: roles, content and its parts, tool calls each
answered by the tool messages right after them), and a Responses request's
``input`` its pairing rules (``check_input``: every ``function_call_output``
after its ``function_call``, every ``function_call`` answered, each reasoning
item the fake replied right before the item it made after it). The fake keeps
no responses, so a ``previous_response_id`` is never found. A request that
breaks a rule is a 400 with the real API's error text, ``param`` and ``code``,
so the SDK raises ``openai.BadRequestError``; it is recorded and takes its
``delay`` and ``fail`` like any request, but no reply.

Scripted effects are taken by requests in arrival order, when they arrive (a
request that times out during its delay has still used up its reply). What a
request gets, in this order:

1. ``delay``: sleep first (any endpoint), so the client can time out;
2. ``fail``: an error status with ``{"error": {"message", "type", "param",
   "code"}}`` and ``retry-after-ms: 10``, which the SDK's backoff honours, so
   retries take milliseconds (any endpoint; a failed request consumes no reply);
3. the reply: ``refuse`` (chat and responses: ``content`` None and
   ``refusal`` set, or a ``refusal`` part), else ``reply_tool_calls`` (chat
   and responses: ``content`` None, ``tool_calls`` with ids ``call_<n>`` and
   ``finish_reason`` "tool_calls", or ``function_call`` items with
   ``call_id`` ``call_<n>`` and ``id`` ``fc_<n>``; the call ids are listed in
   ``tool_call_ids`` as they are replied), else ``empty_reply`` (``""``),
   else the next ``reply`` text, else ``"echo: <last user message>"`` (chat,
   responses) or ``"echo: <last 40 chars of the prompt>"`` (completions);
   and for responses, ``reply_reasoning`` puts a reasoning item first;
4. ``break_stream``: a streaming response stops after that many content (or
   tool call) chunks — delta events, for responses — and hangs up without the
   end of its chunked body (no final chunk, no ``[DONE]`` or
   ``response.completed``); the SDK raises ``openai.APIConnectionError``
   mid-iteration.

Usage: ``prompt_tokens`` (responses: ``input_tokens``) is
``prompt_tokens(body)`` when that attribute is set, else the number of
whitespace-separated words in all message contents (chat: strings and the
text parts of content lists; a null content has none; responses: the
``instructions``, message contents and string outputs of function calls) or
in the prompt (completions); ``completion_tokens`` (``output_tokens``) is the
number of words in the reply (the refusal; the called functions' names and
arguments; a reasoning summary, also counted as ``reasoning_tokens``).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import pytest

from .openai_rules import MessageRuleError, check_input, check_messages

__all__ = ["FakeOpenAI", "Recorded", "openai_server"]

CREATED = 1_700_000_000  # a fixed timestamp keeps responses deterministic
RETRY_AFTER_MS = "10"


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # the parsed JSON, or None when there was no (valid JSON) body


@dataclass
class _Plan:
    """How to answer one request, decided under the lock as it arrives."""

    number: int  # 1-based arrival order; names the request and the completion ids
    delay: float | None = None
    failure: tuple[int, str] | None = None
    text: str = ""
    refused: bool = False
    tool_calls: list[dict[str, Any]] | None = None  # the reply calls tools instead
    reasoning: str | None = None  # responses: a reasoning item's summary, before the reply
    cut: int | None = None  # break the stream after this many content chunks


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1, running until ``close()``."""

    def __init__(self, *, model: str = "fake-model") -> None:
        self.model = model  # the one model /v1/models lists
        self.requests: list[Recorded] = []
        self.tool_call_ids: list[str] = []  # the ids of the tool calls replied so far
        self.prompt_tokens: Callable[[dict[str, Any]], int] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._replies: deque[str] = deque()
        self._failures: deque[tuple[int, str]] = deque()
        self._delays: deque[float] = deque()
        self._breaks: deque[int] = deque()
        self._refusals: deque[str] = deque()
        self._tool_calls: deque[list[dict[str, Any]]] = deque()
        self._reasoning: deque[str] = deque()
        # The id of each reasoning item replied -> the id of the item made after it.
        self._reasoned: dict[str, str] = {}
        self._calls_made = 0  # numbers the tool call ids
        self._empty = 0
        self._server = _Server(self)
        port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        # A short poll interval: shutdown() waits up to one interval.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"FakeOpenAI:{port}",
            daemon=True,
        )
        self._thread.start()

    # -- scripting -----------------------------------------------------------

    def reply(self, *texts: str) -> None:
        """Queue reply texts, used in order by the next chat/completions requests."""
        with self._lock:
            self._replies.extend(texts)

    def fail(self, status: int, times: int = 1, *, message: str = "injected failure") -> None:
        """Answer the next ``times`` requests with HTTP ``status`` and an error body."""
        if not 400 <= status <= 599:
            raise ValueError(f"fail() needs an error status (400-599), got {status}")
        _check_times(times)
        with self._lock:
            self._failures.extend([(status, message)] * times)

    def delay(self, seconds: float, times: int = 1) -> None:
        """Make the next ``times`` requests wait ``seconds`` before answering."""
        if seconds < 0:
            raise ValueError(f"delay() needs seconds >= 0, got {seconds}")
        _check_times(times)
        with self._lock:
            self._delays.extend([seconds] * times)

    def break_stream(self, after_chunks: int) -> None:
        """Cut the next streaming response after ``after_chunks`` content chunks."""
        if after_chunks < 0:
            raise ValueError(f"break_stream() needs after_chunks >= 0, got {after_chunks}")
        with self._lock:
            self._breaks.append(after_chunks)

    def empty_reply(self, times: int = 1) -> None:
        """Make the next ``times`` replies empty strings."""
        _check_times(times)
        with self._lock:
            self._empty += times

    def refuse(self, text: str = "I can't help with that.") -> None:
        """Make the next chat or responses reply a refusal: ``content`` None,
        ``refusal`` ``text`` (responses: a message with one ``refusal`` part)."""
        with self._lock:
            self._refusals.append(text)

    def reply_tool_calls(self, *calls: tuple[str, str] | dict[str, Any]) -> list[str]:
        """Make the next chat or responses reply call tools, and return the
        ids it will carry.

        Each call is ``(name, arguments)``, the arguments a JSON string, or a
        dict ``{"name": ..., "arguments": ...}`` whose arguments may also be a
        value to encode as JSON. The chat reply has ``content`` None,
        ``tool_calls`` with ids ``call_<n>`` (numbered per server) and
        ``finish_reason`` "tool_calls"; the responses reply, ``function_call``
        items with those call ids as ``call_id``.
        """
        if not calls:
            raise ValueError("reply_tool_calls() needs at least one call")
        named = [_named_call(call) for call in calls]
        with self._lock:
            first = self._calls_made + 1
            self._calls_made += len(named)
            reply = [
                {"id": f"call_{first + k}", "type": "function", "function": function}
                for k, function in enumerate(named)
            ]
            self._tool_calls.append(reply)
        return [call["id"] for call in reply]

    def reply_reasoning(self, summary: str = "Thinking it over.") -> None:
        """Make the next responses reply reason first: its ``output`` starts
        with a ``reasoning`` item (id ``rs_<n>``, ``summary`` one
        ``summary_text``). From then on a request's ``input`` must keep that
        item and the one made after it together, as the API requires."""
        with self._lock:
            self._reasoning.append(summary)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Stop serving, drop open connections and wait for every handler thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()  # wakes delayed handlers, which then answer nothing
        self._server.shutdown()
        self._server.drop_connections()
        self._server.server_close()  # joins the handler threads
        self._thread.join()

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FakeOpenAI(base_url={self.base_url!r}, requests={len(self.requests)})"

    # -- used by the handler -------------------------------------------------

    def _receive(self, request: Recorded, *, kind: str | None, default: str) -> _Plan:
        """Record ``request`` and take its scripted effects, in arrival order.

        Only a well-formed generation request (``kind`` "chat", "responses"
        or "completion") that is not failed takes a reply text, and a stream
        break if it streams; so a request that times out during its delay
        still used up its reply.
        """
        with self._lock:
            self.requests.append(request)
            plan = _Plan(number=len(self.requests))
            if self._delays:
                plan.delay = self._delays.popleft()
            if self._failures:
                plan.failure = self._failures.popleft()
            elif kind is not None:
                self._take_reply(plan, kind, default=default)
                if request.body.get("stream") and self._breaks:
                    plan.cut = self._breaks.popleft()
            return plan

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; False when the server is closing meanwhile."""
        return not self._stopping.wait(seconds)

    def _take_reply(self, plan: _Plan, kind: str, *, default: str) -> None:
        """Set ``plan``'s reply from the scripts; the caller holds the lock.
        Refusals and tool calls are for chat and responses requests only,
        reasoning for responses requests."""
        chat = kind != "completion"
        if chat and self._refusals:
            plan.text, plan.refused = self._refusals.popleft(), True
        elif chat and self._tool_calls:
            plan.tool_calls = self._tool_calls.popleft()
            self.tool_call_ids.extend(call["id"] for call in plan.tool_calls)
        elif self._empty:
            self._empty -= 1
        elif self._replies:
            plan.text = self._replies.popleft()
        else:
            plan.text = default
        if kind == "responses" and self._reasoning:
            plan.reasoning = self._reasoning.popleft()
            first = _output_ids(plan)[0]
            self._reasoned[f"rs_{plan.number}"] = first

    def _reasoned_items(self) -> dict[str, str]:
        """The reasoning items replied so far, each with the item made after it."""
        with self._lock:
            return dict(self._reasoned)

    def _count_prompt(self, body: dict[str, Any], default: int) -> int:
        return self.prompt_tokens(body) if self.prompt_tokens is not None else default


def _check_times(times: int) -> None:
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")


def _named_call(call: tuple[str, str] | dict[str, Any]) -> dict[str, str]:
    """A scripted tool call as the reply's ``function``: its name and arguments."""
    name, arguments = (call["name"], call["arguments"]) if isinstance(call, dict) else call
    if isinstance(call, dict) and not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    if not (isinstance(name, str) and name and isinstance(arguments, str)):
        raise ValueError(f"a tool call needs a name and JSON arguments (str), got {call!r}")
    return {"name": name, "arguments": arguments}


def _text(content: Any) -> str:
    """The text of a valid message's content: a string, the text parts of a list, or ""."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content if part["type"] == "text")
    return ""  # None: an assistant message that called tools or refused


def _prompt(body: dict[str, Any]) -> str:
    prompt = body["prompt"]
    return prompt if isinstance(prompt, str) else " ".join(str(p) for p in prompt)


@dataclass(frozen=True)
class _Rejection:
    """Why a generation request is a 400: its error's message, param and code."""

    message: str
    param: str | None = None
    code: str | None = None


def _problem(kind: str | None, body: Any, reasoned: dict[str, str]) -> _Rejection | None:
    """Why a generation request's body is unusable (a 400), or None;
    ``reasoned`` as for :func:`check_input`."""
    if kind == "chat":
        if not (isinstance(body, dict) and "messages" in body):
            return _Rejection("'messages' is a required property")
        try:
            check_messages(body["messages"])
        except MessageRuleError as broken:
            return _Rejection(broken.message, broken.param, broken.code)
    if kind == "responses":
        return _responses_problem(body, reasoned)
    if kind == "completion" and not (isinstance(body, dict) and "prompt" in body):
        return _Rejection("'prompt' is a required property")
    return None


def _responses_problem(body: Any, reasoned: dict[str, str]) -> _Rejection | None:
    """Why a Responses API request's body is unusable (a 400), or None."""
    if not (isinstance(body, dict) and "input" in body):
        # Ours: the real API also takes a stored prompt or a previous response
        # instead, which this fake does not keep.
        return _Rejection(
            "Missing required parameter: 'input'.", "input", "missing_required_parameter"
        )
    previous = body.get("previous_response_id")
    if previous is not None:
        # This fake stores no response. github.com/maximhq/bifrost/issues/2441
        # (message and code; the param is our guess).
        return _Rejection(
            f"Previous response with id '{previous}' not found.",
            "previous_response_id",
            "previous_response_not_found",
        )
    try:
        check_input(body["input"], reasoned)
    except MessageRuleError as broken:
        return _Rejection(broken.message, broken.param, broken.code)
    return None


def _default_reply(kind: str, body: dict[str, Any]) -> str:
    if kind == "chat":
        users = [_text(m.get("content")) for m in body["messages"] if m.get("role") == "user"]
        return f"echo: {users[-1] if users else ''}"
    if kind == "responses":
        items = _input_items(body["input"])
        users = [_item_text(d) for d in items if d.get("role") == "user"]
        return f"echo: {users[-1] if users else ''}"
    return f"echo: {_prompt(body)[-40:]}"


def _input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A valid request's ``input`` as a list of items (a string is a user message)."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


def _item_text(item: dict[str, Any]) -> str:
    """The text of an input item: a message's content (a string, or its
    ``input_text``/``output_text`` parts), a function call output's string."""
    if item.get("type") == "function_call_output":
        output = item.get("output")
        return output if isinstance(output, str) else ""
    if item.get("type", "message") != "message":
        return ""
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(t for t in texts if isinstance(t, str))
    return ""


def _words(text: str) -> int:
    return len(text.split())


def _pieces(text: str) -> list[str]:
    """Split ``text`` into stream chunks, one per word with its trailing space."""
    return re.findall(r"\s*\S+\s*", text) or [text]


def _error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind, default_code = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        404: ("invalid_request_error", None),
        429: ("requests", "rate_limit_exceeded"),
    }.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    code = default_code if code is None else code
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_GENERATORS = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/responses"): "responses",
    ("POST", "/v1/completions"): "completion",
}


class _Server(ThreadingHTTPServer):
    # Non-daemon handler threads, joined by server_close(): nothing outlives close().
    daemon_threads = False
    block_on_close = True

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Unblock handlers waiting on idle keep-alive connections."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (timeout, broken stream, close) is routine here.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as OpenAI serves
    server: _Server
    timeout = 60  # an idle connection must not pin a thread forever
    _request_id = "req_0"

    def setup(self) -> None:
        super().setup()
        # Headers, body and SSE events go out as separate small writes; without
        # this, Nagle plus delayed ACKs add ~40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet

    def _dispatch(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(raw) if raw else None
        headers = {k.lower(): v for k, v in self.headers.items()}
        route = (self.command, urlsplit(self.path).path.rstrip("/"))
        kind = _GENERATORS.get(route)
        problem = _problem(kind, body, fake._reasoned_items() if kind == "responses" else {})
        plan = fake._receive(
            Recorded(self.command, self.path, headers, body),
            kind=None if problem else kind,
            default=_default_reply(kind, body) if kind and not problem else "",
        )
        self._request_id = f"req_{plan.number}"
        try:
            if plan.delay is not None and not fake._wait(plan.delay):
                self.close_connection = True  # closing down: answer nothing
                return
            if plan.failure is not None:
                self._send_error(*plan.failure)
            elif route == ("GET", "/v1/models"):
                self._models()
            elif kind is None:
                self._send_error(404, f"Invalid URL ({self.command} {self.path})")
            elif problem:
                self._send_error(400, problem.message, param=problem.param, code=problem.code)
            elif kind == "chat":
                self._chat(body, plan)
            elif kind == "responses":
                self._responses(body, plan)
            else:
                self._completion(body, plan)
        except OSError:
            self.close_connection = True  # the client went away
        except Exception as exc:
            # A bug in this fake: fail loudly, and tell the SDK not to retry it.
            traceback.print_exc()
            self._send_error(500, f"FakeOpenAI bug: {exc!r}", retry=False)

    # -- endpoints -----------------------------------------------------------

    def _models(self) -> None:
        model = {
            "id": self.server.fake.model,
            "object": "model",
            "created": CREATED,
            "owned_by": "tokenmem-tests",
        }
        self._send_json(200, {"object": "list", "data": [model]})

    def _chat(self, body: dict[str, Any], plan: _Plan) -> None:
        fake = self.server.fake
        text, refused, calls = plan.text, plan.refused, plan.tool_calls
        prompt = sum(_words(_text(m.get("content"))) for m in body["messages"])
        if calls is None:
            completion, finish = _words(text), "stop"
        else:
            said = " ".join(f"{c['function']['name']} {c['function']['arguments']}" for c in calls)
            completion, finish = _words(said), "tool_calls"
        usage = _usage(fake._count_prompt(body, prompt), completion)
        base = {
            "id": f"chatcmpl-{plan.number}",
            "created": CREATED,
            "model": body.get("model", fake.model),
        }
        field = "refusal" if refused else "content"
        if not body.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if refused or calls else text,
                "refusal": text if refused else None,
            }
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            self._send_json(
                200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
            return

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "object": "chat.completion.chunk", "choices": [choice]}

        if calls is None:
            pieces = [{field: p} for p in _pieces(text)]
            pieces[0] = {"role": "assistant", **pieces[0]}  # the role rides on the first chunk
        else:
            pieces = _call_deltas(calls)
            pieces[0] = {"role": "assistant", "content": None, **pieces[0]}
        events = [chunk(d, None) for d in pieces]
        events.append(chunk({}, finish))
        if _include_usage(body):
            events.append(
                {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            )
        self._stream(events, cut_at=_cut_at(plan.cut, len(pieces)))

    def _responses(self, body: dict[str, Any], plan: _Plan) -> None:
        fake = self.server.fake
        items = _input_items(body["input"])
        instructions = body.get("instructions")
        prompt = sum(_words(_item_text(d)) for d in items)
        prompt += _words(instructions) if isinstance(instructions, str) else 0
        if plan.tool_calls is None:
            output, completion = [_output_message(plan)], _words(plan.text)
        else:
            output = [_function_call_item(call) for call in plan.tool_calls]
            said = " ".join(f"{d['name']} {d['arguments']}" for d in output)
            completion = _words(said)
        reasoning = 0
        if plan.reasoning is not None:
            summary = [{"type": "summary_text", "text": plan.reasoning}]
            output.insert(0, {"id": f"rs_{plan.number}", "type": "reasoning", "summary": summary})
            reasoning = _words(plan.reasoning)
            completion += reasoning
        p = fake._count_prompt(body, prompt)
        usage = {
            "input_tokens": p,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": p + completion,
        }
        done = _response(body, plan.number, fake.model, output=output, usage=usage)
        if not body.get("stream"):
            self._send_json(200, done)
            return
        started = {**done, "status": "in_progress", "output": [], "usage": None}
        started["completed_at"] = None
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
        ]
        deltas: list[int] = []  # where the content chunks are among the events
        for index, item in enumerate(output):
            for event in _item_events(index, item):
                if event["type"].endswith(".delta"):
                    deltas.append(len(events))
                events.append(event)
        events.append({"type": "response.completed", "response": done})
        for number, event in enumerate(events):
            event["sequence_number"] = number
        cut_at = None
        if plan.cut is not None:
            cut_at = deltas[min(plan.cut, len(deltas)) - 1] + 1 if plan.cut and deltas else 0
        self._stream(events, cut_at=cut_at, named=True)

    def _completion(self, body: dict[str, Any], plan: _Plan) -> None:
        fake = self.server.fake
        text = plan.text
        usage = _usage(fake._count_prompt(body, _words(_prompt(body))), _words(text))
        base = {
            "id": f"cmpl-{plan.number}",
            "object": "text_completion",
            "created": CREATED,
            "model": body.get("model", fake.model),
        }

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if not body.get("stream"):
            self._send_json(200, {**base, "choices": [choice(text, "stop")], "usage": usage})
            return
        pieces = _pieces(text)
        events = [{**base, "choices": [choice(p, None)]} for p in pieces]
        events.append({**base, "choices": [choice("", "stop")]})
        if _include_usage(body):
            events.append({**base, "choices": [], "usage": usage})
        self._stream(events, cut_at=_cut_at(plan.cut, len(pieces)))

    # -- writing -------------------------------------------------------------

    def _send_json(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", self._request_id)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry: bool = True,
    ) -> None:
        headers = {"retry-after-ms": RETRY_AFTER_MS} if retry else {"x-should-retry": "false"}
        self._send_json(status, _error_body(status, message, param, code), headers)

    def _stream(
        self, events: list[dict[str, Any]], *, cut_at: int | None, named: bool = False
    ) -> None:
        """Send ``events`` as Server-Sent Events, or only the first ``cut_at``
        and hang up. ``named``: the Responses API's events, each with an
        ``event:`` line (its type) and no ``[DONE]`` at the end."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", self._request_id)
        self.end_headers()
        for event in events[:cut_at]:
            name = f"event: {event['type']}\n" if named else ""
            self._write_chunk(f"{name}data: {json.dumps(event)}\n\n")
        if cut_at is not None:
            # Part of the body, then a hang-up: the chunked body is left incomplete.
            self.close_connection = True
            return
        if not named:
            self._write_chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def _call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stream deltas for tool calls, as OpenAI sends them.

    Per call, one delta with its index, id and name (arguments ""), then one
    per word of its arguments; the SDK joins them by index.
    """
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        head = {"index": index, "id": call["id"], "type": "function"}
        deltas.append({"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]})
        deltas += [
            {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
            for piece in _pieces(arguments)
            if piece
        ]
    return deltas


def _cut_at(cut: int | None, content_chunks: int) -> int | None:
    """How many events of a chat or completion stream to send before a break:
    its content chunks come first."""
    return None if cut is None else min(cut, content_chunks)


def _response(
    body: dict[str, Any],
    number: int,
    model: str,
    *,
    output: list[dict[str, Any]],
    usage: dict[str, Any],
) -> dict[str, Any]:
    """A completed Responses API ``response`` object, the request's settings echoed."""
    return {
        "id": f"resp_{number}",
        "object": "response",
        "created_at": CREATED,
        "completed_at": CREATED,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model", model),
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


def _output_message(plan: _Plan) -> dict[str, Any]:
    """The assistant's message: its text, or its refusal."""
    part: dict[str, Any]
    if plan.refused:
        part = {"type": "refusal", "refusal": plan.text}
    else:
        part = {"type": "output_text", "text": plan.text, "annotations": [], "logprobs": []}
    return {
        "id": f"msg_{plan.number}",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }


def _output_ids(plan: _Plan) -> list[str]:
    """The ids of the items a responses reply will make (reasoning aside)."""
    if plan.tool_calls is None:
        return [f"msg_{plan.number}"]
    return [_function_call_item(call)["id"] for call in plan.tool_calls]


def _function_call_item(call: dict[str, Any]) -> dict[str, Any]:
    """A scripted tool call as a Responses API ``function_call`` output item."""
    number = call["id"].removeprefix("call_")
    return {
        "id": f"fc_{number}",
        "type": "function_call",
        "status": "completed",
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
    }


def _item_events(index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    """The stream events of one output item, as the Responses API sends them:
    added, its content (a delta per word) and done."""
    at = {"output_index": index}
    if item["type"] == "reasoning":  # its summary comes whole, with its done event
        events: list[dict[str, Any]] = [
            {"type": "response.output_item.added", **at, "item": {**item, "summary": []}}
        ]
    elif item["type"] == "function_call":
        arguments = item["arguments"]
        events = [
            {
                "type": "response.output_item.added",
                **at,
                "item": {**item, "arguments": "", "status": "in_progress"},
            }
        ]
        events += [
            {
                "type": "response.function_call_arguments.delta",
                **at,
                "item_id": item["id"],
                "delta": piece,
            }
            for piece in _pieces(arguments)
            if piece
        ]
        events.append(
            {
                "type": "response.function_call_arguments.done",
                **at,
                "item_id": item["id"],
                "name": item["name"],
                "arguments": arguments,
            }
        )
    else:
        part = item["content"][0]
        refused = part["type"] == "refusal"
        field, kind = ("refusal", "refusal") if refused else ("text", "output_text")
        where = {**at, "item_id": item["id"], "content_index": 0}
        logprobs: dict[str, list[Any]] = {} if refused else {"logprobs": []}
        events = [
            {
                "type": "response.output_item.added",
                **at,
                "item": {**item, "status": "in_progress", "content": []},
            },
            {"type": "response.content_part.added", **where, "part": {**part, field: ""}},
        ]
        events += [
            {"type": f"response.{kind}.delta", **where, "delta": piece, **logprobs}
            for piece in _pieces(part[field])
        ]
        events += [
            {"type": f"response.{kind}.done", **where, field: part[field], **logprobs},
            {"type": "response.content_part.done", **where, "part": part},
        ]
    events.append({"type": "response.output_item.done", **at, "item": item})
    return events


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAI]:
    """A running :class:`FakeOpenAI`, closed after the test."""
    with FakeOpenAI() as server:
        yield server
