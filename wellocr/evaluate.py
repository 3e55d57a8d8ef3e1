"""`python -m wellocr.evaluate` — score a run's adapter (or the base model) on a data split.

    python -m wellocr.evaluate --run RUN_DIR [--checkpoint final|best|latest|PATH] [--split eval]
                               [--limit N] [--base-model] [--batch-size B]
    python -m wellocr.evaluate --run RUN_DIR --engine tesseract|rapidocr|easyocr [--split eval] [--limit N]
                               [--labels FILE]

`--engine` scores a classical OCR engine instead of a model, on the CPU (wellocr.baselines: the engine's words,
parsed into `LABEL: value` lines by wellocr.labelparse; `--labels FILE` extends its label table), into
`<run>/eval/<engine>[-<split>][-n<N>]/` with the same three files.

Every sample is transcribed with batched greedy decoding, scored against its reference (wellocr.metrics) and
given its own loss: the mean cross-entropy over its answer tokens (+ `<|im_end|>` and the newline after it),
with inputs built by TRL's own vision collator, so it is the number training minimises, per sample. The work is
done by wellocr.inference (model calls, scoring, outputs) over a run read with wellocr.artifacts.

Outputs go to `<run>/eval/<name>/`, where name is `final`, `best`, `checkpoint-<step>` (`--checkpoint latest`
or a path: the directory's name) or `base` (`--base-model`), then `-<split>` when the split is not `eval` and
`-n<N>` with `--limit`, so no two kinds of evaluation overwrite each other:

- `metrics.json`:
    cer, wer, cer_normalized, wer_normalized  corpus rates, edit-weighted (definitions: wellocr.metrics)
    char_edits, ref_chars, word_edits, ref_words  the counts behind the raw rates
    fields          field precision/recall/f1/exact_match/per_field (wellocr.metrics.field_scores); null when
                    no reference has fields
    samples         rows evaluated
    mean_loss       mean of the per-sample losses (each sample weighs the same, unlike the trainer's eval_loss,
                    which is a token-weighted mean per batch)
    generation      {samples_per_second, new_tokens_per_second, batch_size, seconds, new_tokens, max_new_tokens,
                    hit_max_new_tokens}: throughput of the generate calls (preprocessing and decoding included,
                    loss passes excluded); hit_max_new_tokens counts samples cut off at the limit
    checkpoint      {name, step, path}: the checkpoint evaluated (name "base", step and path null, for the base)
    split, limit    the split and --limit (null when all rows)
    base_model      true when no adapter was loaded
    model           the base model's hub id or directory
    run             the run directory's name (null when evaluated outside a run)
    created_at      ISO 8601 UTC time the evaluation finished
- `predictions.jsonl`: one JSON object per sample, in split order: index (the row's index in the data set
  split, counting skipped bad rows), prediction, reference, loss, cer, wer.
- `report.html`: a self-contained page (wellocr.report).

Training calls `wellocr.inference.evaluate_model` at its end with the model it holds, and
`wellocr.inference.generation_metrics` (+ `worst_samples`) at each evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wellocr import inference
from wellocr.artifacts import BASE_NAME, eval_dir_name, load_run_config, resolve_checkpoint
from wellocr.cli import UserErrorParser, positive_int, run_command
from wellocr.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = UserErrorParser(prog="python -m wellocr.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds config.yaml)")
    parser.add_argument("--checkpoint", default="final",
                        help="final (default), best (lowest eval loss), latest, or a checkpoint directory")
    parser.add_argument("--split", default="eval", help="data split to evaluate (default: eval)")
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N rows")
    parser.add_argument("--base-model", action="store_true",
                        help="evaluate the base model without any adapter (--checkpoint is then ignored)")
    parser.add_argument("--batch-size", type=positive_int,
                        help="samples per generate() and loss batch (default: the run's eval.batch_size)")
    parser.add_argument("--engine", choices=("tesseract", "rapidocr", "easyocr"),
                        help="score this classical OCR engine (CPU) instead of a model: a baseline")
    parser.add_argument("--labels", type=Path,
                        help="with --engine: a YAML file of printed labels added to wellocr/header_labels.yaml")
    return parser.parse_args(argv)


def print_summary(metrics: dict[str, Any], out_dir: Path) -> None:
    gen = metrics["generation"]
    fields = metrics["fields"]
    print(f"{metrics['checkpoint']['name']} on {metrics['split']} ({metrics['samples']} samples)")
    print(f"  CER {metrics['cer']:.4f}  WER {metrics['wer']:.4f}  "
          f"(normalised: CER {metrics['cer_normalized']:.4f}  WER {metrics['wer_normalized']:.4f})")
    if fields is not None:
        print(f"  fields F1 {fields['f1']:.4f}  exact match {fields['exact_match']:.4f}")
    print(f"  mean loss {metrics['mean_loss']:.4f}")
    print(f"  generation {gen['samples_per_second']:.2f} samples/s, {gen['new_tokens_per_second']:.1f} new tokens/s "
          f"(batch {gen['batch_size']}; {gen['hit_max_new_tokens']} of {metrics['samples']} hit "
          f"max_new_tokens {gen['max_new_tokens']})")
    print(f"  wrote {out_dir}/metrics.json, predictions.jsonl, report.html", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from wellocr.data import load_splits

    run_dir = args.run
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: no such directory")
    cfg = load_run_config(run_dir)
    if args.engine is not None:
        return run_engine(args, cfg)
    if args.labels is not None:
        raise UserError("--labels: only used with --engine (it extends the baseline parser's label table)")
    adapter_dir, name = (None, BASE_NAME) if args.base_model else resolve_checkpoint(run_dir, args.checkpoint)
    backend = inference.prepare_backend(cfg)
    splits = load_splits(cfg.data)
    if args.split not in splits:
        raise UserError(f"--split {args.split}: the data set has no such split (splits: {', '.join(splits)})")
    model, processor = inference.load_model(cfg, backend, adapter_dir)
    out_dir = run_dir / "eval" / eval_dir_name(name, args.split, args.limit)
    metrics = inference.evaluate_model(model, processor, cfg, splits[args.split], out_dir, name, limit=args.limit,
                                       batch_size=args.batch_size, run_dir=run_dir, checkpoint_path=adapter_dir,
                                       backend=backend)
    print_summary(metrics, out_dir)
    return metrics


def run_engine(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    from wellocr.baselines import evaluate_engine, load_engine, print_summary
    from wellocr.data import load_splits
    from wellocr.labelparse import load_label_table

    load_label_table(args.labels)  # a bad --labels file and a missing engine fail before the data set is read
    engine = load_engine(args.engine)
    splits = load_splits(cfg.data)
    if args.split not in splits:
        raise UserError(f"--split {args.split}: the data set has no such split (splits: {', '.join(splits)})")
    out_dir = args.run / "eval" / eval_dir_name(engine.name, args.split, args.limit)
    metrics = evaluate_engine(engine, cfg, splits[args.split], out_dir, limit=args.limit, run_dir=args.run,
                              labels=args.labels)
    print_summary(metrics, out_dir)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
