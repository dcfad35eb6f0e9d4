"""Put this folder on PYTHONPATH to make packages look uninstalled (tests/test_missing_extras.py).

Python imports ``sitecustomize`` at start-up. The top-level modules named in PARACLIP_BLOCK_IMPORTS
(comma-separated) then fail to import the way a package that is not installed does: the import
system raises ``ModuleNotFoundError("No module named '...'")`` with ``.name`` set.
"""

import os
import sys


class BlockImports:
    def __init__(self, names):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named '{fullname}'", name=fullname)
        return None


_names = frozenset(filter(None, os.environ.get("PARACLIP_BLOCK_IMPORTS", "").split(",")))
if _names:
    sys.meta_path.insert(0, BlockImports(_names))
