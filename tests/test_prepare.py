"""`python -m wellocr.prepare`: a folder of scans and a labels file become splits that the trainer's loader
(wellocr.data.load_splits) reads; every file that gives no row is named with the reason; a labels file that cannot
be read is one line naming the file and line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from wellocr import prepare as P
from wellocr.config import DataConfig
from wellocr.data import decode_image, load_splits
from wellocr.metrics import parse_fields
from wellocr.synthetic import FIELDS, make_sample

EXAMPLE = REPO / "examples" / "headers"


def loaded(out: Path) -> dict:
    return load_splits(DataConfig(dataset_name=str(out)))


def test_the_example_becomes_splits_the_trainer_loads(tmp_path, capsys):
    out = tmp_path / "headers"
    assert P.main(["--images", str(EXAMPLE / "scans"), "--labels", str(EXAMPLE / "labels.csv"), "--out", str(out),
                   "--eval-fraction", "0.2", "--seed", "1"]) == 0
    result = capsys.readouterr()
    assert result.err == ""  # every scan was used
    assert result.out.startswith(f"{out}: train 4, eval 1 rows; 1 multi-page scan(s): first page used")

    splits = loaded(out)
    assert (len(splits["train"]), len(splits["eval"])) == (4, 1)
    assert not splits["train"].bad_rows and not splits["eval"].bad_rows
    with open(EXAMPLE / "labels.csv", newline="") as fh:
        expected = {"\n".join(f"{f}: {row[f]}" for f in FIELDS) for row in csv.DictReader(fh)}
    rows = [row for split in splits.values() for row in split.dataset]
    assert {row["answer"] for row in rows} == expected
    assert all(list(parse_fields(row["answer"])) == list(FIELDS) for row in rows)
    assert all(row["instruction"] == "" for row in rows)  # training then uses data.instruction
    for row in rows:  # every page decodes, and none is the blank second page of the PDF
        assert np.asarray(decode_image(row["image_base64"], 16384, 65536).convert("L")).min() < 100


def write_scan(path: Path, index: int = 0) -> str:
    image, answer = make_sample(seed=5, index=index, width=320)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return answer


def test_every_file_that_gives_no_row_is_named_with_the_reason(tmp_path, capsys):
    scans = tmp_path / "scans"
    answers = [write_scan(scans / "a.png", 0), write_scan(scans / "deep" / "b.jpg", 1), write_scan(scans / "c.png")]
    (scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (scans / "notes.txt").write_text("unlabelled")
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(json.dumps(row) for row in [
        {"file_name": "a.png", "answer": answers[0], "instruction": "Read it."},
        {"file_name": "b.jpg", "answer": answers[1]},  # found by its name in deep/
        {"file_name": "c.png", "answer": "  "},
        {"file_name": "broken.png", "answer": "COMPANY: X"},
        {"file_name": "gone.png", "answer": "COMPANY: Y"},
    ]) + "\n")

    assert P.main(["--images", str(scans), "--labels", str(labels), "--out", str(tmp_path / "out"),
                   "--eval-fraction", "0.5"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "skipped c.png: its label is empty (labels.jsonl line 3)",
        "skipped broken.png: not an image Pillow can read (nor a PDF)",
        "skipped gone.png (labels.jsonl line 5): no such file in the images folder",
        "skipped notes.txt: no label in labels.jsonl",
    ]
    assert "train 1, eval 1 rows; 4 file(s) skipped (listed above)" in captured.out
    rows = {row["answer"]: row["instruction"] for split in loaded(tmp_path / "out").values() for row in split.dataset}
    assert rows == {answers[0]: "Read it.", answers[1]: ""}


def test_one_column_per_field_becomes_label_value_lines(tmp_path):
    scans = tmp_path / "scans"
    write_scan(scans / "a.png", 0)
    write_scan(scans / "b.png", 1)
    labels = tmp_path / "labels.csv"
    labels.write_text('file_name,company,elev_kb,WELL\na.png,ACME,"1,234 ft",No. 1\nb.png,  BETA  ,,\n')
    P.main(["--images", str(scans), "--labels", str(labels), "--out", str(tmp_path / "out")])
    answers = {row["answer"] for split in loaded(tmp_path / "out").values() for row in split.dataset}
    assert answers == {"COMPANY: ACME\nELEV KB: 1,234 ft\nWELL: No. 1", "COMPANY: BETA"}  # empty cells left out


@pytest.mark.parametrize("name, text, message", [
    ("labels.csv", "file_name,answer\na.png,COMPANY: A\nb.png,COMPANY: B,extra\n",
     "labels.csv line 3: 3 values for the 2 columns of the header (file_name, answer); quote values that hold "
     "commas"),
    ("labels.jsonl", '{"file_name": "a.png", "answer": "A"}\n{"file_name": "b.png", "answer": \n',
     "labels.jsonl line 2: not JSON ("),
    ("labels.jsonl", '["a.png", "A"]\n', "labels.jsonl line 1: a JSON list, not an object"),
    ("labels.csv", "name,answer\na.png,A\n", "labels.csv line 2: no file column (file_name, file, filename, image, "
     "path); the columns are name, answer"),
    ("labels.csv", "file_name,answer\na.png,A\nb.png,B\na.png,C\n",
     "labels.csv line 4: a.png is labelled already on line 2; keep one row per scan"),
    ("labels.csv", "file_name\na.png\n", "labels.csv line 2: no answer: give an answer column or one column per"),
    ("labels.csv", "file_name,answer\n", "labels.csv: no rows"),
    ("labels.xlsx", "", "labels.xlsx: give a .csv or .jsonl file"),
], ids=["csv-row-width", "jsonl-not-json", "jsonl-not-object", "no-file-column", "labelled-twice", "no-answer",
        "no-rows", "not-csv-or-jsonl"])
def test_a_labels_file_that_cannot_be_read_is_one_line_naming_the_line(tmp_path, capsys, name, text, message):
    write_scan(tmp_path / "scans" / "a.png")
    (tmp_path / name).write_text(text)
    assert P.main(["--images", str(tmp_path / "scans"), "--labels", str(tmp_path / name),
                   "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --labels {tmp_path}/{message}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_fewer_than_two_usable_scans_or_a_used_out_folder_is_refused(tmp_path, capsys):
    answer = write_scan(tmp_path / "scans" / "a.png")
    labels = tmp_path / "labels.csv"
    labels.write_text(f'file_name,answer\na.png,"{answer}"\n')
    args = ["--images", str(tmp_path / "scans"), "--labels", str(labels), "--out", str(tmp_path / "out")]
    assert P.main(args) == 2
    assert "only 1 usable scan(s)" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert P.main(args) == 2
    assert f"--out {tmp_path / 'out'}: exists and is not empty" in capsys.readouterr().err
    assert P.main([*args[:-2], "--out", str(tmp_path / "new"), "--eval-fraction", "1"]) == 2
    assert "--eval-fraction 1.0: give a fraction between 0 and 1" in capsys.readouterr().err
