"""What escapes a route or a stream, mapped to OpenAI's error shape: bad input 400, a request that failed in the
engine 500, a dead engine 503, a client that went away 499 (logged as one line), anything else 500 with a log."""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from shardllm.engine.async_llm import EngineDeadError, RequestAbortedError, RequestFailedError
from shardllm.entrypoints.openai.lifecycle import log_client_gone
from shardllm.entrypoints.openai.protocol import APIError, error_body

logger = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected while its request ran (the route aborts the request's generation)."""


def stream_error(e: Exception) -> dict:
    if isinstance(e, APIError):
        return e.body()
    if isinstance(e, (EngineDeadError, RequestAbortedError)):
        return error_body(str(e), "service_unavailable")
    if isinstance(e, RequestFailedError):
        return error_body(str(e), "server_error")
    if isinstance(e, (ValueError, TypeError)):
        return error_body(str(e))
    logger.exception("error while streaming")
    return error_body(f"internal error: {e!r}", "server_error")


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: a message that quotes the client's input stays encodable whatever it holds
    (Starlette's JSONResponse writes UTF-8, which a lone surrogate cannot be)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def api_error_response(request: Request, e: APIError) -> JSONResponse:
    return ErrorResponse(e.body(), status_code=e.status_code)


async def http_error_response(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return ErrorResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                         headers=getattr(e, "headers", None))


async def request_validation_response(request: Request, e: RequestValidationError) -> JSONResponse:
    return ErrorResponse(error_body(str(e.errors()[:1])), status_code=400)


def internal_errors(handler):
    """Map what escapes a route to OpenAI's shape: bad input 400, a dead engine 503, the rest 500."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError:
            raise
        except ClientGone:
            log_client_gone(request, "while waiting for its answer")
            return Response(status_code=499)
        except ClientDisconnect:
            log_client_gone(request, "while sending its request")
            return Response(status_code=499)
        except (EngineDeadError, RequestAbortedError) as e:
            raise APIError(str(e), 503, type="service_unavailable") from None
        except RequestFailedError as e:  # this request alone failed in the engine; it is logged there
            raise APIError(str(e), 500, type="server_error") from None
        except (ValueError, TypeError) as e:
            raise APIError(str(e)) from None
        except Exception as e:
            logger.exception("request failed")
            raise APIError(f"internal error: {e!r}", 500, type="server_error") from None

    return wrapped
