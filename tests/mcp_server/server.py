#!/usr/bin/env python3
"""Test MCP server (Streamable HTTP) for the mcp-worker integration tests.

Runs unchanged under the official MCP Python SDK 1.x (`mcp==1.30.0`, FastMCP)
and 2.x (`mcp==2.3.0`, MCPServer); the SDK generation is detected by import.

    server.py --port P [--host 127.0.0.1] [--json-response] --log FILE [--allowed-host NAME]

MCP is served at `/mcp`, stateless. Every HTTP request is appended to FILE as
one JSON line (flushed at once) before the SDK handles it.

Tools: `qlik_whoami`, `echo(text)`, `qlik_fail` (isError: true), `count_job(job_id)`
("ok"), `sleep(seconds)` and `flaky(job_id, mode, times)` ("ok").

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import uvicorn

try:  # mcp >= 2
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    SDK_MAJOR = 2
except ImportError:  # mcp < 2
    from mcp.server.fastmcp import Context, FastMCP
    from mcp.server.fastmcp.exceptions import ToolError

    SDK_MAJOR = 1

from mcp.server.transport_security import TransportSecuritySettings


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


def build_server(args: argparse.Namespace) -> Any:
    # Host-header (DNS-rebinding) protection: the SDK turns it on for loopback
    # hosts and answers 421 to any other Host; keep it, but list the loopback
    # names explicitly so `127.0.0.1:<port>` / `localhost:<port>` always pass.
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", f"{args.host}:*"] + [f"{h}:*" for h in args.allowed_host],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )
    if SDK_MAJOR >= 2:
        server = MCPServer("mcp-worker-test-server", log_level="WARNING")
    else:
        server = FastMCP(
            "mcp-worker-test-server",
            host=args.host,
            port=args.port,
            stateless_http=True,
            json_response=args.json_response,
            transport_security=security,
            log_level="WARNING",
        )

    @server.tool()
    def qlik_whoami(ctx: Context) -> dict[str, Any]:
        """Return the X-Qlik-Access-Token and Authorization headers the server received."""
        headers = _request_headers(ctx)
        return {
            "token": _header(headers, "x-qlik-access-token"),
            "authorization": _header(headers, "authorization"),
        }

    @server.tool()
    def echo(text: str) -> str:
        """Return the given text."""
        return text

    @server.tool()
    def qlik_fail() -> str:
        """Always fails (the result carries isError: true)."""
        # ToolError: both SDKs answer isError=true with this message (2.x hides the
        # message of any other exception and logs a traceback).
        raise ToolError("qlik_fail: deliberate tool failure")

    @server.tool()
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

        mcp_method = tool = arguments = None
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

        record = {
            "method": scope["method"],
            "path": scope.get("path"),
            "x_qlik_access_token": headers.get("x-qlik-access-token"),
            "authorization": headers.get("authorization"),
            "accept": headers.get("accept"),
            "mcp_method": mcp_method,
            "tool": tool,
            "arguments": arguments,
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
