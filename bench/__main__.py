"""`python -m bench [NAME ...]`: run the named benchmarks (all by default)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "datagen": "bench.datagen",
    "features": "bench.features",
    "training": "bench.training",
    "scoring": "bench.scoring",
    "hot_key": "bench.hot_key",
    "scale": "bench.scale",
    "nightly": "bench.nightly",
    "memory": "bench.memory",
    "gpu": "bench.gpu",
}


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    flags = [a for a in argv if a.startswith("-")]
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        rc = module.main(flags)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
