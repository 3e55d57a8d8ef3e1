"""Checkpoints in object storage, so a managed spot job can fail over to any region (RunPod cannot FUSE-mount).

The run's files live under `<checkpoint.remote>/<run_name>/` with the run directory's layout. A remote
checkpoint counts only when its `wellocr_complete.json` exists (uploaded last, deleted first) and every file it
lists is there with the listed size. At process start `restore` fetches the newest complete one when it is newer
than the newest complete local one, and `restore_compile_cache` unpacks the compile caches a previous pod left
(one archive, uploaded by `upload_compile_cache` at checkpoints when they changed), so a new pod does not compile
cold; during training `upload_*` / `delete_checkpoint` run on background threads
(training never waits, failures are reported, never raised); at exit `close(timeout)` waits for what is pending.

Works with any fsspec URL: s3:// (s3fs; R2 and other S3 APIs via AWS_ENDPOINT_URL), gs:// (gcsfs), file://.
Credentials come from the environment only and never appear in messages (wellocr.redact).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import queue
import shutil
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_not_exception_type, stop_after_attempt, wait_exponential

from wellocr.checkpoint import (
    MARKER,
    TRAINER_STATE,
    RetentionPolicy,
    atomic_path,
    checkpoint_eval_loss,
    checkpoint_step,
    is_complete,
    latest_complete_checkpoint,
    marker_mismatch,
    read_marker,
    write_json_atomic,
)
from wellocr.errors import UserError
from wellocr.redact import redact
from wellocr.rundir import RUN_FILES

log = logging.getLogger("wellocr")

COMPILE_CACHE_ARCHIVE = "compile-cache.tar.gz"  # a new pod's disk is empty: without it every restart compiles cold
PROGRESS_EVERY_S = 10.0


class RemoteRestoreError(RuntimeError):
    """The run's copy in object storage could not be brought down at start: the trainer stops (exit 1) rather
    than start again from step 0 beside checkpoints it could not read."""


class _LocalGone(Exception):
    """The local file to upload disappeared (retention removed it): not worth a retry."""


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return redact(text[:300])


class _Pool:
    """A few daemon worker threads over a FIFO queue. Daemon, unlike ThreadPoolExecutor's workers (which the
    interpreter joins at exit), so an upload stuck on the network cannot keep a finished trainer alive past
    `close(timeout)`."""

    def __init__(self, workers: int):
        self._queue: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._work, name=f"wellocr-remote-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[], Any]) -> cf.Future:
        future: cf.Future = cf.Future()
        self._queue.put((future, fn))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self) -> None:
        while True:  # cancel what has not started
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)


def open_filesystem(url: str):
    """(fs, root path) for a URL; a one-line UserError when the protocol's package is missing."""
    import fsspec.core

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError:
        raise UserError(f"checkpoint.remote {redact(url)}: no {protocol}:// support installed; "
                        "pip install 'wellocr[remote]'") from None
    except ValueError as exc:
        raise UserError(f"checkpoint.remote {redact(url)}: {_short(exc)}") from None
    return fs, root.rstrip("/")


class RemoteStore:
    """Mirror of one run directory in object storage (see the module docstring)."""

    def __init__(self, url: str, run_name: str, max_workers: int = 2, retries: int = 4,
                 retry_wait: float = 2.0, retry_wait_max: float = 60.0):
        self.url = url.rstrip("/")
        self.run_name = run_name
        self.fs, root = open_filesystem(self.url)
        self.base = f"{root}/{run_name}"
        self.where = redact(f"{self.url}/{run_name}")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols  # a directory tree: parent directories must be made
        self.buckets = not {"file", "local", "memory"} & set(protocols)  # s3/gs: the first path part is a bucket
        self.retries = max(1, retries)
        self.retry_wait, self.retry_wait_max = retry_wait, retry_wait_max
        self.failures: list[str] = []
        self.uploaded = 0  # checkpoint, final/ and eval/ files this process stored: progress (no-progress rule)
        self._pool = _Pool(max(1, max_workers))
        self._lock = threading.Lock()
        self._last: dict[str, cf.Future] = {}  # key -> newest operation, so one key's operations run in order
        self._pending: dict[cf.Future, str] = {}  # operation -> description, until it finishes
        self._queued_paths: set[str] = set()  # upload_path keys waiting to start (later calls coalesce)
        self._doomed: dict[str, int] = {}  # checkpoint name -> pending deletes (a queued upload of it is skipped)
        self._closed = False
        self.compile_cache: Path | None = None  # set by restore_compile_cache; upload_compile_cache archives it
        self._compile_cache_seen: tuple = ()  # (file, size) pairs the store holds, as far as this process knows
        self._compile_cache_queued = False

    @classmethod
    def from_config(cls, checkpoint_cfg: Any, run_name: str) -> RemoteStore | None:
        remote = getattr(checkpoint_cfg, "remote", None)
        return cls(remote, run_name) if remote else None

    # ------------------------------------------------------------ plumbing

    def _remote(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def _retry(self, fn: Callable[[], Any], final: tuple[type[BaseException], ...] = ()) -> Any:
        """fn() with `retries` attempts and exponential backoff; `final` exceptions are answers, not retried."""
        def report(state) -> None:
            log.info("remote: %s; retry %d of %d in %.1f s", _short(state.outcome.exception()),
                     state.attempt_number, self.retries - 1, state.next_action.sleep)

        for attempt in Retrying(stop=stop_after_attempt(self.retries), reraise=True, before_sleep=report,
                                wait=wait_exponential(multiplier=self.retry_wait, max=self.retry_wait_max),
                                retry=retry_if_not_exception_type((_LocalGone, UserError, *final))):
            with attempt:
                return fn()

    def _submit(self, key: str, what: str, fn: Callable[[], Any]) -> cf.Future | None:
        """Run fn on a worker after the previous operation on `key`; failures are reported, never raised."""
        if self._closed:
            self.failures.append(f"{what} not done: the remote store is closed")
            log.warning("remote: %s not done: the remote store is closed", what)
            return None
        with self._lock:
            previous = self._last.get(key)

            def task() -> None:
                if previous is not None:
                    cf.wait([previous])  # FIFO queue: `previous` was taken first, so it is running or done
                started = time.time()
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 - a failed upload must never stop training
                    message = f"{what} failed: {_short(exc)}"
                    self.failures.append(message)
                    log.warning("remote: %s (%s)", message, self.where)
                else:
                    log.debug("remote: %s done in %.1f s", what, time.time() - started)

            future = self._pool.submit(task)
            self._last[key] = future
            self._pending[future] = what

        def finished(f: cf.Future) -> None:
            with self._lock:
                self._pending.pop(f, None)
                if self._last.get(key) is f:
                    del self._last[key]

        future.add_done_callback(finished)
        return future

    def _put(self, local: Path, rel: str) -> None:
        def put() -> None:
            if not local.is_file():
                raise _LocalGone(f"{local} no longer exists")
            target = self._remote(rel)
            if self.local:
                self.fs.makedirs(self.fs._parent(target), exist_ok=True)
            self.fs.put_file(str(local), target)
            if rel not in RUN_FILES and not rel.startswith("logs/"):  # run files go up every attempt: not progress
                with self._lock:
                    self.uploaded += 1

        self._retry(put)

    def _get(self, rel: str, local: Path, size: int | None = None) -> None:
        def get() -> None:
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._remote(rel), str(local))
            if size is not None and local.stat().st_size != size:
                raise OSError(f"{rel}: downloaded {local.stat().st_size} bytes, expected {size}")

        self._retry(get)

    def _rm(self, rel: str, recursive: bool = False) -> None:
        def rm() -> None:
            try:
                self.fs.rm(self._remote(rel), recursive=recursive)
            except FileNotFoundError:
                pass

        self._retry(rm, final=(FileNotFoundError,))

    def _read_remote_marker(self, rel_dir: str) -> dict | None:
        try:
            return json.loads(self._retry(lambda: self.fs.cat_file(self._remote(f"{rel_dir}/{MARKER}")),
                                          final=(FileNotFoundError,)))
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def _listing(self) -> dict[str, dict]:
        """Every remote object of the run: relative path -> info (size, modification time)."""
        self.fs.invalidate_cache()
        try:
            found = self._retry(lambda: self.fs.find(self.base, detail=True), final=(FileNotFoundError,))
        except FileNotFoundError:
            found = {}
        prefix = self.fs._strip_protocol(self.base).rstrip("/") + "/"
        return {path[len(prefix):]: info for path, info in found.items()
                if path.startswith(prefix) and info.get("type", "file") != "directory"}

    def _complete_remote(self, listing: dict[str, dict], name: str) -> tuple[dict | None, str | None]:
        """(marker, None) when remote `name/` is complete, else (None, why not)."""
        if f"{name}/{MARKER}" not in listing:
            return None, "no completeness marker (upload interrupted)"
        marker = self._read_remote_marker(name)
        reason = marker_mismatch(marker, lambda rel: listing.get(f"{name}/{rel}", {}).get("size"))
        return (marker, None) if reason is None else (None, reason)

    def _latest_remote(self, listing: dict[str, dict], quiet: bool = False) -> tuple[str | None, dict | None]:
        names = {rel.split("/", 1)[0] for rel in listing if "/" in rel}
        for name in sorted((n for n in names if checkpoint_step(Path(n)) is not None),
                           key=lambda n: checkpoint_step(Path(n)), reverse=True):
            marker, reason = self._complete_remote(listing, name)
            if marker is not None:
                return name, marker
            if not quiet:
                print(f"remote: ignoring {name} at {self.where}: {reason}", flush=True)
        return None, None

    # ------------------------------------------------------------ restore (synchronous, at process start)

    def latest_complete_checkpoint(self) -> str | None:
        return self._latest_remote(self._listing(), quiet=True)[0]

    def exists(self) -> bool:
        """Whether anything of this run is stored remotely."""
        return bool(self._listing())

    def has_progress(self) -> bool:
        """Whether the remote holds a complete checkpoint or final/ of this run (a new run must not reuse the
        name then; a run that only uploaded its config before failing may be started again)."""
        listing = self._listing()
        return (self._latest_remote(listing, quiet=True)[0] is not None
                or self._complete_remote(listing, "final")[0] is not None)

    def missing(self, local_run_dir: Path) -> list[str]:
        """What of a finished run the remote does not hold as it is here, read back from the store: final/
        complete with the local marker's step, and every file of eval/ at its local size. Empty: complete."""
        local_run_dir = Path(local_run_dir)
        listing = self._listing()
        missing = []
        local_final = read_marker(local_run_dir / "final") or {}
        marker, reason = self._complete_remote(listing, "final")
        if marker is None:
            missing.append(f"final/ ({reason})")
        elif marker.get("step") != local_final.get("step"):
            missing.append(f"final/ (step {marker.get('step')} there, {local_final.get('step')} here)")
        eval_dir = local_run_dir / "eval"
        for file in sorted(p for p in eval_dir.rglob("*") if p.is_file()) if eval_dir.is_dir() else []:
            rel = file.relative_to(local_run_dir).as_posix()
            if listing.get(rel, {}).get("size") != file.stat().st_size:
                missing.append(rel)
        return missing

    def restore(self, local_run_dir: Path) -> str | None:
        """Bring the local run directory up to date from the remote copy; the restored checkpoint's name or None.

        Raises (UserError for a missing bucket, RemoteRestoreError otherwise) rather than let a run that has remote
        checkpoints start again from step 0."""
        try:
            return self._restore(Path(local_run_dir))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - one line with the URL, without credentials
            raise RemoteRestoreError(f"remote {self.where}: restore failed ({_short(exc)})") from None

    def _restore(self, local_run_dir: Path) -> str | None:
        listing = self._listing()
        if not listing:
            self._check_root()
            print(f"remote: nothing stored yet at {self.where}", flush=True)
            return None
        local_run_dir.mkdir(parents=True, exist_ok=True)
        remote_name, remote_marker = self._latest_remote(listing)
        local_latest = latest_complete_checkpoint(local_run_dir, quiet=True)
        local_step = checkpoint_step(local_latest) if local_latest is not None else None
        remote_step = checkpoint_step(Path(remote_name)) if remote_name else None
        local_ahead = local_step is not None and (remote_step is None or local_step > remote_step)

        for rel in RUN_FILES:
            if rel not in listing:
                continue
            target = local_run_dir / rel
            if target.is_file() and (local_ahead or _mtime(listing[rel]) <= target.stat().st_mtime):
                continue
            with atomic_path(target) as tmp:
                self._get(rel, tmp, listing[rel].get("size"))
            print(f"remote: restored {rel}", flush=True)

        restored = None
        if remote_name is not None and not local_ahead and remote_name != getattr(local_latest, "name", None):
            started = time.time()
            self._download_dir(remote_name, remote_marker, local_run_dir)
            restored = remote_name
            print(f"remote: restored {remote_name} (step {remote_step}, "
                  f"{sum(remote_marker['files'].values()) / 1e6:.1f} MB, {time.time() - started:.0f} s) "
                  f"from {self.where}", flush=True)
        elif remote_name is not None:
            print(f"remote: local {local_latest.name} is as new as remote {remote_name} or newer; keeping it",
                  flush=True)
        else:
            print(f"remote: no complete checkpoint at {self.where}", flush=True)

        final = local_run_dir / "final"
        local_final_step = (read_marker(final) or {}).get("step", -1) if is_complete(final) else None
        if f"final/{MARKER}" in listing:
            marker, reason = self._complete_remote(listing, "final")
            if marker is None:
                print(f"remote: ignoring final/ at {self.where}: {reason}", flush=True)
            elif local_final_step is None or marker.get("step", -1) > local_final_step:
                self._download_dir("final", marker, local_run_dir)
                print(f"remote: restored final/ (step {marker.get('step')})", flush=True)
        fetched = 0
        for rel, info in listing.items():
            if rel.startswith("eval/") and not (local_run_dir / rel).is_file():
                with atomic_path(local_run_dir / rel) as tmp:
                    self._get(rel, tmp, info.get("size"))
                fetched += 1
        if fetched:
            print(f"remote: restored {fetched} file(s) of eval/", flush=True)
        return restored

    def _check_root(self) -> None:
        """An empty listing: fine for a new run, but a wrong bucket should fail now, not after hours of training."""
        if not self.buckets:
            return
        bucket = self.fs._strip_protocol(self.base).split("/", 1)[0]
        try:
            exists = self._retry(lambda: self.fs.exists(bucket))
        except Exception as exc:  # noqa: BLE001
            raise RemoteRestoreError(f"remote {self.where}: cannot reach the bucket ({_short(exc)})") from None
        if not exists:
            raise UserError(f"checkpoint.remote: bucket {bucket!r} does not exist or these credentials cannot "
                            "see it; create it or fix checkpoint.remote / the storage credentials")

    def _download_dir(self, name: str, marker: dict, local_run_dir: Path) -> None:
        """Download remote `name/` beside its target, verify sizes against the marker, then rename into place."""
        target = local_run_dir / name
        tmp = local_run_dir / f".{name}.remote-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, size in marker["files"].items():
            self._get(f"{name}/{rel}", tmp / rel, size)
        write_json_atomic(tmp / MARKER, marker)  # the marker whose sizes were checked, written last
        if not is_complete(tmp):
            raise RemoteRestoreError(f"remote {self.where}: {name} is not complete after download")
        if target.exists():  # incomplete, or an older final/ (a complete checkpoint would be at least as new)
            (target / MARKER).unlink(missing_ok=True)
            shutil.rmtree(target)
        os.rename(tmp, target)

    # ------------------------------------------------------------ background operations

    def upload_checkpoint(self, local_dir: Path) -> None:
        """Queue the upload of a complete checkpoint (or final/): its files, then the marker last."""
        local_dir = Path(local_dir)
        self._upload_marked(local_dir, local_dir.name)

    def _upload_marked(self, local_dir: Path, name: str) -> None:
        marker = read_marker(local_dir)
        if marker is None or not is_complete(local_dir):
            message = f"upload {name} skipped: {local_dir} is not a complete checkpoint"
            self.failures.append(message)
            log.warning("remote: %s", message)
            return

        def upload() -> None:
            if self._doomed.get(name):
                log.info("remote: %s is being deleted; upload skipped", name)
                return
            if self._read_remote_marker(name) == marker:
                log.info("remote: %s already uploaded", name)
                return
            self._rm(f"{name}/{MARKER}")  # a different earlier upload must not look complete mixed with this one
            started, total = time.time(), 0
            try:
                for rel, size in marker["files"].items():
                    self._put(local_dir / rel, f"{name}/{rel}")
                    total += size
                self._put(local_dir / MARKER, f"{name}/{MARKER}")
            except _LocalGone:
                if self._doomed.get(name):  # retention removed it while uploading; the delete follows
                    return
                raise
            log.info("remote: uploaded %s (%d files, %.1f MB, %.0f s)", name, len(marker["files"]) + 1,
                     total / 1e6, time.time() - started)

        self._submit(name, f"upload {name}", upload)

    def upload_path(self, local_path: Path, remote_name: str | None = None) -> None:
        """Queue the upload of a file or directory of the run dir (directories with a marker: marker last)."""
        local_path = Path(local_path)
        rel = (remote_name or local_path.name).strip("/")
        if local_path.is_dir() and (local_path / MARKER).is_file():
            self._upload_marked(local_path, rel)
            return
        with self._lock:
            if rel in self._queued_paths:
                return  # an upload of it is queued and will read the newest contents
            self._queued_paths.add(rel)

        def upload() -> None:
            with self._lock:
                self._queued_paths.discard(rel)
            if local_path.is_dir():
                for file in sorted(p for p in local_path.rglob("*") if p.is_file()):
                    try:
                        self._put(file, f"{rel}/{file.relative_to(local_path).as_posix()}")
                    except _LocalGone:
                        continue
            else:
                self._put(local_path, rel)

        self._submit(rel, f"upload {rel}", upload)

    def delete_checkpoint(self, name: str) -> None:
        """Queue the deletion of remote `name/` (after its pending upload): the marker first, then the rest."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"delete_checkpoint: {name!r} is not a checkpoint directory name")
        with self._lock:
            self._doomed[name] = self._doomed.get(name, 0) + 1

        def delete() -> None:
            try:
                self._rm(f"{name}/{MARKER}")
                self._rm(name, recursive=True)
            finally:
                with self._lock:
                    self._doomed[name] -= 1
                    if not self._doomed[name]:
                        del self._doomed[name]
            log.info("remote: deleted %s", name)

        self._submit(name, f"delete {name}", delete)

    def apply_retention(self, policy: RetentionPolicy, protect: set[str] = frozenset()) -> None:
        """Background: apply `policy` to the remote's complete checkpoints, those left by earlier machines included
        (local retention only sees local ones), ranked by the eval losses in their trainer_state.json.

        Checkpoints still uploading are not yet complete remotely and so not considered; missing candidates can only
        make the policy keep more, never delete one that the full view would keep."""

        def prune() -> None:
            listing = self._listing()
            names = [rel.split("/", 1)[0] for rel in listing if rel.endswith(f"/{MARKER}") and rel.count("/") == 1]
            losses = {name: self._remote_eval_loss(name) for name in names if checkpoint_step(Path(name)) is not None}
            for name in policy.to_delete(losses, set(protect)):
                self.delete_checkpoint(name)

        self._submit("retention", "remote retention", prune)

    def _remote_eval_loss(self, name: str) -> float | None:
        """wellocr.checkpoint.checkpoint_eval_loss for a remote checkpoint."""
        try:
            state = json.loads(self._retry(lambda: self.fs.cat_file(self._remote(f"{name}/{TRAINER_STATE}")),
                                           final=(FileNotFoundError,)))
        except (FileNotFoundError, ValueError):
            return None
        return checkpoint_eval_loss(Path(name), state if isinstance(state, dict) else {})

    # ------------------------------------------------------------ compile caches (one archive per run)

    def restore_compile_cache(self, cache_dir: Path) -> bool:
        """Unpack the run's stored compile caches into `cache_dir` when it is empty (a new pod); call before torch
        is imported. Without them the first step compiles cold (~65-80 s more on the H200): reported, never raised."""
        self.compile_cache = cache_dir = Path(cache_dir)
        if cache_dir.is_dir() and any(cache_dir.iterdir()):
            return False  # what the store holds is unknown: the first checkpoint uploads these
        started = time.time()
        archive = cache_dir.parent / f".{cache_dir.name}.remote-tmp.tar.gz"
        archive.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._retry(lambda: self.fs.get_file(self._remote(COMPILE_CACHE_ARCHIVE), str(archive)),
                        final=(FileNotFoundError,))
            with tarfile.open(archive) as tar:
                tar.extractall(cache_dir, filter="data")
        except FileNotFoundError:
            return False
        except Exception as exc:  # noqa: BLE001 - a cold compile is slower, not wrong
            shutil.rmtree(cache_dir, ignore_errors=True)
            log.warning("remote: compile caches not restored (%s); this attempt compiles cold", _short(exc))
            return False
        finally:
            archive.unlink(missing_ok=True)
        self._compile_cache_seen = _files_and_sizes(cache_dir)
        print(f"remote: restored the compile caches ({len(self._compile_cache_seen)} files, "
              f"{sum(size for _, size in self._compile_cache_seen) / 1e6:.0f} MB) in {time.time() - started:.1f} s",
              flush=True)
        return True

    def upload_compile_cache(self) -> None:
        """Queue an archive of the compile caches, made and sent on a worker thread when they changed since they
        were restored or last uploaded (one queued at a time)."""
        cache_dir = self.compile_cache
        with self._lock:
            if cache_dir is None or self._compile_cache_queued:
                return
            self._compile_cache_queued = True

        def upload() -> None:
            with self._lock:
                self._compile_cache_queued = False
            seen = _files_and_sizes(cache_dir) if cache_dir.is_dir() else ()
            if not seen or seen == self._compile_cache_seen:
                return
            archive = cache_dir.parent / f".{cache_dir.name}.upload-tmp.tar.gz"
            try:
                with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
                    for rel, _ in seen:
                        try:
                            tar.add(cache_dir / rel, arcname=rel)
                        except FileNotFoundError:  # a compiler's temporary file, renamed away since
                            continue
                self._put(archive, COMPILE_CACHE_ARCHIVE)
                log.info("remote: uploaded the compile caches (%.0f MB)", archive.stat().st_size / 1e6)
            finally:
                archive.unlink(missing_ok=True)
            self._compile_cache_seen = seen

        self._submit(COMPILE_CACHE_ARCHIVE, "upload compile caches", upload)

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._pending.values())

    def wait(self, timeout: float) -> bool:
        """Block until every queued operation finished or `timeout` s passed; True when all finished."""
        deadline = time.time() + max(0.0, timeout)
        announced = False
        while True:
            with self._lock:
                futures = [f for f in self._pending if not f.done()]
            if not futures:
                if announced:
                    print("remote: all uploads finished", flush=True)
                return True
            left = deadline - time.time()
            if left <= 0:
                names = ", ".join(self.pending()) or "?"
                log.warning("remote: gave up waiting after %.0f s; not finished: %s", timeout, names)
                return False
            print(f"remote: waiting for {len(futures)} operation(s) ({', '.join(self.pending()[:4])}"
                  f"{', ...' if len(futures) > 4 else ''}); {left:.0f} s left", flush=True)
            announced = True
            cf.wait(futures, timeout=min(left, PROGRESS_EVERY_S), return_when=cf.ALL_COMPLETED)

    def close(self, timeout: float) -> bool:
        """wait(timeout), then stop the workers (what has not started is cancelled)."""
        done = self.wait(timeout)
        self._closed = True
        self._pool.shutdown()
        return done


def _files_and_sizes(directory: Path) -> tuple:
    """(relative path, size) of every file below `directory`; files that vanish while it looks are left out."""
    found = []
    for file in directory.rglob("*"):
        try:
            if file.is_file():
                found.append((file.relative_to(directory).as_posix(), file.stat().st_size))
        except FileNotFoundError:
            continue
    return tuple(sorted(found))


def _mtime(info: dict) -> float:
    """Modification time of a listed object, as a Unix timestamp (0 when the store does not say)."""
    for key in ("LastModified", "mtime", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            from datetime import datetime

            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0
