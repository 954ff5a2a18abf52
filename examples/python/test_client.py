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
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import unittest
import urllib.parse
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import aio_pika

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mcp_worker_client import (  # noqa: E402  (after the path set-up above)
    CallTimeout,
    JobNotDelivered,
    McpWorkerClient,
    McpWorkerError,
    NotConnected,
    Forbidden,
    ReauthRequired,
    ToolCallFailed,
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
                reply_queue = client._reply_queue.name if client._reply_queue else None

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

    async def test_the_service_key_stays_out_of_reprs(self) -> None:
        self.assertNotIn(setting("MCP_CLIENT_SERVICE_KEY"), repr(self.client))


if __name__ == "__main__":
    unittest.main()
