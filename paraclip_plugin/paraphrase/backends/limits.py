"""The Batch API's caps and this job's default queue budget (no openai import: the flags' parser reads them)."""

MAX_REQUESTS_PER_FILE = 50_000  # requests per input file
MAX_BYTES_PER_FILE = 200 * 1000 * 1000  # bytes per input file
# Tier 1's batch queue limit for gpt-4o-mini is 2,000,000 enqueued input tokens; the job's estimate (UTF-8 bytes / 3
# + 8 per request) is above the tokenizer's count for English text (about 4 characters a token), so 1,800,000 of
# it stays under that limit.
DEFAULT_MAX_ENQUEUED_TOKENS = 1_800_000
