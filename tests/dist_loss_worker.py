"""Run under torchrun (gloo): ParaCLIP loss and text-tower gradients of a DDP model on 2 ranks, each
holding half of one global batch, against one process computing the same global batch alone.

argv: OUT.pt LOCAL_LOSS(0|1) GATHER_WITH_GRAD(0|1). Rank 0 saves both results to OUT.pt.
"""

import sys

import open_clip
import torch
import torch.distributed as dist

from paraclip_plugin.train.loss import ParaCLIPLoss, parse_terms, DEFAULT_TERMS
from paraclip_plugin.train.model import enable_paraphrase_forward, freeze_visual

TINY_CONFIG, OUT, LOCAL_LOSS, GATHER_WITH_GRAD = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
GLOBAL_BATCH = 8


def make_model():
    torch.manual_seed(0)
    model = open_clip.create_model("paraclip-tiny", output_dict=True)
    freeze_visual(model)
    return enable_paraphrase_forward(model)


def make_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    texts = torch.randint(1, 49000, (GLOBAL_BATCH, 3, 32), generator=g)
    texts[:, :, 0] = 49406
    texts[:, :, 12:] = 0
    texts[:, :, 11] = 49407  # EOT: open_clip pools at argmax token id
    return images, texts


def loss_and_grads(model, loss_fn, images, texts):
    out = model(images, texts)
    losses = loss_fn(**out, output_dict=True)
    total = sum(losses.values())
    total.backward()
    module = getattr(model, "module", model)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return total.detach(), grads


def main():
    open_clip.add_model_config(TINY_CONFIG)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    terms = parse_terms(DEFAULT_TERMS)
    images, texts = make_batch()
    half = GLOBAL_BATCH // world

    ddp = torch.nn.parallel.DistributedDataParallel(make_model())
    loss_fn = ParaCLIPLoss(terms, local_loss=LOCAL_LOSS, gather_with_grad=GATHER_WITH_GRAD, rank=rank, world_size=world)
    local, grads = loss_and_grads(
        ddp, loss_fn, images[rank * half : (rank + 1) * half], texts[rank * half : (rank + 1) * half]
    )
    # with --local-loss each rank's loss covers its own rows: the global loss is their mean
    dist.all_reduce(local)
    distributed_loss = local / world

    if rank == 0:
        single_loss, single_grads = loss_and_grads(make_model(), ParaCLIPLoss(terms), images, texts)
        torch.save(
            dict(
                distributed_loss=distributed_loss,
                distributed_grads=grads,
                single_loss=single_loss,
                single_grads=single_grads,
                world=world,
            ),
            OUT,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
