#!/usr/bin/env python
"""The documented entry of paraphrase generation; installed as the console script ``paraclip-make-shards``.

See ``python scripts/make_shards.py --help`` (the program is paraclip_plugin/paraphrase/cli.py).
"""

from paraclip_plugin.paraphrase.cli import main

if __name__ == "__main__":
    main()
