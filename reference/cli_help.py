"""The --help layout every `dsref` parser uses (pass it as ``formatter_class`` to each add_parser:
argparse does not hand a parser's formatter on to its subparsers).

Descriptions and epilogs are printed as written (RawDescriptionHelpFormatter), so they carry
their own line breaks and an ``example:`` block. Every option with a default shows it, as
ArgumentDefaultsHelpFormatter does, except where it says nothing: flags (store_true), options
whose default is None (their help says what happens without them), and help strings that
already state their default in their own words ("(default: ...").
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if ("%(default)" in help or "(default" in help or action.default is None
                or action.default is argparse.SUPPRESS or action.nargs == 0):
            return help
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return help + " (default: %(default)s)"
        return help
