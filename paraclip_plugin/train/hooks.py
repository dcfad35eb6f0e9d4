"""The open_clip_train plugin: what ParaCLIP adds to ``open_clip_train.main``.

Registered in the ``open_clip_train.plugins`` entry-point group (setup.cfg) and called through the
hook points that patches/ adds to open_clip_train (see ``open_clip_train/plugins.py`` there). Every
hook is a no-op unless one of the flags below is given, so a stock recipe trains as before.
"""

import argparse
import contextlib
import logging
import os

import open_clip
from open_clip_train.data import expand_urls, get_csv_dataset, get_dataset_fn, get_dataset_size

from paraclip_plugin.clitools import fail
from paraclip_plugin.train.attention import enable_causal_attention
from paraclip_plugin.data.layout import IMAGE_EXTENSIONS, SIZES_FILE
from paraclip_plugin.train.decode import (
    compact_decode_stages,
    first_sample_fields,
    is_compact,
    local_path,
    paraclip_decode_stages,
    shard_size_stages,
)
from paraclip_plugin.train.embeddings import EmbeddingExpectation
from paraclip_plugin.train.loss import DEFAULT_TERMS, ParaCLIPLoss, format_terms, parse_terms, parse_weights
from paraclip_plugin.train.model import enable_paraphrase_forward, freeze_visual
from paraclip_plugin.train.state import ParaCLIPRun, run_of

# configure() runs while arguments are parsed, before open_clip_train sets up logging: a module-level
# logger.warning() there would install Python's default root handler and print every later line twice
logger = logging.getLogger(__name__)


def _terms(spec):
    try:
        return parse_terms(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _block_size(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of rows (0 or more)")
    return value


def add_arguments(parser):
    group = parser.add_argument_group("ParaCLIP (paraclip-plugin)")
    group.add_argument(
        "--paraclip-loss",
        action="store_true",
        default=False,
        help="Fine-tune with the ParaCLIP loss on four-field shards (image, txt, para1.txt, para2.txt). "
        "Implies --frozen-visual unless --no-frozen-visual is given.",
    )
    group.add_argument(
        "--paraclip-terms",
        type=_terms,
        default=DEFAULT_TERMS,
        help="Comma-separated FIELD:FIELD pairs, each a symmetric InfoNCE term, over the fields "
        "image, caption, para1, para2. Default: %(default)s (the paper's loss).",
    )
    group.add_argument(
        "--paraclip-weights",
        type=str,
        default=None,
        help="Comma-separated weights, one per --paraclip-terms term (default: all 1).",
    )
    group.add_argument(
        "--paraclip-loss-block-size",
        type=_block_size,
        default=0,
        metavar="N",
        help="With --paraclip-loss: compute each InfoNCE term N rows at a time (loss.BlockedClipLoss): the same "
        "loss and gradients, but no global-batch x global-batch logits are kept for backward (each term's "
        "logits are recomputed a block at a time in backward: extra memory O(N x global batch) instead of "
        "O(global batch^2), for twice the loss's matmuls). For large batches, e.g. 4096 with "
        "--accum-freq at 32,768 per step. 0 (default): open_clip's ClipLoss, all logits at once.",
    )
    group.add_argument(
        "--frozen-visual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Freeze the image tower: no gradients, not in the optimizer, eval mode, run under no_grad. "
        "Works with any loss. Default: on with --paraclip-loss, off otherwise.",
    )
    group.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="PATH",
        help="Register an open_clip model config (a .json file or a folder of them) before the model "
        "is created, so --model can name it. May be repeated.",
    )
    group.add_argument(
        "--image-embeddings",
        action="store_true",
        default=False,
        help="With --paraclip-loss: read the image features stored in the shards (img_emb.npy, or the .pcl "
        "member of compact shards; paraclip-embed-images) instead of decoding images and running the frozen "
        "image tower. Embeddings made with other image weights, another image tower architecture or another image "
        "transform (--image-mean, --image-std, ...) are refused. No image augmentation. "
        "--val-data shards with images are read as stock open_clip reads them (through the frozen tower).",
    )
    group.add_argument(
        "--text-trimming",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="With --paraclip-loss: cut each fused text batch to its longest sequence where that is "
        "exact (causal text towers pooling at EOT); --no-text-trimming always runs the full context.",
    )
    group.add_argument(
        "--causal-attention",
        action="store_true",
        default=False,
        help="Tell the text tower's attention that its mask is the causal mask (torch's is_causal hint), so "
        "scaled_dot_product_attention can use FlashAttention instead of reading an additive mask. The same "
        "attention, other kernels (on a GPU the rounding differs). Works with any loss; open_clip text "
        "towers with a causal mask only, otherwise a warning says why it has no effect.",
    )


# below this, a pure_bf16 weight update is mostly rounded away (bf16 has an 8-bit significand)
PURE_BF16_MIN_LR = 1e-4


def usage_error(message):
    """Exit like argparse does for a bad flag: message on stderr, status 2."""
    fail("open_clip_train", message, status=2)


def missing_local_shards(shards):
    """The shard files of a --train-data/--val-data value that are local and do not exist (each folder is
    listed once: tens of thousands of shards on every rank are not as many file-system lookups)."""
    if not shards:
        return []
    urls, _ = expand_urls(shards)
    listed = {}
    missing = []
    for url in urls:
        path = local_path(url)
        if path is None:
            continue
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in listed:
            try:
                listed[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
            except OSError:  # a folder that can't be listed (but whose files may open): ask per file
                listed[folder] = None
        if not (name in listed[folder] if listed[folder] is not None else os.path.isfile(os.path.join(folder, name))):
            missing.append(url)
    return missing


def configure(args):
    """Check the flags and derive settings right after parsing; the run's state goes to ``args.paraclip``."""
    terms, weights = loss_terms(args)
    frozen_visual_default(args, terms)
    for path in args.model_config:
        open_clip.add_model_config(path)
    if args.paraclip_loss:
        check_loss_model(args)
        check_training_data(args)
        check_text_tower(args)
    check_frozen_visual(args)
    args.paraclip = ParaCLIPRun(terms, weights)


def loss_terms(args):
    """The parsed ``--paraclip-terms`` and ``--paraclip-weights``; refuses the ParaCLIP-only flags without
    ``--paraclip-loss``."""
    terms = args.paraclip_terms
    if isinstance(terms, str):  # a default set by hand (argparse runs type= on its own default)
        terms = parse_terms(terms)
    try:
        weights = parse_weights(args.paraclip_weights, len(terms))
    except ValueError as e:
        usage_error(f"argument --paraclip-weights: {e}")
    paraclip_only = [
        flag
        for flag, given in (
            ("--paraclip-terms", terms != parse_terms(DEFAULT_TERMS)),
            ("--paraclip-weights", args.paraclip_weights is not None),
            ("--paraclip-loss-block-size", args.paraclip_loss_block_size != 0),
            ("--no-text-trimming", not args.text_trimming),
        )
        if given
    ]
    if paraclip_only and not args.paraclip_loss:
        usage_error(
            f"{', '.join(paraclip_only)} only apply to the ParaCLIP loss: add --paraclip-loss (without it "
            f"the stock CLIP loss trains and they would be ignored)"
        )
    return terms, weights


def frozen_visual_default(args, terms):
    """The ``--frozen-visual`` default (on with ``--paraclip-loss``); refuses training the image tower
    without an image term."""
    image_trains = args.frozen_visual is False and not (args.lock_image and not args.lock_image_unlocked_groups)
    if args.paraclip_loss and image_trains and not any("image" in term for term in terms):
        usage_error(
            f"--paraclip-terms {format_terms(terms)} has no image term, so the "
            f"image tower gets no gradient, but --no-frozen-visual asks to train it (DDP then stops: every "
            f"trainable parameter needs a gradient): drop --no-frozen-visual"
        )
    if args.frozen_visual is None:
        args.frozen_visual = args.paraclip_loss


def check_loss_model(args):
    """``--paraclip-loss`` needs a CLIP model trained with InfoNCE."""
    if args.siglip or args.distill_model or "coca" in args.model.lower():
        usage_error(
            "--paraclip-loss is a CLIP (InfoNCE) loss; it can't be combined with "
            "--siglip, --distill-model or a CoCa model"
        )


def check_training_data(args):
    """``--paraclip-loss`` reads WebDataset shards: refuses other dataset types, local shards that don't exist,
    and a sizes.json that open_clip would stop on."""
    dataset_type = args.dataset_type
    if dataset_type == "auto" and args.train_data:  # resolved as open_clip resolves it
        with contextlib.suppress(ValueError):
            dataset_type = "csv" if get_dataset_fn(args.train_data, "auto") is get_csv_dataset else "webdataset"
    if dataset_type in ("csv", "synthetic"):
        usage_error(
            f"--paraclip-loss reads four-field WebDataset shards; "
            f"--dataset-type {args.dataset_type} ({dataset_type}) is not supported"
        )
    for flag, shards in (("--train-data", args.train_data), ("--val-data", args.val_data)):
        missing = missing_local_shards(shards)
        if missing:
            usage_error(
                f"{flag}: {len(missing)} shard file(s) not found: {', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}"
            )
    if args.train_data and args.train_num_samples is None:
        try:  # open_clip sizes the epoch so, and would stop with a bare KeyError
            get_dataset_size(args.train_data)
        except KeyError as e:
            usage_error(
                f"--train-data: the {SIZES_FILE} next to its first shard has no entry for shard {e}; "
                f"pass --train-num-samples, or rebuild {SIZES_FILE} (paraclip-make-shards and "
                f"paraclip-embed-images rewrite it on a rerun)"
            )
        except (ValueError, OSError):
            pass  # open_clip's own error, later


def check_text_tower(args):
    """``--paraclip-loss`` trains the text tower: refuses ``--lock-text``, warns of pure_bf16 at a tiny lr."""
    if args.lock_text:
        usage_error(
            "--paraclip-loss trains the text tower, but --lock-text freezes it "
            "(only logit_scale would train): drop --lock-text"
        )
    if args.precision == "pure_bf16" and args.lr < PURE_BF16_MIN_LR:
        logger.warning(
            f"ParaCLIP: --precision pure_bf16 with --lr {args.lr:g}: bf16 weights keep 8 significant bits, "
            f"so updates smaller than ~1/256 of a weight are rounded away (at the paper's lr 5e-7 almost no "
            f"text weight changes). Use --precision amp_bf16 (float32 weights, bf16 compute)."
        )


def check_frozen_visual(args):
    """Refuses trainable image layers on a frozen tower, and ``--image-embeddings`` where the tower trains
    or without ``--paraclip-loss``."""
    if args.frozen_visual and args.lock_image_unlocked_groups:
        usage_error(
            f"--lock-image-unlocked-groups {args.lock_image_unlocked_groups} asks for trainable image "
            f"layers, but the image tower is frozen (--frozen-visual, the default with --paraclip-loss): "
            f"drop one, or pass --no-frozen-visual"
        )
    if args.image_embeddings:
        if not args.paraclip_loss:
            usage_error("--image-embeddings needs --paraclip-loss")
        if not args.frozen_visual:
            usage_error(
                "--image-embeddings uses fixed image features, so the image tower can't train: drop --no-frozen-visual"
            )


def wrap_model(model, args):
    run = run_of(args, "wrap_model") if args.image_embeddings else None
    if args.frozen_visual:
        freeze_visual(model)
        logger.info("ParaCLIP: image tower frozen (eval mode, no gradients, not optimized).")
    if args.paraclip_loss:
        enable_paraphrase_forward(model, trim=args.text_trimming)
    if args.causal_attention:
        enable_causal_attention(model)
    if run is not None:
        # fingerprinted when the data pipeline is built, not here: --resume loads weights after wrap_model
        run.image_tower, run.embeddings = model.visual, None
    return model


def wds_decode_stages(args, preprocess_img, tokenizer, is_train):
    if not args.paraclip_loss:
        return None
    # what the first sample holds (read once, local or remote): needed for validation, and for --image-embeddings
    fields = (
        first_sample_fields(args.val_data)
        if not is_train
        else (first_sample_fields(args.train_data) if args.image_embeddings else None)
    )
    if not is_train and (fields is None or fields & set(IMAGE_EXTENSIONS)):
        # open_clip's evaluate() reads (image, caption) only: validation shards with images among their first
        # samples (or that can't be read now) are read as stock open_clip reads them. Only shards without
        # images (cached embeddings, compact) need the ParaCLIP stages below, with --image-embeddings.
        return None
    if not args.image_embeddings:
        if not is_train:
            usage_error(
                f"--val-data {args.val_data}: its first samples have no image, and without --image-embeddings "
                f"the image tower needs images; pass shards with images (a caption per image is enough)"
            )
        return shard_size_stages(args, is_train) + paraclip_decode_stages(preprocess_img, tokenizer)
    embeddings = cached_embeddings(args, run_of(args, "wds_decode_stages"))
    first = first_shard(args.train_data) if is_train else None
    if is_compact(fields):
        return shard_size_stages(args, is_train) + compact_decode_stages(tokenizer, embeddings, first)
    return shard_size_stages(args, is_train) + paraclip_decode_stages(preprocess_img, tokenizer, embeddings, first)


def cached_embeddings(args, run):
    """What the shards' cached embeddings must match: this run's image tower as it is when the data pipeline is
    first built (fingerprinted once, for training and validation data alike)."""
    if run.image_tower is None:
        raise RuntimeError(
            "paraclip-plugin: the wds_decode_stages hook ran before wrap_model(model, args): with "
            "--image-embeddings the cached embeddings are checked against the model's image tower, which "
            "wrap_model records on args.paraclip (a pickled copy of args leaves it out); open_clip_train.main "
            "calls wrap_model before it builds the data"
        )
    if run.embeddings is None:
        run.embeddings = EmbeddingExpectation.of_tower(
            run.image_tower, label=f"('{args.model}', pretrained '{args.pretrained}') ", precision=args.precision
        )
        logger.info(
            f"ParaCLIP: reading cached image embeddings; image tower sha256 "
            f"{run.embeddings.visual_sha256} ({args.model}, pretrained {args.pretrained}, "
            f"precision {args.precision})."
        )
    return run.embeddings


def first_shard(shards):
    """The first shard URL of a --train-data value (named in errors about mixing shard kinds)."""
    urls, _ = expand_urls(shards) if shards else ([], None)
    return urls[0] if urls else None


def keep_torch_logs(args):
    """Re-apply the user's ``TORCH_LOGS`` (e.g. ``recompiles,graph_breaks``) under ``--torchcompile``.

    open_clip_train sets every existing logger to INFO (``setup_logging``) and torch's compiler
    loggers to WARNING just before ``torch.compile``, which silences what TORCH_LOGS asked for.
    ``create_loss`` is the first hook after that and before the first compiled forward.
    """
    if args.torchcompile and os.environ.get("TORCH_LOGS"):
        import torch._logging._internal

        torch._logging._internal._init_logs()
        logger.info(f"ParaCLIP: TORCH_LOGS={os.environ['TORCH_LOGS']} re-applied after open_clip_train's logger setup.")


def create_loss(args):
    if not args.paraclip_loss:
        return None
    run = run_of(args, "create_loss")
    keep_torch_logs(args)
    logger.info(
        "ParaCLIP loss: "
        + " + ".join(f"{w:g}*L({a},{b})" for (a, b), w in zip(run.terms, run.weights))
        + (f", each in blocks of {args.paraclip_loss_block_size} rows" if args.paraclip_loss_block_size else "")
    )
    return ParaCLIPLoss(
        run.terms,
        run.weights,
        block_size=args.paraclip_loss_block_size,
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=args.horovod,
    )
