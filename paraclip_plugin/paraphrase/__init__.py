"""Two-step LLM paraphrase generation (the paper's data step) into four-field WebDataset shards.

Nothing on this path imports torch or webdataset (``import webdataset`` pulls torch in), so a
generation job starts fast and runs on machines without a GPU stack. Shards are read and written,
inputs found and split over jobs, through ``paraclip_plugin.data``:

    prompts.py    the paper's two prompts, a version string, replacements from a file
    cleaning.py   normalise LLM outputs and name the reason a paraphrase is rejected
    cache.py      sqlite cache of every paid-for completion, written before it is used
    backends/     ``openai`` (async client, N in flight) and ``vllm`` (offline engine, shard batches)
    pipeline.py   shard in -> filter -> dedupe -> step 1 -> step 2 -> clean/retry -> shard out
"""
