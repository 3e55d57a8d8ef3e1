"""Well-log header data: load (hub id or local directory), scan for bad rows, and serve rows lazily to TRL.

Schema (the real data set and `wellocr.synth`): `image_base64` (JPEG/PNG bytes, base64), `instruction`, `answer`;
splits `train` and `eval`, optionally `test`. Rows reach the trainer in TRL's prompt/completion + images format,
which gives answer-only labels with TRL's own vision collator (and Unsloth's), so there is no collator here.

Pixels are decoded one row at a time, when the trainer asks for the row; loading only scans headers. A row that
fails (bad base64, unreadable image, absurd size, an image the processor refuses, empty answer, too long for
`train.max_seq_length`) is skipped with a warning naming split and row, counted, and reported; more than
`data.max_bad_fraction` bad is an error. Every image reaches the model through `prepare_image`, in training,
evaluation and prediction alike.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wellocr.config import DataConfig
from wellocr.errors import UserError
from wellocr.retry import network_retry

log = logging.getLogger("wellocr")

REQUIRED_COLUMNS = ("image_base64", "instruction", "answer")
SPLIT_ALIASES = {"train": ("train",), "eval": ("eval", "validation", "valid", "val"), "test": ("test",)}
SCAN_BATCH_ROWS = 256
QWEN3_VL_GRID = 32  # image sides the processor rounds to: patch 16 x spatial merge 2


@dataclass
class BadRow:
    split: str
    index: int
    reason: str

    def __str__(self) -> str:
        return f"{self.split} row {self.index}: {self.reason}"


@dataclass
class Split:
    """One split after the scan: the good rows (lazy, original row numbers kept) and what was skipped."""

    name: str
    dataset: Any  # datasets.Dataset with the raw columns + `row_index`, bad rows removed
    source_rows: int
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per kept row
    bad_rows: list[BadRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dataset)


# ---------------------------------------------------------------- loading


def is_local_source(name: str) -> bool:
    return Path(name).expanduser().exists()


def load_raw_splits(cfg: DataConfig) -> dict[str, Any]:
    """The data set's splits as `datasets.Dataset`s keyed train/eval(/test), columns checked."""
    source = cfg.dataset_name
    if is_local_source(source):
        raw = _load_local(Path(source).expanduser())
    else:
        raw = _load_hub(source, cfg.dataset_revision)
    splits = _pick_splits(raw, source)
    for name, ds in splits.items():
        missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
        if missing:
            raise UserError(
                f"data set '{source}' split '{name}' lacks column(s) {', '.join(missing)} "
                f"(has {', '.join(ds.column_names)}); expected {', '.join(REQUIRED_COLUMNS)}"
            )
    return splits


def _load_local(path: Path) -> Any:
    if path.is_file():
        raise UserError(f"data.dataset_name: {path} is a file; give the data set directory (parquet files per split)")
    return _convert(_files_with_rows(_local_data_files(path), str(path)), str(path))


def _local_data_files(path: Path) -> dict[str, list[str]]:
    """The parquet files of each split: as the README's `configs` declare them (resolved by `datasets`), else by
    file name (without such a README `datasets` maps a file named eval* to the split `test`)."""
    import datasets

    readme = path / "README.md"
    if readme.is_file() and "configs:" in readme.read_text(errors="replace"):
        try:
            declared = datasets.load_dataset_builder(str(path)).config.data_files or {}
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"data.dataset_name: {readme} declares splits datasets cannot resolve "
                            f"({_first_line(exc)}); fix its configs block") from None
        data_files = {str(split): [str(f) for f in files] for split, files in declared.items()}
        odd = next((f for files in data_files.values() for f in files if not f.endswith(".parquet")), None)
        if odd is not None:
            raise UserError(f"data.dataset_name: {readme} declares {odd}; wellocr reads parquet files only")
        return data_files
    data_files = {}
    for split, aliases in SPLIT_ALIASES.items():
        files = sorted(
            str(p) for p in path.rglob("*.parquet") if any(p.name.startswith(a) for a in aliases)
        )
        if files:
            data_files[split] = files
    if not data_files:
        raise UserError(f"data.dataset_name: no parquet files named train*/eval*/test* under {path}")
    return data_files


def _files_with_rows(data_files: dict[str, list[str]], source: str) -> dict[str, list[str]]:
    """The files that hold rows, from their parquet footers (no data read). Before any conversion, so a truncated
    or corrupt file is named here rather than failing inside `datasets`, which also fails on a zero-row file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kept: dict[str, list[str]] = {}
    for split, files in data_files.items():
        kept[split] = []
        for file in files:
            try:
                rows = pq.read_metadata(file).num_rows
            except (pa.ArrowException, OSError) as exc:
                raise UserError(f"{file}: not a readable parquet file ({_first_line(exc)}); it is truncated or "
                                "corrupt: write or download it again") from None
            if rows:
                kept[split].append(file)
        if not kept[split]:
            raise UserError(f"data set '{source}' split '{split}' has no rows ({', '.join(files)}); add rows to "
                            "it or set data.dataset_name to a data set that has them")
    return kept


def _convert(data_files: dict[str, list[str]], source: str) -> Any:
    """The splits as memory-mapped Arrow, converted once per content of the files.

    `datasets.load_dataset(DIR)` keys its cache on the folder's name alone, so two sets in folders of the same
    name, or a set written again in place, read the Arrow copy of another. Here the key (the builder's `hash`,
    the last folder of its cache path) covers each file's resolved path, size and mtime: what is on disk now is
    read, and an unchanged set is found in the cache, not converted again.
    """
    from datasets.exceptions import DatasetGenerationError
    from datasets.fingerprint import Hasher
    from datasets.packaged_modules.parquet.parquet import Parquet

    stamps = []
    for split, files in sorted(data_files.items()):
        for file in files:
            stat = os.stat(file)
            stamps.append((split, str(Path(file).resolve()), stat.st_size, stat.st_mtime_ns))
    builder = Parquet(data_files=data_files, hash=Hasher.hash(stamps))
    try:
        builder.download_and_prepare()
    except DatasetGenerationError as exc:
        cause = exc.__cause__ or exc
        raise UserError(f"data set '{source}' cannot be converted ({type(cause).__name__}: {_first_line(cause)}); "
                        "its parquet files need the same columns and types: write the odd ones again") from None
    return builder.as_dataset()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_hub(name: str, revision: str | None) -> Any:
    import datasets
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    @network_retry()
    def load() -> Any:
        return datasets.load_dataset(name, revision=revision)

    try:
        return load()
    except (DatasetNotFoundError, DataFilesNotFoundError, FileNotFoundError):
        raise UserError(
            f"data.dataset_name: '{name}' is neither a local directory nor a reachable hub data set "
            "(check the name, HF_TOKEN for private sets, and network)"
        ) from None
    except ConnectionError as exc:
        raise UserError(f"data.dataset_name: cannot reach the hub for '{name}': {exc}") from None


def _pick_splits(raw: Any, source: str) -> dict[str, Any]:
    found = list(raw.keys())
    splits = {}
    for split, aliases in SPLIT_ALIASES.items():
        name = next((a for a in aliases if a in raw), None)
        if name is not None:
            splits[split] = raw[name]
    for required in ("train", "eval"):
        if required not in splits:
            raise UserError(f"data set '{source}' has no '{required}' split (found: {', '.join(found)})")
    return splits


# ---------------------------------------------------------------- scanning


def _header_size(image_base64: Any, max_pixels: int) -> tuple[int, int]:
    """Decode base64 and parse the image header only (no pixel decode). Raises ValueError with the reason."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(image_base64, str) or not image_base64:
        raise ValueError("image_base64 is empty")
    try:
        raw = base64.b64decode(image_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image_base64 is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"image does not parse ({type(exc).__name__})") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(f"image is {width}x{height}, over data.max_image_pixels ({max_pixels})")
    return width, height


def scan_split(name: str, ds: Any, cfg: DataConfig, subset: int) -> Split:
    """One cheap pass over a split: keep rows whose image header parses into a size the processor takes and whose
    answer is not empty."""
    if subset > 0:
        ds = ds.select(range(min(subset, len(ds))))
    ds = ds.add_column("row_index", list(range(len(ds))))
    good: list[int] = []
    sizes: list[tuple[int, int]] = []
    bad: list[BadRow] = []
    columns = ["image_base64", "answer"]
    for start, batch in _batches(ds.select_columns(columns)):
        for offset, (image_b64, answer) in enumerate(zip(batch["image_base64"], batch["answer"])):
            index = start + offset
            try:
                if not isinstance(answer, str) or not answer.strip():
                    raise ValueError("answer is empty")
                size = _header_size(image_b64, cfg.max_image_pixels)
                prepared_size(*size, cfg.min_pixels, cfg.max_pixels)  # raises for an image the processor refuses
                sizes.append(size)
                good.append(index)
            except ValueError as exc:
                bad.append(BadRow(name, index, str(exc)))
                log.warning("skipping %s", bad[-1])
    kept = ds.select(good) if len(good) < len(ds) else ds
    split = Split(name, kept, source_rows=len(ds), image_sizes=sizes, bad_rows=bad)
    check_bad_fraction(split, cfg)
    return split


def _batches(ds: Any) -> Iterable[tuple[int, dict]]:
    start = 0
    for batch in ds.iter(batch_size=SCAN_BATCH_ROWS):
        yield start, batch
        start += len(next(iter(batch.values())))


def check_bad_fraction(split: Split, cfg: DataConfig) -> None:
    if split.source_rows == 0:
        raise UserError(f"data set '{cfg.dataset_name}' split '{split.name}' is empty")
    fraction = len(split.bad_rows) / split.source_rows
    if fraction > cfg.max_bad_fraction:
        first = "; ".join(str(b) for b in split.bad_rows[:3])
        raise UserError(
            f"data set '{cfg.dataset_name}' split '{split.name}': {len(split.bad_rows)} of {split.source_rows} rows "
            f"are bad ({fraction:.1%} > data.max_bad_fraction {cfg.max_bad_fraction:.1%}); first: {first}"
        )


def drop_rows(split: Split, positions: dict[int, str], cfg: DataConfig) -> Split:
    """Remove rows (by position in split.dataset) for a reason found after the scan, e.g. too long."""
    if not positions:
        return split
    keep = [i for i in range(len(split)) if i not in positions]
    row_numbers = list(split.dataset["row_index"])
    bad = split.bad_rows + [BadRow(split.name, row_numbers[i], reason) for i, reason in sorted(positions.items())]
    for b in bad[len(split.bad_rows):]:
        log.warning("skipping %s", b)
    new = Split(split.name, split.dataset.select(keep), split.source_rows,
                [split.image_sizes[i] for i in keep], bad)
    check_bad_fraction(new, cfg)
    return new


def load_splits(cfg: DataConfig) -> dict[str, Split]:
    """Load, subset and scan every split the data set has (train, eval, and test when present)."""
    raw = load_raw_splits(cfg)
    subsets = {"train": cfg.train_subset, "eval": cfg.eval_subset, "test": -1}
    return {name: scan_split(name, ds, cfg, subsets[name]) for name, ds in raw.items()}


# ---------------------------------------------------------------- rows for the trainer


def fit_to_pixel_budget(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size an image is scaled to so its area lies in [min_pixels, max_pixels], aspect ratio kept."""
    area = width * height
    scale = 1.0
    if area > max_pixels:
        scale = math.sqrt(max_pixels / area)
    elif area < min_pixels:
        scale = math.sqrt(min_pixels / area)
    return max(1, int(width * scale)), max(1, int(height * scale))


def processor_smart_resize():
    """`smart_resize` of the image processor `wellocr.processing.load_processor` gives (the torchvision one where
    torchvision imports, else the PIL one, as `AutoImageProcessor` picks): the scan, the resize before the
    processor and the processor itself then apply one rule and cannot disagree about an image."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    return smart_resize


def prepared_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size an image is resized to, once, before the processor: the pixel budget, then the processor's own
    `smart_resize` (32-px grid) until the processor keeps it, so it never resizes a second time. Raises ValueError
    naming the image when `smart_resize` refuses it (aspect ratio over 200, or whatever the installed one checks)."""
    smart_resize = processor_smart_resize()
    size = fit_to_pixel_budget(width, height, min_pixels, max_pixels)
    try:
        for _ in range(4):  # normally twice: to the grid, then the processor's own call, which keeps it
            h, w = smart_resize(size[1], size[0], factor=QWEN3_VL_GRID, min_pixels=min_pixels, max_pixels=max_pixels)
            if (w, h) == size:
                break
            size = (w, h)
    except ValueError as exc:
        raise ValueError(f"image is {width}x{height}: the processor cannot take it ({exc})") from None
    return size


def prepare_image(image: Any, min_pixels: int, max_pixels: int) -> Any:
    """The one preparation of an image for the model, shared by training, evaluation and prediction: RGB, resized
    once to `prepared_size`, so the model is shown the pixels it learnt on."""
    from PIL import Image

    image = image.convert("RGB")
    size = prepared_size(image.width, image.height, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def open_image(image_base64: str) -> Any:
    """A data set row's image (base64), decoded to RGB pixels as they are (PIL only: preflight's check)."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(image_base64))) as img:
        return img.convert("RGB")


def decode_image(image_base64: str, min_pixels: int, max_pixels: int) -> Any:
    """A data set row's image (base64), decoded and prepared by `prepare_image`."""
    return prepare_image(open_image(image_base64), min_pixels, max_pixels)


def prompt_messages(instruction: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def completion_messages(answer: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def row_instruction(instruction: Any, cfg: DataConfig) -> str:
    return instruction if isinstance(instruction, str) and instruction.strip() else cfg.instruction


def training_instruction(cfg: DataConfig) -> str:
    """The prompt the model learnt: the first training row's instruction when the data set can be read (a local
    directory, or a hub data set in the local cache), else data.instruction, with a note on stderr."""
    try:
        first = load_raw_splits(cfg)["train"].select_columns(["instruction"])[0]["instruction"]
    except Exception as exc:  # noqa: BLE001 - any failure to read the data set falls back to the config
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"note: using data.instruction as the prompt (cannot read the training data: {reason})",
              file=sys.stderr, flush=True)
        return cfg.instruction
    return row_instruction(first, cfg)


class RowFormatter:
    """`datasets` transform: raw rows → TRL prompt/completion + images, decoding pixels only now.

    A row that passed the scan but fails its full decode is replaced by the next good row (batch shapes and the
    data order of a resumed run stay the same) and appended to `bad_rows_log` (JSON lines; DataLoader workers
    are separate processes, so a file is what they can share).
    """

    def __init__(self, split: Split, cfg: DataConfig, bad_rows_log: Path | None = None):
        self.split_name = split.name
        self.raw = split.dataset
        self.cfg = cfg
        self.bad_rows_log = bad_rows_log

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": [], "completion": [], "images": [], "row_index": []}
        for i, row_index in enumerate(batch["row_index"]):
            row = {k: batch[k][i] for k in REQUIRED_COLUMNS}
            image, row_index, row = self._decode_or_substitute(row, row_index)
            out["prompt"].append(prompt_messages(row_instruction(row["instruction"], self.cfg)))
            out["completion"].append(completion_messages(row["answer"]))
            out["images"].append([image])
            out["row_index"].append(row_index)
        return out

    def _decode_or_substitute(self, row: dict, row_index: int):
        tried = 0
        while True:
            try:
                return decode_image(row["image_base64"], self.cfg.min_pixels, self.cfg.max_pixels), row_index, row
            except Exception as exc:  # noqa: BLE001 - any decode failure is a bad row, never a crash
                self._record(row_index, f"full decode failed ({type(exc).__name__}: {exc})")
                tried += 1
                if tried >= min(len(self.raw), 10):
                    raise UserError(f"split '{self.split_name}': {tried} consecutive rows fail to decode") from exc
                position = (self._position(row_index) + 1) % len(self.raw)
                substitute = self.raw.select_columns([*REQUIRED_COLUMNS, "row_index"])[position]
                row_index = substitute["row_index"]
                row = {k: substitute[k] for k in REQUIRED_COLUMNS}

    def _position(self, row_index: int) -> int:
        if not hasattr(self, "_positions"):
            self._positions = {r: i for i, r in enumerate(list(self.raw["row_index"]))}
        return self._positions[row_index]

    def _record(self, row_index: int, reason: str) -> None:
        bad = BadRow(self.split_name, row_index, reason)
        log.warning("skipping %s", bad)
        if self.bad_rows_log is not None:
            self.bad_rows_log.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"split": bad.split, "index": bad.index, "reason": bad.reason}) + "\n"
            fd = os.open(self.bad_rows_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


def trainer_dataset(split: Split, cfg: DataConfig, bad_rows_log: Path | None = None) -> Any:
    """The split as a lazily formatted `datasets.Dataset` for SFTTrainer (needs remove_unused_columns=False)."""
    return split.dataset.with_transform(RowFormatter(split, cfg, bad_rows_log))


def read_decode_failures(bad_rows_log: Path) -> list[BadRow]:
    if not bad_rows_log.is_file():
        return []
    rows = []
    for line in bad_rows_log.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            rows.append(BadRow(item["split"], item["index"], item["reason"]))
    return rows


# ---------------------------------------------------------------- sequence lengths


def sample_lengths(split: Split, cfg: DataConfig, processor: Any) -> list[int]:
    """Tokens each row becomes (visual tokens + templated prompt + answer + end), from sizes, without pixels."""
    from wellocr.processing import count_image_tokens

    tokenizer = getattr(processor, "tokenizer", processor)
    instructions = [row_instruction(i, cfg) for i in list(split.dataset["instruction"])]
    answers = list(split.dataset["answer"])
    prompt_cache: dict[str, int] = {}
    lengths = []
    for (w, h), instruction, answer_tokens in zip(
        split.image_sizes, instructions, tokenizer(answers, add_special_tokens=False)["input_ids"]
    ):
        if instruction not in prompt_cache:
            text = processor.apply_chat_template(prompt_messages(instruction), add_generation_prompt=True,
                                                 tokenize=False)
            prompt_cache[instruction] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        image_tokens = count_image_tokens(processor, *prepared_size(w, h, cfg.min_pixels, cfg.max_pixels))
        # the template's single <|image_pad|> becomes image_tokens; +2 for <|im_end|> and the newline after it
        lengths.append(prompt_cache[instruction] - 1 + image_tokens + len(answer_tokens) + 2)
    return lengths


def enforce_max_length(split: Split, cfg: DataConfig, processor: Any, max_seq_length: int) -> tuple[Split, int]:
    """Drop (and report) rows longer than max_seq_length; return the split and the longest kept length."""
    lengths = sample_lengths(split, cfg, processor)
    too_long = {
        i: f"needs {n} tokens > train.max_seq_length {max_seq_length} (lower data.max_pixels or raise the limit)"
        for i, n in enumerate(lengths) if n > max_seq_length
    }
    kept = [n for n in lengths if n <= max_seq_length]
    return drop_rows(split, too_long, cfg), max(kept, default=0)
