"""`python benchmarks/generation_profile.py BACKEND MODEL_DIR DATA_DIR` — where in-training generation time goes.

The evaluation's generation pass decodes 8 fixed eval rows in one batch with the model as training left it
(`wellocr.inference.generate_with_counts`, the code the run uses). This loads the model as training does, then:
- times generations of 1, 1, 33 and 129 new tokens (the first call compiles; decode cost per token = the
  difference of the last two over 96 tokens), and says whether each decode step reused the cache (the language
  model's input length and cache type per call);
- profiles a 17-token generation with torch.profiler (CPU and CUDA time per operator): host-bound decoding shows
  as CPU time far above CUDA time.

    python benchmarks/generation_profile.py unsloth /tmp/wb/qwen3-vl-2b-random /tmp/wb/whole-headers-1024

On CPU with the tiny model it runs in seconds (the timings then say nothing about a GPU).

`--compile-decode` (GPU) measures instead what `eval.compile_decode` gives (`wellocr.inference.compiled_decode`: the
decode step replayed as a CUDA graph on a static cache): three generations of 129 tokens after an eager one,
seconds each (the first compiled ones compile) and whether the tokens equal the eager generation's.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def compiled_timings(model, processor, backend, backend_name, images, instructions, sync) -> dict:
    from wellocr import inference

    def timed(n: int, compile_decode: bool) -> tuple[float, list[str]]:
        sync()
        started = time.perf_counter()
        texts = inference.generate_with_counts(model, processor, images, instructions, n, backend=backend,
                                               compile_decode=compile_decode)[0]
        sync()
        return round(time.perf_counter() - started, 3), texts

    eager_s, eager = timed(129, False)
    out = {"backend": backend_name, "eager_129_s": eager_s, "compiled_129_s": [], "same_tokens": []}
    for _ in range(3):
        seconds, texts = timed(129, True)
        out["compiled_129_s"].append(seconds)
        out["same_tokens"].append(texts == eager)
        print(f"{backend_name}: compiled decode, 129 new tokens in {seconds} s (eager {eager_s} s); same text as "
              f"eager: {texts == eager}", flush=True)
    return out


def main(argv: list[str]) -> int:
    compile_decode = "--compile-decode" in argv
    backend_name, model_dir, data_dir = [a for a in argv if a != "--compile-decode"]
    from wellocr import inference
    from wellocr.config import load_config
    from wellocr.data import load_splits
    from wellocr.model import import_backend, load_for_training, select_backend

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = load_config("configs/train_r16.yaml", [f"model.model_name={model_dir}", f"model.backend={backend_name}",
                                                 f"data.dataset_name={data_dir}", "data.max_pixels=786432"])
    backend = select_backend(cfg.model)
    import_backend(backend)
    model, processor = load_for_training(cfg, backend, "bf16" if cuda else "fp32")
    rows = inference.fixed_eval_rows(load_splits(cfg.data)["eval"], cfg.eval.generation_samples)
    images, instructions, _ = inference.row_inputs(rows, cfg)
    language_model = next(m for name, m in model.named_modules() if name.endswith("language_model"))
    calls: list[tuple] = []

    def record(_module, _args, kwargs):
        tokens = kwargs.get("inputs_embeds")
        tokens = kwargs.get("input_ids") if tokens is None else tokens
        calls.append((tuple(tokens.shape), kwargs.get("use_cache"), type(kwargs.get("past_key_values")).__name__))

    model.train()  # as the evaluation callback finds it
    if compile_decode:  # no hook: a compiled step would trace it (and recompile at every call)
        inference.generate_with_counts(model, processor, images, instructions, 1, backend=backend)  # compiles prefill
        print(json.dumps(compiled_timings(model, processor, backend, backend_name, images, instructions, sync)),
              flush=True)
        return 0
    language_model.register_forward_pre_hook(record, with_kwargs=True)
    seconds = {}
    for n in (1, 1, 33, 129):
        calls.clear()
        sync()
        started = time.perf_counter()
        inference.generate_with_counts(model, processor, images, instructions, n, backend=backend)
        sync()
        seconds[n] = round(time.perf_counter() - started, 3)
        print(f"{backend_name}: {n} new tokens in {seconds[n]} s, {len(calls)} forward calls, first {calls[:3]}",
              flush=True)
    print(json.dumps({"backend": backend_name, "rows": len(rows), "seconds": seconds,
                      "decode_ms_per_token": round((seconds[129] - seconds[33]) / 96 * 1000, 1)}), flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        inference.generate_with_counts(model, processor, images, instructions, 17, backend=backend)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
    if cuda:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
