"""`damselfly`: one command, one subcommand per component.

    damselfly scheduler ...   the central scheduler
    damselfly dfdaemon ...    the per-node daemon (``--seed`` for a seed peer)
    damselfly up ...          scheduler + seed + dfdaemon on loopback, for trying it out

The subcommands are found through the ``damselfly.commands`` entry points (declared in
pyproject.toml, each naming a ``main(argv) -> int``), so this bottom layer never imports the
components above it, and a component's module is loaded only when its command runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points
from importlib.metadata import version as package_version

COMMAND_GROUP = "damselfly.commands"

# One line of help per command, in the order `damselfly --help` lists them. A command installed
# under COMMAND_GROUP but missing here is still listed (after these) and runs all the same.
SUMMARIES = {
    "scheduler": "run the central scheduler",
    "dfdaemon": "run the per-node P2P daemon (add --seed for a seed peer)",
    "up": "run a scheduler, a seed and a dfdaemon on loopback (try it out)",
    "preheat": "put an image's layers on the seed peers before nodes pull it",
}

NOT_INSTALLED = (f"damselfly: no commands found (entry point group {COMMAND_GROUP!r} is empty); "
                 "install the package: pip install -e .")


def version() -> str:
    """The installed version of Damselfly (``unknown`` when run from a tree that is not installed)."""
    try:
        return package_version("damselfly")
    except PackageNotFoundError:
        return "unknown"


def _commands() -> dict[str, EntryPoint]:
    """The installed commands by name, in help order (first one wins if two share a name)."""
    found: dict[str, EntryPoint] = {}
    for entry_point in entry_points(group=COMMAND_GROUP):
        found.setdefault(entry_point.name, entry_point)
    order = [name for name in SUMMARIES if name in found] + sorted(set(found) - set(SUMMARIES))
    return {name: found[name] for name in order}


def usage(names: Sequence[str]) -> str:
    """The help text of ``damselfly`` listing the commands `names`."""
    width = max(len(name) for name in names) + 3
    lines = [f"usage: damselfly {{{','.join(names)}}} [options]", ""]
    lines += [f"  {name:<{width}}{SUMMARIES.get(name, '')}".rstrip() for name in names]
    lines += ["", "'damselfly COMMAND --help' lists a command's options; 'damselfly --version' prints the version."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``damselfly`` console script."""
    args = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if not commands:
        print(NOT_INSTALLED, file=sys.stderr)
        return 2
    if args and args[0] in ("-V", "--version"):
        print(f"damselfly {version()}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print(usage(list(commands)))
        return 0 if args else 2
    entry_point = commands.get(args[0])
    if entry_point is None:
        print(f"damselfly: unknown command {args[0]!r}\n\n{usage(list(commands))}", file=sys.stderr)
        return 2
    command: Callable[[list[str]], int] = entry_point.load()  # imports that component only now
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
