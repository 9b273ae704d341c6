"""Small pieces of the server's responses: a request's disconnect, several generators merged as they come, and the
JSON encodings of a body and of a server-sent event."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request

from shardllm.outputs import RequestOutput


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merge(gens: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index of the generator, output) from several generators as they come."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen) -> None:
        try:
            async for out in gen:
                q.put_nowait((i, out))
            q.put_nowait((i, None))
        except Exception as e:
            q.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item = await q.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def json_bytes(obj: dict) -> bytes:
    """As Starlette's JSONResponse encodes a body."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


def sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def chunk_encoder(envelope: dict) -> Callable[[dict], str]:
    """The SSE events of one stream's chunks: `envelope` is a chunk's constant part (id, object, created, model,
    usage), and the returned function takes the chunk's one choice and gives the same string as
    `sse_event({**envelope, "choices": [choice]})`, with the envelope encoded once per stream instead of once per
    token (a streamed token's JSON was a tenth of the server's GIL time at GPU rates)."""
    marker = uuid.uuid4().hex
    head, tail = json.dumps({**envelope, "choices": [marker]}, ensure_ascii=False).split(f'"{marker}"')
    head, tail = "data: " + head, tail + "\n\n"
    return lambda choice: head + json.dumps(choice, ensure_ascii=False) + tail
