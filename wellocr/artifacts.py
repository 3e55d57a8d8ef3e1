"""Reading what a training run left in its directory: its saved config, its checkpoints by name, and the names and
metrics of its evaluations. The commands that work on a finished run (evaluate, predict, export, compare, cost)
read runs through this module only; nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wellocr.checkpoint import (
    best_checkpoint,
    checkpoint_step,
    incomplete_reason,
    latest_complete_checkpoint,
    read_marker,
    read_trainer_state,
)
from wellocr.config import Config, config_from_dict
from wellocr.errors import UserError
from wellocr.rundir import RunDir

BASE_NAME = "base"  # the evaluation of the base model, without any adapter


# ---------------------------------------------------------------- the run's config


def load_run_config(run_dir: Path) -> Config:
    """The config a run was trained with (its config.yaml, read by wellocr.rundir.RunDir), validated."""
    run = RunDir(run_dir)
    data = run.read_config_data()
    if data is None:
        raise UserError(f"--run {run_dir}: no {run.config_file.name} there; give a run directory made by wellocr.train")
    return config_from_dict(data, str(run.config_file))


# ---------------------------------------------------------------- checkpoints by name


def resolve_checkpoint(run_dir: Path, choice: str) -> tuple[Path, str]:
    """(adapter directory, name) for --checkpoint final|best|latest|PATH; the directory must be complete."""
    run_dir = Path(run_dir)
    if choice == "final":
        path, name = run_dir / "final", "final"
        if not path.is_dir():
            raise UserError(f"--checkpoint final: {run_dir} has no final/ adapter (training not finished?); "
                            "use --checkpoint latest or best")
    elif choice == "best":
        path, name = best_checkpoint(run_dir), "best"
        if path is None:
            raise UserError(f"--checkpoint best: no complete checkpoint of {run_dir} has an eval loss; "
                            "use --checkpoint final or latest")
    elif choice == "latest":
        path = latest_complete_checkpoint(run_dir)
        if path is None:
            raise UserError(f"--checkpoint latest: {run_dir} has no complete checkpoint-<step> directory; "
                            "use --checkpoint final")
        name = path.name
    else:
        path = Path(choice)
        if not path.is_dir():
            raise UserError(f"--checkpoint {choice}: no such directory; use final, best, latest or the path "
                            "of a checkpoint directory")
        name = path.resolve().name
    reason = incomplete_reason(path)
    if reason is not None:
        raise UserError(f"--checkpoint {choice}: {path} is not a complete checkpoint ({reason}); "
                        "pick another with --checkpoint")
    return path, name


def adapter_step(path: Path) -> int | None:
    """The training step of a checkpoint or final/ directory: its completeness marker's, else its name's."""
    return (read_marker(path) or {}).get("step", checkpoint_step(path))


def latest_trainer_state(run_dir: Path) -> dict[str, Any] | None:
    """The trainer_state.json of the run's newest complete checkpoint (its log history: losses, evaluations)."""
    latest = latest_complete_checkpoint(Path(run_dir))
    return read_trainer_state(latest) if latest is not None else None


def checkpoint_info(name: str, path: Path | None) -> dict[str, Any]:
    """The `checkpoint` entry of metrics.json: name, training step (from the completeness marker) and path."""
    if path is None:
        return {"name": name, "step": None, "path": None}
    return {"name": name, "step": adapter_step(path), "path": str(path)}


# ---------------------------------------------------------------- evaluations


def eval_dir_name(checkpoint_name: str, split: str = "eval", limit: int | None = None) -> str:
    """`<checkpoint>[-<split>][-n<limit>]`: the split and limit are part of the name so runs never collide."""
    name = checkpoint_name
    if split != "eval":
        name += f"-{split}"
    if limit is not None:
        name += f"-n{limit}"
    return name


def read_metrics(path: Path) -> dict[str, Any] | None:
    """An evaluation's metrics.json (top level, or under "metrics"), or None when absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = {**data["metrics"], **{k: v for k, v in data.items() if k != "metrics"}}
    return data if isinstance(data, dict) else None


def evaluation_kind(metrics: dict[str, Any]) -> str:
    """"engine" (a classical OCR baseline, wellocr.baselines), "base" (the base model, no adapter) or
    "fine-tuned"."""
    if metrics.get("engine"):
        return "engine"
    return "base" if metrics.get("base_model") else "fine-tuned"


def seconds_per_image(metrics: dict[str, Any]) -> float | None:
    """An engine's CPU seconds per image, or a model's generation seconds per sample (at its batch size)."""
    value = (metrics.get("engine") or {}).get("seconds_per_image")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    rate = (metrics.get("generation") or {}).get("samples_per_second")
    return 1.0 / rate if isinstance(rate, (int, float)) and rate > 0 else None


def list_evaluations(run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, metrics) of every readable `<run>/eval/<name>/metrics.json`, by name."""
    found = []
    for path in sorted((Path(run_dir) / "eval").glob("*/metrics.json")):
        metrics = read_metrics(path)
        if metrics is not None:
            found.append((path.parent.name, metrics))
    return found
