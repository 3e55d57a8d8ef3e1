"""The cost ledger, the budget cap and `python -m wellocr.cost`."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState

from conftest import strip_results
from wellocr import cost as C
from wellocr import ledger as L
from wellocr import prices as P
from wellocr.callbacks import CostCallback, StopCallback, StopState
from wellocr.config import CostConfig
from wellocr.errors import UserError

T0 = 1_800_000_000.0  # an explicit "now" for tests that must not depend on the clock


REPO = Path(__file__).resolve().parents[1]
RUNPOD = {"SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": "c", "cloud": "RunPod", "region": "CA"})}
AWS = {"SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": "c", "cloud": "AWS", "region": "us-east-2"})}
GCP = {"SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": "c", "cloud": "GCP", "region": "us-central1"})}
CATALOG = REPO / "tests" / "data" / "catalog"
CATALOG_COMMITS = {"runpod": "01acdfd419ce5afae1289ff14825b893ced0c196",
                   "aws": "00148f2af3672e2229b4f7bf8157d5a3f36e3c35",
                   "gcp": "006059e0f18acb1341e22a27751e9f80df6ba92f"}  # tests/data/catalog/README.md


def cfg(**values) -> CostConfig:
    return CostConfig(**{"gpu_type": "RTX4090", "budget_cap": 0.0, **values})


def read(path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------- ledger


def test_two_attempts_are_both_billed_and_the_first_is_kept(tmp_path):
    path = tmp_path / "cost.json"
    rate = cfg(hourly_rate=2.0)
    first = L.CostLedger.open(path, rate, attempt=1, start_step=0, now=T0, start=T0, host="pod-a")
    first.heartbeat(10, now=T0 + 3600)  # one hour: $2
    kept = read(path)["segments"][0]
    second = L.CostLedger.open(path, rate, attempt=2, start_step=10, now=T0 + 7200, start=T0 + 7000, host="pod-b")
    second.heartbeat(20, now=T0 + 7000 + 1800)  # half an hour: $1

    assert second.total_usd() == pytest.approx(3.0)
    assert second.segment_usd() == pytest.approx(1.0)
    assert second.gpu_hours() == pytest.approx(1.5)
    data = read(path)
    assert [s["attempt"] for s in data["segments"]] == [1, 2]
    assert data["segments"][0] == kept


def test_gpu_count_multiplies_the_cost(tmp_path):
    ledger = L.CostLedger.open(tmp_path / "cost.json", cfg(hourly_rate=1.0, gpu_count=4), 1, 0, now=T0, start=T0)
    ledger.heartbeat(1, now=T0 + 1800)
    assert ledger.total_usd() == pytest.approx(2.0)


def test_restart_on_the_same_host_does_not_bill_the_same_time_twice(tmp_path):
    path = tmp_path / "cost.json"
    boot = cfg(hourly_rate=1.0, bill_from="boot")
    first = L.CostLedger.open(path, boot, attempt=1, start_step=0)
    first.heartbeat(5, now=time.time(), force=True)
    billed_until = first.segment["last_heartbeat"]
    assert first.segment["start"] < billed_until  # billed from boot, so the overlap would be real

    second = L.CostLedger.open(path, boot, attempt=2, start_step=5)

    assert second.segment["start"] == billed_until
    assert "previous segment" in second.segment["start_source"]
    durations = [s["last_heartbeat"] - s["start"] for s in read(path)["segments"]]
    assert second.total_usd() == pytest.approx(sum(durations) / 3600)


def test_a_segment_from_another_host_does_not_move_the_start(tmp_path):
    path = tmp_path / "cost.json"
    boot = cfg(hourly_rate=1.0, bill_from="boot")
    other = L.CostLedger.open(path, boot, attempt=1, start_step=0, host="another-pod")
    other.heartbeat(5, now=time.time(), force=True)

    mine = L.CostLedger.open(path, boot, attempt=2, start_step=5)

    assert mine.segment["start"] == pytest.approx(L.boot_time()[0])
    assert mine.segment["start"] < other.segment["last_heartbeat"]


def test_boot_time_is_in_the_past_and_before_this_process(tmp_path):
    boot, source = L.boot_time()
    assert source == "boot"
    assert 946_684_800 <= boot <= L.process_start_time()[0] <= time.time()  # after 2000-01-01


def test_bill_from_process_starts_the_segment_at_this_process(tmp_path):
    ledger = L.CostLedger.open(tmp_path / "cost.json", cfg(hourly_rate=1.0, bill_from="process"), 1, 0)
    assert ledger.segment["start_source"] == "process"
    assert ledger.segment["start"] == pytest.approx(L.process_start_time()[0])


def test_configured_rate_wins_over_the_table():
    assert L.resolve_rate(cfg(hourly_rate=1.23)) == (1.23, "config (cost.hourly_rate)")


def test_configured_rate_wins_over_the_table_on_any_cloud():
    assert L.resolve_rate(cfg(hourly_rate=1.23), "aws", "L4") == (1.23, "config (cost.hourly_rate)")


def test_table_rate_names_the_gpu_the_kind_the_cloud_and_its_catalog_source():
    rate, spot_source = L.resolve_rate(cfg(spot_instance=True), "runpod", "NVIDIA GeForce RTX 4090")
    l4, on_demand_source = L.resolve_rate(cfg(spot_instance=False), "aws", "NVIDIA L4")
    assert (rate, l4) == (P.price_table()[("runpod", "RTX4090")].spot, P.price_table()[("aws", "L4")].on_demand)
    assert spot_source.startswith("table: RTX4090 spot on runpod (skypilot-catalog catalogs/v8/runpod/vms.csv @")
    assert on_demand_source.startswith("table: L4 on-demand on aws (skypilot-catalog catalogs/v8/aws/vms.csv @")


def test_the_same_gpu_is_priced_by_the_cloud_it_ran_on():
    """An L4 on GCP (g2-standard-4: VM + GPU) and on AWS (g6.xlarge) are different rows, each naming its catalog."""
    gcp, gcp_source = L.resolve_rate(cfg(gpu_type="auto"), "gcp", "NVIDIA L4")
    aws, _ = L.resolve_rate(cfg(gpu_type="auto"), "aws", "NVIDIA L4")
    assert (gcp, aws) == (P.price_table()[("gcp", "L4")].spot, P.price_table()[("aws", "L4")].spot) and gcp != aws
    assert gcp_source.startswith("table: L4 spot on gcp (skypilot-catalog catalogs/v8/gcp/vms.csv @006059e0, "
                                 "g2-standard-4 + L4 (VM and GPU rows summed per zone), median of 44 zones")


def test_a_gpu_the_cloud_has_no_row_for_is_priced_at_runpods_and_says_so():
    rate, source = L.resolve_rate(cfg(), "aws", "RTX4090")  # also a local GPU run: cloud "local"
    assert rate == P.price_table()[("runpod", "RTX4090")].spot
    assert source.endswith("aws has no row for it: runpod's price as the estimate")


def test_cpu_runs_cost_nothing():
    assert L.resolve_rate(cfg(gpu_type="CPU"))[0] == 0.0
    assert L.resolve_rate(cfg(gpu_type="auto"), "local", "CPU") == (0.0, "CPU: not billed")


def test_every_table_row_has_a_catalog_source_and_sane_rates():
    for price in P.price_table().values():
        assert price.source.startswith("skypilot-catalog catalogs/v8/") and "@" in price.source
        assert 0 < price.spot <= price.on_demand < 20


def test_device_names_key_the_table_like_catalog_names():
    names = {"NVIDIA GeForce RTX 4090": "RTX4090", "NVIDIA L4": "L4", "rtx-4090": "RTX4090", "NVIDIA H200": "H200",
             "NVIDIA A100-SXM4-80GB": "A10080GB", "A100-80GB": "A10080GB", "NVIDIA RTX A6000": "RTXA6000"}
    assert {name: P.gpu_key(name) for name in names} == names


@pytest.mark.parametrize("env, cloud", [
    (RUNPOD, "runpod"), (AWS, "aws"), (GCP, "gcp"), ({}, "local"),
    ({"SKYPILOT_CLUSTER_INFO": "{not json"}, "local"), ({"SKYPILOT_CLUSTER_INFO": '{"cloud": ""}'}, "local"),
])
def test_the_cloud_comes_from_skypilots_cluster_info(env, cloud):
    assert P.cloud_from_env(env)[0] == cloud


def test_one_ledger_prices_each_attempt_for_the_cloud_it_ran_on(tmp_path):
    """A job preempted on RunPod and recovered on AWS: two segments, each at its own cloud's price, one budget."""
    path = tmp_path / "cost.json"
    first = L.CostLedger.open(path, cfg(gpu_type="RTX4090"), 1, 0, now=T0, start=T0, host="pod-a", env=RUNPOD)
    first.heartbeat(10, now=T0 + 3600, force=True)
    second = L.CostLedger.open(path, cfg(gpu_type="L4"), 2, 10, now=T0 + 4000, start=T0 + 4000, host="vm-b",
                               env=AWS)
    second.heartbeat(20, now=T0 + 4000 + 7200, force=True)
    table = P.price_table()
    segments = read(path)["segments"]
    assert [(s["cloud"], s["gpu_type"], s["hourly_rate"]) for s in segments] == [
        ("runpod", "RTX4090", table[("runpod", "RTX4090")].spot), ("aws", "L4", table[("aws", "L4")].spot)]
    spent = table[("runpod", "RTX4090")].spot + 2 * table[("aws", "L4")].spot
    assert second.total_usd() == pytest.approx(spent)
    assert L.budget_exhausted(second, cfg(budget_cap=spent * 0.99)).startswith("budget cap $")


def test_auto_prices_the_device_this_process_runs_on(tmp_path):
    ledger = L.CostLedger.open(tmp_path / "cost.json", CostConfig(), 1, 0, env=AWS)
    assert (ledger.segment["cloud"], ledger.segment["gpu_type"]) == ("aws", L.device_gpu())
    if L.device_gpu() == "CPU":  # this machine: no GPU, nothing billed
        assert (ledger.segment["hourly_rate"], ledger.segment["rate_source"]) == (0.0, "CPU: not billed")


def test_report_splits_the_cost_by_cloud(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    first = L.CostLedger.open(run / "cost.json", cfg(), 1, 0, now=T0, start=T0, host="a", env=RUNPOD)
    first.heartbeat(5, now=T0 + 3600, force=True)
    second = L.CostLedger.open(run / "cost.json", cfg(gpu_type="L4"), 2, 5, now=T0 + 4000, start=T0 + 4000,
                               host="b", env=AWS)
    second.heartbeat(9, now=T0 + 4000 + 1800, force=True)
    report = L.cost_report(run)
    runpod, aws = P.price_table()[("runpod", "RTX4090")].spot, P.price_table()[("aws", "L4")].spot
    assert list(report["clouds"]) == ["runpod", "aws"]
    assert report["clouds"]["runpod"] == {"usd": pytest.approx(runpod), "gpu_hours": pytest.approx(1.0),
                                          "segments": 1}
    assert report["clouds"]["aws"]["usd"] == pytest.approx(aws / 2)
    assert report["total_usd"] == pytest.approx(runpod + aws / 2)
    assert C.main(["--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"\non runpod +\${runpod:,.2f} over 1\.00 GPU-hours \(1 segment\)\n", out), out
    assert re.search(rf"\non aws +\${aws / 2:,.2f} over 0\.50 GPU-hours \(1 segment\)\n", out), out


def test_a_local_run_is_billed_from_its_process_start_not_the_machines_boot(tmp_path, capsys):
    """The default (bill_from auto) off SkyPilot: a 10 s local run is not billed for the hours since boot, and the
    report says how the start was chosen."""
    ledger = L.CostLedger.open(tmp_path / "cost.json", CostConfig(hourly_rate=1.0), 1, 0, env={})
    assert ledger.segment["start_source"] == "process (not a SkyPilot pod)"
    assert ledger.segment["start"] == pytest.approx(L.process_start_time()[0])
    assert L.cost_report(tmp_path)["billed_from"] == {"process (not a SkyPilot pod)": 1}
    assert C.main(["--run", str(tmp_path)]) == 0
    assert re.search(r"\nbilled from +process \(not a SkyPilot pod\) \(1 segment\)\n", capsys.readouterr().out)


def test_a_skypilot_pod_is_billed_from_boot_also_on_a_relaunch_there(tmp_path):
    path = tmp_path / "cost.json"
    first = L.CostLedger.open(path, CostConfig(hourly_rate=1.0), 1, 0, env=RUNPOD)
    assert first.segment["start_source"] == "boot (a SkyPilot pod: SKYPILOT_CLUSTER_INFO)"
    assert first.segment["start"] == pytest.approx(L.boot_time()[0])
    first.heartbeat(1, now=time.time(), force=True)
    relaunch = L.CostLedger.open(path, CostConfig(hourly_rate=1.0), 2, 1, env={"SKYPILOT_TASK_ID": "sky-1"})
    assert relaunch.segment["start_source"].startswith("boot (a SkyPilot pod: SKYPILOT_TASK_ID) (after the previous")


def test_an_unpriced_gpu_of_ones_own_machine_trains_unbilled_but_on_a_cloud_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "device_gpu", lambda: "NVIDIA GeForce RTX 3080")  # a GPU this machine does not have
    local = L.CostLedger.open(tmp_path / "a.json", CostConfig(), 1, 0, env={}).segment
    assert (local["cloud"], local["hourly_rate"]) == ("local", 0.0) and "not billed" in local["rate_source"]
    with pytest.raises(UserError, match=r"cost\.gpu_type: no price known for 'NVIDIA GeForce RTX 3080'"):
        L.CostLedger.open(tmp_path / "b.json", CostConfig(), 1, 0, env=AWS)


def test_unknown_gpu_without_rate_is_a_user_error_naming_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"cost\.gpu_type.*'TPU-v9'.*cost\.hourly_rate"):
        L.CostLedger.open(tmp_path / "cost.json", cfg(gpu_type="TPU-v9"), 1, 0)
    assert not (tmp_path / "cost.json").exists()


def test_every_write_leaves_valid_json_and_no_temporary_file(tmp_path):
    path = tmp_path / "cost.json"
    ledger = L.CostLedger.open(path, cfg(hourly_rate=1.0), 1, 0, now=T0, start=T0)
    for step in range(1, 4):
        ledger.heartbeat(step, now=T0 + step, force=True)
        assert read(path)["segments"][-1]["last_step"] == step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cost.json"]


def test_heartbeats_closer_than_the_write_interval_stay_in_memory(tmp_path):
    path = tmp_path / "cost.json"
    ledger = L.CostLedger.open(path, cfg(hourly_rate=1.0), 1, 0, now=T0, start=T0, write_interval_s=10)
    ledger.heartbeat(1, now=T0 + 5)
    assert read(path)["segments"][-1]["last_step"] == 0
    ledger.heartbeat(2, now=T0 + 11)
    assert read(path)["segments"][-1]["last_step"] == 2


def test_corrupt_ledger_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "cost.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="cost.json"):
        L.CostLedger.open(path, cfg(hourly_rate=1.0), 1, 0)


# ---------------------------------------------------------------- budget and callback


def dollar_per_second_ledger(tmp_path, **cost):
    """A ledger at $1 per second (3600 $/GPU-hour), opened at T0."""
    cost_cfg = cfg(hourly_rate=3600.0, **cost)
    return L.CostLedger.open(tmp_path / "cost.json", cost_cfg, 1, 0, now=T0, start=T0), cost_cfg


def log_at(callback, step, logs=None):
    logs = {"loss": 1.0} if logs is None else logs
    callback.on_log(None, TrainerState(global_step=step), TrainerControl(), logs=logs)
    return logs


def test_callback_heartbeats_and_gives_the_cost_so_far_without_touching_the_logs(tmp_path):
    ledger, cost_cfg = dollar_per_second_ledger(tmp_path)
    callback = CostCallback(ledger, StopState(), cost_cfg, max_steps=100, clock=lambda: T0 + 10)
    assert log_at(callback, 10) == {"loss": 1.0}  # the console's logs stay the trainer's own
    assert ledger.segment["last_step"] == 10
    metrics = callback.metrics(10)
    assert metrics["cost/usd"] == pytest.approx(10.0)
    assert metrics["cost/usd_per_step"] == pytest.approx(1.0)
    assert metrics["cost/projected_usd"] == pytest.approx(100.0)


def test_callback_warns_once_at_ninety_percent_of_the_cap(tmp_path, capsys):
    ledger, cost_cfg = dollar_per_second_ledger(tmp_path, budget_cap=10.5)
    now = [T0 + 9.5]
    stop = StopState()
    callback = CostCallback(ledger, stop, cost_cfg, max_steps=100, clock=lambda: now[0])
    log_at(callback, 1)
    now[0] = T0 + 10
    log_at(callback, 2)
    assert capsys.readouterr().out.count("of cost.budget_cap $10.50") == 1
    assert stop.reason is None


def test_callback_requests_a_saving_stop_at_the_cap(tmp_path):
    ledger, cost_cfg = dollar_per_second_ledger(tmp_path, budget_cap=10.0)
    stop = StopState()
    callback = CostCallback(ledger, stop, cost_cfg, max_steps=100, clock=lambda: T0 + 10)
    log_at(callback, 7)

    assert stop.reason == "budget"
    assert "budget cap $10.00 reached ($10.00 spent over 1 attempt)" in stop.message
    assert "raise cost.budget_cap and run --resume-latest" in stop.message
    control = StopCallback(stop).on_step_end(None, TrainerState(global_step=7), TrainerControl())
    assert control.should_training_stop and control.should_save
    assert read(tmp_path / "cost.json")["segments"][-1]["last_step"] == 7


def test_no_cap_never_stops(tmp_path):
    ledger, cost_cfg = dollar_per_second_ledger(tmp_path, budget_cap=0.0)
    stop = StopState()
    log_at(CostCallback(ledger, stop, cost_cfg, max_steps=100, clock=lambda: T0 + 1e6), 3)
    assert stop.reason is None


def test_train_end_writes_the_last_heartbeat(tmp_path):
    ledger, cost_cfg = dollar_per_second_ledger(tmp_path)
    callback = CostCallback(ledger, StopState(), cost_cfg, max_steps=100, clock=lambda: T0 + 1)
    callback.on_train_end(None, TrainerState(global_step=9), TrainerControl())
    assert read(tmp_path / "cost.json")["segments"][-1]["last_step"] == 9


def test_budget_exhausted_at_process_start_counts_earlier_attempts(tmp_path):
    path = tmp_path / "cost.json"
    cost_cfg = cfg(hourly_rate=1.0, budget_cap=1.0)
    first = L.CostLedger.open(path, cost_cfg, 1, 0, now=T0, start=T0, host="pod-a")
    first.heartbeat(50, now=T0 + 3600, force=True)  # $1: the cap
    relaunch = L.CostLedger.open(path, cost_cfg, 2, 50, now=T0 + 4000, start=T0 + 4000, host="pod-b")

    message = L.budget_exhausted(relaunch, cost_cfg)
    assert message is not None and "over 2 attempts" in message
    assert L.budget_exhausted(relaunch, cfg(hourly_rate=1.0, budget_cap=5.0)) is None
    assert L.budget_exhausted(relaunch, cfg(hourly_rate=1.0, budget_cap=0.0)) is None


# ---------------------------------------------------------------- report


@pytest.fixture
def costed_run(trained_run_copy):
    """The trained run with a preempted first attempt, two billed segments ($1.50) and base/final evaluations."""
    run = strip_results(trained_run_copy)
    rate = cfg(hourly_rate=1.0)
    first = L.CostLedger.open(run / "cost.json", rate, 1, 0, now=T0, start=T0, host="pod-a")
    first.heartbeat(4, now=T0 + 3600, force=True)
    second = L.CostLedger.open(run / "cost.json", rate, 2, 4, now=T0 + 4000, start=T0 + 4000, host="pod-b")
    second.heartbeat(8, now=T0 + 4000 + 1800, force=True)
    info = json.loads((run / "run.json").read_text())
    info["attempts"].insert(0, {"attempt": 0, "exit_reason": "preempted", "exit_code": 75})
    for attempt, seconds in zip(info["attempts"], (90.0, 36.0)):  # process start -> first optimizer step
        attempt["first_step_s"] = seconds
    (run / "run.json").write_text(json.dumps(info))
    for name, cer in (("base", 0.50), ("final", 0.20)):
        (run / "eval" / name).mkdir(parents=True)
        (run / "eval" / name / "metrics.json").write_text(json.dumps({"cer": cer, "wer": cer * 2}))
    return run


def test_json_report_has_cost_efficiency_and_cer_value(costed_run, capsys):
    assert C.main(["--run", str(costed_run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_usd"] == pytest.approx(1.5)
    assert report["gpu_hours"] == pytest.approx(1.5)
    assert (report["attempts"], report["preemptions"], report["segments"]) == (2, 1, 2)
    assert (report["steps_done"], report["max_steps"], report["effective_batch"]) == (8, 8, 2)
    assert report["usd_per_step"] == pytest.approx(1.5 / 8)
    assert report["usd_per_1000_samples"] == pytest.approx(1.5 / 16 * 1000)
    assert report["projected_usd"] == pytest.approx(1.5)
    assert report["cer_points_gained"] == pytest.approx(30.0)
    assert report["usd_per_cer_point"] == pytest.approx(1.5 / 30)
    assert report["rate_source"] == "config (cost.hourly_rate)"
    assert (report["startup_attempts"], report["startup_s"]) == (2, 126.0)
    assert report["startup_usd"] == pytest.approx(126.0 / 3600 * 1.0)  # $1.00/GPU-hour


def test_text_report_names_the_rate_used(costed_run, capsys):
    assert C.main(["--run", str(costed_run)]) == 0
    out = capsys.readouterr().out
    assert "$1.50 over 1.50 GPU-hours" in out
    assert "1 preempted" in out
    assert "$1.00/GPU-hour x 1 RTX4090 (config (cost.hourly_rate))" in out
    assert "+30.00 points" in out
    assert "126 s from process start to first step over 2 attempt(s), $0.0350" in out


def test_report_without_cost_ledger_exits_2_with_one_line(trained_run_copy):
    strip_results(trained_run_copy)
    result = subprocess.run([sys.executable, "-m", "wellocr.cost", "--run", str(trained_run_copy)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "cost.json" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_report_on_missing_run_dir_exits_2(tmp_path, capsys):
    assert C.main(["--run", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: --run ")


def test_docs_hold_the_current_price_table():
    assert P.table_markdown() in (REPO / "docs" / "COST.md").read_text()


def test_the_build_script_rebuilds_the_shipped_rows_from_the_checked_in_catalog_rows(tmp_path):
    """scripts/build_prices.py on tests/data/catalog (rows of skypilot-catalog at the commits below) gives the
    rows wellocr/prices.csv ships for the GPUs of sky/train_r16.yaml."""
    out = tmp_path / "prices.csv"
    commits = [arg for cloud, sha in CATALOG_COMMITS.items() for arg in ("--commit", f"{cloud}={sha}")]
    result = subprocess.run([sys.executable, "scripts/build_prices.py", "tests/data/catalog", "--out", str(out),
                             *commits], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "3 rebuilt" in result.stdout
    assert out.read_text() == P.PRICES_CSV.read_text()


def test_gcp_offers_are_the_vm_and_gpu_rows_of_each_zone_summed():
    """GCP prices a g2-standard-4 and its L4 on separate rows; an offer needs both in its zone, and spot on both."""
    rows = P.read_catalog_rows(CATALOG / "gcp" / "vms.csv")
    offers = P.offers(rows, "L4", "g2-standard-4")
    assert len(offers) == 44 and P.qualifies("L4", offers) == []
    central = next(o for o in offers if o["AvailabilityZone"] == "us-central1-a")
    assert (central["SpotPrice"], central["Price"]) == ("0.28184", "0.70683")  # 0.05874 + 0.2231, 0.14679 + 0.56004
    no_gpu_there = [r for r in rows if not (r["AcceleratorName"] and r["AvailabilityZone"] == "us-central1-a")]
    assert len(P.offers(no_gpu_there, "L4", "g2-standard-4")) == 43
    vm_without_spot = [{**r, "SpotPrice": ""} if r["InstanceType"] and r["AvailabilityZone"] == "us-west4-c" else r
                       for r in rows]
    assert P.qualifies("L4", P.offers(vm_without_spot, "L4", "g2-standard-4")) == ["L4: a row without a spot price"]


SKYPILOT_GCP_PRICES = """
import json, sys
from sky import catalog
from sky.clouds import GCP
zones = json.loads(sys.argv[1])
picked, _ = catalog.get_instance_type_for_accelerator("L4", 1, use_spot=True, clouds="gcp")
cost = {z: [GCP().instance_type_to_hourly_cost(picked[0], spot, r, z)
            + GCP().accelerators_to_hourly_cost({"L4": 1}, spot, r, z) for spot in (True, False)] for r, z in zones}
print(json.dumps({"picked": picked, "cost": cost}))
"""


def test_skypilot_prices_the_gcp_rows_as_the_price_builder_does(tmp_path):
    """SkyPilot 0.14's own GCP catalog and cost functions, reading the checked-in rows as its catalog (a catalog file
    put in place by hand is never refreshed from the network), price every zone's spot and on-demand L4 as the sum
    the price table's median is taken over."""
    catalog_dir = tmp_path / ".sky" / "catalogs" / "v8" / "gcp"
    catalog_dir.mkdir(parents=True)
    (catalog_dir / "vms.csv").write_bytes((CATALOG / "gcp" / "vms.csv").read_bytes())
    offers = P.offers(P.read_catalog_rows(CATALOG / "gcp" / "vms.csv"), "L4", "g2-standard-4")
    zones = [(o["Region"], o["AvailabilityZone"]) for o in offers]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "SKY_"))}
    env.update(HOME=str(tmp_path), SKY_RUNTIME_DIR=str(tmp_path), SKYPILOT_DISABLE_USAGE_COLLECTION="1")
    result = subprocess.run([sys.executable, "-c", SKYPILOT_GCP_PRICES, json.dumps(zones)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    skypilot = json.loads(result.stdout.strip().splitlines()[-1])
    assert skypilot["picked"] == ["g2-standard-4"]
    assert {o["AvailabilityZone"]: [float(o["SpotPrice"]), float(o["Price"])] for o in offers} == {
        z: pytest.approx(c, abs=1e-9) for z, c in skypilot["cost"].items()}


def test_cost_callback_is_a_trainer_callback():
    from transformers import TrainerCallback

    assert issubclass(CostCallback, TrainerCallback)


def test_the_ledger_and_the_report_import_neither_torch_nor_transformers():
    code = ("import sys, wellocr.ledger, wellocr.cost; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- the SkyPilot jobs controller


def ledger_only_run(tmp_path, env: dict, run_info: dict | None = None) -> Path:
    """A run directory with two one-hour segments 30 minutes apart (2.5 h from first start to last heartbeat)."""
    run = tmp_path / "run"
    run.mkdir()
    rate = cfg(hourly_rate=1.0)
    first = L.CostLedger.open(run / "cost.json", rate, 1, 0, now=T0, start=T0, host="pod-a", env=env)
    first.heartbeat(4, now=T0 + 3600, force=True)
    second = L.CostLedger.open(run / "cost.json", rate, 2, 4, now=T0 + 5400, start=T0 + 5400, host="pod-b", env=env)
    second.heartbeat(8, now=T0 + 9000, force=True)
    (run / "run.json").write_text(json.dumps(run_info or {"run_name": "r16", "attempts": []}))
    (run / "config.yaml").write_text("train: {max_steps: 16}\n")
    return run


def test_a_segment_records_the_managed_job_it_ran_under(tmp_path):
    managed = L.CostLedger.open(tmp_path / "a.json", cfg(), 1, 0, now=T0, env={"SKYPILOT_MANAGED_JOB_ID": "7"})
    assert managed.segment["sky_managed_job_id"] == "7"
    local = L.CostLedger.open(tmp_path / "b.json", cfg(), 1, 0, now=T0, env={"SKYPILOT_TASK_ID": "sky-2026_x_1"})
    assert local.segment["sky_managed_job_id"] is None


def test_report_of_a_managed_job_shows_the_controller_under_the_projection(tmp_path, capsys):
    run = ledger_only_run(tmp_path, env={"SKYPILOT_MANAGED_JOB_ID": "3"})
    assert C.main(["--run", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["managed_job"] is True and report["total_usd"] == pytest.approx(2.0)  # not in the totals
    assert report["controller_usd_per_hour"] == L.CONTROLLER_USD_PER_HOUR == 0.16
    assert report["controller_usd_during_run"] == pytest.approx(2.5 * 0.16)
    assert C.main(["--run", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("jobs controller"))
    assert lines[at - 1].startswith("projected")
    assert "$0.16/hour on top, not in the totals: at least $0.40 during this run" in lines[at]
    assert "sky down" in lines[at]


def test_report_of_a_run_outside_managed_jobs_has_no_controller(tmp_path, capsys):
    run = ledger_only_run(tmp_path, env={})
    assert C.main(["--run", str(run)]) == 0
    assert "jobs controller" not in capsys.readouterr().out
    assert L.cost_report(run)["controller_usd_per_hour"] is None


def test_an_older_ledger_is_recognised_by_the_managed_jobs_run_name(tmp_path):
    info = {"run_name": "sky-managed-2026-11-28-12-00-00-000000_wellocr-r16_7-0", "run_name_from": "SKYPILOT_TASK_ID"}
    run = ledger_only_run(tmp_path, env={}, run_info=info)
    ledger = json.loads((run / "cost.json").read_text())
    for segment in ledger["segments"]:
        del segment["sky_managed_job_id"]  # written before the field existed
    (run / "cost.json").write_text(json.dumps(ledger))
    assert L.cost_report(run)["managed_job"] is True
    info["run_name"] = "sky-2026-11-28-12-00-00-000000_wellocr-smoke_2-0"  # a `sky launch` cluster, not a job
    (run / "run.json").write_text(json.dumps(info))
    assert L.cost_report(run)["managed_job"] is False
