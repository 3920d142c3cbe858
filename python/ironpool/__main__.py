"""``python -m ironpool demo [--small]``: runs the demo (see ``ironpool.demo``)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "demo":
        print("usage: python -m ironpool demo [--small] [--help]", file=sys.stderr)
        return 2
    from .demo.main import main as demo

    return demo(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
