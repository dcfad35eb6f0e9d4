"""Compact training shards (embed_images --compact): two members per sample, the same batches as the
four-field embedded shards, and the same checks."""

import json
import logging

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds

from conftest import TINY_MODEL, logged_losses, read_log
from paraclip_plugin.train.compact import COMPACT_FIELD, pack, unpack
from paraclip_plugin.train.decode import compact_decode_stages, first_sample_fields, is_compact, paraclip_decode_stages
from paraclip_plugin.train.embeddings import (
    EmbeddingExpectation,
    EmbeddingMismatch,
    MissingEmbeddings,
    visual_fingerprint,
)
from paraclip_plugin.data.tars import read_tar_samples
from paraclip_plugin.train.pretokenized import TokenizerMismatch
from test_fast_embeddings import (
    embed,
    embed_images,
    one_step,
    pipeline,
    rewrite_shard,
    skip_reasons,
    spoil_sample,
    tiny_model,
    world,  # noqa: F401 (a fixture)
)
from test_train import TERMS


@pytest.fixture(scope="module")
def compact(world):  # noqa: F811
    embed(str(world["plain"] / "*.tar"), world["init"], "--output", world["root"] / "compact", "--compact")
    return world["root"] / "compact"


def test_pack_round_trip_and_refuses_other_bytes():
    embedding = np.random.default_rng(0).standard_normal(64).astype(np.float16)
    tokens = np.arange(3 * 9, dtype=np.int32).reshape(3, 9)
    e, t = unpack(pack(embedding, tokens))
    assert np.array_equal(e, embedding) and np.array_equal(t, tokens) and e.flags.writeable
    data = pack(embedding, tokens)
    for bad in (data[:-1], b"PCL2" + data[4:], b"xy"):
        with pytest.raises(ValueError):
            unpack(bad)


def test_compact_shards_hold_two_members_and_the_records(world, compact):  # noqa: F811
    assert json.loads((compact / "sizes.json").read_text()) == {"00000.tar": 16, "00001.tar": 16}
    for name in ("00000.tar", "00001.tar"):
        full = list(read_tar_samples(world["embedded"] / name))
        small = list(read_tar_samples(compact / name))
        assert [s["__key__"] for s in small] == [s["__key__"] for s in full]
        for a, b in zip(full, small):
            assert sorted(k for k in b if not k.startswith("__")) == ["json", COMPACT_FIELD]
            embedding, tokens = unpack(b[COMPACT_FIELD])
            assert np.array_equal(embedding, np.load(__import__("io").BytesIO(a["img_emb.npy"])))
            assert np.array_equal(tokens, np.load(__import__("io").BytesIO(a["tokens.npy"])))
            assert json.loads(b["json"]) == json.loads(a["json"])
    assert (compact / "00000.tar").stat().st_size * 2 < (world["embedded"] / "00000.tar").stat().st_size


def test_compact_batches_equal_the_embedded_ones(world, compact):  # noqa: F811
    model, preprocess_train, _ = tiny_model(world["init"])
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    expected = EmbeddingExpectation(visual_fingerprint(model.visual), dim=model.visual.output_dim)
    assert is_compact(first_sample_fields(str(compact / "{00000..00001}.tar")))
    assert not is_compact(first_sample_fields(str(world["embedded"] / "00000.tar")))
    full = pipeline(world["embedded"] / "00000.tar", paraclip_decode_stages(preprocess_train, tokenizer, expected))
    small = pipeline(compact / "00000.tar", compact_decode_stages(tokenizer, expected))
    assert len(small) == len(full) == 16
    for (image_a, texts_a), (image_b, texts_b) in zip(full, small):
        assert torch.equal(image_a, image_b) and torch.equal(texts_a, texts_b)


def test_compact_shards_are_refused_for_other_weights_tokenizers_or_missing_members(world, compact, tmp_path, caplog):  # noqa: F811,E501
    model, preprocess_train, _ = tiny_model(world["init"])
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    expected = EmbeddingExpectation(visual_fingerprint(model.visual))
    with pytest.raises(EmbeddingMismatch, match=f"shard {compact / '00000.tar'} holds image embeddings"):
        pipeline(compact / "00000.tar", compact_decode_stages(tokenizer, EmbeddingExpectation("0" * 64)))
    other_tokenizer = open_clip.get_tokenizer(TINY_MODEL, context_length=16)
    with pytest.raises(
        TokenizerMismatch, match=f"shard {compact / '00000.tar'}: .*re-run paraclip-embed-images --compact"
    ):
        pipeline(compact / "00000.tar", compact_decode_stages(other_tokenizer, expected))
    with pytest.raises(
        MissingEmbeddings,
        match=f"shard {world['embedded'] / '00000.tar'} is a four-field \\(no '.pcl' "
        f"member in any sample\\) shard, but the first shard of --train-data is a "
        f"compact one: compact and four-field shards can't be mixed",
    ):
        pipeline(world["embedded"] / "00000.tar", compact_decode_stages(tokenizer, expected))
    # one sample without its member, one with a broken one: skipped and counted, the rest kept
    holes = tmp_path / "holes.tar"
    keys = {}
    with wds.TarWriter(str(holes)) as sink:
        for i, sample in enumerate(read_tar_samples(compact / "00000.tar")):
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            if i == 3:
                sample.pop(COMPACT_FIELD)
                keys["missing"] = sample["__key__"]
            if i == 5:
                sample[COMPACT_FIELD] = sample[COMPACT_FIELD][:-2]
                keys["broken"] = sample["__key__"]
            sink.write(sample)
    with caplog.at_level(logging.WARNING):
        assert len(pipeline(holes, compact_decode_stages(tokenizer, expected))) == 14
    skipped = [r.getMessage() for r in caplog.records if "ParaCLIP: skipped sample" in r.getMessage()]
    assert len(skipped) == 2
    assert f"skipped sample '{keys['missing']}'" in skipped[0] and "missing pcl or json" in skipped[0]
    assert f"skipped sample '{keys['broken']}'" in skipped[1] and "pcl: " in skipped[1]
    assert (
        "(2 skipped so far in this data worker; by reason: {'missing pcl/json': 1, 'pcl not readable': 1})"
        in skipped[1]
    )


def test_compact_needs_an_output_folder(world, capsys):  # noqa: F811
    code = embed_images.main(
        [
            "--shards",
            str(world["plain"] / "00000.tar"),
            "--model",
            TINY_MODEL,
            "--model-config",
            str(world["root"].parent),
            "--compact",
        ]
    )
    assert (
        code == 2 and "--compact writes shards without images and texts: it needs --output" in capsys.readouterr().err
    )


def test_open_clip_train_on_compact_shards_matches_the_embedded_ones(world, compact, patched_install):  # noqa: F811
    for name, data in (("emb_full", world["embedded"] / "00000.tar"), ("emb_compact", compact / "00000.tar")):
        proc = one_step(world, name, data, "--image-embeddings")
        assert proc.returncode == 0, proc.stderr[-3000:]
    full, small = (logged_losses(read_log(world["logs"], n)) for n in ("emb_full", "emb_compact"))
    assert len(full) == len(small) == 1
    for key in ("Loss", *TERMS):
        assert small[0][key] == pytest.approx(full[0][key], abs=1e-5), key


def test_the_first_sample_is_read_as_webdataset_groups_it_from_any_url(tmp_path):
    """Upper-case suffixes are lower-cased and keys split as webdataset does; local, file:, gzip and pipe: alike."""
    import gzip
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("a/k1.JPG", b"x"), ("a/k1.txt", b"t"), ("a/k1.para1.txt", b"p"), ("a/k2.JPG", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    first = {"jpg", "txt", "para1.txt"}
    for url in (
        tmp_path / "s.tar",
        f"file:{tmp_path / 's.tar'}",
        tmp_path / "s.tar.gz",
        f"pipe:cat {tmp_path / 's.tar'}",
    ):
        assert first_sample_fields(str(url)) == first, url
    assert first_sample_fields(str(tmp_path / "none.tar")) is None and first_sample_fields("pipe:false") is None


@pytest.mark.parametrize(
    "field,value,kind",
    [
        (
            COMPACT_FIELD,
            lambda b: pack(unpack(b)[0], np.ones((3, 40), np.int32)),
            "tokens.npy bad shape",
        ),  # n > context 32
        (COMPACT_FIELD, lambda b: pack(unpack(b)[0], np.full((3, 4), 10**7, np.int32)), "tokens.npy bad ids"),
        ("json", lambda b: b'"x"', "json not an object"),
    ],
)
def test_unusable_compact_members_are_skipped_and_counted(world, compact, tmp_path, caplog, field, value, kind):  # noqa: F811
    model, _, _ = tiny_model(world["init"])
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    expected = EmbeddingExpectation(visual_fingerprint(model.visual))
    shard = rewrite_shard(compact / "00000.tar", tmp_path / "bad.tar", spoil_sample(3, field, value))
    with caplog.at_level(logging.WARNING):
        assert len(pipeline(shard, compact_decode_stages(tokenizer, expected))) == 15
    [skipped] = skip_reasons(caplog)
    assert f"'{kind}': 1" in skipped, skipped


def test_compact_and_four_field_shards_train_on_the_same_samples(world, tmp_path, caplog):  # noqa: F811
    """Samples training skips for their texts (empty, white space only, not UTF-8, missing) or their image are left
    out of compact shards too (warned when embedding), so both kinds give the same samples, bit for bit."""
    bad_texts = {
        1: ("para1.txt", b""),
        2: ("txt", b"  \n"),
        3: ("para2.txt", b"\xff\xfe bad"),
        4: ("para2.txt", None),
        5: ("png", b"not a png"),
    }

    def spoil(i, sample):
        if i in bad_texts:
            field, value = bad_texts[i]
            sample.pop(field) if value is None else sample.update({field: value})

    src = rewrite_shard(world["plain"] / "00000.tar", tmp_path / "00000.tar", spoil)
    with caplog.at_level(logging.WARNING):
        embed(str(src), world["init"], "--output", tmp_path / "four")
        embed(str(src), world["init"], "--output", tmp_path / "compact", "--compact")
    assert "para1.txt is empty, so training skips it: no token ids, not in the compact shard" in caplog.text
    model, preprocess_train, _ = tiny_model(world["init"])
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    expected = EmbeddingExpectation(visual_fingerprint(model.visual), dim=model.visual.output_dim)

    def through(url, stages):
        return [(s["__key__"], s["image"], s["texts"]) for s in pipeline(url, stages[:-1])]

    four = through(tmp_path / "four" / "00000.tar", paraclip_decode_stages(preprocess_train, tokenizer, expected))
    small = through(tmp_path / "compact" / "00000.tar", compact_decode_stages(tokenizer, expected))
    keys = [s["__key__"] for s in read_tar_samples(src)]
    assert [k for k, _, _ in small] == [k for k, _, _ in four] == [k for i, k in enumerate(keys) if i not in bad_texts]
    for (_, image_a, texts_a), (_, image_b, texts_b) in zip(four, small):
        assert torch.equal(image_a, image_b) and torch.equal(texts_a, texts_b)
