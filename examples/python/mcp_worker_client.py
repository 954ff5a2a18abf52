"""An async client for mcp-worker, as the chat backend would use it (contract v1, docs/CONTRACT.md).

    async with McpWorkerClient(amqp_url=..., api_url=..., service_key=...) as client:
        try:
            result = await client.call("u-42", "qlik_list_apps", {"space": "x"})
        except NeedsConnect as needed:          # NotConnected or ReauthRequired
            send_the_user_to(needed.connect_url)

How it talks to the worker, and why:

- One AMQP connection and one channel with publisher confirms: `call` returns only once the
  broker has the job, and a job the broker cannot route (no jobs queue) fails at once with
  `JobNotDelivered` instead of waiting out its timeout.
- Replies come to one exclusive, auto-delete, server-named queue, consumed by this client alone.
  It lives as long as the connection, so nobody else reads our replies and nothing piles up once
  we are gone (the broker then returns the worker's reply and the worker drops it). RabbitMQ's
  direct reply-to (`amq.rabbitmq.reply-to`) would also do; a real queue is the plain choice.
- Each job carries a fresh `correlation_id`; a dict maps it to the `asyncio.Future` its caller
  awaits, so any number of calls can be in flight on the one queue. A reply nobody waits for
  (its call timed out, or the worker answered a redelivered job twice) is dropped.
- Each job has a `deadline` equal to the caller's timeout: after it the worker does not call the
  tool, since nobody waits for the answer any more.
- `not_connected` and `reauth_required` need the user, not a retry: the client asks the
  worker's HTTP API for an authorize URL (`POST /v1/connections/qlik/authorize`, service-key
  bearer) and raises `NotConnected` / `ReauthRequired` carrying it, for the chat to show.

The service key and users' tokens are never logged or put in an exception message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import httpx

log = logging.getLogger("mcp_worker_client")

#: The jobs queue mcp-worker consumes by default (`amqp.jobs_queue`).
DEFAULT_JOBS_QUEUE = "mcp.tool_calls"


class McpWorkerError(Exception):
    """Anything that kept a call from getting its answer."""


class ToolCallFailed(McpWorkerError):
    """The worker answered `status: error`. Branch on `code` and `retryable`, not on `message`.

    A tool's own failure (`isError: true`) is *not* this: it comes back as a result, since the
    assistant must see it.
    """

    def __init__(
        self,
        code: str,
        message: str,
        retryable: bool,
        *,
        job_id: str | None = None,
        provider: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.job_id = job_id
        self.provider = provider


class NeedsConnect(ToolCallFailed):
    """The user must go through the connect flow; `connect_url` is where to send their browser.

    The URL starts a flow that is valid for a limited time (`http.state_ttl_secs`, 10 min) and
    once: show it to the user now, and ask for a new one (`connect_url()`) next time.
    """

    def __init__(self, code: str, message: str, retryable: bool, *, connect_url: str, **kwargs: Any) -> None:
        super().__init__(code, message, retryable, **kwargs)
        self.connect_url = connect_url


class NotConnected(NeedsConnect):
    """`not_connected`: no token is stored for the user; the tool was not called."""


class ReauthRequired(NeedsConnect):
    """`reauth_required`: the provider refused the user's grant (revoked, expired, user disabled);
    only a new connect flow helps. The tool was not called."""


class Forbidden(ToolCallFailed):
    """`forbidden`: the MCP server refused the user (HTTP 403), e.g. their Qlik role lacks the
    "Qlik MCP: Allowed" permission. Reconnecting does not help; `message` carries the server's
    reason: tell the user, or their administrator. The tool was not called."""


class CallTimeout(McpWorkerError, TimeoutError):
    """No answer in time: either no reply arrived within the call's timeout, or the worker replied
    `deadline_exceeded` (the job's deadline, which is that same timeout, passed first).

    The tool may or may not have run. Calling again with the same `job_id` is safe: the worker
    runs a `job_id` at most once and answers a repeat with the recorded reply.
    """

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(f"no answer to job {job_id} within {timeout:g} s")
        self.job_id = job_id
        self.timeout = timeout


class JobNotDelivered(McpWorkerError):
    """The broker did not take the job (no queue to route it to, or it refused it)."""


class McpWorkerClient:
    """Publishes tool-call jobs to mcp-worker and awaits their replies. Use it as an async context
    manager, or call `connect()` and `close()`. One instance serves any number of concurrent calls.

    Args:
        amqp_url: the broker, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
        api_url: base URL of the worker's HTTP API, e.g. `http://127.0.0.1:8080`.
        service_key: bearer key of the API's internal endpoints (`http.service_key`).
        jobs_queue: the worker's `amqp.jobs_queue`.
        return_to: where the connect flow sends the user's browser afterwards; must be in the
            worker's `http.return_to_allowlist`. `None`: the worker's `http.default_return_to`.
        provider: the provider whose connect flow `NeedsConnect` points to, when a reply names
            none.
    """

    def __init__(
        self,
        *,
        amqp_url: str,
        api_url: str,
        service_key: str,
        jobs_queue: str = DEFAULT_JOBS_QUEUE,
        return_to: str | None = None,
        provider: str = "qlik",
    ) -> None:
        self._amqp_url = amqp_url
        self._api_url = api_url.rstrip("/")
        self._service_key = service_key
        self._jobs_queue = jobs_queue
        self._return_to = return_to
        self._provider = provider
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._reply_queue: aio_pika.abc.AbstractQueue | None = None
        self._http: httpx.AsyncClient | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._closing = False

    def __repr__(self) -> str:  # no key in reprs, logs or tracebacks
        return f"McpWorkerClient(api_url={self._api_url!r}, jobs_queue={self._jobs_queue!r})"

    async def __aenter__(self) -> McpWorkerClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Opens the connection, the confirming channel and the reply queue, and starts consuming
        replies. Not a robust (self-reconnecting) connection on purpose: the reply queue dies with
        the connection, and with it any reply in flight, so a lost connection fails the calls
        waiting (`McpWorkerError`) and the owner decides whether to reconnect and call again."""
        if self._connection is not None:
            raise RuntimeError("already connected")
        self._closing = False
        self._http = httpx.AsyncClient(timeout=10.0)
        try:
            self._connection = await aio_pika.connect(self._amqp_url)
            self._connection.close_callbacks.add(self._on_connection_closed)
            # on_return_raises: an unroutable job (mandatory) raises at publish, not at timeout.
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._reply_queue = await self._channel.declare_queue("", exclusive=True, auto_delete=True)
            # no_ack: the queue is ours alone and dies with us; nothing to redeliver to.
            await self._reply_queue.consume(self._on_reply, no_ack=True)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Fails the calls still waiting, then closes the connection (deleting the reply queue) and
        the HTTP client. Safe to call twice."""
        self._closing = True
        self._fail_pending(McpWorkerError("the client was closed"))
        connection, self._connection = self._connection, None
        self._channel = self._reply_queue = None
        if connection is not None and not connection.is_closed:
            await connection.close()
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    async def call(
        self,
        user_id: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float = 60.0,
        job_id: str | None = None,
    ) -> dict[str, Any]:
        """Runs `tool` with `arguments` as `user_id` and returns the MCP `CallToolResult`
        (`content`, `structuredContent`, `isError`, …); a tool's own failure is a result with
        `isError: true`, for the assistant to see.

        `job_id` defaults to a new UUID; pass the one of an earlier attempt to retry it without
        running the tool twice (the worker answers a known `job_id` with its recorded reply).

        Raises:
            NotConnected / ReauthRequired: the user must connect; `.connect_url` says where.
            ToolCallFailed: any other error reply (`code`, `message`, `retryable`).
            CallTimeout: no answer within `timeout` seconds.
            JobNotDelivered: the broker did not take the job.
            McpWorkerError: the connection was lost or the client closed while waiting.
        """
        channel, reply_queue = self._channel, self._reply_queue
        if channel is None or reply_queue is None:
            raise RuntimeError("not connected: use `async with McpWorkerClient(...)` or `await connect()`")
        job_id = job_id or str(uuid.uuid4())
        correlation_id = str(uuid.uuid4())
        deadline = datetime.now(timezone.utc) + timedelta(seconds=timeout)
        job = {
            "job_id": job_id,
            "user_id": user_id,
            "tool": tool,
            "arguments": arguments or {},
            "deadline": deadline.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        message = aio_pika.Message(
            json.dumps(job).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=job_id,
            correlation_id=correlation_id,
            reply_to=reply_queue.name,
        )
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        # Registered before publishing: the reply can arrive before the confirm does.
        self._pending[correlation_id] = future
        try:
            async with asyncio.timeout(timeout):
                try:
                    await channel.default_exchange.publish(message, routing_key=self._jobs_queue, mandatory=True)
                except aio_pika.exceptions.DeliveryError as error:  # PublishError (returned) is one
                    raise JobNotDelivered(f"the broker did not take job {job_id} for {self._jobs_queue!r}: {error!r}") from None
                reply = await future
        except TimeoutError:
            raise CallTimeout(job_id, timeout) from None
        finally:
            self._pending.pop(correlation_id, None)
        return await self._result_of(reply, user_id, job_id, timeout)

    async def connect_url(self, user_id: str, provider: str | None = None) -> str:
        """Starts a connect flow for `user_id` and returns the URL to send their browser to
        (`POST /v1/connections/{provider}/authorize`)."""
        if self._http is None:
            raise RuntimeError("not connected")
        body: dict[str, str] = {"user_id": user_id}
        if self._return_to is not None:
            body["return_to"] = self._return_to
        try:
            response = await self._http.post(
                f"{self._api_url}/v1/connections/{provider or self._provider}/authorize",
                json=body,
                headers={"Authorization": f"Bearer {self._service_key}"},
            )
        except httpx.HTTPError as error:
            raise McpWorkerError(f"the worker's API did not answer: {error!r}") from error
        if response.status_code != 200:
            # The API's errors are `{"error": "..."}`; never echo the request (it has the key).
            raise McpWorkerError(f"authorize answered {response.status_code}: {response.text[:200]}")
        return str(response.json()["authorize_url"])

    async def confirm_connection(self, user_id: str, connect_code: str, provider: str | None = None) -> None:
        """Confirms a finished connect flow for `user_id`, the user logged in to the session the
        browser came back to with `connect_code` (`POST /v1/connections/{provider}/confirm`).
        Until then the user is not connected; call this from the page `return_to` names, with
        the code from its query. Raises McpWorkerError when the code is unknown, expired, used,
        or was issued for another user (that flow's grant is then revoked)."""
        if self._http is None:
            raise RuntimeError("not connected")
        try:
            response = await self._http.post(
                f"{self._api_url}/v1/connections/{provider or self._provider}/confirm",
                json={"user_id": user_id, "connect_code": connect_code},
                headers={"Authorization": f"Bearer {self._service_key}"},
            )
        except httpx.HTTPError as error:
            raise McpWorkerError(f"the worker's API did not answer: {error!r}") from error
        if response.status_code != 204:
            raise McpWorkerError(f"confirm answered {response.status_code}: {response.text[:200]}")

    async def _result_of(self, reply: dict[str, Any], user_id: str, job_id: str, timeout: float) -> dict[str, Any]:
        """The reply's result, or the typed exception its error code calls for."""
        if reply.get("status") == "ok":
            result = reply.get("result")
            return result if isinstance(result, dict) else {}
        error = reply.get("error") or {}
        code = str(error.get("code", "internal"))
        message = str(error.get("message", ""))
        retryable = bool(error.get("retryable", False))
        provider = error.get("provider")
        if code in ("not_connected", "reauth_required"):
            url = await self.connect_url(user_id, provider)
            kind = NotConnected if code == "not_connected" else ReauthRequired
            raise kind(code, message, retryable, connect_url=url, job_id=job_id, provider=provider)
        if code == "deadline_exceeded":
            raise CallTimeout(job_id, timeout)
        if code == "forbidden":
            raise Forbidden(code, message, retryable, job_id=job_id, provider=provider)
        raise ToolCallFailed(code, message, retryable, job_id=job_id, provider=provider)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Hands a reply to the call awaiting its correlation_id; drops the others."""
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            log.debug("dropping a reply nobody waits for (correlation_id %s)", message.correlation_id)
            return
        try:
            reply = json.loads(message.body)
            if not isinstance(reply, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            future.set_exception(McpWorkerError(f"unreadable reply: {error}"))
            return
        future.set_result(reply)

    def _on_connection_closed(self, _sender: Any, exc: BaseException | None = None) -> None:
        """The reply queue went with the connection: nothing will answer the calls waiting."""
        if not self._closing:
            log.warning("AMQP connection lost: %r", exc)
            self._fail_pending(McpWorkerError(f"the AMQP connection was lost: {exc!r}"))

    def _fail_pending(self, error: McpWorkerError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
