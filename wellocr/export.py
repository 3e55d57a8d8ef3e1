"""`python -m wellocr.export` — package a run's adapter (or merged weights) with a model card, optionally push it.

    python -m wellocr.export --run RUN_DIR --out DIR [--checkpoint final|best|latest|PATH]
                             [--merge [--base-model ID]] [--push REPO_ID [--private]]

Without --merge, DIR holds the LoRA adapter, the processor files and a model card (README.md). With --merge, the
adapter is folded into the base weights (`merge_and_unload`) and DIR holds a plain transformers model for serving.

Merging loads the base model in 16-bit (bf16 on CUDA, fp32 on CPU), never in 4-bit: merging LoRA deltas into
NF4 weights re-quantises them and loses most of what the adapter learned. A QLoRA run trained on a pre-quantised
checkpoint (the default `unsloth/...-bnb-4bit`) therefore needs `--base-model` naming the 16-bit original; the
merged model then differs from the quantised base + adapter by the quantisation error only.

Only files known to belong to an adapter or a processor are copied (never optimizer state, RNG state or the
pickled training arguments), and every text file written is passed through `wellocr.redact`, so no secret from the
environment ends up in DIR or on the Hub. --push needs HF_TOKEN and checks it before doing any work.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from wellocr.artifacts import adapter_step, load_run_config, read_metrics, resolve_checkpoint
from wellocr.errors import UserError, run_cli
from wellocr.ledger import LEDGER_NAME, cost_report
from wellocr.redact import redact

CARD_TAGS = ["wellocr", "qwen3-vl", "ocr", "well-logs"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "*.jinja")
_BINARY_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".model"}
CARD_CONFIG_KEYS = (
    "model.model_name", "model.model_revision", "model.load_in_4bit", "lora.r", "lora.lora_alpha",
    "lora.lora_dropout", "lora.finetune_vision_layers", "lora.finetune_language_layers",
    "lora.finetune_attention_modules", "lora.finetune_mlp_modules", "train.max_steps", "train.learning_rate",
    "train.lr_scheduler_type", "train.warmup_steps", "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps", "train.optim", "train.weight_decay", "train.precision",
    "train.max_seq_length", "train.seed", "data.min_pixels", "data.max_pixels",
)
_QUANTISED_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-4bit")


# ---------------------------------------------------------------- inputs


def resolve_adapter(run_dir: Path, choice: str) -> tuple[Path, int | None]:
    """The adapter directory that --checkpoint names (as `wellocr.evaluate` resolves it) and its training step."""
    path, _ = resolve_checkpoint(run_dir, choice)
    return path, adapter_step(path)


def hf_token(env: dict[str, str] | None = None) -> str:
    token = (os.environ if env is None else env).get("HF_TOKEN", "").strip()
    if not token:
        raise UserError("--push: HF_TOKEN is not set; export a write token (huggingface.co/settings/tokens) "
                        "or drop --push")
    return token


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"--push {repo_id}: not a valid repo id ({str(exc).splitlines()[0]}); use owner/name") from None
    if "/" not in repo_id:
        raise UserError(f"--push {repo_id}: give the owner too, as owner/name")


# ---------------------------------------------------------------- writing the export


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def copy_adapter(source: Path, dest: Path) -> list[str]:
    """Copy the adapter and processor files of `source` (nothing else) into `dest`."""
    copied = []
    for file in sorted(p for p in source.iterdir() if p.is_file()):
        if _matches(file.name, ADAPTER_FILES + PROCESSOR_FILES):
            shutil.copy2(file, dest / file.name)
            copied.append(file.name)
    if "adapter_config.json" not in copied or not any(n.startswith("adapter_model.") for n in copied):
        raise UserError(f"--checkpoint {source}: adapter_config.json or adapter_model.* is missing there")
    return copied


def has_processor(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() and any(
        (path / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))


def save_base_processor(cfg: Any, dest: Path) -> None:
    """The run's processor (base model's, with the run's pixel budget) for adapters saved without one."""
    from wellocr.processing import load_processor

    load_processor(cfg.model.model_name, cfg.model.model_revision, cfg.data.min_pixels,
                   cfg.data.max_pixels).save_pretrained(str(dest))


def refuse_prequantised(model_name: str, revision: str | None) -> None:
    """Merging needs 16-bit base weights; a checkpoint that ships a quantization_config cannot give them."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name, revision=revision)
    except (OSError, ValueError) as exc:
        raise UserError(f"--base-model {model_name}: cannot read its config ({str(exc).splitlines()[0]})") from None
    if getattr(config, "quantization_config", None):
        suggestion = model_name
        for suffix in _QUANTISED_SUFFIXES:
            suggestion = suggestion.removesuffix(suffix)
        raise UserError(f"--merge: base model {model_name} is a pre-quantised checkpoint, and merging into 4-bit "
                        f"weights loses precision; pass --base-model with its 16-bit original (e.g. {suggestion})")


def merge_adapter(cfg: Any, adapter_dir: Path, dest: Path, base_model: str | None = None) -> str:
    """Base model in 16-bit + adapter, merged and saved (safetensors) with the processor. Returns the base used."""
    import torch
    from peft import PeftModel

    from wellocr.model import Backend, load_base_model

    model_cfg = cfg.model.model_copy(update={"load_in_4bit": False})
    if base_model is not None:
        model_cfg = model_cfg.model_copy(update={"model_name": base_model, "model_revision": None})
    refuse_prequantised(model_cfg.model_name, model_cfg.model_revision)
    merge_cfg = cfg.model_copy(update={"model": model_cfg})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16" if device == "cuda" else "fp32"
    model, processor = load_base_model(merge_cfg, Backend("hf", device, "export"), precision)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(dest))
    processor.save_pretrained(str(dest))
    return model_cfg.model_name


def redact_tree(path: Path) -> None:
    """Mask secret values in every text file under `path` (the last line of defence before an upload)."""
    for file in path.rglob("*"):
        if not file.is_file() or file.suffix in _BINARY_SUFFIXES:
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        masked = redact(text)
        if masked != text:
            file.write_text(masked, encoding="utf-8")


# ---------------------------------------------------------------- the model card


def _flat(cfg: Any) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in cfg.to_dict().items() for k, v in section.items()}


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _model_link(name: str) -> str:
    return f"[{name}](https://huggingface.co/{name})" if _is_hub_id(name) else f"`{name}`"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics_section(run_dir: Path) -> list[str]:
    rows = []
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        metrics = read_metrics(path)
        if not metrics:
            continue
        fields = metrics.get("fields") if isinstance(metrics.get("fields"), dict) else {}
        rows.append(f"| {path.parent.name} | {_fmt(metrics.get('split'))} | {_fmt(metrics.get('cer'))} | "
                    f"{_fmt(metrics.get('wer'))} | {_fmt(metrics.get('cer_normalized'))} | "
                    f"{_fmt(fields.get('exact_match'))} | {_fmt(metrics.get('samples'))} |")
    if not rows:
        return ["No evaluation results were found in the run (`eval/<name>/metrics.json`)."]
    return ["Character and word error rates are edit-weighted over the corpus (lower is better); field accuracy is",
            "the fraction of reference header fields whose value was transcribed exactly (see `wellocr.metrics`).", "",
            "| evaluation | split | CER | WER | CER (normalised) | field accuracy | samples |",
            "|---|---|---|---|---|---|---|", *rows]


def _cost_section(run_dir: Path) -> list[str]:
    if not (run_dir / LEDGER_NAME).is_file():
        return ["The run has no cost ledger."]
    try:
        report = cost_report(run_dir)
    except UserError as exc:  # a damaged ledger should not stop an export
        return [f"The cost ledger could not be read ({exc})."]
    lines = [f"- total: ${report['total_usd']:.2f} over {report['gpu_hours']:.2f} GPU-hours, "
             f"{report['attempts']} attempt(s), {report['preemptions']} preemption(s)"]
    if report["usd_per_step"] is not None:
        lines.append(f"- per optimizer step: ${report['usd_per_step']:.4f}")
    if report["usd_per_cer_point"] is not None:
        lines.append(f"- per CER point gained over the base model: ${report['usd_per_cer_point']:.4f}")
    for rate in report["rates"]:
        lines.append(f"- rate: ${rate['hourly_rate']:.2f} per GPU-hour x {rate['gpu_count']} {rate['gpu_type']} "
                     f"({rate['rate_source']})")
    return lines


def _usage(base_model: str, where: str, merged: bool) -> list[str]:
    if merged:
        load = [f'model = AutoModelForImageTextToText.from_pretrained("{where}", dtype="auto", device_map="auto")']
        imports = ["from transformers import AutoModelForImageTextToText, AutoProcessor"]
    else:
        load = [f'base = AutoModelForImageTextToText.from_pretrained("{base_model}", dtype="auto", device_map="auto")',
                f'model = PeftModel.from_pretrained(base, "{where}")']
        imports = ["from peft import PeftModel", "from transformers import AutoModelForImageTextToText, AutoProcessor"]
    content = '[{"type": "image"}, {"type": "text", "text": INSTRUCTION}]'
    return ["```python", "from PIL import Image", *imports, "", *load,
            f'processor = AutoProcessor.from_pretrained("{where}")', "",
            f'messages = [{{"role": "user", "content": {content}}}]',
            "prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
            'inputs = processor(images=[Image.open("header.png")], text=[prompt], return_tensors="pt")',
            "inputs = inputs.to(model.device)",
            "answer = model.generate(**inputs, max_new_tokens=512)[0, inputs[\"input_ids\"].shape[1]:]",
            "print(processor.decode(answer, skip_special_tokens=True))", "```"]


def model_card(run_dir: Path, cfg: Any, source: Path, step: int | None, merged: bool, base_model: str,
               repo_id: str | None) -> str:
    """README.md in the Hub's model-card format: YAML front matter, then config, data, metrics, cost, usage."""
    meta: dict[str, Any] = {"base_model": base_model, "library_name": "transformers" if merged else "peft",
                            "pipeline_tag": "image-text-to-text", "tags": list(CARD_TAGS)}
    if _is_hub_id(cfg.data.dataset_name):
        meta["datasets"] = [cfg.data.dataset_name]
    flat = _flat(cfg)
    name = repo_id or Path(run_dir).name
    what = "merged model" if merged else "LoRA adapter"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"A {what} for {_model_link(base_model)} that transcribes the headers of scanned well logs into",
        "`LABEL: value` lines, trained with",
        f"[wellocr](https://github.com/wellocr/wellocr) ({'QLoRA' if cfg.model.load_in_4bit else 'LoRA'} SFT). "
        f"Run `{Path(run_dir).name}`, "
        f"exported from `{source.name}`" + (f" at step {step}." if step is not None else "."), "",
        "## Config", "",
        "| key | value |", "|---|---|",
        *(f"| `{key}` | `{_fmt(flat[key])}` |" for key in CARD_CONFIG_KEYS if key in flat), "",
        f"Prompt: `{cfg.data.instruction}`", "",
        "## Data", "",
        f"- data set: `{cfg.data.dataset_name}`" + (f" at revision `{cfg.data.dataset_revision}`"
                                                     if cfg.data.dataset_revision else " (revision not pinned)"),
        f"- training rows: {'all' if cfg.data.train_subset == -1 else f'first {cfg.data.train_subset}'}; "
        f"evaluation rows: {'all' if cfg.data.eval_subset == -1 else f'first {cfg.data.eval_subset}'}", "",
        "## Metrics", "", *_metrics_section(Path(run_dir)), "",
        "## Cost", "", *_cost_section(Path(run_dir)), "",
        "## How to load", "", *_usage(base_model, repo_id or "path/to/this/directory", merged), "",
        "with `INSTRUCTION` the prompt above.", "",
    ]
    return redact("\n".join(lines))


# ---------------------------------------------------------------- the command


def push_folder(folder: Path, repo_id: str, token: str, private: bool, message: str) -> str:
    """Create the model repo if needed and upload `folder` to it; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    return f"https://huggingface.co/{repo_id}"


def export(run_dir: Path, out_dir: Path, checkpoint: str = "final", merge: bool = False,
           base_model: str | None = None, push: str | None = None, private: bool = False,
           env: dict[str, str] | None = None) -> Path:
    """Write the export into `out_dir` (which must not exist or be empty) and push it when asked."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    token = hf_token(env) if push else None
    if push:
        _check_repo_id(push)
    if base_model and not merge:
        raise UserError("--base-model only applies with --merge")
    cfg = load_run_config(run_dir)
    source, step = resolve_adapter(run_dir, checkpoint)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out_dir}: exists and is not empty; pick a new directory or remove it")

    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if merge:
            base = merge_adapter(cfg, source, staging, base_model)
        else:
            base = cfg.model.model_name
            copy_adapter(source, staging)
            if not has_processor(staging):
                save_base_processor(cfg, staging)
        (staging / "README.md").write_text(model_card(run_dir, cfg, source, step, merge, base, push))
        redact_tree(staging)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {'merged model' if merge else 'adapter'} from {source} to {out_dir}", flush=True)

    if push:
        try:
            url = push_folder(out_dir, push, token, private, f"wellocr export of run {run_dir.name}")
        except Exception as exc:  # noqa: BLE001 - any upload failure leaves a complete local export
            first = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise UserError(f"--push {push}: upload failed ({first}); the export in {out_dir} is complete, "
                            f"upload it with: huggingface-cli upload {push} {out_dir}") from None
        print(f"pushed to {url}", flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wellocr.export", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="the run directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="new directory to write the export into")
    parser.add_argument("--checkpoint", default="final", metavar="final|best|latest|PATH",
                        help="which adapter: final/ (default), the lowest eval loss, the newest checkpoint, or a path")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into 16-bit base weights")
    parser.add_argument("--base-model", metavar="ID", help="16-bit base model to merge into (default: the run's)")
    parser.add_argument("--push", metavar="REPO_ID", help="upload DIR to this Hugging Face model repo (needs HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the pushed repo as private")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.private and not args.push:
            raise UserError("--private only applies with --push REPO_ID")
        export(Path(args.run), Path(args.out), args.checkpoint, args.merge, args.base_model, args.push, args.private)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
