"""Older names of command-line flags, kept working while they are deprecated.

``add_renamed(parser, "--json", "--output", ...)`` adds ``--json`` and, in a mutually exclusive group
with it, ``--output``: same ``dest``, left out of ``--help``, and a warning on stderr naming the new flag
whenever it is used. The list of renamed flags is in CHANGELOG.md.
"""

import argparse
import sys


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
