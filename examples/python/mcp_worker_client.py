"""An async client for mcp-worker, as the chat backend would use it (contract v1, docs/CONTRACT.md).

    async with McpWorkerClient(amqp_urls=[...], api_url=..., service_key=...) as client:
        catalog = await client.list_tools("u-42")           # the tools this user can use now
        functions = function_tools(catalog)                  # what the model is offered
        offers = await client.connect_urls("u-42", catalog)  # {provider: URL} still to connect
        try:
            result = await client.call("u-42", "qlik_list_apps", {"space": "x"})
        except NeedsConnect as needed:          # NotConnected or ReauthRequired
            send_the_user_to(needed.connect_url)

It is written for a RabbitMQ cluster, where a node can go away at any time (a single broker is
the one-address case). How it talks to the worker, and why:

- **Several addresses.** `amqp_urls` lists the cluster's nodes. Each client starts at a random
  one, so clients spread over the nodes, and a lost connection (or one that cannot be opened)
  moves it to the next address in turn: a node that died is left at once. The first round over
  the addresses is tried without waiting; after that each attempt waits, growing from
  `reconnect_backoff_secs` to at most `reconnect_backoff_max_secs` (with jitter), for as long as
  the client is open. `connect()` itself tries each address once and raises `BrokerUnavailable`
  when none answers: at start a clear error beats waiting.
- **Publisher confirms, and resending.** A job is published on a confirming channel and stays in
  this client's table of unanswered jobs until its reply comes. When the connection is lost,
  whether before the broker confirmed a job (the confirm was lost with the connection: the job
  may or may not be in the queue) or after (the job was taken, its reply not yet received), every
  call still waiting publishes its job again on the next connection, with the same `job_id`,
  `correlation_id` and body (the same `deadline` too). That is safe because the worker runs a
  `job_id` at most once: a copy of a job that already has a reply is answered with the recorded
  reply, a copy of a job still running waits for it. Each call is bounded by its `timeout`: when
  it passes, reconnected or not, the caller gets `CallTimeout`. A job the broker cannot route (no
  jobs queue) fails at once with `JobNotDelivered`; a job the broker refuses (a nack, e.g. a
  quorum queue without a majority) is published again after a short wait, until the timeout.
- **A durable quorum reply queue per client instance** (`x-queue-type: quorum`), named
  `<reply_queue_prefix>.<host>.<pid>.<random>`, rather than an exclusive, auto-delete one.
  Why: an exclusive queue is deleted with its connection, so every lost connection, and every
  lost node, loses the replies in flight and the worker drops those it publishes meanwhile (the
  broker returns them: no queue). Resending the jobs recovers them from the worker's recorded
  replies, but not always: a reply the worker could not record (its database went away at that
  moment) is published without one, and a resend of that job runs the tool again. A quorum
  queue is replicated: it survives our connection and a node, the worker's replies (and the
  copies it resends after losing a confirm, within `amqp.reply_resend_window_secs`) land in it
  while we reconnect, and the resend is then only the backstop. The cost is one Raft group per
  client instance: fine for a chat backend's long-lived processes, not for thousands of
  short-lived clients. Who deletes it: `close()` does; a client that dies without closing leaves
  it, and the broker deletes it once unused for `reply_queue_expires_secs` (`x-expires`, 10 min
  by default: no consumer and no re-declare for that long). A client cut off longer than that
  finds it gone, declares it again and resends its jobs: nothing is lost but the wait.
- **Replies are deduplicated by `job_id`.** The same reply can arrive more than once (the
  worker's own resend after a lost confirm, a redelivered job replayed, our resend of a job
  whose reply was already in the queue). The first reply for a waiting job wins; later copies,
  like replies nobody waits for (their call timed out), are acked and dropped. A reply must also
  carry the job's `correlation_id`, a digest of the `job_id` and the call (user, tool,
  arguments): a late reply to an earlier call that reused the `job_id` for something else is
  never taken for this one's. Replies are acked after they are handled, so one that reaches us as
  the connection drops is delivered again, not lost.
- Each job has a `deadline` equal to the caller's timeout: after it the worker does not call the
  tool, since nobody waits for the answer any more.
- `not_connected` and `reauth_required` need the user, not a retry: the client asks the
  worker's HTTP API for an authorize URL (`POST /v1/connections/qlik/authorize`, service-key
  bearer) and raises `NotConnected` / `ReauthRequired` carrying it, for the chat to show.
- **The tool catalog** (`list_tools`) is a job too (`"method": "tools/list"`), so it travels the
  same way as a call: confirmed, resent after a reconnect, deduplicated, bounded by its
  deadline. Why not only the HTTP endpoint (`GET /v1/tools`, same answer): the chat backend then
  needs the broker alone, and the listing, which calls every MCP server with the user's token,
  rides on the same retry and delivery rules as the calls it prepares. A server the user has not
  connected does not fail the listing: it is named in the catalog's `unavailable`, with the
  error code a call would have got, and `connections_needed()` / `connect_urls()` turn that into
  links to offer. `function_tools()` turns the catalog into what a model's function calling takes.

Set a heartbeat in the URLs (`?heartbeat=10`) for a node that vanishes without closing its
sockets to be noticed in seconds rather than a minute or more. The service key, the passwords in
the URLs and users' tokens are never logged or put in an exception message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import socket
import uuid
from collections.abc import Sequence
from functools import partial
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import httpx
from yarl import URL

log = logging.getLogger("mcp_worker_client")

#: The jobs queue mcp-worker consumes by default (`amqp.jobs_queue`).
DEFAULT_JOBS_QUEUE = "mcp.tool_calls"

#: The reply queue's name starts with this, then `.<host>.<pid>.<random>`.
DEFAULT_REPLY_QUEUE_PREFIX = "mcp.replies"


class McpWorkerError(Exception):
    """Anything that kept a call from getting its answer."""


class BrokerUnavailable(McpWorkerError, ConnectionError):
    """`connect()` could not reach any of the AMQP addresses (an `OSError` too, as the v1 client's
    connection errors were)."""


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
    """No answer in time: no reply arrived within the call's timeout (the broker may have been
    unreachable all along), or the worker replied `deadline_exceeded` (the job's deadline, which
    is that same timeout, passed first).

    The tool may or may not have run. Calling again with the same `job_id` and the same call is
    safe: the worker runs a `job_id` at most once and answers a repeat with the recorded reply.
    """

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(f"no answer to job {job_id} within {timeout:g} s")
        self.job_id = job_id
        self.timeout = timeout


class JobNotDelivered(McpWorkerError):
    """The broker could not route the job: no queue of that name (`jobs_queue` is wrong, or the
    worker never declared it)."""


def redact(url: str) -> str:
    """`url` with its password replaced, for logs and messages."""
    try:
        parsed = URL(url)
        return str(parsed.with_password("******")) if parsed.password else str(parsed)
    except (TypeError, ValueError):
        return "an address that is not a valid URL"


#: The job methods (`"method"` in the job's body); a job without one is a tool call.
TOOLS_CALL = "tools/call"
TOOLS_LIST = "tools/list"


def correlation_id_of(
    job_id: str,
    user_id: str,
    tool: str | None = None,
    arguments: dict[str, Any] | None = None,
    *,
    method: str = TOOLS_CALL,
) -> str:
    """The `correlation_id` of a job: the same for every copy and every retry of one call (or
    one listing) with one `job_id`, different for another job reusing that `job_id`. The digest
    covers the method too, so a listing and a call that share a `job_id` never take each
    other's replies (a listing has no tool and no arguments: `None`)."""
    canonical = json.dumps([method, job_id, user_id, tool, arguments], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


#: The error codes in a catalog's `unavailable` that only the user can clear, by connecting.
CONNECT_CODES = ("not_connected", "reauth_required")

#: A name function calling accepts (OpenAI's rule, which the other APIs share or exceed).
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: Appended to the description of a tool whose server says it is destructive (see `function_tools`).
DESTRUCTIVE_NOTE = "This tool may delete or overwrite data: ask the user to confirm before calling it."


def function_tools(catalog: dict[str, Any], *, destructive_note: str | None = DESTRUCTIVE_NOTE) -> list[dict[str, Any]]:
    """The catalog's tools in the function-calling format a chat backend hands its model
    (OpenAI-style): `{"type": "function", "function": {"name", "description", "parameters"}}`.

    Pure: no I/O, so it can run on a catalog kept from earlier. Why each choice:

    - `name` is the tool's name unchanged: the model's function call then names the tool to
      pass to `call` as is (no mapping table to keep). The server is left out; the worker routes
      by name.
    - `description` is the tool's, else its `title`, else its name: a model picks tools by
      their descriptions, and an empty one makes a tool invisible to it.
    - A tool whose `annotations.destructiveHint` is `true` gets `destructive_note` appended
      (`None`: nothing appended), so the model asks before it deletes. Only an explicit `true`:
      MCP's default for an unannotated tool is "may be destructive", which would put the note
      on nearly every tool and teach the model to ignore it. Annotations are the server's hints,
      not guarantees: a backend that must stop destructive calls checks them itself, before
      `call`, and does not rely on the model.
    - `parameters` is the tool's `inputSchema` (a copy); a tool without one gets the empty
      object schema. A tool whose schema is not an object schema is left out: function calling
      needs one, and MCP requires one, so such a tool is broken at its server.

    Tools come in the catalog's order; a name seen twice (the worker routes each name to one
    server, so it should not happen) is kept once, the first.
    """
    functions: list[dict[str, Any]] = []
    seen: set[str] = set()
    for tool in catalog.get("tools") or []:
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not name or name in seen:
            continue
        # Function-calling APIs take names of letters, digits, `_` and `-`, at most 64: one tool
        # outside that (a server's name may be anything) would make the model refuse them all.
        if not FUNCTION_NAME.fullmatch(name):
            log.warning("tool %.80r: not a name function calling takes; left out", name)
            continue
        schema = tool.get("inputSchema")
        if schema is None:
            parameters: dict[str, Any] = {"type": "object", "properties": {}}
        elif isinstance(schema, dict) and schema.get("type", "object") == "object":
            parameters = json.loads(json.dumps(schema))  # a deep copy: the catalog stays as it was
            parameters.setdefault("type", "object")
            parameters.setdefault("properties", {})
        else:
            log.warning("tool %s: its inputSchema is not an object schema; left out", name)
            continue
        description = next(
            (text.strip() for text in (tool.get("description"), tool.get("title")) if isinstance(text, str) and text.strip()),
            name,
        )
        annotations = tool.get("annotations")
        if destructive_note and isinstance(annotations, dict) and annotations.get("destructiveHint") is True:
            description = f"{description}\n\n{destructive_note}"
        seen.add(name)
        functions.append({"type": "function", "function": {"name": name, "description": description, "parameters": parameters}})
    return functions


@dataclass(frozen=True)
class ConnectionNeeded:
    """A server in the catalog's `unavailable` that only the user can make available: they have
    not connected its `provider` (`not_connected`), or must connect again (`reauth_required`)."""

    server: str
    provider: str
    code: str
    message: str


def connections_needed(catalog: dict[str, Any], *, default_provider: str = "qlik") -> list[ConnectionNeeded]:
    """The catalog's unavailable servers that need the user to connect, in the catalog's order.

    Pure. The other codes (`token_unavailable`, `mcp_unavailable`, `forbidden`, …) are left out:
    a connect link does not help there (try again later, or tell the user why). A token error
    names its `provider`; `default_provider` stands in if one ever does not.
    """
    needed: list[ConnectionNeeded] = []
    for entry in catalog.get("unavailable") or []:
        error = entry.get("error") if isinstance(entry, dict) else None
        if not isinstance(error, dict) or error.get("code") not in CONNECT_CODES:
            continue
        needed.append(
            ConnectionNeeded(
                server=str(entry.get("server", "")),
                provider=str(error.get("provider") or default_provider),
                code=str(error["code"]),
                message=str(error.get("message", "")),
            )
        )
    return needed


@dataclass(eq=False)
class _Link:
    """One AMQP connection with its confirming channel and the reply queue's consumer."""

    index: int
    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    queue: aio_pika.abc.AbstractQueue
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    consumer_tag: str | None = None


@dataclass(eq=False)
class _Job:
    """A job waiting for its reply: what is published again after a reconnect."""

    job_id: str
    correlation_id: str
    body: bytes
    future: asyncio.Future[dict[str, Any]]
    publishes: int = 0


class McpWorkerClient:
    """Publishes tool-call jobs to mcp-worker and awaits their replies. Use it as an async context
    manager, or call `connect()` and `close()`. One instance serves any number of concurrent calls.

    Args:
        amqp_url: the broker, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f` (v1), or a list of
            addresses, as `amqp_urls`.
        amqp_urls: the cluster's nodes, one AMQP URL each. Give this or `amqp_url`, not both.
        api_url: base URL of the worker's HTTP API, e.g. `http://127.0.0.1:8080`.
        service_key: bearer key of the API's internal endpoints (`http.service_key`).
        jobs_queue: the worker's `amqp.jobs_queue`.
        return_to: where the connect flow sends the user's browser afterwards; must be in the
            worker's `http.return_to_allowlist`. `None`: the worker's `http.default_return_to`.
        provider: the provider whose connect flow `NeedsConnect` points to, when a reply names
            none.
        reply_queue_prefix: the reply queue's name is this, `.<host>.<pid>.<random>`.
        reply_queue_expires_secs: `x-expires` of the reply queue: the broker deletes it once it has
            been unused (no consumer, no re-declare) that long, e.g. after the client died.
        connect_timeout: seconds one connection attempt (connect, channel, queue, consume) may take.
        reconnect_backoff_secs, reconnect_backoff_max_secs: the wait between reconnect attempts
            once a first round over all addresses failed: doubling from the first to the second.
        reply_prefetch: replies the broker may send before they are acked.
    """

    def __init__(
        self,
        *,
        amqp_url: str | Sequence[str] | None = None,
        amqp_urls: Sequence[str] | None = None,
        api_url: str,
        service_key: str,
        jobs_queue: str = DEFAULT_JOBS_QUEUE,
        return_to: str | None = None,
        provider: str = "qlik",
        reply_queue_prefix: str = DEFAULT_REPLY_QUEUE_PREFIX,
        reply_queue_expires_secs: float = 600.0,
        connect_timeout: float = 5.0,
        reconnect_backoff_secs: float = 0.2,
        reconnect_backoff_max_secs: float = 10.0,
        reply_prefetch: int = 100,
    ) -> None:
        if (amqp_url is None) == (amqp_urls is None):
            raise ValueError("give amqp_url or amqp_urls (one of them)")
        given = amqp_urls if amqp_urls is not None else amqp_url
        urls = [given] if isinstance(given, str) else list(given or [])
        if not urls or not all(isinstance(url, str) and url for url in urls):
            raise ValueError("the AMQP addresses must be a non-empty list of URLs")
        if reply_queue_expires_secs < 1 or connect_timeout <= 0 or reply_prefetch < 1:
            raise ValueError("reply_queue_expires_secs >= 1, connect_timeout > 0 and reply_prefetch >= 1")
        if not 0 < reconnect_backoff_secs <= reconnect_backoff_max_secs:
            raise ValueError("0 < reconnect_backoff_secs <= reconnect_backoff_max_secs")
        self._urls = urls
        self._api_url = api_url.rstrip("/")
        self._service_key = service_key
        self._jobs_queue = jobs_queue
        self._return_to = return_to
        self._provider = provider
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "host"
        self._reply_queue_name = f"{reply_queue_prefix}.{host}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        self._reply_queue_expires_ms = int(reply_queue_expires_secs * 1000)
        self._connect_timeout = connect_timeout
        self._backoff = (reconnect_backoff_secs, reconnect_backoff_max_secs)
        self._reply_prefetch = reply_prefetch
        # Where the next connection attempt goes: a random start spreads clients over the nodes.
        self._next_index = random.randrange(len(urls))
        self._link: _Link | None = None
        self._link_ready = asyncio.Event()  # set while `_link` is usable, and once closing
        self._supervisor: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._pending: dict[str, _Job] = {}
        self._open = False
        self._closing = False
        #: Replies acked and dropped: duplicates, and replies nobody waits for any more.
        self.replies_dropped = 0
        #: Connections opened after the first one.
        self.reconnects = 0

    def __repr__(self) -> str:  # no key or password in reprs, logs or tracebacks
        return (
            f"McpWorkerClient(api_url={self._api_url!r}, jobs_queue={self._jobs_queue!r}, "
            f"amqp_urls={[redact(url) for url in self._urls]!r})"
        )

    @property
    def reply_queue(self) -> str:
        """The name of this client's reply queue, the `reply_to` of its jobs."""
        return self._reply_queue_name

    @property
    def current_address(self) -> str | None:
        """The AMQP address in use (password hidden), or `None` while disconnected."""
        link = self._link
        return redact(self._urls[link.index]) if link is not None and not link.lost.is_set() else None

    async def __aenter__(self) -> McpWorkerClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connects to one of the addresses (each tried once, from a random one), declares the
        reply queue and starts consuming it; from then on a lost connection is replaced in the
        background, until `close()`. Raises `BrokerUnavailable` when no address answers."""
        if self._open:
            raise RuntimeError("already connected")
        self._open, self._closing = True, False
        self._link_ready.clear()
        self._http = httpx.AsyncClient(timeout=10.0)
        try:
            failures: list[str] = []
            for _ in self._urls:
                try:
                    self._install(await self._open_next())
                    break
                except Exception as error:  # noqa: BLE001  (any failure: try the next address)
                    failures.append(self._describe_failure(error))
            else:
                raise BrokerUnavailable("no AMQP address could be reached: " + "; ".join(failures))
            self._supervisor = asyncio.create_task(self._maintain(), name="mcp-worker-client reconnect")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Fails the calls still waiting (`McpWorkerError`), deletes the reply queue, closes the
        connection and the HTTP client. Safe to call twice. A queue that cannot be deleted now
        (no connection) is deleted by the broker after `reply_queue_expires_secs`."""
        self._closing = True
        self._link_ready.set()  # wakes calls waiting for a connection: they see `_closing`
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        self._fail_pending(McpWorkerError("the client was closed"))
        link, self._link = self._link, None
        if link is not None and not link.lost.is_set():
            try:
                async with asyncio.timeout(self._connect_timeout):
                    if link.consumer_tag is not None:
                        await link.queue.cancel(link.consumer_tag)
                    # Quorum queues refuse if_unused/if_empty: delete it whatever it holds.
                    await link.queue.delete(if_unused=False, if_empty=False)
            except Exception as error:  # noqa: BLE001
                log.warning("could not delete the reply queue (it expires by itself): %r", error)
        if link is not None:
            await self._close_link(link)
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()
        self._open = False

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
        running the tool twice (the worker answers a known `job_id` with its recorded reply). The
        job is published again, same `job_id` and body, after every lost connection until it is
        answered or `timeout` passes.

        Raises:
            NotConnected / ReauthRequired: the user must connect; `.connect_url` says where.
            ToolCallFailed: any other error reply (`code`, `message`, `retryable`).
            CallTimeout: no answer within `timeout` seconds.
            JobNotDelivered: the broker has no queue `jobs_queue`.
            McpWorkerError: the client was closed while waiting.
            ValueError: a call with this `job_id` is already waiting in this client.
        """
        job_id = job_id or str(uuid.uuid4())
        arguments = arguments or {}
        reply = await self._exchange(
            job_id,
            user_id,
            {"tool": tool, "arguments": arguments},
            correlation_id_of(job_id, user_id, tool, arguments),
            timeout,
        )
        return await self._result_of(reply, user_id, job_id, timeout)

    async def list_tools(self, user_id: str, *, timeout: float = 30.0, job_id: str | None = None) -> dict[str, Any]:
        """The tool catalog for `user_id`: every tool the worker routes that this user can see
        now, and the servers that could not be listed for them (docs/CONTRACT.md):

            {"tools": [{"name", "title"?, "description"?, "inputSchema", "outputSchema"?,
                        "annotations"?, "server"}, ...],
             "unavailable": [{"server", "error": {"code", "message", "retryable", "provider"?}}, ...]}

        Both lists are always there (empty when there is nothing). It is a `tools/list` job,
        published, confirmed, resent after a lost connection and deduplicated exactly as `call`'s
        jobs are, with the same `deadline` = `timeout` rule, so what `call` promises about
        delivery holds here too. `job_id` defaults to a new UUID; one given must be this listing's
        alone, never one a call used: a `job_id` belongs to one job.

        The catalog is per user and per moment: a server that takes the user's token lists what
        that token may use, and a server the user has not connected is in `unavailable` (e.g.
        `not_connected`, with its `provider`) while the others' tools still come. So list again
        when the user connects, or at the start of a conversation, rather than keeping one
        catalog for everyone. Hand `function_tools(catalog)` to the model, and
        `connect_urls(user_id, catalog)` (or `connections_needed(catalog)`) to the UI.

        Raises (the same exceptions `call` raises for the same codes):
            ToolCallFailed: an error reply for the whole listing (`invalid_job`, `internal`, ...);
                a server's own failure is an `unavailable` entry instead, not an exception.
            CallTimeout: no answer within `timeout` seconds (or `deadline_exceeded`).
            JobNotDelivered, McpWorkerError, ValueError: as for `call`.
        """
        job_id = job_id or str(uuid.uuid4())
        reply = await self._exchange(
            job_id,
            user_id,
            {"method": TOOLS_LIST},
            correlation_id_of(job_id, user_id, method=TOOLS_LIST),
            timeout,
        )
        catalog = await self._result_of(reply, user_id, job_id, timeout)
        for key in ("tools", "unavailable"):
            if not isinstance(catalog.get(key), list):
                catalog[key] = []
        return catalog

    async def _exchange(
        self, job_id: str, user_id: str, fields: dict[str, Any], correlation_id: str, timeout: float
    ) -> dict[str, Any]:
        """Publishes one job, `fields` (the method's part: the tool and its arguments, or the
        method) in its body beside `job_id`, `user_id` and a `deadline` `timeout` from now, and
        returns its reply: the one machinery behind `call` and `list_tools`, so confirms,
        resends after a reconnect and deduplication by `job_id` are the same for every job."""
        if not self._open:
            raise RuntimeError("not connected: use `async with McpWorkerClient(...)` or `await connect()`")
        if self._closing:
            raise McpWorkerError("the client was closed")
        if job_id in self._pending:
            raise ValueError(f"a job with job_id {job_id} is already waiting in this client")
        deadline = datetime.now(timezone.utc) + timedelta(seconds=timeout)
        body = {
            "job_id": job_id,
            "user_id": user_id,
            **fields,
            "deadline": deadline.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        job = _Job(
            job_id=job_id,
            correlation_id=correlation_id,
            body=json.dumps(body).encode(),
            future=asyncio.get_running_loop().create_future(),
        )
        # Registered before publishing: the reply can arrive before the confirm does.
        self._pending[job_id] = job
        try:
            async with asyncio.timeout(timeout):
                await self._deliver(job)
        except TimeoutError:
            raise CallTimeout(job_id, timeout) from None
        finally:
            if self._pending.get(job_id) is job:
                del self._pending[job_id]
            if not job.future.done():
                job.future.cancel()
        return job.future.result()

    async def _deliver(self, job: _Job) -> None:
        """Publishes `job` and waits for its reply, publishing it again on the next connection
        whenever the one it went out on is lost first. Returns once `job.future` is done."""
        refusals = 0
        while not job.future.done():
            link = await self._wait_for_link()
            if job.future.done():  # answered meanwhile, e.g. failed by close()
                return
            try:
                job.publishes += 1
                if job.publishes > 1:
                    log.info("publishing job %s again (copy %d)", job.job_id, job.publishes)
                await link.channel.default_exchange.publish(
                    self._message(job), routing_key=self._jobs_queue, mandatory=True
                )
            except aio_pika.exceptions.PublishError as error:  # returned: no queue by that name
                raise JobNotDelivered(
                    f"the broker has no queue {self._jobs_queue!r} for job {job.job_id}: {error!r}"
                ) from None
            except aio_pika.exceptions.DeliveryError as error:  # nacked: try again shortly
                refusals += 1
                log.warning("the broker refused job %s (%r); publishing it again", job.job_id, error)
                await asyncio.wait({job.future}, timeout=self._delay(refusals))
                continue
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our caller's cancellation (or the timeout): not a lost connection
                self._lose(link, "publish cancelled")  # aiormq cancels the confirm on a lost link
                continue
            except Exception as error:  # noqa: BLE001  (the connection or channel went: resend)
                log.info("job %s: no confirm (%r); it is published again once reconnected", job.job_id, error)
                self._lose(link, error)
                continue
            refusals = 0
            # Confirmed: wait for the reply, or for this connection to go (then publish again).
            lost = asyncio.ensure_future(link.lost.wait())
            try:
                await asyncio.wait({job.future, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()

    def _message(self, job: _Job) -> aio_pika.Message:
        return aio_pika.Message(
            job.body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=job.job_id,
            correlation_id=job.correlation_id,
            reply_to=self._reply_queue_name,
        )

    async def _wait_for_link(self) -> _Link:
        while True:
            if self._closing:
                raise McpWorkerError("the client was closed")
            link = self._link
            if link is not None and not link.lost.is_set():
                return link
            await self._link_ready.wait()

    # ------------------------------------------------------------------ connections

    async def _open_next(self) -> _Link:
        """Opens a link to the next address in turn (and moves the turn on, success or not)."""
        index = self._next_index
        self._next_index = (index + 1) % len(self._urls)
        connection: aio_pika.abc.AbstractConnection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                connection = await aio_pika.connect(self._urls[index], timeout=self._connect_timeout)
                # on_return_raises: an unroutable job (mandatory) raises at publish, not at timeout.
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                await channel.set_qos(prefetch_count=self._reply_prefetch)
                queue = await channel.declare_queue(
                    self._reply_queue_name,
                    durable=True,
                    arguments={"x-queue-type": "quorum", "x-expires": self._reply_queue_expires_ms},
                )
                link = _Link(index=index, connection=connection, channel=channel, queue=queue)
                connection.close_callbacks.add(lambda _sender, exc=None: self._lose(link, exc))
                channel.close_callbacks.add(lambda _sender, exc=None: self._lose(link, exc))
                # Acked by `_on_reply` once handled: a reply in flight when the link drops is
                # delivered again on the next one instead of being lost.
                link.consumer_tag = await queue.consume(partial(self._on_reply, link), no_ack=False)
                return link
        except BaseException:
            if connection is not None:
                await self._close_connection(connection)
            raise

    def _install(self, link: _Link) -> None:
        self._link = link
        self._link_ready.set()
        log.info("connected to %s", redact(self._urls[link.index]))

    def _lose(self, link: _Link, reason: object) -> None:
        """Marks `link` lost (connection or channel closed, or a publish failed on it)."""
        if link.lost.is_set():
            return
        link.lost.set()
        if self._link is link:
            self._link_ready.clear()
        if not self._closing:
            log.warning("AMQP connection to %s lost: %r", redact(self._urls[link.index]), reason)

    async def _maintain(self) -> None:
        """Replaces a lost link, address after address, until `close()` cancels it."""
        while True:
            link = self._link
            if link is not None:
                await link.lost.wait()
                await self._close_link(link)  # a channel may be gone with its connection still up
                if self._link is link:
                    self._link = None
            failures = 0
            while True:
                # The first round over the addresses goes at once; then each attempt waits.
                if failures >= len(self._urls):
                    await asyncio.sleep(self._delay(failures - len(self._urls) + 1))
                try:
                    link = await self._open_next()
                except Exception as error:  # noqa: BLE001
                    failures += 1
                    log.warning("reconnect attempt %d failed: %s", failures, self._describe_failure(error))
                    continue
                break
            self.reconnects += 1
            self._install(link)

    def _delay(self, attempt: int) -> float:
        """The wait before retry `attempt` (1-based): doubling, at most the maximum, with jitter."""
        first, most = self._backoff
        return min(most, first * 2 ** min(attempt - 1, 30)) * random.uniform(0.5, 1.0)

    def _describe_failure(self, error: BaseException) -> str:
        """Which address failed and how, with any of the addresses' passwords taken out."""
        index = (self._next_index - 1) % len(self._urls)
        text = str(error)
        for url in self._urls:
            password = URL(url).password
            if password:
                text = text.replace(password, "******")
        return f"{redact(self._urls[index])}: {type(error).__name__} {text[:200]}".rstrip()

    async def _close_link(self, link: _Link) -> None:
        link.lost.set()
        await self._close_connection(link.connection)

    @staticmethod
    async def _close_connection(connection: aio_pika.abc.AbstractConnection) -> None:
        if connection.is_closed:
            return
        try:
            async with asyncio.timeout(5):
                await connection.close()
        except Exception as error:  # noqa: BLE001  (it is going anyway)
            log.debug("closing a connection: %r", error)

    # ------------------------------------------------------------------ HTTP API

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

    async def connect_urls(self, user_id: str, catalog: dict[str, Any]) -> dict[str, str]:
        """A fresh authorize URL for each provider `user_id` must connect before the catalog's
        unavailable servers can be listed (`connections_needed(catalog)`), by provider: one URL
        per provider, however many of its servers are unavailable. Empty when none is needed.

        Each URL starts a flow (`connect_url`), valid for a limited time and once: ask for them
        when you are about to show them, not for every listing."""
        urls: dict[str, str] = {}
        for needed in connections_needed(catalog, default_provider=self._provider):
            if needed.provider not in urls:
                urls[needed.provider] = await self.connect_url(user_id, needed.provider)
        return urls

    async def _result_of(self, reply: dict[str, Any], user_id: str, job_id: str, timeout: float) -> dict[str, Any]:
        """The reply's result, or the typed exception its error code calls for (for a call's
        reply and a listing's alike)."""
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

    async def _on_reply(self, link: _Link, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Hands a reply to the call waiting for its job, then acks it. Deduplicated by `job_id`:
        the first reply for a waiting job wins; later copies, and replies nobody waits for, are
        acked and dropped."""
        try:
            self._take_reply(message)
        finally:
            try:
                await message.ack()
            except Exception as error:  # noqa: BLE001
                # The link went: the broker delivers the reply again, and it is dropped then.
                log.debug("could not ack a reply on a lost connection: %r", error)

    def _take_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        correlation_id = message.correlation_id or ""
        try:
            reply = json.loads(message.body)
            if not isinstance(reply, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            job = next((j for j in self._pending.values() if j.correlation_id == correlation_id), None)
            if job is not None and not job.future.done():
                job.future.set_exception(McpWorkerError(f"unreadable reply: {error}"))
            else:
                self.replies_dropped += 1
            return
        job_id = reply.get("job_id")
        if isinstance(job_id, str):
            job = self._pending.get(job_id)
        else:  # the worker could not read a job_id (it never happens to this client's jobs)
            job = next((j for j in self._pending.values() if j.correlation_id == correlation_id), None)
        if job is None or job.correlation_id != correlation_id or job.future.done():
            self.replies_dropped += 1
            log.debug("dropping a duplicate reply, or one nobody waits for (job %s)", job_id)
            return
        job.future.set_result(reply)

    def _fail_pending(self, error: McpWorkerError) -> None:
        for job in self._pending.values():
            if not job.future.done():
                job.future.set_exception(error)
