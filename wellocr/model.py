"""Model backends: Unsloth (CUDA) and transformers + PEFT (CPU or CUDA), behind one loading function each way.

- `unsloth`: `FastVisionModel` 4-bit loading and LoRA; its collator with an explicit image size.
- `hf`: `AutoModelForImageTextToText` (bitsandbytes NF4 + double quantisation + bf16 compute on CUDA with
  `load_in_4bit`; full precision on CPU) and PEFT LoRA on the same modules Unsloth targets.

Unsloth patches transformers, TRL and PEFT when imported, so `import_backend` must run before any of them is
imported in the process that trains; this module imports them only inside functions for that reason.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wellocr.config import Config, LoraConfig, ModelConfig
from wellocr.errors import UserError

log = logging.getLogger("wellocr")

# Qwen3-VL module names: vision blocks and language layers (the mergers stay frozen, as with Unsloth).
_VISION = r"model\.visual\.blocks\.\d+\."
_LANGUAGE = r"model\.language_model\.layers\.\d+\."
_VISION_ATTN, _VISION_MLP = r"attn\.(qkv|proj)", r"mlp\.(linear_fc1|linear_fc2)"
_LANGUAGE_ATTN, _LANGUAGE_MLP = r"self_attn\.(q_proj|k_proj|v_proj|o_proj)", r"mlp\.(gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class Backend:
    name: str  # "unsloth" | "hf"
    device: str  # "cuda" | "cpu"
    reason: str

    def __str__(self) -> str:
        return f"{self.name} on {self.device} ({self.reason})"


def select_backend(cfg: ModelConfig) -> Backend:
    """Pick the backend without importing transformers (Unsloth must come first)."""
    import torch

    cuda = torch.cuda.is_available()
    unsloth_installed = importlib.util.find_spec("unsloth") is not None
    device = "cuda" if cuda else "cpu"
    if cfg.backend == "unsloth":
        if not cuda:
            raise UserError("model.backend: unsloth needs a CUDA GPU and none is visible; use backend: hf (or auto)")
        if not unsloth_installed:
            raise UserError("model.backend: unsloth is not installed; pip install 'wellocr[gpu]' or use backend: hf")
        return Backend("unsloth", device, "requested in the config")
    if cfg.backend == "hf":
        return Backend("hf", device, "requested in the config")
    if cuda and unsloth_installed:
        return Backend("unsloth", device, "auto: CUDA GPU and unsloth installed")
    if cuda:
        return Backend("hf", device, "auto: unsloth not installed (pip install 'wellocr[gpu]')")
    return Backend("hf", device, "auto: no CUDA GPU, and unsloth is GPU-only")


# Where compiled code goes; Unsloth reads its variables at import, so these are set before `import unsloth`.
# inductor holds the FX-graph, AOTAutograd and dynamic-shape (PGO) caches; mega is Unsloth's bundle of them.
COMPILE_CACHE_ENV = {"UNSLOTH_COMPILE_LOCATION": "unsloth", "TORCHINDUCTOR_CACHE_DIR": "inductor",
                     "TRITON_CACHE_DIR": "triton", "UNSLOTH_MEGA_CACHE_DIR": "mega"}
BYTECODE_SUBDIR = "bytecode"  # Python's own (.pyc), where the environment has none: see bytecode_env
# AOTAutograd's cache skips every graph that calls a custom autograd.Function unless told otherwise; two of the
# graphs Unsloth compiles do, and each restart re-traced them (~11 s on the H200; docs/BENCHMARKS.md). The Function's
# forward and backward are traced into the graph, so they are part of its cache key. Read when torch is imported.
# Dynamo compiles a graph for the first sequence length it sees and a dynamic one at the second; its profile of
# which sizes were dynamic (PGO) is kept beside the inductor cache only under a job id. With one, a restarted process
# compiles the dynamic graph the cache already holds instead of a new one for its first batch's length (three FX
# graphs missed the cache that way in some restarts). The cache folder is the run's, so one fixed id is enough.
COMPILE_CACHE_SETTINGS = {"TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD": "1", "TORCH_COMPILE_JOB_ID": "wellocr"}


def compile_cache_env(root: Path) -> dict[str, str]:
    """The environment that keeps the compile caches under `root` (COMPILE_CACHE_ENV, COMPILE_CACHE_SETTINGS, and
    bytecode_env); use_compile_cache applies it to this process, the bench hands it to its workers."""
    dirs = {variable: str(Path(root) / sub) for variable, sub in COMPILE_CACHE_ENV.items()}
    return {**dirs, **COMPILE_CACHE_SETTINGS, **bytecode_env(root)}


def use_compile_cache(root: Path) -> dict[str, str]:
    """Point Unsloth's, inductor's and Triton's caches, and Python's bytecode where the environment has none, into
    `root`, and let AOTAutograd cache what Unsloth compiles (COMPILE_CACHE_SETTINGS), unless the environment already
    says otherwise.

    A restarted spot job then finds its compiled code on the checkpoint volume: Unsloth's first step took 104-119 s
    cold and 24-28 s warm on the H200 (docs/BENCHMARKS.md). Call before importing torch. Returns what it set.
    """
    wanted = compile_cache_env(root)
    write_bytecode = wanted.pop("PYTHONDONTWRITEBYTECODE", None) is not None  # bytecode_env: write under the prefix
    set_now = {}
    for variable, value in wanted.items():
        if not os.environ.get(variable):
            os.environ[variable] = set_now[variable] = value
    if write_bytecode:  # Python reads these at start-up: this process is told directly, the ones it starts by the env
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        sys.pycache_prefix, sys.dont_write_bytecode = os.environ["PYTHONPYCACHEPREFIX"], False
    return set_now


def bytecode_env(root: Path, module: str = "torch") -> dict[str, str]:
    """The environment that keeps Python's bytecode under `root`, where `module` (torch) has none beside its sources.

    Images built without bytecode and with PYTHONDONTWRITEBYTECODE (the H200's) make every process compile ~3,000
    modules from source (import unsloth: 32-35 s, 18-19 s with the bytecode kept). Where the bytecode exists, as
    after a plain pip install, moving it would only add a first compile and, on a network volume, slower reads.
    {} also when the environment already sets PYTHONPYCACHEPREFIX."""
    spec = importlib.util.find_spec(module)
    if os.environ.get("PYTHONPYCACHEPREFIX") or spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return {}
    if os.path.exists(importlib.util.cache_from_source(spec.origin)):
        return {}
    return {"PYTHONPYCACHEPREFIX": str(Path(root) / BYTECODE_SUBDIR), "PYTHONDONTWRITEBYTECODE": ""}


def compile_cache_dir(cfg: Config) -> Path:
    return Path(cfg.run.compile_cache_dir or Path(cfg.run.output_dir) / ".compile-cache")


def import_backend(backend: Backend) -> None:
    """Import Unsloth before transformers/TRL/PEFT so its patches apply (else it warns and runs slower)."""
    if backend.name == "unsloth":
        inductor_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        import unsloth  # noqa: F401

        # Unsloth's import drops TORCHINDUCTOR_CACHE_DIR (unsloth_zoo.patching_utils.patch_torch_compile), which
        # sends inductor's caches to /tmp, lost with the pod. Inductor reads the variable at each use.
        if inductor_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
    freeze_heap()


def freeze_heap() -> None:
    """Take every object alive now out of the cyclic garbage collector's walks (gc.freeze), after collecting.

    Imports and the model leave millions of long-lived objects, and Unsloth calls gc.collect() dozens of times
    while it loads and starts training: in one restart on the H200, 39 calls took 9.4 s (docs/BENCHMARKS.md).
    """
    gc.collect()
    gc.freeze()


BF16_CAPABILITY = (8, 0)  # Ampere and newer: bf16 in hardware


def precision_for_capability(capability: tuple[int, int] | None) -> str:
    """The "auto" precision for a device of this CUDA compute capability (None: no GPU): bf16 from Ampere (8.0) on,
    fp16 before it, fp32 on CPU. By capability, not `torch.cuda.is_bf16_supported()`: that also says yes where bf16
    is only emulated (a T4, 7.5), which trains several times slower than fp16."""
    if capability is None:
        return "fp32"
    return "bf16" if tuple(capability) >= BF16_CAPABILITY else "fp16"


def resolve_precision(precision: str, device: str) -> str:
    """"auto" → bf16 where the GPU supports it in hardware, else fp16 on CUDA, fp32 on CPU."""
    import torch

    if device != "cuda":
        if precision in ("bf16", "fp16"):
            log.warning("train.precision %s needs CUDA; using fp32 on CPU", precision)
        return "fp32"
    if precision == "auto":
        return precision_for_capability(torch.cuda.get_device_capability())
    if precision == "bf16" and precision_for_capability(torch.cuda.get_device_capability()) != "bf16":
        log.warning("train.precision bf16 on a GPU of compute capability %s.%s: emulated, slow; auto picks fp16",
                    *torch.cuda.get_device_capability())
    return precision


def lora_target_regex(lora: LoraConfig) -> str:
    """PEFT `target_modules` regex that follows the finetune_* flags the way Unsloth's does."""
    parts = []
    if lora.finetune_vision_layers:
        wanted = ((_VISION_ATTN, lora.finetune_attention_modules), (_VISION_MLP, lora.finetune_mlp_modules))
        mods = [m for m, on in wanted if on]
        parts.append(_VISION + "(" + "|".join(mods) + ")")
    if lora.finetune_language_layers:
        wanted = ((_LANGUAGE_ATTN, lora.finetune_attention_modules), (_LANGUAGE_MLP, lora.finetune_mlp_modules))
        mods = [m for m, on in wanted if on]
        parts.append(_LANGUAGE + "(" + "|".join(mods) + ")")
    return r"^(.*\.)?(" + "|".join(parts) + r")$"


def _torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def _gradient_checkpointing(cfg: ModelConfig) -> Any:
    return {"unsloth": "unsloth", "true": True, "false": False}[cfg.use_gradient_checkpointing]


def load_for_training(cfg: Config, backend: Backend, precision: str) -> tuple[Any, Any]:
    """Base model + fresh LoRA adapter (seeded) + processor with the OCR pixel budget."""
    if backend.name == "unsloth":
        model, processor = _unsloth_for_training(cfg)
    else:
        model, processor = load_base_model(cfg, backend, precision)
        model = _add_lora(model, cfg, backend)
    freeze_heap()
    return model, processor


def load_base_model(cfg: Config, backend: Backend, precision: str) -> tuple[Any, Any]:
    """The frozen base model and processor (hf backend, or unsloth for inference), from a hub id or directory."""
    from wellocr.processing import load_processor
    from wellocr.retry import network_retry

    if backend.name == "unsloth":
        return _unsloth_base(cfg)
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"revision": cfg.model.model_revision, "dtype": _torch_dtype(precision)}
    if backend.device == "cuda":
        import torch

        kwargs["device_map"] = {"": torch.cuda.current_device()}  # each data-parallel rank on its own GPU
        if cfg.model.load_in_4bit:
            kwargs["quantization_config"] = _bnb_config(precision)
    elif cfg.model.load_in_4bit:
        log.info("model.load_in_4bit ignored on CPU (bitsandbytes 4-bit needs CUDA); loading full precision")
    loader = network_retry()(AutoModelForImageTextToText.from_pretrained)
    model = _from_pretrained(loader, cfg.model.model_name, **kwargs)
    processor = network_retry()(load_processor)(
        cfg.model.model_name, cfg.model.model_revision, cfg.data.min_pixels, cfg.data.max_pixels
    )
    return model, processor


def _from_pretrained(loader, name: str, **kwargs) -> Any:
    try:
        return loader(name, **kwargs)
    except OSError as exc:
        raise UserError(f"model.model_name: cannot load '{name}': {str(exc).splitlines()[0]}") from None


def _bnb_config(precision: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_torch_dtype(precision if precision != "fp32" else "bf16"),
        # Unsloth keeps the vision tower in 16-bit; do the same so both backends train the same model.
        llm_int8_skip_modules=["lm_head", "model.visual"],
    )


def _add_lora(model: Any, cfg: Config, backend: Backend) -> Any:
    import transformers
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    checkpointing = bool(_gradient_checkpointing(cfg.model))
    if backend.device == "cuda" and cfg.model.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    transformers.set_seed(cfg.train.seed)  # the adapter's initial weights follow the run's seed
    lora = cfg.lora
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias="none",
        target_modules=lora_target_regex(lora),
    )
    return get_peft_model(model, peft_config)


def rank_device_map() -> dict[str, Any]:
    """A data-parallel rank (torchrun's WORLD_SIZE > 1) loads onto its own GPU; one process keeps Unsloth's own
    placement."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    import torch

    return {"device_map": {"": torch.cuda.current_device()}}


def _unsloth_base(cfg: Config) -> tuple[Any, Any]:
    from unsloth import FastVisionModel

    from wellocr.processing import set_pixel_budget

    model, processor = FastVisionModel.from_pretrained(
        model_name=cfg.model.model_name,
        revision=cfg.model.model_revision,
        load_in_4bit=cfg.model.load_in_4bit,
        use_gradient_checkpointing=_gradient_checkpointing(cfg.model),
        max_seq_length=cfg.train.max_seq_length,
        **rank_device_map(),
    )
    set_pixel_budget(processor, cfg.data.min_pixels, cfg.data.max_pixels)
    return model, processor


def _unsloth_for_training(cfg: Config) -> tuple[Any, Any]:
    from unsloth import FastVisionModel

    model, processor = _unsloth_base(cfg)
    lora = cfg.lora
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=lora.finetune_vision_layers,
        finetune_language_layers=lora.finetune_language_layers,
        finetune_attention_modules=lora.finetune_attention_modules,
        finetune_mlp_modules=lora.finetune_mlp_modules,
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias="none",
        random_state=cfg.train.seed,
        use_rslora=False,
        loftq_config=None,
        use_gradient_checkpointing=_gradient_checkpointing(cfg.model),
    )
    FastVisionModel.for_training(model)
    return model, processor


def load_for_inference(cfg: Config, backend: Backend, precision: str, adapter_dir: Path | None) -> tuple[Any, Any]:
    """Base model, plus the adapter in `adapter_dir` when given (None = the base model alone), in eval mode."""
    model, processor = load_base_model(cfg, backend, precision)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    if backend.name == "unsloth":
        from unsloth import FastVisionModel

        FastVisionModel.for_inference(model)
    model.eval()
    freeze_heap()
    return model, processor


def trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
