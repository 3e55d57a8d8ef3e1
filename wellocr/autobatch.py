"""`train.per_device_train_batch_size: auto` — the largest micro-batch that fits, at a fixed effective batch.

The effective batch (samples per optimizer step, `train.effective_batch_size`, default 8 = 2 x 4) is what the
training trajectory depends on, so it never changes: the micro-batch is the largest divisor of it that fits the
memory budget, and gradient accumulation makes up the rest (8 → 8x1, 4x2, 2x4 or 1x8).

Fitting is measured, not estimated: one real training step (trainer.train(), optimizer included) on a worst-case
batch (the longest sample of the data set, by tokens, then by image area, repeated micro times: every row as long
as the longest, so no later batch of any image size can need more) at each candidate, largest first, catching CUDA
out-of-memory; the trainable weights are put back afterwards, so training starts from the same adapter.

- budget: explicit GB (e.g. the 24 of a 4090 while probing on a bigger GPU), enforced with
  `torch.cuda.set_per_process_memory_fraction`; by default what the process may use (the GPU's memory, or the
  `WELLOCR_GPU_MEMORY_GB` cap) minus `HEADROOM` (10%), which evaluation and fragmentation need beside training.
- CPU: `auto` means 2 (no probing), or the largest divisor of the effective batch below 2.

Imports no transformers at module level (Unsloth must be imported before transformers in a training process).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

log = logging.getLogger("wellocr")

GIB = 2**30
HEADROOM = 0.10  # fraction of the GPU kept free when no budget is given (fragmentation, optimizer state)
CPU_MICRO_BATCH = 2
CAP_ENV = "WELLOCR_GPU_MEMORY_GB"


class AutoBatchError(RuntimeError):
    """Not even micro-batch 1 fits the budget."""


def micro_batch_candidates(effective_batch: int) -> list[int]:
    """Divisors of the effective batch, largest first: the micro-batches that keep it exact."""
    if effective_batch < 1:
        raise ValueError(f"effective batch must be >= 1, got {effective_batch}")
    return [d for d in range(effective_batch, 0, -1) if effective_batch % d == 0]


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is a CUDA out-of-memory error: torch's OutOfMemoryError, or a RuntimeError saying so (as
    bitsandbytes and some kernels raise it). The one rule of the package: the micro-batch probe and the training
    loop's OOM adaptation both use it."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory() -> None:
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def memory_cap(budget_gb: float | None, device: int = 0) -> Iterator[float | None]:
    """Limit this process's CUDA allocations to budget_gb for the block (no-op without CUDA or budget).

    Yields the fraction set. The previous fraction is restored afterwards (1.0 where torch cannot report it).
    """
    if budget_gb is None or not torch.cuda.is_available():
        yield None
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget_gb * GIB / total)
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = getter(device) if getter is not None else 1.0
    free_memory()
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield fraction
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)


def process_memory_gb(device: int = 0) -> float:
    """What this process may use of the GPU, GiB: its per-process fraction of it (a WELLOCR_GPU_MEMORY_GB cap)."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = getter(device) if getter is not None else 1.0
    return torch.cuda.get_device_properties(device).total_memory * fraction / GIB


def default_budget_gb(device: int = 0) -> float:
    """What this process may use of the GPU minus HEADROOM, in GiB."""
    return process_memory_gb(device) * (1 - HEADROOM)


def batch_device_key(device: str) -> str:
    """What the auto batch choice depends on, as run.json records it: the GPU's name and the memory this process
    may use ("NVIDIA L4, 22.0 GiB"); "cpu" on CPU."""
    if device != "cuda":
        return device
    index = torch.cuda.current_device()
    return f"{torch.cuda.get_device_properties(index).name}, {process_memory_gb(index):.1f} GiB"


def cap_process_memory(environ: dict | None = None) -> float | None:
    """`WELLOCR_GPU_MEMORY_GB=N`: this process uses at most N GiB of the GPU, for its whole life (torch's
    per-process memory fraction) — a 24 GB card's budget on a larger GPU, or a GPU shared with another process.
    Returns the cap set (None: not asked for, or no GPU). Call before the first CUDA allocation."""
    from wellocr.errors import UserError

    raw = (os.environ if environ is None else environ).get(CAP_ENV, "").strip()
    if not raw:
        return None
    try:
        cap = float(raw)
    except ValueError:
        cap = 0.0
    if not cap > 0:
        raise UserError(f"{CAP_ENV}={raw!r}: expected GiB of GPU memory, a number > 0 (e.g. 22), or unset it")
    if not torch.cuda.is_available():
        return None
    device = int((os.environ if environ is None else environ).get("LOCAL_RANK", "0"))  # a data-parallel rank's GPU
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total), device)
    return min(cap, total / GIB)


def choose_micro_batch(probe: Callable[[int], None], effective_batch: int = 8, device: str = "cuda",
                       budget_gb: float | None = None) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) with micro x accumulation == effective_batch.

    `probe(micro)` runs one worst-case forward + backward at that micro-batch and raises (CUDA) out-of-memory
    when it does not fit; any other exception propagates. Candidates are tried largest first, memory is freed
    between them, and the first that fits wins. On CPU nothing is probed (see the module docstring).
    """
    candidates = micro_batch_candidates(effective_batch)
    if device != "cuda":
        micro = max(d for d in candidates if d <= CPU_MICRO_BATCH)
        return micro, effective_batch // micro
    if budget_gb is None and torch.cuda.is_available():
        budget_gb = default_budget_gb()
    with memory_cap(budget_gb):
        for micro in candidates:
            free_memory()
            fits = True
            try:
                probe(micro)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory means "too big"; others re-raised
                if not is_oom(exc):
                    raise
                fits = False  # leave the except block first: its traceback holds the failed step's tensors
            free_memory()
            log.info("auto batch: micro-batch %d %s", micro, "fits" if fits else "does not fit")
            if fits:
                return micro, effective_batch // micro
    budget = f"{budget_gb:.1f} GB" if budget_gb is not None else "GPU memory"
    raise AutoBatchError(f"not even micro-batch 1 fits in {budget}; lower data.max_pixels or train.max_seq_length")


# ---------------------------------------------------------------- probing through the project's trainer


def worst_case_index(lengths: list[int], image_sizes: list[tuple[int, int]]) -> int:
    """The row with the most tokens, ties broken by the larger image."""
    if not lengths:
        raise ValueError("no rows to probe with")
    return max(range(len(lengths)), key=lambda i: (lengths[i], image_sizes[i][0] * image_sizes[i][1]))


def worst_case_rows(split: Any, data_cfg: Any, processor: Any, dataset: Any, micro: int) -> Any:
    """`dataset` (the trainer-ready rows of `split`, a wellocr.data.Split) reduced to its longest row, micro times."""
    from wellocr.data import sample_lengths

    index = worst_case_index(sample_lengths(split, data_cfg, processor), split.image_sizes)
    return dataset.select([index] * micro)


def training_probe(make_probe_trainer: Callable[[int], Any]) -> Callable[[int], None]:
    """probe(micro): one real optimizer step through `trainer.train()` of `make_probe_trainer(micro)` (a trainer
    over `worst_case_rows(..., micro)` with max_steps 1 that saves nothing), then the trainable weights restored.

    Through train(), not a bare forward + backward: Unsloth sets up its gradient checkpointing there, and treats
    a grad-enabled forward before train() as poisoning its compile cache (it resets it, so training compiles
    twice). The probe also counts the optimizer state, which a bare backward leaves out.
    """

    def probe(micro: int) -> None:
        trainer = make_probe_trainer(micro)
        model = trainer.model
        trainable = [(p, p.detach().to("cpu", copy=True)) for p in model.parameters() if p.requires_grad]
        try:
            trainer.train()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        finally:
            trainer.optimizer = trainer.lr_scheduler = None
            with torch.no_grad():
                for param, saved in trainable:
                    param.copy_(saved)
            model.zero_grad(set_to_none=True)

    return probe
