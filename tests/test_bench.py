"""`python benchmarks/bench.py` (not in the wheel): its options and data reuse, and the whole bench on CPU with the
tiny model so it cannot rot. The FLOP accounting it reports is wellocr.flops (tests/test_flops.py)."""

import json
import os
import subprocess
import sys

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


def test_resume_env_option():
    assert bench.parse_args([]).resume_env == []
    args = bench.parse_args(["--resume-env", "TORCH_CACHING_PRECOMPILE=1", "--resume-env", "A=1,B="])
    assert args.resume_env == [{"TORCH_CACHING_PRECOMPILE": "1"}, {"A": "1", "B": ""}]
    with pytest.raises(SystemExit):
        bench.parse_args(["--resume-env", "TORCH_CACHING_PRECOMPILE"])


def test_bench_reuses_a_large_enough_synthetic_set(tmp_path):
    """A GPU lease should not spend minutes writing headers it already has; a too small set is never used."""
    from wellocr.synth import write_dataset

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


def test_compile_seconds_lists_dynamo_phases():
    import torch

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")
    assert compiled(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]
    seconds = bench.compile_seconds(top=5)
    assert 0 < len(seconds) <= 5
    calls, total, longest = seconds[next(iter(seconds))]  # the costliest phase first
    assert calls >= 1 and total >= longest >= 0
    assert [row[1] for row in seconds.values()] == sorted((row[1] for row in seconds.values()), reverse=True)


def test_tiny_bench_on_cpu(tiny_model_dir, synth_data_dir, tmp_path):
    out = tmp_path / "out" / "bench.json"
    mega = tmp_path / "mega"  # --resume-env points the third resume at this cache folder (1 MiB in it)
    mega.mkdir()
    (mega / "bundle.bin").write_bytes(bytes(2**20))
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--tiny", "--backend", "unsloth,hf", "--model", str(tiny_model_dir),
         "--data", str(synth_data_dir), "--work", str(tmp_path / "work"), "--out", str(out),
         "--batch", "1,2", "--batch-hf", "2", "--profile-batch", "2", "--cap-gb", "24", "--resume-profile", "--resumes", "2",
         "--resume-env", f"UNSLOTH_MEGA_CACHE_DIR={mega}"],
        capture_output=True, text=True, cwd=REPO, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "samples/s" in result.stdout and "resume 2 to first step" in result.stdout
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
    assert hf["checkpoint"]["mb"] > 0 and hf["checkpoint"]["seconds"] > 0
    resume = hf["resume"]
    assert resume["ended_at_step"] == resume["resumed_at_step"] + 1 == hf["checkpoint"]["step"] + 1
    assert resume["resume_to_first_step_s"] > resume["load_s"] > 0
    assert resume["compile"]["frames.total"] >= 0 and "inductor.fxgraph_cache_hit" in resume["compile"]
    assert set(resume["compile"]["cache_mb"]) >= {"TORCHINDUCTOR_CACHE_DIR", "UNSLOTH_MEGA_CACHE_DIR"}
    assert resume["compile"]["cache_messages"] == []  # nothing is compiled on the CPU path
    assert (tmp_path / "work" / "hf" / "pod-resume1" / "home").is_dir()  # each worker starts on an empty pod
    assert len(hf["resumes"]) == 3 and hf["resumes"][1]["ended_at_step"] == resume["ended_at_step"]
    profiled = hf["resume_profiled"]
    assert profiled["ended_at_step"] == resume["ended_at_step"]
    tree = (out.parent / "hf-resume-profile.txt").read_text()
    assert "Samples:" in tree and "run_all" in tree  # pyinstrument: the worker's wall-clock call tree
    assert (out.parent / "hf-resume-profile.pyisession").stat().st_size > 0  # the raw session, to render again
    with_env = hf["resumes"][2]  # --resume-env: one more resume, its variables reach the worker
    assert with_env["env"] == {"UNSLOTH_MEGA_CACHE_DIR": str(mega)} and with_env["ended_at_step"] == resume["ended_at_step"]
    assert with_env["compile"]["cache_mb"]["UNSLOTH_MEGA_CACHE_DIR"] == 1.0
    # the same checkpoint, data order and RNG state: every resume's first step has the same loss
    assert resume["loss"] > 0 and with_env["loss"] == pytest.approx(resume["loss"], rel=1e-4)
    assert "resume 3 with {'UNSLOTH_MEGA_CACHE_DIR'" in result.stdout
    profile = hf["profile"]
    assert profile["micro_batch"] == 2
    assert profile["vision_fwd_s"] > 0 and profile["language_fwd_s"] > 0 and profile["backward_s"] > 0
    generation = hf["generation"]
    assert generation["loop"]["samples_per_s"] > 0 and generation["batched"]["samples_per_s"] > 0
    assert generation["loop"]["new_tokens"] == generation["batched"]["new_tokens"] > 0  # greedy: same outputs
    assert generation["loop_first_call_s"] > 0 and generation["batched_first_call_s"] > 0  # untimed warm-ups
    auto = hf["autobatch"]
    assert (auto["micro_batch"], auto["gradient_accumulation_steps"]) == (2, 4)  # CPU rule
    assert auto["seed"]["samples_per_s"]["median"] > 0 and auto["seed"]["repeats"] == 2  # --tiny's repeats

    data = report["data_pipeline"]
    assert data["samples_per_s_per_worker"] > 0 and data["mean_tokens"] > 0


def test_cache_log_keeps_why_torch_compile_caches_missed():
    import logging

    log = bench.CacheLog()
    try:
        logging.getLogger("torch._functorch._aot_autograd.autograd_cache").info(
            "Bypassing autograd cache due to: %s", "Cannot pickle saved tensor hooks")
        logging.getLogger("torch._inductor.codecache").info("fx graph cache hit for key %s", "abc")
        assert log.messages == ["Bypassing autograd cache due to: Cannot pickle saved tensor hooks"]
    finally:
        for name in ("torch._functorch._aot_autograd.autograd_cache", "torch._inductor.codecache"):
            logging.getLogger(name).removeHandler(log)
