"""paraclip-embed-images --decode-device: batched decode_jpeg + tensor resize (device_decode.py), run on the
CPU here (torchvision's decode_jpeg takes device="cpu" too); tests/test_gpu.py runs the same on CUDA.

Tolerance against the CPU path (PIL decode + PIL resize): torchvision's and PIL's libjpeg decode the same
pixels, but the tensor resize (bicubic, antialias) computes in float where PIL's works in fixed point, so
resized values differ: by one level here and there (mean about 0.2 levels for ViT-B-32's 224 px resize), by
2-3 levels at a few pixels in a hundred thousand (``close_to_the_cpu_path``)."""

import functools
import io
import logging
import re

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import TINY_CONFIG, TINY_MODEL, save_init_checkpoint, write_shards
from paraclip_plugin.data.tars import read_tar_samples
from paraclip_plugin.embed import images as embed_images
from paraclip_plugin.embed.device_decode import DeviceDecoder, jpeg_problem, tensor_steps


def close_to_the_cpu_path(image, expected, mean_levels=0.3, max_levels=3, share_over_one=1e-4):
    """Whether uint8 ``image`` is within the resize's rounding of ``expected``: the module docstring."""
    diff = (image.int() - expected.int()).abs()
    return (
        diff.float().mean() <= mean_levels and diff.max() <= max_levels and (diff > 1).float().mean() <= share_over_one
    )


def encoded(image, **save):
    buf = io.BytesIO()
    image.save(buf, **save)
    return buf.getvalue()


def odd_images(seed=0):
    """{kind: bytes} as a ``jpg`` member can hold them, made with PIL, and the CPU path's verdict per kind."""
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((320, 240), Image.BICUBIC)
    baseline = encoded(smooth, format="JPEG", quality=85)
    return {
        "baseline": baseline,
        "greyscale": encoded(smooth.convert("L"), format="JPEG"),
        "cmyk": encoded(smooth.convert("CMYK"), format="JPEG"),
        "progressive": encoded(smooth, format="JPEG", progressive=True),
        "subsampling 4:4:4, other size": encoded(smooth.resize((211, 300)), format="JPEG", subsampling=0),
        "png in jpg": encoded(smooth, format="PNG"),
        "trailing bytes": baseline + b"\0\0\0\0",
        "truncated": baseline[: len(baseline) // 2],
        "not an image": b"<html>404</html>",
    }


UNDECODABLE = {"truncated", "not an image"}
ROUTED = {
    "cmyk": "CMYK JPEG",
    "png in jpg": "not a JPEG",
    "truncated": "no end-of-image marker (truncated?)",
    "not an image": "not a JPEG",
}


@pytest.fixture(scope="module")
def transform():
    open_clip.add_model_config(str(TINY_CONFIG))
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")  # 224 px, bicubic: the real resize
    to_uint8, _ = embed_images.split_preprocess(preprocess)
    return preprocess, to_uint8


def cpu_path(data, to_uint8):
    return embed_images.decode_image(data, to_uint8)


def test_jpeg_problem_sends_what_decode_jpeg_does_not_take_to_the_cpu():
    problems = {kind: jpeg_problem(data) for kind, data in odd_images().items()}
    assert problems == {kind: ROUTED.get(kind) for kind in problems}
    twelve_bit = bytearray(odd_images()["baseline"])
    sof = twelve_bit.index(b"\xff\xc0")
    twelve_bit[sof + 4] = 12
    assert jpeg_problem(bytes(twelve_bit)) == "12-bit JPEG"
    arithmetic = bytearray(odd_images()["baseline"])
    arithmetic[sof + 1] = 0xC9
    assert jpeg_problem(bytes(arithmetic)) == "lossless, hierarchical or arithmetic-coded JPEG"
    assert jpeg_problem(b"\xff\xd8\x00\x00\xff\xd9") == "damaged JPEG header"


def test_batched_decode_matches_the_pil_path_and_counts_every_image(transform):
    preprocess, to_uint8 = transform
    images = odd_images()
    decoder = DeviceDecoder(tensor_steps(preprocess), "cpu", functools.partial(cpu_path, to_uint8=to_uint8))
    kinds = list(images)
    rows, batch, failed = decoder(list(enumerate(images.values())))
    assert [kinds[i] for i in rows] == [k for k in kinds if k not in UNDECODABLE]  # order kept
    assert {kinds[i] for i in failed} == UNDECODABLE and "truncated" in str(failed[kinds.index("truncated")])
    assert batch.dtype == torch.uint8 and batch.shape == (len(rows), 3, 224, 224)
    assert dict(decoder.counts) == {
        "on cpu": 5,
        "on the CPU: CMYK JPEG": 1,
        "on the CPU: not a JPEG": 1,
        "not decodable": 2,
    }
    for i, image in zip(rows, batch):
        expected = cpu_path(images[kinds[i]], to_uint8)
        if kinds[i] in ROUTED:  # decoded by the CPU path itself
            assert torch.equal(image, expected), kinds[i]
        else:
            assert close_to_the_cpu_path(image, expected), kinds[i]


def test_what_decode_jpeg_refuses_is_decoded_on_the_cpu_one_by_one(transform, monkeypatch):
    """nvJPEG refuses some JPEGs that libjpeg takes (progressive ones in some versions) and then fails the
    whole batch: the decoder retries image by image and sends the refused ones to the CPU path."""
    preprocess, to_uint8 = transform
    images = odd_images()
    progressive = images["progressive"]
    decoder = DeviceDecoder(tensor_steps(preprocess), "cpu", functools.partial(cpu_path, to_uint8=to_uint8))
    real = decoder.decode_jpeg

    def refusing(tensors):
        if any(t.numel() == len(progressive) and bytes(t.numpy()) == progressive for t in tensors):
            raise RuntimeError("nvjpegDecodeBatchedPhaseOne failed: NVJPEG_STATUS_JPEG_NOT_SUPPORTED\nmore")
        return real(tensors)

    monkeypatch.setattr(decoder, "decode_jpeg", refusing)
    keep = ["baseline", "progressive", "greyscale"]
    rows, batch, failed = decoder(list(enumerate(images[k] for k in keep)))
    assert rows == [0, 1, 2] and not failed
    assert torch.equal(batch[1], cpu_path(progressive, to_uint8))
    assert dict(decoder.counts) == {
        "on cpu": 2,
        "on the CPU: decode_jpeg on cpu refused it (nvjpegDecodeBatched"
        "PhaseOne failed: NVJPEG_STATUS_JPEG_NOT_SUPPORTED)": 1,
    }


@pytest.fixture(scope="module")
def odd_shard(tmp_path_factory):
    """A four-field shard of the tiny model's world whose ``jpg`` members are the odd images."""
    root = tmp_path_factory.mktemp("device_decode")
    write_shards(root / "base", num_shards=1, per_shard=len(odd_images()), seed=3)
    with wds.TarWriter(str(root / "00000.tar")) as sink:
        for sample, data in zip(read_tar_samples(root / "base" / "00000.tar"), odd_images().values()):
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            sample.pop("png")
            sink.write({**sample, "jpg": data})
    return root, save_init_checkpoint(root / "init.pt", seed=0)


def run_tool(root, init, out, device_decode, workers, caplog):
    """The tool's whole loop (data workers, writers), with the batched decoder on the CPU where asked."""
    args = embed_images.parse_args(
        [
            "--shards",
            str(root / "00000.tar"),
            "--model",
            TINY_MODEL,
            "--pretrained",
            str(init),
            "--output",
            str(out),
            "--workers",
            str(workers),
            "--batch-size",
            "4",
        ]
    )
    out.mkdir()
    embedder = embed_images.ShardEmbedder(args)
    if device_decode:
        embedder.device_decoder = embedder.make_device_decoder()  # what --decode-device cuda builds, on the CPU
    caplog.clear()
    embed_images.embed_shards(args, embedder, [str(root / "00000.tar")])
    return {s["__key__"]: s for s in read_tar_samples(out / "00000.tar")}, caplog.text


@pytest.mark.parametrize("workers", [0, 1])
def test_the_tool_decodes_batched_as_the_cpu_path_decodes(odd_shard, tmp_path, caplog, workers):
    """Decoded or skipped as without the option, every image counted, the bad ones warned by key; the
    embeddings (tiny model, 32 px) close to the CPU path's."""
    root, init = odd_shard
    caplog.set_level(logging.INFO)
    open_clip.add_model_config(str(TINY_CONFIG))
    cpu, _ = run_tool(root, init, tmp_path / "cpu", False, workers, caplog)
    batched, log = run_tool(root, init, tmp_path / "batched", True, workers, caplog)
    kinds = dict(zip(sorted(cpu), odd_images()))
    assert sorted(batched) == sorted(cpu)
    for key, kind in kinds.items():
        assert ("img_emb.npy" in batched[key]) == ("img_emb.npy" in cpu[key]) == (kind not in UNDECODABLE), kind
        assert batched[key]["jpg"] == cpu[key]["jpg"]
        if kind in UNDECODABLE:
            assert f"sample '{key}': image not decodable" in log
            continue
        a, b = (torch.from_numpy(np.load(io.BytesIO(s[key]["img_emb.npy"]))).float() for s in (batched, cpu))
        if kind in ROUTED:
            assert torch.equal(a, b), kind
        else:
            assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99, kind
    assert "7/9 samples embedded" in log
    done = re.search(r"; decoding on cpu [0-9.]+s \((.*)\)$", log, re.M)
    assert done and done.group(1) == "5 on cpu, 2 not decodable, 1 on the CPU: CMYK JPEG, 1 on the CPU: not a JPEG", (
        log[-2000:]
    )


def test_decode_device_cuda_needs_cuda_and_the_uint8_transfer(monkeypatch, capsys, tmp_path):
    base = [
        "--shards",
        str(tmp_path / "none.tar"),
        "--model",
        TINY_MODEL,
        "--model-config",
        str(TINY_CONFIG),
        "--decode-device",
        "cuda",
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert embed_images.main(base) == 2
    assert re.search(
        r"^paraclip-embed-images: error: --decode-device cuda: torch \S+ finds no CUDA device.*; use "
        r"--decode-device cpu$",
        capsys.readouterr().err,
        re.M,
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert embed_images.main(base + ["--device", "cpu"]) == 2
    assert (
        "error: --decode-device cuda decodes beside the image tower: it needs a CUDA --device, not cpu"
        in capsys.readouterr().err
    )
    assert embed_images.main(base + ["--transfer", "float32"]) == 2
    assert (
        "error: --decode-device cuda hands the image tower uint8 images: it can't go with --transfer float32"
        in capsys.readouterr().err
    )


def test_a_transform_that_does_not_run_on_tensors_alike_is_refused_at_start(tmp_path):
    """The probe at start: a transform whose steps before to-tensor are PIL-only stops the tool, naming it."""
    init = save_init_checkpoint(tmp_path / "init.pt", seed=0)
    args = embed_images.parse_args(["--shards", "x", "--model", TINY_MODEL, "--pretrained", str(init)])
    open_clip.add_model_config(str(TINY_CONFIG))
    embedder = embed_images.ShardEmbedder(args)
    steps = embedder.preprocess.transforms
    embedder.preprocess.transforms = [steps[0], lambda image: image.rotate(90), *steps[1:]]  # PIL only
    embedder.worker_preprocess, embedder.normalize = embed_images.split_preprocess(embedder.preprocess)
    with pytest.raises(
        ValueError,
        match=r"^--decode-device cpu: the image transform of paraclip-tiny on cpu: "
        r"fails on tensors \(",
    ):
        embedder.make_device_decoder()
