"""Classical OCR baselines: the label-anchored parser on true word boxes (its upper bound), the real engines
(Tesseract, RapidOCR) on a few synthetic headers, and their evaluations beside a model's in the report and in
`python -m wellocr.compare`.

Tesseract needs Debian's `tesseract-ocr` (`.ci/run` installs it); its tests skip, saying so, where it is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wellocr import compare, evaluate, synth
from wellocr.errors import UserError
from wellocr.labelparse import Word, answer_text, label_key, load_label_table, parse_words
from wellocr.metrics import field_scores
from wellocr.report import render_report
from wellocr.synthetic import (
    DISTRACTOR_LABELS,
    FIELDS,
    PRINTED_LABELS,
    SPLIT_INDEX_OFFSET,
    make_sample,
    make_sample_with_words,
    words_path,
    write_dataset,
)

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="the tesseract program is not "
                                     "installed (apt-get install -y tesseract-ocr)")
EVAL = SPLIT_INDEX_OFFSET["eval"]


def parsed(words: list, table=None) -> str:
    table = table or load_label_table()
    return answer_text(parse_words([Word(*w) for w in words], table), table)


# ---------------------------------------------------------------- the parser's upper bound


@pytest.mark.parametrize("difficulty", [0.3, 1.0])
def test_parser_recovers_the_answers_from_the_true_word_boxes(difficulty):
    samples = [make_sample_with_words(11, EVAL + i, difficulty, 1024) for i in range(12)]
    scores = field_scores([answer for _, answer, _ in samples], [parsed(words) for _, _, words in samples])
    assert scores["exact_match"] >= 0.97 and scores["precision"] >= 0.97


def test_the_word_box_sidecar_holds_each_rows_words_and_leaves_the_data_set_alone(tmp_path):
    plain = write_dataset(tmp_path / "plain", train=1, eval=2, seed=3, width=512)
    with_words = write_dataset(tmp_path / "words", train=1, eval=2, seed=3, width=512, word_boxes=True)
    assert (plain / "data" / "eval-00000-of-00001.parquet").read_bytes() == \
        (with_words / "data" / "eval-00000-of-00001.parquet").read_bytes()
    assert not words_path(plain, "eval").exists()
    rows = [json.loads(line) for line in words_path(with_words, "eval").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1]
    assert rows[1]["words"] == make_sample_with_words(3, EVAL + 1, 0.3, 512)[2]
    _, answer = make_sample(3, EVAL + 1, 0.3, 512)
    assert field_scores([answer], [parsed(rows[1]["words"])])["exact_match"] >= 0.9


def test_the_synth_command_writes_the_sidecar_with_word_boxes(tmp_path):
    assert synth.main(["--out", str(tmp_path), "--train", "1", "--eval", "1", "--seed", "0", "--width", "320",
                       "--word-boxes"]) == 0
    assert [json.loads(line)["row"] for line in words_path(tmp_path, "train").read_text().splitlines()] == [0]
    assert words_path(tmp_path, "eval").is_file()


def test_word_boxes_sit_on_ink_and_words_spell_the_values():
    image, answer, words = make_sample_with_words(5, EVAL, difficulty=0.0, width=768)
    gray = image.convert("L")
    for text, x0, y0, x1, y1 in words:
        assert gray.crop((int(x0), int(y0), int(x1) + 1, int(y1) + 1)).getextrema()[0] < 100, text
    drawn = " ".join(w[0] for w in words)
    assert all(value in drawn for value in (line.split(": ", 1)[1] for line in answer.splitlines()))


# ---------------------------------------------------------------- the label table


def test_the_label_table_knows_every_label_the_synthetic_forms_print():
    table = load_label_table()
    keys = table.keys()
    assert list(table.fields) == list(FIELDS)
    assert {label: keys.get(label_key(label)) for field in FIELDS for label in PRINTED_LABELS[field]} == \
        {label: field for field in FIELDS for label in PRINTED_LABELS[field]}
    assert all(keys[label_key(label)] is None for label in DISTRACTOR_LABELS.values())


def test_labels_from_a_user_file_extend_the_table(tmp_path):
    extra = tmp_path / "labels.yaml"
    extra.write_text(yaml.safe_dump({"fields": {"WELL": ["Lease"], "SPUD DATE": ["Spud Date"]},
                                     "ignore": ["Section"]}))
    table = load_label_table(extra)
    words = [["Lease:", 10, 10, 60, 24], ["Smith", 80, 10, 130, 24], ["#2", 136, 10, 160, 24],
             ["Section", 300, 10, 370, 24], ["12", 380, 10, 400, 24],
             ["Spud", 10, 40, 50, 54], ["Date:", 55, 40, 100, 54], ["01/02/2003", 120, 40, 220, 54]]
    assert parsed(words, table) == "WELL: Smith #2\nSPUD DATE: 01/02/2003"
    assert "Operator" in table.fields["COMPANY"]


@pytest.mark.parametrize("content", ["fields: [Well]\n", "wells: {}\n", "fields: {WELL: []}\n", "fields: {WELL: [\n"])
def test_a_bad_labels_file_is_a_one_line_error(tmp_path, content):
    extra = tmp_path / "labels.yaml"
    extra.write_text(content)
    with pytest.raises(UserError, match=r"labels\.yaml") as error:
        load_label_table(extra)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- the parser on layouts


def test_a_value_printed_below_its_label_is_read_from_the_line_below():
    words = [["DATE", 10, 10, 50, 20], ["RUN", 300, 10, 340, 20],
             ["01-APR-2002", 20, 30, 140, 46], ["2", 320, 30, 330, 46]]
    assert parsed(words) == "DATE: 01-APR-2002\nRUN NO: 2"


def test_a_value_that_reads_like_a_label_under_a_line_of_labels_is_a_value():
    words = [["Well:", 10, 10, 50, 20], ["Field:", 400, 10, 450, 20],
             ["State", 20, 30, 70, 46], ["AB", 76, 30, 100, 46], ["No.", 106, 30, 130, 46], ["5", 136, 30, 146, 46],
             ["Wildcat", 410, 30, 480, 46]]
    assert parsed(words) == "WELL: State AB No. 5\nFIELD: Wildcat"


def test_a_cell_rule_read_as_a_bar_or_a_wide_gap_ends_a_value():
    rule = [["KB:", 10, 10, 40, 24], ["1439", 50, 10, 90, 24], ["ft|pF", 96, 10, 150, 24], ["2243", 160, 10, 200, 24]]
    assert parsed(rule) == "ELEV KB: 1439 ft"
    misread_next_label = [["TD", 10, 10, 30, 24], ["DRILLER:", 36, 10, 110, 24], ["8408", 120, 10, 160, 24],
                          ["ft", 166, 10, 180, 24], ["TD", 400, 10, 420, 24], ["LocceR:", 426, 10, 490, 24],
                          ["8401", 500, 10, 540, 24]]
    assert parsed(misread_next_label) == "DEPTH DRILLER: 8408 ft"


def test_a_label_glued_to_its_value_by_a_colon_is_split():
    assert parsed([["COMPANY:ACME", 10, 10, 130, 24], ["OIL", 136, 10, 170, 24]]) == "COMPANY: ACME OIL"


# ---------------------------------------------------------------- the engines, end to end


@pytest.fixture(scope="module")
def headers_run(tmp_path_factory) -> Path:
    """A run directory (config.yaml only) over 2 synthetic eval headers at the real width, 1024 px."""
    root = tmp_path_factory.mktemp("baselines")
    data = write_dataset(root / "data", train=1, eval=2, seed=11, width=1024)
    run = root / "runs" / "headers"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset_name": str(data)}}))
    return run


@pytest.fixture(scope="module")
def engine_evaluations(headers_run) -> dict[str, dict]:
    """metrics.json of Tesseract and RapidOCR on the 2 headers, written by `python -m wellocr.evaluate --engine`."""
    if shutil.which("tesseract") is None:
        pytest.skip("the tesseract program is not installed (apt-get install -y tesseract-ocr)")
    for engine in ("tesseract", "rapidocr"):
        assert evaluate.main(["--run", str(headers_run), "--engine", engine]) == 0
    return {e: json.loads((headers_run / "eval" / e / "metrics.json").read_text()) for e in ("tesseract", "rapidocr")}


@needs_tesseract
@pytest.mark.parametrize("engine", ["tesseract", "rapidocr"])
def test_each_engine_reads_some_fields_right(engine_evaluations, headers_run, engine):
    metrics = engine_evaluations[engine]
    assert metrics["samples"] == 2 and metrics["fields"]["exact_match"] >= 0.15
    assert metrics["engine"]["name"] == engine and metrics["engine"]["seconds_per_image"] > 0
    assert metrics["checkpoint"] == {"name": engine, "step": None, "path": None} and metrics["mean_loss"] is None
    rows = [json.loads(line) for line in (headers_run / "eval" / engine / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert set(rows[0]) == {"index", "prediction", "reference", "loss", "cer", "wer"}
    right = [line for r in rows for line in r["prediction"].splitlines() if line in r["reference"].splitlines()]
    assert len(right) >= 8  # whole `LABEL: value` lines, exactly as in the reference


@needs_tesseract
def test_the_report_and_compare_show_engines_beside_the_model(engine_evaluations, headers_run, tmp_path, capsys):
    run = Path(shutil.copytree(headers_run, tmp_path / "headers"))
    model = {**engine_evaluations["tesseract"], "engine": None, "base_model": False, "cer": 0.01, "wer": 0.02,
             "fields": {**engine_evaluations["tesseract"]["fields"], "exact_match": 0.99, "f1": 1.0},
             "checkpoint": {"name": "final", "step": 8, "path": None}, "mean_loss": 0.1,
             "generation": {"samples_per_second": 0.5, "new_tokens_per_second": 90.0, "batch_size": 4,
                            "hit_max_new_tokens": 0, "max_new_tokens": 512}}
    (run / "eval" / "final").mkdir()
    (run / "eval" / "final" / "metrics.json").write_text(json.dumps(model))
    html = render_report(model, [], run_dir=run, eval_dir=run / "eval" / "final")
    table = html.split('<table id="side-by-side">')[1].split("</table>")[0]
    assert [row.split("<td>")[1].split("<")[0] for row in table.split("<tr data-kind=")[1:]] == \
        ["final (this report)", "rapidocr", "tesseract"]
    assert "<td>2.00</td>" in table  # the model's 0.5 samples/s as seconds per image

    assert compare.main([str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(e["evaluation"], e["kind"]) for e in result["evaluations"]] == \
        [("final", "fine-tuned"), ("rapidocr", "engine"), ("tesseract", "engine")]
    assert result["runs"][0]["metrics_from"] == "final"
    assert compare.main([str(run)]) == 0
    table = capsys.readouterr().out
    assert "field exact" in table and "rapidocr" in table and "99.0%" in table


@needs_tesseract
def test_an_engine_evaluation_is_never_taken_for_the_runs_model_metrics(engine_evaluations, headers_run):
    assert compare.run_summary(headers_run)["metrics_from"] is None


def test_the_report_explains_a_lower_cer_with_fewer_fields_right(tmp_path):
    def metrics(name, cer, exact):
        return {"cer": cer, "wer": 0.5, "fields": {"exact_match": exact, "f1": 0.9}, "samples": 2, "split": "eval",
                "engine": {"name": name, "seconds_per_image": 1.0}, "checkpoint": {"name": name}, "limit": None}

    for name, cer, exact in [("rapidocr", 0.1, 0.3), ("tesseract", 0.3, 0.6)]:
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "metrics.json").write_text(json.dumps(metrics(name, cer, exact)))
    html = render_report(metrics("rapidocr", 0.1, 0.3), [], run_dir=tmp_path, eval_dir=tmp_path / "eval" / "rapidocr")
    assert 'id="cer-vs-fields"><b>rapidocr</b> has the lower CER' in html and 'class="vs-base"' not in html


# ---------------------------------------------------------------- missing engines


def test_a_missing_tesseract_program_is_a_one_line_error_naming_the_install(headers_run, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    result = subprocess.run([sys.executable, "-m", "wellocr.evaluate", "--run", str(headers_run),
                             "--engine", "tesseract"], capture_output=True, text=True, timeout=120,
                            env={"PATH": str(bin_dir), "PYTHONPATH": ":".join(sys.path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --engine tesseract: the tesseract program is not installed; install it with "
        "apt-get install -y tesseract-ocr (Debian/Ubuntu) or your system's tesseract package"]


def test_a_missing_engine_package_is_a_one_line_error_naming_the_extra(headers_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # what an uninstalled package imports as
    assert evaluate.main(["--run", str(headers_run), "--engine", "rapidocr"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --engine: the Python package rapidocr-onnxruntime is not "
                                               "installed; install it with pip install -e '.[baselines]'")


def test_labels_without_an_engine_is_a_one_line_error(headers_run, capsys):
    assert evaluate.main(["--run", str(headers_run), "--labels", "labels.yaml"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --labels: only used with --engine (it extends the baseline "
                                               "parser's label table)")
