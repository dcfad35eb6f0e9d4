"""``python -m paraclip_plugin.train ARGS``: see runner.py."""

import sys

from paraclip_plugin.train.runner import main

main(sys.argv[1:])
