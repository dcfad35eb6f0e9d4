"""``python -m paraclip_plugin.demo``: the whole ParaCLIP pipeline on an embedded synthetic world.

Stages (one line each): build the world's four-field shards -> train a baseline CLIP with stock
open_clip_train on the noisy captions -> fine-tune it with ``--paraclip-loss`` under torchrun (2
processes) -> evaluate both checkpoints on held-out paraphrased queries -> table, JSON and chart.
No network, no GPU. ``make demo`` runs it after setting up the environment and the patch.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

TINY_CONFIG = Path(__file__).resolve().parents[1] / "model_configs" / "paraclip-tiny.json"
MODEL = "paraclip-tiny"
PERCENT = re.compile(r"Train Epoch: (\d+) \[\s*\d+/\d+ \((\d+)%\)\]")
LOSS = re.compile(r" Loss: ([-+0-9.e]+) \(")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m paraclip_plugin.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="demo_output", help="folder for the world, logs, checkpoints and results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=4096, help="training samples in the synthetic world")
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument("--num-eval", type=int, default=100, help="held-out query/paraphrase pairs")
    p.add_argument("--baseline-epochs", type=int, default=6)
    p.add_argument("--baseline-lr", type=float, default=2e-3)
    p.add_argument("--paraclip-epochs", type=int, default=2)
    p.add_argument("--paraclip-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes for the ParaCLIP stage")
    return p.parse_args(argv)


def stage(number, text):
    print(f"[{number}/5] {text}", flush=True)


def train(command, logs, name, epochs, label):
    """Run one open_clip_train job, show a progress bar from its output, return [(step, loss)] from its log."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    tail = []
    with tqdm(total=100 * epochs, desc=label, unit="%", leave=False) as bar, \
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            progress = PERCENT.search(line)
            if progress:
                bar.n = 100 * int(progress.group(1)) + int(progress.group(2))
                bar.refresh()
    log = Path(logs) / name / "out.log"
    if proc.returncode != 0:
        sys.stderr.write("".join(tail))
        raise SystemExit(f"demo: {label} failed (exit {proc.returncode}); log: {log}")
    # one "Train Epoch" line per step (--log-every-n-steps 1), total loss at " Loss: "
    losses = [float(m.group(1)) for m in map(LOSS.search, log.read_text().splitlines()) if m and "Train Epoch" in m.string]
    return list(enumerate(losses, start=1))


def training_flags(world, logs, name, batch_size, lr, epochs, workers, seed):
    return [
        "--train-data", world.train_shards, "--dataset-type", "webdataset",
        "--model", MODEL, "--model-config", str(TINY_CONFIG),
        "--batch-size", str(batch_size), "--lr", str(lr), "--wd", "0.001", "--warmup", "10",
        "--epochs", str(epochs), "--workers", str(workers), "--device", "cpu", "--seed", str(seed),
        "--logs-dir", str(logs), "--name", name, "--log-every-n-steps", "1", "--save-frequency", "0",
    ]


def main(argv=None):
    args = parse_args(argv)
    from paraclip_plugin.extras import require_extra
    require_extra("paraclip_plugin.demo", "the demo's chart (results.png)", "plot")
    from paraclip_plugin.demo.world import build_world
    from paraclip_plugin.eval.paraphrased_retrieval import evaluate_checkpoint

    out = Path(args.output).resolve()
    logs = out / "logs"
    started = time.time()
    stage(1, f"building the synthetic world in {out / 'world'}")
    world = build_world(out / "world", num_train=args.num_train, num_shards=args.num_shards,
                        num_eval=args.num_eval, seed=args.seed)
    print(f"      {world.num_train} training samples in {world.num_shards} four-field shards, "
          f"{world.num_eval} held-out query/paraphrase pairs")

    run_id = time.strftime("%Y%m%d-%H%M%S")
    baseline, paraclip = f"baseline-{run_id}", f"paraclip-{run_id}"
    stage(2, f"training the baseline CLIP with stock open_clip_train on the noisy captions "
             f"({args.baseline_epochs} epochs)")
    baseline_curve = train(
        [sys.executable, "-m", "open_clip_train.main",
         *training_flags(world, logs, baseline, args.batch_size * args.nproc, args.baseline_lr,
                         args.baseline_epochs, args.workers, args.seed)],
        logs, baseline, args.baseline_epochs, "baseline")
    baseline_ckpt = logs / baseline / "checkpoints" / f"epoch_{args.baseline_epochs}.pt"

    stage(3, f"fine-tuning it with --paraclip-loss --frozen-visual under torchrun ({args.nproc} processes, "
             f"{args.paraclip_epochs} epochs)")
    paraclip_curve = train(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
         "-m", "open_clip_train.main",
         *training_flags(world, logs, paraclip, args.batch_size, args.paraclip_lr, args.paraclip_epochs,
                         args.workers, args.seed),
         "--pretrained", str(baseline_ckpt), "--paraclip-loss", "--frozen-visual"],
        logs, paraclip, args.paraclip_epochs, "paraclip")
    paraclip_ckpt = logs / paraclip / "checkpoints" / f"epoch_{args.paraclip_epochs}.pt"

    stage(4, "evaluating both checkpoints on held-out paraphrased queries (AO@10, JS@10, recall@k)")
    before, after = (evaluate_checkpoint(MODEL, str(ckpt), world.eval_pairs, world.eval_images, k=10,
                                         model_config=str(TINY_CONFIG), device="cpu")
                     for ckpt in (baseline_ckpt, paraclip_ckpt))

    stage(5, f"report in {out}")
    from paraclip_plugin.demo.report import write_report
    write_report(before, after, {"baseline CLIP": baseline_curve, "ParaCLIP fine-tuning": paraclip_curve}, out,
                 names=("baseline CLIP", "after ParaCLIP"))
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
