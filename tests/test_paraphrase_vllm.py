"""The vLLM backend through its interface, with a stand-in engine at the edge (no GPU, no vllm here).

The stand-in behaves as vllm.LLM does where the backend depends on it: ``chat`` takes one
SamplingParams or a list (one per prompt); a request with a seed samples from its own generator,
one without draws from the engine's shared generator (so its output depends on the batch around
it); a tokenizer without a chat template makes ``chat`` raise vLLM's ValueError unless
``chat_template`` is given; an output longer than ``max_tokens`` is cut with finish_reason ``length``.
"""
import builtins
import random
import types

import pytest

from paraclip_plugin.paraphrase import cleaning
from paraclip_plugin.paraphrase.backends import GenerationError
from paraclip_plugin.paraphrase.backends.vllm_backend import VLLMBackend
from paraclip_plugin.paraphrase.cache import CompletionCache, request_seed
from paraclip_plugin.paraphrase.inputs import expand_inputs
from paraclip_plugin.paraphrase.local_server import VLLM_NO_TEMPLATE_ERROR, quoted_text
from paraclip_plugin.paraphrase.pipeline import GenerationOptions, ParaphraseGenerator
from paraclip_plugin.paraphrase.prompts import PromptSet
from test_paraphrase_support import samples_of, write_input_shards

MODEL = "/models/paraphraser"


class FakeSamplingParams:
    """Stand-in for vllm.SamplingParams: records what the backend asked for."""

    def __init__(self, temperature=1.0, top_p=1.0, max_tokens=16, seed=None):
        self.kwargs = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)


def fake_reply(prompt, rng):
    return " ".join(reversed(quoted_text(prompt).split())) + f" r{rng.randrange(10 ** 6)}"


class FakeVLLMEngine:
    """Stand-in for vllm.LLM (see the module docstring); records every ``chat`` call."""

    def __init__(self, has_template=True, drop_one=False, fail_on_call=None):
        self.has_template, self.drop_one, self.fail_on_call = has_template, drop_one, fail_on_call
        self.shared_rng = random.Random(0)
        self.calls = []

    def chat(self, messages, sampling_params=None, use_tqdm=True, chat_template=None):
        self.calls.append((messages, sampling_params, chat_template))
        if not self.has_template and chat_template is None:
            raise ValueError(VLLM_NO_TEMPLATE_ERROR["message"])
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("the job was preempted")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(messages)
        assert len(params) == len(messages)
        outputs = []
        for conversation, sp in zip(messages, params):
            assert [m["role"] for m in conversation] == ["user"]
            seed = sp.kwargs["seed"]
            words = fake_reply(conversation[0]["content"], random.Random(seed) if seed is not None else self.shared_rng).split()
            finish = "length" if len(words) > sp.kwargs["max_tokens"] else "stop"
            words = words[:sp.kwargs["max_tokens"]]
            completion = types.SimpleNamespace(text=" ".join(words), token_ids=list(range(len(words))), finish_reason=finish)
            outputs.append(types.SimpleNamespace(prompt_token_ids=[0] * 7, outputs=[completion]))
        return outputs[:-1] if self.drop_one else outputs


def make(engine, tmp_path, cache="cache.sqlite", **backend_kwargs):
    backend = VLLMBackend(MODEL, engine=engine, sampling_params_cls=FakeSamplingParams, **backend_kwargs)
    return ParaphraseGenerator(backend, MODEL, cache=CompletionCache(str(tmp_path / cache)),
                               options=GenerationOptions(progress=False), backend_name="vllm")


def expected(step, source, settings):
    prompt = PromptSet().render(step, source)
    return cleaning.clean(fake_reply(prompt, random.Random(request_seed(MODEL, PromptSet().version, settings, step, 0, source))))


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
        1 for f in samples_of(next((tmp_path / "in").glob("*.tar"))).values()
        if PromptSet().render(1, f["txt"].decode()) in long)
    retried_prompts = [c[0]["content"] for messages, _, _ in engine.calls[1:] for c in messages]
    assert not set(long) & set(retried_prompts)  # never asked again
    assert "length" not in stats["retried"]


def test_vllm_chat_template_missing_names_the_flag_and_is_passed_through(tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    generator = make(FakeVLLMEngine(has_template=False), tmp_path)
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
