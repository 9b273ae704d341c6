"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncLLM, served by uvicorn.

Every bad input is answered with a 4xx in OpenAI's error shape before it reaches the engine; a client
that disconnects aborts its requests (their KV blocks are freed at the engine's next step).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from shardllm import __version__
from shardllm.engine.async_llm import AsyncLLM, PromptTooLongError, failure_summary
from shardllm.engine.detokenizer import TokenBytes
from shardllm.entrypoints.openai import validation
from shardllm.entrypoints.openai.errors import (
    ClientGone,
    api_error_response,
    http_error_response,
    internal_errors,
    request_validation_response,
    stream_error,
)
from shardllm.entrypoints.openai.lifecycle import (
    log_stream_gone,
    watch_engine,
)
from shardllm.entrypoints.openai.logprobs import CompletionLogprobs, chat_logprobs, join_completion_logprobs
from shardllm.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    usage,
    validation_error,
)
from shardllm.entrypoints.openai.streaming import chunk_encoder, json_bytes, merge, sse_event, wait_disconnect
from shardllm.metrics.gpu_monitor import GPUMonitor
from shardllm.metrics.prometheus import make_registry, render
from shardllm.outputs import RequestOutput

logger = logging.getLogger(__name__)

_PARSE_INLINE_BYTES = 64 * 1024  # bodies larger than this are parsed in a worker thread


class OpenAIServer:
    """The routes of one served model. `app` is the ASGI application."""

    def __init__(self, llm: AsyncLLM, served_model_name: str, api_key: str | None = None,
                 max_seqs_per_request: int = validation.DEFAULT_MAX_SEQS_PER_REQUEST):
        self.llm = llm
        self.max_seqs_per_request = max_seqs_per_request
        self.on_engine_dead = None  # run_server: stop uvicorn; the process then exits EXIT_ENGINE_DEAD
        self.before_engine_stop = None  # run_server: with several API servers, stop and wait for the others
        self.engine_died = False
        # tokenization and chat templates run off the event loop, in one thread (a tokenizer is not re-entrant)
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="shardllm-tokenize")
        self.model_name = served_model_name
        self.api_key = api_key or None
        self.created = int(time.time())
        self.vocab_size = llm.config.model_config.hf_config.vocab_size
        self.max_prompt_chars = validation.max_prompt_chars(llm.tokenizer, llm.max_model_len)
        self.gpu_monitor = GPUMonitor.for_engine(llm.config)  # NVML polled in a thread from start-up to shutdown
        self.registry = make_registry(lambda: llm.snapshot, llm.latency, served_model_name, self.gpu_monitor)
        self.app = self._build_app()

    # ---- app -----------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI):
            watchdog = asyncio.ensure_future(watch_engine(self.llm, self._engine_dead))
            self.gpu_monitor.start()
            yield
            watchdog.cancel()
            self.gpu_monitor.stop()
            self._tokenize_pool.shutdown(wait=False)
            await asyncio.to_thread(self._stop_engine)

        # No /docs, /redoc or /openapi.json (they would sit outside the API key; docs/openai_api.md is the
        # reference); no redirect of a trailing slash (a 307 echoing the client's Host, before the key check)
        app = FastAPI(title="shardllm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                      openapi_url=None, redirect_slashes=False)
        app.add_exception_handler(APIError, api_error_response)
        app.add_exception_handler(StarletteHTTPException, self._http_error)
        app.add_exception_handler(RequestValidationError, request_validation_response)
        get = ["GET", "HEAD"]  # HEAD: load balancers' probes
        app.add_api_route("/health", self.health, methods=get)
        app.add_api_route("/version", self.version, methods=get)
        app.add_api_route("/metrics", self.metrics, methods=get)
        v1 = APIRouter(prefix="/v1", dependencies=[Depends(self._check_api_key)])
        v1.add_api_route("/models", self.list_models, methods=get)
        v1.add_api_route("/models/{model:path}", self.get_model, methods=get)
        v1.add_api_route("/completions", internal_errors(self.completions), methods=["POST"])
        v1.add_api_route("/chat/completions", internal_errors(self.chat_completions), methods=["POST"])
        app.include_router(v1)
        return app

    def _stop_engine(self) -> None:
        if self.before_engine_stop is not None:
            self.before_engine_stop()
        logger.info("detaching from the engine" if getattr(self.llm, "attached", False) else "stopping the engine")
        self.llm.shutdown()

    def _engine_dead(self) -> None:
        self.engine_died = True
        if self.on_engine_dead is not None:
            self.on_engine_dead()

    async def _http_error(self, request: Request, e: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith("/v1/") and e.status_code in (404, 405):
            try:  # an unknown /v1 path asks for the key first: without it, nothing about the API is told
                await self._check_api_key(request)
            except APIError as auth:
                return await api_error_response(request, auth)
        if e.status_code == 404:
            e = StarletteHTTPException(404, self._not_found_message(request.url.path))
        return await http_error_response(request, e)

    def _not_found_message(self, path: str) -> str:
        """The 404's message: the path without its trailing slash where that is a route, else the routes."""
        routes = ("/health", "/version", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
        path = path if len(path) <= 200 else path[:200] + "..."
        if path.endswith("/") and path.rstrip("/") in routes:
            return f"Not Found: {path!r} is not a route; {path.rstrip('/')!r} is (without the trailing slash)."
        return f"Not Found: {path!r} is not a route. Routes: {', '.join(routes)}."

    async def _check_api_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError("Missing or incorrect API key: send the header 'Authorization: Bearer <key>'.",
                           401, param=None, code="invalid_api_key")

    # ---- small endpoints -----------------------------------------------------------------------------------
    async def health(self) -> Response:
        if self.llm.is_healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body(self._unhealthy_message(), "service_unavailable"), status_code=503)

    async def version(self) -> dict:
        return {"version": __version__}

    async def metrics(self) -> Response:
        return Response(render(self.registry), media_type=CONTENT_TYPE_LATEST)

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "shardllm",
                "root": self.llm.config.model_config.model, "max_model_len": self.llm.max_model_len}

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model: str) -> dict:
        self._check_model(model)
        return self._model_card()

    def _unhealthy_message(self) -> str:
        err = self.llm.error
        if err is None:
            return "the engine is not serving (shutting down)"
        return f"the engine failed: {failure_summary(err)} (details in the server log)"

    # ---- request parsing -----------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           404, param="model", code="model_not_found")

    async def _parse(self, request: Request, model_cls):
        body = await request.body()
        if len(body) > _PARSE_INLINE_BYTES:  # a large body parses off the event loop
            data = await asyncio.to_thread(validation.parse_json_object, body)
        else:
            data = validation.parse_json_object(body)
        validation.check_supported_fields(data, model_cls)
        try:
            req = model_cls.model_validate(data)
        except ValidationError as e:
            raise validation_error(e, data) from None
        self._check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        validation.check_stop(req.stop, req.stop_token_ids, self.vocab_size)
        req.token_logit_bias(self.vocab_size)  # token ids of this vocabulary, checked before anything runs
        if not self.llm.is_healthy:
            raise APIError(self._unhealthy_message(), 503, type="service_unavailable")
        return req

    def _check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """Refuse what cannot fit the context; returns the max_tokens to use (the rest of it by default)."""
        max_len = self.llm.max_model_len
        if num_prompt_tokens >= max_len:
            what = "the messages make" if param == "messages" else f"the {param} has"
            raise APIError(f"This model's maximum context length is {max_len} tokens, but {what} "
                           f"{num_prompt_tokens} tokens: shorten it to at most {max_len - 1} tokens.",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            return max_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > max_len:
            raise APIError(f"This model's maximum context length is {max_len} tokens. However, you requested "
                           f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, "
                           f"{max_tokens} for the completion). Reduce the {param} or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def _too_long(self, e: PromptTooLongError, param: str) -> APIError:
        max_len, verb = self.llm.max_model_len, "have" if param == "messages" else "has"
        return APIError(f"This model's maximum context length is {max_len} tokens, but the {param} "
                        f"({e.chars} characters) {verb} more: its first {e.head_chars} characters alone make "
                        f"{e.head_tokens} tokens. Shorten it.", param=param, code="context_length_exceeded")

    def _prompt_ids(self, prompt) -> list[tuple[str | None, list[int]]]:
        prompts = validation.split_prompts(prompt)
        if not prompts:
            raise APIError("'prompt' must not be empty.", param="prompt")
        result = []
        for p in prompts:
            if isinstance(p, str):
                cut = self.max_prompt_chars
                try:
                    if cut is not None and len(p) > cut:  # the head first: past the context, the rest is not read
                        head = len(self.llm.tokenize(p[:cut]))
                        if head > self.llm.max_model_len:
                            raise self._too_long(PromptTooLongError(len(p), cut, head), "prompt")
                    ids = self.llm.tokenize(p)
                except (ValueError, TypeError) as e:
                    raise APIError(f"the prompt could not be tokenized: {e}", param="prompt") from None
                result.append((p, ids))
            else:
                bad = [t for t in p if not 0 <= t < self.vocab_size]
                if bad:
                    raise APIError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).",
                                   param="prompt")
                result.append((None, list(p)))
            if not result[-1][1]:
                raise APIError("'prompt' must not be empty: give at least one token.", param="prompt")
        return result

    # ---- completions ---------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        if req.suffix:
            raise APIError("'suffix' is not supported.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError("'best_of' other than n is not supported.", param="best_of")
        validation.check_num_seqs(len(validation.split_prompts(req.prompt)), req.n, self.max_seqs_per_request)
        prompts = await self._off_loop(self._prompt_ids, req.prompt)
        params = [req.sampling_params(self._check_length(len(ids), req.max_tokens, "prompt"), req.logprobs)
                  for _, ids in prompts]
        if req.echo and req.logprobs is not None:  # echo + logprobs: the prompt tokens' logprobs lead the lists
            params = [p.clone(prompt_logprobs=req.logprobs) for p in params]
        rid = f"cmpl-{uuid.uuid4().hex}"
        sub_ids = [f"{rid}-{i}" for i in range(len(prompts))]
        gens = [self.llm.generate(ids, p, sid) for (_, ids), p, sid in zip(prompts, params, sub_ids)]
        echo = [self._echo_text(text, ids) if req.echo else "" for text, ids in prompts]
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        if req.stream:
            return self._sse(self._stream_completion(req, rid, gens, echo, num_prompt_tokens), sub_ids)
        finals = await self._collect(request, gens)

        def body() -> dict:
            choices, num_completion_tokens = [], 0
            for p_idx, out in enumerate(finals):
                for o in out.outputs:
                    num_completion_tokens += len(o.token_ids)
                    lp = None
                    if req.logprobs is not None:
                        builder = CompletionLogprobs(req.logprobs, self._token_bytes)
                        parts = [self._echo_logprobs(builder, out)] if req.echo else []
                        lp = join_completion_logprobs([*parts, builder.add(o.token_ids, o.logprobs or [])])
                    choices.append({"index": p_idx * req.n + o.index, "text": echo[p_idx] + o.text, "logprobs": lp,
                                    "finish_reason": o.finish_reason})
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                    "choices": choices, "usage": usage(num_prompt_tokens, num_completion_tokens)}

        return await self._json_off_loop(body)

    async def _json_off_loop(self, body) -> Response:
        """The JSON response of `body()`, built and encoded in the tokenizer's thread (logprobs decode tokens
        there), not on the event loop: echo + logprobs at n = 128 is tens of MB, seconds of work."""
        return Response(await self._off_loop(lambda: json_bytes(body())), media_type="application/json")

    @property
    def _token_bytes(self) -> TokenBytes | None:
        """Each token's own bytes, for logprobs (built on first use: it reads the tokenizer's decoder)."""
        if self._token_bytes_fn is None and self.llm.tokenizer is not None:
            self._token_bytes_fn = TokenBytes(self.llm.tokenizer)
        return self._token_bytes_fn

    _token_bytes_fn: TokenBytes | None = None

    @staticmethod
    def _echo_logprobs(builder: CompletionLogprobs, out: RequestOutput) -> dict:
        ids = out.prompt_token_ids
        return builder.add(ids, out.prompt_logprobs or [None] * len(ids))

    def _echo_text(self, text: str | None, ids: list[int]) -> str:
        if text is not None:
            return text
        return self.llm.tokenizer.decode(ids) if self.llm.tokenizer is not None else ""

    async def _stream_completion(self, req: CompletionRequest, rid: str, gens: list, echo: list[str],
                                 num_prompt_tokens: int) -> AsyncIterator[str]:
        created, include_usage = int(time.time()), bool(req.stream_options and req.stream_options.include_usage)
        sent_chars: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}  # logprob entries sent, per choice
        builders: dict[int, CompletionLogprobs] = {}  # text offsets carry on from chunk to chunk
        done: set[int] = set()
        num_completion_tokens = 0

        encode = chunk_encoder({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                "choices": None, **({"usage": None} if include_usage else {})})

        def chunk(index: int, text: str, logprobs, finish_reason) -> str:
            return encode({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})

        try:
            async for p_idx, out in merge(gens):
                for o in out.outputs:
                    key = p_idx * req.n + o.index
                    if key in done:
                        continue
                    n_chars, n_tok = sent_chars.get(key), sent_tokens.get(key, 0)
                    prefix = echo[p_idx] if n_chars is None else ""
                    delta = o.text[n_chars or 0:]  # the engine's text only grows (stop-string tails held back)
                    # one entry per token of this output (never more: the lists are zipped below)
                    lp, num_entries = None, min(len(o.logprobs or ()), len(o.token_ids))
                    if req.logprobs is not None and (num_entries > n_tok or n_chars is None):
                        # every token's logprobs as soon as it exists, whatever text is held back: the chunks'
                        # lists join into the non-streamed ones
                        builder = builders.get(key)
                        if builder is None:
                            builder = builders[key] = CompletionLogprobs(req.logprobs, self._token_bytes)
                        parts = [self._echo_logprobs(builder, out)] if req.echo and n_chars is None else []
                        lp = join_completion_logprobs(
                            [*parts, builder.add(o.token_ids[n_tok:num_entries],
                                                 (o.logprobs or [])[n_tok:num_entries])])
                    if prefix or delta or (lp and lp["tokens"]) or o.finish_reason:
                        yield chunk(key, prefix + delta, lp, o.finish_reason)
                    sent_chars[key], sent_tokens[key] = len(o.text), num_entries
                    if o.finish_reason is not None:
                        done.add(key)
                        num_completion_tokens += len(o.token_ids)
            if include_usage:
                yield sse_event({"id": rid, "object": "text_completion", "created": created,
                                  "model": self.model_name, "choices": [],
                                  "usage": usage(num_prompt_tokens, num_completion_tokens)})
        except Exception as e:
            yield sse_event(stream_error(e))
        yield "data: [DONE]\n\n"

    # ---- chat ----------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
        validation.check_num_seqs(1, req.n, self.max_seqs_per_request)
        try:
            ids = await self._off_loop(self.llm.apply_chat_template, [m.template_dict() for m in req.messages],
                                       None, self.max_prompt_chars)
        except PromptTooLongError as e:
            raise self._too_long(e, "messages") from None
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        except Exception as e:  # a template that raises on these messages (jinja's TemplateError and kin)
            raise APIError(f"the chat template failed on these messages: {e}", param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._check_length(len(ids), max_tokens, "messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling_params(max_tokens, k)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = self.llm.generate(ids, params, rid)
        if req.stream:
            return self._sse(self._stream_chat(req, rid, gen, len(ids)), [rid])
        (out,) = await self._collect(request, [gen])

        def body() -> dict:
            # `refusal` is required (nullable) on the message and on logprobs in OpenAI's schema
            choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text, "refusal": None},
                        "logprobs": chat_logprobs(o, 0, len(o.token_ids), k, self._token_bytes) if k is not None
                        else None, "finish_reason": o.finish_reason} for o in out.outputs]
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                    "choices": choices, "usage": usage(len(ids), sum(len(o.token_ids) for o in out.outputs))}

        return await self._json_off_loop(body)

    async def _stream_chat(self, req: ChatCompletionRequest, rid: str, gen, num_prompt_tokens: int
                           ) -> AsyncIterator[str]:
        created, include_usage = int(time.time()), bool(req.stream_options and req.stream_options.include_usage)
        k = (req.top_logprobs or 0) if req.logprobs else None
        sent_chars = [0] * req.n
        sent_tokens = [0] * req.n
        done: set[int] = set()
        num_completion_tokens = 0

        encode = chunk_encoder({"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_name, "choices": None,
                                **({"usage": None} if include_usage else {})})

        def chunk(index: int, delta: dict, logprobs, finish_reason) -> str:
            return encode({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})

        try:
            for i in range(req.n):
                yield chunk(i, {"role": "assistant", "content": ""}, None, None)
            async for out in gen:
                for o in out.outputs:
                    i = o.index
                    if i in done:
                        continue
                    delta = o.text[sent_chars[i]:]  # the engine's text only grows (stop-string tails held back)
                    lp, num_entries = None, min(len(o.logprobs or ()), len(o.token_ids))
                    if k is not None and num_entries > sent_tokens[i]:
                        lp = chat_logprobs(o, sent_tokens[i], num_entries, k, self._token_bytes)
                    if delta or lp or o.finish_reason:
                        yield chunk(i, {"content": delta} if delta else {}, lp, o.finish_reason)
                    sent_chars[i], sent_tokens[i] = len(o.text), num_entries
                    if o.finish_reason is not None:
                        done.add(i)
                        num_completion_tokens += len(o.token_ids)
            if include_usage:
                yield sse_event({"id": rid, "object": "chat.completion.chunk", "created": created,
                                  "model": self.model_name, "choices": [],
                                  "usage": usage(num_prompt_tokens, num_completion_tokens)})
        except Exception as e:
            yield sse_event(stream_error(e))
        yield "data: [DONE]\n\n"

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    # ---- running requests ----------------------------------------------------------------------------------
    def _sse(self, body: AsyncIterator[str], request_ids: list[str]) -> StreamingResponse:
        # After the stream ends (a disconnect included) abort whatever is still running: the body
        # generator may be left suspended rather than closed when the client goes away.
        sent_all = []

        async def tracked() -> AsyncIterator[str]:
            async for event in body:
                yield event
            sent_all.append(True)

        def after() -> None:
            for r in request_ids:
                self.llm.abort(r)
            if not sent_all:
                log_stream_gone(request_ids[0].rsplit("-", 1)[0] if len(request_ids) > 1 else request_ids[0])

        return StreamingResponse(tracked(), media_type="text/event-stream", background=BackgroundTask(after),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _collect(self, request: Request, gens: list) -> list[RequestOutput]:
        """Run generators to their last output; cancel them all if one fails or the client disconnects."""

        async def last(gen) -> RequestOutput:
            final = None
            async for out in gen:
                final = out
            return final

        tasks = [asyncio.ensure_future(last(g)) for g in gens]
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            pending = set(tasks)
            while pending:
                done, _ = await asyncio.wait(pending | {watcher}, return_when=asyncio.FIRST_COMPLETED)
                if watcher in done:
                    raise ClientGone()
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
                pending -= done
            return [t.result() for t in tasks]
        finally:
            watcher.cancel()
            for t in tasks:
                t.cancel()
