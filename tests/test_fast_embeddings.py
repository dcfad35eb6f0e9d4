"""Cached image embeddings and pre-tokenized text: scripts/embed_images.py, the loader stages, and
--image-embeddings through open_clip_train.main (single process, real shards)."""

import io
import json
import logging
import pickle
import re
import shutil
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import (
    PYTHON,
    embed_tool_args,
    script_module,
    TINY_CONFIG,
    TINY_MODEL,
    logged_losses,
    read_log,
    run,
    save_init_checkpoint,
    train_args,
    write_shards,
)
from paraclip_plugin.train.decode import paraclip_decode_stages
from paraclip_plugin.train.decode import MixedShards
from paraclip_plugin.train.embeddings import (
    EmbeddingExpectation,
    EmbeddingMismatch,
    MissingEmbeddings,
    preprocess_config,
    visual_architecture,
    visual_fingerprint,
)
from paraclip_plugin.train.model import enable_paraphrase_forward, freeze_visual
from paraclip_plugin.data.tars import read_tar_samples
from paraclip_plugin.train.pretokenized import TextTokens
from test_train import TERMS, optimizer_first_moments


embed_images = script_module("embed_images")


def embed(shards, init, *extra):
    """scripts/embed_images.py, run in this process (an interpreter start costs more than the work)."""
    argv = embed_tool_args(shards, init, *extra)
    assert embed_images.main(argv) == 0


def tiny_model(init):
    open_clip.add_model_config(str(TINY_CONFIG))
    return open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(init), output_dict=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    write_shards(root / "plain", num_shards=2, per_shard=16, seed=1)
    init = save_init_checkpoint(root / "init.pt", seed=0)
    embed(str(root / "plain" / "*.tar"), init, "--output", root / "embedded")
    return dict(root=root, init=init, logs=root / "logs", plain=root / "plain", embedded=root / "embedded")


def test_embed_images_says_where_its_time_went(world, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    embed(str(world["plain"] / "*.tar"), world["init"], "--output", tmp_path)
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done: ")]
    assert len(done) == 1, done
    m = re.match(
        r"done: 32 images in ([0-9.]+)s \(([0-9.]+)s after start-up\); waiting for the data workers "
        r"([0-9.]+)s, image tower ([0-9.]+)s, writing shards ([0-9.]+)s$",
        done[0],
    )
    assert m, done[0]
    total, looping, waiting, encoding, writing = map(float, m.groups())
    # the three parts are within this process's loop (up to rounding); with --workers 0 the loader decodes
    # the 32 images in this process, inside "waiting"
    assert looping <= total + 0.01 and waiting + encoding + writing <= looping + 0.02
    assert waiting > 0


def test_embed_images_adds_embeddings_tokens_and_records(world):
    model, _, preprocess_val = tiny_model(world["init"])
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    sizes = json.loads((world["embedded"] / "sizes.json").read_text())
    assert sizes == {"00000.tar": 16, "00001.tar": 16}
    for name in ("00000.tar", "00001.tar"):
        before = list(read_tar_samples(world["plain"] / name))
        after = list(read_tar_samples(world["embedded"] / name))
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
        for old, new in zip(before, after):
            for field in ("png", "txt", "para1.txt", "para2.txt"):  # copied unchanged
                assert new[field] == old[field]
            emb = np.load(io.BytesIO(new["img_emb.npy"]))
            assert emb.dtype == np.float16
            image = preprocess_val(Image.open(io.BytesIO(old["png"])).convert("RGB"))[None]
            with torch.no_grad():
                expected = model.encode_image(image, normalize=True)[0]
            torch.testing.assert_close(torch.from_numpy(emb).float(), expected, atol=2e-3, rtol=0)
            meta = json.loads(new["json"])
            record = meta["paraclip_image_embedding"]
            assert {k: v for k, v in record.items() if k != "visual_sha256_by_precision"} == {
                "model": TINY_MODEL,
                "pretrained": str(world["init"]),
                "visual_sha256": visual_fingerprint(model.visual),
                "visual_architecture": visual_architecture(model.visual),
                "precision": "fp32",
                "preprocess": preprocess_config(model.visual),
            }
            assert record["preprocess"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
            assert set(record["visual_sha256_by_precision"]) == {"bf16", "pure_bf16", "fp16", "pure_fp16"}
            assert meta["paraclip_tokens"]["tokenizer"] == TINY_MODEL
            tokens = np.load(io.BytesIO(new["tokens.npy"]))
            full = tokenizer([old[f].decode() for f in ("txt", "para1.txt", "para2.txt")]).numpy()
            assert tokens.shape[1] < full.shape[1] and (full[:, tokens.shape[1] :] == 0).all()
            assert (tokens == full[:, : tokens.shape[1]]).all()


def test_rerun_skips_finished_shards_and_redoes_the_interrupted_one(world, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    folder = tmp_path / "inplace"
    shutil.copytree(world["plain"], folder)
    embed(str(folder / "*.tar"), world["init"])
    done = (folder / "00000.tar").read_bytes()
    # as if killed during shard 1: the original shard is back, a stale partial file beside it
    shutil.copy(world["plain"] / "00001.tar", folder / "00001.tar")
    (folder / "00001.tar.partial").write_bytes(b"half a tar")
    caplog.clear()
    embed(str(folder / "*.tar"), world["init"])
    log = caplog.text
    assert f"{folder / '00000.tar'}: already embedded with these weights, skipped" in log
    assert f"{folder / '00001.tar'}: 16/16 samples embedded" in log
    assert (folder / "00000.tar").read_bytes() == done
    assert all("img_emb.npy" in s for s in read_tar_samples(folder / "00001.tar"))
    assert not (folder / "00001.tar.partial").exists()
    # other weights are not "done": the shard is embedded again, with the new record
    other = save_init_checkpoint(tmp_path / "other.pt", seed=1)
    caplog.clear()
    embed(str(folder / "00000.tar"), other)
    assert "16/16 samples embedded" in caplog.text
    meta = json.loads(next(read_tar_samples(folder / "00000.tar"))["json"])
    assert meta["paraclip_image_embedding"]["pretrained"] == str(other)


def test_workers_send_uint8_and_the_embeddings_are_those_of_the_whole_transform(world, tmp_path):
    """--transfer uint8 (the default): the data workers stop before to-tensor and Normalize, which run
    beside the image tower; through a real worker process the embeddings are byte for byte those of the
    whole transform in the workers (--transfer float32)."""
    for transfer in ("uint8", "float32"):
        embed(
            str(world["plain"] / "*.tar"),
            world["init"],
            "--output",
            tmp_path / transfer,
            "--workers",
            "1",
            "--transfer",
            transfer,
        )
    for name in ("00000.tar", "00001.tar"):
        uint8, float32, in_process = (
            list(read_tar_samples(folder / name))
            for folder in (tmp_path / "uint8", tmp_path / "float32", world["embedded"])
        )
        assert [s["img_emb.npy"] for s in uint8] == [s["img_emb.npy"] for s in float32]
        assert [s["img_emb.npy"] for s in uint8] == [s["img_emb.npy"] for s in in_process]
    args = embed_images.parse_args(["--shards", "x", "--model", TINY_MODEL, "--pretrained", str(world["init"])])
    embedder = embed_images.ShardEmbedder(args)
    samples, with_image = embedder.prepare_samples(world["plain"] / "00000.tar")
    rows, images = embedder.decode_images(with_image)
    assert images.dtype == torch.uint8 and rows == list(range(16))
    args.transfer = "float32"
    assert embed_images.ShardEmbedder(args).decode_images(with_image)[1].dtype == torch.float32


def test_spawned_data_workers_get_no_image_tower_and_embed_the_same(world, tmp_path):
    """Where data workers are spawned, not forked (forkserver is Python 3.14's default on Linux), they
    receive the embedder pickled: without the image tower (only the main process runs it)."""
    args = embed_images.parse_args(["--shards", "x", "--model", TINY_MODEL, "--pretrained", str(world["init"])])
    embedder = embed_images.ShardEmbedder(args)
    sent = pickle.loads(pickle.dumps(embed_images.ShardImages([], embedder)))
    assert not hasattr(sent.embedder.tower, "visual") and hasattr(embedder.tower, "visual")
    assert sent.embedder.tokens_record == embedder.tokens_record
    code = (
        "import multiprocessing, sys; multiprocessing.set_start_method('spawn'); "
        "from paraclip_plugin.embed.images import main; sys.exit(main(sys.argv[1:]))"
    )
    run(
        [
            PYTHON,
            "-c",
            code,
            *embed_tool_args(world["plain"] / "*.tar", world["init"], "--output", tmp_path / "spawned", workers=2),
        ],
        timeout=300,
    )
    for name in ("00000.tar", "00001.tar"):
        assert [s["img_emb.npy"] for s in read_tar_samples(tmp_path / "spawned" / name)] == [
            s["img_emb.npy"] for s in read_tar_samples(world["embedded"] / name)
        ]


def test_bad_samples_and_shards_are_named_and_sizes_json_is_repaired(world, tmp_path, caplog, capsys):
    """A sample whose .json can't be read is copied without an embedding, one whose text training skips without
    token ids (each warned, by shard and key); an unreadable shard stops the job with one line naming it, with and without data workers; a shard
    left out of sizes.json (killed between its rename and the update) is counted by the rerun."""
    src = tmp_path / "in"
    src.mkdir()
    with wds.TarWriter(str(src / "00000.tar")) as sink:
        for i, sample in enumerate(read_tar_samples(world["plain"] / "00000.tar")):
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            if i == 2:
                sample["json"] = b'{"url": "http://x/2.jpg", '
            if i == 4:
                sample["para1.txt"] = "caf\xe9".encode("latin-1")
            sink.write(sample)
    caplog.set_level(logging.INFO)
    embed(str(src / "00000.tar"), world["init"], "--output", tmp_path / "out")
    out = {s["__key__"]: s for s in read_tar_samples(tmp_path / "out" / "00000.tar")}
    keys = sorted(out)
    assert [k for k in keys if "img_emb.npy" not in out[k]] == [keys[2]]
    assert [k for k in keys if "tokens.npy" not in out[k]] == [keys[2], keys[4]]
    assert out[keys[2]]["json"] == b'{"url": "http://x/2.jpg", '  # copied as it was
    assert f"00000.tar: sample '{keys[2]}' copied without an embedding: its .json is not readable" in caplog.text
    assert f"00000.tar: sample '{keys[4]}': para1.txt is not UTF-8, so training skips it: no token ids" in caplog.text
    assert "15/16 samples embedded" in caplog.text

    sizes = tmp_path / "out" / "sizes.json"
    sizes.write_text("{}")  # as if killed after the rename, before the update
    caplog.clear()
    embed(str(src / "00000.tar"), world["init"], "--output", tmp_path / "out")
    assert "already embedded with these weights, skipped" in caplog.text
    assert json.loads(sizes.read_text()) == {"00000.tar": 16}

    (src / "00001.tar").write_bytes((world["plain"] / "00001.tar").read_bytes()[:5000])  # cut short
    for workers in ("0", "1"):
        argv = embed_tool_args(
            src / "*.tar", world["init"], "--output", tmp_path / f"cut{workers}", workers=workers, batch_size=None
        )
        assert embed_images.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            err[-1].startswith(f"paraclip-embed-images: error: {src / '00001.tar'}: truncated")
            and "Traceback" not in err[-1]
        )
        assert (tmp_path / f"cut{workers}" / "00000.tar").exists()  # what was done before stays
        assert not (tmp_path / f"cut{workers}" / "00001.tar").exists()


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_the_split_transform_is_exact_on_open_clips_transforms(world, resize_mode):
    preprocess = open_clip.image_transform(32, is_train=False, resize_mode=resize_mode)
    to_uint8, normalize = embed_images.split_preprocess(preprocess)
    rng = np.random.default_rng(3)
    images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in read_tar_samples(world["plain"] / "00000.tar")]
    for size in ((40, 23), (17, 64), (32, 32)):  # JPEG-decoded, non-square, smaller and larger than 32 px
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
        images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    small = torch.stack([to_uint8(image) for image in images])
    assert small.dtype == torch.uint8 and small.shape[1:] == (3, 32, 32)
    assert torch.equal(embed_images.finish_preprocess(small, normalize), torch.stack([preprocess(i) for i in images]))


def test_transforms_that_do_not_split_stay_whole():
    from torchvision import transforms as T

    normalize = T.Normalize((0.5,) * 3, (0.25,) * 3)
    assert embed_images.split_preprocess(T.Compose([T.Resize(8), T.ToTensor()])) is None  # no Normalize
    assert embed_images.split_preprocess(T.Compose([T.Resize(8), normalize])) is None
    # the steps before to-tensor already make a tensor (open_clip's MaybeToTensor passes it through)
    tensor_first = T.Compose(
        [T.PILToTensor(), T.ConvertImageDtype(torch.float32), open_clip.transform.MaybeToTensor(), normalize]
    )
    assert embed_images.split_preprocess(tensor_first) is None
    assert embed_images.split_preprocess(lambda image: image) is None


def rewrite_shard(src, dst, change):
    """A copy of shard ``src`` with ``change(index, sample)`` applied to each sample (in place); returns ``dst``."""
    with wds.TarWriter(str(dst)) as sink:
        for i, sample in enumerate(read_tar_samples(src)):
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            change(i, sample)
            sink.write(sample)
    return dst


def corrupt_images(src, dst):
    """A copy of shard ``src`` whose image bytes can't be decoded."""
    rewrite_shard(src, dst, lambda i, sample: sample.update(png=b"not a png"))


def pipeline(url, stages):
    return list(wds.DataPipeline(wds.SimpleShardList(str(url)), wds.tarfile_to_samples(), *stages))


def test_embedding_stages_never_decode_images_and_use_stored_tokens(world, tmp_path):
    model, preprocess_train, _ = tiny_model(world["init"])
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    broken = tmp_path / "broken.tar"
    corrupt_images(world["embedded"] / "00000.tar", broken)
    stages = paraclip_decode_stages(preprocess_train, tokenizer, EmbeddingExpectation(visual_fingerprint(model.visual)))
    samples = pipeline(broken, stages)
    assert len(samples) == 16
    stored = list(read_tar_samples(world["embedded"] / "00000.tar"))
    for (image, texts), raw in zip(samples, stored):
        assert image.dtype == torch.float16 and torch.equal(
            image, torch.from_numpy(np.load(io.BytesIO(raw["img_emb.npy"])))
        )
        assert torch.equal(texts, tokenizer([raw[f].decode() for f in ("txt", "para1.txt", "para2.txt")]))
    # the image path really would have had to decode them: it gets nothing from this shard
    assert pipeline(broken, paraclip_decode_stages(preprocess_train, tokenizer)) == []


def test_stored_tokens_are_used_only_for_the_same_tokenizer(world):
    raw = next(read_tar_samples(world["embedded"] / "00001.tar"))
    sample = {
        "txt": raw["txt"].decode(),
        "para1.txt": raw["para1.txt"].decode(),
        "para2.txt": raw["para2.txt"].decode(),
        "json": json.loads(raw["json"]),
        "tokens.npy": np.load(io.BytesIO(raw["tokens.npy"])),
    }
    texts = [sample["txt"], sample["para1.txt"], sample["para2.txt"]]
    for context_length, used_stored in ((None, True), (16, False)):
        tokenizer = open_clip.get_tokenizer(TINY_MODEL, context_length=context_length)
        stage = TextTokens(tokenizer)
        out = stage(dict(sample))["texts"]
        assert (stage.stored_used, stage.tokenized) == ((1, 0) if used_stored else (0, 1))
        assert out.dtype == torch.long and torch.equal(out, tokenizer(texts))


def test_cached_features_skip_the_image_tower():
    open_clip.add_model_config(str(TINY_CONFIG))
    model = enable_paraphrase_forward(freeze_visual(open_clip.create_model(TINY_MODEL, output_dict=True)))

    def no_image_tower(*args, **kwargs):
        raise AssertionError("the image tower ran")

    model.visual.forward = no_image_tower
    features = torch.randn(4, 64).half()
    text = open_clip.get_tokenizer(TINY_MODEL)(["a red circle"] * 12).reshape(4, 3, -1)
    out = model(features, text)
    torch.testing.assert_close(out["image_features"], torch.nn.functional.normalize(features.float(), dim=-1))
    assert out["para2_features"].shape == (4, 64)


def one_step(world, name, data, *extra, batch_size=16):
    """All 16 samples of one shard in one step; crop scale pinned to 1, so the train transform of
    these square images is the validation transform the embeddings were made with."""
    args = train_args(
        data,
        world["logs"],
        name,
        world["init"],
        "--paraclip-loss",
        "--aug-cfg",
        "scale=(1.0,1.0)",
        *extra,
        batch_size=batch_size,
        samples=16,
    )
    args[args.index("--workers") + 1] = "0"
    return run([PYTHON, "-m", "open_clip_train.main", *args], check=False)


def test_image_embeddings_train_like_images_and_accumulate_like_a_double_batch(world):
    images = str(world["plain"] / "00000.tar")
    embedded = str(world["embedded"] / "00000.tar")
    for name, data, extra, batch in (
        ("img16", images, (), 16),
        ("emb16", embedded, ("--image-embeddings",), 16),
        ("emb8x2", embedded, ("--image-embeddings", "--accum-freq", "2"), 8),
    ):
        proc = one_step(world, name, data, *extra, batch_size=batch)
        assert proc.returncode == 0, proc.stderr[-3000:]
    img, emb, accum = (logged_losses(read_log(world["logs"], n)) for n in ("img16", "emb16", "emb8x2"))
    assert len(img) == len(emb) == len(accum) == 1
    assert "reading cached image embeddings" in read_log(world["logs"], "emb16")
    for key in ("Loss", *TERMS):
        assert emb[0][key] == pytest.approx(img[0][key], abs=2e-3), key  # float16 embeddings
        assert accum[0][key] == pytest.approx(emb[0][key], abs=1e-4), key
    full, acc = (optimizer_first_moments(world["logs"], n) for n in ("emb16", "emb8x2"))
    assert len(full) == len(acc) > 0
    for full_grad, accum_grad in zip(full, acc):
        if full_grad.ndim == 0:  # logit_scale: accum_freq x, open_clip's behaviour (see test_train.py)
            torch.testing.assert_close(accum_grad, 2 * full_grad, atol=1e-7, rtol=1e-4)
        else:
            assert (accum_grad - full_grad).norm() <= 1e-3 * full_grad.norm(), tuple(full_grad.shape)


def test_val_data_stock_shards_or_embedding_only_shards_are_evaluated_and_the_epoch_saved(world, tmp_path):
    """open_clip's evaluate() reads (image, caption): a user's stock val shards (no paraphrases) are read as open_clip
    reads them, through the frozen tower, also when training reads cached embeddings; shards without images
    (compact ones here) through the cached-embedding stages. Either way the epoch's checkpoint is written."""
    stock_val = write_shards(tmp_path / "stock_val", num_shards=1, per_shard=16, seed=5, paraphrases=False)
    embed(str(world["plain"] / "00001.tar"), world["init"], "--compact", "--output", tmp_path / "compact_val")
    runs = {"val-stock": stock_val, "val-compact": tmp_path / "compact_val" / "00001.tar"}
    for name, val in runs.items():
        proc = one_step(
            world,
            name,
            str(world["embedded"] / "00000.tar"),
            "--image-embeddings",
            "--val-data",
            str(val),
            "--save-frequency",
            "1",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = read_log(world["logs"], name)
        metrics = [line for line in log.splitlines() if "Eval Epoch: 1 image_to_text_mean_rank" in line]
        assert len(metrics) == 1 and "num_samples: 16.0000" in metrics[0], log[-2000:]
        assert (world["logs"] / name / "checkpoints" / "epoch_1.pt").exists()


def test_embeddings_of_other_weights_or_none_are_refused_naming_the_shard(world, tmp_path):
    model, preprocess_train, _ = tiny_model(world["init"])  # the training model (init.pt)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)

    def stages():
        return paraclip_decode_stages(
            preprocess_train, tokenizer, EmbeddingExpectation(visual_fingerprint(model.visual))
        )

    other = save_init_checkpoint(tmp_path / "other.pt", seed=1)
    embed(str(world["plain"] / "00001.tar"), other, "--output", tmp_path / "other")
    shard = tmp_path / "other" / "00001.tar"
    with pytest.raises(
        EmbeddingMismatch, match=f"shard {shard} holds image embeddings of model '{TINY_MODEL}' pretrained '{other}'"
    ):
        pipeline(shard, stages())
    with pytest.raises(MissingEmbeddings, match=f"shard {world['plain'] / '00001.tar'} has no 'img_emb.npy' member"):
        pipeline(world["plain"] / "00001.tar", stages())


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--paraclip-loss", "--no-frozen-visual"], "--image-embeddings uses fixed image features"),
        ([], "--image-embeddings needs --paraclip-loss"),
    ],
)
def test_bad_image_embedding_flags(world, patched_install, capsys, flags, message):
    from open_clip_train.params import parse_args

    args = train_args(
        world["embedded"] / "00000.tar", world["logs"], "bad", world["init"], "--image-embeddings", *flags
    )
    with pytest.raises(SystemExit) as exit_:
        parse_args([str(a) for a in args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_val_shards_are_judged_by_their_first_samples_not_one(tmp_path):
    """A stock val shard whose first sample lacks its image (open_clip filters it out) is still a stock shard."""
    import argparse

    from paraclip_plugin.train import hooks

    write_shards(tmp_path / "v", num_shards=1, per_shard=8, paraphrases=False, drop={0: "png"})
    args = argparse.Namespace(paraclip_loss=True, image_embeddings=False, val_data=str(tmp_path / "v" / "00000.tar"))
    assert hooks.wds_decode_stages(args, None, None, is_train=False) is None  # open_clip's own stages


def test_shards_in_a_folder_that_cant_be_listed_are_looked_up_one_by_one(tmp_path, monkeypatch):
    from paraclip_plugin.train import hooks

    write_shards(tmp_path / "s", num_shards=2, per_shard=2)
    pattern = str(tmp_path / "s" / "{00000..00002}.tar")
    assert hooks.missing_local_shards(pattern) == [str(tmp_path / "s" / "00002.tar")]

    def unlistable(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(hooks.os, "scandir", unlistable)
    assert hooks.missing_local_shards(pattern) == [str(tmp_path / "s" / "00002.tar")]


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def spoil_sample(index, field, value):
    """``rewrite_shard``'s change: sample ``index``'s ``field`` becomes ``value(old bytes)``."""

    def change(i, sample):
        if i == index:
            sample[field] = value(sample[field])

    return change


BAD_MEMBERS = {  # a well-formed member training can't use -> the reason its sample is skipped and counted under
    "tokens.npy with 2 rows": ("tokens.npy", lambda b: npy(np.load(io.BytesIO(b))[:2]), "tokens.npy bad shape"),
    "tokens.npy 1-D": ("tokens.npy", lambda b: npy(np.ones(5, np.int32)), "tokens.npy bad shape"),
    "tokens.npy wider than the context": (
        "tokens.npy",
        lambda b: npy(np.ones((3, 40), np.int32)),
        "tokens.npy bad shape",
    ),
    "token ids beyond the vocabulary": (
        "tokens.npy",
        lambda b: npy(np.full((3, 4), 10**7, np.int32)),
        "tokens.npy bad ids",
    ),
    "negative token ids": ("tokens.npy", lambda b: npy(np.full((3, 4), -1, np.int32)), "tokens.npy bad ids"),
    "float token ids": ("tokens.npy", lambda b: npy(np.ones((3, 4), np.float32)), "tokens.npy bad dtype"),
    "json a list": ("json", lambda b: b"[1]", "json not an object"),
    "json a string": ("json", lambda b: b'"x"', "json not an object"),
    "record a string": (
        "json",
        lambda b: json.dumps({**json.loads(b), "paraclip_image_embedding": "x"}).encode(),
        "paraclip_image_embedding not an object",
    ),
}


def skip_reasons(caplog):
    return [r.getMessage() for r in caplog.records if "ParaCLIP: skipped sample" in r.getMessage()]


@pytest.mark.parametrize("case", BAD_MEMBERS)
def test_well_formed_but_unusable_members_are_skipped_and_counted(world, tmp_path, caplog, case):
    """One such sample is left out, named, with its reason; the other 15 go on (before: the whole run stopped,
    or ids past the vocabulary reached the embedding: IndexError on the CPU, a device assert on a GPU)."""
    model, preprocess_train, _ = tiny_model(world["init"])
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    field, value, kind = BAD_MEMBERS[case]
    shard = rewrite_shard(world["embedded"] / "00000.tar", tmp_path / "bad.tar", spoil_sample(3, field, value))
    key = list(read_tar_samples(shard))[3]["__key__"]
    stages = paraclip_decode_stages(
        preprocess_train,
        tokenizer,
        EmbeddingExpectation(visual_fingerprint(model.visual), dim=model.visual.output_dim),
    )
    with caplog.at_level(logging.WARNING):
        out = pipeline(shard, stages)
    assert len(out) == 15 and int(torch.stack([t for _, t in out]).max()) < tokenizer.vocab_size
    [skipped] = skip_reasons(caplog)
    assert f"skipped sample '{key}' of {shard}" in skipped and f"'{kind}': 1" in skipped, skipped
    if field == "json" and case != "record a string":  # the image path reads the json too (stored token ids)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert len(pipeline(shard, paraclip_decode_stages(preprocess_train, tokenizer))) == 15
        assert f"'{kind}': 1" in skip_reasons(caplog)[0]


def test_embeddings_of_another_transform_or_architecture_are_refused_naming_both(world, tmp_path):
    """Same weights: another image mean or QuickGELU instead of GELU gives other embeddings, refused with the
    flag and both values named; records made before these fields existed are used, with a log line saying so."""
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    shard = world["embedded"] / "00000.tar"

    def stages(**kwargs):
        model, preprocess, _ = open_clip.create_model_and_transforms(
            TINY_MODEL, pretrained=str(world["init"]), **kwargs
        )
        return paraclip_decode_stages(
            preprocess,
            tokenizer,
            EmbeddingExpectation(
                visual_fingerprint(model.visual),
                architecture=visual_architecture(model.visual),
                preprocess=preprocess_config(model.visual),
            ),
        )

    assert len(pipeline(shard, stages())) == 16
    with pytest.raises(
        EmbeddingMismatch,
        match=re.escape(
            f"shard {shard} holds image embeddings made with image transform mean "
            f"{list(open_clip.OPENAI_DATASET_MEAN)!r}, but this run's --image-mean gives [0.0, 0.0, 0.0]"
        ),
    ):
        pipeline(shard, stages(image_mean=(0.0, 0.0, 0.0)))
    with pytest.raises(EmbeddingMismatch, match="--image-interpolation gives 'bilinear'"):
        pipeline(shard, stages(image_interpolation="bilinear"))
    with pytest.raises(
        EmbeddingMismatch,
        match=f"shard {shard} holds image embeddings of model '{TINY_MODEL}' .* architecture sha256 .*QuickGELU",
    ):
        pipeline(shard, stages(force_quick_gelu=True))

    def without(field):
        def rewrite(i, sample):
            meta = json.loads(sample["json"])
            del meta["paraclip_image_embedding"][field]
            sample["json"] = json.dumps(meta).encode()

        return rewrite

    for field, what in (("visual_architecture", "image tower architecture"), ("preprocess", "image transform")):
        lacking = rewrite_shard(shard, tmp_path / f"no-{field}.tar", without(field))
        with pytest.raises(EmbeddingMismatch, match=f"shard {lacking}: its image embeddings record no {what}, "):
            pipeline(lacking, stages())


@pytest.mark.parametrize(
    "flags,message",
    [
        (("--image-mean", "0", "0", "0"), "this run's --image-mean gives [0.0, 0.0, 0.0]"),
        (("--force-quick-gelu",), "in architecture sha256"),
    ],
)
def test_training_refuses_embeddings_of_another_transform_or_architecture(world, patched_install, flags, message):
    proc = one_step(
        world, "other-" + flags[0].strip("-"), world["embedded"] / "00000.tar", "--image-embeddings", *flags
    )
    assert proc.returncode != 0 and "EmbeddingMismatch" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]


def test_a_rerun_with_another_precision_embeds_again_and_says_why(world, tmp_path, caplog):
    """--precision amp_bf16 is recorded (and autocasts on the CPU too, so the embeddings differ); a rerun in fp32
    does not take those shards for its own."""
    caplog.set_level(logging.INFO)
    shards, out = str(world["plain"] / "00000.tar"), tmp_path / "out"
    embed(shards, world["init"], "--output", out, "--precision", "amp_bf16")
    amp = list(read_tar_samples(out / "00000.tar"))
    assert json.loads(amp[0]["json"])["paraclip_image_embedding"]["precision"] == "amp_bf16"
    assert [s["img_emb.npy"] for s in amp] != [
        s["img_emb.npy"] for s in read_tar_samples(world["embedded"] / "00000.tar")
    ]
    caplog.clear()
    embed(shards, world["init"], "--output", out)
    assert (
        f"{out / '00000.tar'}: embedded before with other settings (embedding precision 'amp_bf16' (now 'fp32')): "
        f"embedding it again"
    ) in caplog.text
    assert (
        json.loads(next(read_tar_samples(out / "00000.tar"))["json"])["paraclip_image_embedding"]["precision"] == "fp32"
    )
    assert "autocast on --device, CUDA or CPU" in " ".join(embed_images_help().split())


def embed_images_help():
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        embed_images.parse_args(["--help"])
    return buf.getvalue()


@pytest.mark.parametrize(
    "jobs, line",
    [
        (["--num-jobs", "2", "--job-index", "5"], "--job-index 5 is outside 0..1 (--num-jobs 2)"),
        (["--job-index", "-1"], "argument --job-index: must be an integer >= 0, not -1"),
        (["--num-jobs", "0"], "argument --num-jobs: must be an integer >= 1, not 0"),
    ],
)
def test_a_job_index_outside_the_jobs_is_a_usage_error(jobs, line, capsys):
    """As paraclip-make-shards says it (test_paraphrase_cli): the usage, then one line naming the flag; status 2."""
    with pytest.raises(SystemExit) as exit:
        embed_images.main(["--shards", "x.tar", "--model", TINY_MODEL, *jobs])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: paraclip-embed-images") and "Traceback" not in "".join(err)
    assert err[-1] == f"paraclip-embed-images: error: {line}"


def test_a_rerun_skips_a_shard_whose_first_image_has_no_embedding(world, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    src = rewrite_shard(
        world["plain"] / "00000.tar", tmp_path / "00000.tar", spoil_sample(0, "png", lambda b: b[:60])
    )  # undecodable: copied without an embedding
    embed(str(src), world["init"])
    assert "15/16 samples embedded" in caplog.text
    caplog.clear()
    embed(str(src), world["init"])
    assert (
        f"{src}: already embedded with these weights, skipped" in caplog.text and "samples embedded" not in caplog.text
    )


def test_patch_dropout_is_no_architecture_in_open_clip_or_timm_towers(tmp_path):
    """--force-patch-dropout (train-time only) must not refuse the embeddings: open_clip's own towers name the
    module patch_dropout, timm's trunk.patch_drop."""
    from paraclip_plugin.train.embeddings import visual_architecture
    from paraclip_plugin.train.model import freeze_visual

    config = tmp_path / "tiny-timm.json"
    config.write_text(
        json.dumps(
            {
                "embed_dim": 64,
                "vision_cfg": {
                    "timm_model_name": "vit_tiny_patch16_224",
                    "timm_model_pretrained": False,
                    "timm_pool": "avg",
                    "timm_proj": "linear",
                    "image_size": 224,
                },
                "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
            }
        )
    )
    open_clip.add_model_config(str(config))
    open_clip.add_model_config(str(TINY_CONFIG))
    for name in ("tiny-timm", TINY_MODEL):
        towers = [freeze_visual(open_clip.create_model(name, **kw)).visual for kw in ({}, {"force_patch_dropout": 0.5})]
        assert {type(m).__name__ for t in towers for m in t.modules()} >= {"PatchDropout"}
        assert visual_architecture(towers[0]) == visual_architecture(towers[1])


def test_a_compact_shard_after_a_four_field_one_is_named_as_mixing_them(world, tmp_path):
    model, preprocess_train, _ = tiny_model(world["init"])
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    embed(str(world["plain"] / "00001.tar"), world["init"], "--compact", "--output", tmp_path / "compact")
    first, compact = world["embedded"] / "00000.tar", tmp_path / "compact" / "00001.tar"
    stages = paraclip_decode_stages(
        preprocess_train, tokenizer, EmbeddingExpectation(visual_fingerprint(model.visual)), first_shard=str(first)
    )
    with pytest.raises(
        MixedShards,
        match=re.escape(
            f"shard {compact} is a compact ('.pcl' members) shard, but the first shard of --train-data ({first}) is a "
            f"four-field one: compact and four-field shards can't be mixed in one run"
        ),
    ):
        pipeline(compact, stages)
    with pytest.raises(MixedShards, match="train on compact shards with --image-embeddings"):
        pipeline(compact, paraclip_decode_stages(preprocess_train, tokenizer))


def test_writer_processes_write_the_shards_this_process_writes(world, tmp_path):
    """--writers: shards written by two writer processes are byte for byte those written in this process;
    the default count follows --workers (half of them with --decode-device cuda: those workers only read)."""
    embed(str(world["plain"] / "*.tar"), world["init"], "--output", tmp_path, "--workers", "1", "--writers", "2")
    for name in ("00000.tar", "00001.tar"):
        assert (tmp_path / name).read_bytes() == (world["embedded"] / name).read_bytes()
    counts = {}
    for flags in (
        [],
        ["--workers", "0"],
        ["--workers", "15"],
        ["--workers", "15", "--decode-device", "cuda"],
        ["--workers", "1", "--decode-device", "cuda"],
        ["--workers", "15", "--writers", "0"],
    ):
        args = embed_images.parse_args(["--shards", "x", "--model", TINY_MODEL, *flags])
        counts[" ".join(flags)] = embed_images.ShardEmbedder.writers(SimpleNamespace(args=args))
    assert counts == {
        "": 1,
        "--workers 0": 0,
        "--workers 15": 3,
        "--workers 15 --decode-device cuda": 7,
        "--workers 1 --decode-device cuda": 1,
        "--workers 15 --writers 0": 0,
    }
