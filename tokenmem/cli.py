"""The ``tokenmem`` command: a thin shell over the library.

tokenmem demo        # replay the reference notebook on the embedded store
"""

from __future__ import annotations

import argparse
import sys

from .errors import TokenmemError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmem", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--db", help="database URL (default: TOKENMEM_DATABASE_URL or embedded SQLite)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="replay the reference notebook: window, chain, history")
    demo.add_argument("--language", choices=["en", "zh"], default="en")
    args = parser.parse_args(argv)
    try:
        from .store import Store

        store = Store(args.db, upgrade=True) if args.db else Store()
        if args.command == "demo":
            from .demo import run

            run(store, language=args.language)
    except TokenmemError as exc:
        print(f"tokenmem: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
