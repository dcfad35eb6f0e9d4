"""``paraclip-eval``: one subcommand per evaluation task.

Each task adds a subparser with ``_add_<task>`` and sets ``run`` to a function of the parsed args
that returns an exit code. User errors (``InputError``) print one line and exit with status 2, like
argparse's own usage errors; anything else is a bug and keeps its traceback.
"""
import argparse
import json
import os
import sys

from ..shards import atomic_write_text
from .paraphrased_retrieval import InputError, evaluate_checkpoint

PROG = "paraclip-eval"


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_model_arguments(parser):
    """Options every task needs to load one open_clip model."""
    parser.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32 or paraclip-tiny")
    parser.add_argument("--pretrained", default=None,
                        help="checkpoint file (open_clip_train's epoch_N.pt works) or open_clip tag; "
                             "omitted: random initialisation")
    parser.add_argument("--model-config", default=None,
                        help="model config JSON registered with open_clip.add_model_config before loading")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--output", default=None, help="also write the result JSON to this file")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def _add_paraphrased_retrieval(subparsers):
    parser = subparsers.add_parser(
        "paraphrased-retrieval",
        help="AO@k / JS@k between rankings of queries and their paraphrases, and recall@1/5/10",
        description="Gallery: all distinct images of --images referenced by the pairs file.")
    _add_model_arguments(parser)
    parser.add_argument("--pairs", required=True,
                        help="JSON lines with 'query', 'paraphrase' and gold 'image' (file name in --images)")
    parser.add_argument("--images", required=True, help="folder holding the images the pairs name")
    parser.add_argument("--k", type=positive_int, default=10, help="depth of AO@k and JS@k (default 10)")
    parser.set_defaults(run=_run_paraphrased_retrieval)


def _run_paraphrased_retrieval(args):
    result = evaluate_checkpoint(
        args.model, args.pretrained, args.pairs, args.images, k=args.k, model_config=args.model_config,
        device=args.device, batch_size=args.batch_size, progress=args.progress)
    _emit(result, args.output)
    return 0


def _emit(result, output):
    text = json.dumps(result, indent=1) + "\n"
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        atomic_write_text(output, text)
    sys.stdout.write(text)


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="Paraphrase-robustness evaluation of CLIP models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_paraphrased_retrieval(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
