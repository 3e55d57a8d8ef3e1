"""`python benchmarks/bench.py` — training speed and memory of both backends on the real Qwen3-VL-2B architecture.

Measures, through the project's own code, what a training run costs on a GPU: step time, samples/s, tokens/s,
MFU, peak memory per micro-batch (optionally capped at a smaller card's memory), checkpoint save, restart after a
preemption, the auto micro-batch, batched generation and the data pipeline. Not part of the installed package: run
it from a checkout with wellocr installed (the gpu extra for Unsloth; pyinstrument for --resume-profile). It
downloads nothing. On a GPU, e.g. both backends as a 24 GB card sees them:

    python benchmarks/bench.py --backend unsloth,hf --batch 2,8,16 --steps 20 --warmup 4 --repeats 3 --cap-gb 24 \\
        --gen-tokens 32 --image 1024x768 --work /tmp/wb --out bench.json

--skip leaves phases out (--skip profile,autobatch; --skip resume:hf for one backend); --peak-tflops sets the rate
MFU is measured against (default: the H200's 790). docs/BENCHMARKS.md has the measured numbers and their commands.

On a CPU: `python benchmarks/bench.py --tiny` (the tiny architecture: a smoke test of the bench itself); the data
pipeline alone: `--data-only`. The whole shipped run under a memory cap, evaluations included, through the real
entry point: `--whole-run` (benchmarks/whole_run.py says what it measures).

What it does, offline: builds a random-weight model of the real Qwen3-VL-2B architecture (`wellocr.tiny`, built
ON the GPU in bf16 in a subprocess, so the init is not the 100 s CPU init) and synthetic 27-field headers at the
--image width (`wellocr.synth`; --image WxH also caps the pixel budget at W*H). Then one worker process per
backend (Unsloth patches transformers/TRL/PEFT at import) loads it with `wellocr.model.load_for_training`
(4-bit like the real run), prepares data with `wellocr.training.prepare_data` and trains with
`wellocr.training.build_trainer` (WellocrSFTTrainer, the project's config: LoRA r16, adamw_8bit, bf16, gradient
checkpointing, `data.dataloader_num_workers` workers). Per micro-batch (accumulation 1), `--repeats` fresh trainers
each run --warmup + --steps optimizer steps. Restarts are then measured on the product's own entry point,
`python -m wellocr.train`, in new processes.

Numbers (JSON at --out: `configs` has one object per backend x batch; `backends` the per-backend parts):
- load_s (model load + LoRA), first_step_s (train() call to the end of step 1: dataloader start, compile),
  step_s (per repeat the median over the timed steps; median, min, max over repeats), samples_per_s, tokens_per_s
  (attention-mask tokens fed to the language model, visual tokens included), visual tokens = patches / 4.
- Model FLOPs per step and MFU / HFU: `wellocr.flops` (its docstring has the formulas), against --peak-tflops.
  Both null on CPU (tflops_per_s is still reported).
- peak allocated / reserved GB per configuration (reset in between; null on CPU).
- checkpoint: a one-step trainer asked to save at its end (the Trainer's own save: adapter + optimizer +
  scheduler + RNG + state), timed from the step's end to the on_save callback; seconds, MB.
- restarts (`first_run`, `resumes`): `python -m wellocr.train --config W/BACKEND/restart.yaml` for one step, then
  --resumes processes of `--resume-latest --set train.max_steps=N+1`, one after the other, each one step further.
  Every process starts on an empty "pod" (fresh HOME and TMPDIR) and finds only the compile caches on the "volume"
  (`run.compile_cache_dir`: the worker's, under --work). Reported from the run's run.json, as wellocr.train records
  every attempt: seconds from process start to the end of its first optimizer step (`to_first_step_s`), split into
  imports, model load, data, auto batch and the rest (`startup`), and torch.compile's cache hits and misses;
  compile_cache_mb is the size of each cache afterwards. --resume-env adds resumes with extra environment
  variables; --resume-profile one under pyinstrument (LOGS/BACKEND-resume-profile.txt, and the .pyisession).
  --prequantized loads a saved 4-bit copy, as the real run loads Unsloth's pre-quantised checkpoint.
- profile (approximate): one warm-up step, then 3 steps under torch.profiler with record_function ranges (entered
  and left after a device sync, which itself costs time) around the forward of the vision tower and of the
  language model (module hooks), compute_loss, training_step (forward + backward), the optimizer step
  (on_pre_optimizer_step → on_optimizer_step) and the data fetch (Trainer.get_batch_samples); loss_and_rest is the
  rest of compute_loss (embeddings, lm_head, cross-entropy), backward the rest of training_step (recompute
  included), other the rest of the step; vision_est / language_est scale the two forwards by the step's
  (forward + backward) / forward ratio. The trace goes to LOGS/BACKEND-profile-trace.json (Perfetto, chrome://tracing).
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
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wellocr.flops import H200_BF16_FLOPS, arch_dims, param_groups, step_flops, utilization

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


# ---------------------------------------------------------------- statistics (pure)


def summary(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------- instrumentation of the project's trainer


class Recorder:
    """Per optimizer step: seconds (step end to step end, after a device sync), data wait, the shapes fed.

    With `phases`, it also opens torch.profiler ranges (record_function) around the parts of a step, each entered
    and left after a device sync so that its span on the profiler's timeline covers its GPU work: the profile
    phase reads the split from the profiler's events (`phase_split`), not from timers of its own."""

    def __init__(self, device: str, phases: bool = False):
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else _no_sync
        self.phases = phases
        self.steps: list[dict] = []
        self.current = self._new()
        self.last = 0.0
        self.open: dict[str, Any] = {}

    @staticmethod
    def _new() -> dict:
        return {"lm_lengths": [], "image_patches": [], "samples": 0, "data_wait": 0.0}

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
        """Open the profiler range PHASE_PREFIX + part (with `phases` only)."""
        if self.phases and part not in self.open:
            from torch.profiler import record_function

            self.sync()
            self.open[part] = record_function(PHASE_PREFIX + part)
            self.open[part].__enter__()

    def end(self, part: str) -> None:
        if part in self.open:
            self.sync()
            self.open.pop(part).__exit__(None, None, None)

    @contextlib.contextmanager
    def phase(self, part: str) -> Iterator[None]:
        self.begin(part)
        try:
            yield
        finally:
            self.end(part)

    def step_end(self) -> None:
        self.sync()
        if "loss" in self.current:
            self.current["loss"] = float(self.current["loss"])
        now = time.perf_counter()
        self.current.update(seconds=now - self.last, wall_end=time.time())
        self.last = now
        self.steps.append(self.current)
        self.current = self._new()


def _no_sync() -> None:
    pass


PHASE_PREFIX = "bench/"
PROFILE_PARTS = ("vision_fwd", "language_fwd", "forward", "fwd_bwd", "optimizer", "data_wait")


def phase_split(events: Any, steps: int) -> dict[str, float]:
    """Seconds per step of each bench range in a torch.profiler trace (mean over `steps`): the CPU span of each
    `record_function` range, which covers its GPU work because the Recorder syncs at both ends."""
    totals = dict.fromkeys(PROFILE_PARTS, 0.0)
    for event in events:
        if event.name.startswith(PHASE_PREFIX) and event.name[len(PHASE_PREFIX):] in totals:
            totals[event.name[len(PHASE_PREFIX):]] += event.cpu_time_total / 1e6  # 0 for the GPU-side copies
    return {part: seconds / steps for part, seconds in totals.items()}


class Instrumented:
    """The trainer instance's own training_step, compute_loss and get_batch_samples, wrapped to feed a Recorder;
    with rec.phases, forward hooks on the vision tower and the language model open and close their ranges."""

    def __init__(self, trainer: Any, rec: Recorder):
        self.rec = rec
        self.step, self.loss, self.fetch = trainer.training_step, trainer.compute_loss, trainer.get_batch_samples
        trainer.training_step, trainer.compute_loss = self.training_step, self.compute_loss
        trainer.get_batch_samples = self.get_batch_samples
        self.handles = []
        if rec.phases:
            modules = dict(trainer.model.named_modules())
            for part, suffix in (("vision_fwd", "visual"), ("language_fwd", "language_model")):
                module = modules[min((n for n in modules if n.endswith(suffix)), key=len)]
                self.handles.append(module.register_forward_pre_hook(functools.partial(self._enter, part)))
                self.handles.append(module.register_forward_hook(functools.partial(self._exit, part)))

    def _enter(self, part: str, *_: Any) -> None:
        self.rec.begin(part)

    def _exit(self, part: str, *_: Any) -> None:
        self.rec.end(part)

    def training_step(self, model, inputs, *args, **kwargs):
        self.rec.batch(inputs)
        with self.rec.phase("fwd_bwd"):
            out = self.step(model, inputs, *args, **kwargs)
        self.rec.current["loss"] = out.detach() + self.rec.current.get("loss", 0.0)  # a tensor: read at step_end
        return out

    def compute_loss(self, *args, **kwargs):
        with self.rec.phase("forward"):
            return self.loss(*args, **kwargs)

    def get_batch_samples(self, *args, **kwargs):
        started = time.perf_counter()
        with self.rec.phase("data_wait"):
            out = self.fetch(*args, **kwargs)
        self.rec.current["data_wait"] += time.perf_counter() - started
        self.rec.current["fetches"] = self.rec.current.get("fetches", 0) + 1
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def timing_callback(rec: Recorder, profiler: Any = None) -> Any:
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            rec.begin("optimizer")

        def on_optimizer_step(self, args, state, control, **kwargs):
            rec.end("optimizer")

        def on_step_end(self, args, state, control, **kwargs):
            rec.step_end()
            if profiler is not None:
                profiler.step()
            control.should_evaluate = control.should_save = False  # neither belongs in a timed run
            return control

    return Timing()


def save_timer(sync: Any, out: dict) -> Any:
    """A callback that asks the Trainer to save at the end of each step and times it, as save_steps would: from
    the step's end to on_save (the Trainer's own path: adapter, optimizer, scheduler, RNG, state)."""
    from transformers import TrainerCallback

    class SaveTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            out["started"] = time.perf_counter()
            control.should_save, control.should_evaluate = True, False
            return control

        def on_save(self, args, state, control, **kwargs):
            out.update(seconds=time.perf_counter() - out.pop("started"), step=state.global_step,
                       path=str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))

    return SaveTimer()


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
        import torch

        from wellocr.model import Backend, import_backend

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(1)  # on shared CPU cores 2 OpenMP threads can be 50x slower than 1
        self.backend = Backend(self.args.worker, device, "benchmarks/bench.py")
        import_backend(self.backend)  # Unsloth before transformers/TRL/PEFT
        import peft  # noqa: F401 - imported here so import_s counts them
        import trl  # noqa: F401

        from wellocr.model import load_for_training, resolve_precision
        from wellocr.rundir import RunDir
        from wellocr.training import prepare_data

        self.result["import_s"] = time.time() - self.args.launched_at
        self.cfg = bench_config(self.args, self.args.worker)
        self.precision = resolve_precision(self.cfg.train.precision, device)
        self.run = RunDir(Path(self.args.work) / f"{self.args.worker}-run")
        started = time.perf_counter()
        self.model, self.processor = load_for_training(self.cfg, self.backend, self.precision)
        self.result["load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        self.data = prepare_data(self.cfg, self.processor, self.run)
        self.max_length = self.data.max_length
        self.result.update(data_s=time.perf_counter() - started, max_length=self.max_length, device=device,
                           precision=self.precision, params=param_groups(self.model))
        self.dims = arch_dims(self.model)
        if self.args.cap_gb:  # every timed configuration under the target GPU's memory, for the worker's life
            from wellocr.autobatch import memory_cap

            self.cap = contextlib.ExitStack()
            self.result["cap_gb"] = self.args.cap_gb if self.cap.enter_context(memory_cap(self.args.cap_gb)) else None
        self.recompute = self.cfg.model.use_gradient_checkpointing != "false"
        self.save()

    def trainer(self, micro: int, accumulation: int, steps: int, callbacks: list) -> Any:
        """A trainer from the project's build_trainer for `steps` optimizer steps."""
        from wellocr.training import build_trainer

        t = self.cfg.train
        t.max_steps = t.eval_steps = t.save_steps = steps
        return build_trainer(self.cfg, self.run, self.backend, self.precision, self.model, self.processor,
                             self.data, micro, accumulation, callbacks)

    def train(self, micro: int, accumulation: int, steps: int, profiler: Any = None) -> Recorder:
        """A fresh, instrumented trainer for `steps` optimizer steps; rec.steps[0]["seconds"] runs from the
        train() call. With a profiler: its ranges are opened and profiler.step() is called at every step end."""
        rec = Recorder(self.backend.device, phases=profiler is not None)
        trainer = self.trainer(micro, accumulation, steps, [timing_callback(rec, profiler)])
        instrumented = Instrumented(trainer, rec)
        rec.start()
        try:
            trainer.train()
        finally:
            instrumented.remove()
        return rec

    def step_stats(self, steps: list[dict]) -> dict[str, Any]:
        """Throughput over timed steps: medians per step, sums for rates."""
        seconds = sum(s["seconds"] for s in steps)
        flops = [step_flops(s["lm_lengths"], s["image_patches"], self.result["params"], self.dims, self.recompute)
                 for s in steps]
        cuda = self.backend.device == "cuda"
        peak = self.args.peak_tflops * 1e12
        return {
            "step_s": statistics.median(s["seconds"] for s in steps),
            "samples_per_s": sum(s["samples"] for s in steps) / seconds,
            "tokens_per_s": sum(sum(s["lm_lengths"]) for s in steps) / seconds,
            "tflops_per_s": sum(f[0] for f in flops) / seconds / 1e12,
            "mfu": utilization(sum(f[0] for f in flops), seconds, peak) if cuda else None,
            "hfu": utilization(sum(f[1] for f in flops), seconds, peak) if cuda else None,
            "data_wait_s": statistics.median(s["data_wait"] for s in steps)
            if all(s.get("fetches") for s in steps) else None,  # None: the loop never called get_batch_samples
            "lm_tokens_per_step": statistics.median(sum(s["lm_lengths"]) for s in steps),
            "patches_per_step": statistics.median(sum(s["image_patches"]) for s in steps),
            "model_tflop_per_step": statistics.median(f[0] for f in flops) / 1e12,
        }

    # -- phases

    def measure(self, micro: int, accumulation: int = 1) -> dict[str, Any]:
        import torch

        from wellocr.autobatch import free_memory

        steps, warmup = self.args.steps, self.args.warmup
        cuda = self.backend.device == "cuda"
        if cuda:
            free_memory()
            torch.cuda.reset_peak_memory_stats()
        out: dict[str, Any] = {"batch": micro * accumulation, "micro_batch": micro,
                               "gradient_accumulation_steps": accumulation, "repeats": []}
        for r in range(self.args.repeats):
            started = time.perf_counter()
            rec = self.train(micro, accumulation, warmup + steps)
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

    def checkpoint(self, micro: int) -> None:
        """A one-step trainer that saves at its end through the Trainer's own path: seconds and size."""
        saved: dict[str, Any] = {}
        trainer = self.trainer(micro, 1, 1, [save_timer(Recorder(self.backend.device).sync, saved)])
        trainer.train()
        self.result["checkpoint"] = {**saved, "mb": _tree_mb(saved.get("path")), "micro_batch": micro}

    def profile(self, micro: int, steps: int = 3) -> None:
        """One step to warm up, then `steps` under torch.profiler; the split comes from its record_function
        ranges, and the whole trace goes to LOGS/BACKEND-profile-trace.json (chrome://tracing, Perfetto)."""
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.backend.device == "cuda" else [])
        trace = Path(self.args.logs) / f"{self.args.worker}-profile-trace.json"
        split: dict[str, float] = {}

        def ready(prof: Any) -> None:
            split.update(phase_split(prof.events(), steps))
            prof.export_chrome_trace(str(trace))

        with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps),
                     on_trace_ready=ready) as prof:
            rec = self.train(micro, 1, 1 + steps, profiler=prof)
        total = statistics.fmean(s["seconds"] for s in rec.steps[1:])  # the profiled steps, as the split
        ratio = split["fwd_bwd"] / split["forward"] if split["forward"] else 0.0
        self.result["profile"] = {
            "micro_batch": micro, "steps": steps, "step_s": total, "vision_fwd_s": split["vision_fwd"],
            "language_fwd_s": split["language_fwd"],
            "loss_and_rest_fwd_s": split["forward"] - split["vision_fwd"] - split["language_fwd"],
            "backward_s": split["fwd_bwd"] - split["forward"], "optimizer_s": split["optimizer"],
            "data_wait_s": split["data_wait"],
            "other_s": total - split["fwd_bwd"] - split["optimizer"] - split["data_wait"],
            "vision_est_s": split["vision_fwd"] * ratio, "language_est_s": split["language_fwd"] * ratio,
            "trace": str(trace),
            "note": "approximate: torch.profiler ranges with a device sync at each end, mean over the profiled "
                    "steps; *_est scale forward by (forward+backward)/forward",
        }
    def autobatch(self) -> None:
        import torch

        from wellocr.autobatch import choose_micro_batch, memory_cap, training_probe
        from wellocr.training import probe_trainer_factory

        effective, budget = self.args.effective_batch, self.args.autobatch_gb
        probe_trainer = probe_trainer_factory(self.cfg, self.run, self.backend, self.precision, self.model,
                                              self.processor, self.data)
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
        from wellocr.inference import fixed_eval_rows, generate_with_counts, row_inputs

        rows = fixed_eval_rows(self.data.splits["eval"], self.args.gen_samples)
        images, instructions, _ = row_inputs(rows, self.cfg)
        tokens = self.cfg.eval.max_new_tokens
        sync = Recorder(self.backend.device).sync
        out = {"samples": len(rows), "max_new_tokens": tokens}
        for label, size in (("loop", 1), ("batched", GEN_BATCH)):
            # one untimed call per batch size first: Unsloth compiles its prefill per batch size (tens of seconds)
            sync()
            started = time.perf_counter()
            generate_with_counts(self.model, self.processor, images[:size], instructions[:size], tokens,
                                 backend=self.backend)
            sync()
            out[f"{label}_first_call_s"] = time.perf_counter() - started
            sync()
            started, new = time.perf_counter(), 0
            for i in range(0, len(rows), size):
                new += sum(generate_with_counts(self.model, self.processor, images[i:i + size],
                                                instructions[i:i + size], tokens, backend=self.backend)[1])
            sync()
            seconds = time.perf_counter() - started
            out[label] = {"batch_size": size, "seconds": seconds, "samples_per_s": len(rows) / seconds,
                          "new_tokens": new}
        out["speedup"] = out["batched"]["samples_per_s"] / out["loop"]["samples_per_s"]
        self.result["generation"] = out

    def run_all(self) -> None:
        self.setup()
        for micro in self.args.batches if self.args.worker != "hf" else self.args.batches_hf:
            self.attempt(f"train batch {micro}", self.train_config, micro)
        self.attempt("checkpoint", self.checkpoint, self.args.batches_hf[0] if self.args.worker == "hf"
                     else self.args.batches[0])
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
    """HOME and TMPDIR of a new, empty pod: the process finds only the caches on the volume (--work), not what
    earlier processes left in /tmp (inductor's default) or ~/.cache (Unsloth's mega-cache default)."""
    pod = work / backend / f"pod-{name}"
    shutil.rmtree(pod, ignore_errors=True)
    (pod / "home").mkdir(parents=True)
    (pod / "tmp").mkdir()
    return {"HOME": str(pod / "home"), "TMPDIR": str(pod / "tmp")}


def data_pipeline(args: argparse.Namespace, samples: int = 16) -> dict[str, Any]:
    """CPU cost of one batch: row fetch (parquet + base64 + decode + resize), then TRL's collator with the 2B
    processor (chat template, tokenizer, image normalisation and patches). One process = one DataLoader worker."""
    from wellocr.data import load_splits, trainer_dataset
    from wellocr.inference import loss_collator
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

    from wellocr.synthetic import split_path

    if not (data / "README.md").is_file():
        return {}
    return {split: pq.ParquetFile(split_path(data, split)).metadata.num_rows for split in ("train", "eval")}


def large_enough(data: Path, train: int, eval: int) -> bool:
    rows = split_rows(data)
    return bool(rows) and rows["train"] >= train and rows["eval"] >= eval


def data_dir(work: Path, width: int, train: int, eval: int) -> str:
    """The smallest finished synthetic set under work with enough rows, else a new one's name.

    Row i is the same in every set (one seed, drawn per row), so a larger set serves a smaller run; writing
    2,000 headers again would cost two minutes of a GPU's time.
    """
    sizes = sorted(int(n) for p in work.glob(f"headers-{width}-*") if (n := p.name.rsplit("-", 1)[1]).isdigit())
    fits = (n for n in sizes if large_enough(work / f"headers-{width}-{n}", train, eval))
    return str(work / f"headers-{width}-{next(fits, train)}")


def ensure_data(args: argparse.Namespace) -> None:
    from wellocr.synthetic import write_dataset

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
           "--profile-batch", str(args.profile_batch or 0), "--logs", str(args.logs),
           "--peak-tflops", repr(args.peak_tflops)]
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
                                       "peak_flops": args.peak_tflops * 1e12, "started": started},
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
    """One backend's worker process (the timed phases), then its restarts through `python -m wellocr.train`."""
    work, logs = Path(args.work), Path(args.logs)
    result_file = work / f"{backend}-result.json"
    result_file.unlink(missing_ok=True)
    model = model_4bit if backend == "unsloth" else []
    code = spawn(args, ["--worker", backend, "--result", str(result_file), *model], logs / f"{backend}.log",
                 {**worker_env(work, backend), **fresh_pod(work, backend, "train")})
    result = json.loads(result_file.read_text()) if result_file.is_file() else {"errors": {}}
    result["exit_code"] = code
    if {"resume", f"resume:{backend}"} & args.skip:
        result.setdefault("skipped", []).append("resume (--skip)")
    else:
        result.update(restarts(args, backend, model[1] if model else args.model))
    return result


RESTART_RUN = "restart"


def restart_config(args: argparse.Namespace, backend: str, model: str) -> Path:
    """The config of the run the restarts continue: the bench's config, one optimizer step per process at the
    first micro-batch size, a checkpoint at every step, the compile caches where the worker left them."""
    from wellocr.config import save_config, validate

    root = Path(args.work) / backend
    cfg = bench_config(args, backend)
    cfg.model.model_name = model
    t = cfg.train
    t.per_device_train_batch_size = (args.batches_hf if backend == "hf" else args.batches)[0]
    t.gradient_accumulation_steps = 1
    t.max_steps = t.eval_steps = t.save_steps = 1
    cfg.data.eval_subset = 1  # the end-of-run evaluation of every process is not what is measured here
    cfg.eval.generation_samples = 0
    cfg.run.output_dir, cfg.run.run_name = str(root / "restart-runs"), RESTART_RUN
    cfg.run.compile_cache_dir = str(root / "compile-cache")
    validate(cfg, {}, "benchmarks/bench.py")
    shutil.rmtree(cfg.run.output_dir, ignore_errors=True)  # a new run: wellocr.train refuses to reuse a name
    path = root / "restart.yaml"
    save_config(cfg, path)
    return path


def restarts(args: argparse.Namespace, backend: str, model: str) -> dict[str, Any]:
    """A one-step run of `python -m wellocr.train`, then `--resume-latest` processes, each one step further and
    each on an empty pod; what every process took from its start to its first optimizer step, as wellocr.train
    records it in run.json (`startup`, with torch.compile's cache hits and misses)."""
    config = restart_config(args, backend, model)
    first = train_process(args, backend, "restart-first", ["--config", str(config)])
    out: dict[str, Any] = {"restart_config": str(config), "first_run": first, "resumes": []}
    if "error" in first:
        return out
    runs = []  # (process name, extra environment); one after the other: a later one finds what earlier compiled
    runs += [(f"resume{n or ''}", {}) for n in range(args.resumes)]
    runs += [(f"resume-env{n + 1}", variables) for n, variables in enumerate(args.resume_env)]
    if args.resume_profile:
        runs.append(("resume-profiled", {}))
    step = first["first_step"]
    for name, variables in runs:
        resumed = train_process(args, backend, name, ["--config", str(config), "--resume-latest", "--set",
                                                      f"train.max_steps={step + 1}"], variables,
                                profile=name == "resume-profiled")
        if name == "resume-profiled":
            out["resume_profiled"] = resumed
        else:
            out["resumes"].append({"env": variables, **resumed} if variables else resumed)
        if "error" in resumed:
            break
        step = resumed["first_step"]
    if out["resumes"]:
        out["resume"] = out["resumes"][0]
    return out


def train_process(args: argparse.Namespace, backend: str, name: str, train_args: list[str],
                  variables: dict[str, str] | None = None, profile: bool = False) -> dict[str, Any]:
    """`python -m wellocr.train TRAIN_ARGS` on a new, empty pod (with --resume-profile's one under pyinstrument);
    its attempt from run.json: start step, first step, seconds from process start to the end of the first step."""
    work, logs = Path(args.work), Path(args.logs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **fresh_pod(work, backend, name), **(variables or {})}
    command = [sys.executable, "-m", "wellocr.train", *train_args]
    session = logs / f"{backend}-resume-profile.pyisession"
    if profile:
        command = [sys.executable, "-m", "pyinstrument", "--interval", "0.005", "-r", "pyisession", "-o", str(session),
                   "-m", "wellocr.train", *train_args]
    with open(logs / f"{backend}-{name}.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    run_json = work / backend / "restart-runs" / RESTART_RUN / "run.json"
    attempts = json.loads(run_json.read_text()).get("attempts", []) if run_json.is_file() else []
    attempt = attempts[-1] if attempts else {}
    if code != 0 or "first_step_s" not in attempt:
        return {"process": name, "exit_code": code, "error": f"exit {code}, see {logs / f'{backend}-{name}.log'}"}
    out = {"process": name, "exit_code": code, "attempt": attempt.get("attempt"),
           "resumed_at_step": attempt.get("start_step"), "first_step": attempt["first_step"],
           "to_first_step_s": attempt["first_step_s"], "startup": attempt.get("startup", {}),
           "compile_cache": attempt.get("compile_cache", {}),
           "compile_cache_mb": compile_cache_mb(work / backend / "compile-cache", variables or {})}
    if profile:
        out["profile"] = str(render_profile(session))
    return out


def compile_cache_mb(root: Path, variables: dict[str, str]) -> dict[str, float | None]:
    """Size of each compile cache wellocr.train uses under `root` (or where the environment points it)."""
    from wellocr.model import COMPILE_CACHE_ENV, compile_cache_env

    dirs = {**compile_cache_env(root), **{k: v for k, v in os.environ.items() if k in COMPILE_CACHE_ENV}, **variables}
    return {variable: _tree_mb(dirs.get(variable)) for variable in (*COMPILE_CACHE_ENV, "PYTHONPYCACHEPREFIX")}


def render_profile(session: Path) -> Path:
    """pyinstrument's saved session as a text call tree beside it (`pyinstrument --load FILE --show-all` renders
    it again, library frames included)."""
    from pyinstrument.renderers import ConsoleRenderer
    from pyinstrument.session import Session

    text = session.with_suffix(".txt")
    text.write_text(ConsoleRenderer(unicode=False, color=False).render(Session.load(str(session))))
    return text


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


def _restart_line(r: dict) -> str:
    split = ", ".join(f"{name[:-2].replace('_', ' ')} {seconds:.1f}" for name, seconds in r["startup"].items())
    cache = r.get("compile_cache") or {}
    cached = (f"; compile cache hits/misses: graphs {cache['fx_graph_hits']}/{cache['fx_graph_misses']}, autograd "
              f"{cache['autograd_hits']}/{cache['autograd_misses']}") if cache else ""
    return f"{r['to_first_step_s']:.1f} s to the end of step {r['first_step']} ({split}){cached}"


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
            print(f"  checkpoint (the Trainer's save at step {ck['step']}, micro-batch {ck['micro_batch']}): "
                  f"{ck['seconds']:.2f} s, {ck['mb']:.1f} MB")
        restarted = [("first run", b.get("first_run") or {})]
        restarted += [(f"resume {n + 1}" + (f" with {r['env']}" if r.get("env") else ""), r)
                      for n, r in enumerate(b.get("resumes") or [])]
        restarted.append(("resume under pyinstrument", b.get("resume_profiled") or {}))
        for label, r in restarted:
            if "to_first_step_s" in r:
                print(f"  {label} (python -m wellocr.train, new process, empty pod): {_restart_line(r)}")
            elif r:
                print(f"  {label}: {r}")
        if b.get("profile"):
            p = b["profile"]
            parts = ("vision_fwd_s", "language_fwd_s", "loss_and_rest_fwd_s", "backward_s", "optimizer_s",
                     "data_wait_s", "other_s")
            print(f"  profile (batch {p['micro_batch']}, {p['step_s']:.3f} s, approximate): "
                  + ", ".join(f"{k[:-2]} {p[k]:.3f}" for k in parts) + f"; trace {p['trace']}")
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
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_FLOPS / 1e12,
                   help="the GPU's peak bf16 TFLOP/s that MFU and HFU divide by (default 790: an H200, measured)")
    p.add_argument("--resumes", type=int, default=1,
                   help="python -m wellocr.train --resume-latest processes, one after the other, each on an empty pod")
    p.add_argument("--resume-env", type=env_assignments, action="append", default=[], metavar="VAR=VALUE[,...]",
                   help="one more resume after the --resumes ones, with these environment variables (repeatable), "
                        "e.g. TORCH_CACHING_PRECOMPILE=1 twice: the first records, the second loads")
    p.add_argument("--resume-profile", action="store_true",
                   help="one more resume under pyinstrument; its call tree goes to LOGS/BACKEND-resume-profile.txt")
    p.add_argument("--whole-run", action="store_true",
                   help="the shipped config end to end through python -m wellocr.train under --cap-gb, with its "
                        "evaluations, then one restart (benchmarks/whole_run.py)")
    p.add_argument("--whole-steps", type=int, help="--whole-run: optimizer steps (default 12; --tiny 3)")
    p.add_argument("--eval-every", type=int, help="--whole-run: evaluation and save interval (default 6; --tiny 2)")
    p.add_argument("--project-steps", type=int, default=500, help="--whole-run: steps of the projected run")
    p.add_argument("--processes", type=int, default=1, help="--whole-run: data-parallel ranks (train.processes)")
    p.add_argument("--micro", type=int, default=0, help="--whole-run: a fixed micro-batch per rank instead of auto")
    p.add_argument("--accumulation", type=int, default=0,
                   help="--whole-run with --micro: accumulation overall (default: --processes)")
    p.add_argument("--project-every", type=int, default=50, help="--whole-run: its evaluation interval")
    p.add_argument("--no-restart", action="store_true", help="--whole-run: the run only, no restart after it")
    p.add_argument("--whole-set", action="append", default=[], metavar="KEY=VALUE",
                   help="--whole-run: one more config override of the run (repeatable)")
    p.add_argument("--worker", choices=("build", "quantize", "hf", "unsloth"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--launched-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data_given = args.data is not None
    args.whole_steps = args.whole_steps or (3 if args.tiny else 12)
    args.eval_every = args.eval_every or (2 if args.tiny else 6)
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
    work = Path(args.work).absolute()  # absolute: the config of the wellocr.train runs names these paths
    args.work = str(work)
    args.model = str(Path(args.model).absolute()) if args.model else str(
        work / ("tiny-qwen3-vl" if args.tiny else "qwen3-vl-2b-random"))
    args.data = str(Path(args.data).absolute()) if args.data else data_dir(work, args.image_size[0], *data_rows(args))
    args.logs = str(Path(args.logs).absolute()) if args.logs else str(Path(args.out).absolute().parent)
    bad = [b for b in args.backends if b not in BACKENDS] + [
        s for s in args.skip if s.partition(":")[0] not in PHASES or s.partition(":")[2] not in ("", *BACKENDS)]
    if bad:
        p.error(f"unknown backend(s) or phase(s): {', '.join(bad)}")
    if min(args.batches) < 1 or min(args.steps, args.warmup, args.repeats) < 1:
        p.error("--batch, --steps, --warmup and --repeats must be >= 1 (step 1, with compilation, is never timed)")
    if args.peak_tflops <= 0:
        p.error("--peak-tflops must be > 0")
    if args.whole_run and args.eval_every > args.whole_steps:  # the config refuses it, after model and data are built
        p.error(f"--eval-every {args.eval_every} exceeds --whole-steps {args.whole_steps}: the run evaluates and saves "
                "every --eval-every steps; use at most --whole-steps")
    if any("=" not in item for item in args.whole_set):
        p.error(f"--whole-set expects KEY=VALUE, got {', '.join(i for i in args.whole_set if '=' not in i)}")
    if args.resume_profile and not args.worker and importlib.util.find_spec("pyinstrument") is None:
        p.error("--resume-profile needs pyinstrument: pip install pyinstrument")
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
        try:
            worker.run_all()
        except BaseException as exc:  # setup failed (or killed): say so in the result, then fail
            worker.result["errors"]["fatal"] = f"{type(exc).__name__}: {exc}"[:2000]
            raise
        finally:
            worker.result["wall_s"] = time.time() - args.launched_at
            worker.save()
        return 0
    if args.whole_run:
        sys.path.insert(0, str(SCRIPT.parent))
        import whole_run

        report = whole_run.run(args)
        print(f"\nwrote {args.out}; logs in {args.logs}", flush=True)
        return 0 if all("error" not in m for m in report["backends"].values()) else 1
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
