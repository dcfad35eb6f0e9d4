#!/usr/bin/env python
"""The documented entry for cached image embeddings; installed as the console script ``paraclip-embed-images``.

See ``python scripts/embed_images.py --help`` (the program is paraclip_plugin/embed/images.py; its
names are re-exported here for the scripts and tests that load this file).
"""

from paraclip_plugin.embed.images import *  # noqa: F401,F403
from paraclip_plugin.embed.images import console_main

if __name__ == "__main__":
    console_main()
