"""--paraclip-loss-block-size: BlockedClipLoss gives open_clip's ClipLoss's loss and gradients (features, logit
scale, logit bias; both directions; one process and 2 gloo ranks with --local-loss / --gather-with-grad), and
keeps no N x N tensor for backward."""

import pytest
import torch
from open_clip.loss import ClipLoss
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import BIN, REPO, free_port, run
from paraclip_plugin.train.loss import (
    BlockedClipLoss,
    BlockedCrossEntropy,
    DEFAULT_TERMS,
    ParaCLIPLoss,
    blocked_cross_entropy,
    parse_terms,
)

WORKER = REPO / "tests" / "dist_blocked_loss_worker.py"
# float64: the blocked sums are the unblocked ones in another order, equal to a few ulps of the loss (~1e-15)
TOL = dict(rtol=1e-12, atol=1e-13)


def leaves(n, dim=8, seed=0, bias=None):
    g = torch.Generator().manual_seed(seed)
    images, texts = (torch.randn(n, dim, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    return [images, texts, scale] + ([torch.tensor(bias, dtype=torch.float64, requires_grad=True)] if bias else [])


def loss_and_grads(loss_fn, inputs):
    loss = loss_fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("block", [1, 5, 37, 64])
@pytest.mark.parametrize("bias", [None, -1.5])
def test_blocked_clip_loss_gives_clip_loss_and_its_gradients(block, bias):
    inputs = leaves(37, bias=bias)  # 37 rows: the last block is short for every block size but 1 and 37
    loss, grads = loss_and_grads(ClipLoss(), inputs)
    blocked_loss, blocked_grads = loss_and_grads(BlockedClipLoss(block), inputs)
    torch.testing.assert_close(blocked_loss, loss, **TOL)
    for name, got, want in zip(("image", "text", "logit_scale", "logit_bias"), blocked_grads, grads):
        torch.testing.assert_close(got, want, **TOL, msg=name)
    assert grads[2].abs() > 1e-3 and grads[0].abs().max() > 1e-3  # gradients that could differ


def test_each_direction_is_its_own_cross_entropy():
    """image->text rows and text->image rows: each direction alone equals torch's cross entropy (an
    asymmetric check: swapping x and y gives another value), with a row offset as --local-loss uses."""
    x, y, scale = leaves(6, seed=1)
    wide = torch.cat([torch.randn(4, 8, dtype=torch.float64), y.detach()]).requires_grad_()  # targets at 4..9
    for a, b, offset in ((x, y, 0), (y, x, 0), (x, wide, 4)):
        want = torch.nn.functional.cross_entropy(scale * a @ b.T, torch.arange(6) + offset)
        got = blocked_cross_entropy(a, b, scale, offset=offset, block=4)
        torch.testing.assert_close(got, want, **TOL)
        for g_got, g_want in zip(torch.autograd.grad(got, [a, b, scale]), torch.autograd.grad(want, [a, b, scale])):
            torch.testing.assert_close(g_got, g_want, **TOL)
    assert not torch.allclose(blocked_cross_entropy(x, y, scale), blocked_cross_entropy(y, wide[4:], scale) + 1)
    with pytest.raises(ValueError, match="targets 5..10 beyond the 10 rows of y"):
        blocked_cross_entropy(x, wide, scale, offset=5)


def test_gradcheck():
    """torch's numerical check of the hand-written backward: x's 7 rows against y's 9, targets y[2..8]."""
    x, _, scale, bias = leaves(7, dim=3, seed=2, bias=0.3)
    y = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: BlockedCrossEntropy.apply(*t, 2, 3), (x, y, scale, bias))


def test_paraclip_loss_in_blocks_matches_every_term():
    g = torch.Generator().manual_seed(3)
    features = [torch.randn(20, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4)]
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    terms = parse_terms(DEFAULT_TERMS)
    plain = ParaCLIPLoss(terms, [1.0, 0.5, 2.0])(*features, scale, output_dict=True)
    blocked_fn = ParaCLIPLoss(terms, [1.0, 0.5, 2.0], block_size=6)
    assert isinstance(blocked_fn.clip_loss, BlockedClipLoss)
    blocked = blocked_fn(*features, scale, output_dict=True)
    assert blocked.keys() == plain.keys() == {"image_para2_loss", "caption_para1_loss", "para1_para2_loss"}
    for key in plain:
        torch.testing.assert_close(blocked[key], plain[key], **TOL)
    want = torch.autograd.grad(sum(plain.values()), [*features, scale])
    for got, expected in zip(torch.autograd.grad(sum(blocked.values()), [*features, scale]), want):
        torch.testing.assert_close(got, expected, **TOL)


def test_bfloat16_autocast_follows_clip_loss_within_bfloat16_rounding():
    """Under autocast the logits come from bf16 matmuls (as in ClipLoss) and the cross entropy is float32."""
    g = torch.Generator().manual_seed(4)
    images, texts = (
        torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=-1).requires_grad_() for _ in range(2)
    )
    scale = torch.tensor(14.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, blocked = ClipLoss()(images, texts, scale), BlockedClipLoss(16)(images, texts, scale)
    assert loss.dtype == blocked.dtype == torch.float32
    torch.testing.assert_close(blocked, loss, rtol=1e-5, atol=1e-5)  # the same bf16 logits, float32 sums
    for got, want in zip(
        torch.autograd.grad(blocked, [images, texts, scale]), torch.autograd.grad(loss, [images, texts, scale])
    ):
        assert got.dtype == want.dtype
        assert (got - want).norm() <= 1e-2 * want.norm()  # bf16 (2^-9) rounding of the backward matmuls


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op creates while the mode is on (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def saved_and_created(loss_fn, n, dim):
    """(elements of every tensor kept for backward, the largest tensor made in forward + backward)."""
    images, texts, scale = leaves(n, dim)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with LargestTensor() as largest:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(images, texts, scale)
        loss.backward()
    return saved, largest.largest


def test_blocked_loss_keeps_no_n_by_n_tensor():
    n, dim, block = 256, 16, 32
    saved, largest = saved_and_created(BlockedClipLoss(block), n, dim)
    assert max(saved) <= n * dim  # the features (and the per-row logsumexp): nothing of size n x n
    assert sum(saved) <= 2 * (2 * n * dim + n + 2)  # per direction: both feature sets, logsumexp, scale, bias
    assert largest <= block * n  # one block of logits at a time, in forward and in backward
    saved, largest = saved_and_created(ClipLoss(), n, dim)  # the check can fail: ClipLoss keeps its logits
    assert max(saved) >= n * n and largest >= n * n


def test_two_ranks_give_clip_loss_and_its_gradients_for_every_distributed_mode(tmp_path):
    """--local-loss and --gather-with-grad as open_clip implements them (its gather_features, reused):
    on each of 2 gloo ranks, the loss and this rank's gradients equal ClipLoss's."""
    run([BIN / "torchrun", "--nproc_per_node", 2, "--master_port", free_port(), WORKER, tmp_path / "r", 3])
    for rank in (0, 1):
        results = torch.load(tmp_path / f"r.{rank}.pt")
        assert len(results) == 4
        for mode, r in results.items():
            (loss, grads), (blocked_loss, blocked_grads) = r["clip"], r["blocked"]
            torch.testing.assert_close(blocked_loss, loss, **TOL, msg=str(mode))
            for name, got, want in zip(("image", "text", "logit_scale", "logit_bias"), blocked_grads, grads):
                torch.testing.assert_close(got, want, **TOL, msg=f"{mode} {name}")
            assert grads[0].abs().max() > 1e-3, mode
