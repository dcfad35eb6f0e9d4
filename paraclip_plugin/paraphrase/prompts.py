"""The two prompts of the paper (Sec. 2.1), a version string for them, and replacements from a file.

The wording is the official release's (paraphrasing/call_openai.py, straight quotes), which is the
paper's prompt text. ``{text}`` marks where the caption (step 1) or step 1's output (step 2) goes.
"""

import dataclasses
import hashlib
import json

STEP1_TEMPLATE = 'Paraphrase the given caption "{text}" concisely while preserving the meaning.'
STEP2_TEMPLATE = (
    'Paraphrase the given text "{text}" concisely while preserving the meaning and avoiding use of existing words.'
)
PAPER_VERSION = "paraclip-paper-v1"
PLACEHOLDER = "{text}"


@dataclasses.dataclass(frozen=True)
class PromptSet:
    step1: str = STEP1_TEMPLATE
    step2: str = STEP2_TEMPLATE
    version: str = PAPER_VERSION

    def render(self, step, text):
        template = self.step1 if step == 1 else self.step2
        # str.replace, not str.format: captions and templates may hold other braces.
        return template.replace(PLACEHOLDER, text)


def load_prompts(path):
    """Read ``{"step1": ..., "step2": ..., "version": optional}`` (JSON) from ``path``.

    Without an explicit version the templates' hash is the version, so changing the wording can
    never reuse cache entries made with the old wording.
    """
    try:
        with open(path) as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: prompts file is not valid JSON ({e.msg})") from None
    except OSError as e:
        raise ValueError(f"--prompts {path}: {e.strerror}") from None
    if not isinstance(spec, dict):
        raise ValueError(
            f'{path}: prompts file must hold a JSON object {{"step1": ..., "step2": ...}}, not a {type(spec).__name__}'
        )
    for step in ("step1", "step2"):
        if not isinstance(spec.get(step), str) or PLACEHOLDER not in spec[step]:
            raise ValueError(f"{path}: '{step}' must be a string containing {PLACEHOLDER}")
    digest = hashlib.sha256(f"{spec['step1']}\0{spec['step2']}".encode()).hexdigest()[:12]
    return PromptSet(spec["step1"], spec["step2"], spec.get("version") or f"custom-{digest}")
