"""``--backend openai-batch`` end to end over real HTTP: the local server's /v1/files and /v1/batches."""

import json
import os
import signal
import sqlite3
import time

from test_paraphrase_cli import cli
from test_paraphrase_pipeline import input_captions
from test_paraphrase_support import samples_of, server, write_input_shards, write_samples  # noqa: F401

BATCH = ("--backend", "openai-batch", "--batch-poll-interval", "0.05", "--batch-max-requests", "5")


def texts(folder):
    """The caption and paraphrases of every written sample (the json differs: it names the backend)."""
    return {
        p.name: {k: (f["txt"], f["para1.txt"], f["para2.txt"]) for k, f in samples_of(p).items()}
        for p in sorted(folder.glob("*.tar"))
    }


def request_files(server):
    return {i: f["data"].decode().splitlines() for i, f in server.files.items() if f["purpose"] == "batch"}


def test_batch_backend_fills_the_cache_and_writes_the_same_shards(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=10)
    rc, _, stderr = cli(server, pattern, tmp_path / "sync")
    assert rc == 0, stderr
    sync_requests = server.requests
    server.expire_next = 2  # the first batch's last two requests expire unanswered
    out = tmp_path / "out"
    rc, _, stderr = cli(
        server,
        pattern,
        out,
        *BATCH,
        "--price-per-1k-prompt",
        "1",
        "--price-per-1k-completion",
        "2",
        "--stats",
        str(tmp_path / "stats.json"),
    )
    assert rc == 0, stderr
    assert texts(out) == texts(tmp_path / "sync") and texts(out)
    files = request_files(server)
    assert all(len(lines) <= 5 for lines in files.values())  # split at --batch-max-requests
    requests = [json.loads(line) for lines in files.values() for line in lines]
    assert {(r["method"], r["url"], r["body"]["max_tokens"], r["body"]["top_p"]) for r in requests} == {
        ("POST", "/v1/chat/completions", 512, 0.1)
    }
    assert all(
        b["completion_window"] == "24h" and b["endpoint"] == "/v1/chat/completions" for b in server.batches.values()
    )
    # The two expired requests went into a later batch; nothing else was asked twice.
    ids = [r["custom_id"] for r in requests]
    assert len(ids) == len(set(ids)) + 2
    assert server.requests - sync_requests == sync_requests  # each answered once: the same bill, at half price
    assert "expired" in {b["status"] for b in server.batches.values()}
    stats = json.loads((tmp_path / "stats.json").read_text())
    expected = (stats["prompt_tokens"] * 1 + stats["completion_tokens"] * 2) / 1000 * 0.5
    assert stats["price_factor"] == 0.5 and abs(stats["estimated_cost_usd"] - expected) < 1e-6 and expected > 0
    assert "batch batch_0001: 5 requests submitted" in stderr and "completed, 5/5 done" in stderr


def kill_with_batches_in_flight(server, pattern, out, batches):
    """Start the job, SIGKILL it once ``batches`` batches are recorded (the server holds them in flight
    until ``server.batch_seconds`` is set to 0); the rows of its batches table."""
    server.batch_seconds = 60
    proc = cli(server, pattern, out, *BATCH, wait=False)
    deadline = time.time() + 30
    recorded = []
    while time.time() < deadline and len(recorded) < batches:
        time.sleep(0.05)
        if (out / "cache.sqlite").exists():
            try:
                recorded = (
                    sqlite3.connect(str(out / "cache.sqlite")).execute("SELECT batch_id, state FROM batches").fetchall()
                )
            except sqlite3.OperationalError:  # the table is not there yet
                pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return recorded


def kept_captions(pattern):
    return {c for c in input_captions(pattern).values() if 2 <= len(c.split()) <= 15}


def test_sigkill_while_a_batch_is_in_flight_then_rerun_submits_nothing_new(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=10)
    kept = kept_captions(pattern)
    step1_batches = -(-len(kept) // 5)
    out = tmp_path / "out"
    recorded = kill_with_batches_in_flight(server, pattern, out, step1_batches)
    # Every batch the server accepted was recorded before the job waited for it.
    assert len(recorded) == step1_batches == len(server.batches)
    assert {b for b, _ in recorded} == set(server.batches) and {s for _, s in recorded} == {"submitted"}
    assert not list(out.glob("*.tar"))

    step1_files = set(request_files(server))
    server.batch_seconds = 0  # the batches in flight finish
    rc, _, stderr = cli(server, pattern, out, *BATCH)
    assert rc == 0, stderr
    assert "batch batch_0001: resuming" in stderr
    # The rerun submitted no step-1 request again: its new files hold step-2 requests only.
    new = [json.loads(line) for i, lines in request_files(server).items() if i not in step1_files for line in lines]
    assert new and all(r["body"]["messages"][0]["content"].startswith("Paraphrase the given text") for r in new)
    assert server.requests == 2 * len(kept)  # every caption paid for once per step
    assert sum(len(samples_of(p)) for p in out.glob("*.tar")) == sum(
        1 for c in input_captions(pattern).values() if 2 <= len(c.split()) <= 15
    )


def test_rerun_after_an_expiry_and_a_kill_pays_for_no_request_twice(server, tmp_path):
    # Batches end at their own times: the first ends with a request expired, the others are still running
    # when the job is killed. The rerun's misses (the expired request and the running batches' requests)
    # no longer split into the same files: it must read the recorded batches, not submit their requests again.
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=10)
    kept = {c for c in input_captions(pattern).values() if 2 <= len(c.split()) <= 15}
    step1_batches = -(-len(kept) // 5)
    assert step1_batches >= 3
    server.expire_next = 1
    server.held = {f"batch_{i:04d}" for i in range(2, 100)}
    out = tmp_path / "out"
    proc = cli(server, pattern, out, *BATCH, wait=False)
    deadline, states = time.time() + 30, {}
    while time.time() < deadline and states.get("batch_0001") != "read":
        time.sleep(0.05)
        try:
            states = dict(sqlite3.connect(str(out / "cache.sqlite")).execute("SELECT batch_id, state FROM batches"))
        except sqlite3.OperationalError:  # not there yet
            pass
    time.sleep(0.3)  # waiting for batch 2 now
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert states["batch_0001"] == "read" and len(states) == step1_batches

    server.held = set()  # the running batches finish
    rc, _, stderr = cli(server, pattern, out, *BATCH)
    assert rc == 0, stderr
    assert f"batch batch_{step1_batches:04d}: resuming" in stderr
    requests = [json.loads(line) for lines in request_files(server).values() for line in lines]
    step1 = [
        r["custom_id"]
        for r in requests
        if r["body"]["messages"][0]["content"].startswith("Paraphrase the given caption")
    ]
    assert len(step1) == len(set(step1)) + 1  # only the expired request was submitted twice
    assert server.requests == 2 * len(kept)  # every caption answered (paid for) once per step
    assert sum(len(samples_of(p)) for p in out.glob("*.tar")) == sum(
        1 for c in input_captions(pattern).values() if 2 <= len(c.split()) <= 15
    )


def test_answers_a_rerun_did_not_ask_for_are_kept_for_the_run_that_does(server, tmp_path):
    """A stopped run's batches hold both shards' requests; a rerun on the first shard alone reads them
    (it needs their answers) and keeps the second shard's answers, which a run on it then uses: no request
    is paid for twice (the same happens to array jobs sharing one cache)."""
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=10)
    first, second = (str(tmp_path / "in" / f"{i:05d}.tar") for i in range(2))
    kept = kept_captions(pattern)
    out = tmp_path / "out"
    assert len(kill_with_batches_in_flight(server, pattern, out, -(-len(kept) // 5))) >= 2
    server.batch_seconds = 0
    for shard in (first, second):
        rc, _, stderr = cli(server, shard, out, *BATCH)
        assert rc == 0, stderr
    assert server.requests == 2 * len(kept)  # every caption paid for once per step
    assert texts(out) == texts_of_a_run_without_stops(server, pattern, tmp_path / "clean")


def texts_of_a_run_without_stops(server, pattern, out):
    rc, _, stderr = cli(server, pattern, out, *BATCH)
    assert rc == 0, stderr
    return texts(out)


def test_the_batch_prefill_keeps_and_refuses_the_samples_the_run_does(server, tmp_path):
    jpg = b"\xff\xd8jpg"
    good = ("000001", {"jpg": jpg, "txt": b"a red car parked near the old house"})
    no_image = ("000002", {"txt": b"a caption whose image failed to download"})  # dropped by the run: never paid
    write_samples(tmp_path / "in" / "00000.tar", [good, no_image])
    rc, _, stderr = cli(server, str(tmp_path / "in" / "00000.tar"), tmp_path / "out", *BATCH)
    assert rc == 0, stderr
    prompts = [
        json.loads(line)["body"]["messages"][0]["content"] for lines in request_files(server).values() for line in lines
    ]
    assert len(prompts) == server.requests == 2 and not any("failed to download" in p for p in prompts)

    latin1 = ("000003", {"jpg": jpg, "txt": b"caf\xe9 tables on a sunny street corner"})  # not UTF-8
    write_samples(tmp_path / "bad" / "00000.tar", [good, no_image, latin1])
    before = len(server.files)
    rc, _, stderr = cli(server, str(tmp_path / "bad" / "00000.tar"), tmp_path / "out2", *BATCH)
    assert rc != 0 and "bad/00000.tar: sample '000003': unreadable txt/json member" in stderr.splitlines()[-1]
    assert len(server.files) == before and server.requests == 2  # nothing uploaded, submitted or paid


def test_a_second_run_of_the_same_job_stops_before_submitting_a_batch(server, tmp_path):
    """An array task submitted twice: while the first run waits for its batches, the second stops at
    once, naming the output, and submits nothing."""
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=10)
    out = tmp_path / "out"
    server.batch_seconds = 60
    first = cli(server, pattern, out, *BATCH, wait=False)
    try:
        step1_batches = -(-len(kept_captions(pattern)) // 5)
        deadline = time.time() + 30
        while time.time() < deadline and len(server.batches) < step1_batches:
            time.sleep(0.05)
        submitted = len(server.batches)
        assert submitted == step1_batches
        rc, _, stderr = cli(server, pattern, out, *BATCH)
        assert rc != 0 and "another run of job 0 of 1 is submitting batches" in stderr and str(out) in stderr
        assert len(server.batches) == submitted and len(server.files) == submitted
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
