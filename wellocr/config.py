"""The experiment config: one typed dataclass tree, loaded from YAML, overridden from the command line.

Precedence: defaults < YAML file < `--set section.key=value` (a bare `key=value` works when the key name is
unique across sections). Values are coerced to the field's type, so YAML's `2e-4` (a string to PyYAML) is a
float here. Every mistake is a `UserError` naming the file (or `--set`) and the key, with a "did you mean".

`python -m wellocr.config --reference` prints the reference table of every key (docs/CONFIG.md is that output).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wellocr.errors import UserError, run_cli

CONFIG_ENV_VAR = "WELLOCR_CONFIG"
CONFIGS_DIR = Path("configs")

DEFAULT_INSTRUCTION = (
    "Transcribe the header of this scanned well log. Answer with one 'LABEL: value' line per field."
)


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A field with its one-line help (for --reference) and, optionally, its allowed values."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    model_name: str = _f("unsloth/Qwen3-VL-2B-Instruct-unsloth-bnb-4bit", "hub id or local directory of the base model")
    model_revision: str | None = _f(None, "hub revision (branch, tag or commit) to pin; a resumed run loads the same")
    backend: str = _f("auto", "unsloth (CUDA), hf (transformers+PEFT, CPU or CUDA), or auto", ("auto", "unsloth", "hf"))
    load_in_4bit: bool = _f(True, "QLoRA: load the base weights in 4-bit NF4 (CUDA only; ignored on CPU)")
    use_gradient_checkpointing: str = _f(
        "unsloth", "activation checkpointing: unsloth (offloaded), true, or false", ("unsloth", "true", "false")
    )
    build_tiny_if_missing: bool = _f(False, "build the offline tiny random-weight model at model_name when absent")


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA path")
    finetune_vision_layers: bool = _f(True, "put LoRA on the vision tower")
    finetune_language_layers: bool = _f(True, "put LoRA on the language model")
    finetune_attention_modules: bool = _f(True, "put LoRA on attention projections")
    finetune_mlp_modules: bool = _f(True, "put LoRA on MLP projections")


@dataclass
class DataConfig:
    dataset_name: str = _f("wrath/well-log-headers-ocr", "hub id, local data set directory, or parquet file/glob")
    dataset_revision: str | None = _f(None, "hub revision of the data set to pin")
    train_subset: int = _f(-1, "use the first N training rows (-1 = all)")
    eval_subset: int = _f(-1, "use the first N eval rows (-1 = all)")
    instruction: str = _f(DEFAULT_INSTRUCTION, "prompt used only for rows that have no instruction of their own")
    min_pixels: int = _f(256 * 32 * 32, "smallest image area after resizing (pixels); 32x32 px = one visual token")
    max_pixels: int = _f(1280 * 32 * 32, "largest image area after resizing (pixels); caps visual tokens per image")
    max_image_pixels: int = _f(60_000_000, "reject images whose header claims more pixels (decompression bombs)")
    max_bad_fraction: float = _f(0.01, "fail when more than this fraction of a split's rows is unreadable")
    dataset_num_proc: int = _f(4, "processes for data set preparation")
    dataloader_num_workers: int = _f(4, "DataLoader worker processes (decoding + processor work; about 14 samples/s "
                                        "each); capped at the machine's CPUs minus one")
    build_synthetic_if_missing: bool = _f(False, "write a synthetic data set at dataset_name when absent")
    synthetic_train: int = _f(64, "rows of the synthetic train split (with build_synthetic_if_missing)")
    synthetic_eval: int = _f(16, "rows of the synthetic eval split (with build_synthetic_if_missing)")
    synthetic_width: int = _f(512, "image width of synthetic samples (with build_synthetic_if_missing)")


@dataclass
class TrainConfig:
    max_steps: int = _f(500, "optimizer steps to train")
    learning_rate: float = _f(2e-4, "peak learning rate")
    per_device_train_batch_size: int | str = _f(2, "micro-batch size, or auto: the largest that fits the GPU "
                                                "(2 on CPU), with accumulation keeping effective_batch_size")
    effective_batch_size: int = _f(8, "samples per optimizer step when per_device_train_batch_size is auto")
    per_device_eval_batch_size: int = _f(2, "eval batch size")
    gradient_accumulation_steps: int = _f(4, "micro-batches per optimizer step")
    warmup_steps: int = _f(5, "linear warm-up steps")
    optim: str = _f("adamw_8bit", "optimizer (transformers name); adamw_8bit falls back to adamw_torch on CPU")
    weight_decay: float = _f(0.01, "weight decay")
    lr_scheduler_type: str = _f("linear", "learning-rate schedule (transformers name)")
    precision: str = _f("auto", "auto picks bf16 where supported, else fp16 on CUDA, fp32 on CPU",
                        ("auto", "bf16", "fp16", "fp32"))
    max_seq_length: int = _f(2048, "longest sample (image + prompt + answer tokens); longer samples are reported and skipped")
    seed: int = _f(3407, "seed for LoRA init, data order and dropout")
    logging_steps: int = _f(1, "log every N steps")
    eval_steps: int = _f(50, "evaluate every N steps")
    save_steps: int = _f(50, "checkpoint every N steps")
    early_stopping_patience: int = _f(0, "stop after N evaluations without improvement (0 = off)")
    early_stopping_threshold: float = _f(0.0, "minimum eval-loss improvement that counts")


@dataclass
class EvalConfig:
    generation_samples: int = _f(8, "fixed eval rows decoded at every evaluation for eval/cer and eval/wer (0 = off)")
    batch_size: int = _f(8, "samples per generate() call")
    max_new_tokens: int = _f(512, "generation limit per sample")
    worst_k: int = _f(10, "worst samples shown in W&B tables and report.html")


@dataclass
class CheckpointConfig:
    keep_best: int = _f(2, "keep the N checkpoints with the lowest eval loss")
    keep_recent: int = _f(2, "keep the N most recent checkpoints")
    remote: str | None = _f(None, "object-storage URL the trainer syncs checkpoints to (s3://bucket/prefix, gs://...); "
                            "S3-compatible stores such as R2 via AWS_ENDPOINT_URL")
    upload_timeout_s: float = _f(600.0, "at exit, wait at most this long for pending uploads")


@dataclass
class RunConfig:
    output_dir: str = _f("runs", "parent of run directories (a RunPod network volume path on the cloud)")
    run_name: str | None = _f(None, "run directory name; default: from SKYPILOT_TASK_ID, else generated once")
    compile_cache_dir: str | None = _f(None, "compile caches kept across restarts (Unsloth, inductor, Triton; Python "
                                       "bytecode where torch has none); default <output_dir>/.compile-cache (the environment's own "
                                       "variables win)")


@dataclass
class CostConfig:
    gpu_type: str = _f("RTX4090", "GPU type for the cost ledger's rate table")
    gpu_count: int = _f(1, "GPUs billed per pod")
    spot_instance: bool = _f(True, "billed at the spot rate")
    hourly_rate: float | None = _f(None, "USD per GPU-hour; null = the rate table's estimate for gpu_type")
    bill_from: str = _f("boot", "a segment is billed from the machine's boot (setup and downloads included) or "
                        "from the process start", ("boot", "process"))
    budget_cap: float = _f(10.0, "USD over all attempts; at the cap the run saves and stops (exit 0)")


@dataclass
class WandbConfig:
    enabled: bool = _f(True, "log to Weights & Biases (offline when no credentials)")
    project: str = _f("well-log-ocr", "W&B project")
    entity: str | None = _f(None, "W&B entity (team or user)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# Keys a resumed run may change; every other key would change the training trajectory.
MUTABLE_ON_RESUME = frozenset(
    {
        "train.max_steps", "train.eval_steps", "train.save_steps", "train.logging_steps",
        "train.early_stopping_patience", "train.early_stopping_threshold",
        "data.dataset_num_proc", "data.dataloader_num_workers",
        "model.build_tiny_if_missing", "data.build_synthetic_if_missing",
        "run.output_dir", "run.run_name",
    }
    | {f"{s}.{f.name}" for s in ("eval", "checkpoint", "cost", "wandb") for f in dataclasses.fields(
        {"eval": EvalConfig, "checkpoint": CheckpointConfig, "cost": CostConfig, "wandb": WandbConfig}[s])}
)


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else globals()[f.type] for f in dataclasses.fields(Config)}


def all_keys() -> dict[str, dataclasses.Field]:
    """Every `section.key` with its dataclass field, in declaration order."""
    keys = {}
    for section, cls in _sections().items():
        for f in dataclasses.fields(cls):
            keys[f"{section}.{f.name}"] = f
    return keys


def _field_type(section: str, name: str) -> Any:
    return typing.get_type_hints(_sections()[section])[name]


def _resolve_key(key: str, source: str) -> str:
    """Map `section.key` or an unambiguous bare `key` to `section.key`, or fail with a suggestion."""
    keys = all_keys()
    if key in keys:
        return key
    if "." not in key:
        owners = [k for k in keys if k.split(".", 1)[1] == key]
        if len(owners) == 1:
            return owners[0]
        if len(owners) > 1:
            raise UserError(f"{source}: key '{key}' is ambiguous; write one of {', '.join(owners)}")
    candidates = list(keys) + [k.split(".", 1)[1] for k in keys]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"{source}: unknown key '{key}'{hint}")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or fail naming the key."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if set(args) == {int, str}:  # an int or the literal "auto"
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return _coerce(value, int, key, source)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
        if optional:
            return None
        raise UserError(f"{source}: {key} must not be empty")

    def bad(expected: str) -> UserError:
        return UserError(f"{source}: {key} must be {expected}, got {value!r}")

    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise bad("true or false")
    if base is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise bad("an integer") from None
            if number.is_integer():
                return int(number)
        raise bad("an integer")
    if base is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(str(value).replace("_", ""))
        except ValueError:
            raise bad("a number") from None
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _parse_scalar(text: str) -> Any:
    """Read a --set value the way YAML would (so `1e-4`, `true`, `null` mean what they say)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _flatten_yaml(data: dict, source: str) -> dict[str, Any]:
    """Accept sectioned YAML (`train: {max_steps: 10}`) and bare top-level keys (`max_steps: 10`)."""
    flat: dict[str, Any] = {}
    sections = _sections()
    for top, value in data.items():
        top = str(top)
        if top in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise UserError(f"{source}: section '{top}' must be a mapping of keys to values")
            for key, inner in value.items():
                flat[_resolve_key(f"{top}.{key}", source)] = inner
        else:
            flat[_resolve_key(top, source)] = value
    return flat


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a YAML mapping of sections to keys")
    return data


def find_config_path(path: str | None) -> Path:
    """The explicit path, else $WELLOCR_CONFIG, else a one-line error listing the shipped configs."""
    chosen = path or os.environ.get(CONFIG_ENV_VAR)
    if chosen:
        return Path(chosen)
    shipped = sorted(str(p) for p in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.is_dir() else []
    listing = ", ".join(shipped) if shipped else "none found in ./configs"
    raise UserError(f"no config given: pass --config FILE or set {CONFIG_ENV_VAR} (configs: {listing})")


def apply_values(cfg: Config, values: dict[str, Any], source: str, origins: dict[str, str]) -> None:
    """Set `section.key` values on cfg, coerced to type; record where each came from."""
    for key, value in values.items():
        section, name = key.split(".", 1)
        hint = _field_type(section, name)
        coerced = _coerce(value, hint, key, source)
        choices = all_keys()[key].metadata.get("choices")
        if choices and coerced not in choices:
            raise UserError(f"{source}: {key} must be one of {', '.join(map(str, choices))}, got {coerced!r}")
        setattr(getattr(cfg, section), name, coerced)
        origins[key] = source


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    values = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected section.key=value")
        key, _, text = item.partition("=")
        values[_resolve_key(key.strip(), "--set")] = _parse_scalar(text)
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `--set` overrides; validated. Raises UserError on any mistake."""
    config_path = find_config_path(str(path) if path else None)
    cfg = Config()
    origins: dict[str, str] = {}
    apply_values(cfg, _flatten_yaml(_read_yaml(config_path), str(config_path)), str(config_path), origins)
    apply_values(cfg, parse_overrides(overrides or []), "--set", origins)
    validate(cfg, origins, default_source=str(config_path))
    return cfg


def config_from_dict(data: dict, source: str) -> Config:
    """Rebuild a Config from a saved `config.yaml` mapping (the run directory's copy)."""
    cfg = Config()
    origins: dict[str, str] = {}
    apply_values(cfg, _flatten_yaml(data, source), source, origins)
    validate(cfg, origins, default_source=source)
    return cfg


def validate(cfg: Config, origins: dict[str, str], default_source: str) -> None:
    """Reject impossible values, naming the file (or --set) the offending key came from."""

    def fail(key: str, problem: str) -> None:
        raise UserError(f"{origins.get(key, default_source)}: {key} {problem}")

    t, lora, data = cfg.train, cfg.lora, cfg.data
    positive = {
        "train.max_steps": t.max_steps, "train.effective_batch_size": t.effective_batch_size,
        "train.per_device_train_batch_size": 1 if t.per_device_train_batch_size == "auto" else t.per_device_train_batch_size,
        "train.per_device_eval_batch_size": t.per_device_eval_batch_size,
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps, "train.logging_steps": t.logging_steps,
        "train.eval_steps": t.eval_steps, "train.save_steps": t.save_steps, "train.max_seq_length": t.max_seq_length,
        "lora.r": lora.r, "lora.lora_alpha": lora.lora_alpha, "data.min_pixels": data.min_pixels,
        "data.max_pixels": data.max_pixels, "data.dataset_num_proc": data.dataset_num_proc,
        "eval.batch_size": cfg.eval.batch_size, "eval.max_new_tokens": cfg.eval.max_new_tokens,
    }
    for key, value in positive.items():
        if value <= 0:
            fail(key, f"must be > 0, got {value}")
    if t.learning_rate <= 0:
        fail("train.learning_rate", f"must be > 0, got {t.learning_rate}")
    for key in ("train.eval_steps", "train.save_steps"):
        value = getattr(t, key.split(".")[1])
        if value > t.max_steps:
            # name the source of whichever of the two keys was set last (a --set max_steps=... usually)
            if origins.get("train.max_steps") == "--set":
                origins = {**origins, key: "--set"}
            fail(key, f"({value}) must not exceed train.max_steps ({t.max_steps}); lower it too")
    non_negative = {
        "train.warmup_steps": t.warmup_steps, "train.weight_decay": t.weight_decay,
        "train.early_stopping_patience": t.early_stopping_patience, "eval.generation_samples":
        cfg.eval.generation_samples, "eval.worst_k": cfg.eval.worst_k, "checkpoint.keep_best": cfg.checkpoint.keep_best,
        "data.dataloader_num_workers": data.dataloader_num_workers, "cost.budget_cap": cfg.cost.budget_cap,
        "cost.hourly_rate": cfg.cost.hourly_rate or 0.0, "checkpoint.upload_timeout_s": cfg.checkpoint.upload_timeout_s,
    }
    for key, value in non_negative.items():
        if value < 0:
            fail(key, f"must be >= 0, got {value}")
    if cfg.cost.gpu_count < 1:
        fail("cost.gpu_count", f"must be >= 1, got {cfg.cost.gpu_count}")
    remote = cfg.checkpoint.remote
    if remote is not None and not re.match(r"^(s3|gs|gcs|memory|file)://.+", remote):
        fail("checkpoint.remote", f"must be an s3://, gs:// (or file://) URL, got {remote!r}")
    if cfg.checkpoint.keep_recent < 1:
        fail("checkpoint.keep_recent", "must be >= 1 (the latest checkpoint is what a preempted run resumes from)")
    if not 0 <= lora.lora_dropout < 1:
        fail("lora.lora_dropout", f"must be in [0, 1), got {lora.lora_dropout}")
    if not 0 <= data.max_bad_fraction <= 1:
        fail("data.max_bad_fraction", f"must be in [0, 1], got {data.max_bad_fraction}")
    for key in ("data.train_subset", "data.eval_subset"):
        value = getattr(data, key.split(".")[1])
        if value == 0 or value < -1:
            fail(key, f"must be a positive row count or -1 for all, got {value}")
    if data.min_pixels > data.max_pixels:
        fail("data.min_pixels", f"({data.min_pixels}) must not exceed data.max_pixels ({data.max_pixels})")
    if not (lora.finetune_vision_layers or lora.finetune_language_layers):
        fail("lora.finetune_language_layers", "and lora.finetune_vision_layers are both false: nothing to train")
    if not (lora.finetune_attention_modules or lora.finetune_mlp_modules):
        fail("lora.finetune_attention_modules", "and lora.finetune_mlp_modules are both false: nothing to train")
    if cfg.run.run_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.run.run_name):
        fail("run.run_name", f"must be letters, digits, '.', '_' or '-' (it names a directory), got {cfg.run.run_name!r}")


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (no secrets: the schema has no secret fields, and values are redacted)."""
    from wellocr.redact import redact_data

    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(redact_data(cfg.to_dict()), sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def trajectory_differences(saved: Config, requested: Config) -> list[str]:
    """Keys whose values differ and would change the training trajectory of a resumed run."""
    a, b = _flat(saved), _flat(requested)
    return [k for k in a if k not in MUTABLE_ON_RESUME and a[k] != b[k]]


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}


def default_run_name(cfg: Config, env: dict[str, str] | None = None, now: float | None = None) -> tuple[str, str]:
    """(name, how): the explicit name, else one derived from SKYPILOT_TASK_ID, else a new generated one.

    SKYPILOT_TASK_ID is constant across the recoveries of one managed job, so every restart lands in the same
    run directory. A generated name carries a timestamp and is only stable once stored (see wellocr.rundir).
    """
    env = os.environ if env is None else env
    if cfg.run.run_name:
        return cfg.run.run_name, "config"
    task_id = env.get("SKYPILOT_TASK_ID", "").strip()
    if task_id:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", task_id).strip("-.") or "sky-task", "SKYPILOT_TASK_ID"
    model_short = re.sub(r"[^a-z0-9]+", "-", Path(cfg.model.model_name.rstrip("/")).name.lower()).strip("-")
    model_short = model_short.removesuffix("-unsloth-bnb-4bit").removesuffix("-instruct")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{model_short}-r{cfg.lora.r}-lr{cfg.train.learning_rate:.0e}-s{cfg.train.max_steps}-{stamp}", "generated"


def _type_name(hint: Any) -> str:
    if set(typing.get_args(hint)) == {int, str}:
        return "int or auto"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    name = getattr(base, "__name__", str(base))
    return f"{name} or null" if type(None) in typing.get_args(hint) else name


def reference_markdown() -> str:
    """The config reference table, generated from the dataclasses (docs/CONFIG.md; a test keeps it in sync)."""
    lines = [
        "# Config reference",
        "",
        "Generated by `python -m wellocr.config --reference > docs/CONFIG.md` from `wellocr/config.py`.",
        "Set keys in a YAML file (`train: {max_steps: 20}`) or on the command line (`--set train.max_steps=20`,",
        "or `--set max_steps=20` when the key name is unique).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    defaults = _flat(Config())
    for key, f in all_keys().items():
        section, name = key.split(".", 1)
        choices = f.metadata.get("choices")
        meaning = f.metadata["help"] + (f" (one of: {', '.join(choices)})" if choices else "")
        default = defaults[key]
        shown = "null" if default is None else (repr(default) if isinstance(default, str) else str(default))
        lines.append(f"| `{key}` | {_type_name(_field_type(section, name))} | `{shown}` | {meaning} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wellocr.config", description=__doc__.splitlines()[0])
    parser.add_argument("--reference", action="store_true", help="print the config reference (markdown)")
    parser.add_argument("--config", help="YAML config to resolve and print")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    args = parser.parse_args(argv)
    if args.reference:
        sys.stdout.write(reference_markdown())
        return 0
    return run_cli(lambda: sys.stdout.write(yaml.safe_dump(load_config(args.config, args.set).to_dict(),
                                                           sort_keys=False)))


if __name__ == "__main__":
    sys.exit(main())
