"""Normalise raw LLM outputs, and name why an output is not a usable paraphrase.

Chat models wrap answers in quotes, prefix them ("Paraphrase: ...", "Sure! Here is a paraphrased
version:", "**Paraphrase:**", "1."), put such a lead-in on a line of its own before the answer, or add
lines of commentary after it; reasoning models (DeepSeek-R1 style, Qwen3) put their reasoning in ``<think>...</think>``
before the answer; those are stripped (an unclosed ``<think>``, cut off by the token limit, leaves
nothing). What is left is rejected with a reason name when it is empty, a
refusal, far longer than its input, or (step 2) the same as step 1's output. Reason names are the
keys of the run's "dropped" statistics.
"""
import re

EMPTY = "empty"
REFUSAL = "refusal"
TOO_LONG = "too_long"
SAME_AS_STEP1 = "same_as_step1"
REQUEST_REJECTED = "request_rejected"  # the API refused the request itself (4xx), not its output
CONTENT_FILTER = "content_filter"  # finish_reason: the service withheld the output
LENGTH = "length"  # finish_reason: the token limit cut the output off

# A lead-in before the answer: an acknowledgement ("Sure!"), a "Here is a paraphrased version:" phrase
# and/or a label ("Paraphrase:", "Rephrased caption:"), in that order, each optional.
_ACK = r"(?:sure|certainly|of course|okay|absolutely|no problem)[!.,]+\s*"
_HERE = (r"here(?:'s| is| are)\b[^:\n]{0,80}?(?:paraphras|version|rewr|reword|rephras|caption|text|sentence|"
         r"alternative|option|answer)[^:\n]{0,40}:|here you go\s*[:!.]")
_LABEL = (r"(?:(?:a|the|my)\s+)?(?:(?:concise|shorter|short|new|reworded|rephrased|paraphrased?)\s+)*"
          r"(?:paraphrased?|paraphrasing|rephrased|rephrasing|reworded|rewording|rewrite|version|text|caption|sentence|"
          r"answer|output)"
          r"(?:\s*\d+)?\s*:")
_PREFIX = re.compile(rf"^\s*(?:{_ACK})?(?:(?:{_HERE})\s*)?(?:(?:{_LABEL})\s*)?", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+")
_BOLD = re.compile(r"\*\*|__")
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.IGNORECASE | re.DOTALL)
_QUOTES = "\"'“”‘’`«»"
_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i can(?:'|no)t|i cannot|i am unable|"
    r"i'm unable|i won't|as an ai\b|unfortunately,? i)",
    re.IGNORECASE,
)


def clean(text):
    """The answer: the first line that holds more than a lead-in, without its lead-in, list marker,
    bold markers or surrounding quotes. A line ending in ":" before further lines is a lead-in too."""
    if text is None:
        return ""
    text = _THINK.sub("", text)
    # Templates that open <think> in the prompt (Qwen3, R1 distills) leave only the closing tag.
    close = text.lower().rfind("</think>")
    text = text[close + len("</think>"):] if close >= 0 else text
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        out = _unwrap(line)
        if out and not (out.endswith(":") and i + 1 < len(lines)):
            return out
    return ""


def _unwrap(line):
    out = _PREFIX.sub("", _BULLET.sub("", _BOLD.sub("", line)), count=1)
    # Quotes can sit inside a prefix ("Paraphrase: "x"") so strip after the prefix, repeatedly.
    while len(out) >= 2 and out[0] in _QUOTES:
        if out[-1] in _QUOTES:
            out = out[1:-1].strip()
        elif len(out) >= 3 and out[-2] in _QUOTES and out[-1] == ".":  # "text".
            out = out[1:-2].strip()
        else:
            break
    return " ".join(out.split())


def _norm(text):
    return re.sub(r"[^\w\s]", "", text).lower().split()


def reject_reason(output, source, max_length_ratio=3.0, min_length_slack=20, step1_output=None):
    """``None`` if ``output`` (already cleaned) is usable, else a reason name.

    ``source`` is the text that was paraphrased; ``step1_output`` is set for step 2 only.
    """
    if not output:
        return EMPTY
    if _REFUSAL.match(output):
        return REFUSAL
    # Slack in characters, so short captions ("red car") may still get a natural sentence back.
    if len(output) > max_length_ratio * len(source) + min_length_slack:
        return TOO_LONG
    if step1_output is not None and _norm(output) == _norm(step1_output):
        return SAME_AS_STEP1
    return None
