"""Imported at start-up by a test server (PYTHONPATH): a request whose max_tokens is 7 gets a logits processor
that raises at its third token, a real fault in that one request's sampling (test_request_fault_http.py)."""

import dataclasses

from shardllm.engine import async_llm

FAULT_MAX_TOKENS = 7
_generate = async_llm.AsyncFrontEnd.generate


def explode_after_two(output_ids, logits):
    if len(output_ids) >= 2:
        raise RuntimeError("logits processor exploded")
    return logits


def _generate_with_fault(self, prompt, params, *args, **kwargs):
    if params.max_tokens == FAULT_MAX_TOKENS:
        params = dataclasses.replace(params, logits_processors=[explode_after_two])
    return _generate(self, prompt, params, *args, **kwargs)


async_llm.AsyncFrontEnd.generate = _generate_with_fault
