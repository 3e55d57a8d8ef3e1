"""A user's own headers in the project's data layout: a folder of scans and a labels file in, parquet splits out.

The labels file is CSV or JSON lines (by its suffix: .csv, .jsonl or .ndjson), one row per scan:

- a file column, `file_name` (the Hugging Face image-folder convention; `file`, `filename`, `image` or `path` work
  too): the scan's path relative to the images folder, or just its name when that is unique there;
- the answer: either an `answer` (or `text`) column holding the whole transcription, or one column per field
  (`COMPANY`, `WELL`, `elev_kb`, ...), which become `LABEL: value` lines in the column order, the label
  upper-cased with `_` read as a space, empty cells left out (the format of wellocr.synthetic and
  wellocr.metrics.parse_fields);
- optionally `instruction`, the prompt for that row; without it the row's instruction is empty and training uses
  `data.instruction`.

Scans: any image Pillow reads (PNG, JPEG, TIFF, ...) and PDFs (rendered at PDF_DPI with pypdfium2, the `pdf`
extra). A PDF or multi-page TIFF gives its first page only: that is where a well log's header is; the pages after
it are the log itself. PNG and JPEG files are stored as they are; everything else as PNG.

Nothing unusable is dropped silently: every file of the folder that gives no row (no label, unreadable, empty
label) and every label whose file is missing is reported with the reason. A labels file that cannot be read as a
table (bad CSV or JSON, a row with the wrong number of values, no file column, a file labelled twice) is a
UserError naming the file and line.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from wellocr.checkpoint import atomic_path, write_text_atomic
from wellocr.errors import UserError
from wellocr.synthetic import SCHEMA, card_header, split_path

FILE_COLUMNS = ("file_name", "file", "filename", "image", "path")
ANSWER_COLUMNS = ("answer", "text")
INSTRUCTION_COLUMN = "instruction"
LABEL_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PDF_DPI = 200  # a header's small print stays legible; the training pixel budget scales it down anyway


@dataclass
class Label:
    line: int  # where the row is in the labels file (1 = the first line)
    file: str
    answer: str
    instruction: str


@dataclass
class Prepared:
    out_dir: Path
    counts: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file or labels line, why)
    first_pages: int = 0  # multi-page scans of which the first page was used


# ---------------------------------------------------------------- the labels file


def read_labels(path: Path) -> list[Label]:
    """The rows of a CSV or JSONL labels file; UserError (naming the file and line) when it is not a usable table."""
    path = Path(path)
    kind = LABEL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"--labels {path}: give a .csv or .jsonl file (one row per scan: file_name and the answer)")
    if not path.is_file():
        raise UserError(f"--labels {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"--labels {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    rows = list(_csv_rows(path, text) if kind == "csv" else _jsonl_rows(path, text))
    if not rows:
        raise UserError(f"--labels {path}: no rows; give one row per scan (file_name and the answer)")
    labels, seen = [], {}
    for line, row in rows:
        label = _label(path, line, row)
        if label.file in seen:
            raise UserError(f"--labels {path} line {line}: {label.file} is labelled already on line "
                            f"{seen[label.file]}; keep one row per scan")
        seen[label.file] = line
        labels.append(label)
    return labels


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        for values in reader:
            if not any(value.strip() for value in values):
                continue  # a blank line
            if len(values) != len(header):
                raise UserError(f"--labels {path} line {reader.line_num}: {len(values)} values for the "
                                f"{len(header)} columns of the header ({', '.join(header)}); quote values that "
                                "hold commas")
            yield reader.line_num, dict(zip(header, values))
    except csv.Error as exc:
        raise UserError(f"--labels {path} line {reader.line_num}: not valid CSV ({exc})") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"--labels {path} line {number}: not JSON ({exc}); one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"--labels {path} line {number}: a JSON {type(row).__name__}, not an object with "
                            "file_name and the answer")
        yield number, row


def _text(path: Path, line: int, column: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise UserError(f"--labels {path} line {line}: {column} holds a JSON {type(value).__name__}; give text")
    return str(value).strip()


def _label(path: Path, line: int, row: dict) -> Label:
    columns = {str(name).strip().lower(): name for name in row}
    file_key = next((columns[c] for c in FILE_COLUMNS if c in columns), None)
    if file_key is None:
        raise UserError(f"--labels {path} line {line}: no file column ({', '.join(FILE_COLUMNS)}); the columns "
                        f"are {', '.join(map(str, row)) or 'none'}")
    file = _text(path, line, file_key, row[file_key]).replace("\\", "/").removeprefix("./")
    if not file:
        raise UserError(f"--labels {path} line {line}: the {file_key} column is empty; name the scan")
    instruction_key = columns.get(INSTRUCTION_COLUMN)
    instruction = _text(path, line, INSTRUCTION_COLUMN, row[instruction_key]) if instruction_key else ""
    answer_key = next((columns[c] for c in ANSWER_COLUMNS if c in columns), None)
    if answer_key is not None:
        answer = _text(path, line, answer_key, row[answer_key])
    else:
        fields = [key for key in row if key not in (file_key, instruction_key)]
        if not fields:
            raise UserError(f"--labels {path} line {line}: no answer: give an answer column or one column per "
                            "field (COMPANY, WELL, ...)")
        lines = []
        for key in fields:
            value = " ".join(_text(path, line, str(key), row[key]).split())
            if value:
                lines.append(f"{field_label(str(key))}: {value}")
        answer = "\n".join(lines)
    return Label(line, file, answer, instruction)


def field_label(column: str) -> str:
    """`elev_kb` → `ELEV KB`: a field column's name as an answer label."""
    return " ".join(column.replace("_", " ").split()).upper()


# ---------------------------------------------------------------- the scans


class ScanError(Exception):
    """A scan that gives no image; the message says why."""


def scan_bytes(path: Path) -> tuple[bytes, int]:
    """(PNG or JPEG bytes of the scan's first page, its page count)."""
    if path.suffix.lower() == ".pdf":
        return _pdf_first_page(path)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            pages = getattr(img, "n_frames", 1)
            img.load()  # decodes the (first) frame: a truncated file fails here
            if img.format in ("PNG", "JPEG") and pages == 1:
                return path.read_bytes(), 1
            return _png(img if img.mode in ("1", "L", "RGB") else img.convert("RGB")), pages
    except UnidentifiedImageError:
        raise ScanError("not an image Pillow can read (nor a PDF)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ScanError(f"not a readable image ({exc})") from None


def _png(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _pdf_first_page(path: Path) -> tuple[bytes, int]:
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise ScanError("a PDF, and reading PDFs needs pypdfium2: pip install -e '.[pdf]'") from None
    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        raise ScanError(f"not a readable PDF ({exc})") from None
    try:
        if len(pdf) == 0:
            raise ScanError("a PDF without pages")
        return _png(pdf[0].render(scale=PDF_DPI / 72).to_pil().convert("RGB")), len(pdf)
    finally:
        pdf.close()


def _files(images_dir: Path, exclude: Path) -> dict[str, Path]:
    """Every non-hidden file under the folder, by its path relative to it (with /)."""
    return {p.relative_to(images_dir).as_posix(): p for p in sorted(images_dir.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(images_dir).parts)
            and p.resolve() != exclude}


def _match(name: str, files: dict[str, Path], by_name: dict[str, list[str]]) -> tuple[str | None, str]:
    if name in files:
        return name, ""
    candidates = by_name.get(name, []) if "/" not in name else []
    if len(candidates) == 1:
        return candidates[0], ""
    if candidates:
        return None, f"its name matches {len(candidates)} files ({', '.join(candidates[:3])}); give the path"
    return None, "no such file in the images folder"


# ---------------------------------------------------------------- the data set


def prepare(images_dir: Path, labels_file: Path, out_dir: Path, eval_fraction: float = 0.1, seed: int = 0,
            report=print) -> Prepared:
    """Write `out_dir` (new or empty) in the layout wellocr.data loads; `report(line)` gets one line per file
    that gave no row. Rows are shuffled with `seed` and split train/eval, each split at least one row."""
    images_dir, labels_file, out_dir = Path(images_dir), Path(labels_file), Path(out_dir)
    if not 0 < eval_fraction < 1:
        raise UserError(f"--eval-fraction {eval_fraction}: give a fraction between 0 and 1 (e.g. 0.1)")
    if not images_dir.is_dir():
        raise UserError(f"--images {images_dir}: no such folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out_dir}: exists and is not empty; pick a new folder or remove it")
    labels = read_labels(labels_file)
    files = _files(images_dir, labels_file.resolve())
    by_name: dict[str, list[str]] = {}
    for relative in files:
        by_name.setdefault(relative.rsplit("/", 1)[-1], []).append(relative)

    result = Prepared(out_dir, {})
    rows, used = [], set()

    def skip(what: str, why: str) -> None:
        result.skipped.append((what, why))
        report(f"skipped {what}: {why}")

    for label in labels:
        relative, why = _match(label.file, files, by_name)
        where = f"{labels_file.name} line {label.line}"
        if relative is None:
            skip(f"{label.file} ({where})", why)
            continue
        used.add(relative)
        if not label.answer:
            skip(relative, f"its label is empty ({where})")
            continue
        try:
            data, pages = scan_bytes(files[relative])
        except ScanError as exc:
            skip(relative, str(exc))
            continue
        result.first_pages += pages > 1
        rows.append({"image_base64": base64.b64encode(data).decode("ascii"), "instruction": label.instruction,
                     "answer": label.answer})
    for relative in files:
        if relative not in used:
            skip(relative, f"no label in {labels_file.name}")
    if len(rows) < 2:
        raise UserError(f"only {len(rows)} usable scan(s) (see the skipped files above); a data set needs at least "
                        "two: one to train on, one to evaluate")

    random.Random(seed).shuffle(rows)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_fraction)))
    splits = {"train": rows[n_eval:], "eval": rows[:n_eval]}
    _write(out_dir, splits, images_dir, labels_file, eval_fraction, seed)
    result.counts = {name: len(split) for name, split in splits.items()}
    return result


def _write(out_dir: Path, splits: dict[str, list[dict]], images_dir: Path, labels_file: Path,
           eval_fraction: float, seed: int) -> None:
    """The parquet splits and a README declaring them, written aside and renamed into place."""
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "data").mkdir(parents=True)
    try:
        for name, rows in splits.items():
            with atomic_path(split_path(staging, name)) as tmp:
                pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        write_text_atomic(staging / "README.md", _readme(splits, images_dir, labels_file, eval_fraction, seed))
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _readme(splits: dict[str, list[dict]], images_dir: Path, labels_file: Path, eval_fraction: float,
            seed: int) -> str:
    split_lines = "\n".join(f"- `{name}`: {len(rows)} rows" for name, rows in splits.items())
    return (
        card_header(splits) +
        "# Well-log headers\n\n"
        f"Made by `python -m wellocr.prepare` from the scans in `{images_dir.name}/` and the labels in "
        f"`{labels_file.name}` (the first page of a multi-page scan), shuffled with seed {seed} and split "
        f"{1 - eval_fraction:.0%} / {eval_fraction:.0%}.\n\n"
        "Columns (all strings): `image_base64` (a PNG or JPEG, base64), `instruction` (the labels' own, or empty: "
        "training then uses `data.instruction`), `answer` (the transcription, `LABEL: value` lines).\n\n"
        f"Splits:\n\n{split_lines}\n"
    )
