"""Normalise raw LLM outputs, and name why an output is not a usable paraphrase.

Chat models wrap answers in quotes, prefix them ("Paraphrase: ...", "Sure! Here is a paraphrased
version:", "**Paraphrased caption:**"), put such a lead-in on a line of its own before the answer, list
several answers ("1. ...", "2. ..."), or add lines of commentary after it. Lead-ins are recognised by their
paraphrasing words, so an answer that merely starts like one ("Text: ...", "1. FC Köln ...", "Okay, so ...")
stays whole. Reasoning models (DeepSeek-R1 style, Qwen3) put their reasoning in ``<think>...</think>``
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

# Lead-ins are recognised by paraphrasing words, so that captions which merely start like one ("Text: ...",
# "Version 2: ...", "Here is my dog: ...", "1. FC Köln ...", "Okay, so ...", "#1 Dad mug") stay whole.
_PARA = (
    r"(?:paraphras|rephras|reword|rewrit|revis|concise|shorter|simpler|version|way to (?:say|put|phrase)|"
    r"say it|attempt)"
)
_ACK_WORDS = r"(?:sure(?: thing)?|certainly|of course|ok(?:ay)?|absolutely|no problem|great|alright|got it)"
# an acknowledgement: stripped when it ends in "!", or when a lead-in or nothing follows it
_ACK = re.compile(rf"{_ACK_WORDS}\s*([!.,]+)\s*", re.IGNORECASE)
_PLEASANTRY = re.compile(
    r"(?:i'?d|i would|i'?m|i am|i'?ll)\s+(?:be\s+)?(?:happy|glad)\s+to\s+help(?:\s+with\s+that)?"
    r"\s*[!.,]*\s*",
    re.IGNORECASE,
)
# "Here is a paraphrased version ...:", "Here you go:", "Here it is:"
_HERE = re.compile(
    rf"(?:here(?:'s| is| are)\b[^:\n]{{0,80}}?{_PARA}[^:\n]{{0,100}}:|here (?:you go|it is)\s*[:!.])\s*", re.IGNORECASE
)
# "Sure! Here's a concise paraphrase that avoids the original words." (the answer on the next line)
_HERE_SENTENCE = re.compile(rf"(?:\W*\w+\W*)?here(?:'s| is| are)\b.*{_PARA}", re.IGNORECASE)
# "Paraphrase:", "Rephrased caption:", "The paraphrased caption is:", "Paraphrased version of the caption (8 words):"
_ADJECTIVES = (
    r"(?:concise|shorter|simpler|reworded|rephrased|paraphrased|rewritten|revised|alternative|alternate|possible)"
)
_LABEL_WORDS = (
    rf"(?:(?:a|the|my|one)\s+)?(?:{_ADJECTIVES}\s+)*(?:paraphrased?|paraphrasing|rephrased?|rephrasing|"
    rf"reworded|rewording|rewrite|rewritten|revised|new\s+caption|"
    rf"{_ADJECTIVES}\s+(?:caption|text|version|sentence|description))"
    r"(?:\s+of\s+(?:the|this|your)\s+(?:caption|text|sentence))?(?:\s*\d+)?(?:\s*\([^)\n]{0,30}\))?(?:\s+is)?"
)
_LABEL = re.compile(rf"{_LABEL_WORDS}\s*(?::|\s-{{1,2}}|\s[\u2013\u2014])\s*", re.IGNORECASE)
_HEADING = re.compile(rf"{_LABEL_WORDS}\s*:?|{_ACK_WORDS}[!.,]*", re.IGNORECASE)  # "**Paraphrase**", "Sure" alone
_ORIGINAL = re.compile(r"(?:original|input)(?:\s+(?:caption|text|sentence))?\s*:", re.IGNORECASE)
# a line ending in ":" that announces what follows ("Below is a shorter way to say it:", "Here are two options:")
_ANNOUNCES = re.compile(rf"{_PARA}|option|alternativ|^here(?:'s| is| are)\b", re.IGNORECASE)
_BULLET = re.compile(r"^(?:\d+[.)]|[-*\u2022])\s+")
_MARKDOWN = re.compile(r"^(?:#{1,6}|>)\s+")  # a heading's or a quote's marker
_WORD_COUNT = re.compile(r"\s*\(\d+ words?\)$", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.IGNORECASE | re.DOTALL)
_QUOTES = "\"'“”‘’`«»"
_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i can(?:'|no)t|i cannot|i am unable|"
    r"i'm unable|i won't|as an ai\b|unfortunately,? i)",
    re.IGNORECASE,
)


def clean(text):
    """The answer: the first line that is not a lead-in, without its lead-in, list marker, bold markers or
    surrounding quotes (and a trailing "(7 words)")."""
    if text is None:
        return ""
    text = _THINK.sub("", text)
    # Templates that open <think> in the prompt (Qwen3, R1 distills) leave only the closing tag.
    close = text.lower().rfind("</think>")
    text = text[close + len("</think>") :] if close >= 0 else text
    lines = [_MARKDOWN.sub("", line.strip().replace("**", "")).strip() for line in text.strip().splitlines()]
    lines = [line for line in lines if line]
    listed = sum(bool(_BULLET.match(line)) for line in lines) >= 2  # a list of answers: take the first
    for i, line in enumerate(lines):
        more = i + 1 < len(lines)
        rest = _strip_lead_in(line)
        if more and _is_lead_in(line, rest):
            continue
        if listed or i > 0:
            rest = _BULLET.sub("", rest)
        if more and rest.endswith(":"):  # "A sign that reads:" and the words on the next line
            rest = f"{rest} {_BULLET.sub('', lines[i + 1])}"
        return _unquote(_WORD_COUNT.sub("", rest))
    return ""


def _strip_lead_in(line):
    """``line`` without an acknowledgement, a "Here is ...:" phrase and a label at its start."""
    rest = line
    ack = _ACK.match(rest)
    if ack:
        after = _after(_PLEASANTRY, rest[ack.end() :])
        if "!" in ack.group(1) or not after or _HERE.match(after) or _LABEL.match(after):
            rest = after
    for lead in (_PLEASANTRY, _HERE, _LABEL):
        rest = _after(lead, rest)
    return rest.strip()


def _after(lead, text):
    """``text`` without ``lead`` at its start."""
    match = lead.match(text)
    return text[match.end() :] if match else text


def _is_lead_in(line, rest):
    """Whether a line followed by others only announces the answer (they hold it)."""
    return (
        not rest
        or bool(_HEADING.fullmatch(line))
        or bool(_ORIGINAL.match(line))
        or bool(_ACK.match(line) and _PLEASANTRY.search(line))
        or (":" not in line and bool(_HERE_SENTENCE.match(line)))
        or (line.endswith(":") and bool(_ANNOUNCES.search(line)))
    )


def _unquote(out):
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
