"""`python benchmarks/bench.py` — training speed of both backends on a random-weight Qwen3-VL, through the project code.

On a GPU, from the repository root with the gpu extra installed (offline: it needs no download), e.g.:

    python benchmarks/bench.py --backend unsloth,hf --batch 2,8,16 --steps 20 --warmup 4 --repeats 3 --cap-gb 24 \
        --gen-tokens 32 --image 1024x768 --work /tmp/wb --out bench.json

--skip leaves phases out (--skip profile,autobatch; --skip resume:hf for one backend). docs/BENCHMARKS.md has the
commands behind its numbers.

CPU (what tests/test_bench.py runs): `python benchmarks/bench.py --tiny`; data pipeline alone: `--data-only`.

What it does, offline: builds a random-weight model of the real Qwen3-VL-2B architecture (`wellocr.tiny`, built
ON the GPU in bf16 in a subprocess, so the init is not the 100 s CPU init) and synthetic 27-field headers at the
--image width (`wellocr.synth`; --image WxH also caps the pixel budget at W*H). Then one worker process per
backend (Unsloth patches transformers/TRL/PEFT at import) loads it with `wellocr.model.load_for_training`
(4-bit like the real run), prepares data with `wellocr.train.prepare_data` and trains with
`wellocr.train.build_trainer` (WellocrSFTTrainer, the project's config: LoRA r16, adamw_8bit, bf16, gradient
checkpointing, `data.dataloader_num_workers` 2). Per micro-batch (accumulation 1), `--repeats` fresh trainers
each run --warmup + --steps optimizer steps. A second worker process per backend resumes from the checkpoint.

Numbers (JSON at --out: `configs` has one object per backend x batch; `backends` the per-backend parts):
- load_s (model load + LoRA), first_step_s (train() call to the end of step 1: dataloader start, compile),
  step_s (per repeat the median over the timed steps; median, min, max over repeats), samples_per_s, tokens_per_s
  (attention-mask tokens fed to the language model, visual tokens included), visual tokens = patches / 4.
- Model FLOPs per step and MFU / HFU: `wellocr.flops` (its docstring has the formulas), against the H200's
  measured bf16 rate (790 TFLOP/s). Both null on CPU (tflops_per_s is still reported).
- peak allocated / reserved GB per configuration (reset in between; null on CPU).
- checkpoint: the Trainer's own `_save_checkpoint` (adapter + optimizer + scheduler + RNG + state), seconds, MB.
- resume: a new process from its launch (the orchestrator's timestamp, before the interpreter starts) to the end of
  the first optimizer step of `trainer.train(resume_from_checkpoint=...)`. Every worker starts on an empty "pod"
  (fresh HOME and TMPDIR): it finds only the compile caches under --work, as wellocr.train keeps them on the volume
  (`wellocr.model.COMPILE_CACHE_ENV`: Unsloth's generated code and mega-cache, inductor, Triton; Python bytecode
  where torch has none, `bytecode_env`).
  --resumes N runs N of them one after the other; compile cache hits and misses are reported per resume;
  --resume-env adds resumes with extra environment variables; --resume-profile one under pyinstrument.
  --prequantized loads a saved 4-bit copy, as the real run loads Unsloth's pre-quantised checkpoint.
- profile (approximate: every boundary is a torch.cuda.synchronize, which itself costs time): forward of the
  vision tower and of the language model (module hooks), loss_and_rest (rest of compute_loss: embeddings, lm_head,
  cross-entropy), backward (all of it, recompute included), optimizer (on_pre_optimizer_step → on_optimizer_step),
  data_wait (time in Trainer.get_batch_samples), other; vision_est / language_est scale the two forwards by the
  step's (forward + backward) / forward ratio.
- data_pipeline (CPU, no model): row fetch (parquet + base64 + image decode + resize) and TRL's vision collator
  with the 2B processor, samples/s in one process = one DataLoader worker; fraction of each GPU step it equals.
- generation: `wellocr.evaluate.generate_with_counts`, batch 8 vs a batch-1 loop over the same samples, each after
  one untimed call at its batch size (Unsloth compiles its prefill per batch size: reported as *_first_call_s).
- autobatch: `wellocr.autobatch.choose_micro_batch` with the training probe `wellocr.train` uses, under
  --autobatch-gb (set_per_process_memory_fraction), and samples/s of the seed 2 x 4 vs the chosen micro x
  accumulation at the same effective batch, under that cap, each --repeats times.
- --cap-gb caps every timed configuration the same way (24: an RTX 4090); --batch-hf gives hf its own sizes.

Results are written after every phase, so a bench stopped with Ctrl-C keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

from wellocr.flops import H200_BF16_FLOPS as PEAK_FLOPS
from wellocr.flops import arch_dims, param_groups, step_flops

SCRIPT = Path(__file__).resolve()  # workers run this file again, as a script (wellocr is installed, this is not)

GB = 2**30
BACKENDS = ("unsloth", "hf")
GEN_BATCH = 8
PHASES = ("train", "checkpoint", "resume", "profile", "autobatch", "generate")
DEFAULTS = {  # GPU run / --tiny (CPU)
    False: dict(backend="unsloth,hf", batch="2,8", steps=20, warmup=2, repeats=3, image="1024x768", gen_samples=8,
                gen_tokens=64),
    True: dict(backend="hf", batch="2", steps=2, warmup=1, repeats=2, image="320x240", gen_samples=2, gen_tokens=8),
}


# ---------------------------------------------------------------- FLOPs and statistics (pure)


def summary(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------- instrumentation of the project's trainer


class Recorder:
    """Per optimizer step: seconds (step end to step end), data wait, the shapes fed; with profile, the split."""

    def __init__(self, device: str, profile: bool = False):
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.profile = profile
        self.steps: list[dict] = []
        self.current = self._new()
        self.last = 0.0
        self.started: dict[str, float] = {}

    @staticmethod
    def _new() -> dict:
        return {"lm_lengths": [], "image_patches": [], "samples": 0, "parts": defaultdict(float)}

    def start(self) -> None:
        self.sync()
        self.last = time.perf_counter()

    def batch(self, inputs: dict) -> None:
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        lengths = mask.sum(-1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
        self.current["lm_lengths"] += [int(n) for n in lengths]
        self.current["samples"] += len(lengths)
        grid = inputs.get("image_grid_thw")
        if grid is not None:
            self.current["image_patches"] += [int(n) for n in grid.prod(-1).tolist()]

    def begin(self, part: str) -> None:
        if self.profile:
            self.sync()
            self.started[part] = time.perf_counter()

    def end(self, part: str) -> None:
        if self.profile and part in self.started:
            self.sync()
            self.current["parts"][part] += time.perf_counter() - self.started.pop(part)

    def step_end(self) -> None:
        self.sync()
        if "loss" in self.current:
            self.current["loss"] = float(self.current["loss"])
        now = time.perf_counter()
        self.current.update(seconds=now - self.last, wall_end=time.time())
        self.last = now
        self.steps.append(self.current)
        self.current = self._new()


def instrument(trainer: Any, rec: Recorder) -> list:
    """Wrap the trainer instance's own methods (training_step, compute_loss, get_batch_samples) and, with
    rec.profile, hook the vision tower and the language model. Returns hook handles to remove."""
    step, loss, fetch = trainer.training_step, trainer.compute_loss, trainer.get_batch_samples

    def training_step(model, inputs, *args, **kwargs):
        rec.batch(inputs)
        rec.begin("fwd_bwd")
        out = step(model, inputs, *args, **kwargs)
        rec.end("fwd_bwd")
        rec.current["loss"] = out.detach() + rec.current.get("loss", 0.0)  # a tensor: read at step_end, no sync here
        return out

    def compute_loss(*args, **kwargs):
        rec.begin("forward")
        out = loss(*args, **kwargs)
        rec.end("forward")
        return out

    def get_batch_samples(*args, **kwargs):
        started = time.perf_counter()
        out = fetch(*args, **kwargs)
        rec.current["parts"]["data_wait"] += time.perf_counter() - started
        rec.current["fetches"] = rec.current.get("fetches", 0) + 1
        return out

    trainer.training_step, trainer.compute_loss = training_step, compute_loss
    trainer.get_batch_samples = get_batch_samples
    handles = []
    if rec.profile:
        modules = dict(trainer.model.named_modules())
        for part, suffix in (("vision_fwd", "visual"), ("language_fwd", "language_model")):
            name = min((n for n in modules if n.endswith(suffix)), key=len)
            handles.append(modules[name].register_forward_pre_hook(lambda *_, p=part: rec.begin(p)))
            handles.append(modules[name].register_forward_hook(lambda *_, p=part: rec.end(p)))
    return handles


def timing_callback(rec: Recorder) -> Any:
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            rec.begin("optimizer")

        def on_optimizer_step(self, args, state, control, **kwargs):
            rec.end("optimizer")

        def on_step_end(self, args, state, control, **kwargs):
            rec.step_end()
            control.should_evaluate = control.should_save = False  # neither belongs in a timed run
            return control

    return Timing()


CACHE_LOGGERS = ("torch._functorch._aot_autograd.autograd_cache", "torch._inductor.codecache", "torch._dynamo.package")


class CacheLog(logging.Handler):
    """Why torch.compile's caches missed or were bypassed (their loggers say so at INFO; Unsloth sets torch's
    logging to CRITICAL at import, so call after it)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        for name in CACHE_LOGGERS:
            logger = logging.getLogger(name)
            logger.setLevel(logging.INFO)
            logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(word in message for word in ("Bypass", "bypass", "unable", "miss", "Failed", "No package")):
            self.messages.append(message[:300])
            print(f"bench: compile cache: {message[:300]}", flush=True)


def compile_stats(cache_log: CacheLog | None = None) -> dict[str, Any]:
    """What torch.compile did in this process: cache hits and misses, graphs, seconds per phase; cache sizes."""
    import torch

    from wellocr.model import COMPILE_CACHE_ENV

    counters = torch._dynamo.utils.counters
    keep = {"inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
            "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass"),
            "stats": ("unique_graphs", "calls_captured"), "frames": ("total", "ok"),
            "dynamo_cache": ("dynamo_cache_hit", "dynamo_cache_miss", "dynamo_cache_error")}  # TORCH_CACHING_PRECOMPILE
    out: dict[str, Any] = {f"{group}.{name}": counters[group][name] for group, names in keep.items() for name in names}
    out["compile_s"] = compile_seconds()
    try:
        from unsloth_zoo.compile_cache import _STATE

        out["unsloth_mega_cache_hit"] = _STATE.get("hit")
    except ImportError:
        pass
    out["cache_mb"] = {variable: _tree_mb(os.environ.get(variable)) for variable in (*COMPILE_CACHE_ENV,
                                                                                     "PYTHONPYCACHEPREFIX")}
    out["cache_messages"] = sorted(set(cache_log.messages))[:20] if cache_log is not None else []
    return out


def compile_seconds(top: int = 25) -> dict[str, list[float]]:
    """torch.compile's timed phases in this process, the costliest first: {phase: [calls, total s, max s]}."""
    from torch._dynamo.utils import compilation_time_metrics

    rows = {name: [len(times), round(sum(times), 3), round(max(times), 3)]
            for name, times in compilation_time_metrics.items() if times}
    return dict(sorted(rows.items(), key=lambda row: -row[1][1])[:top])


def _tree_mb(directory: str | Path | None) -> float | None:
    if not directory or not Path(directory).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file()) / 2**20


# ---------------------------------------------------------------- one backend, in its own process


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.result: dict[str, Any] = {"backend": args.worker, "errors": {}, "skipped": [], "configs": []}

    # -- bookkeeping

    def save(self) -> None:
        path = Path(self.args.result)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(tmp, path)

    def attempt(self, name: str, fn, *args) -> None:
        """Run one phase unless --skip names it; an exception is recorded and the worker moves on."""
        if name.split()[0] in self.args.skip or f"{name.split()[0]}:{self.args.worker}" in self.args.skip:
            self.result["skipped"].append(f"{name} (--skip)")
            print(f"bench: skipping {name}: --skip", flush=True)
            return
        started = time.time()
        print(f"bench: {self.args.worker}: {name}", flush=True)
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - one broken phase must not lose the others
            traceback.print_exc()
            self.result["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"bench: {name} took {time.time() - started:.1f} s", flush=True)
        self.save()

    # -- setup

    def setup(self) -> None:
        from wellocr.model import Backend, import_backend

        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(1)  # on shared CPU cores 2 OpenMP threads can be 50x slower than 1
        self.backend = Backend(self.args.worker, device, "benchmarks/bench.py")
        import_backend(self.backend)  # Unsloth before transformers/TRL/PEFT
        import peft  # noqa: F401 - imported here so import_s counts them
        import trl  # noqa: F401

        self.cache_log = CacheLog()

        from wellocr.model import load_for_training, resolve_precision
        from wellocr.rundir import RunDir
        from wellocr.train import prepare_data

        self.result["import_s"] = time.time() - self.args.launched_at
        self.cfg = bench_config(self.args, self.args.worker)
        self.precision = resolve_precision(self.cfg.train.precision, device)
        kind = "resume" if self.args.resume_from else "run"
        self.run = RunDir(Path(self.args.work) / f"{self.args.worker}-{kind}")
        started = time.perf_counter()
        self.model, self.processor = load_for_training(self.cfg, self.backend, self.precision)
        self.result["load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        self.data, self.max_length = prepare_data(self.cfg, self.processor, self.run)
        self.result.update(data_s=time.perf_counter() - started, max_length=self.max_length, device=device,
                           precision=self.precision, params=param_groups(self.model))
        self.dims = arch_dims(self.model)
        if self.args.cap_gb:  # every timed configuration under the target GPU's memory, for the worker's life
            from wellocr.autobatch import memory_cap

            self.cap = contextlib.ExitStack()
            self.result["cap_gb"] = self.args.cap_gb if self.cap.enter_context(memory_cap(self.args.cap_gb)) else None
        self.recompute = self.cfg.model.use_gradient_checkpointing != "false"
        self.save()

    def trainer(self, micro: int, accumulation: int, steps: int, rec: Recorder | None = None) -> tuple[Any, list]:
        """A trainer from the project's build_trainer (instrumented when given a recorder) and its hook handles."""
        from wellocr.train import build_trainer

        t = self.cfg.train
        t.max_steps = t.eval_steps = t.save_steps = steps
        callbacks = [timing_callback(rec)] if rec is not None else []
        trainer = build_trainer(self.cfg, self.run, self.backend, self.precision, self.model, self.processor,
                                self.data, self.max_length, micro, accumulation, callbacks)
        return trainer, instrument(trainer, rec) if rec is not None else []

    def train(self, micro: int, accumulation: int, steps: int, profile: bool = False) -> tuple[Any, Recorder]:
        """A fresh trainer for `steps` optimizer steps; rec.steps[0]["seconds"] runs from the train() call."""
        rec = Recorder(self.backend.device, profile)
        trainer, handles = self.trainer(micro, accumulation, steps, rec)
        rec.start()
        trainer.train()
        for handle in handles:
            handle.remove()
        return trainer, rec

    def step_stats(self, steps: list[dict]) -> dict[str, Any]:
        """Throughput over timed steps: medians per step, sums for rates."""
        seconds = sum(s["seconds"] for s in steps)
        flops = [step_flops(s["lm_lengths"], s["image_patches"], self.result["params"], self.dims, self.recompute)
                 for s in steps]
        cuda = self.backend.device == "cuda"
        return {
            "step_s": statistics.median(s["seconds"] for s in steps),
            "samples_per_s": sum(s["samples"] for s in steps) / seconds,
            "tokens_per_s": sum(sum(s["lm_lengths"]) for s in steps) / seconds,
            "tflops_per_s": sum(f[0] for f in flops) / seconds / 1e12,
            "mfu": sum(f[0] for f in flops) / seconds / PEAK_FLOPS if cuda else None,
            "hfu": sum(f[1] for f in flops) / seconds / PEAK_FLOPS if cuda else None,
            "data_wait_s": statistics.median(s["parts"]["data_wait"] for s in steps)
            if all(s.get("fetches") for s in steps) else None,  # None: the loop never called get_batch_samples
            "lm_tokens_per_step": statistics.median(sum(s["lm_lengths"]) for s in steps),
            "patches_per_step": statistics.median(sum(s["image_patches"]) for s in steps),
            "model_tflop_per_step": statistics.median(f[0] for f in flops) / 1e12,
        }

    # -- phases

    def measure(self, micro: int, accumulation: int = 1, repeats: int | None = None, steps: int | None = None,
                warmup: int | None = None) -> dict[str, Any]:
        import torch

        from wellocr.autobatch import free_memory

        repeats = repeats or self.args.repeats
        steps, warmup = steps or self.args.steps, warmup if warmup is not None else self.args.warmup
        cuda = self.backend.device == "cuda"
        if cuda:
            free_memory()
            torch.cuda.reset_peak_memory_stats()
        out: dict[str, Any] = {"batch": micro * accumulation, "micro_batch": micro,
                               "gradient_accumulation_steps": accumulation, "repeats": []}
        for r in range(repeats):
            started = time.perf_counter()
            self.last_trainer, rec = self.train(micro, accumulation, warmup + steps)
            stats = self.step_stats(rec.steps[warmup:])
            stats.update(first_step_s=rec.steps[0]["seconds"], seconds=time.perf_counter() - started)
            out["repeats"].append(stats)
            print(f"bench: {self.args.worker} {micro}x{accumulation} repeat {r + 1}: {stats['step_s']:.3f} s/step, "
                  f"{stats['samples_per_s']:.2f} samples/s", flush=True)
        reps = out["repeats"]
        out["first_step_s"] = reps[0]["first_step_s"]
        for key in ("step_s", "samples_per_s", "tokens_per_s", "tflops_per_s", "mfu", "hfu", "data_wait_s"):
            out[key] = summary([r[key] for r in reps])
        for key in ("lm_tokens_per_step", "patches_per_step", "model_tflop_per_step"):
            out[key] = reps[0][key]
        out["visual_tokens_per_step"] = out["patches_per_step"] / self.dims["merge"]
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GB if cuda else None
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB if cuda else None
        return out

    def train_config(self, micro: int) -> None:
        self.result["configs"].append({**self.measure(micro), "load_s": self.result["load_s"]})

    def checkpoint(self) -> None:
        from wellocr.checkpoint import mark_complete

        trainer = self.last_trainer
        started = time.perf_counter()
        trainer._save_checkpoint(trainer.model, trial=None)  # what save_steps runs: adapter, optimizer, RNG, state
        seconds = time.perf_counter() - started
        path = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        mark_complete(path, trainer.state.global_step)
        self.result["checkpoint"] = {"path": str(path), "step": trainer.state.global_step, "seconds": seconds,
                                     "mb": _tree_mb(path), "micro_batch": trainer.args.per_device_train_batch_size}

    def profile(self, micro: int) -> None:
        _, rec = self.train(micro, 1, 1 + 3, profile=True)
        steps = rec.steps[1:]
        part = {k: statistics.median(s["parts"][k] for s in steps)
                for k in ("vision_fwd", "language_fwd", "forward", "fwd_bwd", "optimizer", "data_wait")}
        total = statistics.median(s["seconds"] for s in steps)
        ratio = part["fwd_bwd"] / part["forward"] if part["forward"] else 0.0
        self.result["profile"] = {
            "micro_batch": micro, "step_s": total, "vision_fwd_s": part["vision_fwd"],
            "language_fwd_s": part["language_fwd"],
            "loss_and_rest_fwd_s": part["forward"] - part["vision_fwd"] - part["language_fwd"],
            "backward_s": part["fwd_bwd"] - part["forward"], "optimizer_s": part["optimizer"],
            "data_wait_s": part["data_wait"],
            "other_s": total - part["fwd_bwd"] - part["optimizer"] - part["data_wait"],
            "vision_est_s": part["vision_fwd"] * ratio, "language_est_s": part["language_fwd"] * ratio,
            "note": "approximate: synchronised boundaries; *_est scale forward by (forward+backward)/forward",
        }

    def autobatch(self) -> None:
        import torch

        from wellocr.autobatch import choose_micro_batch, memory_cap, training_probe
        from wellocr.train import probe_trainer_factory

        effective, budget = self.args.effective_batch, self.args.autobatch_gb
        probe_trainer = probe_trainer_factory(self.cfg, self.run, self.backend, self.precision, self.model,
                                              self.processor, self.data, self.max_length)
        probe, probed = training_probe(probe_trainer), {}

        def recorded(micro: int) -> None:  # the probe, plus its peak memory (or "oom") per candidate
            probed[micro] = "oom"
            if self.backend.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            probe(micro)
            probed[micro] = torch.cuda.max_memory_reserved() / GB if self.backend.device == "cuda" else None

        started = time.perf_counter()
        micro, accumulation = choose_micro_batch(recorded, effective, self.backend.device, budget)
        out = {"effective_batch": effective, "budget_gb": budget, "micro_batch": micro,
               "gradient_accumulation_steps": accumulation, "probe_s": time.perf_counter() - started,
               "probe_peak_reserved_gb": probed}
        self.result["autobatch"] = out
        seed = (min(2, effective), effective // min(2, effective))
        with memory_cap(budget if self.backend.device == "cuda" else None):
            for label, (m, a) in (("seed", seed), ("auto", (micro, accumulation))):
                if label == "auto" and (m, a) == seed:
                    out["auto"] = out["seed"]
                    break
                measured = self.measure(m, a)  # --repeats, like every timed configuration
                out[label] = {**{k: measured[k] for k in ("micro_batch", "gradient_accumulation_steps", "step_s",
                                                           "samples_per_s", "peak_reserved_gb")},
                              "repeats": len(measured["repeats"])}
                self.save()
        if out.get("auto") and out["auto"]["samples_per_s"]:
            out["speedup"] = out["auto"]["samples_per_s"]["median"] / out["seed"]["samples_per_s"]["median"]

    def generation(self) -> None:
        from wellocr.evaluate import fixed_eval_rows, generate_with_counts, row_inputs

        rows = fixed_eval_rows(self.data["splits"]["eval"], self.args.gen_samples)
        images, instructions, _ = row_inputs(rows, self.cfg)
        tokens = self.cfg.eval.max_new_tokens
        sync = Recorder(self.backend.device).sync
        out = {"samples": len(rows), "max_new_tokens": tokens}
        for label, size in (("loop", 1), ("batched", GEN_BATCH)):
            # one untimed call per batch size first: Unsloth compiles its prefill per batch size (tens of seconds)
            sync()
            started = time.perf_counter()
            generate_with_counts(self.model, self.processor, images[:size], instructions[:size], tokens)
            sync()
            out[f"{label}_first_call_s"] = time.perf_counter() - started
            sync()
            started, new = time.perf_counter(), 0
            for i in range(0, len(rows), size):
                new += sum(generate_with_counts(self.model, self.processor, images[i:i + size],
                                                instructions[i:i + size], tokens)[1])
            sync()
            seconds = time.perf_counter() - started
            out[label] = {"batch_size": size, "seconds": seconds, "samples_per_s": len(rows) / seconds,
                          "new_tokens": new}
        out["speedup"] = out["batched"]["samples_per_s"] / out["loop"]["samples_per_s"]
        self.result["generation"] = out

    def resume(self) -> None:
        """In this new process: train(resume_from_checkpoint) to the end of its first optimizer step."""
        checkpoint = Path(self.args.resume_from)
        step = int(checkpoint.name.rsplit("-", 1)[1])
        started = time.perf_counter()
        rec = Recorder(self.backend.device)
        trainer, handles = self.trainer(self.args.batches[0], 1, step + 1, rec)
        trainer_s = time.perf_counter() - started
        rec.start()
        trainer.train(resume_from_checkpoint=str(checkpoint))
        first = rec.steps[0]
        self.result["resume"] = {
            "checkpoint": str(checkpoint), "resumed_at_step": step, "ended_at_step": trainer.state.global_step,
            "resume_to_first_step_s": first["wall_end"] - self.args.launched_at,
            "import_s": self.result["import_s"], "load_s": self.result["load_s"], "data_s": self.result["data_s"],
            "trainer_s": trainer_s, "train_to_first_step_s": first["seconds"], "loss": first.get("loss"),
            "compile": compile_stats(self.cache_log),
        }

    def run_all(self) -> None:
        self.setup()
        if self.args.resume_from:
            self.attempt("resume", self.resume)
            return
        for micro in self.args.batches if self.args.worker != "hf" else self.args.batches_hf:
            self.attempt(f"train batch {micro}", self.train_config, micro)
        self.result["compile"] = compile_stats(self.cache_log)
        if getattr(self, "last_trainer", None) is not None:
            self.attempt("checkpoint", self.checkpoint)
        self.attempt("profile", self.profile, self.args.profile_batch or self.args.batches[0])
        self.attempt("generate", self.generation)
        self.attempt("autobatch", self.autobatch)


def bench_config(args: argparse.Namespace, backend: str) -> Any:
    """The project's default config (as a real run gets it), pointed at the bench's model and data."""
    from wellocr.config import Config, validate

    cfg = Config()
    width, height = args.image_size
    cfg.model.model_name, cfg.model.backend = str(args.model), backend
    cfg.data.dataset_name = str(args.data)
    cfg.data.max_pixels = width * height
    cfg.data.min_pixels = min(cfg.data.min_pixels, width * height // 4)
    cfg.data.dataset_num_proc = 1
    if args.tiny:
        cfg.data.dataloader_num_workers = 0  # on 2 CPU cores worker processes cost more than they save
    cfg.eval.max_new_tokens = args.gen_tokens
    cfg.wandb.enabled = False
    t = cfg.train
    t.max_steps = t.eval_steps = t.save_steps = args.warmup + args.steps
    validate(cfg, {}, "benchmarks/bench.py")
    return cfg


# ---------------------------------------------------------------- assets and the data pipeline (orchestrator)


def build_model(args: argparse.Namespace) -> None:
    """`--worker build`: the random-weight model, initialised on the GPU when there is one (seconds, not minutes)."""
    import torch

    from wellocr.tiny import build_tiny_model

    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with torch.device(device):  # factory calls in the model's __init__ allocate (and init) there
            build_tiny_model(args.model, seed=0, arch=args.arch)
    except Exception:  # noqa: BLE001 - a slow CPU init beats losing the whole GPU run
        if device == "cpu":
            raise
        traceback.print_exc()
        device = "cpu (the GPU init failed)"
        build_tiny_model(args.model, seed=0, arch=args.arch)
    print(f"bench: built {args.arch} on {device} in {time.time() - started:.1f} s at {args.model}", flush=True)


def quantized_dir(args: argparse.Namespace) -> Path:
    return Path(f"{args.model}-bnb-4bit")


def quantize_model(args: argparse.Namespace) -> None:
    """`--worker quantize`: a 4-bit copy of the model, the form the real run downloads (Unsloth's pre-quantised
    checkpoint: NF4 language model, vision tower and lm_head in bf16), so the bench's load time is the real one."""
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    source, target = Path(args.model), quantized_dir(args)
    if (target / "config.json").is_file():
        return
    started = time.time()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                      llm_int8_skip_modules=["lm_head", "model.visual"])
    model = AutoModelForImageTextToText.from_pretrained(source, quantization_config=quantization,
                                                        dtype=torch.bfloat16, device_map={"": 0})
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for file in source.iterdir():  # tokenizer, processor, chat template, build record; not the bf16 weights
        if file.is_file() and not file.name.startswith("model") and not (tmp / file.name).exists():
            shutil.copy2(file, tmp / file.name)
    tmp.rename(target)
    print(f"bench: 4-bit copy at {target} ({_tree_mb(target) / 1024:.2f} GB) in {time.time() - started:.1f} s",
          flush=True)


def fresh_pod(work: Path, backend: str, name: str) -> dict[str, str]:
    """HOME and TMPDIR of a new, empty pod: the worker finds only the caches on the volume (--work), not what
    earlier workers left in /tmp (inductor's default) or ~/.cache (Unsloth's mega-cache default)."""
    pod = work / backend / f"pod-{name}"
    shutil.rmtree(pod, ignore_errors=True)
    (pod / "home").mkdir(parents=True)
    (pod / "tmp").mkdir()
    return {"HOME": str(pod / "home"), "TMPDIR": str(pod / "tmp")}


def data_pipeline(args: argparse.Namespace, samples: int = 16) -> dict[str, Any]:
    """CPU cost of one batch: row fetch (parquet + base64 + decode + resize), then TRL's collator with the 2B
    processor (chat template, tokenizer, image normalisation and patches). One process = one DataLoader worker."""
    from wellocr.data import load_splits, trainer_dataset
    from wellocr.evaluate import loss_collator
    from wellocr.processing import ImageOnlyQwen3VLProcessor, load_processor
    from wellocr.tiny import image_processor_for, qwen3_vl_chat_template, train_tokenizer

    arch = "qwen3-vl-2b"
    cfg = bench_config(args, "hf")
    directory = Path(args.work) / f"processor-{arch}"
    if not (directory / "tokenizer_config.json").is_file():
        tokenizer, template = train_tokenizer(), qwen3_vl_chat_template()
        tokenizer.chat_template = template
        ImageOnlyQwen3VLProcessor(image_processor=image_processor_for(arch), tokenizer=tokenizer,
                                  chat_template=template).save_pretrained(directory)
    processor = load_processor(directory, None, cfg.data.min_pixels, cfg.data.max_pixels)
    split = load_splits(cfg.data)["train"]
    dataset, collator = trainer_dataset(split, cfg.data), loss_collator(processor)
    batch = max(args.batches)
    samples = min(samples, len(dataset))
    collator([dataset[0]])  # warm-up (template compilation, first decode)
    started = time.perf_counter()
    rows = [dataset[i] for i in range(samples)]
    fetched = time.perf_counter()
    tokens = 0
    for i in range(0, samples, batch):
        tokens += int(collator(rows[i:i + batch])["attention_mask"].sum())
    done = time.perf_counter()
    return {"processor": type(processor).__name__, "image_processor": type(processor.image_processor).__name__,
            "samples": samples, "batch_size": batch, "fetch_ms_per_sample": (fetched - started) / samples * 1e3,
            "collate_ms_per_sample": (done - fetched) / samples * 1e3,
            "samples_per_s_per_worker": samples / (done - started), "mean_tokens": tokens / samples,
            "dataloader_num_workers": cfg.data.dataloader_num_workers}


def data_rows(args: argparse.Namespace) -> tuple[int, int]:
    """Train rows so the largest batch never crosses an epoch; eval rows for the generation comparison."""
    return max(args.batches) * (args.warmup + args.steps), max(args.gen_samples, 1)


def split_rows(data: Path) -> dict[str, int]:
    """Rows per split of a finished synthetic set (parquet footers only), {} if it is not one."""
    import pyarrow.parquet as pq

    from wellocr.synth import split_path

    if not (data / "README.md").is_file():
        return {}
    return {split: pq.ParquetFile(split_path(data, split)).metadata.num_rows for split in ("train", "eval")}


def large_enough(data: Path, train: int, eval: int) -> bool:
    rows = split_rows(data)
    return bool(rows) and rows["train"] >= train and rows["eval"] >= eval


def data_dir(work: Path, width: int, train: int, eval: int) -> str:
    """The smallest finished synthetic set under work with enough rows, else a new one's name.

    Row i is the same in every set (one seed, drawn per row), so a larger set serves a smaller run; writing
    2,000 headers again would cost a GPU lease two minutes.
    """
    sizes = sorted(int(n) for p in work.glob(f"headers-{width}-*") if (n := p.name.rsplit("-", 1)[1]).isdigit())
    fits = (n for n in sizes if large_enough(work / f"headers-{width}-{n}", train, eval))
    return str(work / f"headers-{width}-{next(fits, train)}")


def ensure_data(args: argparse.Namespace) -> None:
    from wellocr.synth import write_dataset

    rows, eval_rows, data = *data_rows(args), Path(args.data)
    ours = data.parent == Path(args.work) and data.name.startswith("headers-")  # never rewrite a --data set
    if not (data / "README.md").is_file() or (ours and not large_enough(data, rows, eval_rows)):
        write_dataset(args.data, train=rows, eval=eval_rows, seed=0, width=args.image_size[0])


def spawn(args: argparse.Namespace, extra: list[str], log: Path, env: dict | None = None) -> int:
    """`python benchmarks/bench.py EXTRA` in a new process, output to log; returns its exit code."""
    command = [sys.executable, str(SCRIPT), *common_args(args), "--launched-at", repr(time.time()), *extra]
    with open(log, "w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}).returncode


def common_args(args: argparse.Namespace) -> list[str]:
    width, height = args.image_size
    out = ["--batch", ",".join(map(str, args.batches)), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--image", f"{width}x{height}", "--work", str(args.work),
           "--model", str(args.model), "--data", str(args.data), "--gen-samples", str(args.gen_samples),
           "--gen-tokens", str(args.gen_tokens), "--autobatch-gb", str(args.autobatch_gb),
           "--effective-batch", str(args.effective_batch), "--skip", ",".join(args.skip),
           "--batch-hf", ",".join(map(str, args.batches_hf)), "--cap-gb", str(args.cap_gb or 0),
           "--profile-batch", str(args.profile_batch or 0)]
    return out + (["--tiny"] if args.tiny else [])


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    started = time.time()
    cuda = torch.cuda.is_available()
    work, logs = Path(args.work), Path(args.logs)
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"meta": {"command": sys.argv, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                                       "torch": torch.__version__, "arch": args.arch, "image": args.image,
                                       "peak_flops": PEAK_FLOPS, "started": started},
                              "configs": [], "backends": {}, "data_pipeline": None}
    build = None
    if not (Path(args.model) / "wellocr_build.json").is_file():
        command = [sys.executable, str(SCRIPT), "--worker", "build", *common_args(args), "--launched-at", "0"]
        with open(logs / "build.log", "w") as log:
            build = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    ensure_data(args)
    try:
        report["data_pipeline"] = data_pipeline(args)
    except Exception as exc:  # noqa: BLE001 - the GPU part must still run
        traceback.print_exc()
        report["data_pipeline"] = {"error": f"{type(exc).__name__}: {exc}"}
    if build is not None and build.wait() != 0:
        raise SystemExit(f"bench: model build failed, see {logs / 'build.log'}")
    model_4bit = []
    if args.prequantized and cuda and "unsloth" in args.backends:
        code = spawn(args, ["--worker", "quantize"], logs / "quantize.log")
        if code == 0 and (quantized_dir(args) / "config.json").is_file():
            model_4bit = ["--model", str(quantized_dir(args))]
        report["meta"]["prequantized"] = str(quantized_dir(args)) if model_4bit else f"failed (exit {code})"
    report["meta"]["setup_s"] = time.time() - started
    write_json(Path(args.out), report)
    backends = [b for b in args.backends if b != "unsloth" or cuda]
    report["meta"]["skipped_backends"] = [b for b in args.backends if b not in backends]
    for backend in backends:
        report["backends"][backend] = result = run_backend(args, backend, model_4bit)
        report["configs"] += [{"backend": backend, **config} for config in result.pop("configs", [])]
        write_json(Path(args.out), report)
    add_data_fraction(report)
    report["meta"]["wall_s"] = time.time() - started
    write_json(Path(args.out), report)
    return report


def worker_env(work: Path, backend: str) -> dict[str, str]:
    """The compile caches where wellocr.train keeps them (on the volume); settings exported to the bench win."""
    from wellocr.model import COMPILE_CACHE_SETTINGS, compile_cache_env

    env = compile_cache_env(work / backend / "compile-cache")
    env.update({name: os.environ[name] for name in COMPILE_CACHE_SETTINGS if name in os.environ})
    return env


def run_backend(args: argparse.Namespace, backend: str, model_4bit: list[str]) -> dict[str, Any]:
    """One backend's worker process (the timed phases), then its resumes, each a new process on an empty pod."""
    work, logs = Path(args.work), Path(args.logs)
    env = worker_env(work, backend)
    result_file = work / f"{backend}-result.json"
    result_file.unlink(missing_ok=True)
    model = model_4bit if backend == "unsloth" else []
    code = spawn(args, ["--worker", backend, "--result", str(result_file), *model], logs / f"{backend}.log",
                 {**env, **fresh_pod(work, backend, "train")})
    result = json.loads(result_file.read_text()) if result_file.is_file() else {"errors": {}}
    result["exit_code"] = code
    checkpoint = (result.get("checkpoint") or {}).get("path")
    if not checkpoint or {"resume", f"resume:{backend}"} & args.skip:
        return result
    resume = ["--worker", backend, "--resume-from", checkpoint, "--batch", str(result["checkpoint"]["micro_batch"]),
              *model]
    result["resumes"] = []
    for n in range(args.resumes):  # one after the other: a later one finds what the earlier ones compiled
        result["resumes"].append(resumed(args, backend, f"resume{n or ''}", resume, env))
    result["resume"] = result["resumes"][0]
    for n, variables in enumerate(args.resume_env):  # then one resume per --resume-env, in order
        result["resumes"].append({"env": variables,
                                  **resumed(args, backend, f"resume-env{n + 1}", resume, {**env, **variables})})
    if args.resume_profile:
        profile = logs / f"{backend}-resume-profile.txt"
        result["resume_profiled"] = resumed(args, backend, "resume-profiled",
                                            [*resume, "--profile-to", str(profile)], env)
    return result


def resumed(args: argparse.Namespace, backend: str, name: str, command: list[str], env: dict[str, str]) -> dict:
    """One resume worker on a new, empty pod; its `resume` result, or what went wrong."""
    work = Path(args.work)
    resume_file = work / f"{backend}-resume.json"
    resume_file.unlink(missing_ok=True)
    code = spawn(args, [*command, "--result", str(resume_file)], Path(args.logs) / f"{backend}-{name}.log",
                 {**env, **fresh_pod(work, backend, name)})
    out = json.loads(resume_file.read_text()) if resume_file.is_file() else {}
    return out.get("resume") or {"error": out.get("errors") or f"exit {code}"}


def add_data_fraction(report: dict) -> None:
    """How much of each GPU step one DataLoader worker needs to prepare that step's batch."""
    rate = (report.get("data_pipeline") or {}).get("samples_per_s_per_worker")
    for config in report["configs"]:
        step = (config.get("step_s") or {}).get("median")
        config["data_s_per_step_1worker"] = config["batch"] / rate if rate else None
        config["data_fraction_of_step_1worker"] = config["batch"] / rate / step if rate and step else None


# ---------------------------------------------------------------- table


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"{value['median']:.{digits}f} [{value['min']:.{digits}f}-{value['max']:.{digits}f}]"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _percent(value: dict | None) -> dict | None:
    return None if value is None else {k: 100 * v for k, v in value.items()}


def print_table(report: dict) -> None:
    print(f"\nbenchmarks/bench.py on {report['meta']['device']} ({report['meta']['arch']}, {report['meta']['image']} "
          "images); medians [min-max over repeats]")
    header = ("backend", "batch", "load s", "first s", "s/step", "samples/s", "tokens/s", "MFU", "HFU",
              "alloc GB", "resv GB", "data/step 1 worker")
    rows = [header]
    for c in report["configs"]:
        rows.append((c["backend"], str(c["batch"]), _fmt(c.get("load_s"), 1), _fmt(c.get("first_step_s"), 1),
                     _fmt(c.get("step_s"), 3), _fmt(c.get("samples_per_s")), _fmt(c.get("tokens_per_s"), 0),
                     _fmt(_percent(c.get("mfu")), 1) + ("%" if c.get("mfu") else ""),
                     _fmt(_percent(c.get("hfu")), 1) + ("%" if c.get("hfu") else ""),
                     _fmt(c.get("peak_allocated_gb"), 1), _fmt(c.get("peak_reserved_gb"), 1),
                     _fmt(c.get("data_fraction_of_step_1worker"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    for name, b in report["backends"].items():
        print(f"\n[{name}] exit {b.get('exit_code')}, import {_fmt(b.get('import_s'), 1)} s, "
              f"load {_fmt(b.get('load_s'), 1)} s, params {b.get('params')}")
        if b.get("checkpoint"):
            ck = b["checkpoint"]
            print(f"  checkpoint: {ck['seconds']:.2f} s, {ck['mb']:.1f} MB (step {ck['step']})")
        for key, r in [*((f"resume {n + 1}" + (f" with {r['env']}" if r.get("env") else ""), r)
                         for n, r in enumerate(b.get("resumes") or [])),
                       ("resume_profiled", b.get("resume_profiled") or {})]:
            if "resume_to_first_step_s" in r:
                c = r.get("compile") or {}
                print(f"  {key} to first step (new process, fresh pod): {r['resume_to_first_step_s']:.1f} s (import "
                      f"{r['import_s']:.1f}, load {r['load_s']:.1f}, train() to step end "
                      f"{r['train_to_first_step_s']:.1f}); FX graph cache hit/miss "
                      f"{c.get('inductor.fxgraph_cache_hit')}/{c.get('inductor.fxgraph_cache_miss')}, AOTAutograd "
                      f"{c.get('aot_autograd.autograd_cache_hit')}/{c.get('aot_autograd.autograd_cache_miss')}, "
                      f"Dynamo cache {c.get('dynamo_cache.dynamo_cache_hit')}/{c.get('dynamo_cache.dynamo_cache_miss')}"
                      f"; loss {_fmt(r.get('loss'), 4)}")
            elif r:
                print(f"  {key}: {r}")
        if b.get("profile"):
            p = b["profile"]
            parts = ("vision_fwd_s", "language_fwd_s", "loss_and_rest_fwd_s", "backward_s", "optimizer_s",
                     "data_wait_s", "other_s")
            print(f"  profile (batch {p['micro_batch']}, {p['step_s']:.3f} s, approximate): "
                  + ", ".join(f"{k[:-2]} {p[k]:.3f}" for k in parts))
        if b.get("generation"):
            g = b["generation"]
            print(f"  generation ({g['samples']} samples, {g['max_new_tokens']} new tokens): loop "
                  f"{g['loop']['samples_per_s']:.2f}/s, batched {g['batched']['samples_per_s']:.2f}/s "
                  f"(x{g['speedup']:.2f}); first calls (compile/warm-up) {_fmt(g.get('loop_first_call_s'), 1)} s "
                  f"and {_fmt(g.get('batched_first_call_s'), 1)} s")
        if b.get("autobatch"):
            a = b["autobatch"]
            seed, auto = a.get("seed") or {}, a.get("auto") or {}
            print(f"  autobatch ({a['budget_gb']} GB, effective {a['effective_batch']}): chose "
                  f"{a['micro_batch']}x{a['gradient_accumulation_steps']} in {a['probe_s']:.1f} s; samples/s seed "
                  f"{_fmt(seed.get('samples_per_s'))} vs auto {_fmt(auto.get('samples_per_s'))}")
        for key in ("skipped", "errors"):
            if b.get(key):
                print(f"  {key}: {b[key]}")
    if report["meta"].get("skipped_backends"):
        print(f"\nnot run (GPU-only, no CUDA here): {', '.join(report['meta']['skipped_backends'])}")
    d = report.get("data_pipeline")
    if d:
        print(f"\n[data pipeline, CPU, 1 worker] {d}")


# ---------------------------------------------------------------- CLI


def profile_start() -> Any:
    """A wall-clock sampling profile of this process's main thread (pyinstrument: waits count, unlike cProfile)."""
    try:
        from pyinstrument import Profiler
    except ImportError as exc:
        raise SystemExit("bench: --resume-profile needs pyinstrument: pip install pyinstrument") from exc
    profiler = Profiler(interval=0.005)
    profiler.start()
    return profiler


def profile_write(profiler: Any, path: Path) -> None:
    """The worker's whole life (imports, load, train) as a call tree with wall seconds, as text; the raw session
    beside it (`pyinstrument --load FILE.pyisession --show-all` renders it again, library frames included)."""
    session = profiler.stop()
    path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    session.save(str(path.with_suffix(".pyisession")))


def env_assignments(text: str) -> dict[str, str]:
    """'A=1,B=2' -> {'A': '1', 'B': '2'}, for --resume-env."""
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    if not pairs or any(not name.strip() or not sep for name, sep, _ in pairs):
        raise argparse.ArgumentTypeError(f"expected VAR=VALUE[,VAR=VALUE...], got {text!r}")
    return {name.strip(): value for name, _, value in pairs}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--backend", help="comma list: unsloth,hf (GPU default both; --tiny: hf)")
    p.add_argument("--batch", help="comma list of micro-batch sizes, accumulation 1 (default 2,8)")
    p.add_argument("--batch-hf", help="the hf backend's micro-batch sizes (default: --batch)")
    p.add_argument("--cap-gb", type=float, default=0.0,
                   help="GPU memory cap (GB) for every timed configuration, e.g. 24 to emulate an RTX 4090 (0: none)")
    p.add_argument("--profile-batch", type=int, default=0, help="micro-batch of the profile phase (default: first)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per repeat (default 20)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (default 2)")
    p.add_argument("--repeats", type=int, help="fresh trainers per configuration (default 3)")
    p.add_argument("--image", help="WxH: synthetic image width, pixel budget W*H (default 1024x768)")
    p.add_argument("--out", default="bench.json", help="JSON results (default bench.json)")
    p.add_argument("--logs", help="folder for the per-process logs (default: beside --out)")
    p.add_argument("--tiny", action="store_true", help="the tiny architecture, on CPU: a smoke test of the bench")
    p.add_argument("--data-only", action="store_true", help="only the CPU data pipeline (no model)")
    p.add_argument("--work", default="/tmp/wellocr-bench", help="model, data, runs and compile caches")
    p.add_argument("--model", help="model directory (default: built under --work)")
    p.add_argument("--data", help="data set directory (default: written under --work)")
    p.add_argument("--gen-samples", type=int, help="samples for the generation comparison (default 8)")
    p.add_argument("--gen-tokens", type=int, help="max_new_tokens there (default 64)")
    p.add_argument("--autobatch-gb", type=float, default=24.0, help="memory cap for the auto micro-batch part")
    p.add_argument("--effective-batch", type=int, default=8, help="effective batch for autobatch and generation")
    p.add_argument("--skip", default="",
                   help=f"comma list of phases to leave out ({','.join(PHASES)}); PHASE:BACKEND for one backend")
    p.add_argument("--prequantized", action="store_true",
                   help="Unsloth loads a saved 4-bit copy (as the real run loads Unsloth's pre-quantised checkpoint)")
    p.add_argument("--resumes", type=int, default=1, help="resumes, one after the other, each on an empty pod")
    p.add_argument("--resume-env", type=env_assignments, action="append", default=[], metavar="VAR=VALUE[,...]",
                   help="one more resume after the --resumes ones, with these environment variables (repeatable), "
                        "e.g. TORCH_CACHING_PRECOMPILE=1 twice: the first records, the second loads")
    p.add_argument("--resume-profile", action="store_true",
                   help="one more resume under pyinstrument; its call tree goes to LOGS/BACKEND-resume-profile.txt")
    p.add_argument("--worker", choices=("build", "quantize", "hf", "unsloth"), help=argparse.SUPPRESS)
    p.add_argument("--profile-to", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--launched-at", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--resume-from", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.tiny].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    args.batches = [int(b) for b in args.batch.split(",")]
    args.batches_hf = [int(b) for b in args.batch_hf.split(",")] if args.batch_hf else args.batches
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    width, _, height = args.image.lower().partition("x")
    args.image_size = (int(width), int(height))
    args.arch = "tiny" if args.tiny else "qwen3-vl-2b"
    work = Path(args.work)
    args.model = args.model or str(work / ("tiny-qwen3-vl" if args.tiny else "qwen3-vl-2b-random"))
    args.data = args.data or data_dir(work, args.image_size[0], *data_rows(args))
    args.logs = args.logs or str(Path(args.out).absolute().parent)
    bad = [b for b in args.backends if b not in BACKENDS] + [
        s for s in args.skip if s.partition(":")[0] not in PHASES or s.partition(":")[2] not in ("", *BACKENDS)]
    if bad:
        p.error(f"unknown backend(s) or phase(s): {', '.join(bad)}")
    if min(args.batches) < 1 or min(args.steps, args.warmup, args.repeats) < 1:
        p.error("--batch, --steps, --warmup and --repeats must be >= 1 (step 1, with compilation, is never timed)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.worker == "build":
        build_model(args)
        return 0
    if args.worker == "quantize":
        quantize_model(args)
        return 0
    if args.worker:
        if not args.launched_at:
            args.launched_at = time.time()
        worker = Worker(args)
        profiler = profile_start() if args.profile_to else None
        try:
            worker.run_all()
        except BaseException as exc:  # setup failed (or killed): say so in the result, then fail
            worker.result["errors"]["fatal"] = f"{type(exc).__name__}: {exc}"[:2000]
            raise
        finally:
            worker.result["wall_s"] = time.time() - args.launched_at
            worker.save()
            if profiler is not None:
                profile_write(profiler, Path(args.profile_to))
        return 0
    if args.data_only:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        ensure_data(args)
        result = data_pipeline(args)
        write_json(Path(args.out), {"data_pipeline": result})
        print(json.dumps(result, indent=1))
        return 0
    report = orchestrate(args)
    print_table(report)
    print(f"\nwrote {args.out}; logs in {args.logs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
