"""`per_device_train_batch_size: auto`: divisor logic, the CPU rule, OOM probing (plain functions), the memory cap,
and one real probe through the project's trainer on the tiny model."""

import pytest
import torch
import yaml

from conftest import smoke_settings
from wellocr import autobatch as A
from wellocr.data import sample_lengths


def oom_above(limit: int, tried: list[int]):
    def probe(micro: int) -> None:
        tried.append(micro)
        if micro > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {micro} GiB")

    return probe


def test_candidates_are_the_divisors_of_the_effective_batch_largest_first():
    assert A.micro_batch_candidates(8) == [8, 4, 2, 1]
    assert A.micro_batch_candidates(6) == [6, 3, 2, 1]
    assert A.micro_batch_candidates(1) == [1]
    with pytest.raises(ValueError):
        A.micro_batch_candidates(0)


@pytest.mark.parametrize("effective, expected", [(8, (2, 4)), (6, (2, 3)), (3, (1, 3)), (1, (1, 1))])
def test_cpu_means_two_without_probing(effective, expected):
    def probe(micro):
        raise AssertionError("no probing on CPU")

    assert A.choose_micro_batch(probe, effective, device="cpu") == expected


@pytest.mark.parametrize("effective, limit, expected, tried", [
    (8, 3, (2, 4), [8, 4, 2]),
    (8, 100, (8, 1), [8]),
    (12, 5, (4, 3), [12, 6, 4]),
    (8, 1, (1, 8), [8, 4, 2, 1]),
])
def test_picks_the_largest_micro_batch_that_fits_and_keeps_the_effective_batch(effective, limit, expected, tried):
    calls: list[int] = []
    micro, accumulation = A.choose_micro_batch(oom_above(limit, calls), effective, device="cuda", budget_gb=24)
    assert (micro, accumulation) == expected
    assert micro * accumulation == effective
    assert calls == tried


@pytest.mark.parametrize("exc, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (torch.OutOfMemoryError("no message of the usual form"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 23.65 GiB total capacity)"), True),
    (RuntimeError("CUDA out of memory (bitsandbytes)"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), False),
    (ValueError("not a memory problem"), False),
])
def test_one_oom_rule_for_the_probe_and_the_training_loop(exc, oom):
    from wellocr import training

    assert A.is_oom(exc) is oom
    assert training.is_oom is A.is_oom  # the training loop's OOM adaptation uses the same rule


def test_bitsandbytes_style_runtime_oom_counts_and_other_errors_propagate():
    def runtime_oom(micro):
        if micro > 2:
            raise RuntimeError("CUDA out of memory (bitsandbytes)")

    assert A.choose_micro_batch(runtime_oom, 8, device="cuda") == (2, 4)

    def broken(micro):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        A.choose_micro_batch(broken, 8, device="cuda")


def test_nothing_fits_is_an_error():
    with pytest.raises(A.AutoBatchError, match="micro-batch 1"):
        A.choose_micro_batch(oom_above(0, []), 8, device="cuda", budget_gb=24)


def test_budget_sets_the_memory_fraction_while_probing_and_restores_it(monkeypatch):
    calls = []

    class Props:
        total_memory = 141 * A.GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: Props())
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=0: 0.5, raising=False)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device=0: calls.append(f))

    seen = []
    assert A.choose_micro_batch(lambda micro: seen.append(calls[-1]), 8, device="cuda", budget_gb=24) == (8, 1)
    assert seen == [pytest.approx(24 / 141)]
    assert calls[-1] == 0.5  # restored

    calls.clear()
    # default: what this process may use (here half the GPU: a WELLOCR_GPU_MEMORY_GB cap) minus the headroom
    A.choose_micro_batch(lambda micro: None, 8, device="cuda")
    assert calls[0] == pytest.approx(0.5 * (1 - A.HEADROOM))


def test_worst_case_is_the_longest_row_then_the_largest_image():
    assert A.worst_case_index([10, 30, 30, 5], [(1, 1), (10, 10), (20, 10), (99, 99)]) == 2
    with pytest.raises(ValueError):
        A.worst_case_index([], [])


def test_probe_trains_one_real_step_then_restores_the_adapter(tiny_model_dir, synth_data_dir, tmp_path):
    from wellocr.config import config_from_dict
    from wellocr.model import Backend, load_for_training
    from wellocr.rundir import RunDir
    from wellocr.training import prepare_data, probe_trainer_factory

    settings = smoke_settings(tiny_model_dir, synth_data_dir, tmp_path / "runs")
    cfg = config_from_dict(yaml.safe_load(yaml.safe_dump(settings)), "test")
    backend = Backend("hf", "cpu", "test")
    model, processor = load_for_training(cfg, backend, "fp32")
    run = RunDir(tmp_path / "runs" / "probe")
    data = prepare_data(cfg, processor, run)
    make = probe_trainer_factory(cfg, run, backend, "fp32", model, processor, data)

    lengths = sample_lengths(data.splits["train"], cfg.data, processor)
    rows = A.worst_case_rows(data.splits["train"], cfg.data, processor, data.datasets["train"], 3)
    assert len(rows) == 3 and {"prompt", "completion", "images"} <= set(rows[0])
    assert len({r["row_index"] for r in rows}) == 1 and lengths[rows[0]["row_index"]] == max(lengths)

    trainers = []
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    A.training_probe(lambda micro: trainers.append(make(micro)) or trainers[-1])(2)
    [trainer] = trainers
    assert trainer.state.global_step == 1 and trainer.args.per_device_train_batch_size == 2  # a real step ran
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)  # restored
    assert not list(run.path.glob("checkpoint-*"))  # the probe saves nothing
    assert A.choose_micro_batch(A.training_probe(make), 8, device="cpu") == (2, 4)
