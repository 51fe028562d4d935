"""`damselfly`: one command, one subcommand per component.

    damselfly scheduler ...   the central scheduler
    damselfly dfdaemon ...    the per-node daemon (``--seed`` for a seed peer)
    damselfly up ...          scheduler + seed + dfdaemon on loopback, for trying it out
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE = """usage: damselfly {scheduler,dfdaemon,up} [options]

  scheduler   run the central scheduler
  dfdaemon    run the per-node P2P daemon (add --seed for a seed peer)
  up          run a scheduler, a seed and a dfdaemon on loopback (try it out)

'damselfly COMMAND --help' lists a command's options."""


def _commands() -> dict[str, Callable[[list[str]], int]]:
    # Imported lazily: each component only loads what it runs.
    def scheduler(argv: list[str]) -> int:
        from scheduler.server import main

        return main(argv)

    def dfdaemon(argv: list[str]) -> int:
        from peer.daemon import main

        return main(argv)

    def up(argv: list[str]) -> int:
        from seed.up import main

        return main(argv)

    return {"scheduler": scheduler, "dfdaemon": dfdaemon, "up": up}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``damselfly`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command = _commands().get(args[0])
    if command is None:
        print(f"damselfly: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
