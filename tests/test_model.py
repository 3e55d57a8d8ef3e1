"""wellocr.model's device choices that can be checked without a GPU: the precision "auto" picks for a compute
capability (a pure function), and that a CUDA device is judged by its capability."""

import pytest
import torch

from wellocr import prices
from wellocr.model import precision_for_capability, resolve_precision


@pytest.mark.parametrize("capability, precision", [
    ((9, 0), "bf16"),  # H100, H200
    ((8, 9), "bf16"),  # RTX 4090, L4, L40S
    ((8, 6), "bf16"),  # RTX 3090, A10G
    ((8, 0), "bf16"),  # A100
    ((7, 5), "fp16"),  # T4: bf16 only emulated
    ((7, 0), "fp16"),  # V100
    (None, "fp32"),    # no GPU
])
def test_auto_precision_follows_the_compute_capability(capability, precision):
    assert precision_for_capability(capability) == precision


def test_every_gpu_the_multi_cloud_job_may_get_trains_in_bf16():
    for accelerator in ("RTX4090", "L4"):
        assert precision_for_capability(prices.COMPUTE_CAPABILITY[accelerator]) == "bf16"


def test_a_gpu_that_only_emulates_bf16_gets_fp16(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a T4 (emulation); auto must not pick bf16 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    assert resolve_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 9))
    assert resolve_precision("auto", "cuda") == "bf16"


def test_cpu_trains_in_fp32():
    assert resolve_precision("auto", "cpu") == resolve_precision("bf16", "cpu") == "fp32"
