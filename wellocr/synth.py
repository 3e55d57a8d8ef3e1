"""`python -m wellocr.synth --out DIR --train N --eval M [--test K] --seed S [--difficulty D] [--width W]
[--word-boxes]`: write a synthetic well-log header data set in the real schema (the generator: wellocr.synthetic);
`--word-boxes` adds `words/<split>.jsonl`, the words drawn on each row with their pixel boxes."""

from __future__ import annotations

import argparse
import sys

from wellocr.errors import run_cli
from wellocr.synthetic import EMPTY_SPLIT_REASON, IMAGE_FORMATS, MIN_WIDTH, write_dataset


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wellocr.synth",
                                     description="Write a synthetic well-log header OCR data set.")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--train", type=int, required=True, help="rows in split train")
    parser.add_argument("--eval", type=int, required=True, help="rows in split eval")
    parser.add_argument("--test", type=int, default=0, help="rows in split test (0: no test split)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--difficulty", type=float, default=0.3, help="scan defects, 0 (clean) to 1")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels")
    parser.add_argument("--image-format", default="JPEG", choices=IMAGE_FORMATS)
    parser.add_argument("--word-boxes", action="store_true",
                        help="also write words/<split>.jsonl: every word drawn on each row and its box in pixels")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name, least in (("train", 1), ("eval", 1), ("test", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be >= {least}, got {getattr(args, name)} ({EMPTY_SPLIT_REASON})")
    if not 0.0 <= args.difficulty <= 1.0:
        parser.error(f"--difficulty must be in [0, 1], got {args.difficulty}")
    if args.width < MIN_WIDTH:
        parser.error(f"--width must be at least {MIN_WIDTH}, got {args.width}")

    def body() -> None:
        out_dir = write_dataset(args.out, args.train, args.eval, args.test, args.seed, args.difficulty,
                                args.width, args.image_format, args.word_boxes)
        counts = f"train={args.train} eval={args.eval}" + (f" test={args.test}" if args.test else "")
        print(f"{out_dir} {counts}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
