"""The vLLM backend through its interface, with a stand-in engine at the edge (no GPU, no vllm here)."""
import builtins
import types

import pytest

from paraclip_plugin.paraphrase import cleaning
from paraclip_plugin.paraphrase.backends.vllm_backend import VLLMBackend
from paraclip_plugin.paraphrase.inputs import expand_inputs
from paraclip_plugin.paraphrase.local_server import raw_reply
from paraclip_plugin.paraphrase.pipeline import GenerationOptions, ParaphraseGenerator
from paraclip_plugin.paraphrase.prompts import PromptSet
from test_paraphrase_support import samples_of, write_input_shards


class FakeSamplingParams:
    """Stand-in for vllm.SamplingParams: records what the backend asked for."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeVLLMEngine:
    """Stand-in for vllm.LLM: ``chat`` answers like the local server and records every batch."""

    def __init__(self):
        self.batches = []

    def chat(self, conversations, sampling_params, use_tqdm=True):
        self.batches.append((conversations, sampling_params))
        outputs = []
        for conversation in conversations:
            assert [m["role"] for m in conversation] == ["user"]
            text = raw_reply(conversation[0]["content"])
            completion = types.SimpleNamespace(text=text, token_ids=list(range(len(text.split()))))
            outputs.append(types.SimpleNamespace(prompt_token_ids=[0] * 7, outputs=[completion]))
        return outputs


def test_vllm_backend_batches_a_shard_per_step(tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=10)
    engine = FakeVLLMEngine()
    backend = VLLMBackend("/models/paraphraser", engine=engine, sampling_params_cls=FakeSamplingParams)
    generator = ParaphraseGenerator(backend, "/models/paraphraser", options=GenerationOptions(progress=False),
                                    backend_name="vllm")
    stats = generator.run(expand_inputs(pattern), str(tmp_path / "out"))
    # The paper's sampling, handed to vLLM's SamplingParams.
    assert engine.batches[0][1].kwargs == {"temperature": 1.0, "top_p": 0.1, "max_tokens": 512}
    # One chat() call per step per shard, holding all the shard's unique kept captions.
    assert len(engine.batches) == 4
    prompts = PromptSet()
    for shard, (step1_batch, step2_batch) in enumerate(zip(engine.batches[0::2], engine.batches[1::2])):
        out = samples_of(tmp_path / "out" / f"{shard:05d}.tar")
        captions = {f["txt"].decode() for f in out.values()}
        assert len(step1_batch[0]) == len(captions)
        step2_prompts = {c[0]["content"] for c in step2_batch[0]}
        for fields in out.values():
            para1 = fields["para1.txt"].decode()
            assert prompts.render(2, para1) in step2_prompts  # step 2 ran on step 1's outputs
            assert fields["para2.txt"].decode() == cleaning.clean(raw_reply(prompts.render(2, para1)))
    assert stats["samples_out"] > 0 and stats["completion_tokens"] > 0 and stats["prompt_tokens"] == 7 * stats["requests"]


def test_vllm_missing_gives_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm":
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ImportError, match=r"pip install '\.\[vllm\]'"):
        VLLMBackend("/models/paraphraser")
