import json
import os
import shutil

import pytest

from wellocr import checkpoint
from wellocr.checkpoint import (
    MARKER,
    RetentionPolicy,
    atomic_path,
    best_checkpoint,
    checkpoint_eval_loss,
    eval_losses,
    incomplete_reason,
    latest_complete_checkpoint,
    list_checkpoints,
    mark_complete,
    read_trainer_state,
    remove_incomplete,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def make_checkpoint(run_dir, step, eval_loss=None, complete=True):
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x" * (step + 10))
    history = [{"step": step, "loss": 1.0}]
    if eval_loss is not None:
        history.append({"step": step, "eval_loss": eval_loss})
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))
    if complete:
        mark_complete(path, step)
    return path


@pytest.mark.parametrize("write, content, read", [
    (write_text_atomic, "new text\n", lambda p: p.read_text()),
    (write_bytes_atomic, b"new\x00bytes", lambda p: p.read_bytes()),
    (write_json_atomic, {"new": [1, 2]}, lambda p: json.loads(p.read_text())),
])
def test_an_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch, write, content, read):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (synced.append(os.path.isdir(f"/proc/self/fd/{fd}")),
                                                            real_fsync(fd)))
    target = tmp_path / "file"
    target.write_text("old")
    write(target, content)
    assert read(target) == content
    assert os.listdir(tmp_path) == ["file"]
    assert False in synced and True in synced  # the file, then its directory


def test_a_failed_atomic_write_keeps_the_old_content_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"old": 1})
    with pytest.raises(TypeError):  # not JSON: json.dump fails after writing part of the object
        write_json_atomic(target, {"a": 1, "b": object()})
    assert json.loads(target.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of it")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_no_checkpoint_gives_none(tmp_path):
    assert latest_complete_checkpoint(tmp_path) is None
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_latest_is_by_step_not_by_name(tmp_path):
    for step in (10, 50, 9):
        make_checkpoint(tmp_path, step)
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-50"


def test_planted_partial_checkpoint_is_ignored_with_a_message(tmp_path, caplog):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, complete=False)
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert "ignoring checkpoint-20: no completeness marker" in caplog.text


def test_corrupt_checkpoint_falls_back_to_the_previous(tmp_path):
    make_checkpoint(tmp_path, 10)
    bad = make_checkpoint(tmp_path, 20)
    (bad / "adapter_model.safetensors").write_bytes(b"truncated")
    assert "marker says" in incomplete_reason(bad)
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-10"
    (bad / "adapter_model.safetensors").unlink()
    assert "missing" in incomplete_reason(bad)


def test_unreadable_marker_is_incomplete(tmp_path):
    path = make_checkpoint(tmp_path, 10)
    (path / MARKER).write_text("{half a json")
    assert incomplete_reason(path).startswith("no completeness marker")


def test_marker_lists_every_file_with_its_size(tmp_path):
    path = make_checkpoint(tmp_path, 7)
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 7
    assert marker["files"] == {"adapter_model.safetensors": 17,
                               "trainer_state.json": (path / "trainer_state.json").stat().st_size}


def test_remove_incomplete_deletes_only_incomplete(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, complete=False)
    assert remove_incomplete(tmp_path) == ["checkpoint-20"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10"]


def test_eval_loss_is_read_at_the_checkpoint_step(tmp_path):
    assert checkpoint_eval_loss(make_checkpoint(tmp_path, 10, eval_loss=0.5)) == 0.5
    assert checkpoint_eval_loss(make_checkpoint(tmp_path, 20)) is None


def test_the_trainer_state_reader_serves_the_eval_loss_readers(tmp_path):
    from wellocr import compare, report

    first, second = make_checkpoint(tmp_path, 10, eval_loss=0.7), make_checkpoint(tmp_path, 20, eval_loss=0.4)
    assert read_trainer_state(second)["global_step"] == 20
    assert eval_losses(read_trainer_state(second)) == [0.4] and eval_losses(read_trainer_state(second), step=10) == []
    assert compare.best_eval_loss(tmp_path) == 0.4
    assert report.read_log_history(tmp_path) == read_trainer_state(second)["log_history"]
    (second / "trainer_state.json").write_text("{not json")
    assert read_trainer_state(second) is None and read_trainer_state(tmp_path / "missing") is None
    assert checkpoint_eval_loss(second) is None and compare.best_eval_loss(tmp_path) == 0.7
    assert report.read_log_history(tmp_path) == read_trainer_state(first)["log_history"]  # the newest readable


def test_seed_retention_case_adapted(tmp_path):
    """The seed plan's case: losses 10:0.5 20:0.3 30:0.4 40:0.2 50:0.25, keep_best=2, keep_recent=2."""
    for step, loss in {10: 0.5, 20: 0.3, 30: 0.4, 40: 0.2, 50: 0.25}.items():
        make_checkpoint(tmp_path, step, eval_loss=loss)
    deleted = RetentionPolicy(keep_best=2, keep_recent=2).apply(tmp_path)
    kept = {p.name for p in list_checkpoints(tmp_path)}
    assert {"checkpoint-40", "checkpoint-50", "checkpoint-20"} <= kept  # best, recent + second-best, third best
    assert len(kept) <= 4
    assert deleted == ["checkpoint-10"]


def test_retention_never_deletes_the_best_or_the_protected(tmp_path):
    for step, loss in {10: 0.1, 20: 0.9, 30: 0.8, 40: 0.7}.items():
        make_checkpoint(tmp_path, step, eval_loss=loss)
    RetentionPolicy(keep_best=0, keep_recent=1).apply(tmp_path, protect={"checkpoint-20"})
    assert {p.name for p in list_checkpoints(tmp_path)} == {"checkpoint-10", "checkpoint-20", "checkpoint-40"}


def test_retention_keeps_recent_checkpoints_without_eval_loss(tmp_path):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step)
    RetentionPolicy(keep_best=2, keep_recent=2).apply(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-30"]


def test_retention_leaves_incomplete_checkpoints_alone(tmp_path):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 40, complete=False)
    RetentionPolicy(keep_best=0, keep_recent=1).apply(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-30", "checkpoint-40"]


def test_best_checkpoint_is_lowest_eval_loss_among_complete(tmp_path):
    make_checkpoint(tmp_path, 10, eval_loss=0.4)
    make_checkpoint(tmp_path, 20, eval_loss=0.2)
    make_checkpoint(tmp_path, 30, eval_loss=0.1, complete=False)
    assert best_checkpoint(tmp_path).name == "checkpoint-20"


def test_checkpoints_of_a_real_run_are_complete(trained_run):
    assert [p.name for p in list_checkpoints(trained_run)] == ["checkpoint-4", "checkpoint-8"]
    assert all(incomplete_reason(p) is None for p in list_checkpoints(trained_run))
    assert incomplete_reason(trained_run / "final") is None


def test_a_kill_mid_copy_of_a_real_checkpoint_is_detected(trained_run, tmp_path):
    partial = tmp_path / "checkpoint-8"
    shutil.copytree(trained_run / "checkpoint-8", partial)
    with open(partial / "optimizer.pt", "r+b") as fh:
        fh.truncate(10)
    assert "optimizer.pt" in incomplete_reason(partial)
