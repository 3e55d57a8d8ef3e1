"""`python benchmarks/bench.py` (not in the wheel): its options and data reuse, and the whole bench on CPU with the
tiny model so it cannot rot. The FLOP accounting it reports is wellocr.flops (tests/test_flops.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not an installed package
from benchmarks import bench  # noqa: E402


def test_summary_and_bad_arguments():
    assert bench.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert bench.summary([None]) is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--skip", "nothing"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert bench.parse_args(["--skip", "autobatch:hf,resume"]).skip == {"autobatch:hf", "resume"}
    assert bench.parse_args(["--skip", "train:unsloth"]).skip == {"train:unsloth"}
    args = bench.parse_args(["--batch", "2,8,16", "--batch-hf", "2,8"])
    assert (args.batches, args.batches_hf) == ([2, 8, 16], [2, 8])
    assert bench.parse_args(["--batch", "4"]).batches_hf == [4]
    assert bench.parse_args([]).peak_tflops == 790.0  # an H200's measured bf16 rate, unless told
    assert bench.parse_args(["--peak-tflops", "165"]).peak_tflops == 165.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--peak-tflops", "0"])
    with pytest.raises(SystemExit):  # no wall-clock budget: the bench runs every phase asked for
        bench.parse_args(["--budget-s", "500"])
    with pytest.raises(SystemExit):  # the run's config would refuse it only after the model and data were built
        bench.parse_args(["--whole-run", "--whole-steps", "2", "--eval-every", "100"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--whole-run", "--whole-set", "eval.max_new_tokens"])
    args = bench.parse_args(["--whole-run", "--whole-steps", "12", "--eval-every", "12", "--whole-set",
                             "eval.max_new_tokens=8"])
    assert args.whole_set == ["eval.max_new_tokens=8"] and args.no_restart is False


def test_resume_env_option():
    assert bench.parse_args([]).resume_env == []
    args = bench.parse_args(["--resume-env", "TORCH_CACHING_PRECOMPILE=1", "--resume-env", "A=1,B="])
    assert args.resume_env == [{"TORCH_CACHING_PRECOMPILE": "1"}, {"A": "1", "B": ""}]
    with pytest.raises(SystemExit):
        bench.parse_args(["--resume-env", "TORCH_CACHING_PRECOMPILE"])


def test_bench_reuses_a_large_enough_synthetic_set(tmp_path):
    """A GPU run should not spend minutes writing headers it already has; a too small set is never used."""
    from wellocr.synthetic import write_dataset

    work = tmp_path / "work"
    for train, eval_rows in ((4, 1), (10, 2)):
        write_dataset(work / f"headers-320-{train}", train=train, eval=eval_rows, width=320)
    (work / "headers-320-99").mkdir()  # unfinished (no README): never chosen
    assert bench.data_dir(work, 320, 3, 1) == str(work / "headers-320-4")
    assert bench.data_dir(work, 320, 5, 1) == str(work / "headers-320-10")
    assert bench.data_dir(work, 320, 5, 3) == str(work / "headers-320-5")  # eval too short everywhere
    assert bench.data_dir(work, 640, 3, 1) == str(work / "headers-640-3")

    args = bench.parse_args(["--tiny", "--work", str(work), "--batch", "1", "--steps", "2", "--warmup", "1",
                             "--gen-samples", "2", "--image", "320x240"])
    assert args.data == str(work / "headers-320-10")
    bench.ensure_data(args)
    assert bench.split_rows(work / "headers-320-10") == {"train": 10, "eval": 2}  # used as it is
    args.data = str(work / "headers-320-4")  # the bench's own set, one eval row short: written again
    bench.ensure_data(args)
    assert bench.split_rows(work / "headers-320-4") == {"train": 3, "eval": 2}
    theirs = tmp_path / "theirs"
    write_dataset(theirs, train=1, eval=1, width=320)
    args.data = str(theirs)  # a --data set is the user's: read, never rewritten
    bench.ensure_data(args)
    assert bench.split_rows(theirs) == {"train": 1, "eval": 1}


def test_phase_split_comes_from_the_profilers_ranges():
    """The profile phase's split is read from torch.profiler's record_function ranges the Recorder opens."""
    import time

    from torch.profiler import ProfilerActivity, profile

    rec = bench.Recorder("cpu", phases=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with rec.phase("forward"):
                with rec.phase("vision_fwd"):
                    time.sleep(0.01)
            rec.begin("optimizer")
            time.sleep(0.005)
            rec.end("optimizer")
            rec.end("data_wait")  # never opened: nothing happens
    split = bench.phase_split(prof.events(), steps=2)
    assert split["forward"] >= split["vision_fwd"] >= 0.01 and split["optimizer"] >= 0.005
    assert split["fwd_bwd"] == split["data_wait"] == 0.0
    assert rec.open == {}

    quiet = bench.Recorder("cpu")  # the timed runs open no ranges (and sync nothing but step ends)
    quiet.begin("forward")
    assert quiet.open == {}


def test_tiny_bench_on_cpu(tiny_model_dir, synth_data_dir, tmp_path):
    """The whole bench on CPU: timed configurations, checkpoint, profile, generation, auto-batch, and restarts
    through `python -m wellocr.train` (a first run, then --resume-latest processes, one under pyinstrument)."""
    out = tmp_path / "out" / "bench.json"
    mega = tmp_path / "mega"  # --resume-env points the second resume at this cache folder (1 MiB in it)
    mega.mkdir()
    (mega / "bundle.bin").write_bytes(bytes(2**20))
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--tiny", "--backend", "unsloth,hf", "--model",
         str(tiny_model_dir), "--data", str(synth_data_dir), "--work", str(tmp_path / "work"), "--out", str(out),
         "--batch", "1,2", "--batch-hf", "2", "--profile-batch", "2", "--cap-gb", "24", "--resume-profile",
         "--resumes", "1", "--resume-env", f"UNSLOTH_MEGA_CACHE_DIR={mega}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "samples/s" in result.stdout and "resume 2 with {'UNSLOTH_MEGA_CACHE_DIR'" in result.stdout
    report = json.loads(out.read_text())
    assert report["meta"]["skipped_backends"] == ["unsloth"]  # GPU-only

    [config] = report["configs"]
    # --batch-hf: the hf worker trains only its own sizes
    assert (config["backend"], config["batch"], config["gradient_accumulation_steps"]) == ("hf", 2, 1)
    assert len(config["repeats"]) == 2
    for key in ("step_s", "samples_per_s", "tokens_per_s", "tflops_per_s"):
        assert 0 < config[key]["min"] <= config[key]["median"] <= config[key]["max"]
    assert config["first_step_s"] > 0 and config["load_s"] > 0 and config["data_wait_s"]["median"] >= 0
    assert config["lm_tokens_per_step"] > config["visual_tokens_per_step"] > 0
    assert config["mfu"] is None and config["hfu"] is None and config["peak_reserved_gb"] is None  # CPU
    assert config["data_fraction_of_step_1worker"] > 0

    hf = report["backends"]["hf"]
    assert hf["errors"] == {} and hf["skipped"] == [] and hf["exit_code"] == 0
    checkpoint = hf["checkpoint"]  # the Trainer's own save, asked for through a callback
    assert checkpoint["mb"] > 0 and checkpoint["seconds"] > 0
    assert (checkpoint["step"], checkpoint["micro_batch"]) == (1, 2)

    first = hf["first_run"]  # python -m wellocr.train, one step, as run.json records it
    assert (first["exit_code"], first["resumed_at_step"], first["first_step"]) == (0, 0, 1)
    assert first["to_first_step_s"] >= first["startup"]["imports_s"] > 0 and first["startup"]["model_load_s"] > 0
    restarted = [*hf["resumes"], hf["resume_profiled"]]  # one after the other, each one step further
    assert [(r["exit_code"], r["resumed_at_step"], r["first_step"]) for r in restarted] == [
        (0, 1, 2), (0, 2, 3), (0, 3, 4)]
    assert hf["resume"] == hf["resumes"][0] and all(r["to_first_step_s"] > 0 for r in restarted)
    for name in ("restart-first", "resume", "resume-env1", "resume-profiled"):  # each process on an empty pod
        assert (tmp_path / "work" / "hf" / f"pod-{name}" / "home").is_dir()
    config_text = (tmp_path / "work" / "hf" / "restart.yaml").read_text()
    assert str(tmp_path / "work" / "hf" / "compile-cache") in config_text  # the caches the worker warmed
    with_env = hf["resumes"][1]  # --resume-env: one more resume, its variables reach wellocr.train
    assert with_env["env"] == {"UNSLOTH_MEGA_CACHE_DIR": str(mega)}
    assert with_env["compile_cache_mb"]["UNSLOTH_MEGA_CACHE_DIR"] == 1.0
    assert set(first["compile_cache_mb"]) >= {"TORCHINDUCTOR_CACHE_DIR", "UNSLOTH_MEGA_CACHE_DIR"}
    tree = (out.parent / "hf-resume-profile.txt").read_text()
    assert "Samples:" in tree and "wellocr/train.py" in tree  # pyinstrument: the product's process, wall clock
    assert (out.parent / "hf-resume-profile.pyisession").stat().st_size > 0  # the raw session, to render again

    profile = hf["profile"]
    assert (profile["micro_batch"], profile["steps"]) == (2, 3)
    assert profile["vision_fwd_s"] > 0 and profile["language_fwd_s"] > 0 and profile["backward_s"] > 0
    trace = json.loads(Path(profile["trace"]).read_text())  # torch.profiler's trace, the ranges in it
    names = [event.get("name", "") for event in trace["traceEvents"]]
    assert names.count("bench/vision_fwd") == 3 and sum(n.startswith("ProfilerStep#") for n in names) == 3
    generation = hf["generation"]
    assert generation["loop"]["samples_per_s"] > 0 and generation["batched"]["samples_per_s"] > 0
    assert generation["loop"]["new_tokens"] == generation["batched"]["new_tokens"] > 0  # greedy: same outputs
    assert generation["loop_first_call_s"] > 0 and generation["batched_first_call_s"] > 0  # untimed warm-ups
    auto = hf["autobatch"]
    assert (auto["micro_batch"], auto["gradient_accumulation_steps"]) == (2, 4)  # CPU rule
    assert auto["seed"]["samples_per_s"]["median"] > 0 and auto["seed"]["repeats"] == 2  # --tiny's repeats

    data = report["data_pipeline"]
    assert data["samples_per_s_per_worker"] > 0 and data["mean_tokens"] > 0


def test_the_bench_is_not_in_the_package():
    """Lab tooling stays out of the wheel: pyproject's package search finds wellocr, not benchmarks/."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(REPO), include=find["include"])
    assert "wellocr" in packages and not any(p.startswith("benchmarks") for p in packages)
    assert not (REPO / "wellocr" / "bench.py").exists()


def test_whole_run_mode_runs_the_shipped_config_through_the_entry_point(tiny_model_dir, tmp_path):
    """`--whole-run --tiny`: configs/train_r16.yaml through `python -m wellocr.train` (evaluations included), then a
    restart; the numbers come from what the run recorded, so a change there cannot silently empty the table."""
    out = tmp_path / "whole.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--whole-run", "--tiny",
                             "--resumes", "2", "--model", str(tiny_model_dir), "--work", str(tmp_path / "work"),
                             "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["config"].endswith("configs/train_r16.yaml")
    m = report["backends"]["hf"]
    assert m["exit_code"] == 0 and m["fallback"] is False
    assert set(m["peaks"]) == {"auto_batch", "train", "eval_loss", "generation", "final_eval"}
    assert m["samples_per_s"] > 0 and len(m["eval_loss_s"]) >= 1 and len(m["generation_s"]) >= 1
    assert m["later_half_samples_per_s"] > 0 and m["median_data_wait_s"] >= 0
    projection = m["projection"]
    assert projection["evaluation_s"] > 0 and 0 <= projection["overhead"] < 1 and projection["evaluations"] == 10
    assert m["memory_line"].startswith("peak process memory")
    assert m["restart"]["exit_code"] == 0 and m["restart"]["to_first_step_s"] > 0
    assert len(m["restarts"]) == 2 and all(r["exit_code"] == 0 and r["to_first_step_s"] > 0 for r in m["restarts"])
    assert "| hf | 2x4 | no |" in result.stdout


def test_generation_profile_runs_the_evaluation_generation_path(tiny_model_dir, synth_data_dir):
    """benchmarks/generation_profile.py (docs/BENCHMARKS.md's decode profile) on CPU: every decode step after the
    prompt feeds one token and reuses the cache, and the profile table is printed."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "generation_profile.py"), "hf",
                             str(tiny_model_dir), str(synth_data_dir)], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "33 forward calls" in result.stdout and "129 forward calls" in result.stdout
    summary = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert summary["rows"] >= 2 and summary["seconds"]["129"] > 0
    assert ", 1, 128), True, 'DynamicCache')" in result.stdout  # a one-token decode step on the cache
    assert "Self CPU time total" in result.stdout
    compiled = subprocess.run([sys.executable, str(REPO / "benchmarks" / "generation_profile.py"), "hf",
                               str(tiny_model_dir), str(synth_data_dir), "--compile-decode"], capture_output=True,
                              text=True, timeout=300, cwd=REPO)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    summary = json.loads(next(line for line in compiled.stdout.splitlines() if line.startswith("{")))
    assert summary["same_tokens"] == [True, True, True] and len(summary["compiled_129_s"]) == 3


def test_a_whole_run_stopped_by_sigterm_keeps_its_run_record_beside_the_logs(tiny_model_dir, tmp_path):
    """A time limit's SIGTERM to the bench: the run in progress stops at a step boundary and its run.json (phases,
    peaks) is copied beside the logs, where a machine's output folder keeps it."""
    logs, work = tmp_path / "logs", tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--whole-run", "--tiny",
                             "--whole-steps", "40", "--eval-every", "40", "--model", str(tiny_model_dir), "--work",
                             str(work), "--out", str(tmp_path / "whole.json"), "--logs", str(logs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    record = work / "hf" / "whole-runs" / "whole" / "run.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if record.is_file() and "first_step_s" in (json.loads(record.read_text()).get("attempts") or [{}])[-1]:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-3000:]
    kept = json.loads((logs / "hf-whole-run-run.json").read_text())["attempts"][-1]
    assert kept["exit_code"] == 75 and kept["phases"]["train"]["count"] >= 1 and kept["step"] < 40
