"""shardllm: an LLM inference engine that serves one model across many GPUs."""

from shardllm.llm import LLM
from shardllm.outputs import CompletionOutput, RequestOutput
from shardllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
