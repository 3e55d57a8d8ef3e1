"""Rebuild wellocr/prices.csv from a checkout of SkyPilot's catalog (github.com/skypilot-org/skypilot-catalog).

    git clone https://github.com/skypilot-org/skypilot-catalog && git -C skypilot-catalog rev-parse HEAD
    python scripts/build_prices.py skypilot-catalog/catalogs/v8 --commit <that commit>

Each entry below is priced from its cloud's `vms.csv` (median over regions and zones of price / GPU count, spot and
on-demand; on GCP, which prices the VM and the GPU on separate rows, their sum per zone, as SkyPilot adds them), and
the row names the file and commit. Entries whose instance type the checkout lacks keep their row
from the current table (the script says which). `--commit CLOUD=SHA` names a different commit for one cloud.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wellocr.prices import PRICES_CSV, offers, price_from_catalog, price_table, read_catalog_rows, write_table

# (cloud, catalog accelerator name, the single-GPU instance type SkyPilot picks for it)
ENTRIES = [
    ("runpod", "RTX4090", "1x_RTX4090_SECURE"), ("runpod", "RTX3090", "1x_RTX3090_SECURE"),
    ("runpod", "RTXA6000", "1x_RTXA6000_SECURE"), ("runpod", "L40S", "1x_L40S_SECURE"),
    ("runpod", "A100-80GB", "1x_A100-80GB_SECURE"), ("runpod", "H100", "1x_H100_SECURE"),
    ("runpod", "H100-SXM", "1x_H100-SXM_SECURE"), ("runpod", "H200", "1x_H200-SXM_SECURE"),
    ("aws", "L4", "g6.xlarge"),
    ("gcp", "L4", "g2-standard-4"),  # the VM GCP attaches one L4 to (g2 only), and SkyPilot's pick: the cheapest g2
]


def build(catalog_dir: Path, commits: dict[str, str]) -> tuple[list, list]:
    """(rebuilt prices, entries kept from the current table)."""
    table = price_table()
    rebuilt, kept = [], []
    for cloud, accelerator, instance_type in ENTRIES:
        path = Path(catalog_dir) / cloud / "vms.csv"
        rows = read_catalog_rows(path) if path.is_file() else []
        if not offers(rows, accelerator, instance_type):
            kept.extend(p for (c, _), p in table.items() if c == cloud and p.gpu == accelerator)
            continue
        commit = commits.get(cloud) or commits.get("")
        source = f"skypilot-catalog catalogs/v8/{cloud}/vms.csv @{commit[:8]}"
        rebuilt.append(price_from_catalog(cloud, accelerator, instance_type, rows, source))
    return rebuilt, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalog_dir", type=Path, help="catalogs/v8 of a skypilot-catalog checkout")
    parser.add_argument("--commit", action="append", default=[], metavar="[CLOUD=]SHA", required=True)
    parser.add_argument("--out", type=Path, default=PRICES_CSV)
    args = parser.parse_args(argv)
    commits = dict(c.split("=", 1) if "=" in c else ("", c) for c in args.commit)
    rebuilt, kept = build(args.catalog_dir, commits)
    write_table(rebuilt + kept, args.out)
    for p in kept:
        print(f"kept (not in this checkout): {p.cloud} {p.gpu}")
    print(f"wrote {args.out}: {len(rebuilt)} rebuilt, {len(kept)} kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
