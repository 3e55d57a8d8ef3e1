"""`python -m wellocr.cost --run RUN_DIR [--json] | --rates` — what a run has cost, from its ledger.

The ledger (`<run dir>/cost.json`), the budget cap and the report are in wellocr.ledger (its docstring has the
ledger's format and how billing starts), the price table per cloud in wellocr.prices; training keeps the ledger
with wellocr.callbacks.CostCallback. `--json` keys: docs/COST.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wellocr.errors import run_cli
from wellocr.ledger import cost_report, format_report
from wellocr.prices import table_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wellocr.cost", description="Cost report of a wellocr run.")
    parser.add_argument("--run", metavar="RUN_DIR", help="the run directory (holds cost.json)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (keys in docs/COST.md)")
    parser.add_argument("--rates", action="store_true", help="print the price table (markdown) and exit")
    args = parser.parse_args(argv)
    if args.rates:
        sys.stdout.write(table_markdown())
        return 0
    if not args.run:
        parser.error("--run RUN_DIR is required")

    def body() -> None:
        report = cost_report(Path(args.run))
        sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else format_report(report))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
