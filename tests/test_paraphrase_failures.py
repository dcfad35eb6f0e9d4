"""Failures a 5M-caption job meets, each over real HTTP against the local OpenAI-compatible server.

Numbers refer to issue 9's cases: (1) systematic refusals, (2) finish_reason, (3) odd 200 bodies,
(4) Retry-After above the client's 120 s, (5) max_completion_tokens and <think>, (6) the cache key,
(7) the API key's host.
"""

import json
import os

import pytest

from paraclip_plugin.paraphrase import cleaning
from paraclip_plugin.paraphrase.backends import GenerationError
from paraclip_plugin.paraphrase.backends.openai_backend import OpenAIBackend
from paraclip_plugin.data.inputs import expand_inputs
from paraclip_plugin.testing.local_server import (
    OPENAI_MAX_TOKENS_ERROR,
    LocalChatServer,
    VLLM_NO_TEMPLATE_ERROR,
    quoted_text,
    raw_reply,
)
from paraclip_plugin.paraphrase.prompts import PromptSet
from test_paraphrase_cli import SENTINEL_KEY, cli, tar_contents
from test_paraphrase_pipeline import make_generator, run
from test_paraphrase_support import read_tar, samples_of, server, write_input_shards, write_samples  # noqa: F401


def no_traceback(stderr):
    return "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("paraclip-make-shards: error: ")


# --- (1) a server that refuses every request ------------------------------------------------------


def test_server_refusing_everything_stops_nonzero_writes_nothing_and_rerun_redoes(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=10)
    out = tmp_path / "out"
    server.no_chat_template = True  # `vllm serve` of a model without a chat template: 400 on every request
    rc, _, stderr = cli(server, pattern, out)
    assert rc != 0 and no_traceback(stderr)
    assert "00000.tar" in stderr and VLLM_NO_TEMPLATE_ERROR["message"] in stderr  # the server's own words
    assert not list(out.glob("*.tar")) and not (out / "sizes.json").exists()
    refused = server.requests
    assert refused <= 10  # it stopped at the first batch, not after asking for every caption

    server.no_chat_template = False  # fixed: the rerun redoes the shards, as a run that never failed
    rc, _, stderr = cli(server, pattern, out)
    assert rc == 0, stderr
    rc, _, stderr = cli(server, pattern, tmp_path / "never_failed")
    assert rc == 0, stderr
    assert len(list(out.glob("*.tar"))) == 2 and tar_contents(out) == tar_contents(tmp_path / "never_failed")


def test_reasoning_model_refusing_max_tokens_stops_with_its_message(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=10)
    server.reject_max_tokens = True
    # Forced to the old parameter name: every request is refused; the job says why and stops.
    rc, _, stderr = cli(server, pattern, tmp_path / "out", "--token-param", "max_tokens")
    assert rc != 0 and no_traceback(stderr) and OPENAI_MAX_TOKENS_ERROR["error"]["message"] in stderr
    assert not list((tmp_path / "out").glob("*.tar"))


def test_small_batches_refused_by_the_service_never_give_an_empty_shard(server, tmp_path):
    # Batches below the fraction rule's minimum (4): the shard rule still refuses to write "nothing".
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=3)
    server.no_chat_template = True
    generator = make_generator(server, tmp_path)
    with pytest.raises(GenerationError, match=r"00000\.tar: .*refused"):
        generator.run(expand_inputs(pattern), str(tmp_path / "out"))
    generator.backend.close()
    assert 0 < server.requests < 4 and not list((tmp_path / "out").glob("*.tar"))


def test_a_model_whose_every_answer_is_unusable_writes_no_empty_shard(server, tmp_path):
    # A model that answers (200) with a refusal in words or nothing at all, for every caption and attempt:
    # the service is fine, the answers are not. No complete-looking empty shard a rerun would skip.
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=6)
    server.inject(*["refusal", "empty"] * 200)
    out = tmp_path / "out"
    rc, _, stderr = cli(server, pattern, out, "--concurrency", "2")
    assert rc != 0 and no_traceback(stderr)
    assert "00000.tar: every kept sample was dropped (step1_empty, step1_refusal)" in stderr
    assert not list(out.glob("*.tar")) and not (out / "sizes.json").exists()


def declined_shard(path, caption):
    """A small input whose one kept caption the model declines (the other sample is too short to keep)."""
    return write_samples(
        path,
        [("000000", {"jpg": b"\xff\xd8", "txt": caption.encode()}), ("000001", {"jpg": b"\xff\xd8", "txt": b"ok"})],
    )


def test_an_input_whose_every_sample_is_dropped_is_listed_and_the_others_are_written(server, tmp_path):
    declined = "an explicit photo that the model declines"
    declined_shard(tmp_path / "in" / "00000.tar", declined)
    write_input_shards(tmp_path / "other", num_shards=1, per_shard=6)
    os.rename(tmp_path / "other" / "00000.tar", tmp_path / "in" / "00001.tar")
    server.refuse_text(declined, times=10**6)  # "I'm sorry, but I can't help with that", every attempt
    out, pattern = tmp_path / "out", str(tmp_path / "in" / "{00000..00001}.tar")
    for attempt in range(2):
        rc, _, stderr = cli(
            server,
            pattern,
            out,
            "--stats",
            str(tmp_path / f"stats{attempt}.json"),
            "--export-sft",
            str(out / "sft.jsonl"),
        )
        assert rc != 0 and no_traceback(stderr)
        # the pairs of what was written (two per sample), none of the input that was not
        sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
        assert sft and len(sft) <= 2 * len(samples_of(out / "00001.tar"))
        assert not any(declined in m["content"] for r in sft for m in r["messages"])
        assert (
            f"error: 1 of 2 inputs could not be written (the others are): {tmp_path}/in/00000.tar: every kept "
            "sample was dropped (step1_refusal)"
        ) in stderr.splitlines()[-1]
        assert sorted(p.name for p in out.glob("*.tar*")) == ["00001.tar"]  # never an empty 00000.tar
        assert json.loads((out / "sizes.json").read_text()) == {"00001.tar": len(samples_of(out / "00001.tar"))}
        stats = json.loads((tmp_path / f"stats{attempt}.json").read_text())
        assert stats["status"] == "incomplete" and list(stats["failed_inputs"]) == [f"{tmp_path}/in/00000.tar"]
        if attempt == 0:
            paid = server.requests
    assert server.requests == paid  # the rerun replayed the declined answers from the cache
    assert stats["shards_skipped"] == 1 and stats["requests"] == 0


def test_a_rerun_counts_failures_in_a_row_among_the_inputs_it_reaches(server, tmp_path):
    """Inputs 0, 2, 4 can't be written; 1, 3 were written by a run that was then stopped. A rerun skips 1 and 3
    as done, so its three failures are not in a row: it writes 5 (before, it stopped there, on every rerun)."""
    for i in (0, 2, 4):
        declined_shard(tmp_path / "in" / f"{i:05d}.tar", f"declined caption number {i} of the job")
    for i in (1, 3, 5):
        write_input_shards(tmp_path / f"good{i}", num_shards=1, per_shard=4, seed=i)
        os.rename(tmp_path / f"good{i}" / "00000.tar", tmp_path / "in" / f"{i:05d}.tar")
    server.refuse_text("declined caption", times=10**6)
    out = tmp_path / "out"
    rc, _, stderr = cli(server, str(tmp_path / "in" / "{00000..00003}.tar"), out)
    assert rc != 0 and sorted(p.name for p in out.glob("*.tar")) == ["00001.tar", "00003.tar"]
    rc, _, stderr = cli(server, str(tmp_path / "in" / "*.tar"), out)
    assert rc != 0 and no_traceback(stderr) and "a systematic fault" not in stderr
    assert "3 of 6 inputs could not be written" in stderr
    assert sorted(p.name for p in out.glob("*.tar")) == ["00001.tar", "00003.tar", "00005.tar"]


def test_inputs_failing_one_after_another_stop_the_job(server, tmp_path):
    for i in range(4):
        declined_shard(tmp_path / "in" / f"{i:05d}.tar", f"declined caption number {i} of the job")
    server.refuse_text("declined caption", times=10**6)  # as a wrong chat template would make every answer
    rc, _, stderr = cli(server, str(tmp_path / "in" / "*.tar"), tmp_path / "out", "--stats", str(tmp_path / "s.json"))
    assert rc != 0 and no_traceback(stderr)
    assert "3 inputs in a row could not be written, a systematic fault: stopping" in stderr
    assert not any("number 3" in p for _, p, _ in server.log)  # the fourth input was never paid for
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["status"] == "failed" and len(stats["failed_inputs"]) == 3


def test_one_refused_caption_is_dropped_and_the_job_goes_on(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=12)
    (tmp_path / "reference").mkdir()
    _, reference = run(server, tmp_path / "reference", pattern, concurrency=1)  # the same job without the fault
    server.inject("400")  # one request refused for good (a content policy)
    _, stats = run(server, tmp_path, pattern, concurrency=1)
    assert stats["dropped"]["step1_request_rejected"] == 1
    # the samples of the refused caption (duplicates included) are left out, every other sample is written
    (refused,) = server.prompts("400")
    written = samples_of(tmp_path / "reference" / "out" / "00000.tar")
    lost = {key for key, fields in written.items() if fields["txt"].decode() == quoted_text(refused)}
    assert lost and set(samples_of(tmp_path / "out" / "00000.tar")) == set(written) - lost
    assert len(samples_of(tmp_path / "out" / "00000.tar")) == stats["samples_out"]


# --- (2) finish_reason ------------------------------------------------------------------------------


def test_content_filter_and_length_are_dropped_once_and_replayed_from_the_cache(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=12)
    server.inject("content_filter", "length")  # content null, as the API sends them
    _, stats = run(server, tmp_path, pattern, concurrency=1)
    filtered, cut = (p for _, p, o in server.log[:2])
    assert stats["dropped"]["step1_content_filter"] >= 1 and stats["dropped"]["step1_length"] >= 1
    assert not set(stats["retried"]) & {"content_filter", "length"}
    prompts = [p for _, p, _ in server.log]
    assert prompts.count(filtered) == 1 and prompts.count(cut) == 1  # never asked again
    before = server.requests
    (tmp_path / "out" / "00000.tar").unlink()
    _, again = run(server, tmp_path, pattern, concurrency=1)  # same cache: the same drops, nothing paid
    assert server.requests == before and again["dropped"] == stats["dropped"]


# --- (3) odd 200 bodies -----------------------------------------------------------------------------


def test_odd_200_bodies_are_retried_like_malformed_ones(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    run(server, tmp_path, pattern, out="reference")
    sub = tmp_path / "odd"
    sub.mkdir()
    server.inject("html", "choices-dict", "bad-utf8", "malformed")
    start = len(server.log)
    run(server, sub, pattern, concurrency=1)
    assert [o for _, _, o in server.log[start : start + 5]] == ["html", "choices-dict", "bad-utf8", "malformed", "ok"]
    assert read_tar(sub / "out" / "00000.tar") == read_tar(tmp_path / "reference" / "00000.tar")


@pytest.mark.parametrize("fault", ["html", "choices-dict", "bad-utf8"])
def test_odd_bodies_past_the_bound_stop_with_one_line_naming_the_request(server, tmp_path, fault):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=4)
    server.inject(*[fault] * 3)
    rc, _, stderr = cli(server, pattern, tmp_path / "out", "--malformed-retries", "2", "--concurrency", "1")
    assert rc != 0 and no_traceback(stderr)
    last = stderr.strip().splitlines()[-1]
    assert "malformed 200 responses 3 times in a row" in last and f"POST {server.base_url}/chat/completions" in last
    assert "(prompt 'Paraphrase the given caption" in last
    assert server.requests == 3 and not list((tmp_path / "out").glob("*.tar"))


# --- (4) Retry-After above the client's 120 s cap ---------------------------------------------------


def test_long_retry_after_is_waited_out(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    run(server, tmp_path, pattern, out="reference")
    sub = tmp_path / "limited"
    sub.mkdir()
    generator = make_generator(server, sub, concurrency=1)
    waits, clock = [], [1000.0]

    async def fast_forward(seconds):  # the wait is recorded and the clock moved on, not slept (2 minutes)
        waits.append(seconds)
        clock[0] += seconds

    generator.backend._clock, generator.backend._sleep = (lambda: clock[0]), fast_forward
    server.long_retry_after = "121"
    server.inject("429-long")
    start = len(server.log)
    stats = generator.run(expand_inputs(pattern), str(sub / "out"))
    generator.backend.close()
    # The client gave up at once (no retry of its own past its 120 s cap); we waited what the server asked.
    assert [o for _, _, o in server.log[start : start + 2]] == ["429-long", "ok"]
    assert len(waits) == 1 and 120.0 < waits[0] <= 121.0 and stats["rate_limit_wait_seconds"] == 121.0
    assert read_tar(sub / "out" / "00000.tar") == read_tar(tmp_path / "reference" / "00000.tar")


def test_retry_after_beyond_max_wait_stops_cleanly(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    server.long_retry_after = "3600"
    server.inject("429-long")
    rc, _, stderr = cli(server, pattern, tmp_path / "out", "--max-wait", "600", "--concurrency", "1")
    assert rc != 0 and no_traceback(stderr)
    assert "3600 s" in stderr and "--max-wait 600" in stderr
    assert server.requests == 1 and not list((tmp_path / "out").glob("*.tar"))


# --- (5) max_completion_tokens and <think> -----------------------------------------------------------


def test_token_param_switches_once_when_the_server_refuses_max_tokens(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=10)
    server.reject_max_tokens = True  # OpenAI's reasoning models
    rc, _, stderr = cli(server, pattern, tmp_path / "out", "--concurrency", "1")  # auto: max_tokens off OpenAI
    assert rc == 0, stderr
    assert "sending 'max_completion_tokens' from now on" in stderr
    assert "max_tokens" in server.bodies[0]
    assert all("max_tokens" not in b and b["max_completion_tokens"] == 512 for b in server.bodies[2:])
    assert len(samples_of(tmp_path / "out" / "00000.tar")) > 0


def test_openai_host_gets_max_completion_tokens_by_default():
    assert OpenAIBackend("m", "k").token_param == "max_completion_tokens"
    assert OpenAIBackend("m", "k", base_url="https://api.openai.com/v1").token_param == "max_completion_tokens"
    assert OpenAIBackend("m", "k", base_url="http://gpu-node:8000/v1").token_param == "max_tokens"
    assert (
        OpenAIBackend("m", "k", base_url="http://gpu-node:8000/v1", token_param="max_completion_tokens").token_param
        == "max_completion_tokens"
    )


def test_reasoning_model_think_blocks_are_stripped(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=8)
    server.reasoning = True
    run(server, tmp_path, pattern)
    samples = samples_of(tmp_path / "out" / "00000.tar").values()
    assert samples
    for fields in samples:
        para1 = fields["para1.txt"].decode()
        assert "think" not in para1.lower() and "<" not in para1
        assert para1 == cleaning.clean(raw_reply(PromptSet().render(1, fields["txt"].decode())))


# --- (6) every output-changing setting is in the cache key and in each sample's json -----------------


def test_changed_sampling_makes_new_requests_and_is_recorded(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=8)
    cache = ("--cache", str(tmp_path / "cache.sqlite"))
    rc, _, stderr = cli(server, pattern, tmp_path / "paper", *cache)
    assert rc == 0, stderr
    first = server.requests
    for setting, value in (("temperature", 0.5), ("top_p", 0.9), ("max_tokens", 64)):
        before = server.requests
        rc, _, stderr = cli(server, pattern, tmp_path / setting, *cache, "--" + setting.replace("_", "-"), str(value))
        assert rc == 0, stderr
        assert server.requests - before == first  # nothing replayed from the other sampling
        assert {b[setting] for b in server.bodies[before:]} == {value}
        for fields in samples_of(tmp_path / setting / "00000.tar").values():
            assert json.loads(fields["json"])["paraphrase_settings"][setting] == value
    before = server.requests
    rc, _, _ = cli(server, pattern, tmp_path / "again", *cache)
    assert rc == 0 and server.requests == before  # the paper's settings again: all from the cache
    assert tar_contents(tmp_path / "again") == tar_contents(tmp_path / "paper")


# --- (7) the API key goes to the host it is meant for only ---------------------------------------------


def test_openai_key_is_not_sent_to_another_host(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=4)
    rc, _, stderr = cli(server, pattern, tmp_path / "out")  # OPENAI_API_KEY is set in the environment
    assert rc == 0, stderr
    assert server.authorizations == {"Bearer EMPTY"}
    # Nor when the host comes from OPENAI_BASE_URL, which the client would read by itself, nor through
    # OPENAI_CUSTOM_HEADERS, whose Authorization the client would send to any host.
    out = tmp_path / "env"
    rc, _, stderr = cli(
        server,
        pattern,
        out,
        env={"OPENAI_BASE_URL": server.base_url, "OPENAI_CUSTOM_HEADERS": f"Authorization: Bearer {SENTINEL_KEY}"},
    )
    assert rc == 0, stderr
    assert server.authorizations == {"Bearer EMPTY"}
    assert all(SENTINEL_KEY not in json.dumps(b) for b in server.bodies)


def test_api_key_env_names_the_variable_and_must_be_set(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=4)
    rc, _, stderr = cli(
        server, pattern, tmp_path / "out", "--api-key-env", "PARACLIP_NODE_KEY", env={"PARACLIP_NODE_KEY": "node-key-1"}
    )
    assert rc == 0, stderr
    assert server.authorizations == {"Bearer node-key-1"}
    before = server.requests
    rc, _, stderr = cli(server, pattern, tmp_path / "out2", "--api-key-env", "PARACLIP_UNSET_KEY")
    assert rc != 0 and "--api-key-env PARACLIP_UNSET_KEY" in stderr and no_traceback(stderr)
    assert server.requests == before  # the failing run sent nothing
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").glob("*.tar"))


BATCH = ("--backend", "openai-batch", "--batch-poll-interval", "0.05")
ENV_HEADERS = {
    "OPENAI_ORG_ID": "org-SENTINEL",
    "OPENAI_PROJECT_ID": "proj-SENTINEL",
    "OPENAI_CUSTOM_HEADERS": f"api-key: {SENTINEL_KEY}\nX-Api-Key: {SENTINEL_KEY}",
}


@pytest.mark.parametrize("backend", [(), BATCH], ids=["openai", "openai-batch"])
def test_headers_the_client_takes_from_the_environment_stay_off_other_hosts(server, tmp_path, backend):
    """OPENAI_ORG_ID / OPENAI_PROJECT_ID / OPENAI_CUSTOM_HEADERS (e.g. an Azure api-key) are OpenAI's: the client
    would add them to every request, to any host."""
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=4)
    rc, _, stderr = cli(server, pattern, tmp_path / "out", *backend, env=ENV_HEADERS)
    assert rc == 0, stderr
    assert server.headers_seen and server.authorizations == {"Bearer EMPTY"}
    sent = json.dumps(server.headers_seen)
    assert "SENTINEL" not in sent  # neither the key, nor the organization, nor the project
    assert not {"api-key", "x-api-key", "openai-organization", "openai-project"} & set().union(*server.headers_seen)


@pytest.mark.parametrize("backend", [(), BATCH], ids=["openai", "openai-batch"])
def test_a_redirect_is_not_followed_and_stops_the_job_naming_its_target(server, tmp_path, backend):
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=4)
    with LocalChatServer() as elsewhere:
        server.redirect_to = elsewhere.base_url
        rc, _, stderr = cli(
            server, pattern, tmp_path / "out", *backend, "--api-key-env", "PARACLIP_TEST_KEY", env=ENV_HEADERS
        )
        assert rc != 0 and no_traceback(stderr), stderr
        assert f"HTTP 307, a redirect to {elsewhere.base_url}/" in stderr and "--base-url" in stderr
        assert server.headers_seen and not elsewhere.headers_seen  # nothing, key or not, reached the other host
        assert SENTINEL_KEY not in stderr
    assert not list((tmp_path / "out").glob("*.tar"))


@pytest.mark.parametrize("backend", [(), BATCH], ids=["openai", "openai-batch"])
def test_a_key_with_a_line_end_is_refused_by_name_before_any_request(server, tmp_path, backend):
    """httpx would refuse the header and print it, key included, in its error."""
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=4)
    for bad in (SENTINEL_KEY + "\r", SENTINEL_KEY + " ", SENTINEL_KEY + "\n", "sk-\u00e9" + SENTINEL_KEY):
        rc, _, stderr = cli(
            server, pattern, tmp_path / "out", *backend, "--api-key-env", "PARACLIP_TEST_KEY", env_key=bad
        )
        assert rc != 0 and no_traceback(stderr), stderr
        assert "PARACLIP_TEST_KEY" in stderr and "line end" in stderr and SENTINEL_KEY not in stderr
    assert server.requests == 0 and not server.headers_seen


def test_urls_keys_and_hosts_that_would_leak_a_key_are_refused_by_name(server, tmp_path):
    from paraclip_plugin.paraphrase.cli import build_backend, parse_args

    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=4)
    port = server.server_address[1]
    # credentials in the URL: the client would send them as Basic auth instead of the key, and print the URL
    rc, _, stderr = cli(server, pattern, tmp_path / "out", "--base-url", f"http://u:{SENTINEL_KEY}@127.0.0.1:{port}/v1")
    assert rc != 0 and no_traceback(stderr) and "--base-url: a URL with credentials" in stderr
    assert SENTINEL_KEY not in stderr and not server.headers_seen
    # a query (a key in it?) would be printed, and the client would append its paths after it
    rc, _, stderr = cli(server, pattern, tmp_path / "out", "--base-url", f"{server.base_url}?api-key={SENTINEL_KEY}")
    assert rc != 0 and no_traceback(stderr) and f"--base-url {server.base_url}: a URL with a query" in stderr
    assert SENTINEL_KEY not in stderr and not server.headers_seen

    def backend_for(*flags, **environ):
        return build_backend(
            parse_args(["--input", pattern, "--output", str(tmp_path / "o"), "--model", "m", *flags]),
            str(tmp_path / "cache.sqlite"),
            environ={"OPENAI_API_KEY": SENTINEL_KEY, "NODE_KEY": "node-key", **environ},
        )

    for url in ("http://api.openai.com/v1", "https://api.openai.com:8443/v1"):  # the hosted key in clear text
        with pytest.raises(ValueError, match="keys go to api.openai.com over https .port 443. only"):
            backend_for("--base-url", url)
    with pytest.raises(ValueError, match="OPENAI_BASE_URL http://api.openai.com/v1: keys go to"):
        backend_for(OPENAI_BASE_URL="http://api.openai.com/v1")
    # --api-key-env names the key for --base-url: with neither it nor OPENAI_BASE_URL it would go to OpenAI
    with pytest.raises(ValueError, match="neither --base-url nor OPENAI_BASE_URL is given"):
        backend_for("--api-key-env", "NODE_KEY")
    backend_for("--api-key-env", "NODE_KEY", "--base-url", "https://api.openai.com/v1").close()  # said: allowed
    with pytest.raises(ValueError, match="takes the NAME of an environment variable") as refused:
        backend_for("--api-key-env", SENTINEL_KEY, "--base-url", server.base_url)  # a key typed in its place
    assert SENTINEL_KEY not in str(refused.value)
    assert not server.headers_seen or all(SENTINEL_KEY not in json.dumps(h) for h in server.headers_seen)


def test_refusing_server_is_stopped_after_the_first_answers_not_the_whole_batch(server, tmp_path):
    # One shard of many captions at concurrency 1: the job stops after its first 8 refusals, not after 40.
    pattern = write_input_shards(tmp_path / "in", num_shards=1, per_shard=60)
    server.no_chat_template = True
    generator = make_generator(server, tmp_path, concurrency=1)
    with pytest.raises(GenerationError, match=r"refused 8 of the job's first 8 step-1 requests"):
        generator.run(expand_inputs(pattern), str(tmp_path / "out"))
    generator.backend.close()
    assert server.requests == 8 and not list((tmp_path / "out").glob("*.tar"))
