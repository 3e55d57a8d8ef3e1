"""`python -m wellocr.compare RUN_DIR ... [--json] [--wandb]` — which run is best, what it cost, and what differed.

One row per run, sorted by CER (runs without one last): the config keys whose values differ between the runs
(flattened `section.key`; the run's name and output directory are the row, not a difference), steps done, best
eval loss, CER, WER, field accuracy, cost and wall time. Everything is read from the run directories:

- steps: the furthest of run.json attempts' `step`, the final/ and checkpoint markers, and the cost ledger
- best eval loss: the lowest `eval_loss` in the checkpoints' trainer_state.json log history
- CER / WER / field accuracy (`fields.exact_match`): eval/final/metrics.json, else the newest
  eval/*/metrics.json on the eval split that evaluated an adapter (not the base model, not an OCR engine)
- cost: cost.json (wellocr.ledger); wall time: the sum of run.json attempts' ended_at - started_at

Below it, one row per evaluation (run x `eval/<name>/`): fine-tuned checkpoints, the base model and classical OCR
engines (`python -m wellocr.evaluate --engine`), each with its split, samples, field exact match, field F1, CER,
WER and seconds per image, so "is the fine-tuned model better than Tesseract on my headers?" is one look.

`--json` prints `{"differing_keys": [...], "runs": [{run, path, config, steps, best_eval_loss, cer, wer,
field_accuracy, metrics_from, cost_usd, wall_time_s, wandb}], "evaluations": [{run, evaluation, kind, split,
samples, limit, field_exact_match, field_f1, cer, wer, seconds_per_image}]}` with null for anything unknown.
`--wandb` adds each run's W&B URL and fills CER/WER the run directory lacks from the W&B run summary
(`eval/cer`, `eval/wer`), through `wandb.Api()`; offline or on any failure it warns in one line and goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from wellocr.artifacts import evaluation_kind, list_evaluations, read_metrics, seconds_per_image
from wellocr.checkpoint import eval_losses, list_checkpoints, read_json_dict, read_marker, read_trainer_state
from wellocr.errors import UserError, run_cli
from wellocr.ledger import LEDGER_NAME, read_ledger, segment_usd
from wellocr.rundir import RunDir

NOT_DIFFERENCES = frozenset({"run.run_name", "run.output_dir"})
WANDB_OFFLINE_MODES = frozenset({"offline", "disabled", "dryrun"})


def flat_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml as `section.key` -> value (the saved, resolved config; no validation needed to compare)."""
    data = RunDir(run_dir).read_config_data() or {}
    flat = {}
    for section, values in data.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[str(section)] = values
    return flat


def steps_done(run_dir: Path, run: dict[str, Any], ledger: dict[str, Any] | None) -> int | None:
    steps = [a["step"] for a in run.get("attempts", []) if isinstance(a.get("step"), int)]
    steps += [m["step"] for p in [run_dir / "final", *list_checkpoints(run_dir)]
              if (m := read_marker(p)) and isinstance(m.get("step"), int)]
    steps += [s["last_step"] for s in (ledger or {}).get("segments", [])]
    return max(steps, default=None)


def best_eval_loss(run_dir: Path) -> float | None:
    """Lowest eval loss logged up to any checkpoint (each trainer_state.json holds the history up to its step)."""
    return min((loss for path in list_checkpoints(run_dir) for loss in eval_losses(read_trainer_state(path))),
               default=None)


def pick_metrics(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """(eval name, metrics) of eval/final, else of the newest adapter evaluation on the eval split."""
    final = read_metrics(run_dir / "eval" / "final" / "metrics.json")
    if final:
        return "final", final
    candidates = []
    for path in (run_dir / "eval").glob("*/metrics.json"):
        metrics = read_metrics(path)
        if not metrics or metrics.get("base_model") or path.parent.name == "base" or metrics.get("engine"):
            continue
        if metrics.get("split", "eval") != "eval":
            continue
        candidates.append((str(metrics.get("created_at") or ""), path.stat().st_mtime, path.parent.name, metrics))
    if not candidates:
        return None, {}
    _, _, name, metrics = max(candidates, key=lambda c: (c[0], c[1]))
    return name, metrics


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_summary(run_dir: Path) -> dict[str, Any]:
    """One row of the comparison, from the run directory alone. Raises UserError when it is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (RunDir(run_dir).config_file.is_file() or RunDir(run_dir).run_json.is_file()):
        raise UserError(f"{run_dir}: not a wellocr run directory (no config.yaml or run.json there)")
    run = read_json_dict(run_dir / "run.json")
    ledger = read_ledger(run_dir / LEDGER_NAME) if (run_dir / LEDGER_NAME).is_file() else None
    metrics_from, metrics = pick_metrics(run_dir)
    fields = metrics.get("fields") if isinstance(metrics.get("fields"), dict) else {}
    walls = [a["ended_at"] - a["started_at"] for a in run.get("attempts", [])
             if _number(a.get("ended_at")) is not None and _number(a.get("started_at")) is not None]
    return {
        "run": run_dir.name,
        "path": str(run_dir),
        "config": flat_config(run_dir),
        "steps": steps_done(run_dir, run, ledger),
        "best_eval_loss": best_eval_loss(run_dir),
        "cer": _number(metrics.get("cer")),
        "wer": _number(metrics.get("wer")),
        "field_accuracy": _number(fields.get("exact_match")),
        "metrics_from": metrics_from,
        "cost_usd": sum(segment_usd(s) for s in ledger["segments"]) if ledger else None,
        "wall_time_s": sum(walls) if walls else None,
        "wandb": None,
        "wandb_run_id": run.get("wandb_run_id"),
    }


def evaluation_rows(run: str, run_dir: Path) -> list[dict[str, Any]]:
    """One row per evaluation the run holds: fine-tuned first, then base, then engines, each by name."""
    order = {"fine-tuned": 0, "base": 1, "engine": 2}
    rows = []
    for name, metrics in list_evaluations(run_dir):
        fields = metrics.get("fields") if isinstance(metrics.get("fields"), dict) else {}
        rows.append({"run": run, "evaluation": name, "kind": evaluation_kind(metrics), "split": metrics.get("split"),
                     "samples": metrics.get("samples"), "limit": metrics.get("limit"),
                     "field_exact_match": _number(fields.get("exact_match")), "field_f1": _number(fields.get("f1")),
                     "cer": _number(metrics.get("cer")), "wer": _number(metrics.get("wer")),
                     "seconds_per_image": seconds_per_image(metrics)})
    return sorted(rows, key=lambda r: (order[r["kind"]], r["evaluation"]))


def differing_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values are not the same in every run (a key missing from a run counts as different)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["config"] if k not in keys]
    missing = object()
    return [k for k in keys if k not in NOT_DIFFERENCES
            and len({json.dumps(r["config"].get(k, missing), default=repr) for r in rows}) > 1]


def sort_by_cer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["cer"] is None, r["cer"] if r["cer"] is not None else math.inf, r["run"]))


def add_wandb(rows: list[dict[str, Any]], env: dict[str, str] | None = None) -> str | None:
    """Fill W&B URLs (and CER/WER the directories lack) in place; returns a one-line warning when it cannot."""
    env = os.environ if env is None else env
    mode = env.get("WANDB_MODE", "").strip().lower()
    if mode in WANDB_OFFLINE_MODES:
        return f"W&B is {mode} (WANDB_MODE={mode}); showing the local table only"
    if not any(r["wandb_run_id"] for r in rows):
        return "no run has a W&B run id in run.json; showing the local table only"
    try:
        import wandb

        api = wandb.Api(timeout=20)
        for row in rows:
            if not row["wandb_run_id"]:
                continue
            project = row["config"].get("wandb.project") or "well-log-ocr"
            entity = row["config"].get("wandb.entity")
            path = f"{project}/{row['wandb_run_id']}"
            remote = api.run(f"{entity}/{path}" if entity else path)
            summary = dict(remote.summary)
            row["wandb"] = {"url": remote.url, "state": remote.state}
            for key, wandb_key in (("cer", "eval/cer"), ("wer", "eval/wer")):
                if row[key] is None and _number(summary.get(wandb_key)) is not None:
                    row[key] = float(summary[wandb_key])
                    row["metrics_from"] = row["metrics_from"] or "wandb"
    except Exception as exc:  # noqa: BLE001 - W&B is optional here; any failure falls back to the local table
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"W&B lookup failed ({first}); showing the local table only"
    return None


def compare(run_dirs: list[Path], use_wandb: bool = False) -> tuple[dict[str, Any], str | None]:
    rows = [run_summary(Path(p)) for p in run_dirs]
    names = [r["run"] for r in rows]
    if len(set(names)) < len(names):  # same directory name under different parents: show the paths
        for row in rows:
            row["run"] = row["path"]
    warning = add_wandb(rows) if use_wandb else None
    diff = differing_keys(rows)
    rows = sort_by_cer(rows)
    runs = [{**{k: v for k, v in r.items() if k not in ("config", "wandb_run_id")},
             "config": {k: r["config"].get(k) for k in diff}} for r in rows]
    evaluations = [e for r in rows for e in evaluation_rows(r["run"], Path(r["path"]))]
    return {"differing_keys": diff, "runs": runs, "evaluations": evaluations}, warning


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{seconds / 60:.1f}m"


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def format_table(result: dict[str, Any]) -> str:
    diff = result["differing_keys"]
    header = ["run", *diff, "steps", "best eval loss", "CER", "WER", "field acc", "cost", "wall time"]
    has_wandb = any(r["wandb"] for r in result["runs"])
    if has_wandb:
        header.append("W&B")
    lines = []
    for r in result["runs"]:
        cells = [r["run"], *(_cell(r["config"][k]) for k in diff), _cell(r["steps"]),
                 _cell(r["best_eval_loss"], "{:.4f}"), _cell(r["cer"], "{:.4f}"), _cell(r["wer"], "{:.4f}"),
                 _cell(r["field_accuracy"], "{:.1%}"), _cell(r["cost_usd"], "${:.2f}"), _duration(r["wall_time_s"])]
        if has_wandb:
            cells.append((r["wandb"] or {}).get("url", "-"))
        lines.append(cells)
    out = _render(header, lines)
    if not diff and len(result["runs"]) > 1:
        out.append("(the runs' configs are identical)")
    evaluations = result.get("evaluations") or []
    if evaluations:
        header = ["run", "evaluation", "kind", "split", "samples", "field exact", "field F1", "CER", "WER",
                  "s/image"]
        lines = [[e["run"], e["evaluation"], e["kind"], _cell(e["split"]), _cell(e["samples"]),
                  _cell(e["field_exact_match"], "{:.1%}"), _cell(e["field_f1"], "{:.4f}"), _cell(e["cer"], "{:.4f}"),
                  _cell(e["wer"], "{:.4f}"), _cell(e["seconds_per_image"], "{:.2f}")] for e in evaluations]
        out += ["", *_render(header, lines)]
    return "\n".join(out) + "\n"


def _render(header: list[str], lines: list[list[Any]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return [render(header), render(["-" * w for w in widths]), *(render(row) for row in lines)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wellocr.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--wandb", action="store_true", help="also read the runs from W&B (online only)")
    args = parser.parse_args(argv)

    def body() -> None:
        result, warning = compare([Path(p) for p in args.runs], use_wandb=args.wandb)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n" if args.json else format_table(result))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
