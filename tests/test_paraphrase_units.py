"""Prompts, cleaning, cache, input handling and the torch-free import path, piece by piece."""
import json
import subprocess
import sys

import pytest

from paraclip_plugin.paraphrase import cleaning
from paraclip_plugin.paraphrase.cache import CompletionCache
from paraclip_plugin.paraphrase.inputs import read_caption_file, slurm_job_defaults, split_for_job
from paraclip_plugin.paraphrase.prompts import PAPER_VERSION, PromptSet, load_prompts
from paraclip_plugin.paraphrase.shard_io import InputError, atomic_tar_writer, read_tar_samples


def test_prompts_are_the_papers_wording():
    prompts = PromptSet()
    # Sec. 2.1 of the paper / the official release's call_openai.py, word for word.
    assert prompts.render(1, "dog.jpg on a beach") == (
        'Paraphrase the given caption "dog.jpg on a beach" concisely while preserving the meaning.')
    assert prompts.render(2, "A dog at the beach") == (
        'Paraphrase the given text "A dog at the beach" concisely while preserving the meaning '
        "and avoiding use of existing words.")
    assert prompts.version == PAPER_VERSION
    assert prompts.render(1, "{braces} stay") .count("{braces} stay") == 1


def test_prompts_replaced_from_a_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"step1": "Rewrite: {text}", "step2": "Reword: {text}"}))
    custom = load_prompts(path)
    assert custom.render(1, "a cat") == "Rewrite: a cat" and custom.render(2, "a cat") == "Reword: a cat"
    assert custom.version != PAPER_VERSION  # never shares cache entries with the paper's prompts
    path.write_text(json.dumps({"step1": "Rewrite: {text}", "step2": "Reword it: {text}"}))
    assert load_prompts(path).version != custom.version
    path.write_text(json.dumps({"step1": "no placeholder", "step2": "Reword: {text}"}))
    with pytest.raises(ValueError, match="step1"):
        load_prompts(path)


@pytest.mark.parametrize("raw, expected", [
    ('"A dog runs on the beach."', "A dog runs on the beach."),
    ('Paraphrase: "A dog runs on the beach"', "A dog runs on the beach"),
    ("Here is a concise paraphrase: A dog runs.\n\nThis keeps the meaning.", "A dog runs."),
    ("  “A dog runs”.  ", "A dog runs"),
    ("Rephrased:   a   dog\truns", "a dog runs"),
])
def test_cleaning_strips_wrappers(raw, expected):
    assert cleaning.clean(raw) == expected


def test_rejection_reasons():
    source = "a brown dog running on the beach"
    assert cleaning.reject_reason("", source) == cleaning.EMPTY
    assert cleaning.reject_reason(cleaning.clean('""'), source) == cleaning.EMPTY
    assert cleaning.reject_reason("I'm sorry, but I can't help with that.", source) == cleaning.REFUSAL
    assert cleaning.reject_reason("As an AI language model, I ...", source) == cleaning.REFUSAL
    assert cleaning.reject_reason("word " * 60, source) == cleaning.TOO_LONG
    assert cleaning.reject_reason("A brown dog, running on the beach!", source,
                                  step1_output="a brown dog running on the beach") == cleaning.SAME_AS_STEP1
    assert cleaning.reject_reason("A dog dashes along the shore", source) is None


def test_cache_persists_and_keys_on_everything(tmp_path):
    path = str(tmp_path / "c.sqlite")
    cache = CompletionCache(path)
    cache.put("m", "v1", 1, 0, "a cat", "a feline", 5, 3)
    cache.close()
    cache = CompletionCache(path)  # a new process would see the same
    assert cache.get_many("m", "v1", 1, 0, ["a cat", "a dog"]) == {"a cat": "a feline"}
    for other in (("m2", "v1", 1, 0), ("m", "v2", 1, 0), ("m", "v1", 2, 0), ("m", "v1", 1, 1)):
        assert cache.get_many(*other, ["a cat"]) == {}
    many = [f"caption {i}" for i in range(1200)]  # more than one sqlite parameter chunk
    for text in many:
        cache.put("m", "v1", 1, 0, text, text.upper())
    assert len(cache.get_many("m", "v1", 1, 0, many)) == 1200


def test_job_splitting_and_slurm_defaults():
    paths = [f"{i:05d}.tar" for i in range(10)]
    parts = [split_for_job(paths, 3, i) for i in range(3)]
    assert sorted(sum(parts, [])) == paths and all(len(p) >= 3 for p in parts)
    assert slurm_job_defaults({}) == (1, 0)
    assert slurm_job_defaults({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "3"}) == (4, 3)
    with pytest.raises(ValueError, match="job-index"):
        split_for_job(paths, 3, 3)


def test_caption_files_report_file_and_line(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"caption": " a cat "}\n\n{"caption": "a dog"}\n')
    assert [r["caption"] for r in read_caption_file(str(good))] == ["a cat", "a dog"]
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"caption": "a cat"}\n{"text": "a dog"}\n')
    with pytest.raises(InputError, match=r"d\.jsonl:2: no string field 'caption'"):
        read_caption_file(str(bad))


def test_tar_round_trip_in_webdataset_layout(tmp_path):
    path = str(tmp_path / "s.tar")
    with atomic_tar_writer(path) as sink:
        sink.write({"__key__": "k1", "jpg": b"\xff\xd8img", "txt": "a cat", "para1.txt": "p1"})
        sink.write({"__key__": "k2", "jpg": b"x", "txt": "b"})
    samples = list(read_tar_samples(path))
    assert [s["__key__"] for s in samples] == ["k1", "k2"]
    assert samples[0]["para1.txt"] == b"p1" and samples[0]["jpg"] == b"\xff\xd8img"
    # webdataset itself reads it as the same samples.
    import webdataset as wds
    read = list(wds.WebDataset(path, shardshuffle=False))
    assert [r["__key__"] for r in read] == ["k1", "k2"] and read[0]["para1.txt"] == b"p1"


def test_generation_path_does_not_import_torch():
    code = ("import sys; import paraclip_plugin.paraphrase.pipeline, paraclip_plugin.paraphrase.backends.openai_backend, "
            "paraclip_plugin.paraphrase.backends.vllm_backend, paraclip_plugin.paraphrase.local_server; "
            "import runpy; sys.argv = ['make_shards', '--help']\n"
            "try: runpy.run_path('scripts/make_shards.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "bad = [m for m in ('torch', 'webdataset', 'vllm') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert result.returncode == 0, result.stderr
