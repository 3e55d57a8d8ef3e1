"""wellocr.flops: the FLOP accounting behind the MFU and HFU figures of docs/BENCHMARKS.md."""

from types import SimpleNamespace

import pytest

from wellocr import flops


def test_step_flops_by_hand():
    params = {"vision": 10, "merger": 4, "language": 100, "lm_head": 7}
    dims = {"merge": 4, "vision_width": 2, "vision_depth": 3, "text_width": 5, "text_layers": 2}
    # linear forward 2 x (10x8 patches + 4x8/4 visual tokens + (100 + 7) x 7 tokens) = 1674
    # attention forward 4x2x3x8^2 (vision, full) + 2x5x2x(3^2 + 4^2) (language, causal) = 2036
    model, hardware = flops.step_flops([3, 4], [8], params, dims, recompute=True)
    assert model == 2 * 1674 + 3 * 2036
    assert hardware == model + 2 * (10 * 8 + 100 * 7) + 2036  # one more forward of the checkpointed layers
    assert flops.step_flops([3, 4], [8], params, dims, recompute=False) == (model, model)


def test_parameter_groups_of_the_real_2b_architecture():
    """Counted on a meta-device model (no weights): every parameter lands in one group, the tied head once."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from wellocr.tiny import qwen3vl_config, train_tokenizer

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(qwen3vl_config("qwen3-vl-2b", train_tokenizer()))
    groups = flops.param_groups(model)
    assert sum(groups.values()) - groups["lm_head"] == 2_127_532_032  # the tied head is the embedding
    assert groups["lm_head"] == 151936 * 2048
    assert groups["embedding"] == 151936 * 2048 + 2304 * 1024  # token + vision position embeddings
    assert groups["lora"] == 0
    assert 1.3e9 < groups["language"] < 1.5e9 and 0.3e9 < groups["vision"] + groups["merger"] < 0.45e9
    assert flops.arch_dims(model) == {"text_layers": 28, "text_width": 2048, "vision_depth": 24,
                                      "vision_width": 1024, "merge": 4}


def test_four_bit_weights_count_at_their_unpacked_shape():
    import torch

    packed = torch.zeros(6, 1, dtype=torch.uint8)  # bitsandbytes keeps NF4 weights packed, two per byte
    packed.quant_state = SimpleNamespace(shape=torch.Size([4, 3]))
    assert flops.numel(packed) == 12
    assert flops.numel(torch.zeros(4, 3)) == 12


def test_utilization_against_the_peak_rate():
    assert flops.utilization(790e12, 2.0, flops.H200_BF16_FLOPS) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        flops.utilization(1.0, 0.0, flops.H200_BF16_FLOPS)
