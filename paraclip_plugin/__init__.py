"""ParaCLIP fine-tuning as a plugin for open_clip_train.

Data flows through the package in this order:
    data/        the shard layer every part uses: the four-field layout, sizes.json, atomic writing, tar
                 reading/writing, input expansion and the SLURM job split
    paraphrase/  two-step LLM paraphrases of web captions  (paraclip-make-shards)
    embed/       paraclip-embed-images: cached image embeddings and token ids added to shards (or compact ones)
    patching.py  the hook points patches/ gives open_clip_train (paraclip-patch)
    train/       the open_clip_train plugin: hooks.py (flags, model wrapping, decode stages, loss), decode.py,
                 model.py, trimming.py, attention.py, loss.py, and the fast path (embeddings, compact shards)
    eval/        paraphrase-robustness metrics and the paper's Table 1 (paraclip-eval)
    demo/        the embedded end-to-end demo (make demo)
    testing/     the stand-in OpenAI-compatible server for tests and benchmarks (not used at run time)
"""

__version__ = "0.1.0"
