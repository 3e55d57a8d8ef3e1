"""FLOP accounting of one Qwen3-VL QLoRA training step: model FLOPs (MFU) and hardware FLOPs (HFU).

Counted from the model's parameters (bitsandbytes 4-bit weights at their unpacked size; LoRA left out) and the
shapes fed, for a frozen base with gradients only for activations (QLoRA):

    model FLOPs    = 2 x linear_fwd + 3 x attn_fwd       (forward + activation gradients; no weight gradients)
    linear_fwd     = 2 x (vision params x patches + merger params x visual tokens
                          + (language params + lm_head params) x LM tokens)
    attn_fwd       = 4 x vision width x vision depth x sum(patches per image ^ 2)     (full attention per image)
                   + 2 x text width x text layers x sum(LM tokens per sequence ^ 2)    (causal)
    hardware FLOPs = model FLOPs + the gradient-checkpointing recompute, one more forward of the checkpointed
                     layers: 2 x (vision params x patches + language params x LM tokens) + attn_fwd
                     (not lm_head, mergers or embeddings)

visual tokens = patches / spatial_merge_size^2; a tied lm_head counts once, as a matmul (the embedding lookup
costs no FLOPs). MFU = model FLOPs / seconds / peak FLOP/s of the GPU; HFU the same with hardware FLOPs.
"""

from __future__ import annotations

import math
from typing import Any

H200_BF16_FLOPS = 790e12  # dense bf16 rate measured on one H200 (the rate docs/BENCHMARKS.md's MFU figures use)
GROUPS = ("vision", "merger", "language", "lm_head", "embedding", "lora")


def numel(param: Any) -> int:
    """Parameters of a tensor; bitsandbytes 4-bit weights count at their unpacked shape."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return param.numel()


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def param_groups(model: Any) -> dict[str, int]:
    """Frozen-base parameters by what they multiply: vision tower (x patches), mergers (x visual tokens), language
    layers and lm_head (x LM tokens); embeddings (lookups, no FLOPs) and LoRA reported apart."""
    counts = dict.fromkeys(GROUPS, 0)
    for name, param in model.named_parameters():
        dotted = f".{name}"
        n = numel(param)
        if "lora_" in name:
            counts["lora"] += n
        elif ".visual." in dotted:
            counts["merger" if "merger" in name else "embedding" if "pos_embed" in name else "vision"] += n
        elif ".language_model." in dotted:
            counts["embedding" if "embed_tokens" in name else "language"] += n
    counts["lm_head"] = numel(_base(model).get_output_embeddings().weight)  # a tied head once, as a matmul
    return counts


def arch_dims(model: Any) -> dict[str, int]:
    """The shapes attention FLOPs depend on, from the model's config."""
    config = _base(model).config
    text, vision = config.text_config, config.vision_config
    return {"text_layers": text.num_hidden_layers, "text_width": text.num_attention_heads * text.head_dim,
            "vision_depth": vision.depth, "vision_width": vision.hidden_size,
            "merge": vision.spatial_merge_size ** 2}


def step_flops(lm_lengths: list[int], image_patches: list[int], params: dict[str, int], dims: dict[str, int],
               recompute: bool) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one optimizer step over these sequences (LM tokens each, visual tokens
    included) and images (patches each); recompute: gradient checkpointing is on."""
    patches, tokens = sum(image_patches), sum(lm_lengths)
    vision = params["vision"] * patches
    language = params["language"] * tokens
    linear_fwd = 2 * (vision + params["merger"] * patches / dims["merge"] + language + params["lm_head"] * tokens)
    attn_fwd = (4 * dims["vision_width"] * dims["vision_depth"] * sum(n * n for n in image_patches)
                + 2 * dims["text_width"] * dims["text_layers"] * sum(s * s for s in lm_lengths))
    model = 2 * linear_fwd + 3 * attn_fwd
    recomputed = 2 * (vision + language) + attn_fwd if recompute else 0.0
    return float(model), float(model + recomputed)


def utilization(flops: float, seconds: float, peak_flops: float) -> float:
    """Fraction of the GPU's peak rate these FLOPs reached in these seconds (MFU for model FLOPs, HFU for
    hardware FLOPs)."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"seconds and peak_flops must be positive, got {seconds} and {peak_flops}")
    return flops / seconds / peak_flops
