"""Run under torchrun (gloo): on each rank, open_clip's ClipLoss and BlockedClipLoss over this rank's rows of
one global batch of float64 features, for every --local-loss / --gather-with-grad combination; the loss and
the gradients of this rank's features, the logit scale and bias, each way.

argv: OUT_PREFIX BLOCK. Rank R saves {combination: {"clip": (loss, grads), "blocked": (loss, grads)}} to
OUT_PREFIX.R.pt.
"""

import sys

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss

from paraclip_plugin.train.loss import BlockedClipLoss

OUT, BLOCK = sys.argv[1], int(sys.argv[2])
GLOBAL_BATCH, DIM = 14, 6


def leaves(rank, world):
    g = torch.Generator().manual_seed(0)  # every rank draws the same global batch and keeps its rows
    images, texts = (torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64) for _ in range(2))
    half = GLOBAL_BATCH // world
    mine = slice(rank * half, (rank + 1) * half)
    return [
        images[mine].clone().requires_grad_(),
        texts[mine].clone().requires_grad_(),
        torch.tensor(2.5, dtype=torch.float64, requires_grad=True),
        torch.tensor(-0.7, dtype=torch.float64, requires_grad=True),
    ]


def loss_and_grads(loss_fn, rank, world):
    inputs = leaves(rank, world)
    loss = loss_fn(*inputs)
    loss.backward()
    return loss.detach(), [x.grad for x in inputs]


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            kwargs = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
            results[local_loss, gather_with_grad] = {
                "clip": loss_and_grads(ClipLoss(**kwargs), rank, world),
                "blocked": loss_and_grads(BlockedClipLoss(BLOCK, **kwargs), rank, world),
            }
    torch.save(results, f"{OUT}.{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
