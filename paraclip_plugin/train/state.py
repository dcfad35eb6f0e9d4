"""What the plugin's hooks share during one ``open_clip_train.main`` run.

open_clip_train passes its ``args`` namespace to every hook, so ``configure(args)`` puts one
``ParaCLIPRun`` there (``args.paraclip``) and the later hooks read it with ``run_of``. A hook that
needs it before ``configure`` has made it stops with a message saying which hook ran out of order.
"""

from paraclip_plugin.train.loss import format_terms


class ParaCLIPRun:
    """The parsed loss terms and weights (``configure``), the image tower that cached embeddings are checked
    against (``wrap_model``, with ``--image-embeddings``), and what those embeddings must match, worked out
    once when the data pipeline is first built (``wds_decode_stages``: ``--resume`` loads weights after
    ``wrap_model``).

    Not saved anywhere: open_clip_train's checkpoints hold no ``args``; its params.txt and wandb's config
    write ``str(args.paraclip)``, one line naming the terms and weights (a plain class, not a dataclass:
    wandb would copy a dataclass's fields, the image tower included). A pickled copy (of ``args``, say)
    leaves the image tower out: it is the live model's, and the frozen tower's class does not pickle.
    """

    def __init__(self, terms, weights):
        self.terms = list(terms)  # [(field, field)], one symmetric InfoNCE term each
        self.weights = list(weights)  # [float], one per term
        self.image_tower = None  # the model's frozen image tower (nn.Module)
        self.embeddings = None  # embeddings.EmbeddingExpectation, once the data pipeline is built

    def __getstate__(self):
        return {**self.__dict__, "image_tower": None}

    def __repr__(self):
        weights = ",".join(f"{w:g}" for w in self.weights)
        return f"ParaCLIPRun(terms={format_terms(self.terms)}, weights={weights})"


def run_of(args, hook):
    """The ``ParaCLIPRun`` that ``configure`` put on ``args``; a RuntimeError naming ``hook`` if there is none."""
    run = getattr(args, "paraclip", None)
    if not isinstance(run, ParaCLIPRun):
        raise RuntimeError(
            f"paraclip-plugin: the {hook} hook ran before configure(args): the ParaCLIP flags are read and "
            f"checked by configure, which open_clip_train calls right after parsing its arguments "
            f"(open_clip_train.params.parse_args); call configure(args) on these args first"
        )
    return run
