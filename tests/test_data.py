import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from wellocr import data as D
from wellocr.config import DataConfig
from wellocr.errors import UserError
from wellocr.synthetic import make_sample


def b64_image(width=96, height=64, fmt="JPEG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def write_split(directory, split, rows):
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), directory / f"{split}-00000-of-00001.parquet")


def good_row(i=0):
    return {"image_base64": b64_image(), "instruction": "Transcribe.", "answer": f"WELL: W-{i}"}


def make_dir(tmp_path, train_rows, eval_rows=None):
    root = tmp_path / "ds"
    write_split(root / "data", "train", train_rows)
    write_split(root / "data", "eval", eval_rows or [good_row(0), good_row(1)])
    return root


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(dataset_name=str(path), min_pixels=32 * 32, max_pixels=64 * 32 * 32, **kw)


def test_loads_splits_from_a_synth_directory(synth_data_dir):
    splits = D.load_splits(cfg_for(synth_data_dir))
    assert {name: len(s) for name, s in splits.items()} == {"train": 16, "eval": 6, "test": 3}
    assert all(not s.bad_rows for s in splits.values())


def test_eval_files_without_readme_map_to_eval_split_not_test(tmp_path):
    root = make_dir(tmp_path, [good_row(i) for i in range(3)])
    assert set(D.load_raw_splits(cfg_for(root))) == {"train", "eval"}


def test_subsets_take_the_first_rows(synth_data_dir):
    splits = D.load_splits(cfg_for(synth_data_dir, train_subset=5, eval_subset=2))
    assert (len(splits["train"]), len(splits["eval"])) == (5, 2)
    assert list(splits["train"].dataset["row_index"]) == [0, 1, 2, 3, 4]


def test_loading_does_not_decode_pixels(synth_data_dir, monkeypatch):
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real_load(self))
    splits = D.load_splits(cfg_for(synth_data_dir))
    assert decoded == []
    row = D.trainer_dataset(splits["train"], cfg_for(synth_data_dir))[0]
    assert decoded  # now, and only now, pixels are decoded
    assert row["images"][0].mode == "RGB"


def test_rows_are_prompt_completion_with_images(synth_data_dir):
    cfg = cfg_for(synth_data_dir)
    row = D.trainer_dataset(D.load_splits(cfg)["train"], cfg)[0]
    assert row["prompt"][0]["role"] == "user"
    assert [c["type"] for c in row["prompt"][0]["content"]] == ["image", "text"]
    assert row["completion"][0]["role"] == "assistant"
    assert row["completion"][0]["content"][0]["text"] == make_sample(0, 0, width=384)[1]


def test_images_are_scaled_into_the_pixel_budget(synth_data_dir):
    cfg = cfg_for(synth_data_dir)
    image = D.trainer_dataset(D.load_splits(cfg)["train"], cfg)[0]["images"][0]
    assert cfg.min_pixels <= image.width * image.height <= cfg.max_pixels
    w, h = make_sample(0, 0, width=384)[0].size
    assert abs(image.width / image.height - w / h) < 0.02


def test_row_instruction_falls_back_to_config():
    cfg = DataConfig(instruction="Read it.")
    assert D.row_instruction(None, cfg) == "Read it."
    assert D.row_instruction("  ", cfg) == "Read it."
    assert D.row_instruction("Own.", cfg) == "Own."


def test_missing_column_names_column_and_source(tmp_path):
    rows = [{"image_base64": b64_image(), "answer": "A: 1"}]
    root = make_dir(tmp_path, rows, rows)
    with pytest.raises(UserError, match=r"split 'train' lacks column\(s\) instruction"):
        D.load_splits(cfg_for(root))


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"image_base64": "not base64 at all!!"}, "not valid base64"),
        ({"image_base64": base64.b64encode(b"just some bytes").decode()}, "does not parse"),
        ({"image_base64": ""}, "image_base64 is empty"),
        ({"answer": "   "}, "answer is empty"),
        ({"image_base64": b64_image(400, 300)}, "over data.max_image_pixels"),
    ],
)
def test_bad_rows_are_skipped_named_and_counted(tmp_path, caplog, bad, reason):
    rows = [good_row(i) for i in range(120)]
    rows[7] = {**rows[7], **bad}
    root = make_dir(tmp_path, rows)
    cfg = cfg_for(root, max_image_pixels=100_000, max_bad_fraction=0.01)
    split = D.load_splits(cfg)["train"]
    assert len(split) == 119
    assert [(b.split, b.index) for b in split.bad_rows] == [("train", 7)]
    assert reason in split.bad_rows[0].reason
    assert "train row 7" in caplog.text
    assert 7 not in list(split.dataset["row_index"])


def test_too_many_bad_rows_is_an_error(tmp_path):
    rows = [good_row(i) for i in range(20)]
    rows[3]["answer"] = ""
    rows[4]["answer"] = ""
    with pytest.raises(UserError, match=r"split 'train': 2 of 20 rows are bad \(10.0% > data.max_bad_fraction 5.0%\)"):
        D.load_splits(cfg_for(make_dir(tmp_path, rows), max_bad_fraction=0.05))


def test_row_failing_full_decode_is_substituted_and_recorded(tmp_path):
    rows = [good_row(i) for i in range(4)]
    jpeg = base64.b64decode(b64_image(300, 200))
    rows[1]["image_base64"] = base64.b64encode(jpeg[: len(jpeg) // 2]).decode()  # header parses, pixels don't
    cfg = cfg_for(make_dir(tmp_path, rows))
    split = D.load_splits(cfg)["train"]
    assert len(split) == 4  # the scan cannot see it
    log = tmp_path / "bad_rows.jsonl"
    row = D.trainer_dataset(split, cfg, bad_rows_log=log)[1]
    assert row["row_index"] == 2 and row["completion"][0]["content"][0]["text"] == "WELL: W-2"
    assert [(b.split, b.index) for b in D.read_decode_failures(log)] == [("train", 1)]
    assert "full decode failed" in json.loads(log.read_text().splitlines()[0])["reason"]


def test_samples_longer_than_max_seq_length_are_dropped_and_reported(synth_data_dir, tiny_model_dir):
    from wellocr.processing import load_processor

    cfg = cfg_for(synth_data_dir, max_bad_fraction=1.0)
    processor = load_processor(tiny_model_dir, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    split = D.load_splits(cfg)["train"]
    lengths = D.sample_lengths(split, cfg, processor)
    limit = sorted(lengths)[len(lengths) // 2]
    kept, longest = D.enforce_max_length(split, cfg, processor, limit)
    assert longest <= limit and len(kept) == sum(n <= limit for n in lengths)
    assert all("train.max_seq_length" in b.reason for b in kept.bad_rows)


def test_sample_length_matches_the_collated_sequence(synth_data_dir, tiny_model_dir):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from wellocr.processing import load_processor

    cfg = cfg_for(synth_data_dir)
    processor = load_processor(tiny_model_dir, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    split = D.load_splits(cfg)["train"]
    rows = D.trainer_dataset(split, cfg)
    collator = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)
    batch = collator([dict(rows[0])])
    assert D.sample_lengths(split, cfg, processor)[0] == batch["input_ids"].shape[1]


def test_unknown_hub_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data.dataset_name"):
        D.load_splits(DataConfig(dataset_name="nobody/does-not-exist-wellocr"))


def test_fit_to_pixel_budget_keeps_aspect_ratio():
    w, h = D.fit_to_pixel_budget(4000, 3000, 1000, 100_000)
    assert w * h <= 100_000 and abs(w / h - 4 / 3) < 0.02
    w, h = D.fit_to_pixel_budget(10, 10, 1024, 100_000)
    assert w * h >= 1000


def test_offline_mode_is_not_retried_as_a_network_error():
    from wellocr.retry import is_transient_network_error

    assert not is_transient_network_error(ConnectionError("Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)"))
    assert is_transient_network_error(ConnectionError("connection reset by peer"))
    assert is_transient_network_error(TimeoutError())
    assert not is_transient_network_error(FileNotFoundError("x"))


def test_a_missing_eval_split_is_a_user_error(tmp_path):
    write_split(tmp_path / "ds", "train", [good_row(0)])
    with pytest.raises(UserError, match=r"has no 'eval' split \(found: train\)"):
        D.load_raw_splits(cfg_for(tmp_path / "ds"))


def test_a_file_or_a_folder_without_split_files_is_a_user_error(tmp_path):
    write_split(tmp_path / "ds", "other", [good_row(0)])
    with pytest.raises(UserError, match=r"is a file; give the data set directory"):
        D.load_raw_splits(cfg_for(tmp_path / "ds" / "other-00000-of-00001.parquet"))
    with pytest.raises(UserError, match=r"no parquet files named train\*/eval\*/test\* under"):
        D.load_raw_splits(cfg_for(tmp_path / "ds"))


def test_rows_that_keep_failing_full_decode_are_a_user_error(tmp_path):
    jpeg = base64.b64decode(b64_image(300, 200))
    rows = [{**good_row(i), "image_base64": base64.b64encode(jpeg[: len(jpeg) // 2]).decode()} for i in range(3)]
    cfg = cfg_for(make_dir(tmp_path, rows))
    with pytest.raises(UserError, match=r"split 'train': 3 consecutive rows fail to decode"):
        D.trainer_dataset(D.load_splits(cfg)["train"], cfg)[0]
