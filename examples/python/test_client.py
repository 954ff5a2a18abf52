"""The client example against a real, running mcp-worker (standard library `unittest` only).

Run by the Rust test `tests/integration/python_client.rs`, which starts the worker with the
in-repo OAuth test server as provider, prepares the users below and sets:

    MCP_CLIENT_AMQP_URL, MCP_CLIENT_JOBS_QUEUE, MCP_CLIENT_API_URL, MCP_CLIENT_SERVICE_KEY,
    MCP_CLIENT_RETURN_TO               the client's settings
    MCP_CLIENT_TEST_CONNECTED_USER     a user with a stored token ...
    MCP_CLIENT_TEST_CONNECTED_TOKEN    ... this access token (a test value, not a real secret)
    MCP_CLIENT_TEST_REAUTH_USER        a user whose grant the provider refused (reauth_required)
    MCP_CLIENT_TEST_AUTHORIZE_URL      the provider's authorize endpoint

    .venv/client/bin/python -m unittest -v examples/python/test_client.py

A missing variable fails the tests; none is skipped. The connect flow is walked as a browser
would, with the helpers of scripts/connect-as-browser.py.

`ClusterProtections` needs only the broker (MCP_CLIENT_AMQP_URL): the test plays the worker on a
jobs queue of its own, and puts a TCP proxy of its own between the client and the broker to cut
the client's connection (or refuse it) without touching the broker or anyone else's connection:

    MCP_CLIENT_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
        .venv/client/bin/python -m unittest -v examples/python/test_client.py -k ClusterProtections
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib.util
import json
import os
import socket
import sys
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
from yarl import URL

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mcp_worker_client  # noqa: E402  (after the path set-up above)
from mcp_worker_client import (  # noqa: E402
    DESTRUCTIVE_NOTE,
    BrokerUnavailable,
    CallTimeout,
    ConnectionNeeded,
    JobNotDelivered,
    McpWorkerClient,
    McpWorkerError,
    NotConnected,
    Forbidden,
    ReauthRequired,
    ToolCallFailed,
    connections_needed,
    correlation_id_of,
    function_tools,
    redact,
)


def setting(name: str) -> str:
    """An environment variable the Rust test sets; missing, the test fails (it is not skipped)."""
    value = os.environ.get(name)
    if not value:
        raise AssertionError(f"{name} is not set: run this through `cargo test --test integration python_client`")
    return value


def load_browser() -> ModuleType:
    """scripts/connect-as-browser.py as a module (its name has dashes, so not importable as is)."""
    path = HERE.parent.parent / "scripts" / "connect-as-browser.py"
    spec = importlib.util.spec_from_file_location("connect_as_browser", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BROWSER = load_browser()


def follow_as_browser(authorize_url: str, user: str) -> str:
    """Opens `authorize_url` at the provider, signs in as `user` (allow), follows the redirect to
    the worker's callback and returns where the callback sent the browser."""
    status, _, page = BROWSER.request("GET", authorize_url)
    assert status == 200, (status, page[:300])
    form = BROWSER.HiddenInputs()
    form.feed(page)
    provider = authorize_url.split("/authorize")[0]
    fields = form.fields + [("username", user), ("decision", "allow")]
    status, headers, _ = BROWSER.request(
        "POST",
        f"{provider}/login",
        urllib.parse.urlencode(fields).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 302, status
    status, headers, body = BROWSER.request("GET", headers["Location"])
    assert status == 303, (status, body[:300])
    return str(headers["Location"])


def text_of(result: dict[str, Any]) -> str:
    """The text of a CallToolResult's first content block."""
    content = result.get("content") or []
    assert content and content[0].get("type") == "text", result
    return str(content[0]["text"])


def token_tool_name(token: str) -> str:
    """The tool tests/mcp_server/server.py lists only to the holder of `token`."""
    return "qlik_for_" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:8]


def routed(catalog: dict[str, Any]) -> list[tuple[str, str]]:
    """The catalog's (tool name, server) pairs, sorted: a name listed under two servers shows twice."""
    return sorted((str(tool["name"]), str(tool["server"])) for tool in catalog["tools"])


def http_catalog(user_id: str, *, key: str | None = None) -> tuple[int, Any]:
    """`GET /v1/tools?user_id=…` on the worker's API (blocking; run it in a thread): status and
    JSON body. `key` defaults to the service key; `""` sends no Authorization."""
    key = setting("MCP_CLIENT_SERVICE_KEY") if key is None else key
    url = f"{setting('MCP_CLIENT_API_URL').rstrip('/')}/v1/tools?" + urllib.parse.urlencode({"user_id": user_id})
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, body.decode("utf-8", "replace")


#: What the worker under test routes to its server `plain` (and `qlik_*` to `qlik`; both are
#: tests/mcp_server/server.py, which also serves `flaky`, routed nowhere).
PLAIN_TOOLS = ["count_job", "echo", "sleep"]


def new_client(**overrides: Any) -> McpWorkerClient:
    settings: dict[str, Any] = {
        "amqp_url": setting("MCP_CLIENT_AMQP_URL"),
        "api_url": setting("MCP_CLIENT_API_URL"),
        "service_key": setting("MCP_CLIENT_SERVICE_KEY"),
        "jobs_queue": setting("MCP_CLIENT_JOBS_QUEUE"),
        "return_to": setting("MCP_CLIENT_RETURN_TO"),
    }
    settings.update(overrides)
    return McpWorkerClient(**settings)


class ClientAgainstTheWorker(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.client = new_client()
        await self.client.connect()

    async def asyncTearDown(self) -> None:
        await self.client.close()

    async def connect_and_check(self, needed: NotConnected | ReauthRequired, user: str) -> None:
        """The URL the exception carries is the provider's, and walking it connects `user`."""
        authorize = setting("MCP_CLIENT_TEST_AUTHORIZE_URL")
        self.assertTrue(needed.connect_url.startswith(authorize + "?"), needed.connect_url)
        landed = await asyncio.to_thread(follow_as_browser, needed.connect_url, user)
        self.assertTrue(landed.startswith(setting("MCP_CLIENT_RETURN_TO")), landed)
        self.assertIn("status=pending", landed)
        code = urllib.parse.parse_qs(urllib.parse.urlsplit(landed).query)["connect_code"][0]
        await self.client.confirm_connection(user, code)
        with self.assertRaises(McpWorkerError):
            await self.client.confirm_connection(user, code)  # a code works once

    async def test_a_connected_users_call_returns_the_tool_result(self) -> None:
        user = setting("MCP_CLIENT_TEST_CONNECTED_USER")
        result = await self.client.call(user, "qlik_whoami", {}, timeout=30)
        self.assertIs(result.get("isError"), False, result)
        self.assertEqual(
            result["structuredContent"]["token"],
            setting("MCP_CLIENT_TEST_CONNECTED_TOKEN"),
            "the MCP server received the user's stored token",
        )

    def assert_function_tools_are_well_formed(self, catalog: dict[str, Any]) -> None:
        """`function_tools` of a real catalog: one entry per tool, each what function calling takes."""
        functions = function_tools(catalog)
        self.assertEqual([f["function"]["name"] for f in functions], [t["name"] for t in catalog["tools"]])
        for entry in functions:
            self.assertEqual(set(entry), {"type", "function"}, entry)
            self.assertEqual(entry["type"], "function")
            function = entry["function"]
            self.assertEqual(set(function), {"name", "description", "parameters"}, function)
            self.assertTrue(isinstance(function["name"], str) and function["name"], function)
            self.assertTrue(isinstance(function["description"], str) and function["description"], function)
            self.assertEqual(function["parameters"].get("type"), "object", function)
            self.assertIsInstance(function["parameters"].get("properties"), dict, function)
        json.dumps(functions)  # plain JSON, ready to send

    async def test_a_connected_users_catalog_lists_both_servers_tools_and_nothing_unavailable(self) -> None:
        user = setting("MCP_CLIENT_TEST_CONNECTED_USER")
        mine = token_tool_name(setting("MCP_CLIENT_TEST_CONNECTED_TOKEN"))
        catalog = await self.client.list_tools(user, timeout=30)
        self.assertEqual(catalog["unavailable"], [], catalog)
        pairs = routed(catalog)
        self.assertEqual(len({name for name, _ in pairs}), len(pairs), f"a tool listed twice: {pairs}")
        # `qlik` was listed with the user's token: its token-dependent tool is there.
        for name in ("qlik_whoami", mine):
            self.assertIn((name, "qlik"), pairs)
        self.assertEqual(sorted(name for name, server in pairs if server == "plain"), PLAIN_TOOLS)
        self.assertEqual({server for name, server in pairs if name.startswith("qlik_")}, {"qlik"})
        self.assertEqual({name for name, server in pairs if server == "qlik"}, {n for n, _ in pairs if n.startswith("qlik_")})
        self.assertNotIn("echo", {name for name, server in pairs if server == "qlik"}, "echo is plain's, not qlik's")
        self.assertNotIn("flaky", {name for name, _ in pairs}, "a tool no server is routed for is not listed")

        whoami = next(tool for tool in catalog["tools"] if tool["name"] == "qlik_whoami")
        self.assertEqual(whoami.get("title"), "Who am I")
        self.assertEqual(whoami["inputSchema"].get("type"), "object")
        self.assertIs((whoami.get("annotations") or {}).get("readOnlyHint"), True, whoami)
        self.assert_function_tools_are_well_formed(catalog)

        # A tool from the catalog is a tool the user can call: the token's own answers "ok".
        self.assertEqual(text_of(await self.client.call(user, mine, {}, timeout=30)), "ok")

    async def test_a_user_who_never_connected_gets_the_public_tools_and_is_told_to_connect_qlik(self) -> None:
        user = f"py-lister-{uuid.uuid4().hex[:8]}"
        catalog = await self.client.list_tools(user, timeout=30)
        self.assertEqual(routed(catalog), [(name, "plain") for name in PLAIN_TOOLS])
        self.assertEqual([entry["server"] for entry in catalog["unavailable"]], ["qlik"], catalog)
        error = catalog["unavailable"][0]["error"]
        self.assertEqual((error["code"], error.get("provider"), error["retryable"]), ("not_connected", "qlik", False))
        self.assert_function_tools_are_well_formed(catalog)

        needed = connections_needed(catalog)
        self.assertEqual([(n.server, n.provider, n.code) for n in needed], [("qlik", "qlik", "not_connected")])
        urls = await self.client.connect_urls(user, catalog)
        self.assertEqual(list(urls), ["qlik"])
        self.assertTrue(urls["qlik"].startswith(setting("MCP_CLIENT_TEST_AUTHORIZE_URL") + "?"), urls)

    async def test_the_http_catalog_lists_what_the_job_lists(self) -> None:
        for user in (setting("MCP_CLIENT_TEST_CONNECTED_USER"), f"py-lister-{uuid.uuid4().hex[:8]}"):
            catalog = await self.client.list_tools(user, timeout=30)
            status, over_http = await asyncio.to_thread(http_catalog, user)
            self.assertEqual(status, 200, over_http)
            self.assertEqual(routed(over_http), routed(catalog), user)
            self.assertEqual(
                [(e["server"], e["error"]["code"]) for e in over_http["unavailable"]],
                [(e["server"], e["error"]["code"]) for e in catalog["unavailable"]],
                user,
            )
        status, _ = await asyncio.to_thread(http_catalog, "py-anyone", key="")
        self.assertEqual(status, 401, "the catalog is an internal endpoint: the service key is required")

    async def test_a_tools_own_failure_is_a_result_not_an_exception(self) -> None:
        user = setting("MCP_CLIENT_TEST_CONNECTED_USER")
        result = await self.client.call(user, "qlik_fail", {}, timeout=30)
        self.assertIs(result.get("isError"), True, result)
        self.assertIn("deliberate tool failure", text_of(result))

    async def test_other_error_codes_raise_tool_call_failed(self) -> None:
        user = setting("MCP_CLIENT_TEST_CONNECTED_USER")
        with self.assertRaises(ToolCallFailed) as caught:
            await self.client.call(user, "no_such_tool", {}, timeout=30)
        self.assertNotIsInstance(caught.exception, (NotConnected, ReauthRequired))
        self.assertEqual(caught.exception.code, "unknown_tool")
        self.assertFalse(caught.exception.retryable)
        self.assertIn("no_such_tool", caught.exception.message)

    async def test_a_server_that_refuses_the_users_role_raises_forbidden_with_its_reason(self) -> None:
        user = setting("MCP_CLIENT_TEST_CONNECTED_USER")
        with self.assertRaises(Forbidden) as caught:
            await self.client.call(user, "qlik_forbidden", {}, timeout=30)
        self.assertEqual(caught.exception.code, "forbidden")
        self.assertFalse(caught.exception.retryable)
        self.assertEqual(caught.exception.provider, "qlik")
        self.assertIn("Qlik MCP: Allowed", caught.exception.message)

    async def test_a_user_who_is_not_connected_is_sent_to_connect_and_then_the_call_works(self) -> None:
        user = f"py-newcomer-{uuid.uuid4().hex[:8]}"
        with self.assertRaises(NotConnected) as caught:
            await self.client.call(user, "qlik_whoami", {}, timeout=30)
        self.assertEqual((caught.exception.code, caught.exception.provider), ("not_connected", "qlik"))
        await self.connect_and_check(caught.exception, user)

        result = await self.client.call(user, "qlik_whoami", {}, timeout=30)
        self.assertIs(result.get("isError"), False, result)
        self.assertTrue(result["structuredContent"]["token"], "the provider's token reached the MCP server")

    async def test_a_refused_grant_raises_reauth_required_and_reconnecting_fixes_it(self) -> None:
        user = setting("MCP_CLIENT_TEST_REAUTH_USER")
        with self.assertRaises(ReauthRequired) as caught:
            await self.client.call(user, "qlik_whoami", {}, timeout=30)
        self.assertEqual((caught.exception.code, caught.exception.provider), ("reauth_required", "qlik"))
        self.assertFalse(caught.exception.retryable)
        await self.connect_and_check(caught.exception, user)

        result = await self.client.call(user, "qlik_whoami", {}, timeout=30)
        self.assertIs(result.get("isError"), False, result)
        self.assertTrue(result["structuredContent"]["token"])

    async def test_concurrent_calls_each_get_their_own_reply(self) -> None:
        user = setting("MCP_CLIENT_TEST_CONNECTED_USER")
        # The first calls sleep, so their replies come after those of the echoes published later:
        # a client pairing replies with calls in order, not by correlation_id, fails here.
        calls = [("sleep", {"seconds": 1}, "slept") for _ in range(4)]
        calls += [("echo", {"text": text}, text) for text in (f"call {i} {uuid.uuid4().hex}" for i in range(16))]
        results = await asyncio.gather(*(self.client.call(user, tool, args, timeout=30) for tool, args, _ in calls))
        self.assertEqual([text_of(r) for r in results], [expected for _, _, expected in calls])
        self.assertEqual(self.client._pending, {}, "no call is left waiting")

    async def test_a_call_nobody_answers_times_out_and_its_job_follows_the_contract(self) -> None:
        # A queue of our own that no worker consumes, standing in for the jobs queue.
        connection = await aio_pika.connect(setting("MCP_CLIENT_AMQP_URL"))
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"py-client-test.unconsumed.{uuid.uuid4().hex}", exclusive=True)
            async with new_client(jobs_queue=queue.name) as client:
                with self.assertRaises(CallTimeout) as caught:
                    await client.call("u-1", "echo", {"text": "hi"}, timeout=0.5)
                self.assertIsInstance(caught.exception, TimeoutError)
                self.assertEqual(client._pending, {}, "the timed-out call no longer waits")
                reply_queue = client.reply_queue

            message = await queue.get(no_ack=True, fail=True, timeout=5)
            assert message is not None
            job = json.loads(message.body)
            self.assertEqual(
                {k: job[k] for k in ("job_id", "user_id", "tool", "arguments")},
                {"job_id": caught.exception.job_id, "user_id": "u-1", "tool": "echo", "arguments": {"text": "hi"}},
            )
            deadline = datetime.fromisoformat(job["deadline"].replace("Z", "+00:00"))
            self.assertEqual(deadline.tzinfo, timezone.utc)
            self.assertEqual(message.content_type, "application/json")
            self.assertEqual(message.delivery_mode, aio_pika.DeliveryMode.PERSISTENT)
            self.assertEqual(message.message_id, job["job_id"])
            self.assertEqual(message.reply_to, reply_queue)
            self.assertTrue(message.correlation_id)
        finally:
            await connection.close()

    async def test_a_tool_slower_than_the_timeout_raises_call_timeout_and_the_client_goes_on(self) -> None:
        user = setting("MCP_CLIENT_TEST_CONNECTED_USER")
        with self.assertRaises(CallTimeout):
            await self.client.call(user, "sleep", {"seconds": 5}, timeout=1)
        # Whatever the worker answers later (deadline_exceeded) is dropped; the client still works.
        result = await self.client.call(user, "echo", {"text": "still here"}, timeout=30)
        self.assertEqual(text_of(result), "still here")

    async def test_a_job_the_broker_cannot_route_fails_at_once(self) -> None:
        async with new_client(jobs_queue=f"py-client-test.no-such-queue.{uuid.uuid4().hex}") as client:
            with self.assertRaises(JobNotDelivered):
                await client.call("u-1", "echo", {"text": "hi"}, timeout=30)

    async def test_a_call_survives_the_loss_of_its_connection(self) -> None:
        # The client's own connection is cut (a proxy of the test's between it and the broker)
        # while the worker runs the job: the client reconnects and publishes the job again, and
        # the worker's reply (kept in the quorum reply queue meanwhile) or its replay comes back.
        user = setting("MCP_CLIENT_TEST_CONNECTED_USER")
        proxy = await Proxy(setting("MCP_CLIENT_AMQP_URL")).start()
        try:
            async with new_client(amqp_url=None, amqp_urls=[proxy.url]) as client:
                call = asyncio.create_task(client.call(user, "sleep", {"seconds": 2}, timeout=30))
                await asyncio.sleep(0.7)  # published, and running
                proxy.drop()
                self.assertEqual(text_of(await call), "slept")
                self.assertEqual(client.reconnects, 1)
                self.assertEqual(client._pending, {})
                result = await client.call(user, "echo", {"text": "after"}, timeout=30)
                self.assertEqual(text_of(result), "after")
        finally:
            await proxy.close()

    async def test_the_service_key_stays_out_of_reprs(self) -> None:
        self.assertNotIn(setting("MCP_CLIENT_SERVICE_KEY"), repr(self.client))


# ---------------------------------------------------------------- cluster protections
#
# The test plays the worker: `FakeWorker` owns a jobs queue and answers what it takes from it,
# and `Proxy` stands between the client and the broker, so the client's own connection can be cut
# (or refused) while the broker and every other connection stay up.


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def with_port(url: str, port: int) -> str:
    return str(URL(url).with_host("127.0.0.1").with_port(port))


def ok_reply(message: aio_pika.abc.AbstractIncomingMessage, text: str) -> dict[str, Any]:
    job = json.loads(message.body)
    return {"status": "ok", "job_id": job["job_id"], "result": {"content": [{"type": "text", "text": text}], "isError": False}}


class Proxy:
    """A TCP proxy to the broker, on a loopback port of its own. `drop()` cuts every connection
    through it (both sockets aborted: no AMQP close, as when a node dies or the network goes);
    `pause()` also stops accepting, so the port refuses; `resume()` listens again on the same port;
    `stall()` stops forwarding what the broker sends (confirms, deliveries) until the next drop."""

    def __init__(self, upstream_url: str) -> None:
        upstream = URL(upstream_url)
        self.upstream = (upstream.host or "127.0.0.1", upstream.port or 5672)
        self.template = upstream_url
        self.port = 0
        self.accepted = 0
        self.server: asyncio.Server | None = None
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return with_port(self.template, self.port)

    async def start(self) -> Proxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.pairs.append((writer, up_writer))
        for task in (self._pump(reader, up_writer, False), self._pump(up_reader, writer, True)):
            t = asyncio.create_task(task)
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, downstream: bool) -> None:
        try:
            while data := await source.read(65536):
                if downstream:
                    await self.flowing.wait()
                if sink.is_closing():
                    return
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()

    def stall(self) -> None:
        self.flowing.clear()

    def drop(self) -> None:
        for client_side, broker_side in self.pairs:
            client_side.transport.abort()
            broker_side.transport.abort()
        self.pairs.clear()
        self.flowing.set()

    async def pause(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.drop()

    async def resume(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.pause()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class FakeWorker:
    """Takes jobs from a queue of its own (exclusive: it goes with this connection) and answers
    them as the worker would: to `reply_to`, with the job's `correlation_id`, mandatory (so a
    reply to a queue that is not there raises instead of vanishing)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.queue_name = f"py-client-test.jobs.{uuid.uuid4().hex}"

    async def start(self) -> FakeWorker:
        async with asyncio.timeout(10):  # a broker that stalls fails the test, not hangs it
            self.connection = await aio_pika.connect(self.url)
            self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
            self.queue = await self.channel.declare_queue(self.queue_name, exclusive=True)
        return self

    async def close(self) -> None:
        await self.connection.close()

    async def next_job(self, timeout: float = 10.0) -> aio_pika.abc.AbstractIncomingMessage:
        """The next job published to the queue; fails after `timeout` seconds without one."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            message = await self.queue.get(no_ack=True, fail=False)
            if message is not None:
                return message
            await asyncio.sleep(0.05)
        raise AssertionError(f"no job arrived within {timeout} s")

    async def no_job(self, wait: float = 0.5) -> None:
        await asyncio.sleep(wait)
        message = await self.queue.get(no_ack=True, fail=False)
        assert message is None, f"unexpected job {message.body!r}"

    async def reply(self, job: aio_pika.abc.AbstractIncomingMessage, body: dict[str, Any]) -> None:
        assert job.reply_to, "the job has a reply_to"
        async with asyncio.timeout(10):
            await self.channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    content_type="application/json",
                    correlation_id=job.correlation_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=job.reply_to,
                mandatory=True,
            )


def broker_client(urls: list[str], jobs_queue: str, **overrides: Any) -> McpWorkerClient:
    """A client for the broker-only tests: the HTTP API is never called there."""
    settings: dict[str, Any] = {
        "amqp_urls": urls,
        "api_url": "http://127.0.0.1:9",
        "service_key": "unused-in-these-tests",
        "jobs_queue": jobs_queue,
        "reply_queue_expires_secs": 60,  # a queue a failed test leaves behind goes soon
        "reconnect_backoff_secs": 0.05,
        "reconnect_backoff_max_secs": 0.5,
        "connect_timeout": 3,
    }
    settings.update(overrides)
    return McpWorkerClient(**settings)


async def eventually(predicate: Any, what: str, timeout: float = 10.0) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


class ClusterProtections(unittest.IsolatedAsyncioTestCase):
    """What a publisher on a cluster must do, each test failing if its protection is removed."""

    async def asyncSetUp(self) -> None:
        self.url = setting("MCP_CLIENT_AMQP_URL")
        self.worker = await FakeWorker(self.url).start()
        self.proxies: list[Proxy] = []
        self.clients: list[McpWorkerClient] = []

    async def asyncTearDown(self) -> None:
        for client in self.clients:
            await client.close()
        for proxy in self.proxies:
            await proxy.close()
        await self.worker.close()

    async def proxy(self) -> Proxy:
        proxy = await Proxy(self.url).start()
        self.proxies.append(proxy)
        return proxy

    async def connected(self, urls: list[str], *, start: int | None = 0, **overrides: Any) -> McpWorkerClient:
        """A connected client; `start` fixes which address it tries first (else random)."""
        if start is None:
            client = broker_client(urls, self.worker.queue_name, **overrides)
        else:
            with mock.patch.object(mcp_worker_client.random, "randrange", return_value=start):
                client = broker_client(urls, self.worker.queue_name, **overrides)
        self.clients.append(client)
        await client.connect()
        return client

    # -- deduplication by job_id

    async def test_the_first_reply_wins_and_a_duplicate_is_acked_and_dropped(self) -> None:
        # One reply in flight at a time: a duplicate left unacked would hold back every later reply.
        client = await self.connected([self.url], reply_prefetch=1)
        call = asyncio.create_task(client.call("u-1", "echo", {"text": "x"}, timeout=10))
        job = await self.worker.next_job()
        await self.worker.reply(job, ok_reply(job, "first"))
        await self.worker.reply(job, ok_reply(job, "second"))  # the worker resent it, say
        self.assertEqual(text_of(await call), "first")

        later = asyncio.create_task(client.call("u-1", "echo", {"text": "y"}, timeout=5))
        job = await self.worker.next_job()
        await self.worker.reply(job, ok_reply(job, "the next call's"))
        self.assertEqual(text_of(await later), "the next call's", "the duplicate was acked, so replies flow")
        self.assertEqual(client.replies_dropped, 1)
        self.assertEqual(client._pending, {})
        queue = await self.worker.channel.declare_queue(client.reply_queue, passive=True)
        self.assertEqual(queue.declaration_result.message_count, 0)

    async def test_a_late_reply_to_another_call_that_reused_the_job_id_is_not_taken(self) -> None:
        client = await self.connected([self.url])
        job_id = str(uuid.uuid4())
        with self.assertRaises(CallTimeout):
            await client.call("u-1", "echo", {"text": "old"}, timeout=0.3, job_id=job_id)
        old = await self.worker.next_job()
        call = asyncio.create_task(client.call("u-1", "echo", {"text": "new"}, timeout=10, job_id=job_id))
        new = await self.worker.next_job()
        self.assertNotEqual(old.correlation_id, new.correlation_id, "another call, another correlation_id")
        await self.worker.reply(old, ok_reply(old, "the old call's result"))
        await asyncio.sleep(0.3)
        self.assertFalse(call.done(), "the old call's reply was taken for the new one")
        await self.worker.reply(new, ok_reply(new, "the new call's result"))
        self.assertEqual(text_of(await call), "the new call's result")

        # The same call again, with the same job_id, is the same correlation_id (a retry).
        retry = asyncio.create_task(client.call("u-1", "echo", {"text": "new"}, timeout=10, job_id=job_id))
        again = await self.worker.next_job()
        self.assertEqual(again.correlation_id, new.correlation_id)
        await self.worker.reply(again, ok_reply(again, "replayed"))
        self.assertEqual(text_of(await retry), "replayed")

    async def test_a_second_concurrent_call_with_the_same_job_id_is_refused(self) -> None:
        client = await self.connected([self.url])
        job_id = str(uuid.uuid4())
        first = asyncio.create_task(client.call("u-1", "echo", {}, timeout=5, job_id=job_id))
        job = await self.worker.next_job()
        with self.assertRaises(ValueError):
            await client.call("u-1", "echo", {}, timeout=5, job_id=job_id)
        await self.worker.reply(job, ok_reply(job, "one"))
        self.assertEqual(text_of(await first), "one")

    # -- resending after a reconnect

    async def test_a_job_unanswered_when_the_connection_drops_is_published_again_identically(self) -> None:
        proxy = await self.proxy()
        client = await self.connected([proxy.url])
        call = asyncio.create_task(client.call("u-1", "echo", {"text": "x"}, timeout=15))
        first = await self.worker.next_job()
        proxy.drop()  # the client's own connection, cut without a close
        second = await self.worker.next_job()
        self.assertEqual(second.body, first.body, "same job_id, same body (same deadline)")
        self.assertEqual(
            (second.message_id, second.correlation_id, second.reply_to),
            (first.message_id, first.correlation_id, client.reply_queue),
        )
        self.assertEqual(client.reconnects, 1)
        await self.worker.reply(second, ok_reply(second, "answered after the reconnect"))
        self.assertEqual(text_of(await call), "answered after the reconnect")
        await self.worker.no_job()

    async def test_a_job_whose_confirm_was_lost_with_the_connection_is_published_again(self) -> None:
        proxy = await self.proxy()
        client = await self.connected([proxy.url])
        proxy.stall()  # from now on nothing the broker sends reaches the client: no confirm
        call = asyncio.create_task(client.call("u-1", "echo", {"text": "x"}, timeout=15))
        first = await self.worker.next_job()  # the broker has it; the client does not know
        await asyncio.sleep(0.3)
        self.assertFalse(call.done())
        self.assertEqual(client._pending[first.message_id].publishes, 1)
        proxy.drop()
        second = await self.worker.next_job()
        self.assertEqual((second.body, second.correlation_id), (first.body, first.correlation_id))
        # The worker answers both copies (the second from its recorded reply): one result.
        await self.worker.reply(first, ok_reply(first, "recorded"))
        await self.worker.reply(second, ok_reply(second, "recorded"))
        self.assertEqual(text_of(await call), "recorded")
        await eventually(lambda: client.replies_dropped == 1, "the second copy's reply is dropped")

    async def test_a_job_unanswered_across_reconnects_ends_at_its_deadline(self) -> None:
        proxy = await self.proxy()
        client = await self.connected([proxy.url])
        call = asyncio.create_task(client.call("u-1", "echo", {}, timeout=1.5))
        await self.worker.next_job()
        await proxy.pause()  # the connection is cut and the address refuses
        started = time.monotonic()
        with self.assertRaises(CallTimeout):
            await call
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(client._pending, {})
        await proxy.resume()
        await eventually(lambda: client.current_address is not None, "the client reconnects")

    # -- a reply queue that survives the connection

    async def test_the_reply_queue_is_a_durable_quorum_queue_deleted_by_close(self) -> None:
        client = await self.connected([self.url])
        name = client.reply_queue
        self.assertTrue(name.startswith("mcp.replies."), name)
        # Declaring it with other arguments is refused (inequivalent x-queue-type): it is a quorum queue.
        probe = await self.worker.connection.channel()
        with self.assertRaises(aio_pika.exceptions.ChannelPreconditionFailed):
            await probe.declare_queue(name, durable=True, arguments={"x-queue-type": "classic"})
        probe = await self.worker.connection.channel()
        with self.assertRaises(aio_pika.exceptions.ChannelPreconditionFailed):
            await probe.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})  # no x-expires
        await client.close()
        probe = await self.worker.connection.channel()
        with self.assertRaises(aio_pika.exceptions.ChannelNotFoundEntity):
            await probe.declare_queue(name, passive=True)

    async def test_a_reply_published_while_the_client_is_disconnected_waits_for_it(self) -> None:
        proxy = await self.proxy()
        client = await self.connected([proxy.url])
        call = asyncio.create_task(client.call("u-1", "echo", {}, timeout=15))
        job = await self.worker.next_job()
        await proxy.pause()
        await eventually(lambda: client.current_address is None, "the client sees its connection go")
        # An exclusive reply queue would be gone with the connection: this publish would be
        # returned (PublishError), as the worker's reply would be, and dropped.
        await self.worker.reply(job, ok_reply(job, "kept for you"))
        await proxy.resume()
        self.assertEqual(text_of(await call), "kept for you")

    # -- several addresses

    async def test_connect_moves_past_an_address_that_refuses(self) -> None:
        refused = with_port(self.url, closed_port())
        client = await self.connected([refused, self.url], start=0)
        self.assertEqual(client.current_address, redact(self.url))
        call = asyncio.create_task(client.call("u-1", "echo", {}, timeout=10))
        job = await self.worker.next_job()
        await self.worker.reply(job, ok_reply(job, "via the second address"))
        self.assertEqual(text_of(await call), "via the second address")

    async def test_a_lost_connection_moves_to_the_next_address_and_the_job_follows(self) -> None:
        first, second = await self.proxy(), await self.proxy()
        client = await self.connected([first.url, second.url], start=0)
        self.assertEqual(client.current_address, redact(first.url))
        call = asyncio.create_task(client.call("u-1", "echo", {}, timeout=15))
        await self.worker.next_job()
        await first.pause()  # the node is gone: its connections cut, its port refuses
        job = await self.worker.next_job()
        self.assertEqual(client.current_address, redact(second.url))
        self.assertEqual(second.accepted, 1)
        await self.worker.reply(job, ok_reply(job, "from the other node"))
        self.assertEqual(text_of(await call), "from the other node")

    async def test_connect_fails_when_no_address_answers_and_names_no_password(self) -> None:
        urls = [with_port("amqp://someone:pw-s3cret@127.0.0.1/%2f", closed_port()) for _ in range(2)]
        client = broker_client(urls, self.worker.queue_name)
        started = time.monotonic()
        with self.assertRaises(BrokerUnavailable) as caught:
            await client.connect()
        self.assertLess(time.monotonic() - started, 5)
        self.assertIsInstance(caught.exception, OSError)
        self.assertNotIn("pw-s3cret", str(caught.exception))
        self.assertNotIn("pw-s3cret", repr(client))
        with self.assertRaises(RuntimeError):
            await client.call("u-1", "echo", {})

    async def test_clients_start_at_random_addresses_and_back_off_within_bounds(self) -> None:
        urls = [f"amqp://127.0.0.1:{5701 + i}/%2f" for i in range(3)]
        starts = {broker_client(urls, "q")._next_index for _ in range(60)}
        self.assertEqual(starts, {0, 1, 2})
        client = broker_client(urls, "q", reconnect_backoff_secs=0.1, reconnect_backoff_max_secs=2)
        delays = [client._delay(attempt) for attempt in range(1, 40)]
        self.assertTrue(all(0.05 <= d <= 2 for d in delays), delays)
        self.assertGreater(delays[-1], delays[0])

    # -- the tool catalog

    async def test_a_listing_is_a_tools_list_job_resent_like_a_call_and_never_takes_a_calls_reply(self) -> None:
        proxy = await self.proxy()
        client = await self.connected([proxy.url])
        job_id = str(uuid.uuid4())
        listing = asyncio.create_task(client.list_tools("u-1", timeout=15, job_id=job_id))
        first = await self.worker.next_job()
        body = json.loads(first.body)
        self.assertEqual(set(body), {"job_id", "user_id", "method", "deadline"}, body)
        self.assertEqual((body["job_id"], body["user_id"], body["method"]), (job_id, "u-1", "tools/list"))
        self.assertEqual(first.message_id, job_id)
        self.assertEqual(first.correlation_id, correlation_id_of(job_id, "u-1", method="tools/list"))

        # A reply to a call that used the same job_id (another correlation_id) is not this listing's.
        await self.worker.channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(ok_reply(first, "a call's result")).encode(),
                content_type="application/json",
                correlation_id=correlation_id_of(job_id, "u-1", "echo", {}),
            ),
            routing_key=first.reply_to,
        )
        await eventually(lambda: client.replies_dropped == 1, "the call's reply is dropped")
        self.assertFalse(listing.done())

        proxy.drop()  # the listing is published again, identically, on the next connection
        second = await self.worker.next_job()
        self.assertEqual((second.body, second.correlation_id), (first.body, first.correlation_id))
        catalog = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}, "server": "plain"}], "unavailable": []}
        await self.worker.reply(second, {"status": "ok", "job_id": job_id, "result": catalog})
        self.assertEqual(await listing, catalog)
        self.assertEqual(client._pending, {})

    async def test_a_listings_error_reply_raises_what_a_calls_would(self) -> None:
        client = await self.connected([self.url])
        for code, expected in (("invalid_job", ToolCallFailed), ("internal", ToolCallFailed), ("deadline_exceeded", CallTimeout)):
            listing = asyncio.create_task(client.list_tools("u-1", timeout=10))
            job = await self.worker.next_job()
            error = {"code": code, "message": f"{code} for the test", "retryable": code == "internal"}
            await self.worker.reply(job, {"status": "error", "job_id": job.message_id, "error": error})
            with self.assertRaises(expected) as caught:
                await listing
            if expected is ToolCallFailed:
                self.assertEqual((caught.exception.code, caught.exception.retryable), (code, code == "internal"))

        # An ok reply missing a list still gives both lists.
        listing = asyncio.create_task(client.list_tools("u-1", timeout=10))
        job = await self.worker.next_job()
        await self.worker.reply(job, {"status": "ok", "job_id": job.message_id, "result": {"tools": []}})
        self.assertEqual(await listing, {"tools": [], "unavailable": []})

    async def test_a_single_url_is_still_accepted(self) -> None:
        client = McpWorkerClient(amqp_url=self.url, api_url="http://127.0.0.1:9", service_key="k",
                                 jobs_queue=self.worker.queue_name)
        self.clients.append(client)
        await client.connect()
        self.assertEqual(client.current_address, redact(self.url))
        with self.assertRaises(ValueError):
            McpWorkerClient(amqp_url=self.url, amqp_urls=[self.url], api_url="x", service_key="k")



# ---------------------------------------------------------------- catalog helpers (no services)


class CatalogHelpers(unittest.TestCase):
    """The pure helpers on a literal catalog: nothing to connect to, nothing to set."""

    CATALOG: dict[str, Any] = {
        "tools": [
            {
                "name": "qlik_whoami",
                "title": "Who am I",
                "description": "Return the token the server received.",
                "inputSchema": {"type": "object", "properties": {}, "title": "qlik_whoamiArguments"},
                "annotations": {"readOnlyHint": True, "idempotentHint": True},
                "server": "qlik",
            },
            {"name": "qlik_titled", "title": "Only a title", "inputSchema": {"type": "object"}, "server": "qlik"},
            {"name": "qlik_bare", "server": "qlik"},
            {
                "name": "qlik_delete_note",
                "description": "Delete the given note.",
                "inputSchema": {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]},
                "annotations": {"readOnlyHint": False, "destructiveHint": True},
                "server": "qlik",
            },
            {
                "name": "count_job",
                "description": "Return ok.",
                "inputSchema": {"type": "object", "properties": {"job_id": {"type": "string"}}},
                "annotations": {"readOnlyHint": False, "destructiveHint": False},
                "server": "plain",
            },
            {"name": "not_an_object", "inputSchema": {"type": "string"}, "server": "plain"},
            {"name": "qlik has spaces", "inputSchema": {"type": "object"}, "server": "qlik"},
            {"name": "qlik_" + "x" * 60, "inputSchema": {"type": "object"}, "server": "qlik"},
            {"name": "count_job", "description": "A second count_job.", "server": "other"},
        ],
        "unavailable": [
            {"server": "qlik", "error": {"code": "not_connected", "message": "m1", "retryable": False, "provider": "qlik"}},
            {"server": "crm", "error": {"code": "reauth_required", "message": "m2", "retryable": False, "provider": "crm"}},
            {"server": "crm2", "error": {"code": "reauth_required", "message": "m3", "retryable": False, "provider": "crm"}},
            {"server": "slow", "error": {"code": "mcp_unavailable", "message": "m4", "retryable": True}},
            {"server": "nope", "error": {"code": "forbidden", "message": "m5", "retryable": False, "provider": "qlik"}},
        ],
    }

    def test_function_tools_turns_a_catalog_into_function_calling_entries(self) -> None:
        catalog = copy.deepcopy(self.CATALOG)
        with self.assertLogs("mcp_worker_client", "WARNING") as logged:
            functions = function_tools(catalog)
        self.assertIn("not_an_object", "\n".join(logged.output))
        self.assertIn("qlik has spaces", "\n".join(logged.output), "a name function calling refuses is left out")
        self.assertEqual(catalog, self.CATALOG, "the catalog is left as it was")

        def entry(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
            return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}

        self.assertEqual(
            functions,
            [
                entry(
                    "qlik_whoami",
                    "Return the token the server received.",
                    {"type": "object", "properties": {}, "title": "qlik_whoamiArguments"},
                ),
                entry("qlik_titled", "Only a title", {"type": "object", "properties": {}}),
                entry("qlik_bare", "qlik_bare", {"type": "object", "properties": {}}),
                entry(
                    "qlik_delete_note",
                    f"Delete the given note.\n\n{DESTRUCTIVE_NOTE}",
                    {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]},
                ),
                entry("count_job", "Return ok.", {"type": "object", "properties": {"job_id": {"type": "string"}}}),
            ],
        )
        functions[0]["function"]["parameters"]["properties"]["x"] = {}
        self.assertEqual(catalog, self.CATALOG, "the entries' schemas are copies")

        quiet = function_tools({"tools": [self.CATALOG["tools"][3]]}, destructive_note=None)
        self.assertEqual(quiet[0]["function"]["description"], "Delete the given note.")
        self.assertEqual(function_tools({}), [])
        self.assertEqual(function_tools({"tools": [], "unavailable": []}), [])

    def test_connections_needed_names_the_servers_only_connecting_fixes(self) -> None:
        self.assertEqual(
            connections_needed(self.CATALOG),
            [
                ConnectionNeeded(server="qlik", provider="qlik", code="not_connected", message="m1"),
                ConnectionNeeded(server="crm", provider="crm", code="reauth_required", message="m2"),
                ConnectionNeeded(server="crm2", provider="crm", code="reauth_required", message="m3"),
            ],
        )
        no_provider = {"unavailable": [{"server": "s", "error": {"code": "not_connected", "message": ""}}]}
        self.assertEqual([n.provider for n in connections_needed(no_provider, default_provider="qlik")], ["qlik"])
        self.assertEqual(connections_needed({"tools": [], "unavailable": []}), [])

    def test_a_listing_and_a_call_sharing_a_job_id_have_different_correlation_ids(self) -> None:
        listing = correlation_id_of("j-1", "u-1", method="tools/list")
        self.assertEqual(listing, correlation_id_of("j-1", "u-1", method="tools/list"), "stable across copies")
        self.assertNotEqual(listing, correlation_id_of("j-1", "u-1", "echo", {}))
        self.assertNotEqual(listing, correlation_id_of("j-1", "u-1", None, None), "the method is in the digest")
        self.assertNotEqual(listing, correlation_id_of("j-1", "u-2", method="tools/list"))
        self.assertEqual(correlation_id_of("j-1", "u-1", "echo", {"a": 1, "b": 2}), correlation_id_of("j-1", "u-1", "echo", {"b": 2, "a": 1}))


if __name__ == "__main__":
    unittest.main()
