"""Generation backends, one interface: ``generate(prompts, on_result) -> list[Completion]``.

A backend takes a batch of user prompts (the pipeline sends one step of one shard at a time, or of
the whole job when it prefills) with one cache-key hash per prompt (``keys``), and calls
``on_result(index, completion)`` as each completion arrives (``step``: which step the prompts are, for the
backend's own stats), so the pipeline can cache it at once. Backends are imported only when chosen: ``vllm`` is an optional extra.
"""

from .base import Completion, GenerationError, RequestsWritten


def make_backend(name, **kwargs):
    if name == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(**kwargs)
    if name == "openai-batch":
        from .batch_backend import OpenAIBatchBackend

        return OpenAIBatchBackend(**kwargs)
    if name == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(**kwargs)
    raise ValueError(f"unknown backend {name!r} (choose 'openai', 'openai-batch' or 'vllm')")


__all__ = ["Completion", "GenerationError", "RequestsWritten", "make_backend"]
