"""The commands of ``python -m pipeline``, one module each, beside ``__main__``.

Each module has ``add_arguments(parser)`` and ``run(args) -> int`` and only turns arguments into calls:
the work it asks for lives in the library packages (data, flows, theory, train, track, study), which
import nothing from here.
"""

import argparse
import importlib

# A command with subcommands (bench, study): name -> (its module, one-line help).
Table = dict[str, tuple[str, str]]


def add_subcommands(parser: argparse.ArgumentParser, dest: str, table: Table) -> None:
    """One subparser per entry of ``table``, with its module's options; the name goes to ``dest``."""
    sub = parser.add_subparsers(dest=dest, metavar=f"<{dest}>", required=True)
    for name, (module, help_) in table.items():
        importlib.import_module(module).add_arguments(
            sub.add_parser(name, help=help_, description=help_)
        )


def subcommand(args: argparse.Namespace, dest: str, table: Table):
    """The module of the subcommand that ``args.<dest>`` names."""
    return importlib.import_module(table[getattr(args, dest)][0])
