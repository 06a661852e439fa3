"""``python -m benchmarks NAME [args...]``: run benchmarks/NAME.py's main(args)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_") and not m.ispkg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] not in names:
        sys.stderr.write(f"usage: python -m benchmarks NAME [args...]; NAME is one of: {', '.join(names)}\n")
        return 2
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0  # some benchmarks return their figures (a dict)


if __name__ == "__main__":
    raise SystemExit(main())
