"""wellocr.predict: transcribe image files and folders with a run's adapter."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wellocr import predict
from wellocr.data import training_instruction
from wellocr.synthetic import make_sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two synthetic header scans (PNG and JPEG) and a file that is not an image."""
    folder = tmp_path_factory.mktemp("scans")
    for index, name in enumerate(["a.png", "b.jpg"]):
        image, _ = make_sample(seed=7, index=index, width=384)
        image.save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_a_folder_is_transcribed_image_by_image(trained_run, image_folder, capsys):
    assert predict.main(["--run", str(trained_run), str(image_folder)]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^== (.+) ==$", out, flags=re.M) == [str(image_folder / "a.png"), str(image_folder / "b.jpg")]


def test_json_output_is_one_array_with_text_and_fields(trained_run, image_folder, capsys):
    assert predict.main(["--run", str(trained_run), str(image_folder / "b.jpg"), "--json", "--batch-size", "1"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [item["image"] for item in items] == [str(image_folder / "b.jpg")]
    assert isinstance(items[0]["text"], str) and isinstance(items[0]["fields"], dict)


def test_an_unreadable_image_is_skipped_with_a_warning_naming_it(trained_run, image_folder, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert predict.main(["--run", str(trained_run), str(broken), str(image_folder / "a.png")]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping {broken}" in captured.err and captured.out.count("== ") == 1


def test_an_image_the_processor_cannot_take_is_skipped_with_a_warning_naming_it(trained_run, image_folder, tmp_path,
                                                                                 capsys):
    from PIL import Image

    strip = tmp_path / "strip.png"
    Image.new("RGB", (600, 1), "white").save(strip)  # aspect ratio 600: Qwen's smart_resize refuses it
    assert predict.main(["--run", str(trained_run), str(strip), str(image_folder / "a.png")]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping {strip}: cannot decode (ValueError: image is 600x1: the processor cannot take it" \
        in captured.err
    assert re.findall(r"^== (.+) ==$", captured.out, flags=re.M) == [str(image_folder / "a.png")]


def test_only_unreadable_images_exit_2(trained_run, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert predict.main(["--run", str(trained_run), str(broken)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: none of the images could be read")


def test_a_folder_without_images_is_an_error(trained_run, tmp_path, capsys):
    assert predict.main(["--run", str(trained_run), str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: no images found in {tmp_path}")


def test_a_missing_image_path_exits_2_with_one_line(trained_run, tmp_path):
    missing = tmp_path / "nope.png"
    result = subprocess.run([sys.executable, "-m", "wellocr.predict", "--run", str(trained_run), str(missing)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {missing}: no such file or folder; give image files or folders of images"
    ]


def test_the_prompt_is_the_training_data_instruction(trained_run):
    from wellocr.artifacts import load_run_config
    from wellocr.data import load_raw_splits

    cfg = load_run_config(trained_run)
    first = load_raw_splits(cfg.data)["train"][0]["instruction"]
    assert first != cfg.data.instruction  # the synthetic rows carry their own instruction
    assert training_instruction(cfg.data) == first


def test_the_prompt_falls_back_to_the_config_without_the_data_set(trained_run, tmp_path, capsys):
    from wellocr.artifacts import load_run_config

    cfg = load_run_config(trained_run)
    cfg.data.dataset_name = str(tmp_path / "gone")
    assert training_instruction(cfg.data) == cfg.data.instruction
    assert "note: using data.instruction" in capsys.readouterr().err


def test_a_model_that_emits_nothing_is_said_so_with_a_hint(trained_run_copy, tiny_model_dir, image_folder, tmp_path,
                                                             capsys):
    """A base model whose generation config suppresses every token but the end of the turn answers nothing at all:
    the block says so and a warning points at the adapter and eval.max_new_tokens."""
    silent = tmp_path / "silent-base"
    shutil.copytree(tiny_model_dir, silent)
    generation = json.loads((silent / "generation_config.json").read_text())
    vocab = json.loads((silent / "config.json").read_text())["text_config"]["vocab_size"]
    generation["suppress_tokens"] = [i for i in range(vocab) if i not in {generation["eos_token_id"]}]
    (silent / "generation_config.json").write_text(json.dumps(generation))
    config = yaml.safe_load((trained_run_copy / "config.yaml").read_text())
    config["model"]["model_name"] = str(silent)
    (trained_run_copy / "config.yaml").write_text(yaml.safe_dump(config))

    assert predict.main(["--run", str(trained_run_copy), str(image_folder / "a.png")]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"== {image_folder / 'a.png'} ==\n{predict.NO_TEXT}\n\n"
    warning = captured.err.strip().splitlines()[-1]
    assert warning.startswith("warning: the model produced no text for 1 of 1 image(s)")
    assert "eval.max_new_tokens=48" in warning and str(trained_run_copy / "final") in warning
