"""Operator limits on what a client may send: a cap on the request body (413 before parsing) and a deadline for a
request to arrive (a connection that sends half a request, or nothing, is closed).

The body cap is an ASGI middleware; the read deadline needs the HTTP protocol itself (no ASGI app sees a request
whose headers never finish), so it is uvicorn's h11 protocol with a timer.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from shardllm.entrypoints.openai.protocol import APIError, error_body

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 2**20  # 4 MiB: a 128k-token prompt is well under 1 MiB of JSON
DEFAULT_REQUEST_READ_TIMEOUT_S = 30.0  # headers and body of one request must arrive within it
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after it (uvicorn's default)


def _too_large_message(limit: int) -> str:
    return (f"The request body is larger than this server's limit of {limit} bytes "
            "(the operator sets it with --max_request_body_bytes).")


class BodySizeLimitMiddleware:
    """Answers 413 in OpenAI's error shape to a body over `max_bytes`: at once when Content-Length says so (the body
    is never read), else as soon as the bytes received pass the limit (a chunked body)."""

    def __init__(self, app, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be >= 1, got {max_bytes}")
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, error_body(_too_large_message(self.max_bytes), code="request_too_large"),
                                    close=True)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # raised inside request.body(): the app's handler answers 413
                    raise APIError(_too_large_message(self.max_bytes), 413, code="request_too_large")
            return message

        await self.app(scope, counting_receive, send)


async def _send_json(send, status: int, body: dict, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:  # the unread body must not be taken for the next request on this connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class ReadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading a request: from the connection's start (or the first byte
    of the next request on it) until the request's last body byte. A client slower than that is disconnected, so
    half-sent requests cannot hold connections (and their tasks) forever. Set `read_timeout` on the class
    (`with_read_timeout`)."""

    read_timeout: float = DEFAULT_REQUEST_READ_TIMEOUT_S

    @classmethod
    def with_read_timeout(cls, seconds: float) -> type[ReadTimeoutH11Protocol]:
        if not seconds > 0:
            raise ValueError(f"request_read_timeout must be > 0 seconds, got {seconds}")
        return type("ReadTimeoutH11Protocol", (cls,), {"read_timeout": float(seconds)})

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._arm_read_deadline()

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm_read_deadline()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.SEND_BODY and self.conn.their_state is not h11.IDLE:
            self._disarm_read_deadline()  # the whole request is in (or the connection is over)

    def connection_lost(self, exc) -> None:
        self._disarm_read_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm_read_deadline()  # uvicorn's keep-alive timer watches the idle connection now

    def _arm_read_deadline(self) -> None:
        self._disarm_read_deadline()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm_read_deadline(self) -> None:
        handle = getattr(self, "_read_deadline", None)
        if handle is not None:
            handle.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info("closing the connection of %s: no complete request within %.0f s", client, self.read_timeout)
            self.transport.close()  # the app, if it waits on the body, sees a disconnect
