"""TRL's SFTTrainer with the one CPU-only branch of the training path.

trl 1.15 (Unsloth's pin) computes the loss with a fused, chunked LM-head kernel written in Triton, which needs a
GPU; on CPU it fails (`'NoneType' object has no attribute 'apply'`). There the trainer falls back to the model's
standard causal-LM loss (transformers' `Trainer.compute_loss`: mean over label tokens, gradient-accumulation
aware). On CUDA it is TRL's (or Unsloth's patched) loss, unchanged.
"""

from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer


def fused_loss_supported(device_type: str) -> bool:
    return device_type in ("cuda", "xpu")


class WellocrSFTTrainer(SFTTrainer):
    """`generation_eval(model, step) -> dict` (optional) adds generation-based metrics (eval/cer, eval/wer) to
    every evaluation: the eval loss alone says little about transcription quality."""

    generation_eval = None

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if self.generation_eval is not None:
            extra = self.generation_eval(self.model, self.state.global_step)
            if extra:
                self.log(extra)
                metrics.update(extra)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if fused_loss_supported(self.args.device.type):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = {**inputs, "use_cache": False}
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
