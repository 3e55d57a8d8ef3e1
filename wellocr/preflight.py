"""Checks that run before the model loads, so a misconfigured job fails in seconds instead of after paying for
a GPU: model reachable, data reachable (first row decodes), output dir writable with room for the checkpoints
it keeps, GPU memory for the config, W&B credentials. Each failure is one `UserError` line.

Imports neither transformers, TRL nor PEFT: Unsloth must be imported before them, after preflight.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wellocr.config import Config
from wellocr.errors import UserError
from wellocr.retry import is_transient_network_error, network_retry, unreachable

log = logging.getLogger("wellocr")

GIB = 2**30
OPTIMIZER_BYTES_PER_PARAM = {"8bit": 2, "default": 8}  # two Adam moments, 8-bit or fp32


@dataclass
class PreflightReport:
    lines: list[str] = field(default_factory=list)
    model_config: dict[str, Any] = field(default_factory=dict)
    wandb_mode: str | None = None  # "offline" when preflight found no W&B credentials

    def ok(self, text: str) -> None:
        self.lines.append(f"  ok    {text}")
        print(self.lines[-1], flush=True)

    def note(self, text: str) -> None:
        self.lines.append(f"  note  {text}")
        print(self.lines[-1], flush=True)


def read_model_config(name: str, revision: str | None) -> dict[str, Any]:
    """config.json of a local model directory or a hub repo (retried on network errors)."""
    local = Path(name).expanduser()
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise UserError(f"model.model_name: {local} has no config.json (not a saved model directory)")
        return json.loads(path.read_text())
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = network_retry()(hf_hub_download)(name, "config.json", revision=revision)
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"model.model_name: '{name}' is neither a local directory nor a reachable hub model "
                        "(check the name, HF_TOKEN for gated models)") from None
    except RevisionNotFoundError:
        raise UserError(f"model.model_revision: revision '{revision}' not found for '{name}'") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if not constants.HF_HUB_OFFLINE:  # not cached, and the hub could not be asked
            raise unreachable(f"model.model_name: the hub for '{name}'", exc) from None
        raise UserError(f"model.model_name: '{name}' is not in the local HF cache and HF_HUB_OFFLINE=1 forbids "
                        f"downloading it; unset HF_HUB_OFFLINE, download it once (hf download {name}), or set "
                        "model.model_name to a local directory") from None
    except EntryNotFoundError:
        raise UserError(f"model.model_name: '{name}' has no config.json") from None
    except Exception as exc:  # noqa: BLE001 - a network failure that outlived the retries, in one line
        if is_transient_network_error(exc) or isinstance(exc, OSError):
            raise unreachable(f"model.model_name: the hub for '{name}'", exc) from None
        raise
    return json.loads(Path(path).read_text())


def lora_parameter_count(model_config: dict[str, Any], cfg: Config) -> int:
    """LoRA parameters the config will train, from the architecture alone (r x (in + out) per adapted linear)."""
    text = model_config.get("text_config", model_config)
    vision = model_config.get("vision_config", {})
    lora, r = cfg.lora, cfg.lora.r
    total = 0
    if lora.finetune_language_layers and text:
        h, heads = text.get("hidden_size", 0), text.get("num_attention_heads", 1)
        head_dim = text.get("head_dim") or h // heads
        kv = text.get("num_key_value_heads", heads) * head_dim
        q = heads * head_dim
        per_layer = 0
        if lora.finetune_attention_modules:
            per_layer += (h + q) + 2 * (h + kv) + (q + h)
        if lora.finetune_mlp_modules:
            per_layer += 3 * (h + text.get("intermediate_size", 0))
        total += r * per_layer * text.get("num_hidden_layers", 0)
    if lora.finetune_vision_layers and vision:
        h, inter = vision.get("hidden_size", 0), vision.get("intermediate_size", 0)
        per_layer = 0
        if lora.finetune_attention_modules:
            per_layer += (h + 3 * h) + (h + h)
        if lora.finetune_mlp_modules:
            per_layer += 2 * (h + inter)
        total += r * per_layer * vision.get("depth", 0)
    return total


def checkpoint_bytes(model_config: dict[str, Any], cfg: Config) -> int:
    params = lora_parameter_count(model_config, cfg)
    optimizer = OPTIMIZER_BYTES_PER_PARAM["8bit" if "8bit" in cfg.train.optim else "default"]
    return params * (4 + optimizer) + 2 * 2**20  # fp32 adapter + optimizer state + processor/tokenizer files


def estimated_gpu_gb(model_config: dict[str, Any], cfg: Config, micro_batch: int) -> float:
    """Rough peak GPU memory: 4-bit language model, 16-bit vision tower, activations with checkpointing.

    Calibrated on the real 2B architecture on an H200 (2.9 GB reserved at micro-batch 2, 4.4 GB at 8, 1024x768
    images): meant to catch a config that cannot fit, not to size it to the last GB.
    """
    text, vision = model_config.get("text_config", {}), model_config.get("vision_config", {})
    h, layers = text.get("hidden_size", 2048), text.get("num_hidden_layers", 28)
    vocab = text.get("vocab_size", model_config.get("vocab_size", 151936))
    text_params = layers * 12 * h * h + vocab * h
    vision_params = vision.get("depth", 24) * 12 * vision.get("hidden_size", 1024) ** 2
    weight_bytes = (0.55 if cfg.model.load_in_4bit else 2.0) * text_params + 2.0 * vision_params
    tokens = cfg.data.max_pixels // 1024 + 700
    activation_bytes = micro_batch * tokens * h * layers * 4
    return (weight_bytes + activation_bytes) / GIB * 1.2 + 1.0


def check_output_dir(cfg: Config, run_dir: Path, needed: int, report: PreflightReport) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".preflight-"):
            pass
    except OSError as exc:
        raise UserError(f"run.output_dir: cannot write to {run_dir}: {exc.strerror}") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise UserError(f"run.output_dir: {run_dir} has {free / GIB:.1f} GiB free, the checkpoints it keeps need "
                        f"~{needed / GIB:.1f} GiB; free space or lower checkpoint.keep_best/keep_recent")
    report.ok(f"output dir writable: {run_dir} ({free / GIB:.1f} GiB free, ~{needed / 2**20:.0f} MiB needed)")


def check_data(cfg: Config, report: PreflightReport) -> None:
    from wellocr.data import load_raw_splits, open_image

    splits = load_raw_splits(cfg.data)
    first = splits["train"][0] if len(splits["train"]) else None
    if first is None:
        raise UserError(f"data.dataset_name: '{cfg.data.dataset_name}' has an empty train split")
    try:
        open_image(first["image_base64"])
    except Exception as exc:  # noqa: BLE001 - any decode failure of row 0 is the user's data problem
        raise UserError(f"data set '{cfg.data.dataset_name}' train row 0 does not decode: {exc}") from None
    sizes = ", ".join(f"{name} {len(ds)}" for name, ds in splits.items())
    report.ok(f"data reachable: {cfg.data.dataset_name} ({sizes} rows; first row decodes)")


def check_gpu(cfg: Config, model_config: dict[str, Any], report: PreflightReport) -> None:
    import torch

    if not torch.cuda.is_available():
        report.note("no CUDA GPU: GPU memory check skipped (training runs on CPU)")
        return
    props = torch.cuda.get_device_properties(0)
    total = props.total_memory / GIB
    micro_batch = cfg.train.per_device_train_batch_size
    if micro_batch == "auto":
        micro_batch = 1  # auto picks what fits; the check is that the smallest does
    need = estimated_gpu_gb(model_config, cfg, micro_batch)
    if total < need:
        raise UserError(f"GPU {props.name} has {total:.0f} GiB, the config needs ~{need:.0f} GiB; lower "
                        "train.per_device_train_batch_size or data.max_pixels")
    report.ok(f"GPU {props.name}: {total:.0f} GiB, config needs ~{need:.1f} GiB")


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def check_wandb(cfg: Config, report: PreflightReport) -> None:
    """Sets report.wandb_mode to "offline" when there are no credentials (the tracker then logs offline)."""
    if not cfg.wandb.enabled:
        report.note("W&B disabled (wandb.enabled: false)")
        return
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        report.note(f"W&B mode {mode}: runs are written locally under wandb/")
        return
    if not wandb_credentials_present():
        log.warning("no W&B credentials (WANDB_API_KEY or ~/.netrc): logging offline; `wandb sync` uploads later")
        report.wandb_mode = "offline"
        report.note("W&B offline: no credentials found")
        return
    report.ok("W&B credentials present")


def run_preflight(cfg: Config, run_dir: Path) -> PreflightReport:
    """All checks that need no torch, in order; raises UserError with one line at the first failure. The GPU check
    (`check_gpu`) comes after the compile caches are set up (wellocr.bootstrap), since it imports torch."""
    report = PreflightReport()
    print("Preflight:", flush=True)
    report.ok("config valid")
    report.model_config = read_model_config(cfg.model.model_name, cfg.model.model_revision)
    report.ok(f"model reachable: {cfg.model.model_name}")
    check_data(cfg, report)
    keep = cfg.checkpoint.keep_best + cfg.checkpoint.keep_recent + 2  # + final + the one being written
    check_output_dir(cfg, run_dir, keep * checkpoint_bytes(report.model_config, cfg), report)
    check_wandb(cfg, report)
    return report
