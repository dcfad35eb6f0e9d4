#!/usr/bin/env python
"""Run a module as ``python -m`` would, then print the CUDA caching allocator's peaks.

    torchrun --nproc_per_node 1 scripts/peak_memory.py open_clip_train.main --train-data ...

prints, when the module ends (or fails) in a process that used CUDA, one line
``peak_memory: max_memory_allocated X GiB, max_memory_reserved Y GiB`` (torch.cuda.max_memory_allocated:
the most tensor memory held at once; reserved: what the allocator held from the driver). bench_e2e.py
reads it from each training run's log.
"""

import runpy
import sys


def report():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print(
            f"peak_memory: max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB, "
            f"max_memory_reserved {torch.cuda.max_memory_reserved() / 2**30:.3f} GiB",
            flush=True,
        )


def main():
    if len(sys.argv) < 2:
        raise SystemExit("usage: peak_memory.py MODULE [ARGS...]")
    sys.argv = sys.argv[1:]
    try:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    finally:
        report()


if __name__ == "__main__":
    main()
