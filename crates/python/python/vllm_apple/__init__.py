"""vLLM's offline API over vllm-apple's engine: ``from vllm_apple import LLM, SamplingParams``."""
from ._vllm_apple import (
    LLM,
    CompletionOutput,
    Logprob,
    RequestOutput,
    SamplingParams,
    __version__,
)

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
