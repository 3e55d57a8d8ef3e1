"""The step between the two stages of `python -m wellocr.train`.

Stage 1 (wellocr.train) parses the arguments and the config, claims the run directory and checks what it can
without torch. Then `prepare` restores the compile caches a previous pod uploaded and points torch's, Triton's,
Unsloth's and Python's caches at the run's volume — which only works before torch is imported — and picks the
backend (the first import of torch); `import_backend` imports Unsloth before transformers/TRL/PEFT, so its patches
apply. Stage 2 (wellocr.training) imports all of those at its top, like any module: it is imported only after
this.
"""

from __future__ import annotations

import os
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from wellocr import model
from wellocr.config import Config


class StartupTimer:
    """When each start-up phase ended (imports, model load, data, auto batch): run.json's `startup` split of the
    seconds from process start to the first optimizer step, the restart overhead of a spot job."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.marks[phase] = time.time()


def prepare(cfg: Config, remote: Any) -> model.Backend:
    """Caches restored and pointed at the volume, the allocator configured, then the backend chosen (this
    imports torch)."""
    cache = model.compile_cache_dir(cfg)
    if remote is not None:  # a new pod: the caches a previous one compiled, from object storage
        remote.restore_compile_cache(cache)
    model.use_compile_cache(cache)
    os.environ.update(allocator_settings(os.environ, _torch_version()))
    return model.select_backend(cfg.model)


def allocator_settings(environ: Any, torch_version: str) -> dict[str, str]:
    """CUDA's caching allocator with expandable segments, unless the user configured it: evaluation and training
    alternate on one GPU, and blocks cached at one batch shape then fit another's (Unsloth's import sets the same
    for its backend; the hf backend would not get it). torch reads PYTORCH_ALLOC_CONF from 2.10, the older name
    before; read at the first CUDA allocation, so it is set before torch is imported."""
    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    if any(name in environ for name in names):
        return {}
    major, minor = (int(part) for part in (torch_version.split(".") + ["0", "0"])[:2])
    return {names[0] if (major, minor) >= (2, 10) else names[1]: "expandable_segments:True"}


def _torch_version() -> str:
    try:
        return version("torch")
    except PackageNotFoundError:
        return "0.0"


def import_backend(backend: model.Backend, timer: StartupTimer) -> None:
    """The backend imported (Unsloth first), then the WELLOCR_GPU_MEMORY_GB cap, before any CUDA allocation."""
    from wellocr.autobatch import cap_process_memory

    model.import_backend(backend)
    cap = cap_process_memory()
    if cap is not None:
        print(f"wellocr: GPU memory capped at {cap:.1f} GiB for this process", flush=True)
    timer.mark("imports")
