"""User-facing entry points: the `shardllm` CLI and the OpenAI-compatible server."""
