#!/usr/bin/env python3
"""Test MCP server (Streamable HTTP) for the mcp-worker integration tests.

Runs unchanged under the official MCP Python SDK 1.x (`mcp==1.30.0`, FastMCP)
and 2.x (`mcp==2.3.0`, MCPServer); the SDK generation is detected by import.

    server.py --port P [--host 127.0.0.1] [--json-response] --log FILE [--allowed-host NAME]
              [--page-size N] [--list-ttl-ms MS] [--list-scope public|private]

MCP is served at `/mcp`, stateless. Every HTTP request is appended to FILE as
one JSON line (flushed at once) before the SDK handles it: `method`, `path`,
`x_qlik_access_token`, `authorization`, `accept`, `mcp_method` (the JSON-RPC
method), `tool` and `arguments` (of a `tools/call`), `cursor` (`params.cursor`
of a `tools/list`); a field that does not apply is null.

Tools, in this (stable) order, with their MCP annotations:

    qlik_whoami          title "Who am I"; readOnlyHint, idempotentHint. Returns
                         the X-Qlik-Access-Token and Authorization headers received.
    echo(text)           readOnlyHint. Returns `text`.
    qlik_fail            the result carries isError: true.
    count_job(job_id)    readOnlyHint=false, destructiveHint=false,
                         idempotentHint=false. Returns "ok".
    sleep(seconds)       returns "slept" after `seconds`.
    flaky(job_id, mode, times)   returns "ok" (see below).
    qlik_delete_note(note)       readOnlyHint=false, destructiveHint=true.
                         Returns "deleted" (nothing is stored, nothing deleted).
    qlik_for_<sha8>      only for a `tools/list` carrying a non-empty
                         X-Qlik-Access-Token: see "Token-dependent tool list".

Token-dependent tool list. A `tools/list` request whose X-Qlik-Access-Token
header is non-empty lists, after the tools above, one more tool named
`qlik_for_` + the first 8 hex digits of sha256(the header's bytes, i.e. the
token as UTF-8): e.g. token "abc" gives `qlik_for_ba7816bf`. Without the header
it is absent, so two tokens see two different lists. Calling it with the same
token returns "ok"; with another token (or none) it is an unknown tool
(isError: true). Both SDKs do this through their own tool-list mechanism: the
`tools/list` handler of the low-level server is replaced by one that reads the
request's headers from the request context (mcp<2: `_mcp_server.list_tools()`;
mcp>=2: `add_request_handler("tools/list", ...)`), and `call_tool` is
overridden for the token's tool; no bytes are rewritten in middleware.

Paging (`--page-size N`). Without it `tools/list` answers every tool in one
page. With it, N tools per page in the order above, with an opaque
`nextCursor` (base64url of "offset:<index>") on every page but the last; a
request with that cursor gets the next page. A cursor this server did not
issue (not base64url of "offset:<index>" with the index inside the list) is
answered with the JSON-RPC error -32602 (invalid params), with or without
`--page-size` (mcp>=2 sends it with HTTP 400 on protocol 2026-07-28, HTTP 200
on older versions; mcp<2 with HTTP 200). (Under mcp<2 the SDK lists tools internally, without a request,
before a `tools/call` of a tool it has not seen listed; that internal listing
is always the whole list, so validation finds every tool whatever the paging.)

Caching hints (`--list-ttl-ms MS`, `--list-scope public|private`; protocol
2026-07-28). Given either, the `tools/list` result carries `ttlMs` (default 0)
and `cacheScope` (default "private"). mcp>=2 does it through the SDK
(`MCPServer(cache_hints={"tools/list": CacheHint(...)})`), and only on the
2026-07-28 wire: answering an older protocol version the SDK leaves both out.
Without the flags mcp>=2 still sends its own default, `"ttlMs": 0,
"cacheScope": "private"` (on 2026-07-28). mcp<2 knows neither field, but its
result types accept extra fields: with a flag given the server adds both to
the result as such, at every protocol version; without the flags it sends
neither, as before.

`flaky` exercises the worker's retry policy. FaultMiddleware (inside the request
log, so every attempt is still logged) counts the `tools/call` POSTs of `flaky`
per `job_id` in memory (a restart resets the counts); attempts 1..=`times` get
the transport fault named by `mode` instead of reaching the SDK, later attempts
reach it and the tool answers "ok" (a large `times`, e.g. 1000, fails always):

    "500"         HTTP 500, text/plain body.
    "hang"        no response at all until the client disconnects.
    "drop"        200 application/json whose Content-Length promises more than
                  is sent: part of the body, then the server closes the TCP
                  connection (the client sees a truncated body).
    "broken_sse"  200 text/event-stream carrying one `message` event whose data
                  is a truncated JSON-RPC response to the request's id, then a
                  clean end of stream.

Any other `mode` is not a fault: the call reaches the tool at once.

The same middleware refuses credentials as Qlik's MCP server would: a `tools/call`
whose `X-Qlik-Access-Token` starts with `refused-`, or of the tool `qlik_refused`
whatever its token, gets HTTP 401 (the token was revoked before its expiry); one
of the tool `qlik_forbidden` gets HTTP 403 with an OAuth-style JSON error whose
`error_description` says the role lacks the "Qlik MCP: Allowed" permission.
Only `tools/call` is refused: a `tools/list` with a `refused-` token is answered
by the SDK as any other (and lists that token's `qlik_for_` tool).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import os
import re
import sys
from typing import Any

import mcp.types as mcp_types
import uvicorn

try:  # mcp >= 2
    from mcp.server.caching import CacheHint
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.server.mcpserver.tools import ToolManager
    from mcp.shared.exceptions import MCPError

    SDK_MAJOR = 2
    _SdkServer: Any = MCPServer
except ImportError:  # mcp < 2
    from mcp.server.fastmcp import Context, FastMCP
    from mcp.server.fastmcp.exceptions import ToolError
    from mcp.server.fastmcp.tools import ToolManager
    from mcp.shared.exceptions import McpError

    SDK_MAJOR = 1
    _SdkServer = FastMCP

from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ListToolsResult, ToolAnnotations


def _request_headers(ctx: Context) -> Any:
    """Headers of the HTTP request that carried the current MCP message (or None)."""
    if SDK_MAJOR >= 2:
        return ctx.headers
    request = getattr(ctx.request_context, "request", None)
    return getattr(request, "headers", None)


def _header(headers: Any, name: str) -> str | None:
    if headers is None:
        return None
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


TOKEN_TOOL_PREFIX = "qlik_for_"
# The token tool is registered once under this name in a ToolManager of its own
# (never listed as such) and listed/called under the token's name.
_TOKEN_TOOL_TEMPLATE = "qlik_for_token"


def token_tool_name(token: str) -> str:
    """`qlik_for_` + the first 8 hex digits of sha256 of the token's UTF-8 bytes."""
    try:
        # Starlette decodes header values as latin-1: this gives back the bytes
        # received, which are the token's UTF-8 (and its ASCII, for any real token).
        raw = token.encode("latin-1")
    except UnicodeEncodeError:
        raw = token.encode("utf-8")
    return TOKEN_TOOL_PREFIX + hashlib.sha256(raw).hexdigest()[:8]


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode("ascii")).decode("ascii")


def _invalid_params(message: str) -> Exception:
    if SDK_MAJOR >= 2:
        return MCPError(code=mcp_types.INVALID_PARAMS, message=message)
    return McpError(mcp_types.ErrorData(code=mcp_types.INVALID_PARAMS, message=message))


def _decode_cursor(cursor: Any, count: int) -> int:
    """The offset a cursor of ours names; JSON-RPC -32602 for anything else."""
    try:
        text = base64.b64decode(str(cursor).encode("ascii"), altchars=b"-_", validate=True).decode("ascii")
    except (UnicodeError, binascii.Error, ValueError):
        text = ""
    match = re.fullmatch(r"offset:(0|[1-9][0-9]{0,8})", text)
    if match is None or int(match.group(1)) >= count:
        raise _invalid_params(f"Invalid cursor: {cursor!r}")
    return int(match.group(1))


class ToolListServer(_SdkServer):  # type: ignore[misc, valid-type]
    """The SDK's server (FastMCP or MCPServer) with this test server's `tools/list`.

    The list depends on the request's X-Qlik-Access-Token and is paged by
    `page_size` (see the module doc). It replaces the low-level server's
    `tools/list` handler through the SDK's own registration, so the SDK still
    frames, validates and caches (mcp>=2: `cache_hints`) the result.
    """

    def __init__(self, *args: Any, page_size: int | None = None, list_hint: dict | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.page_size = page_size
        # mcp<2 only: extra result fields {"ttlMs", "cacheScope"} (mcp>=2 uses cache_hints).
        self.list_hint = list_hint or {}
        self.token_tools = ToolManager()

        def qlik_for_token() -> str:
            """Visible only to the holder of this token; returns "ok"."""
            return "ok"

        self.token_tools.add_tool(
            qlik_for_token,
            name=_TOKEN_TOOL_TEMPLATE,
            description="Visible only to the holder of this token",
            annotations=ToolAnnotations(readOnlyHint=True, idempotentHint=True),
        )

        if SDK_MAJOR >= 2:

            async def list_tools_v2(ctx: Any, params: Any) -> ListToolsResult:
                headers = getattr(getattr(ctx, "request", None), "headers", None)
                tools, next_cursor = await self.tools_page(headers, getattr(params, "cursor", None))
                # ttl_ms/cache_scope left unset: the SDK fills them from cache_hints.
                return ListToolsResult(tools=tools, next_cursor=next_cursor)

            self._lowlevel_server.add_request_handler("tools/list", mcp_types.PaginatedRequestParams, list_tools_v2)
        else:

            async def list_tools_v1(req: mcp_types.ListToolsRequest) -> ListToolsResult:
                request = getattr(self._mcp_server.request_context, "request", None)
                headers = getattr(request, "headers", None)
                if req is None:
                    # The SDK's own listing before a tools/call of a tool it has not
                    # seen (to validate its output): it wants every tool, unpaged.
                    tools = await self.all_tools(headers)
                    return ListToolsResult(tools=tools)
                cursor = req.params.cursor if req.params is not None else None
                tools, next_cursor = await self.tools_page(headers, cursor)
                return ListToolsResult(tools=tools, nextCursor=next_cursor, **self.list_hint)

            self._mcp_server.list_tools()(list_tools_v1)

    async def all_tools(self, headers: Any) -> list[Any]:
        """Every tool, as the SDK lists them, then the token's tool if there is a token."""
        tools = list(await self.list_tools())
        token = _header(headers, "x-qlik-access-token")
        if token:
            info = self.token_tools.get_tool(_TOKEN_TOOL_TEMPLATE)
            # camelCase keys: field names in mcp<2, aliases in mcp>=2.
            tools.append(
                mcp_types.Tool.model_validate(
                    {
                        "name": token_tool_name(token),
                        "title": info.title,
                        "description": info.description,
                        "inputSchema": info.parameters,
                        "outputSchema": info.output_schema,
                        "annotations": info.annotations,
                    }
                )
            )
        return tools

    async def tools_page(self, headers: Any, cursor: Any) -> tuple[list[Any], str | None]:
        """The page of tools `cursor` names (the first without one), and the next page's cursor."""
        tools = await self.all_tools(headers)
        start = 0 if cursor is None else _decode_cursor(cursor, len(tools))
        if self.page_size is None:
            return tools[start:], None
        end = start + self.page_size
        return tools[start:end], (_encode_cursor(end) if end < len(tools) else None)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        """The SDK's call_tool, plus the tool of the request's token (see the module doc)."""
        # mcp>=2 passes the context; mcp<2 has its own for the current request.
        ctx = self.get_context() if SDK_MAJOR < 2 else context
        if ctx is not None and name.startswith(TOKEN_TOOL_PREFIX):
            token = _header(_request_headers(ctx), "x-qlik-access-token")
            if token and name == token_tool_name(token):
                return await self.token_tools.call_tool(_TOKEN_TOOL_TEMPLATE, arguments, ctx, convert_result=True)
        if SDK_MAJOR >= 2:
            return await super().call_tool(name, arguments, context)
        return await super().call_tool(name, arguments)


def build_server(args: argparse.Namespace) -> Any:
    # Host-header (DNS-rebinding) protection: the SDK turns it on for loopback
    # hosts and answers 421 to any other Host; keep it, but list the loopback
    # names explicitly so `127.0.0.1:<port>` / `localhost:<port>` always pass.
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", f"{args.host}:*"] + [f"{h}:*" for h in args.allowed_host],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )
    hinted = args.list_ttl_ms is not None or args.list_scope is not None
    ttl_ms = args.list_ttl_ms if args.list_ttl_ms is not None else 0
    scope = args.list_scope if args.list_scope is not None else "private"
    if SDK_MAJOR >= 2:
        extra: dict[str, Any] = {}
        if hinted:  # else the SDK's own default (ttlMs 0, private), unchanged
            extra["cache_hints"] = {"tools/list": CacheHint(ttl_ms=ttl_ms, scope=scope)}
        server = ToolListServer("mcp-worker-test-server", log_level="WARNING", page_size=args.page_size, **extra)
    else:
        server = ToolListServer(
            "mcp-worker-test-server",
            host=args.host,
            port=args.port,
            stateless_http=True,
            json_response=args.json_response,
            transport_security=security,
            log_level="WARNING",
            page_size=args.page_size,
            list_hint={"ttlMs": ttl_ms, "cacheScope": scope} if hinted else None,
        )

    @server.tool(title="Who am I", annotations=ToolAnnotations(readOnlyHint=True, idempotentHint=True))
    def qlik_whoami(ctx: Context) -> dict[str, Any]:
        """Return the X-Qlik-Access-Token and Authorization headers the server received."""
        headers = _request_headers(ctx)
        return {
            "token": _header(headers, "x-qlik-access-token"),
            "authorization": _header(headers, "authorization"),
        }

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def echo(text: str) -> str:
        """Return the given text."""
        return text

    @server.tool()
    def qlik_fail() -> str:
        """Always fails (the result carries isError: true)."""
        # ToolError: both SDKs answer isError=true with this message (2.x hides the
        # message of any other exception and logs a traceback).
        raise ToolError("qlik_fail: deliberate tool failure")

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False))
    def count_job(job_id: str) -> str:
        """Return "ok"; tests count executions per job_id via the request log."""
        return "ok"

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Sleep for the given number of seconds, then return "slept"."""
        await asyncio.sleep(seconds)
        return "slept"

    @server.tool()
    def flaky(job_id: str, mode: str, times: int) -> str:
        """Return "ok" once the first `times` calls of `job_id` have failed with fault `mode`.

        The faults ("500", "hang", "drop", "broken_sse") are injected by FaultMiddleware
        before the SDK sees the request; only the calls that get through land here.
        """
        return "ok"

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True))
    def qlik_delete_note(note: str) -> str:
        """Delete the given note; returns "deleted" (nothing is stored: a destructive tool to list)."""
        return "deleted"

    if SDK_MAJOR >= 2:
        app = server.streamable_http_app(
            streamable_http_path="/mcp",
            json_response=args.json_response,
            stateless_http=True,
            transport_security=security,
            host=args.host,
        )
    else:
        app = server.streamable_http_app()
    return app


async def _read_body(receive: Any) -> tuple[list[dict], bytes]:
    """Read a request body to its end; return the messages read (to replay them) and the body."""
    buffered: list[dict] = []
    body = b""
    while True:
        message = await receive()
        buffered.append(message)
        if message["type"] != "http.request":
            break  # e.g. http.disconnect
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    return buffered, body


def _replaying(buffered: list[dict], receive: Any) -> Any:
    """A `receive` that yields the already-read messages first, then the live ones."""

    async def replay() -> dict:
        if buffered:
            return buffered.pop(0)
        return await receive()

    return replay


class RequestLogMiddleware:
    """Pure ASGI middleware: log one JSON line per HTTP request, replay the body downstream."""

    def __init__(self, app: Any, log_path: str) -> None:
        self.app = app
        self.log_file = open(log_path, "a", encoding="utf-8", buffering=1)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        buffered: list[dict] = []
        body = b""
        if scope["method"] == "POST":
            buffered, body = await _read_body(receive)

        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", []):
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value

        mcp_method = tool = arguments = cursor = None
        if body:
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if isinstance(payload, dict):
                mcp_method = payload.get("method")
                params = payload.get("params")
                if mcp_method == "tools/call" and isinstance(params, dict):
                    tool = params.get("name")
                    arguments = params.get("arguments")
                if mcp_method == "tools/list" and isinstance(params, dict):
                    cursor = params.get("cursor")

        record = {
            "method": scope["method"],
            "path": scope.get("path"),
            "query": scope.get("query_string", b"").decode("latin-1"),
            "x_qlik_access_token": headers.get("x-qlik-access-token"),
            "authorization": headers.get("authorization"),
            "accept": headers.get("accept"),
            "mcp_method": mcp_method,
            "tool": tool,
            "arguments": arguments,
            "cursor": cursor,
        }
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

        await self.app(scope, _replaying(buffered, receive), send)


FAULT_MODES = ("500", "hang", "drop", "broken_sse")


def _tools_call(body: bytes) -> dict | None:
    """The JSON-RPC message in `body` if it is a tools/call request, else None."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("method") != "tools/call":
        return None
    return payload


def _refusal(scope: dict, body: bytes) -> tuple[int, dict] | None:
    """(status, JSON body) when a tools/call carries a token this server refuses."""
    token = ""
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-qlik-access-token":
            token = value.decode("latin-1")
    payload = _tools_call(body)
    if payload is None:
        return None
    params = payload.get("params")
    tool = params.get("name") if isinstance(params, dict) else None
    if token.startswith("refused-") or tool == "qlik_refused":
        return 401, {"error": "invalid_token", "error_description": "The access token is revoked"}
    if tool == "qlik_forbidden":
        description = "Access denied: the user's role lacks the \"Qlik MCP: Allowed\" permission"
        return 403, {"error": "forbidden", "error_description": description}
    return None


class FaultMiddleware:
    """Pure ASGI middleware: fail the first `times` `flaky` calls of each job_id (see the module doc).

    It sits between RequestLogMiddleware and the SDK app: every attempt is logged,
    and a faulted attempt never reaches the SDK (no session, no tool run).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        # job_id -> `flaky` calls seen so far. One event loop and no await between
        # read and write, so concurrent attempts cannot both take the same number.
        self.attempts: dict[str, int] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return

        buffered, body = await _read_body(receive)
        replay = _replaying(buffered, receive)
        refusal = _refusal(scope, body)
        if refusal is not None:
            status, payload = refusal
            text = json.dumps(payload).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(text)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": text})
            return
        fault = self._fault(body)
        if fault is None:
            await self.app(scope, replay, send)
            return

        mode, request_id = fault
        if mode == "500":
            text = b"flaky: injected HTTP 500\n"
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(text)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": text})
        elif mode == "hang":
            # Answer nothing; wait on receive() (not sleep) so a client that gives up
            # ends this task: the body is fully read, so uvicorn's next message is
            # http.disconnect. Only this request's task waits; the loop stays free.
            while (await replay())["type"] != "http.disconnect":
                pass
            # Returning unanswered after a disconnect is silent in uvicorn. (A client
            # still waiting at SIGTERM gets uvicorn's own 500 once the graceful
            # shutdown timeout cancels this task.)
        elif mode == "drop":
            partial = b'{"jsonrpc": "2.0", "id": ' + json.dumps(request_id).encode() + b', "result": {"con'
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(partial) + 1000).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": partial, "more_body": True})
            # Return with the response incomplete: uvicorn then closes the transport
            # (its queued bytes are flushed first, so the client gets the headers and
            # the partial body, then EOF short of Content-Length) and logs one line,
            # "ASGI callable returned without completing response." Raising would do
            # the same but print a traceback per attempt into the test output.
        else:  # "broken_sse"
            # A well-framed event (the blank line dispatches it) whose data is a
            # truncated response to this very request id, then a clean end of stream:
            # the client matches the id only by parsing, which fails, and then EOF.
            event = (
                b"event: message\ndata: "
                + b'{"jsonrpc": "2.0", "id": '
                + json.dumps(request_id).encode()
                + b', "result": {\n\n'
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
                }
            )
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _fault(self, body: bytes) -> tuple[str, Any] | None:
        """Count a `flaky` tools/call; return (mode, request id) if this attempt is to fail."""
        payload = _tools_call(body)
        if payload is None:
            return None
        params = payload.get("params")
        if not isinstance(params, dict) or params.get("name") != "flaky":
            return None
        arguments = params.get("arguments")
        if not isinstance(arguments, dict):
            return None
        job_id, mode, times = arguments.get("job_id"), arguments.get("mode"), arguments.get("times")
        # Malformed arguments pass through untouched and uncounted: the SDK answers
        # its own validation error, which is what a test sending them wants to see.
        if not isinstance(job_id, str) or not isinstance(times, int) or isinstance(times, bool):
            return None
        attempt = self.attempts.get(job_id, 0) + 1
        self.attempts[job_id] = attempt
        if mode not in FAULT_MODES or attempt > times:
            return None
        return mode, payload.get("id")



def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--json-response", action="store_true", help="answer application/json instead of SSE")
    parser.add_argument("--log", required=True, help="append one JSON line per HTTP request to this file")
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="another Host header name to accept (e.g. a compose service name); repeatable",
    )
    parser.add_argument(
        "--page-size",
        type=_positive_int,
        default=None,
        help="answer tools/list N tools per page, with nextCursor (default: one page)",
    )
    parser.add_argument(
        "--list-ttl-ms",
        type=_non_negative_int,
        default=None,
        help="ttlMs of the tools/list result (protocol 2026-07-28; default: the SDK's)",
    )
    parser.add_argument(
        "--list-scope",
        choices=("public", "private"),
        default=None,
        help="cacheScope of the tools/list result (protocol 2026-07-28; default: the SDK's)",
    )
    args = parser.parse_args()

    log_dir = os.path.dirname(os.path.abspath(args.log))
    os.makedirs(log_dir, exist_ok=True)

    # FaultMiddleware inside the log: faulted `flaky` attempts are logged too.
    app = RequestLogMiddleware(FaultMiddleware(build_server(args)), args.log)
    mode = "json" if args.json_response else "sse"
    print(
        f"mcp test server: sdk v{SDK_MAJOR}, {mode}, http://{args.host}:{args.port}/mcp, log {args.log}",
        file=sys.stderr,
        flush=True,
    )
    # lifespan="on": the Starlette app's lifespan starts the SDK session manager.
    # timeout_graceful_shutdown: SIGTERM ends the process within seconds even while a
    # `sleep` call or an SSE stream is still open.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
