"""``paraclip-eval``: one subcommand per evaluation task.

Each task adds a subparser with ``_add_<task>`` and sets ``run`` to a function of the parsed args
that returns an exit code. User errors (``InputError``) print one line and exit with status 2, like
argparse's own usage errors; anything else is a bug and keeps its traceback.
"""

import argparse
import json
import os
import sys

from ..clitools import EVAL as PROG, POSITIVE_INT as positive_int, add_alias, add_renamed
from ..data.atomic import atomic_write_text
from ..extras import require_extra
from .common import InputError, default_device, load_model
from .paraphrased_retrieval import evaluate_checkpoint

# tasks that run through clip_benchmark (the 'eval' extra)
EVAL_EXTRA_TASKS = ("zeroshot-imagenet", "coco-retrieval")


def _add_model_arguments(parser, model_required=True):
    """Options every task needs to load one open_clip model."""
    parser.add_argument("--model", required=model_required, help="open_clip model name, e.g. ViT-B-32 or paraclip-tiny")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="checkpoint file (open_clip_train's epoch_N.pt works) or open_clip tag; omitted: random initialisation",
    )
    parser.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="PATH",
        help="register an open_clip model config (a .json file or a folder of them) before the model is "
        "created, so --model can name it, as in training. May be repeated.",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def _add_output_file(parser):
    add_renamed(
        parser, "--json", "--output", default=None, metavar="FILE", help="also write the result JSON to this file"
    )


def _add_paraphrased_retrieval(subparsers):
    parser = subparsers.add_parser(
        "paraphrased-retrieval",
        help="AO@k / JS@k between rankings of queries and their paraphrases, and recall@1/5/10",
        description="Gallery: with --gallery DIR every image file in DIR (the paper: all 5,000 images of "
        "COCO's val2017/); with --pairs-gallery DIR only the distinct images the pairs name: fewer "
        "distractors, so the scores differ from the paper's protocol. The result records 'gallery' and its size "
        "'num_images'.",
    )
    _add_model_arguments(parser)
    _add_output_file(parser)
    parser.add_argument(
        "--pairs",
        required=True,
        help="JSON lines with 'query', 'paraphrase' and gold 'image' (file name in the folder)",
    )
    folder = parser.add_mutually_exclusive_group(required=True)
    folder.add_argument(
        "--gallery",
        metavar="DIR",
        help="folder whose every image is a candidate, e.g. COCO val2017/ (the paper's protocol); "
        "the pairs' images must be in it",
    )
    pairs_gallery = folder.add_argument(
        "--pairs-gallery",
        metavar="DIR",
        help="folder holding the pairs' images; only those images are candidates",
    )
    add_alias(folder, "--images", pairs_gallery)
    parser.add_argument("--k", type=positive_int, default=10, help="depth of AO@k and JS@k (default 10)")
    parser.set_defaults(run=_run_paraphrased_retrieval)


def _run_paraphrased_retrieval(args):
    result = evaluate_checkpoint(
        args.model,
        args.pretrained,
        args.pairs,
        args.gallery or args.pairs_gallery,
        k=args.k,
        model_config=args.model_config,
        device=args.device,
        batch_size=args.batch_size,
        progress=args.progress,
        whole_folder=args.gallery is not None,
    )
    _emit(result, args.json)
    return 0


def _run_on_model(args, evaluate):
    """Load the model (after the task checked its inputs), call ``evaluate(model, preprocess, tokenizer,
    device)`` and print (and with --output, write) its result with the model named."""
    device = args.device or default_device()
    model, preprocess, tokenizer = load_model(args.model, args.pretrained, args.model_config, device)
    result = evaluate(model, preprocess, tokenizer, device)
    _emit({**result, "model": args.model, "pretrained": args.pretrained}, args.json)
    return 0


def _add_aro(subparsers, task, what):
    from .aro import ANNOTATION_FILES

    parser = subparsers.add_parser(
        task,
        help=f"ARO {what}: accuracy and ARO's macro accuracy (true caption vs swapped caption)",
        description=f"Reads ARO's {ANNOTATION_FILES[task]} and image folder; each image is cropped to its "
        "box as ARO does. Correct = true caption's cosine strictly higher than the false one's.",
    )
    _add_model_arguments(parser)
    _add_output_file(parser)
    parser.add_argument("--annotations", required=True, help=f"ARO's {ANNOTATION_FILES[task]}")
    parser.add_argument("--images", required=True, help="ARO's image folder (image_path is relative to it)")
    parser.set_defaults(run=_run_aro, task=task)


def _run_aro(args):
    from .aro import evaluate_aro, read_cases

    cases = read_cases(args.task, args.annotations, args.images)
    return _run_on_model(
        args,
        lambda model, preprocess, tokenizer, device: evaluate_aro(
            model, preprocess, tokenizer, args.task, cases, device, args.batch_size, args.progress
        ),
    )


def _add_sts(subparsers):
    from .sts import TASKS, __doc__ as layouts

    parser = subparsers.add_parser(
        "sts",
        help="STS12-16, STS-B, SICK-R test sets: Spearman of text-embedding cosines ('all'), macro average",
        description=layouts,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(parser)
    _add_output_file(parser)
    add_renamed(
        parser,
        "--root",
        "--folder",
        required=True,
        help="SentEval's data/downstream folder (STS/, SICK/), or a folder of the per-task files above",
    )
    parser.add_argument(
        "--sts-tasks",
        nargs="+",
        default=None,
        choices=list(TASKS),
        metavar="TASK",
        help=f"subset of tasks (default: all of {', '.join(TASKS)})",
    )
    parser.set_defaults(run=_run_sts)


def _run_sts(args):
    from .sts import evaluate_sts, read_tasks

    tasks = read_tasks(args.root, args.sts_tasks)
    return _run_on_model(
        args, lambda model, _, tokenizer, device: evaluate_sts(model, tokenizer, tasks, device, args.progress)
    )


def _add_imagenet(subparsers):
    parser = subparsers.add_parser(
        "zeroshot-imagenet",
        help="zero-shot ImageNet-1k top-1/top-5 through clip_benchmark",
        description="ROOT: meta.bin (or ILSVRC2012_devkit_t12.tar.gz) and val/<wnid>/ with all 1000 wnid "
        "folders, each with at least one image, as torchvision's ImageNet reads it. Nothing is downloaded.",
    )
    _add_model_arguments(parser)
    _add_output_file(parser)
    parser.add_argument("--root", required=True, help="ImageNet folder")
    parser.add_argument(
        "--templates",
        default=None,
        help='JSON {"imagenet1k": ["a photo of a {c}.", ...]} replacing clip_benchmark\'s 80 prompts',
    )
    parser.set_defaults(run=_run_imagenet)


def _run_imagenet(args):
    require_extra(PROG, "zeroshot-imagenet", "eval")
    from .benchmark import check_imagenet_root, evaluate_imagenet

    check_imagenet_root(args.root, args.templates)
    return _run_on_model(
        args,
        lambda model, preprocess, tokenizer, device: evaluate_imagenet(
            model, preprocess, tokenizer, args.root, device, args.batch_size, args.templates
        ),
    )


def _add_coco_split(parser):
    from .benchmark import COCO_DEFAULT_SPLIT, COCO_SPLITS

    parser.add_argument(
        "--coco-split",
        choices=list(COCO_SPLITS),
        default=COCO_DEFAULT_SPLIT,
        help="karpathy-test: val2014/ + coco_test_karpathy.json (5,000 images, 25,010 captions); "
        "val2017: val2017/ + annotations/captions_val2017.json (5,000 images, 25,014 "
        f"captions), as COCO's zips unpack (default {COCO_DEFAULT_SPLIT})",
    )


def _add_coco(subparsers):
    parser = subparsers.add_parser(
        "coco-retrieval",
        help="COCO image->text and text->image recall@1/5/10 through clip_benchmark",
        description="ROOT holds the --coco-split's image folder and captions JSON (COCO captions format). "
        "The split is recorded in the result. Nothing is downloaded.",
    )
    _add_model_arguments(parser)
    _add_output_file(parser)
    parser.add_argument("--root", required=True, help="COCO folder")
    _add_coco_split(parser)
    parser.add_argument(
        "--annotations",
        default=None,
        help="captions JSON replacing the split's default file; images are read from the split's folder",
    )
    parser.set_defaults(run=_run_coco)


def _run_coco(args):
    require_extra(PROG, "coco-retrieval", "eval")
    from .benchmark import check_coco_root, evaluate_coco

    check_coco_root(args.root, args.annotations, args.coco_split)
    return _run_on_model(
        args,
        lambda model, preprocess, tokenizer, device: evaluate_coco(
            model, preprocess, tokenizer, args.root, device, args.batch_size, args.annotations, args.coco_split
        ),
    )


def _add_table1(subparsers):
    from .table1 import TASKS, __doc__ as layout

    parser = subparsers.add_parser(
        "table1",
        help="every task on one model: table1.json + table1.md (the paper's Table 1 layout)",
        description=layout,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(parser, model_required=False)
    parser.add_argument("--data-root", default=None, help="folder with one sub-folder per benchmark (above)")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASKS),
        choices=TASKS,
        metavar="TASK",
        help=f"tasks to run (default: all of {', '.join(TASKS)})",
    )
    parser.add_argument(
        "--output",
        default="table1-output",
        help="folder for table1.json and table1.md, and tasks/<task>.json: each finished task, "
        "reused by a rerun on the same inputs",
    )
    parser.add_argument(
        "--imagenet-templates",
        default=None,
        help="prompt JSON for zeroshot-imagenet (default: clip_benchmark's 80 OpenAI prompts)",
    )
    _add_coco_split(parser)
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        default=None,
        help="print how run B differs from run A (no model is loaded)",
    )
    parser.set_defaults(run=_run_table1)


def _run_table1(args):
    from .table1 import compare, markdown_table, read_result, run_table1

    if args.compare:
        a, b = (read_result(p) for p in args.compare)
        lines = compare(a, b)
        sys.stdout.write("\n".join(lines or ["no differences"]) + "\n")
        return 0
    if not args.model or not args.data_root:
        raise InputError("table1 needs --model and --data-root (or --compare A.json B.json)")
    needing = [task for task in args.tasks if task in EVAL_EXTRA_TASKS]
    if needing:
        require_extra(PROG, f"table1's {' and '.join(needing)} (leave out with --tasks)", "eval")
    result = run_table1(
        args.model,
        args.pretrained,
        args.data_root,
        args.tasks,
        args.model_config,
        args.device or default_device(),
        args.batch_size,
        args.progress,
        args.imagenet_templates,
        args.coco_split,
        keep_tasks=os.path.join(args.output, "tasks"),
    )
    table = markdown_table(result)
    sys.stdout.write(table)  # first: a failed write below loses no result
    sys.stdout.flush()
    _write(os.path.join(args.output, "table1.json"), json.dumps(result, indent=1) + "\n")
    _write(os.path.join(args.output, "table1.md"), table)
    return 0


def _emit(result, output):
    text = json.dumps(result, indent=1) + "\n"
    sys.stdout.write(text)  # first: a failed write below loses no result
    sys.stdout.flush()
    if output:
        _write(output, text)


def _write(path, text):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, text)
    except OSError as e:
        raise InputError(f"{path}: not written ({e.strerror}); the result is on standard output above") from None


def check_output(args):
    """Before any model is loaded or any image read: ``--output`` (table1's folder) or ``--json`` (a task's
    result file) can be written (its folders made)."""
    flag, output = ("--output", args.output) if args.command == "table1" else ("--json", args.json)
    if not output or getattr(args, "compare", None):
        return
    if args.command == "table1":
        if os.path.exists(output) and not os.path.isdir(output):
            raise InputError(f"--output {output}: not a folder (table1 writes table1.json and table1.md into one)")
        folder = output
    else:
        if os.path.isdir(output):
            raise InputError(f"--json {output}: a folder; give the JSON file's name")
        folder = os.path.dirname(os.path.abspath(output))
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the folders to be made go into the nearest one there is
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{flag} {output}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {output}: {existing} is not writable")


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="Paraphrase-robustness evaluation of CLIP models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_paraphrased_retrieval(subparsers)
    _add_aro(subparsers, "vg-relation", "VG-Relation")
    _add_aro(subparsers, "vg-attribution", "VG-Attribution")
    _add_sts(subparsers)
    _add_imagenet(subparsers)
    _add_coco(subparsers)
    _add_table1(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_output(args)
        return args.run(args)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
