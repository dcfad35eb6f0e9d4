"""The data layer every other part reads and writes shards through (nothing here imports torch or webdataset).

layout.py     the four-field shard layout (member names, image extensions) and ``sizes.json``
atomic.py     atomic, durable, locked file writing (``atomic_file``, ``atomic_write_text``/``bytes``, ``OutputBusy``)
tars.py       WebDataset tar shards: reading samples, counting them, the one atomic shard writer
inputs.py     input expansion (brace patterns, globs, ``::``), SLURM job split, captions-only input files
textfiles.py  users' UTF-8 text files, a bad byte named by line and offset
errors.py     ``InputError``: bad input data, named by file (and line, sample or member)
"""
