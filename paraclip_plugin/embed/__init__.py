"""The one-time embedding pass over four-field shards (``paraclip-embed-images``): not training, but what
``--image-embeddings`` training reads. It writes the records that ``train/`` defines (embeddings.py,
pretokenized.py, compact.py), with the image tower frozen as training freezes it (``train.model``).

images.py         the tool: reads shards, adds the image tower's embeddings and token ids (or writes
                  compact shards), rewrites them atomically, resumes
device_decode.py  ``--decode-device cuda``: JPEG decoding and resizing in batches on the image tower's device
"""
