"""`python -m wellocr.train` end to end on CPU with the tiny model: the behaviours a spot job relies on."""

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, run_train
from wellocr import train as T
from wellocr.checkpoint import incomplete_reason, latest_complete_checkpoint, list_checkpoints
from wellocr.errors import UserError
from wellocr.rundir import RunDir, RunLock, resolve_run_name


def losses_by_step(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "checkpoint-8" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def popen_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wellocr.train", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})


# ---------------------------------------------------------------- the smoke run and the run directory


def test_smoke_run_writes_the_documented_run_directory(trained_run):
    run = RunDir(trained_run)
    assert run.config_file.is_file() and run.cost_file.is_file()
    info = run.read()
    assert info["run_name"] == "shared" and info["wellocr_version"]
    [attempt] = info["attempts"]
    assert (attempt["exit_reason"], attempt["exit_code"], attempt["step"]) == ("finished", 0, 8)
    assert attempt["first_step"] == 1 and 0 < attempt["first_step_s"] < attempt["ended_at"] - attempt["started_at"] + 5
    startup = attempt["startup"]  # where the restart overhead went
    assert set(startup) == {"imports_s", "model_load_s", "data_s", "auto_batch_s", "to_first_step_s"}
    assert min(startup.values()) >= 0 and abs(sum(startup.values()) - attempt["first_step_s"]) < 0.05
    assert "compile_cache" not in attempt  # nothing is compiled on the CPU path
    assert {"torch", "transformers", "trl", "peft"} <= set(attempt["versions"])
    assert info["status"] == "finished"
    assert incomplete_reason(run.final_dir) is None
    assert (run.final_dir / "adapter_model.safetensors").is_file()
    assert (run.final_dir / "tokenizer.json").is_file()  # the processor travels with the adapter
    log = (run.logs_dir / "attempt-1.log").read_text()
    assert "Preflight:" in log and "exit: finished (code 0)" in log
    assert "first optimizer step of this process (step 1) ended" in log
    assert (run.eval_dir / "final" / "metrics.json").is_file()
    assert (run.eval_dir / "final-test" / "metrics.json").is_file()  # the data has a test split
    assert not (run.path / ".lock").exists()


def test_final_adapter_loads_for_inference(trained_run):
    from wellocr.config import config_from_dict
    from wellocr.model import Backend, load_for_inference

    cfg = config_from_dict(yaml.safe_load((trained_run / "config.yaml").read_text()), "config.yaml")
    model, processor = load_for_inference(cfg, Backend("hf", "cpu", "test"), "fp32", trained_run / "final")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert processor.tokenizer.eos_token == "<|im_end|>"


def test_resume_latest_on_a_finished_run_does_nothing(trained_run_copy, make_config):
    cfg = make_config(**{"run.run_name": "shared", "run.output_dir": str(trained_run_copy.parent)})
    before = (trained_run_copy / "run.json").read_text()
    result = run_train("--config", str(cfg), "--resume-latest")
    assert result.returncode == 0
    assert "already done (finished at step 8); nothing to do" in result.stdout
    assert (trained_run_copy / "run.json").read_text() == before


def test_a_new_run_refuses_an_existing_run_directory(trained_run_copy, make_config):
    cfg = make_config(**{"run.run_name": "shared", "run.output_dir": str(trained_run_copy.parent)})
    result = run_train("--config", str(cfg))
    assert result.returncode == 2
    assert "already exists; continue it with --resume-latest" in result.stderr


def test_resume_refuses_trajectory_changes_naming_the_keys(trained_run_copy, make_config):
    cfg = make_config(**{"run.run_name": "shared", "run.output_dir": str(trained_run_copy.parent)})
    result = run_train("--config", str(cfg), "--resume-latest", "--set", "lora.r=4", "--set", "learning_rate=1e-3")
    assert result.returncode == 2
    assert f"resuming run {trained_run_copy} changes lora.r, train.learning_rate" in result.stderr


def test_resume_may_raise_max_steps_and_continues_from_the_last_checkpoint(trained_run_copy, make_config):
    cfg = make_config(**{"run.run_name": "shared", "run.output_dir": str(trained_run_copy.parent)})
    result = run_train("--config", str(cfg), "--resume-latest", "--set", "max_steps=10", "--set", "eval_steps=2",
                       "--set", "save_steps=1", "--set", "checkpoint.keep_recent=5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming run directory {trained_run_copy}" in result.stdout
    assert "resuming from checkpoint-8 (step 8)" in result.stdout
    assert json.loads((trained_run_copy / "final" / "wellocr_complete.json").read_text())["step"] == 10
    saved = yaml.safe_load((trained_run_copy / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 10
    assert [a["exit_reason"] for a in RunDir(trained_run_copy).read()["attempts"]] == ["finished", "finished"]
    # The first resumed step follows the new schedule: the old one ended at learning rate 0, which would have
    # left the adapter of step 9 equal to step 8's.
    step8, step9 = (load_file(trained_run_copy / f"checkpoint-{n}" / "adapter_model.safetensors") for n in (8, 9))
    assert any(not torch.equal(step8[k], step9[k]) for k in step8)
    # The closing numbers are this attempt's: 2 steps over its runtime, the mean loss of steps 9 and 10.
    line = next(x for x in result.stdout.splitlines() if x.startswith("this attempt:"))
    seconds, per_second, loss = (float(line.split(" in ")[1].split(" s,")[0]), float(line.split(", ")[1].split()[0]),
                                 float(line.split("train loss ")[1].split(",")[0]))
    assert line.startswith("this attempt: steps 9-10 ")
    assert per_second == pytest.approx(2 / seconds, rel=0.15)  # both printed rounded
    history = json.loads((trained_run_copy / "checkpoint-10" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e and e["step"] > 8]
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-3)


# ---------------------------------------------------------------- preemption


def test_resume_after_sigkills_reproduces_the_uninterrupted_run(trained_run, make_config, tmp_path):
    """SIGKILL at the moment a checkpoint directory appears (mid-save), twice, then --resume-latest to the end:
    the same per-step losses and final adapter as the uninterrupted shared run (same seed and data)."""
    cfg = make_config(**{"run.run_name": "killed", "train.save_steps": 2})
    run_dir = tmp_path / "runs" / "killed"
    kills = 0
    for target in ("checkpoint-2", "checkpoint-6"):
        proc = popen_train("--config", str(cfg), "--resume-latest")
        deadline = time.time() + 240
        while not (run_dir / target).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += proc.returncode == -signal.SIGKILL
    assert kills == 2
    for _ in range(3):
        result = run_train("--config", str(cfg), "--resume-latest")
        if "nothing to do" in result.stdout or result.returncode != 0:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses_by_step(run_dir) == pytest.approx(losses_by_step(trained_run), rel=1e-5)
    resumed = load_file(run_dir / "final" / "adapter_model.safetensors")
    reference = load_file(trained_run / "final" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-5, atol=1e-6)
    attempts = RunDir(run_dir).read()["attempts"]
    assert attempts[0]["exit_reason"] == "vanished"  # SIGKILL records nothing: the next attempt marks it
    assert attempts[-1]["exit_reason"] == "finished"


def test_sigterm_stops_at_a_step_boundary_saves_and_exits_75(make_config, tmp_path):
    cfg = make_config(**{"run.run_name": "term", "train.max_steps": 60, "train.save_steps": 60,
                         "train.eval_steps": 60})
    run_dir = tmp_path / "runs" / "term"
    proc = popen_train("--config", str(cfg))
    log = run_dir / "logs" / "attempt-1.log"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # the first optimizer step is recorded in run.json
        attempts = RunDir(run_dir).read().get("attempts", []) if (run_dir / "run.json").is_file() else []
        if attempts and "first_step_s" in attempts[-1]:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    saved = latest_complete_checkpoint(run_dir)
    assert saved is not None and 1 <= int(saved.name.split("-")[1]) < 60  # saved at the SIGTERM, not at the end
    assert "SIGTERM received" in log.read_text()
    assert RunDir(run_dir).read()["attempts"][0]["exit_reason"] == "preempted"

    result = run_train("--config", str(cfg), "--resume-latest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {saved.name}" in result.stdout


def test_sigterm_during_loading_exits_75(make_config, tmp_path):
    cfg = make_config(**{"run.run_name": "early"})
    proc = subprocess.Popen([sys.executable, "-m", "wellocr.train", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("Preflight:"):
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    assert RunDir(tmp_path / "runs" / "early").read()["attempts"][0]["exit_reason"] == "preempted"


@pytest.mark.parametrize("delay", [0.0, 2.5, 5.0])
def test_sigterm_anywhere_in_start_up_exits_75(make_config, tmp_path, delay):
    """Preflight, imports, model load, data: a stop that was asked for is 75 wherever it lands."""
    cfg = make_config(**{"run.run_name": "startup"})
    proc = subprocess.Popen([sys.executable, "-m", "wellocr.train", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.stdout.readline()  # the process is up and its handler installed
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 75, output[-3000:]
    assert "Traceback" not in output


def test_sigterm_inside_a_library_that_wraps_exceptions_is_still_a_stop():
    """transformers' lazy imports turn an Exception raised inside them into a RuntimeError."""
    from wellocr.preemption import Preempted, StopState, install_sigterm_handler

    restore = install_sigterm_handler(StopState())
    try:
        with pytest.raises(Preempted):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Exception as exc:  # what a library does
                raise RuntimeError("Failed to import transformers.models.qwen3_vl") from exc
    finally:
        restore()


# ---------------------------------------------------------------- out of memory (injected)


def oom_when(monkeypatch, condition):
    from wellocr.sft import WellocrSFTTrainer

    real = WellocrSFTTrainer.training_step

    def training_step(self, *args, **kwargs):
        if condition(self.args.per_device_train_batch_size):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WellocrSFTTrainer, "training_step", training_step)


@pytest.mark.slow
def test_oom_halves_the_micro_batch_keeping_the_effective_batch(make_config, monkeypatch, capsys, tmp_path):
    oom_when(monkeypatch, lambda micro: micro >= 2)
    cfg = make_config(**{"run.run_name": "oom"})
    assert T.main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "CUDA out of memory at micro-batch 2; retrying with 1 x 2 accumulation (same effective batch)" in out
    info = RunDir(tmp_path / "runs" / "oom").read()
    assert info["adapted_batch"] == {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2}
    state = json.loads((tmp_path / "runs" / "oom" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 1


def test_oom_that_persists_exits_76(make_config, monkeypatch, capsys, tmp_path):
    oom_when(monkeypatch, lambda micro: True)
    cfg = make_config(**{"run.run_name": "oom76", "train.per_device_train_batch_size": 4})
    assert T.main(["--config", str(cfg)]) == 76
    assert "CUDA out of memory at micro-batch 1 after 2 adaptation(s)" in capsys.readouterr().err
    info = RunDir(tmp_path / "runs" / "oom76").read()
    assert info["adapted_batch"] == {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}
    assert info["attempts"][-1]["exit_reason"] == "out-of-memory"


# ---------------------------------------------------------------- preflight


def test_preflight_only_checks_and_trains_nothing(make_config, capsys, tmp_path):
    cfg = make_config(**{"run.run_name": "pre"})
    assert T.main(["--config", str(cfg), "--preflight-only"]) == 0
    out = capsys.readouterr().out
    for line in ("ok    config valid", "ok    model reachable", "ok    data reachable", "ok    output dir writable",
                 "note  no CUDA GPU: GPU memory check skipped"):
        assert line in out
    assert list_checkpoints(tmp_path / "runs" / "pre") == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.model_name=/nonexistent/model", "model.model_name: /nonexistent/model does not exist"),
        ("data.dataset_name=/nonexistent/data", "data.dataset_name: /nonexistent/data does not exist"),
    ],
)
def test_preflight_failures_are_one_line_errors(make_config, capsys, override, message):
    cfg = make_config(**{"run.run_name": "bad"})
    assert T.main(["--config", str(cfg), "--set", override, "--preflight-only"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unwritable_output_dir_is_a_one_line_error(make_config, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = make_config(**{"run.output_dir": str(blocker / "runs"), "run.run_name": "x"})
    assert T.main(["--config", str(cfg)]) == 2
    assert "run.output_dir: cannot create" in capsys.readouterr().err


def test_not_enough_disk_is_a_preflight_error(make_config, monkeypatch, tmp_path):
    import shutil as shutil_module

    from wellocr import preflight
    from wellocr.config import load_config

    cfg = load_config(make_config())
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(UserError, match=r"run.output_dir: .* has 0.0 GiB free, the checkpoints it keeps need"):
        preflight.check_output_dir(cfg, tmp_path / "run", 10 * 2**20, preflight.PreflightReport())


def test_wandb_without_credentials_goes_offline_with_a_note(make_config, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    cfg = make_config(**{"run.run_name": "wb", "wandb.enabled": True})
    assert T.main(["--config", str(cfg), "--preflight-only"]) == 0
    assert "W&B offline: no credentials found" in capsys.readouterr().out
    assert "WANDB_MODE" not in os.environ  # preflight says what it found; the tracker is told, not the process
    from wellocr.config import load_config
    from wellocr.preflight import run_preflight

    assert run_preflight(load_config(cfg), tmp_path / "runs" / "wb").wandb_mode == "offline"


def test_preflight_and_entry_point_import_no_transformers(make_config):
    """Unsloth must be imported before transformers/TRL/PEFT: nothing before the backend import may load them."""
    cfg = make_config(**{"run.run_name": "imports"})
    code = ("import sys; from wellocr import train; "
            f"code = train.main(['--config', {str(cfg)!r}, '--preflight-only']); "
            "print(sorted(m for m in ('transformers', 'trl', 'peft') if m in sys.modules), code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip().splitlines()[-1] == "[] 0", result.stderr[-2000:]


def test_torch_is_not_imported_before_the_compile_cache_environment_is_set(make_config):
    """Python's bytecode and torch's compile caches go to the run's volume only if set before torch is imported:
    stage 1 of the entry point (arguments, config, run directory, lock, attempt record) imports no torch."""
    cfg = make_config(**{"run.run_name": "stages"})
    code = ("import sys\nimport wellocr.model as m\nreal = m.use_compile_cache\n"
            "def spy(root):\n    print('torch imported:', 'torch' in sys.modules, flush=True)\n    return real(root)\n"
            "m.use_compile_cache = spy\nfrom wellocr import train\n"
            f"sys.exit(train.main(['--config', {str(cfg)!r}, '--preflight-only']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch imported: False" in result.stdout


# ---------------------------------------------------------------- run identity and the lock


def test_generated_run_name_is_reused_by_resume_latest(tmp_path):
    from wellocr.config import Config

    cfg = Config()
    cfg.run.output_dir = str(tmp_path)
    name, how = resolve_run_name(cfg, tmp_path / "exp.yaml", resume=False, env={})
    assert how == "generated"
    (tmp_path / name).mkdir()
    assert resolve_run_name(cfg, tmp_path / "exp.yaml", resume=True, env={})[0] == name
    assert resolve_run_name(cfg, tmp_path / "other.yaml", resume=True, env={})[1] == "generated"


def test_second_live_writer_is_refused(tmp_path):
    holder = RunLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(UserError, match=r"is in use by pid \d+"):
            RunLock(tmp_path).acquire(wait=0)
    finally:
        holder.release()
    assert not (tmp_path / ".lock").exists()


def test_stale_locks_are_taken_over_with_a_message(tmp_path, caplog):
    lock_file = tmp_path / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "heartbeat": time.time()}))
    lock = RunLock(tmp_path)
    lock.acquire(wait=0)
    lock.release()
    assert "process" in caplog.text and "is gone" in caplog.text
    lock_file.write_text(json.dumps({"pid": 1, "host": "preempted-pod", "heartbeat": time.time() - 3600}))
    lock = RunLock(tmp_path)
    lock.acquire(wait=0)
    lock.release()
    assert "no heartbeat from preempted-pod" in caplog.text


def test_a_live_lock_on_another_host_is_respected(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "other-pod", "heartbeat": time.time()}))
    with pytest.raises(UserError, match="in use by pid 1 on other-pod"):
        RunLock(tmp_path).acquire(wait=0)


# ---------------------------------------------------------------- the CPU loss and the learning check


def test_cpu_loss_is_the_models_causal_lm_loss(tiny_model_dir, synth_data_dir, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from wellocr.config import Config
    from wellocr.data import load_splits, trainer_dataset
    from wellocr.model import Backend, load_for_training
    from wellocr.sft import WellocrSFTTrainer, fused_loss_supported
    from wellocr.training import sft_config

    assert not fused_loss_supported("cpu") and fused_loss_supported("cuda")
    cfg = Config()
    cfg.model.model_name, cfg.data.dataset_name = str(tiny_model_dir), str(synth_data_dir)
    cfg.data.min_pixels, cfg.data.max_pixels = 16384, 65536
    backend = Backend("hf", "cpu", "test")
    gc.unfreeze()
    model, processor = load_for_training(cfg, backend, "fp32")
    assert gc.get_freeze_count() > 0  # the loaded model is out of the collector's walks (freeze_heap)
    split = load_splits(cfg.data)["train"]
    rows = trainer_dataset(split, cfg.data)
    args = sft_config(cfg, RunDir(tmp_path), backend, "fp32", 2048, 2, 1)
    assert args.dataloader_persistent_workers == (args.dataloader_num_workers > 0)  # no new workers every epoch
    cfg.data.dataloader_num_workers = 1
    assert sft_config(cfg, RunDir(tmp_path), backend, "fp32", 2048, 2, 1).dataloader_persistent_workers
    probe = sft_config(cfg, RunDir(tmp_path), backend, "fp32", 2048, 2, 1, probe=True)
    assert (probe.dataloader_num_workers, probe.dataloader_persistent_workers) == (0, False)
    trainer = WellocrSFTTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                                processing_class=processor)
    batch = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)([dict(rows[0]), dict(rows[1])])
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        expected = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.slow
def test_tiny_model_overfits_four_samples_to_low_cer(tiny_model_dir, tmp_path):
    """Proves chat template, answer-only labels, processor and generation agree: judged by CER, not loss."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import smoke_settings
    from wellocr.config import config_from_dict
    from wellocr.data import load_splits
    from wellocr.inference import generation_metrics
    from wellocr.model import Backend, load_for_inference
    from wellocr.synthetic import encode_image, make_sample

    rows = []
    for i in range(4):
        image, answer = make_sample(1, i, width=384)
        rows.append({"image_base64": encode_image(image), "instruction": "Read the well name and field.",
                     "answer": "\n".join(answer.splitlines()[1:3])})
    data = tmp_path / "four"
    (data / "data").mkdir(parents=True)
    for split in ("train", "eval"):
        pq.write_table(pa.Table.from_pylist(rows), data / "data" / f"{split}-00000-of-00001.parquet")
    settings = smoke_settings(tiny_model_dir, data, tmp_path / "runs", **{
        "run.run_name": "overfit", "train.max_steps": 200, "train.eval_steps": 200, "train.save_steps": 200,
        "train.learning_rate": 2e-3, "train.warmup_steps": 0, "train.per_device_train_batch_size": 4,
        "train.logging_steps": 50, "lora.r": 8, "lora.lora_alpha": 16, "data.min_pixels": 4096,
        "data.max_pixels": 16384, "eval.generation_samples": 0})
    config = tmp_path / "overfit.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert T.main(["--config", str(config)]) == 0
    cfg = config_from_dict(settings, "overfit.yaml")
    cfg.eval.max_new_tokens = 60
    model, processor = load_for_inference(cfg, Backend("hf", "cpu", "test"), "fp32", tmp_path / "runs/overfit/final")
    train_rows = load_splits(cfg.data)["train"].dataset.to_list()
    result = generation_metrics(model, processor, cfg, train_rows, batch_size=4, backend=Backend("hf", "cpu", "test"))
    assert result["eval/cer"] <= 0.05, [r["prediction"] for r in result["records"]]


def test_resume_from_an_explicit_checkpoint(trained_run_copy):
    import shutil

    shutil.rmtree(trained_run_copy / "final")
    shutil.rmtree(trained_run_copy / "checkpoint-8")
    result = run_train("--resume", str(trained_run_copy / "checkpoint-4"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from checkpoint-4 (step 4)" in result.stdout
    assert incomplete_reason(trained_run_copy / "final") is None


def test_resume_from_an_incomplete_checkpoint_is_refused(trained_run_copy):
    (trained_run_copy / "checkpoint-4" / "wellocr_complete.json").unlink()
    result = run_train("--resume", str(trained_run_copy / "checkpoint-4"))
    assert result.returncode == 2
    assert "not a complete checkpoint (no completeness marker" in result.stderr


def test_wandb_failure_falls_back_to_offline_and_never_raises(tmp_path, monkeypatch):
    import wandb

    from wellocr.config import Config
    from wellocr.tracking import Tracker

    calls = []
    real_init = wandb.init

    def flaky_init(**kwargs):
        calls.append(kwargs.get("mode"))
        if kwargs.get("mode") != "offline":
            raise ConnectionError("api.wandb.ai unreachable (injected)")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", flaky_init)
    run = RunDir(tmp_path / "run")
    run.create("run", "test")
    tracker = Tracker(Config(), run)
    tracker.start(preemptions=0)
    assert calls == [None, "offline"] and tracker.active
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    assert run.read()["wandb_run_id"]


def test_early_stopping_ends_the_run_and_resume_latest_then_does_nothing(make_config, tmp_path):
    cfg = make_config(**{"run.run_name": "early-stop", "train.max_steps": 12, "train.eval_steps": 2,
                         "train.save_steps": 2, "train.early_stopping_patience": 1,
                         "train.early_stopping_threshold": 100.0, "eval.generation_samples": 0})
    result = run_train("--config", str(cfg))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exit: early-stopped (code 0)" in result.stdout
    run = RunDir(tmp_path / "runs" / "early-stop")
    assert run.read()["status"] == "early-stopped"
    step = json.loads((run.final_dir / "wellocr_complete.json").read_text())["step"]
    assert step == 4  # evals at 2 and 4; no improvement of 100 at 4 exhausts patience 1
    again = run_train("--config", str(cfg), "--resume-latest")
    assert again.returncode == 0 and "early-stopped at step 4); nothing to do" in again.stdout


def test_auto_micro_batch_on_cpu_is_two_and_keeps_the_effective_batch(make_config, tmp_path):
    cfg = make_config(**{"run.run_name": "auto", "train.per_device_train_batch_size": "auto",
                         "train.effective_batch_size": 4, "train.max_steps": 2, "train.eval_steps": 2,
                         "train.save_steps": 2, "eval.generation_samples": 0})
    result = run_train("--config", str(cfg))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "auto batch: micro-batch 2 x 2 accumulation = 4" in result.stdout
    run = RunDir(tmp_path / "runs" / "auto")
    assert run.read()["auto_batch"] == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                        "device": "cpu"}
    state = json.loads((run.path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2
    report = subprocess.run([sys.executable, "-m", "wellocr.cost", "--run", str(run.path), "--json"],
                            capture_output=True, text=True)
    assert json.loads(report.stdout)["effective_batch"] == 4

    # a recovery onto another device (a multi-cloud job): the choice and any OOM halving were for the old one
    run.update(auto_batch={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                           "device": "NVIDIA L4, 22.0 GiB"},
               adapted_batch={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4})
    again = run_train("--config", str(cfg), "--resume-latest", "--set", "train.max_steps=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "auto batch: chosen for NVIDIA L4, 22.0 GiB; this attempt runs on cpu: choosing again" in again.stdout
    assert "auto batch: micro-batch 2 x 2 accumulation = 4" in again.stdout
    data = run.read()
    assert data["auto_batch"]["device"] == "cpu" and data["adapted_batch"] is None
    state = json.loads((run.path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2


# ---------------------------------------------------------------- restart overhead: compile caches, workers


def test_compile_caches_go_under_the_output_dir_unless_the_environment_says_otherwise(monkeypatch, tmp_path):
    from wellocr.config import Config
    from wellocr.model import COMPILE_CACHE_ENV, compile_cache_dir, use_compile_cache

    cfg = Config()
    cfg.run.output_dir = str(tmp_path / "runs")
    assert compile_cache_dir(cfg) == tmp_path / "runs" / ".compile-cache"  # beside the runs: on the volume
    cfg.run.compile_cache_dir = str(tmp_path / "elsewhere")
    assert compile_cache_dir(cfg) == tmp_path / "elsewhere"

    for variable in COMPILE_CACHE_ENV:
        monkeypatch.setenv(variable, "")  # empty counts as unset; monkeypatch restores the real value afterwards
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine")
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", "/mine-too")  # bytecode: tested below
    monkeypatch.delenv("TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD", raising=False)
    monkeypatch.setenv("TORCH_COMPILE_JOB_ID", "my-job")
    set_now = use_compile_cache(tmp_path / "cache")
    assert set_now == {"UNSLOTH_COMPILE_LOCATION": str(tmp_path / "cache" / "unsloth"),
                       "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "inductor"),
                       "UNSLOTH_MEGA_CACHE_DIR": str(tmp_path / "cache" / "mega"),
                       "TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD": "1"}
    assert os.environ["TORCH_COMPILE_JOB_ID"] == "my-job"
    assert os.environ["TRITON_CACHE_DIR"] == "/mine"  # the user's choice stands
    assert os.environ["UNSLOTH_COMPILE_LOCATION"] == str(tmp_path / "cache" / "unsloth")
    monkeypatch.setenv("TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD", "0")  # opting out stands too
    assert use_compile_cache(tmp_path / "cache") == {}
    assert os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD"] == "0"


CUSTOM_FUNCTION_PROBE = """
import json, sys
from pathlib import Path
from wellocr.model import use_compile_cache
use_compile_cache(Path(sys.argv[1]))
import torch

class Cube(torch.autograd.Function):  # stands in for Unsloth's custom Functions inside its compiled layers
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x * x

x = torch.linspace(-1, 1, 8, requires_grad=True)
torch.compile(lambda x: Cube.apply(x.sin()).sum())(x).backward()
counts = torch._dynamo.utils.counters["aot_autograd"]
print(json.dumps({"grad": x.grad.tolist(), **{k: counts["autograd_cache_" + k] for k in ("hit", "miss", "bypass")}}))
"""


@pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
                    reason="inductor compiles C++ on CPU: no C++ compiler here")
@pytest.mark.slow
def test_a_restart_finds_graphs_with_custom_autograd_functions_in_the_compile_cache(tmp_path):
    """The real torch.compile (inductor, on CPU): by default AOTAutograd bypasses its cache for such a graph; with the
    setting use_compile_cache makes, the second process loads it, and the gradients are the same."""
    ours = ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD")
    clean = {name: value for name, value in os.environ.items() if name not in ours}

    def run(cache: str, **env: str) -> dict:
        done = subprocess.run([sys.executable, "-c", CUSTOM_FUNCTION_PROBE, str(tmp_path / cache)], text=True,
                              capture_output=True, env={**clean, **env}, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, restart = run("cache"), run("cache")
    assert (first["miss"], first["bypass"]) == (1, 0) and (restart["hit"], restart["bypass"]) == (1, 0)
    torch_default = run("other", TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD="0")
    assert torch_default["bypass"] == 1 and torch_default["hit"] == 0
    assert first["grad"] == restart["grad"] == torch_default["grad"]
    assert first["grad"][0] != 0


DYNAMIC_SHAPES_PROBE = """
import json, sys
from pathlib import Path
from wellocr.model import use_compile_cache
use_compile_cache(Path(sys.argv[1]))
import torch
import torch._dynamo.utils

f = torch.compile(lambda x: (x.sin() * 2).sum(), backend="eager")  # Dynamo alone: what is compiled, not how
for n in map(int, sys.argv[2:]):  # sequence lengths, one call each
    f(torch.ones(n))
print(json.dumps({"frames": torch._dynamo.utils.counters["stats"]["unique_graphs"]}))
"""


def test_a_restart_compiles_once_for_sizes_the_run_already_found_dynamic(tmp_path):
    """The real Dynamo: a run compiles twice for its first two sequence lengths (static, then dynamic). A restarted
    process on the same cache compiles once for its new lengths when the dynamic-shape profile was kept (the job
    id use_compile_cache sets); without it, twice again."""
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TORCH_COMPILE_JOB_ID")}

    def run(cache: str, *sizes: int, **env: str) -> int:
        done = subprocess.run([sys.executable, "-c", DYNAMIC_SHAPES_PROBE, str(tmp_path / cache), *map(str, sizes)],
                              text=True, capture_output=True, env={**clean, **env}, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])["frames"]

    assert run("cache", 5, 7) == 2  # the first process: static, then dynamic
    assert run("cache", 9, 11) == 1  # the restart: straight to the dynamic graph
    assert run("plain", 5, 7, TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO="0") == 2
    assert run("plain", 9, 11, TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO="0") == 2  # no profile: twice again


def test_bytecode_goes_to_the_compile_cache_only_where_the_environment_has_none(monkeypatch, tmp_path):
    """The H200 image ships torch without bytecode and sets PYTHONDONTWRITEBYTECODE: every process compiled ~3,000
    modules. A module without bytecode stands in for that torch here (this machine's torch has its bytecode)."""
    import py_compile

    from wellocr.model import COMPILE_CACHE_ENV, bytecode_env, use_compile_cache

    for variable in COMPILE_CACHE_ENV:
        monkeypatch.setenv(variable, "")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "wellocr_bytecode_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    expected = {"PYTHONPYCACHEPREFIX": str(tmp_path / "cache" / "bytecode"), "PYTHONDONTWRITEBYTECODE": ""}
    assert bytecode_env(tmp_path / "cache", "wellocr_bytecode_probe") == expected

    monkeypatch.setattr("wellocr.model.bytecode_env", lambda root: bytecode_env(root, "wellocr_bytecode_probe"))
    assert use_compile_cache(tmp_path / "cache")["PYTHONPYCACHEPREFIX"] == str(tmp_path / "cache" / "bytecode")
    import wellocr_bytecode_probe

    assert wellocr_bytecode_probe.VALUE == 42
    assert list((tmp_path / "cache" / "bytecode").rglob("wellocr_bytecode_probe.*.pyc"))
    assert not (tmp_path / "src" / "__pycache__").exists()  # nothing written beside the sources
    assert "PYTHONDONTWRITEBYTECODE" not in os.environ  # the processes it starts write there too
    assert bytecode_env(tmp_path / "other", "wellocr_bytecode_probe") == {}  # the environment now says where
    monkeypatch.delitem(sys.modules, "wellocr_bytecode_probe")

    monkeypatch.delenv("PYTHONPYCACHEPREFIX")
    monkeypatch.setattr(sys, "pycache_prefix", None)
    py_compile.compile(str(tmp_path / "src" / "wellocr_bytecode_probe.py"))  # as pip does at install
    assert bytecode_env(tmp_path / "cache", "wellocr_bytecode_probe") == {}


def test_the_inductor_cache_stays_on_the_volume_after_unsloth_import(monkeypatch, tmp_path):
    """unsloth_zoo's import pops TORCHINDUCTOR_CACHE_DIR (patching_utils.patch_torch_compile, read in the 2026.10.9
    wheel); Unsloth needs a GPU, so a stand-in module on sys.path does just that here."""
    from wellocr.model import COMPILE_CACHE_ENV, Backend, import_backend, use_compile_cache

    (tmp_path / "unsloth.py").write_text("import os\nos.environ.pop('TORCHINDUCTOR_CACHE_DIR', None)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    for variable in COMPILE_CACHE_ENV:
        monkeypatch.setenv(variable, "")
    monkeypatch.setattr(sys, "dont_write_bytecode", sys.dont_write_bytecode)
    monkeypatch.setattr(sys, "pycache_prefix", sys.pycache_prefix)
    use_compile_cache(tmp_path / "cache")
    import_backend(Backend("unsloth", "cuda", "test"))
    assert sys.modules["unsloth"].__file__ == str(tmp_path / "unsloth.py")  # the stand-in ran
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert os.environ["UNSLOTH_MEGA_CACHE_DIR"] == str(tmp_path / "cache" / "mega")


def test_compile_cache_counts_say_whether_a_restart_found_the_caches():
    from collections import Counter, defaultdict

    from wellocr.callbacks import compile_cache_counts

    counters = defaultdict(Counter)
    assert compile_cache_counts(counters) == {}
    counters["inductor"].update(fxgraph_cache_hit=25)
    counters["aot_autograd"].update(autograd_cache_hit=14, autograd_cache_miss=2, autograd_cache_bypass=1)
    assert compile_cache_counts(counters) == {"fx_graph_hits": 25, "fx_graph_misses": 0, "autograd_hits": 14,
                                              "autograd_misses": 2, "autograd_bypasses": 1}


def test_the_heap_is_frozen_after_imports_so_unsloths_gc_collect_calls_stay_cheap():
    from wellocr.model import freeze_heap

    gc.unfreeze()
    kept = [[object()] for _ in range(1000)]  # long-lived objects, like the modules and the model
    freeze_heap()
    assert gc.get_freeze_count() >= len(kept)
    assert not any(gc.is_tracked(x) and x in gc.get_objects(generation=2) for x in kept[:3])


def test_dataloader_workers_are_capped_at_the_free_cpus(monkeypatch):
    from wellocr.training import dataloader_workers

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # where it exists it wins; tested below
    monkeypatch.setattr(os, "cpu_count", lambda: 5)  # a small RunPod 4090 pod
    assert dataloader_workers(4) == 4 and dataloader_workers(8) == 4 and dataloader_workers(0) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert dataloader_workers(4) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # the CPUs this process may use
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert dataloader_workers(4) == 1


def test_a_new_pod_gets_the_compile_caches_of_the_last_one_from_the_remote_store(make_config, tmp_path):
    """The object-storage layout (sky/train_r16.yaml): each pod starts with an empty disk. A file in the cache
    stands in for the kernels a GPU run compiles (the CPU path compiles nothing)."""
    remote = f"file://{tmp_path / 'bucket'}"
    settings = {"checkpoint.remote": remote, "run.run_name": "cached", "train.max_steps": 2, "train.save_steps": 2,
                "train.eval_steps": 2, "eval.generation_samples": 0}
    pod1 = make_config("pod1.yaml", **settings, **{"run.output_dir": str(tmp_path / "pod1")})
    kernel = tmp_path / "pod1" / ".compile-cache" / "triton" / "k1" / "kernel.cubin"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(os.urandom(1000))
    first = run_train("--config", str(pod1))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert (tmp_path / "bucket" / "cached" / "compile-cache.tar.gz").is_file()

    pod2 = make_config("pod2.yaml", **settings, **{"run.output_dir": str(tmp_path / "pod2")})
    second = run_train("--config", str(pod2), "--resume-latest", "--set", "max_steps=4")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "remote: restored the compile caches (1 files" in second.stdout
    restored = tmp_path / "pod2" / ".compile-cache" / "triton" / "k1" / "kernel.cubin"
    assert restored.read_bytes() == kernel.read_bytes()
