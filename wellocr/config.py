"""The experiment config: pydantic models, loaded from YAML, overridden from the command line.

Precedence: defaults < YAML file < `--set section.key=value` (a bare `key=value` works when the key name is
unique across sections). Each field's type, constraint and description live in its model (the one source of
this module's checks, its error messages and docs/CONFIG.md); values are coerced in pydantic's lax mode, so
YAML's `2e-4` (a string to PyYAML) is a float here. Every mistake is a one-line `UserError` naming the file (or
`--set`) and the key, with a "did you mean"; rules that span keys are in `validate`.

`python -m wellocr.config --reference` prints the reference table of every key (docs/CONFIG.md is that output).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from wellocr.errors import UserError, run_cli

CONFIG_ENV_VAR = "WELLOCR_CONFIG"
CONFIGS_DIR = Path("configs")

DEFAULT_INSTRUCTION = (
    "Transcribe the header of this scanned well log. Answer with one 'LABEL: value' line per field."
)


def _number(value: Any) -> Any:
    """YAML 1.1 reads `2e-4` and `1e6` as strings: parse them; a bool is not a number (lax mode would take it)."""
    if isinstance(value, bool):
        raise ValueError("a bool is not a number")
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            pass
    return value


def _null_words(value: Any) -> Any:
    """`none`, `null` or an empty string clear an optional key (WELLOCR_REMOTE=none: no object storage)."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "none", "null") else value


def _row_count(value: int) -> int:
    if value == 0:
        raise PydanticCustomError("out_of_range", "0 rows")
    return value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]
OptStr = Annotated[str | None, BeforeValidator(_null_words)]
OptFloat = Annotated[float | None, BeforeValidator(_number), BeforeValidator(_null_words)]
Auto = Annotated[Literal["auto"], BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v)]
RowCount = Annotated[Int, AfterValidator(_row_count)]
Switch = BeforeValidator(lambda v: str(v).lower() if isinstance(v, bool) else v)  # YAML `true` for "true"


def _f(default: Any, description: str, allowed: str | None = None, **constraints: Any) -> Any:
    """A field: default, one-line description, pydantic constraints; `allowed` words the constraint for users."""
    return Field(default, description=description, json_schema_extra={"allowed": allowed} if allowed else None,
                 **constraints)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, protected_namespaces=())


class ModelConfig(_Section):
    model_name: str = _f("unsloth/Qwen3-VL-2B-Instruct-unsloth-bnb-4bit", "hub id or local directory of the base model")
    model_revision: OptStr = _f(None, "hub revision (branch, tag or commit) to pin; a resumed run loads the same")
    backend: Literal["auto", "unsloth", "hf"] = _f(
        "auto", "unsloth (CUDA), hf (transformers+PEFT, CPU or CUDA), or auto")
    load_in_4bit: bool = _f(True, "QLoRA: load the base weights in 4-bit NF4 (CUDA only; ignored on CPU)")
    use_gradient_checkpointing: Annotated[Literal["unsloth", "true", "false"], Switch] = _f(
        "unsloth", "activation checkpointing: unsloth (offloaded), true, or false")
    build_tiny_if_missing: bool = _f(False, "build the offline tiny random-weight model at model_name when absent")


class LoraConfig(_Section):
    r: Int = _f(16, "LoRA rank", gt=0)
    lora_alpha: Int = _f(16, "LoRA alpha (scale = alpha / r)", gt=0)
    lora_dropout: Float = _f(0.0, "dropout on the LoRA path", ge=0, lt=1)
    finetune_vision_layers: bool = _f(True, "put LoRA on the vision tower")
    finetune_language_layers: bool = _f(True, "put LoRA on the language model")
    finetune_attention_modules: bool = _f(True, "put LoRA on attention projections")
    finetune_mlp_modules: bool = _f(True, "put LoRA on MLP projections")


class DataConfig(_Section):
    dataset_name: str = _f("wrath/well-log-headers-ocr", "hub id, local data set directory, or parquet file/glob")
    dataset_revision: OptStr = _f(None, "hub revision of the data set to pin")
    train_subset: RowCount = _f(-1, "use the first N training rows (-1 = all)", "a positive row count or -1 for all",
                                ge=-1)
    eval_subset: RowCount = _f(-1, "use the first N eval rows (-1 = all)", "a positive row count or -1 for all",
                               ge=-1)
    instruction: str = _f(DEFAULT_INSTRUCTION, "prompt used only for rows that have no instruction of their own")
    min_pixels: Int = _f(256 * 32 * 32, "smallest image area after resizing (pixels); 32x32 px = one visual token",
                         gt=0)
    max_pixels: Int = _f(1280 * 32 * 32, "largest image area after resizing (pixels); caps visual tokens per image",
                         gt=0)
    max_image_pixels: Int = _f(60_000_000, "reject images whose header claims more pixels (decompression bombs)",
                               gt=0)
    max_bad_fraction: Float = _f(0.01, "fail when more than this fraction of a split's rows is unreadable", ge=0, le=1)
    dataset_num_proc: Int = _f(4, "processes for data set preparation", gt=0)
    dataloader_num_workers: Int = _f(4, "DataLoader worker processes (decoding + processor work; about 14 samples/s "
                                        "each); capped at the machine's CPUs minus one", ge=0)
    build_synthetic_if_missing: bool = _f(False, "write a synthetic data set at dataset_name when absent")
    synthetic_train: Int = _f(64, "rows of the synthetic train split (with build_synthetic_if_missing)", gt=0)
    synthetic_eval: Int = _f(16, "rows of the synthetic eval split (with build_synthetic_if_missing)", gt=0)
    synthetic_width: Int = _f(512, "image width of synthetic samples (with build_synthetic_if_missing)", gt=0)


class TrainConfig(_Section):
    max_steps: Int = _f(500, "optimizer steps to train", gt=0)
    learning_rate: Float = _f(2e-4, "peak learning rate", gt=0)
    per_device_train_batch_size: Annotated[int, Field(gt=0), BeforeValidator(_number)] | Auto = _f(
        2, "micro-batch size, or auto: the largest that fits the GPU (2 on CPU), with accumulation keeping "
           "effective_batch_size")
    effective_batch_size: Int = _f(8, "samples per optimizer step when per_device_train_batch_size is auto", gt=0)
    processes: Int = _f(1, "data-parallel processes on this machine, one per GPU (gloo on CPU); > 1 runs them under "
                           "torchrun, each with 1/N of the effective batch", gt=0)
    nodes: Int = _f(1, "machines of a multi-node cluster, each running train.processes ranks (SkyPilot's "
                       "SKYPILOT_NUM_NODES); the ranks of all of them share the effective batch", gt=0)
    per_device_eval_batch_size: Int = _f(2, "eval batch size", gt=0)
    gradient_accumulation_steps: Int = _f(4, "micro-batches per optimizer step", gt=0)
    warmup_steps: Int = _f(5, "linear warm-up steps", ge=0)
    optim: str = _f("adamw_8bit", "optimizer (transformers name); adamw_8bit falls back to adamw_torch on CPU")
    weight_decay: Float = _f(0.01, "weight decay", ge=0)
    lr_scheduler_type: str = _f("linear", "learning-rate schedule (transformers name)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "auto picks bf16 where supported, else fp16 on CUDA, fp32 on CPU")
    max_seq_length: Int = _f(2048, "longest sample (image + prompt + answer tokens); longer samples are reported "
                                   "and skipped", gt=0)
    seed: Int = _f(3407, "seed for LoRA init, data order and dropout")
    logging_steps: Int = _f(1, "log every N steps", gt=0)
    eval_steps: Int = _f(50, "evaluate every N steps", gt=0)
    save_steps: Int = _f(50, "checkpoint every N steps", gt=0)
    early_stopping_patience: Int = _f(0, "stop after N evaluations without improvement (0 = off)", ge=0)
    early_stopping_threshold: Float = _f(0.0, "minimum eval-loss improvement that counts")


class EvalConfig(_Section):
    generation_samples: Int = _f(8, "fixed eval rows decoded at every evaluation for eval/cer and eval/wer (0 = off)",
                                 ge=0)
    batch_size: Int = _f(8, "samples per generate() call", gt=0)
    max_new_tokens: Int = _f(512, "generation limit per sample", gt=0)
    compile_decode: bool = _f(False, "GPU: replay each decode step as a CUDA graph (a static cache and torch.compile, "
                                     "forced on for the 4-bit model); on the H200 3x faster decoding with transformers "
                                     "and 7.5x with Unsloth, after a one-time compile of 26 s / 250 s per process "
                                     "(Unsloth: at the second generation of a shape); falls back to eager decoding "
                                     "if it fails")
    worst_k: Int = _f(10, "worst samples shown in W&B tables and report.html", ge=0)


class CheckpointConfig(_Section):
    keep_best: Int = _f(2, "keep the N checkpoints with the lowest eval loss", ge=0)
    keep_recent: Int = _f(2, "keep the N most recent checkpoints",
                          ">= 1 (the latest checkpoint is what a preempted run resumes from)", ge=1)
    remote: OptStr = _f(None, "object-storage URL the trainer syncs checkpoints to (s3://bucket/prefix, gs://...); "
                              "S3-compatible stores such as R2 via AWS_ENDPOINT_URL; `none`: no remote",
                        "an s3://, gs:// (or file://) URL", pattern=r"^(s3|gs|gcs|memory|file)://.+")
    upload_timeout_s: Float = _f(600.0, "at exit, wait at most this long for pending uploads", ge=0)


class RunConfig(_Section):
    output_dir: str = _f("runs", "parent of run directories (a RunPod network volume path on the cloud)")
    run_name: OptStr = _f(None, "run directory name; default: from SKYPILOT_TASK_ID, else generated once",
                          "letters, digits, '.', '_' or '-' (it names a directory)",
                          pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    compile_cache_dir: OptStr = _f(None, "compile caches kept across restarts (Unsloth, inductor, Triton; Python "
                                         "bytecode where torch has none); default <output_dir>/.compile-cache (the "
                                         "environment's own variables win)")


class CostConfig(_Section):
    gpu_type: str = _f("auto", "GPU priced in the price table; auto = the device's GPU (CPU without one)")
    cloud: str = _f("auto", "cloud priced in the price table (runpod, aws, ...); auto = the cloud SkyPilot reports "
                    "(SKYPILOT_CLUSTER_INFO), local without it")
    gpu_count: Int = _f(1, "GPUs billed per pod", ge=1)
    spot_instance: bool = _f(True, "billed at the spot rate")
    hourly_rate: OptFloat = _f(None, "USD per GPU-hour; wins over the price table; null = the table's price for "
                               "cloud and gpu_type", ge=0)
    bill_from: Literal["auto", "boot", "process"] = _f(
        "auto", "a segment is billed from the machine's boot (setup and downloads included) or from the process "
        "start; auto = boot on a SkyPilot pod (SkyPilot's environment variables), process elsewhere")
    budget_cap: Float = _f(10.0, "USD over all attempts; at the cap the run saves and stops (exit 0)", ge=0)


class WandbConfig(_Section):
    enabled: bool = _f(True, "log to Weights & Biases (offline when no credentials)")
    project: str = _f("well-log-ocr", "W&B project")
    entity: OptStr = _f(None, "W&B entity (team or user)")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return self.model_dump(warnings=False)


def _sections() -> dict[str, type[_Section]]:
    return {name: f.annotation for name, f in Config.model_fields.items()}


def all_keys() -> dict[str, FieldInfo]:
    """Every `section.key` with its pydantic field, in declaration order."""
    return {f"{s}.{name}": info for s, cls in _sections().items() for name, info in cls.model_fields.items()}


# Keys a resumed run may change; every other key would change the training trajectory.
MUTABLE_ON_RESUME = frozenset(
    {
        "train.max_steps", "train.eval_steps", "train.save_steps", "train.logging_steps", "train.processes",
        "train.nodes",
        "train.early_stopping_patience", "train.early_stopping_threshold",
        "data.dataset_num_proc", "data.dataloader_num_workers",
        "model.build_tiny_if_missing", "data.build_synthetic_if_missing",
        "run.output_dir", "run.run_name",
    }
    | {key for key in all_keys() if key.split(".")[0] in ("eval", "checkpoint", "cost", "wandb")}
)


@functools.cache
def _schema(key: str) -> dict[str, Any]:
    """The key's JSON-schema property (type, constraints, description, `allowed`), the source of docs and errors."""
    section, name = key.split(".", 1)
    return _sections()[section].model_json_schema()["properties"][name]


def _members(prop: dict[str, Any]) -> list[dict[str, Any]]:
    return prop.get("anyOf", [prop])


_KINDS = {"integer": ("int", "an integer"), "number": ("float", "a number"), "boolean": ("bool", "true or false"),
          "string": ("str", "a string"), "null": ("null", "null")}
_LIMITS = {"exclusiveMinimum": ">", "minimum": ">=", "exclusiveMaximum": "<", "maximum": "<="}
_CONSTRAINT_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error",
                      "string_pattern_mismatch", "out_of_range"}


def _constraint(prop: dict[str, Any]) -> str:
    """The allowed values of a JSON-schema property in words: `> 0`, `one of a, b`, `> 0 or auto`, or ''."""
    if prop.get("allowed"):
        return prop["allowed"]
    words = []
    for member in _members(prop):
        if "const" in member:
            words.append(str(member["const"]))
        elif "enum" in member:
            words.append(f"one of {', '.join(map(str, member['enum']))}")
        elif limits := [f"{op} {member[k]:g}" for k, op in _LIMITS.items() if k in member]:
            words.append(" and ".join(limits))
    return " or ".join(words)


def _problem(key: str, error: dict[str, Any], value: Any) -> str:
    """A pydantic error (the first of a ValidationError) as the rest of `FILE: key ...`, on one line."""
    prop = _schema(key)
    if value is None:
        return "must not be empty"
    if error["type"] in _CONSTRAINT_ERRORS:
        return f"must be {_constraint(prop)}, got {value!r}"
    expected = [m.get("const") or _KINDS[m["type"]][1] for m in _members(prop) if m.get("type") != "null"]
    return f"must be {' or '.join(expected)}, got {value!r}"


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
    """Set `section.key` values on cfg, validated by the field's type and constraint; record where each came from."""
    for key, value in values.items():
        section, name = key.split(".", 1)
        model = getattr(cfg, section)
        try:
            type(model).__pydantic_validator__.validate_assignment(model, name, value)
        except ValidationError as exc:
            raise UserError(f"{source}: {key} {_problem(key, exc.errors()[0], value)}") from None
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
    # The offline assets are built only at the path the config file itself names: a mistyped --set (or a
    # default) must fail on the missing path, not train on a freshly written synthetic set.
    if origins.get("data.dataset_name") != str(config_path):
        cfg.data.build_synthetic_if_missing = False
    if origins.get("model.model_name") != str(config_path):
        cfg.model.build_tiny_if_missing = False
    return cfg


def config_from_dict(data: dict, source: str) -> Config:
    """Rebuild a Config from a saved `config.yaml` mapping (the run directory's copy)."""
    cfg = Config()
    origins: dict[str, str] = {}
    apply_values(cfg, _flatten_yaml(data, source), source, origins)
    validate(cfg, origins, default_source=source)
    return cfg


def validate(cfg: Config, origins: dict[str, str], default_source: str) -> None:
    """Reject impossible values, naming the file (or --set) the offending key came from.

    Each field is checked again against its model (values assigned in code bypass `apply_values`; the checked
    values are kept, so `checkpoint.remote: none` becomes None), then the rules that span keys."""

    def fail(key: str, problem: str) -> None:
        raise UserError(f"{origins.get(key, default_source)}: {key} {problem}")

    for section in Config.model_fields:
        model = getattr(cfg, section)
        try:
            checked = type(model).model_validate(dict(model.__dict__))
        except ValidationError as exc:
            error = exc.errors()[0]
            key = f"{section}.{error['loc'][0]}"
            fail(key, _problem(key, error, getattr(model, str(error["loc"][0]))))
        model.__dict__.update(checked.__dict__)
    t, lora, data = cfg.train, cfg.lora, cfg.data
    for key in ("train.eval_steps", "train.save_steps"):
        value = getattr(t, key.split(".")[1])
        if value > t.max_steps:
            # name the source of whichever of the two keys was set last (a --set max_steps=... usually)
            if origins.get("train.max_steps") == "--set":
                origins = {**origins, key: "--set"}
            fail(key, f"({value}) must not exceed train.max_steps ({t.max_steps}); lower it too")
    if data.min_pixels > data.max_pixels:
        fail("data.min_pixels", f"({data.min_pixels}) must not exceed data.max_pixels ({data.max_pixels})")
    if not (lora.finetune_vision_layers or lora.finetune_language_layers):
        fail("lora.finetune_language_layers", "and lora.finetune_vision_layers are both false: nothing to train")
    if not (lora.finetune_attention_modules or lora.finetune_mlp_modules):
        fail("lora.finetune_attention_modules", "and lora.finetune_mlp_modules are both false: nothing to train")
    ranks = t.processes * t.nodes
    if ranks > 1:  # each data-parallel rank takes 1/N of the effective batch (wellocr.distributed)
        auto = t.per_device_train_batch_size == "auto"
        total, name = (t.effective_batch_size, "effective_batch_size") if auto else \
            (t.gradient_accumulation_steps, "gradient_accumulation_steps")
        if total % ranks:
            count = f"({t.processes})" if t.nodes == 1 else f"({t.processes}) x train.nodes ({t.nodes}) = {ranks}"
            fail("train.processes", f"{count} must divide train.{name} ({total}): each rank takes 1/N of the "
                                    "effective batch")


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (no secrets: the schema has no secret fields, and values are redacted)."""
    from wellocr.checkpoint import write_text_atomic
    from wellocr.redact import redact_data

    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(redact_data(cfg.to_dict()), sort_keys=False)
    write_text_atomic(path, text)


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


def reference_markdown() -> str:
    """The config reference table, generated from the models' JSON schema (docs/CONFIG.md; a test keeps it in sync)."""
    lines = [
        "# Config reference",
        "",
        "Generated by `python -m wellocr.config --reference > docs/CONFIG.md` from the pydantic models in",
        "`wellocr/config.py`. Set keys in a YAML file (`train: {max_steps: 20}`) or on the command line",
        "(`--set train.max_steps=20`, or `--set max_steps=20` when the key name is unique). `allowed` is checked",
        "when the config is loaded; so are the rules that span keys (`eval_steps` and `save_steps` at most",
        "`max_steps`, `min_pixels` at most `max_pixels`, LoRA on at least one part of the model).",
        "",
        "| key | type | default | allowed | meaning |",
        "|---|---|---|---|---|",
    ]
    defaults = _flat(Config())
    for key in all_keys():
        prop, default = _schema(key), defaults[key]
        kind = " or ".join(m.get("const") or _KINDS[m["type"]][0] for m in _members(prop))
        shown = "null" if default is None else (repr(default) if isinstance(default, str) else str(default))
        lines.append(f"| `{key}` | {kind} | `{shown}` | {_constraint(prop)} | {prop['description']} |")
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
