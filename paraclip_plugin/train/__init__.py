"""Training: what ParaCLIP plugs into ``open_clip_train.main``.

hooks.py          the open_clip_train plugin (entry point ``open_clip_train.plugins``): flags, checks,
                  and the calls into the modules below
state.py          ParaCLIPRun: what the hooks of one run share (args.paraclip)
decode.py         per-sample WebDataset stages: four-field shards -> (image, [caption, para1, para2])
embeddings.py     cached image embeddings (--image-embeddings) and the fingerprint of the image weights
pretokenized.py   stored token ids and the tokenizer fingerprint
compact.py        compact training shards (one packed member per sample)
                  (paraclip_plugin.embed writes these records: paraclip-embed-images)
model.py          the frozen image tower and the fused three-text forward
trimming.py       exact sequence trimming of that forward
attention.py      --causal-attention: the text attention as causal SDPA (the is_causal hint)
loss.py           the ParaCLIP loss
runner.py         ``python -m paraclip_plugin.train ARGS``: open_clip_train.main with the hooks, for
                  installs whose site-packages can't be patched
"""
