"""`python -m wellocr.prepare` — your own scans and labels as a data set wellocr trains on.

    python -m wellocr.prepare --images DIR --labels FILE --out DIR [--eval-fraction F] [--seed S]

DIR holds the scans (PNG, JPEG, TIFF, ...; PDFs with the `pdf` extra; the first page of a multi-page file), FILE
is a CSV or JSONL labels file: a `file_name` column and either an `answer` column or one column per field. OUT
gets parquet splits train and eval in the layout `data.dataset_name` takes (wellocr.scans has the details). Every
file that gave no row is listed on stderr with the reason; a labels file that cannot be read is a one-line error.
"""

from __future__ import annotations

import sys
from pathlib import Path

from wellocr.cli import UserErrorParser, run_command
from wellocr.scans import prepare


def parse_args(argv: list[str] | None):
    parser = UserErrorParser(prog="python -m wellocr.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, type=Path, metavar="DIR", help="folder of scans")
    parser.add_argument("--labels", required=True, type=Path, metavar="FILE", help="labels file (.csv or .jsonl)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="new folder for the data set")
    parser.add_argument("--eval-fraction", type=float, default=0.1, metavar="F",
                        help="share of the rows held out for evaluation (default 0.1; at least one row)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the train/eval shuffle")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = parse_args(argv)
        result = prepare(args.images, args.labels, args.out, args.eval_fraction, args.seed,
                         report=lambda line: print(line, file=sys.stderr, flush=True))
        pages = f"; {result.first_pages} multi-page scan(s): first page used" if result.first_pages else ""
        skipped = f"; {len(result.skipped)} file(s) skipped (listed above)" if result.skipped else ""
        print(f"{result.out_dir}: train {result.counts['train']}, eval {result.counts['eval']} rows{pages}{skipped}"
              f" (train with --set data.dataset_name={result.out_dir})", flush=True)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
