"""scripts/pod_setup.sh, the `setup:` of every task in sky/: bounded retries, the torch pin, the stamp.

The script runs for real (bash, the real interpreter, importlib.metadata); only pip is a stand-in, reached through
a `python` wrapper on PATH that answers `python -m pip ...` itself (records the call, fails the first N times) and
hands every other command to the real interpreter. The installed torch the script reads is a distribution record
(`torch-<version>.dist-info`) on PYTHONPATH, found by importlib.metadata before the environment's own torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "pod_setup.sh"

STAND_IN = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  shift 2
  n=$(( $(cat "$PIP_CALLS.count" 2>/dev/null || echo 0) + 1 ))
  echo "$n" > "$PIP_CALLS.count"
  "{python}" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$PIP_CALLS"
  if [ "$n" -le "${{PIP_FAIL_TIMES:-0}}" ]; then
    echo "ERROR: stand-in pip: HTTPSConnectionPool(host='pypi.org'): Read timed out. (call $n)" >&2
    exit "${{PIP_FAIL_CODE:-1}}"
  fi
  echo "Successfully installed wellocr-0.1.0 (stand-in pip)"
  exit 0
fi
exec "{python}" "$@"
"""


class Pod:
    """A pod's view: a repo root with pyproject.toml, an image python whose torch is `torch`, a home for the stamp."""

    def __init__(self, tmp_path: Path, torch: str = "2.9.1+cu128"):
        self.root = tmp_path / "sky_workdir"
        self.root.mkdir()
        shutil.copy(REPO / "pyproject.toml", self.root / "pyproject.toml")
        (tmp_path / "bin").mkdir()
        python = tmp_path / "bin" / "python"
        python.write_text(STAND_IN.format(python=sys.executable))
        python.chmod(0o755)
        self.site = tmp_path / "image-site"
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.calls_file = tmp_path / "pip-calls.jsonl"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("WELLOCR_", "PIP_"))}
        self.env.update(HOME=str(self.home), PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                        PYTHONPATH=str(self.site), PIP_CALLS=str(self.calls_file), WELLOCR_SETUP_BACKOFF="0.05")
        self.set_torch(torch)

    def set_torch(self, version: str) -> None:
        shutil.rmtree(self.site, ignore_errors=True)
        info = self.site / f"torch-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")

    def setup(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], cwd=self.root, env={**self.env, **env},
                              capture_output=True, text=True, timeout=120)

    def pip_calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def stamps(self) -> list[Path]:
        return sorted((self.home / ".cache" / "wellocr-setup").glob("installed-*"))


@pytest.fixture
def pod(tmp_path) -> Pod:
    return Pod(tmp_path)


def test_installs_the_checkout_with_torch_pinned_to_the_images_distribution(pod):
    result = pod.setup("gpu,remote")
    assert result.returncode == 0, result.stdout + result.stderr
    assert pod.pip_calls() == [["install", "--progress-bar", "off", "-e", ".[gpu,remote]", "torch==2.9.1"]]
    assert "installed .[gpu,remote] with torch 2.9.1+cu128" in result.stdout
    assert len(pod.stamps()) == 1 and "torch=2.9.1+cu128" in pod.stamps()[0].read_text()


def test_a_plain_release_is_pinned_as_it_is(pod):
    pod.set_torch("2.10.0")
    assert pod.setup("gpu").returncode == 0
    assert pod.pip_calls()[-1][-2:] == [".[gpu]", "torch==2.10.0"]


def test_a_package_index_hiccup_is_retried_with_a_growing_wait(pod):
    result = pod.setup("gpu,remote", PIP_FAIL_TIMES="2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(pod.pip_calls()) == 3
    assert "pip failed (exit 1, attempt 1 of 4); retrying in 0.05 s" in result.stdout
    assert "pip failed (exit 1, attempt 2 of 4); retrying in 0.1 s" in result.stdout
    assert len(pod.stamps()) == 1


def test_retries_are_bounded_and_the_failure_is_one_line(pod):
    started = time.monotonic()
    result = pod.setup("gpu,remote", PIP_FAIL_TIMES="99", PIP_FAIL_CODE="3", WELLOCR_SETUP_ATTEMPTS="3")
    elapsed = time.monotonic() - started
    assert result.returncode == 3
    assert len(pod.pip_calls()) == 3
    assert result.stdout.count("retrying in") == 2 and "retrying in 0.1 s" in result.stdout
    assert elapsed < 0.05 + 0.1 + 30  # the two waits and three quick pip runs; no third wait
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pod_setup: FAILED: pip install of .[gpu,remote] torch==2.9.1 failed 3 times (last exit 3")
    assert "FAILED_SETUP" in last
    assert pod.stamps() == []  # a failed install vouches for nothing: the next setup tries again


def test_a_repeat_on_the_same_pod_is_a_no_op(pod):
    assert pod.setup("gpu,remote").returncode == 0
    again = pod.setup("gpu,remote", PIP_FAIL_TIMES="99")  # the package index is down: nothing asks it
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already installed on this pod" in again.stdout
    assert len(pod.pip_calls()) == 1


@pytest.mark.parametrize("change", ["pyproject", "extras", "torch"])
def test_the_stamp_is_keyed_on_what_was_installed(pod, change):
    assert pod.setup("gpu,remote").returncode == 0
    extras = "gpu,remote"
    if change == "pyproject":
        (pod.root / "pyproject.toml").write_text((pod.root / "pyproject.toml").read_text() + "\n# changed\n")
    elif change == "extras":
        extras = "gpu"
    else:
        pod.set_torch("2.9.2+cu128")
    again = pod.setup(extras)
    assert again.returncode == 0 and "already installed" not in again.stdout
    assert len(pod.pip_calls()) == 2
    assert pod.pip_calls()[-1][-1] == ("torch==2.9.2" if change == "torch" else "torch==2.9.1")


def test_bad_usage_is_refused_before_any_install(pod, tmp_path):
    for args, env, message in [
        (("gpu remote",), {}, "extras must look like gpu,remote"),
        (("gpu", "remote"), {}, "one argument at most"),
        (("gpu",), {"WELLOCR_SETUP_ATTEMPTS": "0"}, "WELLOCR_SETUP_ATTEMPTS must be a positive whole number"),
    ]:
        result = pod.setup(*args, **env)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    elsewhere = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=pod.env, capture_output=True, text=True)
    assert elsewhere.returncode == 2 and "no pyproject.toml" in elsewhere.stderr
    assert pod.pip_calls() == []
