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

from wellocr.artifacts import adapter_step, latest_trainer_state, load_run_config, resolve_checkpoint
from wellocr.card import model_card
from wellocr.data import training_instruction
from wellocr.errors import UserError, run_cli
from wellocr.redact import redact

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "*.jinja")
_BINARY_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".model"}
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
        card = model_card(run_dir, cfg, f"exported from `{source.name}`", step, merge, base,
                          load_from=push or str(out_dir.absolute()), instruction=training_instruction(cfg.data),
                          history=(latest_trainer_state(run_dir) or {}).get("log_history"), title=push)
        (staging / "README.md").write_text(card)
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
