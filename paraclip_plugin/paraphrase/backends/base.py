"""What every backend returns, and how it says the service is unusable."""
import dataclasses
from typing import Optional


@dataclasses.dataclass
class Completion:
    text: Optional[str]  # None when the service refused the request itself (see ``error``)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None  # a cleaning.py reason name when text is None


class GenerationError(RuntimeError):
    """Retries are exhausted on a transient failure: stop the job (a rerun resumes from the cache)
    rather than drop samples because the service was down."""
