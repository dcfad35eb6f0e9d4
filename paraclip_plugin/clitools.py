"""What the console scripts share: their names, argparse number types, the job-split check and error lines.

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
