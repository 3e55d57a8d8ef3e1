"""wellocr.evaluate: the CLI's outputs and naming, its errors; wellocr.inference: the functions training calls.

The shared 8-step run is evaluated once per kind (base, final, latest, a limit, another split); the model-level
tests load its final adapter once for the module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wellocr import artifacts, evaluate, inference
from wellocr.data import load_splits
from wellocr.metrics import score
from wellocr.model import Backend

METRICS_KEYS = {"cer", "wer", "cer_normalized", "wer_normalized", "fields", "samples", "mean_loss", "generation",
                "checkpoint", "split", "limit", "base_model", "created_at"}
GENERATION_KEYS = {"samples_per_second", "new_tokens_per_second", "batch_size", "seconds"}
REPO = Path(__file__).resolve().parents[1]
PREDICTION_KEYS = {"index", "prediction", "reference", "loss", "cer", "wer"}


def read_metrics(run_dir, name):
    return json.loads((run_dir / "eval" / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def evaluated_run(trained_run, tmp_path_factory):
    """A copy of the shared run with its base model, then its final adapter, evaluated through the CLI."""
    run_dir = tmp_path_factory.mktemp("evaluated") / trained_run.name
    shutil.copytree(trained_run, run_dir)
    assert evaluate.main(["--run", str(run_dir), "--base-model"]) == 0
    result = subprocess.run([sys.executable, "-m", "wellocr.evaluate", "--run", str(run_dir)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


@pytest.fixture(scope="module")
def loaded(trained_run):
    """(cfg, model, processor, eval split, backend) of the shared run's final adapter."""
    cfg = artifacts.load_run_config(trained_run)
    backend = inference.prepare_backend(cfg)
    model, processor = inference.load_model(cfg, backend, trained_run / "final")
    return cfg, model, processor, load_splits(cfg.data)["eval"], backend


# ---------------------------------------------------------------- the CLI


def test_cli_writes_metrics_predictions_and_report(evaluated_run):
    run_dir, _ = evaluated_run
    out = run_dir / "eval" / "final"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.jsonl", "report.html"]


def test_metrics_json_has_the_documented_schema(evaluated_run):
    metrics = read_metrics(evaluated_run[0], "final")
    assert METRICS_KEYS <= metrics.keys()
    assert GENERATION_KEYS <= metrics["generation"].keys()
    assert metrics["checkpoint"]["name"] == "final" and metrics["checkpoint"]["step"] == 8
    assert (metrics["split"], metrics["limit"], metrics["base_model"], metrics["samples"]) == ("eval", None, False, 6)
    assert metrics["generation"]["samples_per_second"] > 0


def test_predictions_have_one_row_per_sample_with_original_row_indices(evaluated_run, trained_run):
    rows = [json.loads(line) for line in (evaluated_run[0] / "eval/final/predictions.jsonl").read_text().splitlines()]
    cfg = artifacts.load_run_config(trained_run)
    assert all(row.keys() == PREDICTION_KEYS for row in rows)
    assert [row["index"] for row in rows] == list(load_splits(cfg.data)["eval"].dataset["row_index"])


def test_mean_loss_is_the_mean_of_per_sample_losses(evaluated_run):
    rows = [json.loads(line) for line in (evaluated_run[0] / "eval/final/predictions.jsonl").read_text().splitlines()]
    metrics = read_metrics(evaluated_run[0], "final")
    assert metrics["mean_loss"] == pytest.approx(sum(r["loss"] for r in rows) / len(rows))


def test_cli_prints_a_summary_naming_the_output_folder(evaluated_run):
    run_dir, stdout = evaluated_run
    assert "CER" in stdout and "samples/s" in stdout and str(run_dir / "eval" / "final") in stdout


def test_report_compares_with_the_base_model_when_a_base_evaluation_exists(evaluated_run):
    run_dir, _ = evaluated_run
    base_cer = read_metrics(run_dir, "base")["cer"]
    report = (run_dir / "eval/final/report.html").read_text()
    assert 'class="vs-base"' in report and f"{base_cer:.4f}" in report


def test_base_model_evaluation_is_named_base(evaluated_run):
    metrics = read_metrics(evaluated_run[0], "base")
    assert metrics["base_model"] is True and metrics["checkpoint"] == {"name": "base", "step": None, "path": None}


def test_limit_is_part_of_the_output_name(evaluated_run):
    run_dir, _ = evaluated_run
    assert evaluate.main(["--run", str(run_dir), "--limit", "2"]) == 0
    metrics = read_metrics(run_dir, "final-n2")
    assert (metrics["samples"], metrics["limit"]) == (2, 2)


def test_another_split_is_part_of_the_output_name(evaluated_run):
    run_dir, _ = evaluated_run
    assert evaluate.main(["--run", str(run_dir), "--split", "test"]) == 0
    metrics = read_metrics(run_dir, "final-test")
    assert (metrics["split"], metrics["samples"]) == ("test", 3)


def test_latest_checkpoint_is_named_after_its_directory(evaluated_run):
    run_dir, _ = evaluated_run
    assert evaluate.main(["--run", str(run_dir), "--checkpoint", "latest", "--limit", "1"]) == 0
    assert read_metrics(run_dir, "checkpoint-8-n1")["checkpoint"]["step"] == 8


@pytest.mark.parametrize("checkpoint, split, limit, name", [
    ("final", "eval", None, "final"), ("final", "eval", 2, "final-n2"), ("final", "test", None, "final-test"),
    ("base", "eval", None, "base"), ("checkpoint-8", "eval", None, "checkpoint-8"), ("best", "test", 5, "best-test-n5"),
])
def test_eval_dir_name(checkpoint, split, limit, name):
    assert artifacts.eval_dir_name(checkpoint, split, limit) == name


def test_best_resolves_to_the_checkpoint_with_the_lowest_eval_loss(trained_run):
    path, name = artifacts.resolve_checkpoint(trained_run, "best")
    assert name == "best" and path.parent == trained_run and path.name.startswith("checkpoint-")


def test_unknown_checkpoint_exits_2_with_one_line(trained_run):
    result = subprocess.run([sys.executable, "-m", "wellocr.evaluate", "--run", str(trained_run),
                             "--checkpoint", "nope"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --checkpoint nope: no such directory; use final, best, latest or the path of a checkpoint directory"
    ]


def test_incomplete_checkpoint_is_refused(trained_run_copy, capsys):
    (trained_run_copy / "checkpoint-4" / "wellocr_complete.json").unlink()
    assert evaluate.main(["--run", str(trained_run_copy), "--checkpoint", str(trained_run_copy / "checkpoint-4")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --checkpoint") and "not a complete checkpoint" in err and "\n" not in err


def test_unknown_split_exits_2_listing_the_splits(trained_run, capsys):
    assert evaluate.main(["--run", str(trained_run), "--split", "validation2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --split validation2: the data set has no such split (splits: train, eval, test)"


def test_a_folder_without_config_is_not_a_run(tmp_path, capsys):
    assert evaluate.main(["--run", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------- loss and generation


def test_per_sample_losses_differ_between_samples(loaded):
    cfg, model, processor, split, backend = loaded
    images, instructions, answers = inference.row_inputs(inference.fixed_eval_rows(split, 3), cfg)
    losses = inference.per_sample_losses(model, processor, inference.loss_examples(images, instructions, answers), 3,
                                         backend=backend)
    assert len(losses) == 3 and len({round(loss, 5) for loss in losses}) == 3


def test_per_sample_loss_equals_the_models_own_loss_for_that_sample(loaded):
    cfg, model, processor, split, backend = loaded
    images, instructions, answers = inference.row_inputs(inference.fixed_eval_rows(split, 3), cfg)
    examples = inference.loss_examples(images, instructions, answers)
    batched = inference.per_sample_losses(model, processor, examples, batch_size=3, backend=backend)
    single = inference.loss_collator(processor)([dict(examples[1])])
    with torch.no_grad():
        expected = model(**single).loss.item()  # transformers' causal-LM loss over the collator's labels
    assert batched[1] == pytest.approx(expected, rel=1e-4)


def test_batched_generation_matches_one_at_a_time(loaded):
    cfg, model, processor, split, backend = loaded
    images, _, _ = inference.row_inputs(inference.fixed_eval_rows(split, 4), cfg)
    # prompts of different lengths, so the batch is left-padded (with right padding this test fails)
    instructions = ["Transcribe.", "Read the header.", cfg.data.instruction, "WELL?"]
    batched = inference.generate_batch(model, processor, images, instructions, max_new_tokens=16, backend=backend)
    one_by_one = [inference.generate_batch(model, processor, [image], [instruction], max_new_tokens=16,
                                           backend=backend)[0]
                  for image, instruction in zip(images, instructions)]
    assert len(set(one_by_one)) > 1  # the outputs depend on the input, so equal lists mean something
    assert batched == one_by_one


def test_generation_metrics_scores_the_rows_and_keeps_their_images(loaded):
    cfg, model, processor, split, backend = loaded
    rows = inference.fixed_eval_rows(split, 2)
    result = inference.generation_metrics(model, processor, cfg, rows, batch_size=2, backend=backend)
    records = result["records"]
    assert [r["index"] for r in records] == [row["row_index"] for row in rows]
    assert result["eval/cer"] == score([r["reference"] for r in records], [r["prediction"] for r in records])["cer"]
    assert {"index", "prediction", "reference", "cer", "wer", "loss", "image"} <= records[0].keys()
    assert records[0]["image"].size[0] > 0


def test_short_last_batch_filled_up_for_unsloth_gives_the_same_records(loaded, monkeypatch):
    """Under Unsloth a short last batch is filled with copies of its last row (one prefill compile per process);
    the copies' outputs are dropped, so the records and token counts equal the unfilled pass."""
    cfg, model, processor, split, backend = loaded
    rows = inference.fixed_eval_rows(split, 3)
    calls = []
    generate = inference.generate_with_counts
    monkeypatch.setattr(inference, "generate_with_counts",
                        lambda m, p, images, *a, **kw: calls.append(len(images)) or generate(m, p, images, *a, **kw))
    assert not inference.compiles_per_batch_size(backend)  # the hf backend here: nothing is filled
    assert inference.compiles_per_batch_size(Backend("unsloth", "cuda", "test"))
    plain, plain_generation = inference.score_rows(model, processor, cfg, rows, batch_size=2, backend=backend)
    monkeypatch.setattr(inference, "compiles_per_batch_size", lambda backend: True)
    filled, filled_generation = inference.score_rows(model, processor, cfg, rows, batch_size=2, backend=backend)
    assert calls == [2, 1, 2, 2]  # the last batch of one row went in as two
    assert [(r["index"], r["prediction"]) for r in filled] == [(r["index"], r["prediction"]) for r in plain]
    assert [r["loss"] for r in filled] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert filled_generation["new_tokens"] == plain_generation["new_tokens"]


class FakeFastVisionModel:
    calls: list = []

    @classmethod
    def for_inference(cls, model):
        cls.calls.append("for_inference")

    @classmethod
    def for_training(cls, model, use_gradient_checkpointing=None):
        cls.calls.append("for_training")
        for module in model.modules():  # what an explicit False (or a mode it does not know) does
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = bool(use_gradient_checkpointing)


@pytest.mark.parametrize("name, switches", [("unsloth", ["for_inference", "for_training"]), ("hf", [])])
def test_inference_mode_switches_unsloth_models_only_for_the_unsloth_backend(name, switches, monkeypatch):
    """The backend the caller names decides, not whether Unsloth happens to be imported in the process."""
    monkeypatch.setitem(sys.modules, "unsloth", type(sys)("unsloth"))
    monkeypatch.setattr(sys.modules["unsloth"], "FastVisionModel", FakeFastVisionModel, raising=False)
    monkeypatch.setattr(FakeFastVisionModel, "calls", [])
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].gradient_checkpointing, model[1].gradient_checkpointing = "unsloth", True  # Unsloth's offloading mode
    model.train()
    with inference.inference_mode(model, Backend(name, "cpu", "test")):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and FakeFastVisionModel.calls == switches
    # a training step after an evaluation checkpoints as before (without, it kept every activation: CUDA OOM)
    assert (model[0].gradient_checkpointing, model[1].gradient_checkpointing) == ("unsloth", True)


def test_generation_metrics_puts_a_training_model_back_into_training_mode(loaded):
    cfg, model, processor, split, backend = loaded
    model.train()
    try:
        inference.generation_metrics(model, processor, cfg, inference.fixed_eval_rows(split, 1), batch_size=1,
                                     backend=backend)
        assert model.training
    finally:
        model.eval()


# ---------------------------------------------------------------- worst samples


def record(index, cer, loss):
    return {"index": index, "cer": cer, "loss": loss, "wer": 0.0, "prediction": "", "reference": ""}


def test_worst_samples_by_cer_breaks_ties_by_loss():
    records = [record(0, 0.5, 1.0), record(1, 0.9, 0.1), record(2, 0.5, 3.0), record(3, 0.1, 9.0)]
    assert [r["index"] for r in inference.worst_samples(records, 3, by="cer")] == [1, 2, 0]


def test_worst_samples_by_loss_takes_the_highest_losses():
    records = [record(0, 0.5, 1.0), record(1, 0.9, 0.1), record(2, 0.5, 3.0), record(3, 0.1, 9.0)]
    assert [r["index"] for r in inference.worst_samples(records, 2, by="loss")] == [3, 2]


def test_worst_samples_rejects_an_unknown_key():
    with pytest.raises(ValueError, match="by must be one of loss, cer"):
        inference.worst_samples([record(0, 0.1, 0.1)], 1, by="wer")


def test_compiled_decode_transcribes_as_eager_decoding_and_restores_the_model(loaded):
    """eval.compile_decode: inside the block the 4-bit quantizer counts as compileable and generation uses a static
    cache (on CUDA transformers then compiles the decode step; on CPU it decodes the static cache eagerly): the
    transcriptions are the eager ones, and the model is as it was afterwards."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    cfg, model, processor, split, backend = loaded
    base = model.get_base_model()
    images, _, _ = inference.row_inputs(inference.fixed_eval_rows(split, 4), cfg)
    instructions = ["Transcribe.", "Read the header.", cfg.data.instruction, "WELL?"]  # outputs that differ
    eager = inference.generate_with_counts(model, processor, images, instructions, 16, backend=backend)
    before = base.__dict__.get("hf_quantizer", "absent")
    base.hf_quantizer = Bnb4BitHfQuantizer(BitsAndBytesConfig(load_in_4bit=True))  # as a QLoRA model carries it
    try:
        assert not base.hf_quantizer.is_compileable  # what keeps transformers from compiling a 4-bit model's decode
        with inference.compiled_decode(model, backend):
            assert base.hf_quantizer.is_compileable and base.generation_config.cache_implementation == "static"
        assert type(base.hf_quantizer) is Bnb4BitHfQuantizer and not base.hf_quantizer.is_compileable
        assert base.generation_config.cache_implementation is None
        compiled = inference.generate_with_counts(model, processor, images, instructions, 16, backend=backend,
                                                  compile_decode=True)
    finally:
        if before == "absent":
            del base.hf_quantizer
        else:
            base.hf_quantizer = before
    assert compiled == eager and len(set(eager[0])) > 1


def test_a_failing_compiled_decode_falls_back_to_eager_decoding_once(loaded, capsys):
    """A decode step that cannot compile (here: torch.compile told to use a backend that does not exist, on every
    device) must not end an evaluation, and with it the training run: the rows are decoded eagerly, the log says
    so once, and later evaluations do not try again."""
    from transformers import CompileConfig

    cfg, model, processor, split, backend = loaded
    rows = inference.fixed_eval_rows(split, 2)
    expected = inference.generation_metrics(model, processor, cfg, rows, batch_size=2, backend=backend)
    base, compiling = model.get_base_model(), cfg.model_copy(deep=True)
    compiling.eval.compile_decode = True
    failing = CompileConfig(backend="no_such_backend")
    failing._compile_all_devices = True  # transformers compiles on CUDA only, unless told so
    base.generation_config.compile_config = failing
    try:
        first = inference.generation_metrics(model, processor, compiling, rows, batch_size=2, backend=backend)
        again = inference.generation_metrics(model, processor, compiling, rows, batch_size=2, backend=backend)
    finally:
        base.generation_config.compile_config = None
        model.__dict__.pop(inference.EAGER_AFTER_FAILURE, None)
    out = capsys.readouterr().out
    assert out.count("wellocr: compiled decoding failed (InvalidBackend") == 1
    assert "decoding eagerly" in out
    for result in (first, again):
        assert [r["prediction"] for r in result["records"]] == [r["prediction"] for r in expected["records"]]
