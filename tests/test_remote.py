"""wellocr.remote against a real S3 API (moto's server on localhost, spoken to by s3fs/botocore) and file://."""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path

import pytest

from wellocr.checkpoint import MARKER, is_complete, latest_complete_checkpoint, mark_complete
from wellocr.config import CheckpointConfig
from wellocr.errors import UserError
from wellocr.remote import RemoteStore

SECRET = "dummy-secret-value-for-tests"
FAST = {"retries": 3, "retry_wait": 0.01, "retry_wait_max": 0.02}


@pytest.fixture
def s3(moto_url, monkeypatch):
    """A fresh bucket on the moto server (conftest's moto_url), with the environment pointing s3fs/botocore at it."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy-access-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"wellocr-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


def keys(client, prefix: str = "") -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=client.bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def write_checkpoint(path: Path, step: int) -> Path:
    (path / "sub").mkdir(parents=True, exist_ok=True)
    (path / "adapter_model.safetensors").write_bytes(os.urandom(2000 + step))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "sub" / "optimizer.pt").write_bytes(os.urandom(500))
    mark_complete(path, step)
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "local" / "exp"
    for step in (4, 8):
        write_checkpoint(run / f"checkpoint-{step}", step)
    (run / "run.json").write_text(json.dumps({"run_name": "exp", "wandb_run_id": "abc"}))
    (run / "config.yaml").write_text("train:\n  max_steps: 8\n")
    (run / "cost.json").write_text(json.dumps({"usd": 1.5}))
    return run


def store(url: str, **kwargs) -> RemoteStore:
    return RemoteStore(url, "exp", **{**FAST, **kwargs})


def upload_all(remote: RemoteStore, run: Path) -> None:
    for name in ("checkpoint-4", "checkpoint-8"):
        remote.upload_checkpoint(run / name)
    for name in ("run.json", "config.yaml", "cost.json"):
        remote.upload_path(run / name)
    assert remote.wait(30), remote.pending()
    assert remote.failures == []


def record_calls(monkeypatch, remote: RemoteStore, method: str) -> list[str]:
    calls: list[str] = []
    original = getattr(remote.fs, method)

    def recording(path, *args, **kwargs):
        calls.append(str(args[0] if method in ("put_file", "get_file") else path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(remote.fs, method, recording)
    return calls


def test_upload_checkpoint_puts_every_file_then_the_marker(s3, run_dir, monkeypatch):
    remote = store(f"s3://{s3.bucket}/prefix")
    puts = record_calls(monkeypatch, remote, "put_file")
    remote.upload_checkpoint(run_dir / "checkpoint-8")
    assert remote.wait(30)
    expected = {f"prefix/exp/checkpoint-8/{f}" for f in
                ("adapter_model.safetensors", "trainer_state.json", "sub/optimizer.pt", MARKER)}
    assert keys(s3) == expected
    assert len(puts) == 4 and puts[-1].endswith(f"checkpoint-8/{MARKER}")
    assert remote.latest_complete_checkpoint() == "checkpoint-8"

    puts.clear()
    remote.upload_checkpoint(run_dir / "checkpoint-8")  # again: harmless, and skipped (same marker remotely)
    assert remote.wait(30) and puts == [] and keys(s3) == expected
    assert remote.close(5) and remote.failures == []


def test_restore_into_empty_dir_gets_newest_checkpoint_and_run_files(s3, run_dir, tmp_path):
    remote = store(f"s3://{s3.bucket}/prefix")
    upload_all(remote, run_dir)
    target = tmp_path / "fresh-machine" / "exp"

    assert store(f"s3://{s3.bucket}/prefix").restore(target) == "checkpoint-8"

    assert is_complete(target / "checkpoint-8")
    assert latest_complete_checkpoint(target) == target / "checkpoint-8"
    assert not (target / "checkpoint-4").exists()  # only the newest one is needed to resume
    for name in ("run.json", "config.yaml", "cost.json", "checkpoint-8/sub/optimizer.pt"):
        assert (target / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert not [p for p in target.iterdir() if "tmp" in p.name]
    # a second restore has nothing newer to fetch
    assert remote.restore(target) is None


def test_checkpoint_without_marker_is_ignored(s3, run_dir, tmp_path, capsys):
    remote = store(f"s3://{s3.bucket}/prefix")
    upload_all(remote, run_dir)
    # an upload killed before its marker (newest step), and one whose files were partly lost
    s3.delete_object(Bucket=s3.bucket, Key=f"prefix/exp/checkpoint-8/{MARKER}")
    write_checkpoint(tmp_path / "c12" / "checkpoint-12", 12)
    s3.upload_file(str(tmp_path / "c12" / "checkpoint-12" / MARKER), s3.bucket, f"prefix/exp/checkpoint-12/{MARKER}")

    assert remote.latest_complete_checkpoint() == "checkpoint-4"
    target = tmp_path / "fresh" / "exp"
    assert remote.restore(target) == "checkpoint-4"
    assert is_complete(target / "checkpoint-4") and not (target / "checkpoint-8").exists()
    out = capsys.readouterr().out
    assert "ignoring checkpoint-8" in out and "no completeness marker" in out
    assert "ignoring checkpoint-12" in out and "missing" in out


def test_restore_keeps_a_newer_complete_local_checkpoint(s3, run_dir, tmp_path):
    remote = store(f"s3://{s3.bucket}/prefix")
    remote.upload_checkpoint(run_dir / "checkpoint-4")
    remote.upload_path(run_dir / "run.json")
    assert remote.wait(30)
    local = tmp_path / "ahead" / "exp"
    write_checkpoint(local / "checkpoint-8", 8)
    (local / "run.json").write_text('{"local": true}')
    os.utime(local / "run.json", (1, 1))  # older by the clock, still kept: the local run is ahead

    assert remote.restore(local) is None
    assert not (local / "checkpoint-4").exists()
    assert json.loads((local / "run.json").read_text()) == {"local": True}
    assert (local / "config.yaml").exists() is False  # not stored remotely: nothing to fetch


def test_restore_replaces_an_incomplete_local_checkpoint_and_older_run_json(s3, run_dir, tmp_path):
    remote = store(f"s3://{s3.bucket}/prefix")
    upload_all(remote, run_dir)
    local = tmp_path / "behind" / "exp"
    write_checkpoint(local / "checkpoint-4", 4)
    (local / "checkpoint-8").mkdir()
    (local / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"half")  # killed mid-save, no marker
    (local / "run.json").write_text('{"stale": true}')
    os.utime(local / "run.json", (1, 1))

    assert remote.restore(local) == "checkpoint-8"
    assert is_complete(local / "checkpoint-8")
    assert (local / "run.json").read_bytes() == (run_dir / "run.json").read_bytes()


def test_interrupted_download_leaves_no_checkpoint_that_looks_complete(s3, run_dir, tmp_path, monkeypatch):
    upload_all(store(f"s3://{s3.bucket}/prefix"), run_dir)
    remote = store(f"s3://{s3.bucket}/prefix", retries=2)
    original = remote.fs.get_file

    def flaky(rpath, lpath, *args, **kwargs):
        if "optimizer" in rpath:
            raise ConnectionError("connection reset")
        return original(rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(remote.fs, "get_file", flaky)
    target = tmp_path / "fresh" / "exp"
    with pytest.raises(RuntimeError, match="restore failed"):
        remote.restore(target)
    assert latest_complete_checkpoint(target) is None and not (target / "checkpoint-8").exists()
    # the next attempt (a working network) cleans up and succeeds
    assert store(f"s3://{s3.bucket}/prefix").restore(target) == "checkpoint-8"
    assert not [p for p in target.iterdir() if "tmp" in p.name]


def test_final_and_eval_are_uploaded_and_restored(s3, run_dir, tmp_path):
    write_checkpoint(run_dir / "final", 8)
    (run_dir / "eval" / "test").mkdir(parents=True)
    (run_dir / "eval" / "test" / "metrics.json").write_text('{"cer": 0.1}')
    remote = store(f"s3://{s3.bucket}/prefix")
    puts = []
    original = remote.fs.put_file
    remote.fs.put_file = lambda lpath, rpath, **kw: (puts.append(rpath), original(lpath, rpath, **kw))[1]
    remote.upload_path(run_dir / "final")
    remote.upload_path(run_dir / "eval")
    assert remote.wait(30) and remote.failures == []
    final_puts = [p for p in puts if "/final/" in p]
    assert len(final_puts) == 4 and final_puts[-1].endswith(f"final/{MARKER}")
    assert "prefix/exp/eval/test/metrics.json" in keys(s3)

    target = tmp_path / "fresh" / "exp"
    assert remote.restore(target) is None  # no checkpoint uploaded here
    assert is_complete(target / "final")
    assert (target / "eval" / "test" / "metrics.json").read_text() == '{"cer": 0.1}'


def test_delete_checkpoint_removes_marker_first(s3, run_dir, monkeypatch):
    remote = store(f"s3://{s3.bucket}/prefix")
    upload_all(remote, run_dir)
    removed = record_calls(monkeypatch, remote, "rm")
    remote.delete_checkpoint("checkpoint-8")
    assert remote.wait(30)
    assert removed[0].endswith(f"checkpoint-8/{MARKER}") and removed[1].endswith("checkpoint-8")
    assert keys(s3, "prefix/exp/checkpoint-8") == set()
    assert keys(s3, "prefix/exp/checkpoint-4")
    assert remote.latest_complete_checkpoint() == "checkpoint-4"


def test_delete_waits_for_the_pending_upload_of_the_same_checkpoint(s3, run_dir, monkeypatch):
    remote = store(f"s3://{s3.bucket}/prefix", max_workers=2)
    gate, entered = threading.Event(), threading.Event()
    original = remote.fs.put_file

    def slow_put(lpath, rpath, **kwargs):
        entered.set()
        gate.wait(10)
        return original(lpath, rpath, **kwargs)

    monkeypatch.setattr(remote.fs, "put_file", slow_put)
    remote.upload_checkpoint(run_dir / "checkpoint-4")
    assert entered.wait(10)  # the upload is running, held at the gate
    remote.delete_checkpoint("checkpoint-4")  # must not overtake the upload
    remote.upload_checkpoint(run_dir / "checkpoint-8")
    gate.set()
    assert remote.wait(30) and remote.failures == []
    assert keys(s3, "prefix/exp/checkpoint-4") == set()
    assert remote.latest_complete_checkpoint() == "checkpoint-8"


def test_queued_upload_of_a_checkpoint_being_deleted_is_skipped(s3, run_dir, monkeypatch):
    remote = store(f"s3://{s3.bucket}/prefix", max_workers=1)
    gate, entered = threading.Event(), threading.Event()
    original = remote.fs.put_file
    puts: list[str] = []

    def held_put(lpath, rpath, **kwargs):
        puts.append(rpath)
        if rpath.endswith("run.json"):
            entered.set()
            gate.wait(10)
        return original(lpath, rpath, **kwargs)

    monkeypatch.setattr(remote.fs, "put_file", held_put)
    remote.upload_path(run_dir / "run.json")  # occupies the only worker
    assert entered.wait(10)
    remote.upload_checkpoint(run_dir / "checkpoint-4")
    remote.delete_checkpoint("checkpoint-4")  # retention, before the upload even started
    gate.set()
    assert remote.wait(30) and remote.failures == []
    assert not [p for p in puts if "checkpoint-4" in p]
    assert keys(s3, "prefix/exp/checkpoint-4") == set()


def test_retention_removing_files_during_upload_is_not_a_failure(s3, run_dir, monkeypatch):
    import shutil

    remote = store(f"s3://{s3.bucket}/prefix")
    original = remote.fs.put_file

    def put_then_retention(lpath, rpath, **kwargs):
        original(lpath, rpath, **kwargs)
        if run_dir.joinpath("checkpoint-4").exists():  # what the trainer does after the next save
            remote.delete_checkpoint("checkpoint-4")
            shutil.rmtree(run_dir / "checkpoint-4")

    monkeypatch.setattr(remote.fs, "put_file", put_then_retention)
    remote.upload_checkpoint(run_dir / "checkpoint-4")
    assert remote.wait(30) and remote.failures == []
    assert keys(s3, "prefix/exp/checkpoint-4") == set()


def test_closed_store_refuses_new_work_and_bad_names(s3, run_dir):
    remote = store(f"s3://{s3.bucket}/prefix")
    assert remote.close(5)
    remote.upload_checkpoint(run_dir / "checkpoint-4")  # reported, not raised, not hanging
    assert remote.failures and "closed" in remote.failures[0] and remote.wait(1)
    with pytest.raises(ValueError):
        remote.delete_checkpoint("")  # would be the whole run


def test_remote_final_newer_than_local_final_is_restored(s3, run_dir, tmp_path):
    write_checkpoint(run_dir / "final", 16)
    remote = store(f"s3://{s3.bucket}/prefix")
    remote.upload_path(run_dir / "final")
    assert remote.wait(30)
    local = tmp_path / "old" / "exp"
    write_checkpoint(local / "final", 8)
    remote.restore(local)
    assert is_complete(local / "final") and json.loads((local / "final" / MARKER).read_text())["step"] == 16


def test_apply_retention_prunes_what_earlier_machines_left(s3, tmp_path):
    from wellocr.checkpoint import RetentionPolicy

    run = tmp_path / "many" / "exp"
    losses = {4: 0.9, 8: 0.5, 12: 0.7, 16: 0.8, 20: 0.6}  # keep 16, 20 (recent) + 8 (best of the older ones)
    remote = store(f"s3://{s3.bucket}/prefix")
    for step, loss in losses.items():
        path = run / f"checkpoint-{step}"
        (path / "sub").mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"x" * step)
        (path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": step, "eval_loss": loss}]}))
        mark_complete(path, step)
        remote.upload_checkpoint(path)
    assert remote.wait(30)
    remote.apply_retention(RetentionPolicy(keep_best=1, keep_recent=2), protect={"checkpoint-4"})
    assert remote.wait(30) and remote.failures == []
    left = {k.split("/")[2] for k in keys(s3, "prefix/exp/")}
    assert left == {"checkpoint-4", "checkpoint-8", "checkpoint-16", "checkpoint-20"}


def test_failing_upload_is_retried_reported_and_not_raised(s3, run_dir, monkeypatch, caplog):
    remote = store(f"s3://{s3.bucket}-does-not-exist/prefix", retries=3)
    puts = record_calls(monkeypatch, remote, "put_file")
    remote.upload_checkpoint(run_dir / "checkpoint-8")  # returns at once, raises nothing
    remote.upload_path(run_dir / "run.json")
    with caplog.at_level(logging.INFO, logger="wellocr"):
        assert remote.wait(30)  # finished (with failures)
    assert len(remote.failures) == 2
    assert any("upload checkpoint-8 failed" in f for f in remote.failures)
    assert sum(p.endswith("/exp/run.json") for p in puts) == 3  # `retries` attempts
    assert "retry 2 of 2" in caplog.text
    assert SECRET not in caplog.text + " ".join(remote.failures)
    assert remote.close(5)


def test_wait_times_out_and_names_what_did_not_finish(s3, run_dir, monkeypatch, caplog):
    remote = store(f"s3://{s3.bucket}/prefix")
    gate = threading.Event()
    monkeypatch.setattr(remote.fs, "put_file", lambda *a, **k: gate.wait(10))
    remote.upload_checkpoint(run_dir / "checkpoint-8")
    with caplog.at_level(logging.WARNING, logger="wellocr"):
        assert remote.close(0.3) is False
    assert "upload checkpoint-8" in caplog.text
    gate.set()


def test_restore_of_a_missing_bucket_is_a_user_error(s3, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        store(f"s3://{s3.bucket}-missing/prefix").restore(tmp_path / "exp")
    remote = store(f"s3://{s3.bucket}/prefix")
    assert remote.restore(tmp_path / "exp") is None  # empty but existing: fine
    assert not remote.exists()


def test_file_urls_round_trip(run_dir, tmp_path):
    url = f"file://{tmp_path / 'bucket' / 'prefix'}"
    remote = store(url)
    upload_all(remote, run_dir)
    assert is_complete(tmp_path / "bucket" / "prefix" / "exp" / "checkpoint-8")
    target = tmp_path / "fresh" / "exp"
    assert store(url).restore(target) == "checkpoint-8" and is_complete(target / "checkpoint-8")
    remote.delete_checkpoint("checkpoint-8")
    assert remote.close(10)
    assert not (tmp_path / "bucket" / "prefix" / "exp" / "checkpoint-8").exists()
    assert remote.latest_complete_checkpoint() == "checkpoint-4"
    assert store(url).exists() and not RemoteStore(url, "other-run").exists()


def test_from_config_and_missing_protocol_package(monkeypatch, tmp_path):
    import sys

    assert RemoteStore.from_config(CheckpointConfig(), "exp") is None
    remote = RemoteStore.from_config(CheckpointConfig(remote=f"file://{tmp_path}"), "exp")
    assert isinstance(remote, RemoteStore) and remote.latest_complete_checkpoint() is None
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
    implementations = sys.modules["fsspec.registry"]._registry  # fsspec.registry is also a mapping's name
    monkeypatch.delitem(implementations, "gs", raising=False)
    monkeypatch.delitem(implementations, "gcs", raising=False)
    with pytest.raises(UserError, match=r"pip install 'wellocr\[remote\]'"):
        RemoteStore.from_config(CheckpointConfig(remote="gs://bucket/prefix"), "exp")


def test_compile_caches_travel_to_the_next_pod_through_the_bucket(s3, tmp_path, caplog, monkeypatch):
    url = f"s3://{s3.bucket}/runs"
    first = store(url)
    cache = tmp_path / "pod1" / ".compile-cache"
    assert first.restore_compile_cache(cache) is False  # nothing stored yet: a cold start, quietly
    (cache / "triton" / "k1").mkdir(parents=True)
    (cache / "triton" / "k1" / "kernel.cubin").write_bytes(os.urandom(3000))
    (cache / "inductor" / "fxgraph").mkdir(parents=True)
    (cache / "inductor" / "fxgraph" / "entry").write_bytes(b"graph")
    first.upload_compile_cache()
    assert first.wait(30) and first.failures == []
    assert "runs/exp/compile-cache.tar.gz" in keys(s3)
    puts = record_calls(monkeypatch, first, "put_file")
    first.upload_compile_cache()  # unchanged since: nothing sent
    assert first.wait(30) and puts == []

    second = store(url)
    fresh = tmp_path / "pod2" / ".compile-cache"
    assert second.restore_compile_cache(fresh) is True
    kernel = Path("triton") / "k1" / "kernel.cubin"
    assert (fresh / kernel).read_bytes() == (cache / kernel).read_bytes()
    assert (fresh / "inductor" / "fxgraph" / "entry").read_bytes() == b"graph"
    assert not list(fresh.parent.glob(".*tmp*"))  # the downloaded archive is gone
    assert second.restore_compile_cache(fresh) is False  # a pod with its own caches keeps them

    s3.put_object(Bucket=s3.bucket, Key="runs/exp/compile-cache.tar.gz", Body=b"not a tar archive")
    broken = tmp_path / "pod3" / ".compile-cache"
    with caplog.at_level(logging.WARNING, logger="wellocr"):
        assert store(url).restore_compile_cache(broken) is False  # slower, not wrong: never raised
    assert not broken.exists() and "compiles cold" in caplog.text


def test_the_run_files_are_named_once_and_those_present_go_up(tmp_path):
    from wellocr import remote, rundir

    assert remote.RUN_FILES is rundir.RUN_FILES  # what is restored is what the checkpoints and the exit upload
    run = rundir.RunDir(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "bad_rows.jsonl").write_text("")
    assert run.run_files() == [tmp_path / "run.json", tmp_path / "bad_rows.jsonl"]


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_damaged_checkpoint_gets_the_same_verdict_here_and_in_the_bucket(run_dir, tmp_path, damage):
    """One completeness rule (wellocr.checkpoint.marker_mismatch) for local directories and remote copies."""
    from wellocr.checkpoint import incomplete_reason

    url = f"file://{tmp_path / 'bucket'}"
    remote = store(url)
    upload_all(remote, run_dir)
    for copy in (run_dir / "checkpoint-8", tmp_path / "bucket" / "exp" / "checkpoint-8"):
        file = copy / "sub" / "optimizer.pt"
        file.write_bytes(b"short") if damage == "truncate" else file.unlink()
    local = incomplete_reason(run_dir / "checkpoint-8")
    remote_marker, remote_reason = store(url)._complete_remote(store(url)._listing(), "checkpoint-8")
    assert local is not None and remote_marker is None and remote_reason == local
    assert store(url).latest_complete_checkpoint() == "checkpoint-4"
