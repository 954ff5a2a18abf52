#!/usr/bin/env python3
"""Calls one tool for one user through mcp-worker and prints the result, or where to send the
user when they must connect first; or lists the tools that user can use.

    example.py --user u-42 --tool qlik_whoami [--args '{"k": 1}'] [--timeout 60]
    example.py --user u-42 --list-tools [--timeout 60]

`--list-tools` prints one line per tool, `name<TAB>server<TAB>description` (the description as
the model would get it from `function_tools`, first line), then one line per server that could
not be listed: `server: code: message`, and for those the user must connect, `send the user to:
<url>`.

Settings come from options or the environment (options win):

    --amqp-url      MCP_CLIENT_AMQP_URL      default amqp://guest:guest@127.0.0.1:5672/%2f; a
                                             cluster's nodes: repeat the option, or list them in
                                             the variable separated by spaces or commas, or as a
                                             JSON array (as the worker's MCP_WORKER_AMQP__URLS)
    --jobs-queue    MCP_CLIENT_JOBS_QUEUE    default mcp.tool_calls
    --api-url       MCP_CLIENT_API_URL       default http://127.0.0.1:8080
    (no option)     MCP_CLIENT_SERVICE_KEY   required: the worker's http.service_key; only read
                                             from the environment, so it is not in `ps` output
    --return-to     MCP_CLIENT_RETURN_TO     where the connect flow ends (default: the worker's)

Exit status: 0 the tool ran (its result may still be `isError: true`), or the tools were listed
(some servers may be unavailable, as printed), 2 the user must connect (the URL is printed),
3 another error reply, 1 no answer or no broker.

Against `scripts/run --keep`: MCP_CLIENT_SERVICE_KEY=dev-service-key example.py --user demo-user
--tool qlik_whoami.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys

import aio_pika.exceptions

from mcp_worker_client import (
    CallTimeout,
    McpWorkerClient,
    McpWorkerError,
    NeedsConnect,
    ToolCallFailed,
    connections_needed,
    function_tools,
)


def amqp_urls(value: str) -> list[str]:
    """One address, or several: a JSON array, or separated by spaces or commas (a comma in a
    password is written %2C)."""
    value = value.strip()
    if value.startswith("["):
        urls = json.loads(value)
        if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
            raise ValueError("a JSON array of URLs was expected")
        return urls
    return [url for url in re.split(r"[\s,]+", value) if url]


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--user", required=True, help="whose token the call uses")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--tool", help="the tool to call")
    what.add_argument("--list-tools", action="store_true", help="list the tools the user can use instead")
    parser.add_argument("--args", default="{}", help="the tool's arguments, a JSON object")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    parser.add_argument("--amqp-url", action="append", help="a broker address; repeat it for a cluster's nodes")
    parser.add_argument("--jobs-queue", default=env("MCP_CLIENT_JOBS_QUEUE", "mcp.tool_calls"))
    parser.add_argument("--api-url", default=env("MCP_CLIENT_API_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--return-to", default=env("MCP_CLIENT_RETURN_TO"))
    args = parser.parse_args()
    try:
        args.arguments = json.loads(args.args)
    except ValueError as error:
        parser.error(f"--args is not JSON: {error}")
    if not isinstance(args.arguments, dict):
        parser.error("--args must be a JSON object")
    try:
        args.amqp_urls = args.amqp_url or amqp_urls(env("MCP_CLIENT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    except ValueError as error:
        parser.error(f"MCP_CLIENT_AMQP_URL: {error}")
    if not args.amqp_urls:
        parser.error("MCP_CLIENT_AMQP_URL lists no address")
    args.service_key = env("MCP_CLIENT_SERVICE_KEY")
    if not args.service_key:
        parser.error("set MCP_CLIENT_SERVICE_KEY to the worker's http.service_key")
    return args


async def print_tools(client: McpWorkerClient, args: argparse.Namespace) -> int:
    """Prints the user's catalog (see the module doc); the connect URLs are asked for only when
    some server needs the user to connect."""
    catalog = await client.list_tools(args.user, timeout=args.timeout)
    servers = {tool["name"]: tool.get("server", "?") for tool in catalog["tools"]}
    for entry in function_tools(catalog):
        function = entry["function"]
        summary = function["description"].strip().splitlines()[0]
        print(f"{function['name']}\t{servers.get(function['name'], '?')}\t{summary}")
    to_connect = {needed.server: needed.provider for needed in connections_needed(catalog)}
    urls = await client.connect_urls(args.user, catalog) if to_connect else {}
    for unavailable in catalog["unavailable"]:
        error = unavailable.get("error") or {}
        line = f"{unavailable.get('server')}: {error.get('code')}: {error.get('message', '')}"
        url = urls.get(to_connect.get(str(unavailable.get("server", ""))) or "")
        print(f"{line}: send the user to: {url}" if url else line)
    return 0


async def main() -> int:
    args = parse_args()
    client = McpWorkerClient(
        amqp_urls=args.amqp_urls,
        api_url=args.api_url,
        service_key=args.service_key,
        jobs_queue=args.jobs_queue,
        return_to=args.return_to,
    )
    try:
        async with client:
            if args.list_tools:
                return await print_tools(client, args)
            result = await client.call(args.user, args.tool, args.arguments, timeout=args.timeout)
    except NeedsConnect as needed:  # NotConnected or ReauthRequired
        reason = "is not connected" if needed.code == "not_connected" else "must connect again"
        print(f"{args.user} {reason} ({needed.provider or 'qlik'}): send the user to: {needed.connect_url}")
        return 2
    except ToolCallFailed as failed:
        later = " (retryable: try again later)" if failed.retryable else ""
        print(f"error reply {failed.code}{later}: {failed.message}", file=sys.stderr)
        return 3
    except CallTimeout as timeout:
        print(f"no answer: {timeout}", file=sys.stderr)
        return 1
    except (McpWorkerError, OSError, aio_pika.exceptions.AMQPError) as error:
        print(f"failed: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
