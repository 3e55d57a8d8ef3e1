"""The model card (README.md) of every adapter wellocr writes: a run's `final/` and `checkpoint-<step>/`, the run
directory itself, and `python -m wellocr.export`'s folder. It replaces the libraries' templates (TRL's "fine-tuned
version of [None]", PEFT's "[More Information Needed]") with what the run knows: what was trained, on what data,
its metrics, its cost, and a "How to load" snippet that runs as written, also on a CPU-only install, where
torchvision (which Qwen3-VL's video processor needs) does not import: the snippet then loads the processor
without its video part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from wellocr.artifacts import read_metrics
from wellocr.errors import UserError
from wellocr.ledger import LEDGER_NAME, cost_report
from wellocr.redact import redact

CARD_TAGS = ["wellocr", "qwen3-vl", "ocr", "well-logs"]
CARD_CONFIG_KEYS = (
    "model.model_name", "model.model_revision", "model.load_in_4bit", "lora.r", "lora.lora_alpha",
    "lora.lora_dropout", "lora.finetune_vision_layers", "lora.finetune_language_layers",
    "lora.finetune_attention_modules", "lora.finetune_mlp_modules", "train.max_steps", "train.learning_rate",
    "train.lr_scheduler_type", "train.warmup_steps", "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps", "train.optim", "train.weight_decay", "train.precision",
    "train.max_seq_length", "train.seed", "data.min_pixels", "data.max_pixels",
)
HISTORY_ROWS = 10  # the newest evaluations during training that the card lists


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


def _metrics_section(run_dir: Path, history: list[dict] | None) -> list[str]:
    rows = []
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        metrics = read_metrics(path)
        if not metrics:
            continue
        fields = metrics.get("fields") if isinstance(metrics.get("fields"), dict) else {}
        rows.append(f"| {path.parent.name} | {_fmt(metrics.get('split'))} | {_fmt(metrics.get('cer'))} | "
                    f"{_fmt(metrics.get('wer'))} | {_fmt(metrics.get('cer_normalized'))} | "
                    f"{_fmt(fields.get('exact_match'))} | {_fmt(metrics.get('samples'))} |")
    lines = ["No evaluation results in the run yet (`eval/<name>/metrics.json`: the final evaluation is written "
             "after the final adapter; `python -m wellocr.export` puts it into the card)."] if not rows else [
        "Character and word error rates are edit-weighted over the corpus (lower is better); field accuracy is",
        "the fraction of reference header fields whose value was transcribed exactly (see `wellocr.metrics`).", "",
        "| evaluation | split | CER | WER | CER (normalised) | field accuracy | samples |",
        "|---|---|---|---|---|---|---|", *rows]
    during = _training_evaluations(history or [])
    if during:
        lines += ["", "During training (eval loss on the eval split; CER and WER of greedy transcriptions of its "
                  "first `eval.generation_samples` rows):", "",
                  "| step | eval loss | CER | WER |", "|---|---|---|---|",
                  *(f"| {step} | {_fmt(e.get('eval_loss'))} | {_fmt(e.get('eval/cer'))} | {_fmt(e.get('eval/wer'))} |"
                    for step, e in during)]
    return lines


def _training_evaluations(history: list[dict]) -> list[tuple[int, dict]]:
    """The trainer's log history merged by step, evaluations only, newest HISTORY_ROWS."""
    by_step: dict[int, dict] = {}
    for entry in history:
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and (
                "eval_loss" in entry or "eval/cer" in entry):
            by_step.setdefault(entry["step"], {}).update(entry)
    return sorted(by_step.items())[-HISTORY_ROWS:]


def _cost_section(run_dir: Path) -> list[str]:
    if not (run_dir / LEDGER_NAME).is_file():
        return ["The run has no cost ledger."]
    try:
        report = cost_report(run_dir)
    except UserError as exc:  # a damaged ledger should not stop a card
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


def usage(base_model: str, load_from: str, merged: bool, instruction: str, max_new_tokens: int) -> list[str]:
    """The "How to load" snippet: plain transformers (+ PEFT for an adapter), runnable as written."""
    name = "MODEL" if merged else "ADAPTER"
    if merged:
        load = [f'model = AutoModelForImageTextToText.from_pretrained({name}, dtype="auto", device_map="auto")']
        imports = ["from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLProcessor"]
    else:
        load = [f'base = AutoModelForImageTextToText.from_pretrained({json.dumps(base_model)}, dtype="auto", '
                'device_map="auto")',
                f"model = PeftModel.from_pretrained(base, {name})"]
        imports = ["from peft import PeftModel",
                   "from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLProcessor"]
    content = '[{"type": "image"}, {"type": "text", "text": INSTRUCTION}]'
    return [
        "```python", "from PIL import Image", *imports, "from transformers.utils import is_torchvision_available", "",
        f"{name} = {json.dumps(load_from)}", 'IMAGE = "header.png"', f"INSTRUCTION = {json.dumps(instruction)}", "",
        "",
        "class ImageOnlyProcessor(Qwen3VLProcessor):",
        '    """Qwen3-VL\'s processor without its video part, which needs torchvision (absent beside a CPU-only '
        'torch)."""', "",
        "    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):",
        "        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, "
        "**kwargs)", "", "",
        f"processor = (AutoProcessor if is_torchvision_available() else ImageOnlyProcessor).from_pretrained({name})",
        *load, "",
        f"messages = [{{\"role\": \"user\", \"content\": {content}}}]",
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
        'inputs = processor(images=[Image.open(IMAGE).convert("RGB")], text=[prompt], return_tensors="pt")',
        "inputs = inputs.to(model.device)",
        f"answer = model.generate(**inputs, max_new_tokens={max_new_tokens})[0, inputs[\"input_ids\"].shape[1]:]",
        "print(processor.decode(answer, skip_special_tokens=True))", "```"]


def model_card(run_dir: Path, cfg: Any, source: str, step: int | None, merged: bool, base_model: str,
               load_from: str, instruction: str | None = None, history: list[dict] | None = None,
               title: str | None = None) -> str:
    """README.md in the Hub's model-card format: YAML front matter, then config, data, metrics, cost, usage.

    `source`: what the weights are (`final/`, `checkpoint-8/`); `load_from`: the path or hub id the snippet loads;
    `instruction`: the prompt the model learnt (default data.instruction); `history`: the trainer's log history.
    """
    run_dir = Path(run_dir)
    instruction = instruction or cfg.data.instruction
    meta: dict[str, Any] = {"base_model": base_model, "library_name": "transformers" if merged else "peft",
                            "pipeline_tag": "image-text-to-text", "tags": list(CARD_TAGS)}
    if _is_hub_id(cfg.data.dataset_name):
        meta["datasets"] = [cfg.data.dataset_name]
    flat = _flat(cfg)
    what = "merged model" if merged else "LoRA adapter"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {title or run_dir.name}", "",
        f"A {what} for {_model_link(base_model)} that transcribes the headers of scanned well logs into",
        "`LABEL: value` lines, trained with",
        f"[wellocr](https://github.com/wellocr/wellocr) ({'QLoRA' if cfg.model.load_in_4bit else 'LoRA'} SFT). "
        f"Run `{run_dir.name}`, {source}" + (f" at step {step}." if step is not None else "."), "",
        "## Config", "",
        "| key | value |", "|---|---|",
        *(f"| `{key}` | `{_fmt(flat[key])}` |" for key in CARD_CONFIG_KEYS if key in flat), "",
        "The prompt it was trained with (`INSTRUCTION` below):", "", f"> {instruction}", "",
        "## Data", "",
        f"- data set: `{cfg.data.dataset_name}`" + (f" at revision `{cfg.data.dataset_revision}`"
                                                     if cfg.data.dataset_revision else " (revision not pinned)"),
        f"- training rows: {'all' if cfg.data.train_subset == -1 else f'first {cfg.data.train_subset}'}; "
        f"evaluation rows: {'all' if cfg.data.eval_subset == -1 else f'first {cfg.data.eval_subset}'}", "",
        "## Metrics", "", *_metrics_section(run_dir, history), "",
        "## Cost", "", *_cost_section(run_dir), "",
        "## How to load", "",
        f"Needs `transformers`{'' if merged else ' and `peft`'} (a wellocr install has both); `{load_from}` is where "
        "the weights were written: change it to where they are now, and `IMAGE` to your scan.", "",
        *usage(base_model, load_from, merged, instruction, cfg.eval.max_new_tokens), "",
    ]
    return redact("\n".join(lines))
