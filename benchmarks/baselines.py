"""`python benchmarks/baselines.py` — the classical OCR baselines on fixed synthetic headers, on the CPU.

Writes two synthetic data sets (seed 11, width 1024; eval rows 0-39 at difficulty 0.3 and rows 0-19 at 1.0), makes
a run directory over each (config.yaml only: an engine needs no model), scores the parser alone on the words the
generator drew (its ceiling), runs
`python -m wellocr.evaluate --run RUN --engine E` for each engine (EasyOCR only where it imports), and prints a
Markdown table of field exact match, field F1, CER, WER and seconds per image (time in the engine and the parser)
from each evaluation's metrics.json. docs/BENCHMARKS.md ("Baselines") holds its output.

    python benchmarks/baselines.py [--work /tmp/wellocr-baselines] [--engines tesseract,rapidocr,easyocr]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from wellocr.labelparse import Word, answer_text, load_label_table, parse_words
from wellocr.metrics import score
from wellocr.synthetic import SPLIT_INDEX_OFFSET, make_sample_with_words, write_dataset

SETS = (("difficulty 0.3, rows 0-39", 0.3, 40), ("difficulty 1.0, rows 0-19", 1.0, 20))
SEED, WIDTH = 11, 1024


def available(engine: str) -> bool:
    if engine == "tesseract":
        return shutil.which("tesseract") is not None and importlib.util.find_spec("pytesseract") is not None
    module = {"rapidocr": "rapidocr_onnxruntime", "easyocr": "easyocr"}[engine]
    return importlib.util.find_spec(module) is not None


def parser_ceiling(difficulty: float, rows: int) -> str:
    """The table row of the parser fed the words the generator drew, in their true boxes (no engine)."""
    table = load_label_table()
    samples = [make_sample_with_words(SEED, SPLIT_INDEX_OFFSET["eval"] + i, difficulty, WIDTH) for i in range(rows)]
    m = score([answer for _, answer, _ in samples],
              [answer_text(parse_words([Word(*w) for w in words], table), table) for _, _, words in samples])
    return f"{m['fields']['exact_match']:.3f} | {m['fields']['f1']:.3f} | {m['cer']:.3f} | {m['wer']:.3f} | - |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/wellocr-baselines"))
    parser.add_argument("--engines", default="tesseract,rapidocr,easyocr")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if available(e) or print(f"skipping {e}: not installed")]
    lines = ["| set | engine | field exact | field F1 | CER | WER | s/image |", "|---|---|---|---|---|---|---|"]
    for title, difficulty, rows in SETS:
        data = write_dataset(args.work / f"data-{difficulty}", train=1, eval=rows, seed=SEED, width=WIDTH,
                             difficulty=difficulty)
        lines.append(f"| {title} | the parser on the true word boxes (no engine) | {parser_ceiling(difficulty, rows)}")
        run = args.work / "runs" / f"synthetic-{difficulty}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset_name": str(data)}}))
        for engine in engines:
            subprocess.run([sys.executable, "-m", "wellocr.evaluate", "--run", str(run), "--engine", engine],
                           check=True)
            m = json.loads((run / "eval" / engine / "metrics.json").read_text())
            lines.append(f"| {title} | {m['model']} {m['engine']['options']} | {m['fields']['exact_match']:.3f} | "
                         f"{m['fields']['f1']:.3f} | {m['cer']:.3f} | {m['wer']:.3f} | "
                         f"{m['engine']['seconds_per_image']:.2f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
