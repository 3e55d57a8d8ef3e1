"""What a run reads is what is on disk now, bad files and empty splits are one-line errors, the scan refuses exactly
the images the processor refuses, and train, eval and predict hand the processor the same pixels."""

import base64
import io
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wellocr import data as D
from wellocr.config import Config, DataConfig
from wellocr.errors import UserError
from wellocr.synthetic import SCHEMA, make_sample, split_path, write_dataset


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty datasets cache of this test's own, so no developer cache hides or causes a stale read."""
    import datasets

    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(dataset_name=str(path), min_pixels=32 * 32, max_pixels=64 * 32 * 32, **kw)


def synth(directory, train, seed=0):
    return write_dataset(directory, train=train, eval=1, seed=seed, width=320)


def answers_on_disk(directory, split="train"):
    return pq.read_table(split_path(directory, split), columns=["answer"])["answer"].to_pylist()


def png_b64(width, height) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_rows(directory, split, rows, name=None):
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), directory / (name or f"{split}-00000-of-00001.parquet"))


def row(i=0, image_base64=None):
    return {"image_base64": image_base64 or png_b64(96, 64), "instruction": "Transcribe.", "answer": f"WELL: W-{i}"}


# ---------------------------------------------------------------- the Arrow cache follows the files


def test_two_data_sets_in_folders_of_the_same_name_each_give_their_own_rows(tmp_path, hf_cache):
    first, second = synth(tmp_path / "a" / "headers", 2, seed=0), synth(tmp_path / "b" / "headers", 3, seed=1)
    for directory in (first, second):
        train = D.load_raw_splits(cfg_for(directory))["train"]
        assert list(train["answer"]) == answers_on_disk(directory)
    assert len(D.load_raw_splits(cfg_for(first))["train"]) == 2


def test_a_data_set_written_again_in_place_is_read_again(tmp_path, hf_cache):
    directory = synth(tmp_path / "headers", 2, seed=0)
    assert len(D.load_raw_splits(cfg_for(directory))["train"]) == 2
    synth(directory, 3, seed=1)
    assert list(D.load_raw_splits(cfg_for(directory))["train"]["answer"]) == answers_on_disk(directory)


def test_an_unchanged_data_set_is_not_converted_again(tmp_path, hf_cache):
    directory = synth(tmp_path / "headers", 2)

    def arrow_files():
        splits = D.load_raw_splits(cfg_for(directory))
        files = sorted(f["filename"] for ds in splits.values() for f in ds.cache_files)
        return {f: (os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files}

    first = arrow_files()
    assert first and all(f.startswith(str(hf_cache)) for f in first)
    assert arrow_files() == first  # the same Arrow files, not written again


# ---------------------------------------------------------------- unreadable files and empty splits


def test_a_train_split_without_rows_is_a_user_error_naming_the_split(tmp_path, hf_cache):
    directory = synth(tmp_path / "headers", 2)
    pq.write_table(SCHEMA.empty_table(), split_path(directory, "train"))
    with pytest.raises(UserError, match=r"split 'train' has no rows") as raised:
        D.load_raw_splits(cfg_for(directory))
    assert "\n" not in str(raised.value)


def test_a_truncated_parquet_file_is_a_user_error_naming_the_file(tmp_path, hf_cache):
    directory = synth(tmp_path / "headers", 2)
    path = split_path(directory, "train")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expected = rf"{re.escape(str(path))}: not a readable parquet file .*truncated"
    with pytest.raises(UserError, match=expected) as raised:
        D.load_raw_splits(cfg_for(directory))
    assert "\n" not in str(raised.value)


def test_an_empty_shard_beside_others_is_left_out(tmp_path, hf_cache):
    root = tmp_path / "ds"
    write_rows(root, "train", [row(0), row(1)])
    write_rows(root, "train", [], name="train-00001-of-00002.parquet")
    write_rows(root, "eval", [row(2)])
    assert list(D.load_raw_splits(cfg_for(root))["train"]["answer"]) == ["WELL: W-0", "WELL: W-1"]


def test_a_shard_that_cannot_be_cast_is_a_user_error_naming_the_data_set(tmp_path, hf_cache):
    root = tmp_path / "ds"
    write_rows(root, "train", [row(0)])
    pq.write_table(pa.table({"image_base64": [[1, 2]], "instruction": ["Read."], "answer": ["A"]}),
                   root / "train-00001-of-00002.parquet")
    write_rows(root, "eval", [row(2)])
    expected = rf"data set '{re.escape(str(root))}' cannot be converted .*same columns"
    with pytest.raises(UserError, match=expected) as raised:
        D.load_raw_splits(cfg_for(root))
    assert "\n" not in str(raised.value)


def test_a_bad_data_set_exits_2_with_one_line(make_config, tmp_path):
    from conftest import run_train

    directory = synth(tmp_path / "headers", 2)
    pq.write_table(SCHEMA.empty_table(), split_path(directory, "train"))
    result = run_train("--config", str(make_config(**{"data.dataset_name": str(directory)})), "--preflight-only",
                       env={"HF_DATASETS_CACHE": str(tmp_path / "hf-datasets-cache")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data set '{directory}' split 'train' has no rows ({split_path(directory, 'train')}); "
        "add rows to it or set data.dataset_name to a data set that has them")


# ---------------------------------------------------------------- images the processor refuses


REFUSED = [(600, 1), (1, 600), (250, 1), (3000, 12)]
TAKEN = [(1, 1), (3, 2), (96, 64), (1700, 20), (4000, 3000)]


def test_the_scan_skips_exactly_the_images_the_processor_refuses(tmp_path, tiny_model_dir, caplog):
    from wellocr.processing import load_processor

    sizes = REFUSED + TAKEN
    root = tmp_path / "ds"
    write_rows(root, "train", [row(i, png_b64(*size)) for i, size in enumerate(sizes)])
    write_rows(root, "eval", [row(0)])
    cfg = cfg_for(root, max_bad_fraction=1.0)
    split = D.load_splits(cfg)["train"]
    assert [b.index for b in split.bad_rows] == list(range(len(REFUSED)))
    assert all("the processor cannot take it" in b.reason and "aspect ratio" in b.reason for b in split.bad_rows)
    assert "train row 0: image is 600x1: the processor cannot take it" in caplog.text

    processor = load_processor(tiny_model_dir, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    rows = D.trainer_dataset(split, cfg)
    for i in range(len(rows)):  # every kept row goes through the processor as training hands it over
        assert processor.image_processor(images=rows[i]["images"], return_tensors="pt")["pixel_values"].numel()
    for width, height in REFUSED:  # and every skipped one would have stopped it
        with pytest.raises(ValueError):
            image = Image.new("RGB", D.fit_to_pixel_budget(width, height, cfg.min_pixels, cfg.max_pixels))
            processor.image_processor(images=[image], return_tensors="pt")


def test_the_scan_uses_the_processors_own_resize_rule(tiny_model_dir):
    import sys

    from wellocr.processing import load_processor

    processor = load_processor(tiny_model_dir)
    assert D.processor_smart_resize() is sys.modules[type(processor.image_processor).__module__].smart_resize


# ---------------------------------------------------------------- one image preparation for every command


def test_train_eval_and_predict_give_the_processor_the_same_pixels(tmp_path, tiny_model_dir):
    import torch

    from wellocr import predict
    from wellocr.inference import row_inputs
    from wellocr.processing import load_processor

    image, answer = make_sample(seed=3, index=0, width=384)
    path = tmp_path / "scan.png"
    image.save(path)
    data_row = {"image_base64": base64.b64encode(path.read_bytes()).decode(), "instruction": "Read.", "answer": answer}
    root = tmp_path / "ds"
    write_rows(root, "train", [data_row])
    write_rows(root, "eval", [data_row])
    cfg = Config(data=cfg_for(root))
    assert image.width * image.height > cfg.data.max_pixels  # so every path resizes

    train_image = D.trainer_dataset(D.load_splits(cfg.data)["train"], cfg.data)[0]["images"][0]
    eval_image = row_inputs([data_row], cfg)[0][0]
    predict_image = predict.load_image(path, cfg)
    processor = load_processor(tiny_model_dir, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    train_pixels, eval_pixels, predict_pixels = (
        processor.image_processor(images=[im], return_tensors="pt")["pixel_values"]
        for im in (train_image, eval_image, predict_image)
    )
    assert torch.equal(train_pixels, eval_pixels)
    assert torch.equal(train_pixels, predict_pixels)


@pytest.mark.parametrize("suffix, expected", [
    (".csv", r"declares .*train-00000-of-00001\.csv; wellocr reads parquet files only"),
    (".none", r"declares splits datasets cannot resolve"),
])
def test_a_readme_declaring_files_wellocr_cannot_read_is_a_user_error(tmp_path, hf_cache, suffix, expected):
    directory = synth(tmp_path / "headers", 1)
    readme = directory / "README.md"
    for split in ("train", "eval"):
        (directory / "data" / f"{split}-00000-of-00001.csv").write_text("answer\nA\n")
        readme.write_text(readme.read_text().replace(f"path: data/{split}-*", f"path: data/{split}-*{suffix}"))
    with pytest.raises(UserError, match=expected) as raised:
        D.load_raw_splits(cfg_for(directory))
    assert "\n" not in str(raised.value)
