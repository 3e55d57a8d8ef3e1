"""The project's one way to load a Qwen3-VL processor, with an OCR pixel budget.

Processor class choice: with torchvision installed (the GPU images), `AutoProcessor.from_pretrained` gives the
stock `Qwen3VLProcessor`. Without it (the CPU torch wheel, where PyPI torchvision does not import), that call
fails on the video processor, which needs torchvision, and `Qwen3VLProcessor(video_processor=None)` fails too.
Well-log headers are still images, so the CPU path uses `ImageOnlyQwen3VLProcessor`: the stock processor minus
the video processor, built from `AutoImageProcessor` (which falls back to the PIL image processor,
bit-identical pixel values), `AutoTokenizer` and the chat template. Both paths produce the same `input_ids`,
`pixel_values`, `image_grid_thw` and `mm_token_type_ids`, so TRL's SFTTrainer and `model.generate` don't care
which one they get.

The pixel budget decides how many visual tokens a scan costs, so callers set it here, once, rather than relying
on the checkpoint's default (up to 16384 tokens per image for the real model).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.utils import is_torchvision_available

from wellocr.errors import UserError

STOCK_PROCESSOR_CLASS = "Qwen3VLProcessor"
VIDEO_PROCESSOR_CONFIG = "video_preprocessor_config.json"


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without a video processor, for machines without torchvision.

    `ProcessorMixin` derives the sub-processor list from this `__init__` signature (image_processor, tokenizer),
    so `video_processor` is neither required, loaded, nor saved, and `__call__` skips videos because the
    attribute does not exist. Saved files name the stock `Qwen3VLProcessor` and its video processor, so a
    directory saved here is laid out like a stock checkpoint for `AutoProcessor` on a machine with torchvision.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent passes (image_processor, tokenizer, None) positionally; ProcessorMixin pairs them with
        # get_attributes() == ["image_processor", "tokenizer"], so the video slot is dropped.
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["processor_class"] = STOCK_PROCESSOR_CLASS
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        saved = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        save_directory = Path(save_directory)
        _rename_processor_class(save_directory / "tokenizer_config.json")
        self.tokenizer._set_processor_class(STOCK_PROCESSOR_CLASS)
        _write_video_config(save_directory / VIDEO_PROCESSOR_CONFIG, self.image_processor)
        return saved


def _rename_processor_class(tokenizer_config: Path) -> None:
    """`ProcessorMixin.save_pretrained` stamps the subclass name into the tokenizer config; undo that."""
    if not tokenizer_config.is_file():
        return
    cfg = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    if cfg.get("processor_class") not in (None, STOCK_PROCESSOR_CLASS):
        cfg["processor_class"] = STOCK_PROCESSOR_CLASS
        tokenizer_config.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_video_config(path: Path, image_processor) -> None:
    """Name Qwen3-VL's video processor, which a torchvision machine's `AutoProcessor` needs.

    Without this file `AutoVideoProcessor` infers `Qwen2VLVideoProcessor` from the image processor's type.
    Video sizes and frame sampling keep `Qwen3VLVideoProcessor`'s defaults.
    """
    if path.exists():
        return
    cfg = {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": STOCK_PROCESSOR_CLASS,
        "patch_size": image_processor.patch_size,
        "temporal_patch_size": image_processor.temporal_patch_size,
        "merge_size": image_processor.merge_size,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def load_processor(
    name_or_path: str,
    revision: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """Load the processor for a hub id or local directory and apply the pixel budget, if given."""
    name_or_path = str(name_or_path)
    kwargs = {} if revision is None else {"revision": revision}
    if is_torchvision_available():
        processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
    else:
        processor = _load_image_only(name_or_path, **kwargs)
    set_pixel_budget(processor, min_pixels=min_pixels, max_pixels=max_pixels)
    return processor


def _load_image_only(name_or_path: str, **kwargs) -> ImageOnlyQwen3VLProcessor:
    """`ProcessorMixin.from_pretrained` loads each sub-processor through its Auto class (AutoImageProcessor falls
    back to the PIL class) and the chat template from wherever the checkpoint keeps it."""
    processor = ImageOnlyQwen3VLProcessor.from_pretrained(name_or_path, **kwargs)
    if processor.chat_template is None:
        processor.chat_template = getattr(processor.tokenizer, "chat_template", None)
    return processor


def set_pixel_budget(processor, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Bound the resized image area (total pixels), which fixes the visual-token count per image.

    Goes through `size` because Qwen's processors read their bounds from it, and Unsloth makes the
    `max_pixels` attribute read-only.
    """
    if min_pixels is None and max_pixels is None:
        return
    image_processor = processor.image_processor
    size = dict(image_processor.size)
    lo = size["shortest_edge"] if min_pixels is None else int(min_pixels)
    hi = size["longest_edge"] if max_pixels is None else int(max_pixels)
    if not 0 < lo <= hi:
        raise UserError(f"need 0 < min_pixels <= max_pixels, got min_pixels={lo}, max_pixels={hi}")
    image_processor.size = {"shortest_edge": lo, "longest_edge": hi}


def count_image_tokens(processor, width: int, height: int) -> int:
    """How many `<|image_pad|>` tokens a width x height image becomes, without decoding any pixels.

    Mirrors the image processor: `smart_resize` to a multiple of patch*merge within the pixel bounds, then one
    token per merge x merge block of patches. Lets the data scan size sequences from image headers alone.
    Size sequences with this, not with max_pixels: `smart_resize` keeps each side at least patch*merge (32 px), so
    a thin strip (say 1700 x 90 under a 16-token budget) comes out at 17 tokens, over the budget.
    """
    ip = processor.image_processor
    patch, merge = ip.patch_size, ip.merge_size
    h, w = smart_resize(
        height,
        width,
        factor=patch * merge,
        min_pixels=ip.size["shortest_edge"],
        max_pixels=ip.size["longest_edge"],
    )
    return (h // patch) * (w // patch) // (merge * merge)

