"""docs/openai_api.md lists exactly the request fields the server accepts (a field the models gain or lose
must be documented, and a documented field must exist)."""

from __future__ import annotations

import pathlib
import re

from shardllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "openai_api.md"


def _documented() -> set[str]:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| `")]
    return {re.match(r"\| `(\w+)`", row).group(1) for row in rows if not row.startswith("| `--")}


def test_every_request_field_is_documented_and_nothing_else():
    fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert _documented() == fields
