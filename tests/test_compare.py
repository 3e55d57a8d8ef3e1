"""`python -m wellocr.compare`: one row per run, only the differing config keys, sorted by CER."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import strip_results
from wellocr import compare as C
from wellocr.config import CostConfig
from wellocr.ledger import CostLedger


def write_metrics(run, name, **metrics):
    (run / "eval" / name).mkdir(parents=True, exist_ok=True)
    (run / "eval" / name / "metrics.json").write_text(json.dumps(metrics))


def copy_run(trained_run, dest, **config_changes):
    strip_results(Path(shutil.copytree(trained_run, dest)))
    config = yaml.safe_load((dest / "config.yaml").read_text())
    for key, value in config_changes.items():
        section, name = key.split(".")
        config[section][name] = value
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


@pytest.fixture
def two_runs(trained_run, tmp_path):
    """run-a (lora.r 8, CER 0.30, with a $0.50 ledger) and run-b (lora.r 4, CER 0.10)."""
    a = copy_run(trained_run, tmp_path / "runs" / "run-a")
    b = copy_run(trained_run, tmp_path / "runs" / "run-b", **{"lora.r": 4})
    write_metrics(a, "final", cer=0.30, wer=0.50, fields={"exact_match": 0.25}, split="eval")
    write_metrics(b, "final", cer=0.10, wer=0.20, fields={"exact_match": 0.75}, split="eval")
    ledger = CostLedger.open(a / "cost.json", CostConfig(hourly_rate=1.0), 1, 0, now=1e9, start=1e9, host="pod")
    ledger.heartbeat(8, now=1e9 + 1800, force=True)
    return a, b


def test_table_shows_only_the_differing_keys_and_sorts_by_cer(two_runs, capsys):
    a, b = two_runs
    assert C.main([str(a), str(b)]) == 0
    header, _, first, second = capsys.readouterr().out.splitlines()[:4]
    assert header.split()[:2] == ["run", "lora.r"]
    assert "train.max_steps" not in header and "run.run_name" not in header and "lora.lora_alpha" not in header
    assert first.split()[:3] == ["run-b", "4", "8"] and "0.1000" in first and "75.0%" in first
    assert second.split()[:3] == ["run-a", "8", "8"] and "0.3000" in second and "$0.50" in second


def test_json_rows_have_stable_keys_and_values_from_the_run(two_runs, trained_run, capsys):
    a, b = two_runs
    assert C.main([str(a), str(b), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    assert result["differing_keys"] == ["lora.r"]
    first, second = result["runs"]
    assert set(first) == {"run", "path", "config", "steps", "best_eval_loss", "cer", "wer", "field_accuracy",
                          "metrics_from", "cost_usd", "wall_time_s", "wandb"}
    assert (first["run"], first["config"], first["cer"], first["cost_usd"]) == ("run-b", {"lora.r": 4}, 0.10, None)
    assert (second["run"], second["config"], second["cost_usd"]) == ("run-a", {"lora.r": 8}, pytest.approx(0.5))
    state = json.loads((trained_run / "checkpoint-8" / "trainer_state.json").read_text())
    losses = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    assert first["best_eval_loss"] == pytest.approx(min(losses))
    assert first["steps"] == 8 and first["wall_time_s"] > 0


def test_a_run_without_metrics_sorts_last(two_runs, trained_run, tmp_path, capsys):
    a, b = two_runs
    c = copy_run(trained_run, tmp_path / "runs" / "run-c", **{"lora.r": 2})
    assert C.main([str(c), str(a), str(b), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["run"] for r in runs] == ["run-b", "run-a", "run-c"]
    assert runs[-1]["cer"] is None


def test_without_a_final_evaluation_the_newest_adapter_evaluation_on_the_eval_split_counts(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "runs" / "run-x")
    write_metrics(run, "checkpoint-4", cer=0.4, split="eval", created_at="2026-11-01T00:00:00Z")
    write_metrics(run, "checkpoint-8", cer=0.2, split="eval", created_at="2026-11-02T00:00:00Z")
    write_metrics(run, "final-test", cer=0.1, split="test", created_at="2026-11-03T00:00:00Z")
    write_metrics(run, "base", cer=0.9, split="eval", base_model=True, created_at="2026-11-04T00:00:00Z")

    row = C.run_summary(run)
    assert (row["metrics_from"], row["cer"]) == ("checkpoint-8", 0.2)


def test_a_directory_that_is_not_a_run_exits_2(two_runs, tmp_path, capsys):
    a, _ = two_runs
    (tmp_path / "empty").mkdir()
    assert C.main([str(a), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a wellocr run directory" in err and err.count("\n") == 1


def test_wandb_offline_warns_once_and_prints_the_local_table(two_runs, monkeypatch, capsys):
    a, b = two_runs
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert C.main([str(a), str(b), "--wandb"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "warning: W&B is offline (WANDB_MODE=offline); showing the local table only\n"
    assert captured.out.splitlines()[2].startswith("run-b")
