"""GPU prices per cloud (the table shipped as `wellocr/prices.csv`), the cloud a process runs on, and its GPU.

A managed spot job may recover onto another cloud, so the cost ledger prices each attempt by where it ran: the cloud
from SkyPilot's `SKYPILOT_CLUSTER_INFO` (JSON with a `cloud` key, e.g. "RunPod", "AWS", "GCP"), the GPU from the
device's name. `prices.csv` is built by `scripts/build_prices.py` from SkyPilot's catalog files (skypilot-catalog
`catalogs/v8/<cloud>/vms.csv`); every row names the catalog file and commit it came from.

Imports neither torch nor transformers: the GPU's name is handed in by the caller.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from wellocr.errors import UserError

PRICES_CSV = Path(__file__).with_name("prices.csv")
CLUSTER_INFO_ENV = "SKYPILOT_CLUSTER_INFO"
LOCAL = "local"  # not under SkyPilot: the caller's own machine
REFERENCE_CLOUD = "runpod"  # priced where a cloud has no row for the GPU (and for local GPU runs)
CPU = "CPU"
FIELDS = ("cloud", "gpu", "spot", "on_demand", "source")

# Qualifying rule for the multi-cloud job (sky/train_r16.yaml): a GPU with at least this much memory, bf16 (compute
# capability 8.0 or newer), and a spot price in the cloud's catalog.
MIN_GPU_MEMORY_GB = 22.0
MIN_BF16_CAPABILITY = (8, 0)
# Compute capability by catalog accelerator name (NVIDIA's CUDA GPU list); the catalogs do not carry it.
COMPUTE_CAPABILITY: dict[str, tuple[int, int]] = {
    "RTX4090": (8, 9), "L4": (8, 9), "L40S": (8, 9), "RTX3090": (8, 6), "A10G": (8, 6), "A10": (8, 6),
    "RTXA6000": (8, 6), "A100": (8, 0), "A100-80GB": (8, 0), "H100": (9, 0), "H100-SXM": (9, 0), "H200": (9, 0),
    "T4": (7, 5), "V100": (7, 0),
}


@dataclass(frozen=True)
class Price:
    """USD per GPU-hour on one cloud, and the catalog rows it was computed from."""

    cloud: str
    gpu: str
    spot: float
    on_demand: float
    source: str


def gpu_key(name: str) -> str:
    """A GPU name as the table keys it: vendor words dropped, upper-cased, letters and digits only
    ("NVIDIA GeForce RTX 4090" and "rtx-4090" are both "RTX4090")."""
    key = "".join(ch for ch in name.upper() if ch.isalnum())
    for word in ("NVIDIA", "GEFORCE", "TESLA"):
        key = key.replace(word, "")
    return _ALIASES.get(key, key)


_ALIASES = {"A6000": "RTXA6000", "A100": "A10080GB", "H200SXM": "H200", "H100PCIE": "H100",
            "A100SXM480GB": "A10080GB", "A100PCIE80GB": "A10080GB", "H100PCIE80GB": "H100", "H10080GBHBM3": "H100SXM"}


@cache
def price_table() -> dict[tuple[str, str], Price]:
    """The shipped table, keyed by (cloud, gpu_key)."""
    with PRICES_CSV.open(newline="") as f:
        rows = [Price(r["cloud"], r["gpu"], float(r["spot"]), float(r["on_demand"]), r["source"])
                for r in csv.DictReader(f)]
    return {(p.cloud, gpu_key(p.gpu)): p for p in rows}


def cloud_from_env(env: Mapping[str, str]) -> tuple[str, str]:
    """(cloud, how it was found): SkyPilot's cluster info names the cloud; without it the run is local."""
    raw = env.get(CLUSTER_INFO_ENV, "").strip()
    if not raw:
        return LOCAL, f"no {CLUSTER_INFO_ENV}"
    try:
        cloud = json.loads(raw).get("cloud")
    except (ValueError, AttributeError):
        cloud = None
    if not isinstance(cloud, str) or not cloud.strip():
        return LOCAL, f"{CLUSTER_INFO_ENV} without a cloud"
    return cloud.strip().lower(), CLUSTER_INFO_ENV


def lookup(cloud: str, gpu: str, spot: bool) -> tuple[float, str]:
    """(USD per GPU-hour, source) for `gpu` on `cloud`; a cloud without a row for the GPU (or a local run) is priced
    at the reference cloud's row, and the source says so. Raises UserError for a GPU the table does not know."""
    if gpu_key(gpu) == CPU:
        return 0.0, "CPU: not billed"
    kind = "spot" if spot else "on-demand"
    table = price_table()
    entry = table.get((cloud, gpu_key(gpu)))
    note = ""
    if entry is None:
        entry = table.get((REFERENCE_CLOUD, gpu_key(gpu)))
        note = f"; {cloud} has no row for it: {REFERENCE_CLOUD}'s price as the estimate"
    if entry is None:
        known = ", ".join(sorted({f"{p.gpu} ({p.cloud})" for p in table.values()}))
        raise UserError(f"cost.gpu_type: no price known for '{gpu}' (known: {known}); "
                        "set cost.hourly_rate to its USD per GPU-hour")
    rate = entry.spot if spot else entry.on_demand
    return rate, f"table: {entry.gpu} {kind} on {entry.cloud} ({entry.source}){note}"


def table_markdown() -> str:
    """The table as markdown (docs/COST.md holds this output; a test keeps the two in sync)."""
    lines = ["| cloud | GPU | spot $/GPU-h | on-demand $/GPU-h | source |", "|---|---|---|---|---|"]
    for p in sorted(price_table().values(), key=lambda p: (p.cloud, p.gpu)):
        lines.append(f"| {p.cloud} | `{p.gpu}` | {p.spot:.2f} | {p.on_demand:.2f} | {p.source} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- building the table from SkyPilot's catalog


def read_catalog_rows(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def gpu_memory_gb(row: Mapping[str, str]) -> float:
    """One GPU's memory in GB from a catalog row: GpuInfo's total over AcceleratorCount, or, where GpuInfo has no
    total (GCP), its first GPU's `MemoryInfo.SizeInMiB` (what SkyPilot's `list_accelerators` reads). The catalogs
    disagree on the unit of the `...InMiB` fields: AWS and GCP give MiB (L4: 22888 and 24576), RunPod gives GB
    (RTX 4090: 24); values under 1024 are taken as GB, larger ones as MiB."""
    import ast

    info = ast.literal_eval(row["GpuInfo"])
    if "TotalGpuMemoryInMiB" in info:
        per_gpu = float(info["TotalGpuMemoryInMiB"]) / float(row["AcceleratorCount"])
    else:
        per_gpu = float(info["Gpus"][0]["MemoryInfo"]["SizeInMiB"])
    return per_gpu if per_gpu < 1024 else per_gpu / 1024


def offers(rows: Iterable[Mapping[str, str]], accelerator: str, instance_type: str) -> list[dict[str, str]]:
    """The catalog's rows for `instance_type` with one `accelerator`, one per zone, priced whole. AWS and RunPod
    price the machine with its GPU on one row. GCP prices them apart: a VM row (no AcceleratorName) and an
    accelerator row (no InstanceType) per zone; as SkyPilot's GCP catalog does (`gcp_catalog.list_accelerators`;
    the optimizer adds `get_hourly_cost` and `get_accelerator_hourly_cost` of one zone the same way), each zone's VM
    row is joined with that zone's accelerator row and Price and SpotPrice are summed. A zone missing either row is
    left out (SkyPilot's inner join); a missing spot price on either row leaves the sum without one."""
    rows = list(rows)
    machine = [r for r in rows if r["InstanceType"] == instance_type]
    if any(r["AcceleratorName"] for r in machine):
        return [dict(r) for r in machine if r["AcceleratorName"] == accelerator]
    gpus = {(r["Region"], r["AvailabilityZone"]): r for r in rows
            if not r["InstanceType"] and r["AcceleratorName"] == accelerator and float(r["AcceleratorCount"]) == 1}
    combined = []
    for vm in machine:
        gpu = gpus.get((vm["Region"], vm["AvailabilityZone"]))
        if gpu is not None:
            combined.append({**vm, "AcceleratorName": accelerator, "AcceleratorCount": "1", "GpuInfo": gpu["GpuInfo"],
                             "Price": _summed(vm, gpu, "Price"), "SpotPrice": _summed(vm, gpu, "SpotPrice")})
    return combined


def _summed(vm: Mapping[str, str], gpu: Mapping[str, str], field: str) -> str:
    return f"{float(vm[field]) + float(gpu[field]):.5f}" if vm[field] and gpu[field] else ""


def qualifies(accelerator: str, rows: Iterable[Mapping[str, str]]) -> list[str]:
    """Why `accelerator` fails the multi-cloud rule on these catalog rows ([] when it qualifies)."""
    rows = [r for r in rows if r["AcceleratorName"] == accelerator and float(r["AcceleratorCount"] or 0) == 1]
    problems = []
    if not rows:
        return [f"{accelerator}: no single-GPU row in the catalog rows"]
    if not all(r.get("SpotPrice") and float(r["SpotPrice"]) > 0 for r in rows):
        problems.append(f"{accelerator}: a row without a spot price")
    memory = min(gpu_memory_gb(r) for r in rows)
    if memory < MIN_GPU_MEMORY_GB:
        problems.append(f"{accelerator}: {memory:.1f} GB of GPU memory, under {MIN_GPU_MEMORY_GB:g}")
    if COMPUTE_CAPABILITY.get(accelerator, (0, 0)) < MIN_BF16_CAPABILITY:
        problems.append(f"{accelerator}: no bf16 (compute capability {COMPUTE_CAPABILITY.get(accelerator)})")
    return problems


def price_from_catalog(cloud: str, accelerator: str, instance_type: str, rows: Iterable[Mapping[str, str]],
                       source: str) -> Price:
    """A table row from a catalog's rows: the median over regions and zones of price / GPU count of `instance_type`
    with `accelerator` (`offers`: on GCP the VM's and the GPU's rows summed per zone, and the source says so)."""
    rows = list(rows)
    apart = not any(r["AcceleratorName"] for r in rows if r["InstanceType"] == instance_type)
    rows = offers(rows, accelerator, instance_type)
    if not rows:
        raise UserError(f"{source}: no rows for instance type {instance_type} with {accelerator}")
    per_gpu = [(float(r["SpotPrice"]) / float(r["AcceleratorCount"]), float(r["Price"]) / float(r["AcceleratorCount"]))
               for r in rows]
    spot = round(statistics.median(s for s, _ in per_gpu), 4)
    on_demand = round(statistics.median(p for _, p in per_gpu), 4)
    what = f"{instance_type} + {accelerator} (VM and GPU rows summed per zone)" if apart else instance_type
    return Price(cloud, accelerator, spot, on_demand, f"{source}, {what}, median of {len(rows)} zones")


def write_table(prices: Iterable[Price], path: Path = PRICES_CSV) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(FIELDS)
        for p in sorted(prices, key=lambda p: (p.cloud, p.gpu)):
            writer.writerow([p.cloud, p.gpu, f"{p.spot:g}", f"{p.on_demand:g}", p.source])
