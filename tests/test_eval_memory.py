"""Evaluation shares the GPU with training: what it keeps, how it adapts, what the run records about memory.

The CUDA parts (peaks, the cap) are shown on a GPU by `python benchmarks/bench.py --whole-run`; here the
mechanisms are pinned on CPU with the real trainer and the tiny model.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
import yaml

from conftest import smoke_settings
from wellocr import inference
from wellocr.autobatch import CAP_ENV, cap_process_memory
from wellocr.bootstrap import allocator_settings
from wellocr.errors import UserError


@pytest.fixture(scope="module")
def trainer_parts(tiny_model_dir, synth_data_dir, tmp_path_factory):
    from wellocr.config import config_from_dict
    from wellocr.model import Backend, load_for_training
    from wellocr.rundir import RunDir
    from wellocr.training import prepare_data

    root = tmp_path_factory.mktemp("evalmem")
    settings = smoke_settings(tiny_model_dir, synth_data_dir, root / "runs")
    cfg = config_from_dict(yaml.safe_load(yaml.safe_dump(settings)), "test")
    backend = Backend("hf", "cpu", "test")
    model, processor = load_for_training(cfg, backend, "fp32")
    run = RunDir(root / "runs" / "evalmem")
    return cfg, backend, model, processor, run, prepare_data(cfg, processor, run)


def test_the_eval_loss_pass_keeps_no_logits(trainer_parts):
    """Trainer.evaluate gathered every eval batch's batch x sequence x vocabulary logits (and Unsloth then
    materialised them): 50 GB on the 2B model. The run needs the loss only; eval/cer comes from generation."""
    from wellocr.training import build_trainer

    cfg, backend, model, processor, run, data = trainer_parts
    trainer = build_trainer(cfg, run, backend, "fp32", model, processor, data, 2, 1, [])
    output = trainer.evaluation_loop(trainer.get_eval_dataloader(), description="eval")
    assert output.predictions is None and output.label_ids is None
    assert output.metrics["eval_loss"] > 0


def test_generation_halves_its_batch_on_cuda_oom_and_keeps_every_row(trainer_parts, monkeypatch, capsys):
    cfg, backend, model, processor, run, data = trainer_parts
    rows = inference.fixed_eval_rows(data.splits["eval"], 4)
    generate = model.generate
    sizes = []

    def generate_within(**inputs):  # a GPU that holds two rows beside training
        sizes.append(inputs["input_ids"].shape[0])
        if inputs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generate(**inputs)

    monkeypatch.setattr(model, "generate", generate_within)
    result = inference.generation_metrics(model, processor, cfg, rows, 4, backend=backend, max_new_tokens=8)
    assert sizes == [4, 2, 2]
    assert result["batch_size"] == 2
    assert [r["index"] for r in result["records"]] == [r["row_index"] for r in rows]
    assert "generating 2 rows at a time" in capsys.readouterr().out


def test_other_errors_in_generation_are_not_retried(trainer_parts, monkeypatch):
    cfg, backend, model, processor, run, data = trainer_parts
    monkeypatch.setattr(model, "generate", lambda **_: (_ for _ in ()).throw(ValueError("bad input")))
    with pytest.raises(ValueError, match="bad input"):
        inference.generation_metrics(model, processor, cfg, inference.fixed_eval_rows(data.splits["eval"], 2), 2,
                                     backend=backend)


def test_in_training_generation_stops_a_quarter_past_the_longest_answer(trainer_parts):
    cfg, backend, model, processor, run, data = trainer_parts
    answers = ["WELL: A-1", "WELL: A-1\nFIELD: NORTH\nCOUNTY: KERN"]
    longest = len(processor.tokenizer(answers[1], add_special_tokens=False)["input_ids"])
    assert inference.generation_limit(processor, answers, 512) == int(longest * 1.25) + 16
    assert inference.generation_limit(processor, answers, 10) == 10


@pytest.mark.parametrize("environ, version, expected", [
    ({}, "2.13.0+cpu", {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}),
    ({}, "2.9.1", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "2.13.0", {}),
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, "2.9.1", {}),
])
def test_the_allocator_uses_expandable_segments_unless_the_user_configured_it(environ, version, expected):
    assert allocator_settings(environ, version) == expected


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_a_bad_gpu_memory_cap_is_one_line_naming_the_variable(value):
    with pytest.raises(UserError, match=f"{CAP_ENV}="):
        cap_process_memory({CAP_ENV: value})


def test_no_cap_asked_for_sets_nothing():
    assert cap_process_memory({}) is None


def test_the_run_records_time_and_memory_per_phase(trained_run):
    """run.json keeps each phase's seconds (and on a GPU its peak reserved/allocated memory) and the training step
    interval; the log says what its memory figure measured."""
    attempt = json.loads((trained_run / "run.json").read_text())["attempts"][-1]
    phases = attempt["phases"]
    assert {"auto_batch", "train", "eval_loss", "generation", "final_eval"} <= phases.keys()
    assert phases["eval_loss"]["count"] == 2 and phases["generation"]["count"] == 2  # evaluations at steps 4 and 8
    assert all(p["seconds"] > 0 for p in phases.values())
    assert 0 < attempt["median_step_s"] < phases["train"]["seconds"]
    intervals = attempt["step_intervals_s"]  # every interval kept: a slow stretch shows, not only the median
    assert len(intervals) == attempt["timed_steps"] >= 4
    assert statistics.median(intervals) == pytest.approx(attempt["median_step_s"], abs=1e-3)
    assert 0 <= attempt["median_data_wait_s"] < attempt["median_step_s"]  # the step's wait for its batch
    log = (trained_run / "logs" / "attempt-1.log").read_text()
    assert "peak process memory (max resident set, CPU run)" in log and "peak memory" not in log.replace(
        "peak process memory", "")


class FakeFastVisionModel:
    """Unsloth's switch as it behaves on the modules: inference turns checkpointing off (and cache on)."""

    @staticmethod
    def for_inference(model):
        for module in model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    @staticmethod
    def for_training(model, use_gradient_checkpointing=None):
        pass


def test_training_after_an_evaluation_checkpoints_as_before(trainer_parts, monkeypatch):
    """The in-training evaluation (transformers' eval-loss pass, then generation) must hand training back with
    every module's gradient checkpointing as it was: on the H200 the first step after an evaluation under Unsloth
    peaked at 48.7 GiB instead of 4.2 (the run's OOM fallback on a 24 GB card)."""
    import sys

    from wellocr.model import Backend
    from wellocr.training import build_trainer

    cfg, backend, model, processor, run, data = trainer_parts
    monkeypatch.setitem(sys.modules, "unsloth", type(sys)("unsloth"))
    monkeypatch.setattr(sys.modules["unsloth"], "FastVisionModel", FakeFastVisionModel, raising=False)
    unsloth = Backend("unsloth", "cpu", "test")
    rows = inference.fixed_eval_rows(data.splits["eval"], 1)

    def hook(m, step):
        return {"eval/cer": inference.generation_metrics(m, processor, cfg, rows, 1, backend=unsloth,
                                                         max_new_tokens=4)["eval/cer"]}

    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    saved = [m.gradient_checkpointing for m in flagged]
    for m in flagged:
        m.gradient_checkpointing = "unsloth"  # Unsloth's offloading mode: not a boolean
    try:
        trainer = build_trainer(cfg, run, backend, "fp32", model, processor, data, 2, 1, [], generation_eval=hook)
        model.train()  # as inside trainer.train()
        trainer.evaluate()
        assert model.training
        assert {m.gradient_checkpointing for m in flagged} == {"unsloth"}
    finally:
        for m, value in zip(flagged, saved):
            m.gradient_checkpointing = value
