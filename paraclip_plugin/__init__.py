"""ParaCLIP fine-tuning as a plugin for open_clip_train.

Data flows through the package in this order:
    paraphrase/  two-step LLM paraphrases of web captions  (scripts/make_shards.py)
    shards.py    the four-field WebDataset layout and atomic shard writing
    hooks.py     the open_clip_train plugin: flags, model wrapping, decode stages, loss
    decode.py    four-field WebDataset decode stages
    model.py     frozen visual tower and the fused three-text forward
    loss.py      the ParaCLIP loss built from open_clip's ClipLoss
    eval/        paraphrase-robustness metrics and evaluation commands
"""
__version__ = "0.1.0"
