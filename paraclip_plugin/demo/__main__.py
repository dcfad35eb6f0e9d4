"""``python -m paraclip_plugin.demo``: the whole ParaCLIP pipeline on an embedded synthetic world.

Stages (one line each): build the world's four-field shards -> train a baseline CLIP with stock
open_clip_train on the noisy captions -> fine-tune it with ``--paraclip-loss`` under torchrun (2
processes) -> evaluate both checkpoints on held-out paraphrased queries -> table, JSON and chart.
With --runs N the first four stages run once per seed and the report gives the mean and range.
No network, no GPU; the chart needs matplotlib (pip install -e '.[plot]'), checked before any work.
``make demo`` runs it after setting up the environment and the patch.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

TINY_CONFIG = Path(__file__).resolve().parents[1] / "model_configs" / "paraclip-tiny.json"
MODEL = "paraclip-tiny"
PROGRESS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \(\d+%\)\]")
LOSS = re.compile(r" Loss: ([-+0-9.e]+) \(")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m paraclip_plugin.demo", description=__doc__, formatter_class=_HelpFormatter
    )
    p.add_argument("--output", default="demo_output", help="folder for the world, logs, checkpoints and results")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run (world and training)")
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="independent runs with seeds SEED, SEED+1, ...: each builds its own world, baseline and "
        "ParaCLIP model; the report gives the mean and the range (smallest, largest run)",
    )
    p.add_argument("--num-train", type=int, default=4096, help="training samples in the synthetic world")
    p.add_argument("--num-shards", type=int, default=8, help="training shards")
    p.add_argument("--num-eval", type=int, default=100, help="held-out query/paraphrase pairs (and gallery images)")
    p.add_argument("--baseline-epochs", type=int, default=6, help="epochs of the baseline CLIP (both towers)")
    p.add_argument("--baseline-lr", type=float, default=2e-3, help="peak learning rate of the baseline")
    # A random-init tiny text tower has never seen the synonyms: their token embeddings must be learned
    # from scratch, which takes a few hundred steps at ~1e-3 (the paper's 5e-7 is for a pretrained CLIP).
    p.add_argument("--paraclip-epochs", type=int, default=12, help="epochs of ParaCLIP fine-tuning (text tower)")
    p.add_argument("--paraclip-lr", type=float, default=2e-3, help="peak learning rate of ParaCLIP fine-tuning")
    p.add_argument(
        "--ablation",
        metavar="TERMS",
        default=None,
        help="also fine-tune each baseline with --paraclip-terms TERMS (e.g. image:para2, a row of the "
        "paper's Table 2) and report it beside the full loss",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="per process; the baseline's single process takes NPROC times this"
    )
    p.add_argument("--workers", type=int, default=1, help="data loader workers per process")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes for the ParaCLIP stage")
    return p.parse_args(argv)


def stage(number, text):
    print(f"[{number}/5] {text}", flush=True)


def train(command, logs, name, epochs, label):
    """Run one open_clip_train job, count its training samples on a progress bar, return [(step, loss)] from its log."""
    # One thread per process: on a busy machine several OpenMP threads per process slow training down.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    tail = []
    with (
        tqdm(desc=label, unit=" samples", leave=False, dynamic_ncols=True) as bar,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc,
    ):
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            progress = PROGRESS.search(line)
            if progress:
                # "Train Epoch: E [seen/per_epoch (p%)]": samples seen in epoch E (0-based), all processes together
                epoch, seen, per_epoch = map(int, progress.groups())
                bar.total = per_epoch * epochs
                bar.n = epoch * per_epoch + seen
                bar.refresh()
    log = Path(logs) / name / "out.log"
    if proc.returncode != 0:
        sys.stderr.write("".join(tail))
        raise SystemExit(f"demo: {label} failed (exit {proc.returncode}); log: {log}")
    # one "Train Epoch" line per step (--log-every-n-steps 1), total loss at " Loss: "
    losses = [
        float(m.group(1)) for m in map(LOSS.search, log.read_text().splitlines()) if m and "Train Epoch" in m.string
    ]
    return list(enumerate(losses, start=1))


def free_port():
    """A TCP port free right now on 127.0.0.1, so concurrent demos (or test runs) don't share torchrun's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_flags(world, logs, name, batch_size, lr, epochs, workers, seed):
    return [
        "--train-data",
        world.train_shards,
        "--dataset-type",
        "webdataset",
        "--model",
        MODEL,
        "--model-config",
        str(TINY_CONFIG),
        # open_clip_train's default --precision amp is float16 autocast, ~10x slower than float32 on a CPU
        "--batch-size",
        str(batch_size),
        "--lr",
        str(lr),
        "--wd",
        "0.001",
        "--warmup",
        "10",
        "--precision",
        "fp32",
        "--epochs",
        str(epochs),
        "--workers",
        str(workers),
        "--device",
        "cpu",
        "--seed",
        str(seed),
        "--logs-dir",
        str(logs),
        "--name",
        name,
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
    ]


def run_once(args, seed, out, label=""):
    """World, baseline, ParaCLIP fine-tuning (and the ablation) and evaluation for one seed.

    Returns ([baseline result, ParaCLIP result, ablation result if any], {title: loss curve}).
    """
    from paraclip_plugin.demo.world import build_world
    from paraclip_plugin.eval.paraphrased_retrieval import evaluate_checkpoint

    logs = out / "logs"
    stage(1, f"{label}building the synthetic world (seed {seed}) in {out / 'world'}")
    world = build_world(
        out / "world", num_train=args.num_train, num_shards=args.num_shards, num_eval=args.num_eval, seed=seed
    )
    print(
        f"      {world.num_train} training samples in {world.num_shards} four-field shards, "
        f"{world.num_eval} held-out query/paraphrase pairs"
    )

    run_id = time.strftime("%Y%m%d-%H%M%S")
    baseline, paraclip = f"baseline-{run_id}", f"paraclip-{run_id}"
    global_batch = args.batch_size * args.nproc
    stage(
        2,
        f"{label}training the baseline CLIP with stock open_clip_train on the noisy captions "
        f"({args.baseline_epochs} epochs of {args.num_train // global_batch} steps, lr {args.baseline_lr:g})",
    )
    baseline_curve = train(
        [
            sys.executable,
            "-m",
            "open_clip_train.main",
            *training_flags(
                world, logs, baseline, global_batch, args.baseline_lr, args.baseline_epochs, args.workers, seed
            ),
        ],
        logs,
        baseline,
        args.baseline_epochs,
        "baseline",
    )
    baseline_ckpt = logs / baseline / "checkpoints" / f"epoch_{args.baseline_epochs}.pt"

    stage(
        3,
        f"{label}fine-tuning it with --paraclip-loss --frozen-visual under torchrun ({args.nproc} processes, "
        f"{args.paraclip_epochs} epochs of {args.num_train // global_batch} steps, lr {args.paraclip_lr:g})"
        + (f"; then the same with --paraclip-terms {args.ablation}" if args.ablation else ""),
    )
    finetuned = {"ParaCLIP fine-tuning": (paraclip, [])}
    if args.ablation:
        finetuned[f"ParaCLIP, {args.ablation} only"] = (f"ablation-{run_id}", ["--paraclip-terms", args.ablation])
    curves = {"baseline CLIP": baseline_curve}
    for title, (name, terms) in finetuned.items():
        curves[title] = train(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(args.nproc),
                "--master_port",
                str(free_port()),
                "-m",
                "open_clip_train.main",
                *training_flags(
                    world, logs, name, args.batch_size, args.paraclip_lr, args.paraclip_epochs, args.workers, seed
                ),
                "--pretrained",
                str(baseline_ckpt),
                "--paraclip-loss",
                "--frozen-visual",
                *terms,
            ],
            logs,
            name,
            args.paraclip_epochs,
            "paraclip" if not terms else f"{args.ablation} only",
        )
    checkpoints = [baseline_ckpt] + [
        logs / name / "checkpoints" / f"epoch_{args.paraclip_epochs}.pt" for name, _ in finetuned.values()
    ]

    stage(4, f"{label}evaluating the checkpoints on held-out paraphrased queries (AO@10, JS@10, recall@k)")
    results = [
        evaluate_checkpoint(
            MODEL, str(ckpt), world.eval_pairs, world.eval_images, k=10, model_config=str(TINY_CONFIG), device="cpu"
        )
        for ckpt in checkpoints
    ]
    return results, curves


def run_summary(results):
    """One line: AO@k and recall@k of both query kinds, before -> after, for a run's results."""
    before, after = results[:2]
    k = before["k"]
    return ", ".join(
        [f"AO@{k} {before[f'AO@{k}']:.3f} -> {after[f'AO@{k}']:.3f}"]
        + [
            f"recall@{k} {kind} {before[kind][f'recall@{k}']:.2f} -> {after[kind][f'recall@{k}']:.2f}"
            for kind in ("paraphrased", "original")
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    if args.runs < 1:
        raise SystemExit(f"demo: --runs must be at least 1, got {args.runs}")
    from paraclip_plugin.extras import require_extra

    require_extra("paraclip_plugin.demo", "the demo's chart (results.png)", "plot")  # before any training
    if args.ablation:
        from paraclip_plugin.train.loss import parse_terms

        try:
            parse_terms(args.ablation)
        except ValueError as e:
            raise SystemExit(f"demo: --ablation: {e}") from None
    from paraclip_plugin.demo.report import write_report

    out = Path(args.output).resolve()
    started = time.time()
    runs = []
    for number in range(args.runs):
        seed = args.seed + number
        label = f"run {number + 1}/{args.runs}: " if args.runs > 1 else ""
        try:
            runs.append((seed, *run_once(args, seed, out / f"seed-{seed}" if args.runs > 1 else out, label)))
        except FileExistsError as e:
            raise SystemExit(f"demo: {e}") from None
        print("      " + run_summary(runs[-1][1]), flush=True)

    stage(5, f"report in {out}")
    names = ("baseline CLIP", "after ParaCLIP") + ((f"{args.ablation} only",) if args.ablation else ())
    write_report(
        [(seed, *results) for seed, results, _ in runs],
        {
            f"{name} (seed {seed})" if args.runs > 1 else name: curve
            for seed, _, curves in runs
            for name, curve in curves.items()
        },
        out,
        names=names,
    )
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
