"""JPEG decoding on the image tower's device, in batches: ``paraclip-embed-images --decode-device cuda``.

``DeviceDecoder`` decodes a batch of image bytes with ``torchvision.io.decode_jpeg(list, device=...)``
(nvJPEG on CUDA; libjpeg on the CPU, which the tests use) and runs the image transform's steps before
to-tensor (open_clip's Resize, CenterCrop: torchvision transforms, bicubic with antialias, on uint8
tensors) on that device, so the images leave it as the uint8 [N, 3, H, W] batch that
``images.finish_preprocess`` turns into the tower's input. An image it does not give to
``decode_jpeg`` (``jpeg_problem``: not a JPEG, e.g. a PNG in a ``jpg`` member; not 8-bit; CMYK/YCCK;
arithmetic-coded; no end-of-image marker, i.e. truncated), or one ``decode_jpeg`` refuses (nvJPEG
rejects progressive or unusual sampling in some versions), goes to the CPU path (PIL, as images.py
decodes without this option): decoded there, or not decodable and skipped. Every image is counted in
``counts``: decoded on the device, on the CPU (with why it went there), or not decodable.

The values are close to the CPU path's, not equal: PIL's bicubic resize works in fixed point, the
tensor resize in float (rounded back to uint8), and nvJPEG's IDCT and chroma upsampling differ from
libjpeg-turbo's by a level here and there. tests/test_device_decode.py states the tolerance.
"""

import collections
import warnings

import torch
from torchvision import io as tvio
from torchvision import transforms

# start-of-frame markers: baseline, extended sequential, progressive (Huffman-coded); the others are
# lossless, hierarchical or arithmetic-coded, which decode_jpeg does not take
HUFFMAN_FRAMES = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
STANDALONE = {0x01, *range(0xD0, 0xDA)}  # markers without a length field (TEM, RSTn, SOI, EOI)


def jpeg_problem(data):
    """None where ``data`` is an 8-bit JPEG of 1 or 3 components, Huffman-coded, that ends in its
    end-of-image marker; else why it goes to the CPU (a short phrase). Reads the marker segments up to
    the frame header only."""
    if data[:2] != b"\xff\xd8":
        return "not a JPEG"
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return "no end-of-image marker (truncated?)"
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return "damaged JPEG header"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in STANDALONE:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in HUFFMAN_FRAMES:
            if i + 10 > len(data):
                break
            bits, components = data[i + 4], data[i + 9]
            if bits != 8:
                return f"{bits}-bit JPEG"
            if components not in (1, 3):
                return "CMYK JPEG" if components == 4 else f"JPEG of {components} components"
            return None
        if marker in OTHER_FRAMES:
            return "lossless, hierarchical or arithmetic-coded JPEG"
        if marker == 0xDA or length < 2:
            break
        i += 2 + length
    return "damaged JPEG header"


def tensor_steps(preprocess):
    """The steps of an open_clip image transform before its to-tensor and Normalize, as one transform of
    uint8 tensors (torchvision's Resize and CenterCrop take tensors; MaybeConvertMode passes them)."""
    return transforms.Compose(preprocess.transforms[:-2])


class DeviceDecoder:
    """Decode and resize images on ``device`` in batches; see the module docstring."""

    def __init__(self, steps, device, cpu_decode):
        """``steps``: ``tensor_steps`` of the transform; ``cpu_decode(bytes)``: the CPU path's uint8
        [3, H, W] image (raises where it can't decode)."""
        self.steps, self.device, self.cpu_decode = steps, torch.device(device), cpu_decode
        self.counts = collections.Counter()

    def __call__(self, items):
        """(indices whose image decoded, their uint8 [N, 3, H, W] images on the device or None,
        {index: why not decodable}) of [(index, image bytes)], in the order given."""
        to_device, to_cpu = [], []
        for i, data in items:
            problem = jpeg_problem(data)
            (to_cpu if problem else to_device).append((i, data, problem))
        decoded, refused = self.decode(to_device)
        images = self.transform(decoded)
        failed = {}
        for i, data, problem in to_cpu + refused:
            try:
                images[i] = self.cpu_decode(data).to(self.device)
                self.counts[f"on the CPU: {problem}"] += 1
            except Exception as e:  # the CPU path's verdict: not decodable
                failed[i] = e
                self.counts["not decodable"] += 1
        self.counts[f"on {self.device.type}"] += len(decoded)
        rows = [i for i, _ in items if i in images]
        return rows, torch.stack([images[i] for i in rows]) if rows else None, failed

    def decode(self, items):
        """({index: uint8 [C, H, W] on the device}, [(index, bytes, why refused)]): one batched call, or,
        where it raises (it decodes all or nothing), one call per image."""
        if not items:
            return {}, []
        data = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d, _ in items]
        try:
            return dict(zip([i for i, _, _ in items], self.decode_jpeg(data))), []
        except RuntimeError:
            pass
        decoded, refused = {}, []
        for (i, d, _), tensor in zip(items, data):
            try:
                decoded[i] = self.decode_jpeg([tensor])[0]
            except RuntimeError as e:
                refused.append((i, d, f"decode_jpeg on {self.device.type} refused it ({first_line(e)})"))
        return decoded, refused

    def decode_jpeg(self, tensors):
        with warnings.catch_warnings():  # torchvision 0.29 marks its image decoders as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            return tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=self.device)

    def transform(self, decoded):
        """{index: transformed uint8 [3, H, W]}: images of one size resized together."""
        by_size = collections.defaultdict(list)
        for i, image in decoded.items():
            by_size[tuple(image.shape)].append(i)
        out = {}
        for indices in by_size.values():
            out.update(zip(indices, self.steps(torch.stack([decoded[i] for i in indices]))))
        return out


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
