"""What every backend returns, and how it says the service is unusable."""

import dataclasses
from typing import Optional

from ..cleaning import REQUEST_REJECTED

# vLLM's offline engine only: the prompt does not fit the model's context (--max-model-len)
PROMPT_TOO_LONG = "prompt_too_long"
# finish_reason values that end a sample for good: the same input with the same sampling fails the
# same way again, so the sample is dropped by this reason (and the answer cached), never retried.
FINAL_FINISH_REASONS = ("content_filter", "length", PROMPT_TOO_LONG)
# A request that failed (5xx, expired, ...) in every round a backend gives it: its sample is dropped by this
# reason in this run, never cached (a rerun asks again).
REQUEST_FAILED = "request_failed"


@dataclasses.dataclass
class Completion:
    text: Optional[str]  # None when there is no usable output (see ``error``)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None  # a cleaning.py reason name (or finish_reason) when text is None
    finish_reason: Optional[str] = None  # as the service reported it ("stop", "length", "content_filter")
    message: Optional[str] = None  # the service's own words when it refused the request (never cached)

    @classmethod
    def from_service(cls, text, finish_reason, prompt_tokens=0, completion_tokens=0):
        """An answer as a service gives it: a final finish_reason drops the sample whatever the text."""
        if finish_reason == REQUEST_REJECTED:  # a refusal a backend keeps (openai-batch): ``text`` holds its words
            return cls(
                None,
                prompt_tokens,
                completion_tokens,
                error=REQUEST_REJECTED,
                finish_reason=finish_reason,
                message=text,
            )
        if finish_reason in FINAL_FINISH_REASONS:
            return cls(None, prompt_tokens, completion_tokens, error=finish_reason, finish_reason=finish_reason)
        return cls(text, prompt_tokens, completion_tokens, finish_reason=finish_reason)


class GenerationError(RuntimeError):
    """Stop the job with a one-line message (a rerun resumes from the cache): retries of a transient
    failure are exhausted, or the service refuses the job's requests systematically."""


class RequestsWritten(GenerationError):
    """Offline (``vllm run-batch``): a step's request files are written; the job stops until their results are
    read back."""
