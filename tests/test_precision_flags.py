"""Precisions and flag combinations users pass with --paraclip-loss: amp_bf16, 16-bit weights with
--image-embeddings, conflicting lock flags, pure_bf16 at a tiny learning rate."""

import json

import open_clip
import pytest
import torch

from conftest import TINY_CONFIG, TINY_MODEL, final_state, logged_losses, read_log, torchrun, train_args, write_shards
from paraclip_plugin.train.decode import paraclip_decode_stages
from paraclip_plugin.train.embeddings import (
    EmbeddingExpectation,
    EmbeddingMismatch,
    precision_fingerprints,
    visual_fingerprint,
)
from paraclip_plugin.data.tars import read_tar_samples
from test_fast_embeddings import one_step, pipeline, tiny_model, world  # noqa: F401 (fixture)
from test_train import TERMS, split


def test_amp_bf16_trains_text_only_on_two_ranks(world, patched_install):  # noqa: F811
    args = train_args(
        world["plain"] / "{00000..00001}.tar",
        world["logs"],
        "amp_bf16",
        world["init"],
        "--paraclip-loss",
        "--precision",
        "amp_bf16",
    )
    torchrun(["open_clip_train.main", *args])
    steps = logged_losses(read_log(world["logs"], "amp_bf16"))
    assert len(steps) == 2  # 32 samples / (8 x 2 ranks)
    assert all(torch.isfinite(torch.tensor(step[t])) for step in steps for t in ("Loss", *TERMS))
    state, init = final_state(world["logs"], "amp_bf16"), torch.load(world["init"])
    (visual, text), (init_visual, init_text) = split(state), split(init)
    assert all(torch.equal(visual[k], init_visual[k]) for k in init_visual)
    assert all(v.dtype == torch.float32 for v in state.values())  # amp: float32 weights, bf16 compute
    assert not torch.equal(text["token_embedding.weight"], init_text["token_embedding.weight"])


def test_embed_images_records_the_fingerprints_of_16_bit_weights(world):  # noqa: F811
    record = json.loads(next(read_tar_samples(world["embedded"] / "00000.tar"))["json"])["paraclip_image_embedding"]
    open_clip.add_model_config(str(TINY_CONFIG))
    by_precision = record["visual_sha256_by_precision"]
    assert by_precision == precision_fingerprints(TINY_MODEL, str(world["init"]))
    for precision in ("pure_bf16", "bf16", "pure_fp16", "fp16"):  # each as open_clip itself converts the weights
        model = open_clip.create_model(TINY_MODEL, pretrained=str(world["init"]), precision=precision)
        assert visual_fingerprint(model.visual) == by_precision[precision] != record["visual_sha256"]
    assert len(set(by_precision.values())) == 4  # bf16 vs fp16, all weights vs open_clip's mixed conversion


@pytest.mark.parametrize("precision", ["pure_bf16", "bf16"])
def test_image_embeddings_train_with_16_bit_weights(world, patched_install, precision):  # noqa: F811
    """The fingerprint check passes for the same weights in 16 bits, and the loss gets one dtype."""
    proc = one_step(
        world,
        f"emb_{precision}",
        world["embedded"] / "00000.tar",
        "--image-embeddings",
        "--precision",
        precision,
        "--lr",
        "1e-3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = logged_losses(read_log(world["logs"], f"emb_{precision}"))
    assert len(steps) == 1 and torch.isfinite(torch.tensor(steps[0]["Loss"]))


def test_old_records_without_16_bit_fingerprints_are_refused_with_the_working_choices(world, tmp_path):  # noqa: F811
    import webdataset as wds

    old = tmp_path / "old.tar"
    with wds.TarWriter(str(old)) as sink:
        for sample in read_tar_samples(world["embedded"] / "00000.tar"):
            meta = json.loads(sample["json"])
            del meta["paraclip_image_embedding"]["visual_sha256_by_precision"]
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            sink.write({**sample, "json": json.dumps(meta).encode()})
    model = open_clip.create_model(TINY_MODEL, pretrained=str(world["init"]), precision="pure_bf16")
    _, preprocess_train, _ = tiny_model(world["init"])
    stages = paraclip_decode_stages(
        preprocess_train,
        open_clip.get_tokenizer(TINY_MODEL),
        EmbeddingExpectation(visual_fingerprint(model.visual), precision="pure_bf16"),
    )
    with pytest.raises(
        EmbeddingMismatch,
        match=f"shard {old}: .* in --precision pure_bf16 .*re-run "
        f"paraclip-embed-images on it, or train with --precision amp_bf16",
    ):
        pipeline(old, stages)


def parse(world, *flags):  # noqa: F811
    from open_clip_train.params import parse_args

    return parse_args(
        [str(a) for a in train_args(world["plain"] / "00000.tar", world["logs"], "flags", world["init"], *flags)]
    )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--paraclip-loss", "--lock-text"], "--paraclip-loss trains the text tower, but --lock-text freezes it"),
        (["--paraclip-loss", "--lock-text", "--lock-text-freeze-layer-norm"], "drop --lock-text"),
        (
            ["--paraclip-loss", "--lock-image", "--lock-image-unlocked-groups", "2"],
            "--lock-image-unlocked-groups 2 asks for trainable image layers, but the image tower is frozen",
        ),
        (["--frozen-visual", "--lock-image", "--lock-image-unlocked-groups", "1"], "pass --no-frozen-visual"),
    ],
)
def test_conflicting_lock_flags_are_refused(world, patched_install, capsys, flags, message):  # noqa: F811
    with pytest.raises(SystemExit) as exit_:
        parse(world, *flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--paraclip-terms", "caption:para1"],
            "--paraclip-terms only apply to the ParaCLIP loss: add --paraclip-loss",
        ),
        (["--paraclip-weights", "1,1,1", "--no-text-trimming"], "--paraclip-weights, --no-text-trimming only apply"),
        (["--paraclip-loss-block-size", "4096"], "--paraclip-loss-block-size only apply to the ParaCLIP loss"),
        (
            ["--paraclip-loss", "--paraclip-loss-block-size", "-1"],
            "argument --paraclip-loss-block-size: '-1' is not a whole number of rows (0 or more)",
        ),
        (
            ["--paraclip-loss", "--no-frozen-visual", "--paraclip-terms", "caption:para1,para1:para2"],
            "--paraclip-terms caption:para1,para1:para2 has no image term, so the image tower gets no gradient, but "
            "--no-frozen-visual asks to train it",
        ),
        (
            ["--paraclip-loss", "--dataset-type", "auto", "--train-data", "/data/pairs.csv"],
            "--dataset-type auto (csv) is not supported",
        ),
        (
            ["--paraclip-loss", "--train-data", "/nonexistent/{00000..00003}.tar"],
            "--train-data: 4 shard file(s) not found: /nonexistent/00000.tar, /nonexistent/00001.tar, "
            "/nonexistent/00002.tar, ...",
        ),
        (["--paraclip-loss", "--val-data", "/nonexistent/val.tar"], "--val-data: 1 shard file(s) not found"),
        (
            ["--paraclip-loss", "--train-data", "SIZES_MISSING_AN_ENTRY"],
            "--train-data: the sizes.json next to its first shard has no entry for shard '00001.tar'; pass "
            "--train-num-samples",
        ),
    ],
)
def test_flags_that_would_be_ignored_or_fail_late_are_refused_at_once(
    world, patched_install, capsys, flags, message, tmp_path
):  # noqa: F811
    if "SIZES_MISSING_AN_ENTRY" in flags:  # two shards, sizes.json lists one
        write_shards(tmp_path, num_shards=2, per_shard=4)
        (tmp_path / "sizes.json").write_text('{"00000.tar": 4}')
        flags = [str(tmp_path / "{00000..00001}.tar") if f == "SIZES_MISSING_AN_ENTRY" else f for f in flags]
    with pytest.raises(SystemExit) as exit_:
        parse(world, *flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_what_those_checks_let_through(world, patched_install):  # noqa: F811
    args = parse(
        world,
        "--paraclip-loss",
        "--no-frozen-visual",
        "--paraclip-terms",
        "image:caption",
        "--dataset-type",
        "auto",
        "--val-data",
        "pipe:cat /nowhere/val.tar",
    )  # remote: read when used
    assert not args.frozen_visual and args.paraclip_terms == [("image", "caption")]
    assert not parse(world, "--frozen-visual", "--causal-attention").paraclip_loss  # these work with any loss
    assert parse(world, "--paraclip-loss", "--paraclip-loss-block-size", "4096").paraclip_loss_block_size == 4096
    plain = world["plain"]
    for data in (
        f"{plain}/{{00000..00001}}.tar::file:{plain}/00000.tar",
        f"pipe:cat {plain}/00000.tar",
        f"{plain}/00000.tar::{plain}/00001.tar",
    ):
        assert parse(world, "--paraclip-loss", "--dataset-type", "auto", "--train-data", data).train_data == data
    assert parse(
        world, "--paraclip-loss", "--no-frozen-visual", "--lock-image", "--paraclip-terms", "caption:para1"
    ).lock_image  # the tower is locked anyway: no image term is fine


def test_compatible_lock_flags_pass(world, patched_install):  # noqa: F811
    args = parse(world, "--paraclip-loss", "--no-frozen-visual", "--lock-image", "--lock-image-unlocked-groups", "1")
    assert args.lock_image_unlocked_groups == 1 and not args.frozen_visual
    assert parse(world, "--paraclip-loss", "--lock-image").frozen_visual


@pytest.mark.parametrize(
    "precision,lr,warned", [("pure_bf16", "5e-7", True), ("amp_bf16", "5e-7", False), ("pure_bf16", "1e-3", False)]
)
def test_pure_bf16_at_a_tiny_learning_rate_warns(world, patched_install, caplog, precision, lr, warned):  # noqa: F811
    parse(world, "--paraclip-loss", "--precision", precision, "--lr", lr)
    assert ("updates smaller than ~1/256 of a weight are rounded away" in caplog.text) == warned
