"""Tests for wellocr.synth: determinism, answer format, image properties and the hub-style data set."""

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image

from wellocr.errors import UserError
from wellocr.synthetic import FIELDS, INSTRUCTION, encode_image, make_sample, write_dataset

WIDTH = 400
COLUMNS = {"image_base64", "instruction", "answer"}
REPO_ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> datasets.DatasetDict:
    return datasets.load_dataset(str(path), cache_dir=str(path.parent / f"{path.name}-hf-cache"))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synth") / "ds", train=5, eval=3, test=2, seed=7, width=WIDTH)


def test_same_seed_and_index_give_identical_rows():
    first_image, first_answer = make_sample(3, 11, width=WIDTH)
    second_image, second_answer = make_sample(3, 11, width=WIDTH)
    assert encode_image(first_image) == encode_image(second_image)
    assert first_answer == second_answer


def test_different_seed_gives_different_rows():
    image_a, answer_a = make_sample(1, 0, width=WIDTH)
    image_b, answer_b = make_sample(2, 0, width=WIDTH)
    assert answer_a != answer_b
    assert encode_image(image_a) != encode_image(image_b)


def test_answer_lines_follow_fields_order_with_non_empty_values():
    for index in range(20):
        _, answer = make_sample(0, index, width=WIDTH)
        lines = answer.split("\n")
        assert [line.split(": ", 1)[0] for line in lines] == list(FIELDS)
        for line in lines:
            assert re.fullmatch(r"[A-Z][A-Z ]*: \S.*", line), line
            assert line == line.strip()


def test_values_are_physically_consistent():
    def feet(text: str) -> int:
        return int(text.removesuffix(" ft").replace(",", ""))

    for index in range(30):
        values = dict(line.split(": ", 1) for line in make_sample(4, index, width=WIDTH)[1].split("\n"))
        assert feet(values["ELEV GL"]) < feet(values["ELEV DF"]) < feet(values["ELEV KB"])
        assert feet(values["TOP LOG INTERVAL"]) < feet(values["BTM LOG INTERVAL"]) <= feet(values["DEPTH LOGGER"])
        assert abs(feet(values["DEPTH LOGGER"]) - feet(values["DEPTH DRILLER"])) <= 50
        assert re.fullmatch(r"\d{2}-?\d{3}-?\d{5}(-?\d{2}){0,2}", values["API"])
        casing_size = float(values["CASING"].split(" in @ ")[0])
        assert casing_size > float(values["BIT SIZE"].removesuffix(" in"))


def test_instruction_lists_every_label_in_order():
    assert ", ".join(FIELDS) in INSTRUCTION
    assert "LABEL: value" in INSTRUCTION


def test_image_is_rgb_of_requested_width_with_plausible_height():
    image, _ = make_sample(0, 1, width=WIDTH)
    assert image.mode == "RGB"
    assert image.width == WIDTH
    assert 0.6 * WIDTH <= image.height <= 0.8 * WIDTH + 1


def test_difficulty_changes_the_image_but_not_the_answer():
    clean_image, clean_answer = make_sample(5, 2, difficulty=0.0, width=WIDTH)
    noisy_image, noisy_answer = make_sample(5, 2, difficulty=1.0, width=WIDTH)
    assert clean_answer == noisy_answer
    assert clean_image.size == noisy_image.size
    assert clean_image.tobytes() != noisy_image.tobytes()


def test_clean_image_is_black_on_white():
    image, _ = make_sample(5, 2, difficulty=0.0, width=WIDTH)
    assert image.getextrema() == ((0, 255), (0, 255), (0, 255))


@pytest.mark.parametrize("kwargs", [{"difficulty": -0.1}, {"difficulty": 1.5}, {"width": 10}])
def test_make_sample_rejects_bad_arguments(kwargs):
    with pytest.raises(UserError):
        make_sample(0, 0, **kwargs)


def test_load_dataset_yields_requested_splits_columns_and_counts(small_dataset):
    loaded = _load(small_dataset)
    assert set(loaded) == {"train", "eval", "test"}
    assert {name: len(split) for name, split in loaded.items()} == {"train": 5, "eval": 3, "test": 2}
    for split in loaded.values():
        assert set(split.column_names) == COLUMNS
        assert all(split.features[column].dtype == "string" for column in COLUMNS)


def test_rows_decode_to_images_and_match_make_sample(small_dataset):
    loaded = _load(small_dataset)
    row = loaded["train"][1]
    image = Image.open(io.BytesIO(base64.b64decode(row["image_base64"])))
    assert image.format == "JPEG"
    assert image.convert("RGB").width == WIDTH
    assert row["instruction"] == INSTRUCTION
    assert row["answer"] == make_sample(7, 1, width=WIDTH)[1]


def test_splits_do_not_share_samples(small_dataset):
    loaded = _load(small_dataset)
    answers = [answer for split in loaded.values() for answer in split["answer"]]
    assert len(set(answers)) == len(answers)


def test_readme_declares_splits_and_says_synthetic(small_dataset):
    readme = (small_dataset / "README.md").read_text()
    assert readme.startswith("---\n")
    for split in ("train", "eval", "test"):
        assert f"- split: {split}\n    path: data/{split}-*" in readme
    assert "synthetic" in readme.lower()


def test_same_seed_writes_identical_data_sets(tmp_path):
    first = _load(write_dataset(tmp_path / "a", train=2, eval=1, seed=9, width=WIDTH))
    second = _load(write_dataset(tmp_path / "b", train=2, eval=1, seed=9, width=WIDTH))
    other = _load(write_dataset(tmp_path / "c", train=2, eval=1, seed=10, width=WIDTH))
    assert first["train"].to_list() == second["train"].to_list()
    assert first["eval"].to_list() == second["eval"].to_list()
    assert first["train"]["image_base64"] != other["train"]["image_base64"]


def test_rewrite_without_test_drops_the_stale_test_split(tmp_path):
    out = tmp_path / "ds"
    write_dataset(out, train=1, eval=1, test=1, seed=0, width=WIDTH)
    write_dataset(out, train=1, eval=1, seed=0, width=WIDTH, image_format="png")
    loaded = _load(out)
    assert set(loaded) == {"train", "eval"}
    assert not list((out / "data").glob("test-*"))
    assert not list((out / "data").glob(".*tmp"))
    assert Image.open(io.BytesIO(base64.b64decode(loaded["eval"][0]["image_base64"]))).format == "PNG"


@pytest.mark.parametrize(
    "counts", [{"train": 0, "eval": 1}, {"train": 1, "eval": -1}, {"train": 1, "eval": 1, "test": -2}]
)
def test_write_dataset_rejects_bad_counts(tmp_path, counts):
    with pytest.raises(UserError):
        write_dataset(tmp_path / "ds", seed=0, width=WIDTH, **counts)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wellocr.synth", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_a_loadable_data_set(tmp_path):
    out = tmp_path / "cli"
    result = _cli("--out", str(out), "--train", "3", "--eval", "2", "--seed", "1", "--width", str(WIDTH),
                  "--difficulty", "0.5")
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert "train=3" in result.stdout and "eval=2" in result.stdout
    assert "synth: train 3/3" in result.stderr
    loaded = _load(out)
    assert {name: len(split) for name, split in loaded.items()} == {"train": 3, "eval": 2}


@pytest.mark.parametrize("bad", [["--train", "-1"], ["--difficulty", "2"]])
def test_cli_rejects_bad_arguments_with_one_line_error(tmp_path, bad):
    args = {"--out": str(tmp_path / "bad"), "--train": "2", "--eval": "1", "--seed": "0", "--width": str(WIDTH)}
    args.update(dict(zip(bad[::2], bad[1::2])))
    result = _cli(*[item for pair in args.items() for item in pair])
    assert result.returncode != 0
    assert "error:" in result.stderr
    assert not (tmp_path / "bad" / "README.md").exists()


def test_renders_with_pillow_default_font_when_matplotlib_fonts_are_missing(monkeypatch):
    import wellocr.synthetic as synth

    with_fonts = encode_image(make_sample(0, 3, width=WIDTH)[0])
    monkeypatch.setattr(synth, "_font_dir", lambda: None)
    synth._font.cache_clear()
    try:
        image, answer = make_sample(0, 3, width=WIDTH)
    finally:
        synth._font.cache_clear()
    assert image.width == WIDTH
    assert answer == make_sample(0, 3, width=WIDTH)[1]
    assert encode_image(image) != with_fonts
