"""Optional dependencies (setup.cfg's extras), checked before a command starts any work.

A command that will need an extra calls ``require_extra`` first, so a missing package is one line
naming the extra to install and exit status 2, not a ``ModuleNotFoundError`` traceback after an
hour of other work. The check imports the modules (not only finds them), so a package that is
present but cannot be imported (a dependency of its own missing) is caught too.
"""

import importlib
import sys

# extra -> the modules the plugin imports from it (in the order they are imported)
EXTRAS = {
    "eval": ("clip_benchmark", "sklearn"),
    "openai": ("openai",),
    "vllm": ("vllm",),
    "plot": ("matplotlib",),
}


def missing_extra(extra):
    """None when every module of ``extra`` imports; else the ImportError of the first one that doesn't."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as e:
            return e
    return None


def require_extra(prog, what, extra):
    """Exit with status 2 and one line on stderr when ``extra`` is not installed; ``what`` needs it."""
    error = missing_extra(extra)
    if error is not None:
        print(
            f"{prog}: error: {what} needs the '{extra}' extra ({type(error).__name__}: {error}): "
            f"pip install 'paraclip-plugin[{extra}]'",
            file=sys.stderr,
        )
        raise SystemExit(2)
