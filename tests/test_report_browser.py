"""report.html: what it contains, and that a real browser renders it, sample images included.

The browser tests need Debian's headless Chromium at /usr/bin/chromium (`apt-get install -y chromium`) and are
skipped, saying so, where it is missing; the baseline beside the model needs Debian's `tesseract-ocr` as well.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from wellocr import evaluate
from wellocr.report import diff_html, find_base_metrics, render_report, training_curves_png

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium is not installed at "
                                    "/usr/bin/chromium (apt-get install -y chromium)")
needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="the tesseract program is not "
                                     "installed (apt-get install -y tesseract-ocr)")
WINDOW = (1200, 2400)
# Appended to a copy of the report: once the page has loaded, count the <img> elements that decoded.
IMAGE_PROBE = """<script>window.addEventListener("load", () => {
  const images = [...document.images], ok = images.filter(i => i.complete && i.naturalWidth > 0);
  const marker = document.createElement("div");
  marker.id = "image-probe"; marker.textContent = `decoded ${ok.length} of ${images.length}`;
  document.body.appendChild(marker);
});</script>"""


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory) -> Path:
    """report.html of a 3-sample evaluation of the shared run's final adapter, after a Tesseract baseline on the same
    3 samples (where Tesseract is installed)."""
    run_dir = tmp_path_factory.mktemp("report") / trained_run.name
    shutil.copytree(trained_run, run_dir)
    if shutil.which("tesseract") is not None:
        assert evaluate.main(["--run", str(run_dir), "--engine", "tesseract", "--limit", "3"]) == 0
    assert evaluate.main(["--run", str(run_dir), "--limit", "3"]) == 0
    return run_dir / "eval" / "final-n3" / "report.html"


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=120,
    )


# ---------------------------------------------------------------- in the browser


@needs_chromium
def test_browser_decodes_every_image_of_the_report(report, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    dom = chromium(tmp_path, "--dump-dom", probe.as_uri()).stdout
    # the training-curve PNG and the 3 sample JPEGs
    assert re.search(r'<div id="image-probe">decoded (\d+) of (\d+)</div>', dom).groups() == ("4", "4")


@needs_chromium
def test_browser_screenshot_shows_a_rendered_page(report, tmp_path):
    screenshot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={screenshot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", report.as_uri())
    with Image.open(screenshot) as image:
        assert image.size == WINDOW
        gray = image.convert("L")
        # a blank or error page is nearly one colour; text, tables and scans are not
        assert ImageStat.Stat(gray).stddev[0] > 20
        assert sum(1 for count in gray.histogram() if count) > 100  # anti-aliased text, photos of scans


@needs_chromium
@needs_tesseract
def test_browser_shows_the_baseline_beside_the_model(report, tmp_path):
    dom = chromium(tmp_path, "--dump-dom", report.as_uri()).stdout
    table = dom.split('<table id="side-by-side">')[1].split("</table>")[0]
    rows = {re.findall(r"<td>([^<]*)</td>", cells)[0]: (kind, re.findall(r"<td>([^<]*)</td>", cells)[1:])
            for kind, cells in re.findall(r'<tr data-kind="([^"]+)">(.*?)</tr>', table)}
    assert rows["final-n3 (this report)"][0] == "fine-tuned"
    kind, cells = rows["tesseract-n3"]
    assert kind == "engine" and cells[:2] == ["engine", "3"] and all(re.fullmatch(r"\d+\.\d+", c) for c in cells[2:])


# ---------------------------------------------------------------- in the HTML


def test_report_is_self_contained(report):
    html = report.read_text()
    assert not re.findall(r'(?:src|href)="(?!data:)', html)
    assert "<link" not in html and "@import" not in html


def test_report_header_names_run_checkpoint_and_split(report):
    html = report.read_text()
    assert "Evaluation of shared" in html and "final (step 8)" in html and "<b>eval</b>" in html


def test_report_embeds_the_training_curves(report):
    assert '<img alt="training curves" src="data:image/png;base64,' in report.read_text()


def test_report_shows_every_worst_sample_with_its_image(report):
    html = report.read_text()
    assert html.count('class="sample"') == 3 and html.count('src="data:image/jpeg;base64,') == 3


def test_diff_marks_a_wrong_digit_as_one_character():
    reference, prediction = diff_html("API: 42-501-20130", "API: 42-581-20130")
    assert reference == "API: 42-5<del>0</del>1-20130" and prediction == "API: 42-5<ins>8</ins>1-20130"


def test_diff_marks_a_missing_word_in_the_reference():
    reference, prediction = diff_html("RUN NO: 3\nBIT SIZE: 8.5 in", "RUN NO: 3\nSIZE: 8.5 in")
    assert "<del>BIT </del>" in reference and "<ins>" not in prediction


def test_diff_escapes_markup():
    reference, prediction = diff_html("WELL: A&B", "WELL: <script>alert(1)</script>")
    assert "<script>" not in prediction and "&lt;script&gt;" in prediction and "A&amp;B" in reference


def test_no_base_comparison_without_a_base_evaluation(tmp_path):
    metrics = {"cer": 0.5, "wer": 0.5, "cer_normalized": 0.5, "wer_normalized": 0.5, "fields": None, "samples": 1,
               "mean_loss": 1.0, "checkpoint": {"name": "final", "step": 8}, "split": "eval", "limit": None,
               "base_model": False}
    assert 'class="vs-base"' not in render_report(metrics, [], run_dir=tmp_path)


def test_base_comparison_uses_only_a_base_evaluation_of_the_same_split(tmp_path):
    for name, split in [("base-test", "test"), ("base", "eval")]:
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "metrics.json").write_text(
            json.dumps({"base_model": True, "split": split, "limit": None, "samples": 4, "cer": 0.25}))
    assert find_base_metrics(tmp_path, {"split": "test", "limit": None, "base_model": False})["split"] == "test"
    assert find_base_metrics(tmp_path, {"split": "train", "limit": None, "base_model": False}) is None


def test_training_curves_add_an_eval_cer_panel_when_cer_was_logged():
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    without_cer = Image.open(io.BytesIO(training_curves_png(history)))
    with_cer = Image.open(io.BytesIO(training_curves_png(history + [{"step": 2, "eval/cer": 0.4}])))
    assert with_cer.width == 2 * without_cer.width


def test_no_training_curves_without_logged_losses():
    assert training_curves_png([{"step": 1, "learning_rate": 1e-4}]) is None
