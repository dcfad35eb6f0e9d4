"""scripts/make_shards.py as users run it: a subprocess talking HTTP to the local server."""

import fcntl
import gzip
import json
import os
import signal
import subprocess
import time

import pytest

from test_paraphrase_support import (
    MAKE_SHARDS,
    PYTHON,
    read_tar,
    samples_of,
    server,  # noqa: F401 (a fixture)
    write_input_shards,
    write_samples,
)
from paraclip_plugin.testing.local_server import LocalChatServer

SENTINEL_KEY = "sk-SENTINEL-4e1f0c9a-never-write-me"


def cli(server, pattern, out, *extra, env_key=SENTINEL_KEY, wait=True, env=None):
    env = {**os.environ, "OPENAI_API_KEY": env_key, "PARACLIP_TEST_KEY": env_key, **(env or {})}
    for var in (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_MAX",
        "OPENAI_BASE_URL",
    ):
        env.pop(var, None)
    cmd = [
        PYTHON,
        str(MAKE_SHARDS),
        "--input",
        pattern,
        "--output",
        str(out),
        "--model",
        "local-paraphraser",
        "--base-url",
        server.base_url,
        "--no-progress",
        *extra,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout.decode(), stderr.decode()


def tar_contents(folder):
    return {p.name: read_tar(p) for p in sorted(folder.glob("*.tar"))}


def test_api_key_never_written_anywhere(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=2)
    out = tmp_path / "out"
    rc, stdout, stderr = cli(
        server,
        pattern,
        out,
        "--export-sft",
        str(out / "sft.jsonl"),
        "--stats",
        str(out / "stats.json"),
        "--concurrency",
        "4",
        "--api-key-env",
        "PARACLIP_TEST_KEY",
    )
    assert rc == 0, stderr
    assert server.authorizations == {f"Bearer {SENTINEL_KEY}"}  # the key was really used...
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"00000.tar", "sizes.json", "cache.sqlite", "sft.jsonl", "stats.json"} <= {p.name for p in files}
    for path in files:  # ...and is in no file written, nor in what the script printed
        assert SENTINEL_KEY.encode() not in path.read_bytes(), path
    assert SENTINEL_KEY not in stdout + stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples_out"] == len(samples_of(out / "00000.tar")) + len(samples_of(out / "00001.tar")) > 0
    assert stats["requests"] == server.requests


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=4, per_shard=14)
    rc, _, stderr = cli(server, pattern, tmp_path / "reference", "--concurrency", "1")
    assert rc == 0, stderr
    reference_requests = server.requests

    server.latency = 0.03  # slow enough that the kill lands inside a shard
    out = tmp_path / "out"
    proc = cli(server, pattern, out, "--concurrency", "1", wait=False)
    deadline = time.time() + 30
    while not list(out.glob("*.tar")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.15)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = list(out.glob("*.tar"))
    assert 1 <= len(complete) < 4  # killed mid-run, after some work was done
    for path in complete:  # no half shard under a final name
        assert read_tar(path) == read_tar(tmp_path / "reference" / path.name)
    server.latency = 0.002
    before = server.requests
    rc, _, stderr = cli(server, pattern, out, "--concurrency", "1")
    assert rc == 0, stderr
    assert tar_contents(out) == tar_contents(tmp_path / "reference")
    assert not list(out.glob("*.partial"))
    # Completed work was not paid for again.
    assert server.requests - before < reference_requests
    assert json.loads((out / "sizes.json").read_text()) == json.loads(
        (tmp_path / "reference" / "sizes.json").read_text()
    )


def test_concurrent_jobs_write_correct_sizes_json(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=6, per_shard=8)
    out = tmp_path / "out"
    procs = [
        cli(server, pattern, out, "--num-jobs", "3", "--job-index", str(i), "--concurrency", "4", wait=False)
        for i in range(3)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr.decode()
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {p.name: len(samples_of(p)) for p in out.glob("*.tar")}
    # three jobs write what one job writes
    rc, _, stderr = cli(server, pattern, tmp_path / "one_job")
    assert rc == 0, stderr
    assert len(sizes) == 6 and tar_contents(out) == tar_contents(tmp_path / "one_job")


def test_slurm_array_variables_pick_the_job(server, tmp_path, monkeypatch):
    pattern = write_input_shards(tmp_path / "in", num_shards=4, per_shard=4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")  # --array=1-2: the second task is job index 1
    from paraclip_plugin.data.inputs import slurm_job_defaults

    assert slurm_job_defaults() == (2, 1)
    env = {**os.environ, "OPENAI_API_KEY": "x"}
    cmd = [
        PYTHON,
        str(MAKE_SHARDS),
        "--input",
        pattern,
        "--output",
        str(tmp_path / "out"),
        "--model",
        "m",
        "--base-url",
        server.base_url,
        "--no-progress",
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=60)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00001.tar", "00003.tar"]


def test_bad_inputs_fail_with_file_and_line(server, tmp_path):
    (tmp_path / "recs.jsonl").write_text('{"caption": "a red car on a road"}\n{"caption": broken\n')
    rc, _, stderr = cli(server, str(tmp_path / "recs.jsonl"), tmp_path / "out")
    assert rc != 0 and "recs.jsonl:2: invalid JSON" in stderr
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file" * 40)
    rc, _, stderr = cli(server, str(tmp_path / "bad.tar"), tmp_path / "out")
    assert rc != 0 and "bad.tar: cannot read as a tar shard" in stderr
    rc, _, stderr = cli(server, str(tmp_path / "missing-{0..1}.tar"), tmp_path / "out")
    assert rc != 0 and "missing-0.tar: input file not found" in stderr
    assert server.requests == 0
    assert not list(tmp_path.glob("out/*.tar"))


def test_help_lists_every_flag():
    result = subprocess.run([PYTHON, str(MAKE_SHARDS), "--help"], capture_output=True, text=True, check=True)
    for flag in (
        "--input",
        "--output",
        "--backend",
        "--model",
        "--base-url",
        "--concurrency",
        "--cache",
        "--num-jobs",
        "--job-index",
        "--prompts",
        "--temperature",
        "--top-p",
        "--min-words",
        "--max-words",
        "--export-sft",
        "--price-per-1k-prompt",
        "--price-per-1k-completion",
        "--tensor-parallel-size",
        "--timeout",
        "--max-retries",
        "--max-attempts",
        "--stats",
        "--api-key-env",
        "--token-param",
        "--max-wait",
        "--chat-template",
        "--max-refused-fraction",
        "--seed",
    ):
        assert flag in result.stdout
    # No flag takes a key itself: only the NAME of an environment variable.
    assert "--api-key " not in result.stdout and "--api-key-env NAME" in result.stdout


def test_a_second_run_on_an_output_being_written_stops_before_any_request(server, tmp_path):
    pattern = write_input_shards(tmp_path / "in", num_shards=2, per_shard=6)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "00000.tar.partial", "wb") as held:  # another run is writing 00000.tar
        fcntl.flock(held, fcntl.LOCK_EX)
        rc, _, stderr = cli(server, pattern, out)
        assert rc != 0 and "00000.tar: another process is writing it now" in stderr.splitlines()[-1]
        assert server.requests == 0  # stopped at once: not after paying for the shard, nor going on to 00001
        assert (out / "00000.tar.partial").exists() and not list(out.glob("*.tar"))


def test_compressed_tar_inputs_are_written_as_uncompressed_tar(server, tmp_path):
    pattern = write_input_shards(tmp_path / "plain", num_shards=1, per_shard=6)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar.gz").write_bytes(gzip.compress((tmp_path / "plain" / "00000.tar").read_bytes()))
    rc, _, stderr = cli(server, pattern, tmp_path / "reference")
    assert rc == 0, stderr
    out = tmp_path / "out"
    rc, _, stderr = cli(server, str(tmp_path / "in" / "00000.tar.gz"), out)
    assert rc == 0, stderr
    assert sorted(p.name for p in out.glob("00000*")) == ["00000.tar"]
    assert (out / "00000.tar").read_bytes()[:2] != b"\x1f\x8b"  # not gzip: what a .tar name promises
    assert read_tar(out / "00000.tar") == read_tar(tmp_path / "reference" / "00000.tar")
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": len(samples_of(out / "00000.tar"))}
    (out / "sizes.json").unlink()  # a job killed before its sizes.json update: the rerun skips and counts the shard
    paid = server.requests
    rc, _, stderr = cli(server, str(tmp_path / "in" / "00000.tar.gz"), out)
    assert rc == 0 and server.requests == paid
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": len(samples_of(out / "00000.tar"))}


def test_sigterm_stops_the_run_and_its_stats_record_what_was_paid(tmp_path):
    """scancel and SLURM's time limit send SIGTERM: the stats are written, with the requests made so far."""
    pattern = write_input_shards(tmp_path / "in", num_shards=3, per_shard=20)
    with LocalChatServer(latency=0.05) as slow:
        proc = cli(
            slow, pattern, tmp_path / "out", "--concurrency", "1", "--stats", str(tmp_path / "s.json"), wait=False
        )
        deadline = time.time() + 30
        while slow.requests < 5 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        paid = slow.requests
    assert proc.returncode == 128 + signal.SIGTERM and "error: stopped by SIGTERM" in stderr.decode()
    assert "stats of the run so far: " + str(tmp_path / "s.json") in stderr.decode()
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["status"] == "failed" and "SIGTERM" in stats["error"]
    assert paid >= 5 and paid - 1 <= stats["requests"] <= paid  # the answers it got (one may be in flight)


def test_two_inputs_with_one_output_name_are_refused_naming_both(server, tmp_path):
    (tmp_path / "part1.txt").write_text("a red car parked near the old house\n")
    (tmp_path / "part1.jsonl").write_text(json.dumps({"caption": "a yellow bird sitting on a wire"}) + "\n")
    rc, _, stderr = cli(server, str(tmp_path / "part1.*"), tmp_path / "out")
    assert rc != 0 and server.requests == 0 and not (tmp_path / "out").exists()
    assert (
        f"error: {tmp_path}/part1.jsonl and {tmp_path}/part1.txt: both inputs would be written to the output "
        "'part1.jsonl'"
    ) in stderr


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--concurrency", "0"),
        ("--max-attempts", "0"),
        ("--max-tokens", "0"),
        ("--num-jobs", "0"),
        ("--job-index", "-1"),
        ("--timeout", "-1"),
        ("--timeout", "nan"),
        ("--max-retries", "-1"),
        ("--max-wait", "-1"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--temperature", "-0.5"),
        ("--min-words", "0"),
        ("--max-words", "0"),
        ("--max-length-ratio", "0"),
        ("--max-refused-fraction", "1.5"),
        ("--malformed-retries", "-1"),
        ("--price-per-1k-prompt", "-1"),
        ("--batch-poll-interval", "0"),
        ("--batch-max-requests", "0"),
        ("--batch-max-bytes", "0"),
        ("--batch-rounds", "0"),
        ("--batch-discount", "-1"),
        ("--tensor-parallel-size", "0"),
        ("--max-model-len", "0"),
        ("--gpu-memory-utilization", "1.5"),
        ("--temperature", "inf"),
        ("--timeout", "1e400"),
        ("--price-per-1k-prompt", "inf"),
        ("--batch-poll-interval", "inf"),
    ],
)
def test_numeric_flags_out_of_range_are_refused_naming_the_flag(flag, value, capsys):
    from paraclip_plugin.paraphrase.cli import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(
            ["--input", "x.tar", "--output", "out", "--model", "m", "--num-jobs", "1", "--job-index", "0", flag, value]
        )
    assert stop.value.code == 2 and f"argument {flag}: must be " in capsys.readouterr().err


def test_min_words_above_max_words_is_refused(capsys):
    from paraclip_plugin.paraphrase.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--input", "x.tar", "--output", "out", "--model", "m", "--min-words", "9", "--max-words", "3"])
    assert "--min-words 9 is above --max-words 3" in capsys.readouterr().err


def test_a_job_index_outside_the_jobs_is_a_usage_error(capsys, monkeypatch):
    """Before any input is read: the usage, one line naming the flag, status 2 (as paraclip-embed-images says it)."""
    from paraclip_plugin.paraphrase.cli import parse_args

    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(SystemExit) as stop:
        parse_args(["--input", "x.tar", "--output", "out", "--model", "m", "--num-jobs", "2", "--job-index", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[0].startswith("usage: paraclip-make-shards")
    assert err[-1] == "paraclip-make-shards: error: --job-index 5 is outside 0..1 (--num-jobs 2)"


def test_a_stopped_run_writes_its_stats_and_never_replaces_anothers(server, tmp_path):
    write_input_shards(tmp_path / "in", num_shards=1, per_shard=6)
    write_samples(tmp_path / "in" / "00001.tar", [("k", {"jpg": b"\xff\xd8", "txt": b"caf\xe9 tables on a street"})])
    out = tmp_path / "out"
    # Stats files another run wrote in the coming seconds (names go down to the second): never replaced.
    (out / "stats").mkdir(parents=True)
    now = time.time()
    others = [
        out / "stats" / f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(now + s))}-job0of1.json" for s in range(-1, 60)
    ]
    for path in others:
        path.write_text("another run's stats")
    rc, _, stderr = cli(
        server,
        str(tmp_path / "in" / "{00000..00001}.tar"),
        out,
        "--price-per-1k-prompt",
        "1",
        "--price-per-1k-completion",
        "1",
    )
    assert rc != 0 and "00001.tar: sample 'k': unreadable txt/json member" in stderr  # after paying for 00000
    assert all(path.read_text() == "another run's stats" for path in others)
    (written,) = set((out / "stats").iterdir()) - set(others)
    assert written.name.endswith("-job0of1-2.json") and str(written) in stderr
    stats = json.loads(written.read_text())
    assert stats["status"] == "failed" and stats["error"].startswith("InputError: ") and "00001.tar" in stats["error"]
    assert stats["requests"] == server.requests > 0 and stats["estimated_cost_usd"] > 0
    assert stats["shards_written"] == 1 and (out / "00000.tar").exists()


def test_a_second_sigterm_is_ignored_while_the_stats_are_written():
    from paraclip_plugin.paraphrase import cli as make_shards_cli

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, make_shards_cli._raise_terminated)
        with pytest.raises(make_shards_cli.Terminated, match="stopped by SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # the second one: nothing happens
    finally:
        signal.signal(signal.SIGTERM, before)
