"""Shared, built-once-per-session test assets: the tiny model, a synthetic data set, and one trained run.

Everything heavy is session-scoped so the whole suite stays within minutes on 2 CPU cores. Tests that need
their own run directory copy `trained_run` or start a short run with `run_train` + `make_config`.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# No network here, and nothing in the tests may try: the hub and W&B stay offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The fast tier, `python -m pytest -m "not slow"`, leaves out every test that trains: one that uses a fixture training
# a run (directly or through another fixture), starts the trainer itself (or the bench, which does), or sits in a
# module whose fixtures all train.
SLOW_FIXTURES = {"trained_run"}
SLOW_MODULES = {"test_drill.py", "test_tracking_cost_e2e.py"}
STARTS_TRAINER = re.compile(r"\b(run_train|popen_train|run_train_recorded|train_billed_from_open)\("
                            r"|\"-m\", \"wellocr\.train\"|\"benchmarks\" / \"bench\.py\"")
# Slow tests the rules above cannot see (the trainer's main() in-process, torch.compile probes) carry
# @pytest.mark.slow themselves.


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_MODULES
                or STARTS_TRAINER.search(source)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def assets_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="session")
def tiny_model_dir(assets_dir) -> Path:
    from wellocr.tiny import build_tiny_model

    return build_tiny_model(assets_dir / "tiny-qwen3-vl", seed=0)


@pytest.fixture(scope="session")
def synth_data_dir(assets_dir) -> Path:
    from wellocr.synthetic import write_dataset

    return write_dataset(assets_dir / "headers", train=16, eval=6, test=3, seed=0, width=384)


@pytest.fixture(autouse=True)
def _process_state_restored():
    """Entry points run in-process (evaluate.main) point the compile caches and Python's bytecode prefix at their
    run's folder for the whole process; undo that after each test, so no test inherits another's."""
    env, prefix, dont_write = dict(os.environ), sys.pycache_prefix, sys.dont_write_bytecode
    yield
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)
    sys.pycache_prefix, sys.dont_write_bytecode = prefix, dont_write


@pytest.fixture(scope="session")
def moto_url():
    """A local S3 API (moto's server on 127.0.0.1, a free port) for the whole session: its URL. Each test makes
    its own bucket with a unique name, so they share one server without seeing each other's objects."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free one
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def smoke_settings(model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> dict:
    """A small CPU config (sectioned dict) on the shared assets; keyword overrides are 'section.key': value."""
    cfg = yaml.safe_load((REPO / "configs" / "cpu_smoke.yaml").read_text())
    cfg["model"].update(model_name=str(model_dir), build_tiny_if_missing=False)
    cfg["data"].update(dataset_name=str(data_dir), build_synthetic_if_missing=False)
    cfg["train"].update(max_steps=8, eval_steps=4, save_steps=4, logging_steps=1)
    cfg["eval"].update(generation_samples=2, max_new_tokens=48, batch_size=4)
    cfg["run"].update(output_dir=str(output_dir))
    for key, value in overrides.items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    return cfg


@pytest.fixture
def make_config(tiny_model_dir, synth_data_dir, tmp_path):
    """make_config(**{'train.max_steps': 6}) -> path of a YAML config writing runs under tmp_path/runs."""

    def make(name: str = "exp.yaml", **overrides) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(smoke_settings(tiny_model_dir, synth_data_dir, tmp_path / "runs", **overrides)))
        return path

    return make


def run_train(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """`python -m wellocr.train ARGS` in a fresh process (as SkyPilot runs it); returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "wellocr.train", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or REPO)


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, synth_data_dir, tmp_path_factory) -> Path:
    """One complete CPU training run (8 steps, checkpoints at 4 and 8, final adapter), shared read-only."""
    root = tmp_path_factory.mktemp("trained")
    config = root / "exp.yaml"
    config.write_text(yaml.safe_dump(smoke_settings(tiny_model_dir, synth_data_dir, root / "runs",
                                                    **{"run.run_name": "shared"})))
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "runs" / "shared"


@pytest.fixture
def trained_run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the shared run, for tests that modify it."""
    dest = tmp_path / "runs" / trained_run.name
    shutil.copytree(trained_run, dest)
    return dest


def strip_results(run_dir: Path) -> Path:
    """Remove what training writes after the adapter (cost ledger, evaluations), for tests that plant their own."""
    (run_dir / "cost.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "eval", ignore_errors=True)
    return run_dir
