"""The step between the two stages of `python -m wellocr.train`.

Stage 1 (wellocr.train) parses the arguments and the config, claims the run directory and checks what it can
without torch. Then `prepare` restores the compile caches a previous pod uploaded and points torch's, Triton's,
Unsloth's and Python's caches at the run's volume — which only works before torch is imported — and picks the
backend (the first import of torch); `import_backend` imports Unsloth before transformers/TRL/PEFT, so its patches
apply. Stage 2 (wellocr.training) imports all of those at its top, like any module: it is imported only after
this.
"""

from __future__ import annotations

import time
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
    """Caches restored and pointed at the volume, then the backend chosen (this imports torch)."""
    cache = model.compile_cache_dir(cfg)
    if remote is not None:  # a new pod: the caches a previous one compiled, from object storage
        remote.restore_compile_cache(cache)
    model.use_compile_cache(cache)
    return model.select_backend(cfg.model)


def import_backend(backend: model.Backend, timer: StartupTimer) -> None:
    model.import_backend(backend)
    timer.mark("imports")
