"""Training under faults: bad samples inside good shards, a rank killed mid-run, shard lists as users write
them, an interrupted embedding job. Training runs are real torchrun (gloo, 2 CPU processes)."""

import contextlib
import io
import json
import logging
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from conftest import (
    BIN,
    PYTHON,
    REPO,
    TINY_MODEL,
    WORDS,
    embed_tool_args,
    final_state,
    free_port,
    png_bytes,
    read_log,
    run,
    save_init_checkpoint,
    stock_open_clip_loads,
    torchrun,
    train_args,
    write_shards,
)
from paraclip_plugin.train.decode import paraclip_decode_stages
from paraclip_plugin.train.embeddings import EmbeddingExpectation, encode_embedding, visual_fingerprint
from paraclip_plugin.data.tars import atomic_tar_writer, read_tar_samples
from paraclip_plugin.data.layout import update_sizes_json
from test_fast_embeddings import embed, pipeline, tiny_model


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return save_init_checkpoint(tmp_path_factory.mktemp("init") / "init.pt")


def jpeg_bytes(rng, size=32):
    image = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def good_sample(rng, key):
    words = rng.sample(WORDS, 5)
    return {
        "__key__": key,
        "png": png_bytes(rng),
        "txt": " ".join(words).encode(),
        "para1.txt": " ".join(reversed(words)).encode(),
        "para2.txt": " ".join(words[1:] + words[:1]).encode(),
    }


# each bad sample: what is wrong with it, and the reason the loader logs
BAD_SAMPLES = {
    "truncated_jpeg": lambda s, rng: s.update(jpg=jpeg_bytes(rng)[:300]) or s.pop("png"),
    "empty_para1": lambda s, rng: s.update({"para1.txt": b""}),
    "blank_para2": lambda s, rng: s.update({"para2.txt": b" \n\t "}),
    "latin1_caption": lambda s, rng: s.update(txt="caf\xe9 cr\xe8me".encode("latin-1")),
    "cp1252_para2": lambda s, rng: s.update({"para2.txt": b"\x93quoted\x94 words"}),
    "broken_json": lambda s, rng: s.update(json=b'{"caption_source": "laion", '),
    "broken_npy": lambda s, rng: s.update({"tokens.npy": b"\x93NUMPY not an array"}),
}
REASONS = {
    "truncated_jpeg": "not decodable (OSError: ",
    "empty_para1": "para1.txt is empty",
    "blank_para2": "para2.txt is empty",
    "latin1_caption": "txt is not UTF-8",
    "cp1252_para2": "para2.txt is not UTF-8",
    "broken_json": "not decodable (JSONDecodeError: ",
    "broken_npy": "not decodable (",
}
LONG_CAPTION = " ".join(["word"] * 400)  # far beyond any context length: truncated, as open_clip does


def write_bad_shards(folder, num_shards=2, per_shard=16, seed=0):
    """Shards of good samples, each with every kind of bad sample and one very long caption mixed in.
    Returns the brace pattern and the keys of the samples that must be trained on."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    good, sizes = [], {}
    for s in range(num_shards):
        samples = [good_sample(rng, f"{s}_good{i:02d}") for i in range(per_shard - len(BAD_SAMPLES) - 1)]
        long_caption = good_sample(rng, f"{s}_long_caption")
        long_caption["txt"] = LONG_CAPTION.encode()
        samples.append(long_caption)
        good += [sample["__key__"] for sample in samples]
        for kind, spoil in BAD_SAMPLES.items():
            sample = good_sample(rng, f"{s}_{kind}")
            spoil(sample, rng)
            samples.append(sample)
        rng.shuffle(samples)
        with atomic_tar_writer(os.path.join(folder, f"{s:05d}.tar")) as sink:
            for sample in samples:
                sink.write(sample)
        sizes[f"{s:05d}.tar"] = len(samples)
    update_sizes_json(folder, sizes)
    return os.path.join(folder, "{" + f"00000..{num_shards - 1:05d}" + "}.tar"), good


def skipped_keys(output):
    return set(re.findall(r"ParaCLIP: skipped sample '([^']+)'", output))


def keys_through(url, stages):
    """The keys of the samples the stages hand to batching (key = the tuple's texts, matched back)."""
    return pipeline(url, [stage for stage in stages[:-1]] + [lambda src: (s["__key__"] for s in src)])


def test_bad_samples_never_reach_batching_and_are_counted(tmp_path, init, caplog):
    data, good = write_bad_shards(tmp_path / "bad", num_shards=1)
    _, preprocess_train, _ = tiny_model(init)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    with caplog.at_level(logging.WARNING):
        kept = keys_through(tmp_path / "bad" / "00000.tar", paraclip_decode_stages(preprocess_train, tokenizer))
    assert sorted(kept) == sorted(good) and "0_long_caption" in kept
    skipped = [r.getMessage() for r in caplog.records if "ParaCLIP: skipped sample" in r.getMessage()]
    assert len(skipped) == len(BAD_SAMPLES)
    for kind, reason in REASONS.items():
        assert any(f"skipped sample '0_{kind}'" in m and reason in m for m in skipped), kind
    assert f"({len(BAD_SAMPLES)} skipped so far in this data worker" in skipped[-1]
    # the long caption is cut to the context with the end-of-text token last, as open_clip's tokenizer does
    stages = paraclip_decode_stages(preprocess_train, tokenizer)
    (texts,) = [t for _, t in pipeline(tmp_path / "bad" / "00000.tar", stages) if (t[0] != 0).all()]
    assert texts.shape[1] == tokenizer.context_length and texts[0, -1] == tokenizer.eot_token_id


def test_torchrun_skips_bad_samples_and_trains(tmp_path, init, patched_install):
    data, good = write_bad_shards(tmp_path / "bad", num_shards=2)
    args = train_args(data, tmp_path / "logs", "bad", init, "--paraclip-loss", samples=2 * 16)
    proc = torchrun(["open_clip_train.main", *args])
    output = proc.stdout + proc.stderr  # every rank's data worker logs here (only rank 0 writes out.log)
    assert skipped_keys(output) == {f"{s}_{kind}" for s in range(2) for kind in BAD_SAMPLES}
    for kind, reason in REASONS.items():
        assert f"{kind}' of " in output and reason in output, kind
    assert "Train Epoch: 0" in read_log(tmp_path / "logs", "bad")
    assert (tmp_path / "logs" / "bad" / "checkpoints" / "epoch_1.pt").exists()


def spoil_embeddings(src, dst, spoil):
    """A copy of embedded shard ``src`` with ``spoil[key](embedding) -> new embedding`` applied."""
    with atomic_tar_writer(str(dst)) as sink:
        for sample in read_tar_samples(src):
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            if sample["__key__"] in spoil:
                sample["img_emb.npy"] = encode_embedding(
                    spoil[sample["__key__"]](np.load(io.BytesIO(sample["img_emb.npy"])))
                )
            sink.write(sample)


def test_bad_image_embeddings_are_skipped_and_counted(tmp_path, init, patched_install):
    write_shards(tmp_path / "plain", num_shards=2, per_shard=16, seed=2)
    embed(str(tmp_path / "plain" / "*.tar"), init, "--output", tmp_path / "embedded")
    spoil = {
        "00000001": lambda e: np.full_like(e, np.nan),
        "00000002": lambda e: np.where(np.arange(e.size) == 3, np.inf, e),
        "00000003": lambda e: e[:-1],
        "00000020": lambda e: np.stack([e, e]),
    }
    os.makedirs(tmp_path / "spoiled")
    for name in ("00000.tar", "00001.tar"):
        spoil_embeddings(tmp_path / "embedded" / name, tmp_path / "spoiled" / name, spoil)
    # in process: exactly the spoiled samples are left out
    model, preprocess_train, _ = tiny_model(init)
    stages = paraclip_decode_stages(
        preprocess_train,
        open_clip.get_tokenizer(TINY_MODEL),
        EmbeddingExpectation(visual_fingerprint(model.visual), dim=model.visual.output_dim),
    )
    kept = keys_through(str(tmp_path / "spoiled" / "{00000..00001}.tar"), stages)
    assert sorted(kept) == sorted(f"{i:08d}" for i in range(32) if f"{i:08d}" not in spoil)
    # torchrun
    args = train_args(
        tmp_path / "spoiled" / "{00000..00001}.tar",
        tmp_path / "logs",
        "emb",
        init,
        "--paraclip-loss",
        "--image-embeddings",
        samples=32,
    )
    proc = torchrun(["open_clip_train.main", *args])
    output = proc.stdout + proc.stderr
    assert "skipped sample '00000001'" in output and "img_emb.npy is not finite (NaN or inf)" in output
    assert "skipped sample '00000002'" in output
    assert "skipped sample '00000003'" in output and f"img_emb.npy has shape ({model.visual.output_dim - 1},)" in output
    assert "skipped sample '00000020'" in output and f"has shape (2, {model.visual.output_dim})" in output
    assert skipped_keys(output) == set(spoil)
    assert (tmp_path / "logs" / "emb" / "checkpoints" / "epoch_1.pt").exists()


# ---------------------------------------------------------------- a rank killed, then requeued with --resume latest


def descendants(pid):
    """Every process below ``pid`` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def rank_process(torchrun_pid, rank, timeout=120):
    """The pid of the training process of ``rank`` started by that torchrun."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in descendants(torchrun_pid):
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in environ:
                    return pid
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process under torchrun {torchrun_pid}")


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def test_rank_killed_after_a_checkpoint_resumes_with_resume_latest(tmp_path, init, patched_install):
    data = write_shards(tmp_path / "shards", num_shards=2, per_shard=16)
    logs, epochs = tmp_path / "logs", 5
    # the requeue recipe: the same command each time, --save-most-recent and --resume latest
    args = train_args(
        data,
        logs,
        "requeued",
        init,
        "--paraclip-loss",
        "--save-frequency",
        "1",
        "--save-most-recent",
        "--resume",
        "latest",
    )
    args[args.index("--epochs") + 1] = str(epochs)
    cmd = [BIN / "torchrun", "--nproc_per_node", 2, "--master_port", free_port(), "-m", "open_clip_train.main", *args]
    with open(tmp_path / "first.out", "w") as out:
        first = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        )
        try:
            rank1 = rank_process(first.pid, 1)
            latest = logs / "requeued" / "checkpoints" / "epoch_latest.pt"
            wait_for(latest, first)
            os.kill(rank1, signal.SIGKILL)
            assert first.wait(timeout=120) != 0
        finally:
            if first.poll() is None:
                first.kill()
    assert not (logs / "requeued" / "checkpoints" / f"epoch_{epochs}.pt").exists(), "killed too late to test anything"
    killed_at = torch.load(latest, map_location="cpu", weights_only=False)["epoch"]
    assert 1 <= killed_at < epochs

    torchrun(["open_clip_train.main", *args])
    resumed = read_log(logs, "requeued").split("Found latest resume checkpoint", 1)[1]
    assert f"resuming checkpoint '{latest}' (epoch {killed_at})" in resumed
    assert f"Train Epoch: {killed_at} " in resumed and f"Train Epoch: {killed_at - 1} " not in resumed
    final = logs / "requeued" / "checkpoints" / f"epoch_{epochs}.pt"
    init_state = torch.load(init)
    state = final_state(logs, "requeued", epoch=epochs)
    visual = [k for k in state if k.startswith("visual.")]
    assert visual and all(torch.equal(state[k], init_state[k]) for k in visual)
    assert not torch.equal(state["text_projection"], init_state["text_projection"])
    assert stock_open_clip_loads(final) == "CLIP"


# ---------------------------------------------------------------- shard lists and sizes.json


def test_two_folders_upsampled_and_resampled(tmp_path, init, patched_install):
    write_shards(tmp_path / "a", num_shards=10, per_shard=4, seed=0)
    write_shards(tmp_path / "b", num_shards=5, per_shard=8, seed=1)
    data = f"{tmp_path}/a/{{00000..00009}}.tar::{tmp_path}/b/{{00000..00004}}.tar"
    args = train_args(
        data,
        tmp_path / "logs",
        "ab",
        init,
        "--paraclip-loss",
        "--dataset-resampled",
        "--train-data-upsampling-factors",
        "1::2",
        "--batch-size",
        "4",
    )
    proc = torchrun(["open_clip_train.main", *args])
    output = proc.stdout + proc.stderr
    # open_clip sizes the epoch from a/sizes.json alone (15 x 4); the folders' own files say 40 + 40
    assert (
        "open_clip plans each epoch for 60 samples" in output and "add up to 80: pass --train-num-samples 80" in output
    )
    log = read_log(tmp_path / "logs", "ab")
    assert "Train Epoch: 0" in log and "ParaCLIP: skipped" not in output
    assert (tmp_path / "logs" / "ab" / "checkpoints" / "epoch_1.pt").exists()


def test_missing_sizes_json_is_open_clips_error_naming_train_num_samples(tmp_path, init, patched_install):
    data = write_shards(tmp_path / "shards", num_shards=2, per_shard=16)
    (tmp_path / "shards" / "sizes.json").unlink()
    proc = torchrun(
        ["open_clip_train.main", *train_args(data, tmp_path / "logs", "nosizes", init, "--paraclip-loss")], check=False
    )
    assert proc.returncode != 0
    assert "Please specify it via `--train-num-samples` if no dataset length info is present" in proc.stderr
    assert not list((tmp_path / "logs" / "nosizes").glob("checkpoints/*.pt"))


def test_stale_sizes_json_is_reported_per_shard(tmp_path, init, patched_install):
    data = write_shards(tmp_path / "shards", num_shards=2, per_shard=16)
    (tmp_path / "shards" / "sizes.json").write_text(json.dumps({"00000.tar": 24, "00001.tar": 16}))
    proc = torchrun(["open_clip_train.main", *train_args(data, tmp_path / "logs", "stale", init, "--paraclip-loss")])
    output = proc.stdout + proc.stderr
    shard = tmp_path / "shards" / "00000.tar"
    assert f"ParaCLIP: shard {shard} has 16 samples, but its sizes.json says 24: sizes.json is stale" in output
    assert f"shard {tmp_path / 'shards' / '00001.tar'} has" not in output
    assert "Train Epoch: 0" in read_log(tmp_path / "logs", "stale")


# ---------------------------------------------------------------- scripts/embed_images.py killed mid-run


def test_embed_images_killed_then_rerun_gives_the_same_bytes(tmp_path, init):
    write_shards(tmp_path / "plain", num_shards=3, per_shard=16, seed=3)
    cmd = [
        PYTHON,
        REPO / "scripts" / "embed_images.py",
        *embed_tool_args(tmp_path / "plain" / "*.tar", init),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run([*cmd, "--output", tmp_path / "reference"])
    out = tmp_path / "out"
    killed = subprocess.Popen([str(c) for c in [*cmd, "--output", out]], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in killed.stderr:
            if "00000.tar: 16/16 samples embedded" in line:
                killed.send_signal(signal.SIGKILL)  # while it works on the next shard
                break
        assert killed.wait(timeout=60) == -signal.SIGKILL
    finally:
        if killed.poll() is None:
            killed.kill()
    written = sorted(p.name for p in out.glob("*.tar"))
    assert "00000.tar" in written and len(written) < 3, written
    for name in written:  # whatever has a final name is complete
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    run([*cmd, "--output", out])
    for name in ("00000.tar", "00001.tar", "00002.tar", "sizes.json"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert not list(out.glob("*.partial"))


def test_piped_shards_that_are_not_paraclip_shards_stop_instead_of_looping(tmp_path, init, patched_install):
    """``pipe:`` (s3, https) shards can't be listed up front, and open_clip repeats a worker's shards until the epoch's
    batches are made: without a usable sample that was an endless loop. Now each data worker gives up, naming them."""
    write_shards(tmp_path / "stock", num_shards=2, per_shard=16, paraphrases=False)
    piped = "::".join(f"pipe:cat {tmp_path / 'stock' / f'0000{i}.tar'}" for i in range(2))
    args = train_args(piped, tmp_path / "logs", "piped", init, "--paraclip-loss", samples=32)
    started = time.monotonic()
    proc = torchrun(["open_clip_train.main", *args], check=False, timeout=240)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    found = re.search(
        rf"NoUsableSamples: ParaCLIP: this data worker has read shard pipe:cat "
        rf"{re.escape(str(tmp_path / 'stock'))}/0000[01]\.tar again .*? without one usable sample among "
        r"(\d+) \(by reason: \{'missing para1\.txt\+para2\.txt': (\d+)\}\)",
        output,
    )
    assert found, output[-3000:]
    assert found[1] == found[2] and int(found[1]) > 1
    assert time.monotonic() - started < 200
    assert not (tmp_path / "logs" / "piped" / "checkpoints" / "epoch_1.pt").exists()

    # one such shard before good ones is skipped and counted, as before: no false alarm
    write_shards(tmp_path / "good", num_shards=2, per_shard=16, seed=4)
    mixed = "::".join(
        f"pipe:cat {tmp_path / folder / f'0000{i}.tar'}" for folder in ("stock", "good") for i in range(2)
    )
    args = train_args(mixed, tmp_path / "logs", "mixed", init, "--paraclip-loss", samples=32)
    proc = torchrun(["open_clip_train.main", *args], timeout=240)
    assert "NoUsableSamples" not in proc.stdout + proc.stderr and "missing para1.txt+para2.txt" in proc.stderr
    assert (tmp_path / "logs" / "mixed" / "checkpoints" / "epoch_1.pt").exists()


def test_piped_compact_shards_are_recognised_and_train(tmp_path, init, patched_install):
    write_shards(tmp_path / "plain", num_shards=2, per_shard=16, seed=3)
    embed(str(tmp_path / "plain" / "*.tar"), init, "--compact", "--output", tmp_path / "compact")
    piped = "::".join(f"pipe:cat {tmp_path / 'compact' / f'0000{i}.tar'}" for i in range(2))
    args = train_args(piped, tmp_path / "logs", "compact", init, "--paraclip-loss", "--image-embeddings", samples=32)
    torchrun(["open_clip_train.main", *args])
    assert "Train Epoch: 0" in read_log(tmp_path / "logs", "compact")
    assert (tmp_path / "logs" / "compact" / "checkpoints" / "epoch_1.pt").exists()
