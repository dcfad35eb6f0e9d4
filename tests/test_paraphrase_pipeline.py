"""The generation pipeline end to end, in process, over real HTTP to the local OpenAI-compatible server."""

import json
import os

import pytest

from paraclip_plugin.paraphrase import cleaning, pipeline
from paraclip_plugin.paraphrase.backends.openai_backend import OpenAIBackend
from paraclip_plugin.paraphrase.cache import CompletionCache
from paraclip_plugin.data.inputs import expand_inputs
from paraclip_plugin.testing.local_server import raw_reply
from paraclip_plugin.paraphrase.pipeline import GenerationOptions, ParaphraseGenerator
from paraclip_plugin.paraphrase.prompts import PromptSet
from paraclip_plugin.data.errors import InputError
from test_paraphrase_support import read_tar, samples_of, server, write_input_shards, write_samples  # noqa: F401

MODEL = "local-paraphraser"


def make_generator(server, tmp_path, concurrency=8, **options):
    backend = OpenAIBackend(
        MODEL, api_key="test-key", base_url=server.base_url, concurrency=concurrency, timeout=5.0, max_retries=3
    )
    cache = CompletionCache(str(tmp_path / "cache.sqlite"))
    return ParaphraseGenerator(backend, MODEL, PromptSet(), cache, GenerationOptions(progress=False, **options))


def run(server, tmp_path, pattern, out="out", **options):
    generator = make_generator(server, tmp_path, **options)
    try:
        stats = generator.run(expand_inputs(pattern), str(tmp_path / out), str(tmp_path / f"{out}-stats.json"))
    finally:
        generator.backend.close()
    return generator, stats


def input_captions(pattern):
    captions = {}
    for path in expand_inputs(pattern):
        for key, fields in samples_of(path).items():
            captions[key] = fields["txt"].decode()
    return captions


def test_four_fields_with_both_steps_chained(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in")
    generator, stats = run(server, tmp_path, pattern)
    prompts = PromptSet()
    step2_prompts = set(server.prompts())
    inputs = input_captions(pattern)
    kept = {k: c for k, c in inputs.items() if 2 <= len(c.split()) <= 15}
    assert 0 < len(kept) < len(inputs)  # the filter had something to drop

    written = {}
    for path in expand_inputs(pattern):
        out = tmp_path / "out" / os.path.basename(path)
        source = samples_of(path)
        for key, fields in samples_of(out).items():
            assert sorted(fields) == ["jpg", "json", "para1.txt", "para2.txt", "txt"]
            assert fields["jpg"] == source[key]["jpg"]  # image bytes copied unchanged
            assert fields["txt"] == source[key]["txt"]
            caption, para1, para2 = (fields[f].decode() for f in ("txt", "para1.txt", "para2.txt"))
            # Step 1 paraphrases the caption; step 2 paraphrases step 1's output, not the caption.
            assert para1 == cleaning.clean(raw_reply(prompts.render(1, caption)))
            assert prompts.render(2, para1) in step2_prompts
            assert para2 == cleaning.clean(raw_reply(prompts.render(2, para1)))
            assert para1 and para2 and para1 != para2
            meta = json.loads(fields["json"])
            assert meta["key"] == key
            assert meta["paraphrase_model"] == MODEL and meta["paraphrase_prompt_version"] == prompts.version
            written[key] = caption
    assert written == kept
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {
        os.path.basename(p): len(samples_of(tmp_path / "out" / os.path.basename(p))) for p in expand_inputs(pattern)
    }
    # Duplicates are requested once: one request per unique caption per step.
    unique = set(kept.values())
    assert server.requests == stats["requests"] == 2 * len(unique)
    assert stats["samples_out"] == len(kept) and stats["samples_in"] == len(inputs)
    assert stats["dropped"]["filtered_too_short"] + stats["dropped"]["filtered_too_long"] == len(inputs) - len(kept)
    # what the server billed (its usage: words of the prompt and of the reply), summed over the job
    assert stats["prompt_tokens"] == sum(len(prompt.split()) for _, prompt, _ in server.log)
    assert stats["completion_tokens"] > 0
    assert json.loads((tmp_path / "out-stats.json").read_text())["requests"] == stats["requests"]


def test_second_run_sends_zero_requests(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=2)
    run(server, tmp_path, pattern)
    first = server.requests
    assert first > 0
    _, stats = run(server, tmp_path, pattern)  # every shard complete: skipped
    assert server.requests == first and stats["shards_skipped"] == 2
    # Outputs deleted but the cache kept: everything is rebuilt from the cache, still no requests.
    before = {p.name: read_tar(p) for p in (tmp_path / "out").glob("*.tar")}
    for p in (tmp_path / "out").glob("*.tar"):
        p.unlink()
    _, stats = run(server, tmp_path, pattern)
    assert server.requests == first and stats["requests"] == 0 and stats["cache_hits"] > 0
    assert {p.name: read_tar(p) for p in (tmp_path / "out").glob("*.tar")} == before


def test_retries_recover_429_500_and_malformed(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    clean_gen, clean_stats = run(server, tmp_path, pattern, out="reference")
    server.retry_after = "1"
    server.inject("429", "500", "malformed", "malformed")
    start = len(server.log)
    # A new cache (new tmp sub-folder) so every request goes to the server again.
    sub = tmp_path / "faulty"
    sub.mkdir()
    _, stats = run(server, sub, pattern, out="out", concurrency=1)
    outcomes = [o for _, _, o in server.log[start:]]
    assert outcomes[:4] == ["429", "500", "malformed", "malformed"] and outcomes[4] == "ok"
    # The client waited as Retry-After said (1 s), longer than its own backoff for a first retry (<= 0.5 s).
    times = [t for t, _, _ in server.log[start:]]
    assert times[1] - times[0] >= 0.95
    assert read_tar(sub / "out" / "00000.tar") == read_tar(tmp_path / "reference" / "00000.tar")
    assert stats["samples_out"] == clean_stats["samples_out"] > 0


def test_refusals_are_retried_then_dropped_by_reason(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=10)
    captions = [c for c in input_captions(pattern).values() if 2 <= len(c.split()) <= 15]
    once, always = captions[0], captions[1]
    server.refuse_text(f'"{once}"', times=1)
    server.refuse_text(f'"{always}"', times=99)
    _, stats = run(server, tmp_path, pattern, max_attempts=3)
    written = {f["txt"].decode(): f for f in samples_of(tmp_path / "out" / "00000.tar").values()}
    assert once in written and always not in written
    assert all(f["para1.txt"] and f["para2.txt"] for f in written.values())  # never an empty paraphrase
    n_always = captions.count(always)
    assert stats["dropped"]["step1_refusal"] == n_always
    assert stats["retried"]["refusal"] == 1 + 2  # `once` retried once, `always` twice before the drop
    assert not any(f["para1.txt"].lower().startswith(b"i'm sorry") for f in written.values())


def test_captions_only_inputs_write_jsonl(server, tmp_path):
    (tmp_path / "caps.txt").write_text("a red car on a road\nx\nthe old wooden house by the river\n")
    (tmp_path / "recs.jsonl").write_text(json.dumps({"id": 7, "text": "a small dog with a ball"}) + "\n")
    _, stats = run(server, tmp_path, str(tmp_path / "caps.txt"))
    lines = [json.loads(line) for line in (tmp_path / "out" / "caps.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in lines] == ["a red car on a road", "the old wooden house by the river"]
    assert [r["line"] for r in lines] == [1, 3]
    assert all(r["paraphrase_1"] and r["paraphrase_2"] and r["paraphrase_1"] != r["paraphrase_2"] for r in lines)
    assert stats["dropped"] == {"filtered_too_short": 1}
    _, stats = run(server, tmp_path, str(tmp_path / "recs.jsonl"), caption_field="text")
    (rec,) = [json.loads(line) for line in (tmp_path / "out" / "recs.jsonl").read_text().splitlines()]
    assert rec["id"] == 7 and rec["caption"] == "a small dog with a ball" and rec["paraphrase_2"]


def test_export_sft_pairs_are_chat_format(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=8)
    generator = make_generator(server, tmp_path)
    stats = generator.run(expand_inputs(pattern), str(tmp_path / "out"), export_sft=str(tmp_path / "sft.jsonl"))
    generator.backend.close()
    pairs = [json.loads(line)["messages"] for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    # Two accepted pairs (step 1 and step 2) per unique kept caption.
    assert len(pairs) == stats["requests"] > 0
    for user, assistant in pairs:
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == cleaning.clean(raw_reply(user["content"]))


def test_export_sft_after_a_resume_holds_the_whole_jobs_pairs(server, tmp_path):
    # A job stopped after its first shard, then rerun: the export covers the shard written by the first
    # run too, exactly as one uninterrupted run's export.
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=8)
    inputs = expand_inputs(pattern)
    (tmp_path / "once").mkdir()
    generator = make_generator(server, tmp_path / "once")
    generator.run(inputs, str(tmp_path / "once" / "out"), export_sft=str(tmp_path / "once" / "sft.jsonl"))
    generator.backend.close()
    generator = make_generator(server, tmp_path)
    generator.run(inputs[:1], str(tmp_path / "out"))  # stopped after shard 0
    generator.backend.close()
    generator = make_generator(server, tmp_path)
    stats = generator.run(inputs, str(tmp_path / "out"), export_sft=str(tmp_path / "sft.jsonl"))
    generator.backend.close()
    assert stats["shards_skipped"] == 1
    exported = (tmp_path / "sft.jsonl").read_text()
    assert exported == (tmp_path / "once" / "sft.jsonl").read_text()
    written = [s for p in sorted((tmp_path / "out").glob("*.tar")) for s in samples_of(p).values()]
    assert len(exported.splitlines()) == 2 * len({s["txt"] for s in written}) > 0


def test_timeouts_are_retried_and_refused_requests_dropped(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    server.slow_seconds = 2.0
    server.inject("slow", "400")
    generator = make_generator(server, tmp_path, concurrency=1)
    generator.backend._client_kwargs["timeout"] = 0.3  # per request attempt
    stats = generator.run(expand_inputs(pattern), str(tmp_path / "out"))
    generator.backend.close()
    (_, p0, o0), (_, p1, o1), (_, p2, o2) = server.log[:3]
    # The slow reply timed out and the same request was retried (and got the 400) ...
    assert (o0, o1) == ("slow", "400") and p1 == p0
    # ... which is not retried: the next request is another caption, and that one is dropped by reason.
    assert o2 == "ok" and p2 != p1
    assert stats["dropped"]["step1_request_rejected"] >= 1
    assert stats["samples_out"] == len(samples_of(tmp_path / "out" / "00000.tar")) > 0


def test_exhausted_retries_stop_the_job_without_writing_a_shard(server, tmp_path):
    from paraclip_plugin.paraphrase.backends import GenerationError

    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=4)
    server.inject(*["500"] * 50)
    generator = make_generator(server, tmp_path, concurrency=1)
    generator.backend._client_kwargs["max_retries"] = 1
    with pytest.raises(GenerationError, match="InternalServerError"):
        generator.run(expand_inputs(pattern), str(tmp_path / "out"))
    generator.backend.close()
    assert server.requests == 2  # one try + one client retry
    assert not list((tmp_path / "out").glob("*.tar*"))


JPG = b"\xff\xd8jpg"
GOOD = ("000000", {"jpg": JPG, "txt": b"a red car parked near the old house"})


@pytest.mark.parametrize(
    "samples, message",
    [
        (
            [
                GOOD,
                ("000001", {"jpg": JPG, "txt": b"a small boat on a calm lake"}),
                ("000000", {"jpg": JPG, "txt": b"a tree"}),
            ],
            r"sample key '000000' occurs twice, apart",
        ),
        ([GOOD, ("000000", {"txt": b"a tall green tree in a sunny park"})], r"sample '000000' has two 'txt' members"),
        (
            [GOOD, ("000001", {"jpg": JPG, "txt": b"a small boat on a calm lake", "json": b"[1, 2]"})],
            r"sample '000001': its json member is list, not a JSON object",
        ),
        (
            [GOOD, ("000001", {"jpg": JPG, "txt": b"a small boat on a calm lake", "json": b"null"})],
            r"sample '000001': its json member is NoneType, not a JSON object",
        ),
    ],
)
def test_bad_samples_stop_the_job_naming_file_and_sample_before_any_request(server, tmp_path, samples, message):
    pattern = write_samples(tmp_path / "in" / "00000.tar", samples)
    with pytest.raises(InputError, match=rf"in/00000\.tar: {message}"):
        run(server, tmp_path, pattern)
    assert server.requests == 0
    assert os.listdir(tmp_path / "out") == []  # no shard, no .partial, no sizes.json


def test_an_output_another_run_finished_before_we_took_its_lock_is_skipped(server, tmp_path, monkeypatch):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    run(server, tmp_path, pattern, out="other")
    finished = (tmp_path / "other" / "00000.tar").read_bytes()
    paid = server.requests
    real = pipeline.atomic_file

    def other_run_renames_its_shard_first(path, *args):
        with open(path, "wb") as f:  # the other run's rename, between our exists-check and our lock
            f.write(finished)
        return real(path, *args)

    monkeypatch.setattr(pipeline, "atomic_file", other_run_renames_its_shard_first)
    (tmp_path / "fresh").mkdir()  # a cache of its own: everything would be paid for again
    _, stats = run(server, tmp_path / "fresh", pattern)
    out = tmp_path / "fresh" / "out"
    assert server.requests == paid and stats["requests"] == 0
    assert (stats["shards_written"], stats["shards_skipped"]) == (0, 1)
    assert (out / "00000.tar").read_bytes() == finished and sorted(os.listdir(out)) == [
        ".sizes.json.lock",
        "00000.tar",
        "sizes.json",
    ]  # no .partial left
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": len(samples_of(out / "00000.tar"))}
