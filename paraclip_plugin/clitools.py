"""What the console scripts share: their names, argparse number types, the job-split check, error lines and
the deprecated spellings of renamed flags.

Every message a command prints starts with the console script's name (``paraclip-make-shards: error: ...``),
the name an installed user runs, whichever way the command was started. A usage error (a flag out of range,
flags that don't go together) is argparse's: the usage, one line naming the flag, exit status 2.
"""

import argparse
import math
import sys

MAKE_SHARDS = "paraclip-make-shards"
EMBED_IMAGES = "paraclip-embed-images"
EVAL = "paraclip-eval"
PATCH = "paraclip-patch"


def number(kind, low, high=None, low_open=False):
    """An argparse ``type``: a ``kind`` (int or float) from ``low`` (excluded if ``low_open``) to ``high``; argparse
    names the flag in its error."""
    what = "an integer" if kind is int else "a finite number"
    bounds = (
        f"in {'(' if low_open else '['}{low}, {high}]" if high is not None else f"{'>' if low_open else '>='} {low}"
    )

    def parse(text):
        value = kind(text)  # not a number: argparse's own "invalid int/float value" line
        if not (
            (value > low if low_open else value >= low) and (high is None or value <= high) and math.isfinite(value)
        ):  # NaN and inf too
            raise argparse.ArgumentTypeError(f"must be {what} {bounds}, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT, NON_NEGATIVE_INT = number(int, 1), number(int, 0)
POSITIVE, NON_NEGATIVE = number(float, 0, low_open=True), number(float, 0)
FRACTION, OPEN_FRACTION = number(float, 0, 1), number(float, 0, 1, low_open=True)


def check_job_split(parser, num_jobs, job_index):
    """A usage error (``parser.error``) when ``--job-index`` is not one of ``--num-jobs``' jobs."""
    if not 0 <= job_index < num_jobs:
        parser.error(f"--job-index {job_index} is outside 0..{num_jobs - 1} (--num-jobs {num_jobs})")


def print_error(prog, message):
    """``<prog>: error: <message>`` on stderr."""
    print(f"{prog}: error: {message}", file=sys.stderr)


def fail(prog, message, status=1):
    """``print_error``, then exit with ``status``."""
    print_error(prog, message)
    raise SystemExit(status)


# Older names of flags, kept working while they are deprecated: ``add_renamed(parser, "--json", "--output", ...)``
# adds ``--json`` and, in a mutually exclusive group with it, ``--output``: same ``dest``, left out of ``--help``,
# and a warning on stderr naming the new flag whenever it is used. CHANGELOG.md lists the renamed flags.
class DeprecatedAlias(argparse.Action):
    """An older name of flag ``new``: stores into its ``dest`` and says on stderr which name to use."""

    def __init__(self, option_strings, dest, new, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(parser, new, old, required=False, **kwargs):
    """Flag ``new`` (``kwargs`` as for ``add_argument``) and its deprecated spelling ``old``; one of them at
    most (exactly one with ``required``). Returns the group, to which other spellings can be added."""
    group = parser.add_mutually_exclusive_group(required=required)
    action = group.add_argument(new, **kwargs)
    add_alias(group, old, action)
    return group


def add_alias(parser, old, action):
    """``old`` as a deprecated spelling of the flag ``action`` (what ``add_argument`` returned)."""
    parser.add_argument(
        old,
        dest=action.dest,
        metavar=action.metavar,
        type=action.type,
        action=DeprecatedAlias,
        new=action.option_strings[0],
    )
