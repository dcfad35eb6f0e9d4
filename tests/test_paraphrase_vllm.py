"""The vLLM backend through its interface, with a stand-in engine at the edge (no GPU, no vllm here).

The stand-in behaves as vllm.LLM does where the backend depends on it: ``chat`` takes one
SamplingParams or a list (one per prompt); a request with a seed samples from its own generator,
one without draws from the engine's shared generator (so its output depends on the batch around
it); a tokenizer without a chat template makes ``chat`` raise vLLM's error unless ``chat_template`` is given;
an output longer than ``max_tokens`` is cut with finish_reason ``length``; vLLM 0.33's exception classes,
context-length errors and ``abort`` outputs, and SamplingParams' range checks (``FakeVLLMEngine``).
"""

import builtins
import random
import sys
import types

import pytest

from paraclip_plugin.paraphrase import cleaning
from paraclip_plugin.paraphrase.backends import GenerationError
from paraclip_plugin.paraphrase.backends.vllm_backend import VLLMBackend
from paraclip_plugin.paraphrase.cache import CompletionCache, request_seed
from paraclip_plugin.data.inputs import expand_inputs
from paraclip_plugin.testing.local_server import VLLM_NO_TEMPLATE_ERROR, quoted_text
from paraclip_plugin.paraphrase.pipeline import GenerationOptions, ParaphraseGenerator
from paraclip_plugin.paraphrase.prompts import PromptSet
from test_paraphrase_support import samples_of, write_input_shards

MODEL = "/models/paraphraser"


class VLLMError(Exception):
    """vLLM 0.33's exception family (vllm/exceptions.py): not ValueError since 0.33."""


class VLLMClientError(VLLMError):
    pass


class ChatTemplateResolutionError(VLLMClientError):
    pass


class VLLMValidationError(VLLMClientError):
    def __init__(self, message, *, parameter=None, value=None):
        super().__init__(message)
        self.parameter, self.value = parameter, value

    def __str__(self):
        extras = [f"{k}={v}" for k, v in (("parameter", self.parameter), ("value", self.value)) if v is not None]
        return f"{super().__str__()} ({', '.join(extras)})" if extras else super().__str__()


class FakeSamplingParams:
    """Stand-in for vllm.SamplingParams: records what the backend asked for, and checks the ranges vLLM checks
    (``SamplingParams._verify_args``) with its messages."""

    def __init__(self, temperature=1.0, top_p=1.0, max_tokens=16, seed=None):
        if not 0 <= temperature <= 2:
            raise VLLMValidationError(
                f"temperature must be in [0, 2], got {temperature}.", parameter="temperature", value=temperature
            )
        if not 0 < top_p <= 1:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {top_p}.", parameter="top_p", value=top_p)
        if max_tokens is not None and max_tokens < 1:
            raise VLLMValidationError(
                f"max_tokens must be at least 1, got {max_tokens}.", parameter="max_tokens", value=max_tokens
            )
        self.kwargs = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)


def fake_reply(prompt, rng):
    return " ".join(reversed(quoted_text(prompt).split())) + f" r{rng.randrange(10**6)}"


class FakeVLLMEngine:
    """Stand-in for vllm.LLM (see the module docstring); records every ``chat`` call.

    As vLLM 0.33 does: a missing chat template raises ``ChatTemplateResolutionError`` (``legacy``: the
    ``ValueError`` of older releases); a template that does not render raises ``VLLMValidationError``; a prompt
    of more than ``max_model_len`` tokens (words here) fails the whole call with vLLM's message; ``abort`` lists
    how many of the next outputs end with finish_reason ``abort`` and partial text (an internal failure)."""

    def __init__(
        self, has_template=True, drop_one=False, fail_on_call=None, legacy=False, max_model_len=None, abort=()
    ):
        self.has_template, self.drop_one, self.fail_on_call = has_template, drop_one, fail_on_call
        self.legacy, self.max_model_len, self.abort = legacy, max_model_len, list(abort)
        self.shared_rng = random.Random(0)
        self.calls = []

    def chat(self, messages, sampling_params=None, use_tqdm=True, chat_template=None):
        self.calls.append((messages, sampling_params, chat_template))
        if not self.has_template and chat_template is None:
            raise (ValueError if self.legacy else ChatTemplateResolutionError)(VLLM_NO_TEMPLATE_ERROR["message"])
        if chat_template is not None and "{% bad" in chat_template:
            raise VLLMValidationError("Encountered unknown tag 'bad'.")
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("the job was preempted")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(messages)
        assert len(params) == len(messages)
        for conversation in messages:  # requests are rendered and added one by one; the first too long fails all
            tokens = len(conversation[0]["content"].split())
            if self.max_model_len is not None and tokens > self.max_model_len:
                raise VLLMValidationError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                    f"contains {tokens} input tokens, which exceeds this limit even without any output tokens. "
                    f"Please reduce the length of the input prompt.",
                    parameter="input_tokens",
                    value=tokens,
                )
        aborted, self.abort = (self.abort[0] if self.abort else 0), self.abort[1:]
        outputs = []
        for conversation, sp in zip(messages, params):
            assert [m["role"] for m in conversation] == ["user"]
            seed = sp.kwargs["seed"]
            words = fake_reply(
                conversation[0]["content"], random.Random(seed) if seed is not None else self.shared_rng
            ).split()
            finish = "length" if len(words) > sp.kwargs["max_tokens"] else "stop"
            words = words[: sp.kwargs["max_tokens"]]
            if len(outputs) < aborted:
                words, finish = words[:1], "abort"
            completion = types.SimpleNamespace(
                text=" ".join(words), token_ids=list(range(len(words))), finish_reason=finish
            )
            outputs.append(types.SimpleNamespace(prompt_token_ids=[0] * 7, outputs=[completion]))
        return outputs[:-1] if self.drop_one else outputs


def make(engine, tmp_path, cache="cache.sqlite", **backend_kwargs):
    backend = VLLMBackend(MODEL, engine=engine, sampling_params_cls=FakeSamplingParams, **backend_kwargs)
    return ParaphraseGenerator(
        backend,
        MODEL,
        cache=CompletionCache(str(tmp_path / cache)),
        options=GenerationOptions(progress=False),
        backend_name="vllm",
    )


def expected(step, source, settings):
    prompt = PromptSet().render(step, source)
    return cleaning.clean(
        fake_reply(prompt, random.Random(request_seed(MODEL, PromptSet().version, settings, step, 0, source)))
    )


def test_vllm_backend_per_request_seeds_steps_and_chunks(tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=10)
    engine = FakeVLLMEngine()
    generator = make(engine, tmp_path, chunk_size=4)
    stats = generator.run(expand_inputs(pattern), str(tmp_path / "out"))
    settings = generator.settings
    assert settings == {"backend": "vllm", "seed": 0, "temperature": 1.0, "top_p": 0.1, "max_tokens": 512}
    # The paper's sampling plus one seed per request, handed to vLLM's SamplingParams; no call above a chunk.
    params = [p for _, batch, _ in engine.calls for p in batch]
    assert all(len(batch) <= 4 for _, batch, _ in engine.calls) and len(params) == stats["requests"]
    assert {(p.kwargs["temperature"], p.kwargs["top_p"], p.kwargs["max_tokens"]) for p in params} == {(1.0, 0.1, 512)}
    assert len({p.kwargs["seed"] for p in params}) == len(params)
    for shard in range(2):
        for fields in samples_of(tmp_path / "out" / f"{shard:05d}.tar").values():
            caption, para1, para2 = (fields[f].decode() for f in ("txt", "para1.txt", "para2.txt"))
            # Each output is a function of its cache key: step 1 of the caption, step 2 of step 1's output.
            assert para1 == expected(1, caption, settings) and para2 == expected(2, para1, settings)
            assert __import__("json").loads(fields["json"])["paraphrase_settings"] == settings
    assert stats["samples_out"] > 0 and stats["prompt_tokens"] == 7 * stats["requests"]

    # Another batch composition (shard 1 alone, other chunks, a fresh cache) gives shard 1 the same outputs.
    alone = make(FakeVLLMEngine(), tmp_path, cache="other.sqlite", chunk_size=3)
    alone.run(expand_inputs(pattern)[1:], str(tmp_path / "alone"))
    assert samples_of(tmp_path / "alone" / "00001.tar") == samples_of(tmp_path / "out" / "00001.tar")


def test_vllm_preempted_job_keeps_finished_chunks(tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=16)
    generator = make(FakeVLLMEngine(fail_on_call=3), tmp_path, chunk_size=4)
    with pytest.raises(RuntimeError, match="preempted"):
        generator.run(expand_inputs(pattern), str(tmp_path / "out"))
    assert len(generator.cache) == 8  # two chunks of GPU work were kept; the third was lost
    engine = FakeVLLMEngine()
    rerun = make(engine, tmp_path, chunk_size=4)
    stats = rerun.run(expand_inputs(pattern), str(tmp_path / "out"))
    assert stats["cache_hits"] >= 8 and engine.calls[0][0][0] != generator.backend.engine.calls[0][0][0]
    reference = make(FakeVLLMEngine(), tmp_path, cache="ref.sqlite").run(expand_inputs(pattern), str(tmp_path / "ref"))
    assert samples_of(tmp_path / "out" / "00000.tar") == samples_of(tmp_path / "ref" / "00000.tar")
    assert reference["requests"] == stats["requests"] + 8


def test_vllm_length_is_dropped_by_reason_never_retried(tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=12)
    engine = FakeVLLMEngine()
    generator = make(engine, tmp_path, max_tokens=6)  # replies of more than 6 words are cut off
    stats = generator.run(expand_inputs(pattern), str(tmp_path / "out"))
    step1 = [c[0]["content"] for c in engine.calls[0][0]]
    long = [p for p in step1 if len(quoted_text(p).split()) + 1 > 6]
    assert long and stats["dropped"]["step1_length"] == sum(
        1
        for f in samples_of(next((tmp_path / "in").glob("*.tar"))).values()
        if PromptSet().render(1, f["txt"].decode()) in long
    )
    retried_prompts = [c[0]["content"] for messages, _, _ in engine.calls[1:] for c in messages]
    assert not set(long) & set(retried_prompts)  # never asked again
    assert "length" not in stats["retried"]


@pytest.mark.parametrize("legacy", [False, True], ids=["vllm-0.33", "vllm-before-0.33"])
def test_vllm_chat_template_missing_names_the_flag_and_is_passed_through(tmp_path, legacy):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    generator = make(FakeVLLMEngine(has_template=False, legacy=legacy), tmp_path)
    with pytest.raises(GenerationError, match=r"--chat-template FILE.*default chat template is no longer allowed"):
        generator.run(expand_inputs(pattern), str(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.tar"))
    template = "{% for m in messages %}### Human: {{ m.content }}\n### Assistant:{% endfor %}"
    engine = FakeVLLMEngine(has_template=False)
    generator = make(engine, tmp_path, chat_template=template)
    assert generator.run(expand_inputs(pattern), str(tmp_path / "out"))["samples_out"] > 0
    assert {t for _, _, t in engine.calls} == {template}
    assert "chat_template_sha256" in generator.settings  # another template, other outputs: another cache key


def test_vllm_output_count_is_checked(tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    with pytest.raises(GenerationError, match=r"returned \d+ outputs for \d+ prompts"):
        make(FakeVLLMEngine(drop_one=True), tmp_path).run(expand_inputs(pattern), str(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.tar"))


def test_vllm_missing_gives_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm":
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ImportError, match=r"pip install '\.\[vllm\]'"):
        VLLMBackend("/models/paraphraser")


def test_vllm_a_template_that_does_not_render_stops_the_job_naming_the_flag(tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    generator = make(FakeVLLMEngine(has_template=False), tmp_path, chat_template="{% bad %}")
    with pytest.raises(
        GenerationError,
        match=r"--chat-template may be the cause \(VLLMValidationError: "
        r"Encountered unknown tag 'bad'",
    ):
        generator.run(expand_inputs(pattern), str(tmp_path / "out"))


def test_vllm_a_prompt_longer_than_the_context_is_isolated_and_dropped_by_reason(tmp_path):
    """vLLM fails a whole call for one over-long prompt; the rest of its chunk must still be answered."""
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=24)
    make(FakeVLLMEngine(), tmp_path, cache="ref.sqlite").run(expand_inputs(pattern), str(tmp_path / "ref"))
    reference = samples_of(tmp_path / "ref" / "00000.tar")
    limit = 24  # every step-1 prompt fits; the step-2 prompts of the longest captions do not
    fits = {k: f for k, f in reference.items() if len(PromptSet().render(2, f["para1.txt"].decode()).split()) <= limit}
    assert 0 < len(fits) < len(reference)
    engine = FakeVLLMEngine(max_model_len=limit)
    generator = make(engine, tmp_path, chunk_size=32)
    stats = generator.run(expand_inputs(pattern), str(tmp_path / "out"))
    assert samples_of(tmp_path / "out" / "00000.tar") == fits  # the others answered as without the limit
    assert stats["dropped"]["step2_prompt_too_long"] == len(reference) - len(fits)
    # not cached: a rerun with a context that fits answers them, as a run without the limit did
    larger = make(FakeVLLMEngine(max_model_len=4 * limit), tmp_path, chunk_size=32)
    again = larger.run(expand_inputs(pattern), str(tmp_path / "again"))
    assert "step2_prompt_too_long" not in again["dropped"] and len(larger.backend.engine.calls) > 0
    assert samples_of(tmp_path / "again" / "00000.tar") == reference


def test_vllm_a_context_too_short_for_any_prompt_stops_at_once_naming_the_flag(tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=24)
    engine = FakeVLLMEngine(max_model_len=3)
    with pytest.raises(
        GenerationError,
        match=r"even the shortest prompt of the chunk does not fit the model's "
        r"context \(This model's maximum context length is 3 tokens.*"
        r"raise --max-model-len",
    ):
        make(engine, tmp_path, chunk_size=32).run(expand_inputs(pattern), str(tmp_path / "out"))
    assert len(engine.calls) == 2  # the chunk, then its shortest prompt alone: no halving down to every prompt
    assert not list((tmp_path / "out").glob("*.tar"))


def test_vllm_aborted_outputs_are_asked_again_never_cached(tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=8)
    reference = make(FakeVLLMEngine(), tmp_path, cache="ref.sqlite")
    reference.run(expand_inputs(pattern), str(tmp_path / "ref"))
    once = make(FakeVLLMEngine(abort=[3]), tmp_path, cache="once.sqlite")  # 3 outputs of the first call abort
    once.run(expand_inputs(pattern), str(tmp_path / "once"))
    assert samples_of(tmp_path / "once" / "00000.tar") == samples_of(tmp_path / "ref" / "00000.tar")
    engine = FakeVLLMEngine(abort=[3, 3])
    twice = make(engine, tmp_path, cache="twice.sqlite")  # aborted again when re-asked
    with pytest.raises(GenerationError, match=r"3 requests ended with finish_reason \['abort'\] twice"):
        twice.run(expand_inputs(pattern), str(tmp_path / "twice"))
    step1 = len(engine.calls[0][0])
    assert step1 > 3 and [len(m) for m, _, _ in engine.calls] == [step1, 3]
    assert len(twice.cache) == step1 - 3  # the good answers are kept, the aborted ones are not
    assert not list((tmp_path / "twice").glob("*.tar"))


def test_vllm_settings_are_checked_before_the_model_loads_and_a_failed_start_is_one_line(monkeypatch):
    started = []

    class LLM:
        def __init__(self, **kwargs):
            started.append(kwargs)
            raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=FakeSamplingParams))
    with pytest.raises(
        ValueError,
        match=r"--temperature/--top-p/--max-tokens: vLLM refuses them: top_p must be "
        r"in \(0, 1\], got 1.5",
    ):
        VLLMBackend(MODEL, top_p=1.5)
    assert not started  # refused before minutes of model loading
    with pytest.raises(
        ValueError,
        match=r"vLLM could not start /models/paraphraser: RuntimeError: Engine core "
        r"initialization failed.*--max-model-len and --gpu-memory-utilization",
    ):
        VLLMBackend(MODEL, max_model_len=2048)
    assert started == [dict(model=MODEL, tensor_parallel_size=1, seed=0, max_model_len=2048)]
