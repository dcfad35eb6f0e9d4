"""ParaCLIP fine-tuning as a plugin for open_clip_train.

Data flows through the package in this order:
    paraphrase/  two-step LLM paraphrases of web captions  (scripts/make_shards.py)
    shards.py    the four-field WebDataset layout and atomic shard writing
    patching.py  the hook points patches/ gives open_clip_train (paraclip-patch)
    train/       the open_clip_train plugin: hooks.py (flags, model wrapping, decode stages, loss), decode.py,
                 model.py, trimming.py, attention.py, loss.py, and the fast path (embeddings, compact shards)
    eval/        paraphrase-robustness metrics and the paper's Table 1 (paraclip-eval)
    demo/        the embedded end-to-end demo (make demo)
"""

__version__ = "0.1.0"
