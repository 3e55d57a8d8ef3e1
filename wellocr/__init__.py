"""wellocr: fine-tune Qwen3-VL to read scanned well-log headers, on spot GPUs."""

__version__ = "0.1.0"
