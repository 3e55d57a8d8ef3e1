"""An offline, random-weight Qwen3-VL: "tiny" for tests and the CPU smoke run, "qwen3-vl-2b" for GPU benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a built-in well-log corpus, the chat
template is the real Qwen3-VL one that TRL ships, and the weights come from a seeded random init. The token
ids (image, vision start/end, eos, pad) in the model config are read from that tokenizer, so the model,
processor and generation config agree the way a real checkpoint's do.

`build_tiny_model` builds into a temporary sibling directory and renames it into place as its last step, so an
interrupted build never leaves a half model at `out_dir`. A directory that already holds a complete build of the
same arch and seed is returned unchanged (builds are deterministic, so rebuilding would change nothing).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import GenerationConfig, Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # Qwen's split: one token per digit
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from wellocr.errors import UserError
from wellocr.processing import ImageOnlyQwen3VLProcessor

ARCHES = ("tiny", "qwen3-vl-2b")
BUILD_MARKER = "wellocr_build.json"  # written last: its presence means the directory is complete

# Qwen's added tokens, in Qwen's order (ids 151643.. in the real tokenizer; here they follow the BPE vocab).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_CORPUS = """\
COMPANY: ACME PETROLEUM CORPORATION
WELL: SMITH RANCH No. 1-23H
FIELD: WILDCAT
COUNTY: KERN  STATE: CALIFORNIA  COUNTRY: USA
API: 42-501-20130-00-00
LOCATION: SEC 23 T12S R34E  1980 FNL 660 FEL
PERMANENT DATUM: GL  ELEV: 3456.0 ft
LOG MEASURED FROM: KB  12.5 ft ABOVE PERM. DATUM
DRILLING MEASURED FROM: KB
ELEV KB 3468.5 ft  DF 3467.5 ft  GL 3456.0 ft
DATE: 03/14/1987  RUN No. ONE  TYPE LOG: DUAL INDUCTION / SFL / GR
DEPTH DRILLER 10250 ft  DEPTH LOGGER 10246 ft
BTM LOGGED INTERVAL 10240 ft  TOP LOGGED INTERVAL 2500 ft
CASING DRILLER 9 5/8 in @ 2510 ft  CASING LOGGER 2508 ft
BIT SIZE 8 3/4 in
TYPE FLUID IN HOLE: WATER BASE MUD  GEL CHEM
DENSITY 9.6 lb/gal  VISCOSITY 42 s  PH 9.5  FLUID LOSS 6.2 ml
SOURCE OF SAMPLE: FLOWLINE
RM @ MEAS TEMP 1.25 ohm-m @ 72 degF
RMF @ MEAS TEMP 0.98 ohm-m @ 70 degF
RMC @ MEAS TEMP 1.60 ohm-m @ 71 degF
RM @ BHT 0.52 ohm-m @ 185 degF
MAX REC TEMP 185 degF  TIME SINCE CIRC 6 HR
EQUIP No. 4471  LOCATION: ODESSA
RECORDED BY: J. GARCIA  WITNESSED BY: R. MILLER
OTHER SERVICES: CNL / FDC, BHC SONIC, DIPMETER
0 1 2 3 4 5 6 7 8 9 10 100 1000 0.5 3.14 -42 +7 (1) [2] {3} #4 5% 6/7 8:9 a,b;c
"""

# Words of the chat template and the project's prompts, so the template's frame tokenizes compactly.
_CHAT_WORDS = """\
system user assistant tool You are a helpful assistant.
Read the well log header in this image. Transcribe the header fields exactly.
Picture Video tool_call tool_response name arguments function Tools
"""


def train_tokenizer(vocab_size: int = 600) -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen's pre-tokenizer and special tokens, trained on the built-in corpus.

    Special tokens go into the vocab before the tokenizer is constructed so they get consecutive ids after the
    BPE vocab in Qwen's order; added afterwards, eos/pad would be numbered in registration order instead.
    """
    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = (_CORPUS + _CHAT_WORDS).splitlines()
    bpe.train_from_iterator(lines * 4 + [line.lower() for line in lines], trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    merges = [tuple(m) for m in model["merges"]]  # JSON gives lists; the BPE model wants pairs
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )


def qwen3_vl_chat_template() -> str:
    """The real Qwen3-VL template as TRL ships it (TRL is a project dependency, so no download)."""
    return (importlib.resources.files("trl") / "chat_templates" / "qwen3_vl.jinja").read_text(encoding="utf-8")


_ID_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "eos_token_id": "<|im_end|>",
    "pad_token_id": "<|endoftext|>",
}


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _ID_TOKENS.items()}
    missing = [name for name, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks Qwen3-VL special tokens: {missing}")
    return ids


def _arch_dims(arch: str, vocab_size: int) -> tuple[dict, dict]:
    """(text, vision) sizes; 2b is Qwen3-VL-2B-Instruct's published architecture."""
    if arch == "tiny":
        text = dict(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5],
                             "mrope_interleaved": True},
        )
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                      num_position_embeddings=256, deepstack_visual_indexes=[1])
    elif arch == "qwen3-vl-2b":
        text = dict(
            vocab_size=151936,  # rows past the tokenizer's ids are unused, as in the real checkpoint
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True},
        )
        vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                      num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])
    else:
        raise UserError(f"unknown model arch {arch!r}; choose one of {', '.join(ARCHES)}")
    text.update(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True)
    vision.update(hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3)
    return text, vision


def qwen3vl_config(arch: str, tokenizer) -> Qwen3VLConfig:
    """The model config for `arch`, with every special-token id taken from `tokenizer`."""
    ids = _token_ids(tokenizer)
    text, vision = _arch_dims(arch, vocab_size=len(tokenizer))
    # The tokenizer has no BOS (as Qwen's has none); eos and pad sit on the top-level config too, where the
    # Trainer compares them with the tokenizer's (transformers.trainer_utils.align_special_tokens), so the
    # trainer finds nothing to align and nothing to warn about.
    tokens = dict(bos_token_id=None, eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    text.update(tokens)
    # transformers defaults to untied embeddings: that would add a 151936 x 2048 lm_head (~311 M) to the 2b.
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=True,
        **tokens,
    )


def image_processor_for(arch: str) -> Qwen2VLImageProcessorPil:
    """Qwen3-VL's image preprocessing; the tiny default budget (4..64 visual tokens) keeps CPU tests fast."""
    if arch == "tiny":
        size = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}
    else:  # the real checkpoint's bounds: 64..16384 visual tokens
        size = {"shortest_edge": 65536, "longest_edge": 16777216}
    return Qwen2VLImageProcessorPil(
        size=size,
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _random_model(cfg: Qwen3VLConfig, seed: int, dtype: torch.dtype) -> Qwen3VLForConditionalGeneration:
    """Seeded init that leaves the caller's global RNG state alone."""
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(cfg)
    return model.eval()


def _generation_config(cfg: Qwen3VLConfig) -> GenerationConfig:
    """Greedy, stopping at `<|im_end|>` like the instruct model's chat turns."""
    text = cfg.text_config
    return GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                            pad_token_id=text.pad_token_id)


def _write_build(out: Path, arch: str, seed: int) -> None:
    tokenizer = train_tokenizer()
    chat_template = qwen3_vl_chat_template()
    tokenizer.chat_template = chat_template
    cfg = qwen3vl_config(arch, tokenizer)
    dtype = torch.float32 if arch == "tiny" else torch.bfloat16
    model = _random_model(cfg, seed, dtype)
    model.generation_config = _generation_config(cfg)
    model.save_pretrained(out)
    processor = ImageOnlyQwen3VLProcessor(
        image_processor=image_processor_for(arch), tokenizer=tokenizer, chat_template=chat_template
    )
    processor.save_pretrained(out)
    (out / BUILD_MARKER).write_text(json.dumps({"arch": arch, "seed": seed}) + "\n")


def _existing_build(out: Path, arch: str, seed: int) -> bool:
    """True if `out` is a complete build of this arch and seed; refuses to touch anything else that is there."""
    if not out.exists():
        return False
    marker = out / BUILD_MARKER
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built == {"arch": arch, "seed": seed}:
            return True
        raise UserError(f"{out} already holds a {built['arch']} model with seed {built['seed']}; "
                        f"pick another directory for {arch} seed {seed}")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory (e.g. made by the caller) is free to take
        return False
    raise UserError(f"{out} exists and is not a wellocr model build; remove it or pick another directory")


def build_tiny_model(out_dir, seed: int = 0, arch: str = "tiny") -> Path:
    """Write a random-weight Qwen3-VL, its tokenizer, chat template and image processor to `out_dir`."""
    out = Path(out_dir).absolute()
    if arch not in ARCHES:
        raise UserError(f"unknown model arch {arch!r}; choose one of {', '.join(ARCHES)}")
    if _existing_build(out, arch, seed):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; out_dir should look like any other directory
        _write_build(tmp, arch, seed)
        try:
            tmp.rename(out)
        except OSError:
            if not _existing_build(out, arch, seed):  # a concurrent build of the same model won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
