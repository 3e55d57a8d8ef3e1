"""Running a model on data set rows: batched greedy generation, per-sample loss, scoring, and the evaluation that
writes metrics.json, predictions.jsonl and report.html (formats: `python -m wellocr.evaluate`).

Every sample is transcribed with batched greedy decoding, scored against its reference (wellocr.metrics) and
given its own loss: the mean cross-entropy over its answer tokens (+ `<|im_end|>` and the newline after it),
with inputs built by TRL's own vision collator, so it is the number training minimises, per sample.

The caller names its backend (`wellocr.model.Backend`, as `select_backend` chose it): Unsloth models switch
between inference and training with `FastVisionModel.for_inference/for_training`, and compile their generation
prefill once per batch size. Training calls `generation_metrics` at each evaluation and `evaluate_model` at its end
with the model it holds; `python -m wellocr.evaluate` and `python -m wellocr.predict` load one with `load_model`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wellocr.artifacts import BASE_NAME, checkpoint_info
from wellocr.checkpoint import write_json_atomic, write_text_atomic
from wellocr.config import Config
from wellocr.errors import UserError
from wellocr.metrics import compute_cer, compute_wer, score
from wellocr.model import Backend

SORT_KEYS = ("loss", "cer")


# ---------------------------------------------------------------- model calls


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def is_unsloth(backend: Backend) -> bool:
    return backend.name == "unsloth"


@contextlib.contextmanager
def inference_mode(model: Any, backend: Backend) -> Iterator[None]:
    """Eval mode and no grad for the block; a model that was training is put back into training mode, with
    every module's gradient checkpointing exactly as it was.

    Unsloth models switch with `FastVisionModel.for_inference/for_training` (it also changes padding and which
    outputs the compiled forward returns), so those are used when the model was loaded by the Unsloth backend.
    Its checkpointing flags are not always booleans (its own offloading mode): a training step after an
    evaluation without them keeps every activation, several times the memory the auto batch probe measured.
    """
    import torch

    was_training = model.training
    checkpointing = {m: m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")}
    fast_vision = None
    if is_unsloth(backend):
        from unsloth import FastVisionModel as fast_vision

        fast_vision.for_inference(model)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            if fast_vision is not None:
                fast_vision.for_training(model)
            model.train()
            for module, value in checkpointing.items():
                module.gradient_checkpointing = value


def _end_token_ids(model: Any, processor: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if not ids and processor.tokenizer.eos_token_id is not None:
        ids = [processor.tokenizer.eos_token_id]
    return set(ids)


@contextlib.contextmanager
def compiled_decode(model: Any, backend: Backend) -> Iterator[None]:
    """generate() in the block decodes on a static cache with its decode step compiled (torch.compile's
    "reduce-overhead": a CUDA graph replayed per token), where it would run eagerly.

    Decoding a 2B model's 8 rows is host-bound (~155 ms of Python and kernel launches per token against ~12 ms of
    GPU work, docs/BENCHMARKS.md). transformers compiles the decode step only for quantizers it lists as
    compileable, and bitsandbytes 4-bit is not listed; its matmuls are torch custom ops that compile, so this
    model's quantizer is marked compileable for the block (its class swapped for a subclass, then restored).
    Unsloth has the same switch as an opt-in (UNSLOTH_COMPILE_DECODE) for a few architectures: it is turned on with
    this model's architecture added. Transformers compiles at the first generation; Unsloth at the second of the
    same batch size and length (the first runs eagerly). Only on CUDA: elsewhere generation is unchanged."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(base, "hf_quantizer", None)
    quantizer_class = type(quantizer)
    config = base.generation_config
    cache_implementation = config.cache_implementation
    restore_unsloth = _unsloth_compile_decode(base) if is_unsloth(backend) else None
    if quantizer is not None and not quantizer.is_compileable:
        quantizer.__class__ = _compileable(quantizer_class)
    config.cache_implementation = "static"
    try:
        yield
    finally:
        config.cache_implementation = cache_implementation
        if quantizer is not None:
            quantizer.__class__ = quantizer_class
        if restore_unsloth is not None:
            restore_unsloth()


@functools.cache
def _compileable(quantizer_class: type) -> type:
    """The quantizer's class, but compileable (one subclass per class, made once)."""
    return type(f"Compileable{quantizer_class.__name__}", (quantizer_class,),
                {"is_compileable": property(lambda _: True)})


def _unsloth_compile_decode(model: Any) -> Any:
    """Unsloth's compiled decoding, on for this model's architecture; returns what undoes it."""
    import os

    import unsloth.models.vision as vision

    models, setting = vision.COMPILE_DECODE_MODELS, os.environ.get("UNSLOTH_COMPILE_DECODE")
    text_config = getattr(model.config, "text_config", None)
    architecture = str(getattr(text_config, "model_type", None) or model.config.model_type).removesuffix("_text")
    vision.COMPILE_DECODE_MODELS = (*models, architecture)
    os.environ["UNSLOTH_COMPILE_DECODE"] = "1"

    def restore() -> None:
        vision.COMPILE_DECODE_MODELS = models
        if setting is None:
            os.environ.pop("UNSLOTH_COMPILE_DECODE", None)
        else:
            os.environ["UNSLOTH_COMPILE_DECODE"] = setting

    return restore


def generate_with_counts(model: Any, processor: Any, images: list, instructions: list[str], max_new_tokens: int,
                         *, backend: Backend, compile_decode: bool = False) -> tuple[list[str], list[int]]:
    """`generate_batch` plus how many tokens each sample generated (up to and including its end token);
    `compile_decode`: see compiled_decode."""
    from wellocr.data import prompt_messages

    tokenizer = processor.tokenizer
    texts = [processor.apply_chat_template(prompt_messages(i), add_generation_prompt=True, tokenize=False)
             for i in instructions]
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    try:
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = previous_side
    inputs = inputs.to(_device(model))
    output = _greedy(model, inputs, max_new_tokens, backend, compile_decode)
    new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
    ends = _end_token_ids(model, processor)
    counts = [next((i + 1 for i, t in enumerate(row) if t in ends), len(row)) for row in new_tokens]
    decoded = tokenizer.batch_decode([row[:n] for row, n in zip(new_tokens, counts)], skip_special_tokens=True)
    return [text.strip() for text in decoded], counts


EAGER_AFTER_FAILURE = "_wellocr_eager_decode"  # set on a model whose compiled decoding failed once


def _greedy(model: Any, inputs: Any, max_new_tokens: int, backend: Backend, compile_decode: bool) -> Any:
    """model.generate, greedy. With `compile_decode` its decode step compiled; a compile that fails (anything but
    CUDA out-of-memory, which the caller handles) leaves this model decoding eagerly for the rest of the process:
    an evaluation must not end the run."""
    if compile_decode and not getattr(model, EAGER_AFTER_FAILURE, False):
        from wellocr.autobatch import is_oom

        try:
            with inference_mode(model, backend), compiled_decode(model, backend):
                return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        except Exception as exc:  # noqa: BLE001 - out-of-memory re-raised, any other failure falls back once
            if is_oom(exc):
                raise
            setattr(model, EAGER_AFTER_FAILURE, True)
            reason = (str(exc).splitlines() or [""])[0][:200]
            print(f"wellocr: compiled decoding failed ({type(exc).__name__}: {reason}); eval.compile_decode off "
                  "for this process, decoding eagerly", flush=True)
    with inference_mode(model, backend):
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)


def generate_batch(model: Any, processor: Any, images: list, instructions: list[str], max_new_tokens: int,
                   *, backend: Backend) -> list[str]:
    """Greedy transcriptions of a batch (one image and instruction each), prompts built exactly as in training."""
    return generate_with_counts(model, processor, images, instructions, max_new_tokens, backend=backend)[0]


def loss_examples(images: list, instructions: list[str], answers: list[str]) -> list[dict]:
    """TRL prompt/completion + images examples, the shape wellocr.data.RowFormatter gives the trainer."""
    from wellocr.data import completion_messages, prompt_messages

    return [{"prompt": prompt_messages(i), "completion": completion_messages(a), "images": [img]}
            for img, i, a in zip(images, instructions, answers)]


def loss_collator(processor: Any) -> Any:
    """TRL's vision collator, configured as SFTTrainer configures it for wellocr (answer-only labels)."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    return DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)


def per_sample_losses(model: Any, processor: Any, examples: list[dict], batch_size: int, *,
                      backend: Backend) -> list[float]:
    """Mean cross-entropy over each example's labelled (answer) tokens, in eval mode.

    Only the positions that predict a label are projected to the vocabulary (`logits_to_keep`), so a batch of
    long image prompts does not materialise batch x sequence x vocabulary logits.
    """
    import torch
    import torch.nn.functional as F

    collator = loss_collator(processor)
    losses: list[float] = []
    with inference_mode(model, backend):
        for start in range(0, len(examples), batch_size):
            # the collator rewrites its examples' messages in place: hand it copies
            batch = collator([dict(e) for e in examples[start:start + batch_size]]).to(_device(model))
            labels = batch.pop("labels")
            labelled = (labels != -100).nonzero()
            if labelled.numel() == 0:  # nothing to score (empty answers)
                losses.extend([math.nan] * labels.shape[0])
                continue
            first = int(labelled[:, 1].min()) - 1  # the position predicting the first label
            keep = torch.arange(first, labels.shape[1] - 1, device=labels.device)
            logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
            if logits.shape[1] == labels.shape[1]:  # a forward that ignores logits_to_keep
                logits = logits[:, first:-1]
            targets = labels[:, first + 1:]
            for row_logits, row_targets in zip(logits, targets):  # one row in float32 at a time
                scored = row_targets != -100
                row_loss = F.cross_entropy(row_logits[scored].float(), row_targets[scored]) if scored.any() else None
                losses.append(math.nan if row_loss is None else row_loss.item())
    return losses


# ---------------------------------------------------------------- rows and records


def row_inputs(rows: list[dict], cfg: Config) -> tuple[list, list[str], list[str]]:
    """Decoded images (pixel budget applied), instructions and answers of raw data set rows, as in training."""
    from wellocr.data import decode_image, row_instruction

    images = [decode_image(r["image_base64"], cfg.data.min_pixels, cfg.data.max_pixels) for r in rows]
    instructions = [row_instruction(r["instruction"], cfg.data) for r in rows]
    return images, instructions, [r["answer"] for r in rows]


def sample_record(index: int, prediction: str, reference: str, loss: float) -> dict[str, Any]:
    return {"index": index, "prediction": prediction, "reference": reference, "loss": loss,
            "cer": compute_cer(reference, prediction), "wer": compute_wer(reference, prediction)}


def score_rows(model: Any, processor: Any, cfg: Config, rows: list[dict], batch_size: int, keep_images: bool = False,
               *, backend: Backend, max_new_tokens: int | None = None,
               shrink_on_oom: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Generate, score and compute the loss of raw rows (a list or a Dataset), one batch of images at a time.

    `shrink_on_oom`: on CUDA out-of-memory the batch is halved and tried again (down to 1), for an evaluation
    that shares the GPU with training; the size it ended with is returned as generation["batch_size"].
    Returns per-sample records (with the PIL image under "image" when keep_images) and throughput figures.
    """
    from tqdm.auto import tqdm

    from wellocr.autobatch import is_oom
    from wellocr.phases import release_cached_memory

    max_new_tokens = max_new_tokens or cfg.eval.max_new_tokens
    records: list[dict] = []
    seconds, new_tokens, hit_limit = 0.0, 0, 0
    progress = tqdm(total=len(rows), desc="evaluating", unit="sample", disable=len(rows) <= batch_size)
    start = 0
    with progress, inference_mode(model, backend):
        while start < len(rows):
            batch = _take(rows, start, start + batch_size)
            images, instructions, answers = row_inputs(batch, cfg)
            fill = batch_size - len(batch) if compiles_per_batch_size(backend) else 0
            started = time.perf_counter()
            try:
                predictions, counts = generate_with_counts(model, processor, images + images[-1:] * fill,
                                                           instructions + instructions[-1:] * fill, max_new_tokens,
                                                           backend=backend, compile_decode=cfg.eval.compile_decode)
                losses = per_sample_losses(model, processor, loss_examples(images, instructions, answers),
                                           batch_size, backend=backend)
            except Exception as exc:  # noqa: BLE001 - only CUDA out-of-memory is handled, the rest re-raised
                if not (shrink_on_oom and batch_size > 1 and is_oom(exc)):
                    raise
                batch_size //= 2
                release_cached_memory()
                print(f"wellocr: CUDA out of memory in evaluation; generating {batch_size} rows at a time", flush=True)
                continue
            predictions, counts = predictions[:len(batch)], counts[:len(batch)]
            seconds += time.perf_counter() - started
            new_tokens += sum(counts)
            hit_limit += sum(n >= max_new_tokens for n in counts)
            for row, image, prediction, answer, loss in zip(batch, images, predictions, answers, losses):
                record = sample_record(row["row_index"], prediction, answer, loss)
                if keep_images:
                    record["image"] = image
                records.append(record)
            progress.update(len(batch))
            start += len(batch)
    generation = {
        "samples_per_second": len(rows) / seconds if seconds else 0.0,
        "new_tokens_per_second": new_tokens / seconds if seconds else 0.0,
        "batch_size": batch_size,
        "seconds": seconds,
        "new_tokens": new_tokens,
        "max_new_tokens": max_new_tokens,
        "hit_max_new_tokens": hit_limit,
    }
    return records, generation


def compiles_per_batch_size(backend: Backend) -> bool:
    """Unsloth compiles its generation prefill once per batch size (26-45 s each on the H200, docs/BENCHMARKS.md),
    so a short last batch is filled up to the batch size with copies of its last row: one compile per process."""
    return is_unsloth(backend)


def _take(rows: Any, start: int, stop: int) -> list[dict]:
    """rows[start:stop] as a list of row dicts, for a list or a (lazily read) datasets.Dataset."""
    if isinstance(rows, list):
        return rows[start:stop]
    return rows.select(range(start, min(stop, len(rows)))).to_list()


def worst_samples(records: list[dict], k: int, by: str = "loss") -> list[dict]:
    """The k records with the highest `by` ("loss" or "cer"), ties broken by the other, then by index."""
    if by not in SORT_KEYS:
        raise ValueError(f"by must be one of {', '.join(SORT_KEYS)}, got {by!r}")
    other = SORT_KEYS[1 - SORT_KEYS.index(by)]

    def badness(record: dict) -> tuple:
        return (-_finite(record[by]), -_finite(record[other]), record["index"])

    return sorted(records, key=badness)[:max(k, 0)]


def _finite(value: float) -> float:
    """NaN sorts as the worst value (a NaN loss is a problem to look at)."""
    return math.inf if value is None or math.isnan(value) else value


def generation_metrics(model: Any, processor: Any, cfg: Config, rows: list[dict], batch_size: int, *,
                       backend: Backend, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Corpus CER/WER of a few fixed eval rows, for logging at each evaluation during training.

    `rows` are raw data set rows (image_base64, instruction, answer, row_index), e.g. `fixed_eval_rows`.
    Returns {"eval/cer", "eval/wer", "records", "batch_size"}; each record holds index, prediction, reference,
    cer, wer, loss and the decoded PIL image; batch_size is what fitted beside training (halved on CUDA
    out-of-memory). The model goes back to training mode afterwards if it was training.
    """
    records, generation = score_rows(model, processor, cfg, rows, batch_size, keep_images=True, backend=backend,
                                     max_new_tokens=max_new_tokens, shrink_on_oom=True)
    corpus = score([r["reference"] for r in records], [r["prediction"] for r in records])
    return {"eval/cer": corpus["cer"], "eval/wer": corpus["wer"], "records": records,
            "batch_size": generation["batch_size"]}


def generation_limit(processor: Any, references: list[str], max_new_tokens: int) -> int:
    """Tokens worth generating for rows whose answers are known: 1.25 x the longest reference + 16, at most
    max_new_tokens. A transcription longer than that is wrong already; an early model that repeats itself would
    otherwise run every row to the limit at every evaluation."""
    longest = max((len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in references),
                  default=0)
    return min(max_new_tokens, int(longest * 1.25) + 16)


def fixed_eval_rows(split: Any, n: int) -> list[dict]:
    """The first n rows of a scanned Split, raw (the input `generation_metrics` takes)."""
    return split.dataset.select(range(min(n, len(split)))).to_list()


# ---------------------------------------------------------------- outputs


def predictions_jsonl(records: list[dict]) -> str:
    keys = ("index", "prediction", "reference", "loss", "cer", "wer")
    return "".join(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n" for r in records)


def attach_images(records: list[dict], split: Any, cfg: Config) -> None:
    """Decode the images of `records` again (they are not kept during the pass, to bound memory)."""
    from wellocr.data import decode_image

    position = {index: i for i, index in enumerate(split.dataset["row_index"])}
    column = split.dataset.select_columns(["image_base64"])
    for record in records:
        encoded = column[position[record["index"]]]["image_base64"]
        record["image"] = decode_image(encoded, cfg.data.min_pixels, cfg.data.max_pixels)


def evaluate_model(model: Any, processor: Any, cfg: Config, split: Any, out_dir: Path, checkpoint_label: str,
                   limit: int | None = None, batch_size: int | None = None, run_dir: Path | None = None,
                   checkpoint_path: Path | None = None, *, backend: Backend) -> dict[str, Any]:
    """Evaluate `model` on a scanned Split and write metrics.json, predictions.jsonl and report.html to out_dir.

    checkpoint_label names what is evaluated ("final", "best", "checkpoint-8", "base"; "base" means no adapter).
    checkpoint_path (default `run_dir/checkpoint_label` when that exists) supplies the step in metrics.json.
    run_dir, when given, adds the run's name, training curves and the base-model comparison to the report.
    Returns the metrics dict.
    """

    batch_size = batch_size or cfg.eval.batch_size
    rows = split.dataset.select(range(min(limit, len(split)) if limit is not None else len(split)))
    if len(rows) == 0:
        raise UserError(f"split '{split.name}' has no usable rows to evaluate")
    records, generation = score_rows(model, processor, cfg, rows, batch_size, backend=backend)
    base_model = checkpoint_label == BASE_NAME
    named = Path(run_dir) / checkpoint_label if run_dir is not None else None
    if checkpoint_path is None and named is not None and not base_model and named.is_dir():
        checkpoint_path = named
    metrics = {
        **score([r["reference"] for r in records], [r["prediction"] for r in records]),
        "mean_loss": sum(r["loss"] for r in records) / len(records),
        "generation": generation,
        "checkpoint": checkpoint_info(checkpoint_label, None if base_model else checkpoint_path),
        "split": split.name,
        "limit": limit,
        "base_model": base_model,
        "model": cfg.model.model_name,
        "run": Path(run_dir).name if run_dir is not None else None,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_evaluation(out_dir, metrics, records, split, cfg, run_dir)
    return metrics


def write_evaluation(out_dir: Path, metrics: dict[str, Any], records: list[dict], split: Any, cfg: Config,
                     run_dir: Path | None) -> None:
    """An evaluation folder, whatever read the split (a model, a classical OCR engine): metrics.json,
    predictions.jsonl and report.html with the worst samples by CER."""
    from wellocr.report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_text_atomic(out_dir / "predictions.jsonl", predictions_jsonl(records))
    worst = worst_samples(records, cfg.eval.worst_k, by="cer")
    attach_images(worst, split, cfg)
    write_report(out_dir / "report.html", metrics, worst, run_dir=run_dir, eval_dir=out_dir)


# ---------------------------------------------------------------- loading a run's model


def prepare_backend(cfg: Config) -> Backend:
    """The backend training would pick, imported now: Unsloth must come before transformers/TRL/PEFT."""
    from wellocr.model import compile_cache_dir, import_backend, select_backend, use_compile_cache

    use_compile_cache(compile_cache_dir(cfg))
    backend = select_backend(cfg.model)
    import_backend(backend)
    return backend


def load_model(cfg: Config, backend: Backend, adapter_dir: Path | None) -> tuple[Any, Any]:
    """Base model + adapter (None: base alone) in eval mode, at the precision training used."""
    from wellocr.model import load_for_inference, resolve_precision

    precision = resolve_precision(cfg.train.precision, backend.device)
    print(f"loading {cfg.model.model_name}" + (f" + adapter {adapter_dir}" if adapter_dir else "")
          + f" ({backend})", file=sys.stderr, flush=True)
    return load_for_inference(cfg, backend, precision, adapter_dir)
