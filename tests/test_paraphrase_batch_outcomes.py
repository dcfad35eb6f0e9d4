"""Every outcome the Batch API returns (issue 22), over real HTTP with the real openai client against the stand-in
server: per-line refusals and failures, vanished / failed / cancelled batches, retrieve outages, lost create replies,
the enqueued-token limit, vllm run-batch files and the caps; kills at each phase boundary. Each test checks the
shards, the cache, the stats and the server's own count of batches and paid lines (nothing paid twice)."""

import collections
import hashlib
import json
import os
import signal
import sqlite3
import time
import types

import pytest

from paraclip_plugin.testing.local_server import LocalChatServer, raw_reply, run_batch_file
from paraclip_plugin.paraphrase.prompts import PromptSet
from test_paraphrase_batch import kept_captions, texts
from test_paraphrase_cli import cli
from test_paraphrase_pipeline import input_captions
from test_paraphrase_support import server, write_input_shards  # noqa: F401

BATCH = (
    "--backend",
    "openai-batch",
    "--batch-poll-interval",
    "0.05",
    "--batch-max-requests",
    "5",
    "--price-per-1k-prompt",
    "1",
    "--price-per-1k-completion",
    "2",
)
STEP2_MARK = PromptSet().step2.split('"')[0].encode()  # how a step-2 request file is told from a step-1 one


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Two input shards and what an uninterrupted batch run writes and pays for them (its own server)."""
    root = tmp_path_factory.mktemp("batch-job")
    pattern = write_input_shards(root / "in", num_shards=2, per_shard=10)
    with LocalChatServer(latency=0.002) as srv:
        rc, _, stderr = cli(srv, pattern, root / "reference", *BATCH)
        assert rc == 0, stderr
        paid = srv.paid_lines()
    kept = kept_captions(pattern)
    assert paid == 2 * len(kept) and len(kept) >= 11  # every kept caption paid once per step; >= 3 files a step
    return types.SimpleNamespace(
        pattern=pattern,
        reference=texts(root / "reference"),
        kept=sorted(kept),
        paid=paid,
        captions=input_captions(pattern),
    )


def run(server, job, out, *extra):
    """``(rc, stderr, stats or None)`` of one make_shards run on the job's inputs."""
    stats_path = out.parent / f"{out.name}-stats.json"
    if stats_path.exists():
        stats_path.unlink()
    rc, _, stderr = cli(server, job.pattern, out, *BATCH, "--stats", str(stats_path), *extra)
    return rc, stderr, json.loads(stats_path.read_text()) if stats_path.exists() else None


def without(job, captions):
    """The reference shards without the samples of ``captions``."""
    return {
        name: {k: v for k, v in samples.items() if v[0].decode() not in captions}
        for name, samples in job.reference.items()
    }


def samples_with(job, captions):
    return sum(1 for c in job.captions.values() if c in captions)


def cache_rows(out):
    return (
        sqlite3.connect(str(out / "cache.sqlite"))
        .execute("SELECT step, input, output, finish_reason FROM completions_v2")
        .fetchall()
    )


def batch_states(out):
    return dict(sqlite3.connect(str(out / "cache.sqlite")).execute("SELECT batch_id, state FROM batches"))


def quoted(captions):
    return {f'"{c}"' for c in captions}  # the prompts quote the caption: no caption matches inside another


def outcomes(server, outcome):
    with server.lock:
        return sum(1 for _, _, o in server.log if o == outcome)


def nothing_paid_twice(server):
    return all(n == 1 for n in collections.Counter(server.prompts()).values())


def expected_cost(server):
    """What the stats must estimate: the usage of every paid line, at the test prices, half price."""
    return sum(len(p.split()) * 1 + len(raw_reply(p).split()) * 2 for p in server.prompts()) / 1000 * 0.5


def wait_for(predicate, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def recorded(out):
    try:
        return batch_states(out)
    except sqlite3.OperationalError:  # not there yet
        return {}


# --- 1. per-request refusals ------------------------------------------------------------------------------


def test_refused_lines_drop_their_samples_are_cached_as_refused_and_never_sent_again(server, job, tmp_path):
    flagged = set(job.kept[:3])  # about 20% of the captions: their prompts are flagged (400 invalid_prompt)
    server.flag_text = quoted(flagged)
    out = tmp_path / "out"
    rc, stderr, stats = run(server, job, out)
    assert rc == 0, stderr
    assert texts(out) == without(job, flagged) and sum(map(len, texts(out).values())) > 0
    assert stats["dropped"]["step1_request_rejected"] == samples_with(job, flagged) > 0
    step1, step2 = stats["batches"]["step1"], stats["batches"]["step2"]
    assert step1["refused"] == {"invalid_prompt": 3} and step1["answered"] == len(job.kept) - 3
    assert step1["requests_submitted"] == len(job.kept) and step2["requests_submitted"] == len(job.kept) - 3
    refused = [r for r in cache_rows(out) if r[3] == "request_rejected"]
    assert sorted(r[1] for r in refused) == sorted(flagged) and all("flagged as potentially" in r[2] for r in refused)
    # each flagged request was sent once: not again in the shards' pass, and a rerun sends nothing at all
    assert outcomes(server, "flagged") == 3 and server.paid_lines() == job.paid - 2 * 3 and nothing_paid_twice(server)
    assert stats["estimated_cost_usd"] == pytest.approx(expected_cost(server)) and stats["estimated_cost_usd"] > 0
    assert stats["estimated_cost_usd"] == pytest.approx(step1["estimated_cost_usd"] + step2["estimated_cost_usd"])
    batches = len(server.batches)
    rc, stderr, stats = run(server, job, out)
    assert rc == 0, stderr
    assert len(server.batches) == batches and outcomes(server, "flagged") == 3 and stats["shards_skipped"] == 2


def test_a_systematic_refusal_stops_by_the_synchronous_rule_and_caches_no_refusal(server, job, tmp_path):
    server.flag_text = {"Paraphrase the given"}  # every request (a wrong model, a rejected parameter)
    out = tmp_path / "out"
    rc, stderr, stats = run(server, job, out)
    assert rc != 0 and "step-1 requests, systematically" in stderr and "flagged as potentially" in stderr
    assert not list(out.glob("*.tar")) and not [r for r in cache_rows(out) if r[3] == "request_rejected"]
    assert stats["status"] == "failed"
    server.flag_text = set()  # fixed: the rerun asks again and writes what an uninterrupted run writes
    rc, stderr, _ = run(server, job, out)
    assert rc == 0, stderr
    assert texts(out) == job.reference


# --- 2. a vanished batch ------------------------------------------------------------------------------------


def test_a_vanished_batch_or_file_sends_its_requests_again_with_a_warning(server, job, tmp_path):
    out = tmp_path / "out"
    server.held = {f"batch_{i:04d}" for i in range(1, 100)}
    proc = cli(server, job.pattern, out, *BATCH, wait=False)
    assert wait_for(lambda: len(recorded(out)) >= 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    server.held = set()
    assert wait_for(lambda: all(b["status"] == "completed" for b in server.batches.values()))
    lost = {
        i: server.files[server.batches[i]["input_file_id"]]["data"].count(b"\n") for i in ("batch_0001", "batch_0002")
    }
    server.forget("batch_0001")  # another key or project, a changed --base-url: 404 on retrieve
    server.forget(server.batches["batch_0002"]["output_file_id"])  # a deleted output file: 404 on its content
    rc, stderr, stats = run(server, job, out)
    assert rc == 0, stderr
    assert "batch batch_0001: batches.retrieve answered 404" in stderr
    assert "batch batch_0002: its file answered 404" in stderr and "go back to pending" in stderr
    assert "failed after the client's retries" not in stderr
    assert stats["batches"]["step1"]["batches_vanished"] == 2
    assert texts(out) == job.reference
    states = batch_states(out)
    assert states["batch_0001"] == states["batch_0002"] == "vanished" and states["batch_0003"] == "read"
    # paid again: exactly the lines of the two batches that are gone, nothing else
    assert server.paid_lines() == job.paid + sum(lost.values())
    assert len({r[1] for r in cache_rows(out) if r[0] == 1}) == len(job.kept)


# --- 3. the enqueued-token limit -------------------------------------------------------------------------------


def token_limit(job):
    """An enqueued-token limit (the stand-in counts prompt words) that takes any one request file of the job (5
    requests, step 1 or 2: a step-2 prompt holds a step-1 output, the caption's words and a tag) but not all."""
    largest = max(len(PromptSet().render(step, c).split()) + 3 for step in (1, 2) for c in job.kept)
    return 5 * largest


def test_token_limit_failures_wait_and_resubmit_in_the_same_run(server, job, tmp_path):
    server.enqueued_token_limit = token_limit(job)
    server.batch_seconds = 0.3  # batches overlap
    out = tmp_path / "out"
    rc, stderr, stats = run(server, job, out)
    assert rc == 0, stderr  # one invocation to the end
    failed = [b for b in server.batches.values() if b["status"] == "failed"]
    assert failed and all(b["errors"]["data"][0]["code"] == "token_limit_exceeded" for b in failed)
    resubmitted = sum(s["batches_resubmitted"] for s in stats["batches"].values())
    assert resubmitted == len(failed) and "token_limit_exceeded" in stderr
    assert texts(out) == job.reference and server.paid_lines() == job.paid and nothing_paid_twice(server)


def test_submission_within_the_enqueued_token_budget_never_meets_the_limit(server, job, tmp_path):
    server.enqueued_token_limit = token_limit(job)
    server.batch_seconds = 0.3
    longest = max(len(PromptSet().render(s, c).encode()) for s in (1, 2) for c in job.kept)
    budget = 5 * ((longest + 10) // 3 + 8)  # the client's estimate of this job's largest request file: one at a time
    rc, stderr, stats = run(server, job, tmp_path / "out", "--batch-max-enqueued-tokens", str(budget))
    assert rc == 0, stderr
    assert not [b for b in server.batches.values() if b["status"] == "failed"]
    assert all(s["batches_resubmitted"] == 0 for s in stats["batches"].values())
    assert texts(tmp_path / "out") == job.reference and server.paid_lines() == job.paid


# --- 4. paid at most once: lost create replies --------------------------------------------------------------


def test_a_lost_create_reply_is_found_by_its_metadata_not_created_twice(server, job, tmp_path):
    server.create_faults.extend(["drop", "500"])  # created on the server, the reply lost / a 500
    out = tmp_path / "out"
    rc, stderr, stats = run(server, job, out)
    assert rc == 0, stderr
    assert "checking in" in stderr and "adopted" in stderr
    assert stats["batches"]["step1"]["batches_adopted"] == 2
    hashes = [b["metadata"]["paraclip_request_file"] for b in server.batches.values()]
    assert len(hashes) == len(set(hashes))  # no request file made two batches
    for b in server.batches.values():
        assert (
            hashlib.sha256(server.files[b["input_file_id"]]["data"]).hexdigest()
            == b["metadata"]["paraclip_request_file"]
        )
        assert b["metadata"]["paraclip_job"].endswith("job 0 of 1") and str(tmp_path) not in json.dumps(b["metadata"])
    assert set(batch_states(out)) == set(server.batches)  # every batch the server made is recorded and read
    assert texts(out) == job.reference and server.paid_lines() == job.paid and nothing_paid_twice(server)


# --- 5. a request failing in every round ---------------------------------------------------------------------


def test_a_request_failing_in_every_round_is_dropped_and_the_job_goes_on(server, job, tmp_path):
    failing = job.kept[4]
    server.fail_text = quoted({failing})  # a 500 line in every batch
    out = tmp_path / "out"
    rc, stderr, stats = run(server, job, out, "--batch-rounds", "2")
    assert rc == 0, stderr
    assert texts(out) == without(job, {failing})
    assert stats["dropped"]["step1_request_failed"] == samples_with(job, {failing}) > 0
    assert stats["batches"]["step1"]["failed"] == {"server_error": 1}
    assert stats["batches"]["step2"]["answered"] == len(job.kept) - 1  # step 2 ran for everyone else
    assert outcomes(server, "500") == 2  # once per round, not again in the shards' pass
    assert failing not in {r[1] for r in cache_rows(out)}  # not cached: a later run asks again
    assert server.paid_lines() == job.paid - 2  # the failing caption: no step-1 answer, no step-2 request


# --- 6. a cancelled batch --------------------------------------------------------------------------------


def test_a_cancelled_batch_stops_the_job_until_resubmission_is_asked_for(server, job, tmp_path):
    out = tmp_path / "out"
    server.held = {f"batch_{i:04d}" for i in range(1, 100)}
    proc = cli(server, job.pattern, out, *BATCH, wait=False)
    assert wait_for(lambda: len(recorded(out)) >= 3)
    server.cancel("batch_0002")  # someone stops it on purpose
    server.held = set()
    _, stderr = proc.communicate(timeout=60)
    stderr = stderr.decode()
    assert (
        proc.returncode != 0 and "batch batch_0002 was cancelled" in stderr and "--batch-resubmit-cancelled" in stderr
    )
    assert len(server.batches) == 3 and server.batches["batch_0002"]["status"] == "cancelled"
    assert not list(out.glob("*.tar"))
    rc, stderr, _ = run(server, job, out)  # a rerun without the flag: the same stop, nothing submitted
    assert rc != 0 and "batch batch_0002 was cancelled" in stderr and len(server.batches) == 3
    counts = server.batches["batch_0002"]["request_counts"]
    unanswered = server.files[server.batches["batch_0002"]["input_file_id"]]["data"].count(b"\n") - counts["completed"]
    assert counts["completed"] > 0 and unanswered > 0
    rc, stderr, stats = run(server, job, out, "--batch-resubmit-cancelled")
    assert rc == 0, stderr
    assert stats["batches"]["step1"]["requests_submitted"] == unanswered  # only what the cancelled batch left
    assert texts(out) == job.reference
    assert server.paid_lines() == job.paid and nothing_paid_twice(server)  # the cancelled batch's answers kept
    assert batch_states(out)["batch_0002"] == "cancelled-resubmitted"


# --- 7. retrieve outages -----------------------------------------------------------------------------------


def test_polling_survives_a_retrieve_outage_longer_than_the_clients_retries(server, job, tmp_path):
    server.retrieve_failures = 5  # the client retries nothing (--max-retries 0): five failed polls in a row
    rc, stderr, stats = run(server, job, tmp_path / "out", "--max-retries", "0", "--max-wait", "60")
    assert rc == 0, stderr
    assert sum(s["batches_created"] for s in stats["batches"].values()) == len(server.batches)  # none twice
    assert "status unavailable (InternalServerError)" in stderr and server.retrieve_failures <= 0
    assert texts(tmp_path / "out") == job.reference and server.paid_lines() == job.paid


def test_an_outage_past_max_wait_stops_cleanly_and_the_rerun_resumes(server, job, tmp_path):
    server.retrieve_failures = 10**6
    out = tmp_path / "out"
    rc, stderr, stats = run(server, job, out, "--max-retries", "0", "--max-wait", "1")
    assert rc != 0 and "above --max-wait 1 s" in stderr and "rerun to resume" in stderr
    assert stats["status"] == "failed" and set(batch_states(out).values()) == {"submitted"}
    created = len(server.batches)
    server.retrieve_failures = 0
    rc, stderr, _ = run(server, job, out)
    assert rc == 0, stderr
    assert texts(out) == job.reference and server.paid_lines() == job.paid and nothing_paid_twice(server)
    assert len(server.batches) > created  # step 2's; step 1 was read from the recorded batches, not sent again


# --- 8. vllm run-batch files -------------------------------------------------------------------------------


def test_vllm_run_batch_request_and_results_files_round_trip(server, job, tmp_path):
    flagged = {job.kept[0]}
    server.flag_text = quoted(flagged)  # vLLM's error line shape: body null, the ErrorResponse in "error"
    out, folder = tmp_path / "out", tmp_path / "requests"
    results = []
    for step in (1, 2):
        rc, stderr, _ = run(
            server,
            job,
            out,
            "--write-batch-requests",
            str(folder),
            *(("--read-batch-results", "::".join(results)) if results else ()),
        )
        assert rc == 3 and "vllm run-batch" in stderr, stderr
        files = sorted(folder.glob(f"step{step}-*.jsonl"))
        assert files and all(len(f.read_text().splitlines()) <= 5 for f in files)
        for path in files:  # what `vllm run-batch -i path -o path.results.jsonl` writes, answered by the stand-in
            run_batch_file(server, path, f"{path}.results")
            results.append(f"{path}.results")
    rc, stderr, stats = run(server, job, out, "--read-batch-results", "::".join(results))
    assert rc == 0, stderr
    assert texts(out) == without(job, flagged)
    assert not server.batches and not server.headers_seen  # nothing went to a server
    assert server.paid_lines() == job.paid - 2  # the refused caption: neither step paid
    assert [r[1] for r in cache_rows(out) if r[3] == "request_rejected"] == list(flagged)
    assert stats["dropped"]["step1_request_rejected"] == samples_with(job, flagged)


# --- 9. the API's caps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--batch-max-requests", "50001"), ("--batch-max-bytes", "200000001")])
def test_caps_above_the_apis_are_refused_by_flag(server, job, tmp_path, flag, value):
    rc, stderr, _ = run(server, job, tmp_path / "out", flag, value)
    assert rc == 2 and f"argument {flag}: must be an integer in [1, " in stderr
    assert not server.headers_seen and not (tmp_path / "out").exists()


# --- kills at each phase boundary --------------------------------------------------------------------------

PAUSES = {
    "before create": ("upload", None),
    "between create and record": ("create", None),
    "while reading results": ("content", None),
    "between steps": ("upload", lambda data: STEP2_MARK in data),
}


@pytest.mark.parametrize(
    "boundary",
    ["before create", "between create and record", "while waiting", "while reading results", "between steps"],
)
def test_a_kill_at_a_phase_boundary_then_a_rerun_equals_an_uninterrupted_run(server, job, tmp_path, boundary):
    out = tmp_path / "out"
    if boundary == "while waiting":
        server.held = {f"batch_{i:04d}" for i in range(1, 100)}
    else:
        server.pause_on = PAUSES[boundary]  # the server holds that request: the client is killed right there
    proc = cli(server, job.pattern, out, *BATCH, wait=False)
    assert wait_for(lambda: len(recorded(out)) >= 3) if boundary == "while waiting" else server.paused.wait(30)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    server.held = set()
    server.resume.set()
    rc, stderr, stats = run(server, job, out)
    assert rc == 0, stderr
    assert texts(out) == job.reference
    assert server.paid_lines() == job.paid and nothing_paid_twice(server)
    assert set(batch_states(out)) == set(server.batches)  # every batch the server holds was recorded
    adopted = sum(s["batches_adopted"] for s in stats["batches"].values())
    assert adopted == (1 if boundary == "between create and record" else 0)
