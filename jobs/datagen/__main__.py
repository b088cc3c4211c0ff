"""``python -m jobs.datagen --lake URI --start 2018-04-01 --days 183 --customers 5000 --terminals 10000 --seed 0``"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jobs.common.calendar import parse_day
from jobs.common.config import settings
from jobs.datagen.landing import FORMATS, generate_to_lake


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.datagen",
        description="Generate simulated card transactions into the lake's landing area.",
    )
    parser.add_argument("--lake", default=None, help="lake root URI (default: FRAUD_LAKE_URI)")
    parser.add_argument(
        "--start", type=parse_day, default=parse_day("2018-04-01"), help="first day (YYYY-MM-DD)"
    )
    parser.add_argument("--days", type=int, default=183, help="number of days (default 183)")
    parser.add_argument("--customers", type=int, default=5000, help="number of customers (default 5000)")
    parser.add_argument("--terminals", type=int, default=10000, help="number of terminals (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default 0)")
    parser.add_argument(
        "--format", choices=FORMATS, default="parquet", help="landing file format (default parquet)"
    )
    parser.add_argument("--label-delay", default="fixed:7",
                        help="when labels are reported: fixed:N days after the transaction, or realistic "
                             "(docs/contract.md, 'Labels as events'; default fixed:7)")
    parser.add_argument("--labels", choices=("inline", "feed"), default=None,
                        help="labels inline in the transactions (default for fixed:7) or as label events only")
    args = parser.parse_args(argv)
    for name in ("days", "customers", "terminals"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    args.lake = args.lake or settings().lake_uri
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    summary = generate_to_lake(
        args.lake, args.start, args.days, args.customers, args.terminals, args.seed, fmt=args.format,
        label_delay=args.label_delay, labels=args.labels,
    )
    print(
        f"datagen: {summary['days']} days ({summary['start']}..{summary['end']}), {summary['rows']} rows, "
        f"{summary['frauds']} frauds ({summary['fraud_share']:.3%}; scenario 1/2/3: "
        f"{'/'.join(str(v) for v in summary['frauds_by_scenario'].values())}), "
        f"labels {summary['labels']} ({summary['label_delay']}, {summary['label_events']} feed events), "
        f"{summary['seconds']:.1f} s -> {summary['lake']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
