#!/usr/bin/env python3
"""The old backend's job path, as a benchmark peer for mcp-worker.

Per job it does what the Python chat backend did for a Qlik tool call (see
shared/seed): read the user's token with motor (`find_one` on `qlik_tokens`,
plain text as the old backend stored it), POST a JSON-RPC `tools/call` with
httpx carrying `X-Qlik-Access-Token`, publish the result to the job's
`reply_to` with a publisher confirm (aio-pika's default), then ack. Messages
are handled concurrently, up to the prefetch count, as aio-pika's consumer
does by default.

    python_peer.py --amqp URL --queue Q --mongodb URI --database DB --mcp URL [--prefetch N]

It runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import aio_pika
import httpx
from motor.motor_asyncio import AsyncIOMotorClient


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amqp", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--mongodb", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--mcp", required=True)
    parser.add_argument("--prefetch", type=int, default=64)
    args = parser.parse_args()

    tokens = AsyncIOMotorClient(args.mongodb)[args.database]["qlik_tokens"]
    http = httpx.AsyncClient(timeout=30)
    connection = await aio_pika.connect_robust(args.amqp)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=args.prefetch)
    queue = await channel.declare_queue(args.queue, durable=True, arguments={"x-queue-type": "quorum"})

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        job = json.loads(message.body)
        document = await tokens.find_one({"user_id": job["user_id"]})
        headers = {"Accept": "application/json, text/event-stream"}
        if document is not None:
            headers["X-Qlik-Access-Token"] = document["access_token"]
        request = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": job["tool"], "arguments": job.get("arguments", {})},
        }
        response = await http.post(args.mcp, json=request, headers=headers)
        reply = {"status": "ok", "job_id": job["job_id"], "result": response.json().get("result")}
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(reply).encode(),
                content_type="application/json",
                correlation_id=message.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=message.reply_to,
        )
        await message.ack()

    await queue.consume(handle)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("python peer: consuming", flush=True)
    await stop.wait()
    await connection.close()
    await http.aclose()


if __name__ == "__main__":
    asyncio.run(main())
