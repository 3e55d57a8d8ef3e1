"""Synthetic scanned well-log header images, in the schema of `wrath/well-log-headers-ocr`.

The real data set cannot be downloaded here, so tests, the CPU smoke run and GPU benchmarks use rows
made by this module instead. Each row has three string columns:

- ``image_base64``: a JPEG (or PNG) of the header block of a paper well log, base64-encoded;
- ``instruction``: `INSTRUCTION`, the same in every row;
- ``answer``: one ``LABEL: value`` line per field, ``\\n``-joined, in `FIELDS` order.

The answer labels, in order (`FIELDS`)::

    COMPANY, WELL, FIELD, COUNTY, STATE, API, PERMANENT DATUM, ELEV KB, ELEV DF, ELEV GL,
    LOG TYPE, DATE, RUN NO, DEPTH DRILLER, DEPTH LOGGER, BTM LOG INTERVAL, TOP LOG INTERVAL,
    BIT SIZE, CASING, MUD TYPE, MUD DENSITY, MUD VISCOSITY, RM, RMF, MAX REC TEMP,
    RECORDED BY, WITNESSED BY

Every value is printed verbatim in a labelled cell of the image (COMPANY and LOG TYPE also in the
title band). The printed labels vary ("API No.", "UWI", "Type Fluid in Hole", ...) and a few
unlabelled-in-the-answer cells (location, log measured from, other services) act as distractors, so
a model must map printed labels to answer labels rather than copy them.

A sample depends only on ``(seed, index)``: any slice can be regenerated on its own. `write_dataset`
gives split ``train`` the indices ``0..n-1`` and offsets ``eval`` and ``test`` by `SPLIT_INDEX_OFFSET`,
so a split's rows do not change when another split's size does.

`make_sample_with_words` also returns every word drawn with its box (`write_dataset(word_boxes=True)` writes them to
the sidecar ``words/<split>.jsonl``): the true words in their true places, on which the baseline parser
(wellocr.labelparse) is tested without any OCR engine in between.

The command: ``python -m wellocr.synth`` (wellocr/synth.py). Train and eval need at least one row each:
`datasets` cannot load an empty parquet split.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from wellocr.checkpoint import atomic_path, write_text_atomic
from wellocr.errors import UserError

FIELDS: tuple[str, ...] = (
    "COMPANY",
    "WELL",
    "FIELD",
    "COUNTY",
    "STATE",
    "API",
    "PERMANENT DATUM",
    "ELEV KB",
    "ELEV DF",
    "ELEV GL",
    "LOG TYPE",
    "DATE",
    "RUN NO",
    "DEPTH DRILLER",
    "DEPTH LOGGER",
    "BTM LOG INTERVAL",
    "TOP LOG INTERVAL",
    "BIT SIZE",
    "CASING",
    "MUD TYPE",
    "MUD DENSITY",
    "MUD VISCOSITY",
    "RM",
    "RMF",
    "MAX REC TEMP",
    "RECORDED BY",
    "WITNESSED BY",
)

INSTRUCTION: str = (
    "This is a scanned well-log header. Transcribe its fields. Answer with exactly one line per field, "
    "in this order, each formatted as `LABEL: value`, copying the value as printed on the header: "
    + ", ".join(FIELDS)
    + "."
)

SPLITS: tuple[str, ...] = ("train", "eval", "test")
SPLIT_INDEX_OFFSET: dict[str, int] = {"train": 0, "eval": 1_000_000_000, "test": 2_000_000_000}
MIN_WIDTH = 320
ROW_GROUP_SIZE = 64
JPEG_QUALITY = 90
IMAGE_FORMATS = ("JPEG", "PNG")
EMPTY_SPLIT_REASON = "datasets cannot load an empty parquet split; --test 0 leaves the test split out"
SCHEMA = pa.schema([("image_base64", pa.string()), ("instruction", pa.string()), ("answer", pa.string())])

# ---------------------------------------------------------------------------------------------
# Value vocabularies
# ---------------------------------------------------------------------------------------------

# state name, abbreviation, API state code, ground-level elevation range (ft), counties with API county codes
STATES: tuple[tuple[str, str, int, tuple[int, int], tuple[tuple[str, int], ...]], ...] = (
    ("Texas", "TX", 42, (150, 3600), (("Yoakum", 501), ("Midland", 329), ("Ector", 135), ("Andrews", 3),
                                      ("Reagan", 383), ("Upton", 461), ("Howard", 227), ("Gaines", 165),
                                      ("Karnes", 255), ("Webb", 479))),
    ("Oklahoma", "OK", 35, (700, 2100), (("Kingfisher", 73), ("Canadian", 17), ("Grady", 51), ("Garvin", 49),
                                         ("Stephens", 137), ("Beckham", 9))),
    ("Louisiana", "LA", 17, (5, 160), (("Caddo", 17), ("Lafourche", 57), ("Terrebonne", 109),
                                       ("Calcasieu", 19), ("Acadia", 1))),
    ("New Mexico", "NM", 30, (2900, 4300), (("Eddy", 15), ("Lea", 25), ("San Juan", 45), ("Chaves", 5))),
    ("Kansas", "KS", 15, (1400, 2600), (("Barton", 9), ("Ellis", 51), ("Russell", 167), ("Stafford", 185))),
    ("Wyoming", "WY", 49, (3600, 6800), (("Campbell", 5), ("Converse", 9), ("Natrona", 25), ("Sublette", 35))),
    ("North Dakota", "ND", 33, (1800, 2600), (("McKenzie", 53), ("Williams", 105), ("Mountrail", 61),
                                             ("Dunn", 25))),
    ("Colorado", "CO", 5, (4500, 6600), (("Weld", 123), ("Garfield", 45), ("Rio Blanco", 103))),
    ("California", "CA", 4, (150, 1600), (("Kern", 29), ("Ventura", 111), ("Fresno", 19))),
    ("Montana", "MT", 25, (1900, 3300), (("Richland", 83), ("Fallon", 25), ("Roosevelt", 85))),
    ("Utah", "UT", 43, (4700, 6100), (("Uintah", 47), ("Duchesne", 13))),
)

SURNAMES = (
    "Anderson", "Baker", "Holloway", "Martinez", "Nguyen", "Patterson", "Reeves", "Sandoval", "Thornton",
    "Whitaker", "Castillo", "Dawson", "Fletcher", "Garza", "Hughes", "Jennings", "Keller", "Lindsey",
    "McAllister", "Novak", "Ortega", "Pruitt", "Ramsey", "Stafford", "Tubb", "Underwood", "Vaughn",
    "Wheeler", "Zimmerman", "Blackwell", "Crowley", "Dunbar", "Ellison", "Foster", "Gentry", "Harlan",
    "Jessup", "Kimbrough", "Lockhart", "Mabry", "Nash", "Odom", "Parrish", "Quinlan", "Rutledge",
    "Tolliver", "Voss", "Wolcott", "Brennan", "Caldwell", "Hendricks", "Pickens", "Shelton", "Sorensen",
)
FIRST_NAMES = (
    "James", "Robert", "Linda", "David", "Maria", "Carlos", "Susan", "Thomas", "Karen", "Wayne", "Dale",
    "Glenn", "Rosa", "Kevin", "Brenda", "Luis", "Mark", "Janet", "Hector", "Curtis", "Diane", "Earl",
)
PLACE_WORDS = (
    "Permian", "Red Mesa", "Lone Star", "Black Butte", "Cimarron", "Pecos", "Sabine", "Wichita", "Prairie",
    "High Plains", "Gulf Coast", "Big Horn", "Powder River", "Tri-County", "Sundance", "Eagle Ridge",
    "Blue Stem", "Caprock", "Llano", "Cedar Creek", "Salt Fork", "Mesquite", "Twin Buttes", "Antelope",
)
COMPANY_KINDS = ("Oil", "Petroleum", "Energy", "Exploration", "Resources", "Oil & Gas", "Production",
                 "Operating", "Drilling")
COMPANY_SUFFIXES = ("Company", "Co.", "Corp.", "Corporation", "Inc.", "LLC", "Ltd.", "L.P.")
LEASE_WORDS = ("Unit", "Ranch", "Estate", "Heirs", "Federal", "State", "Trust", "Farms", "Fee", "Gas Unit")
KNOWN_FIELDS = (
    "Wasson", "Spraberry Trend Area", "Yates", "Slaughter", "Levelland", "Kelly-Snyder", "Sho-Vel-Tum",
    "Cement", "Elk City", "Hugoton", "East Texas", "Wildcat", "Wattenberg", "Parshall", "Sand Dunes",
    "Eunice Monument", "Altamont-Bluebell", "Lost Hills", "Caddo Pine Island", "Cedar Hills",
)
FORMATIONS = (
    "Spraberry", "Wolfcamp", "Devonian", "Ellenburger", "Morrow", "Mississippian", "Frio", "Wilcox",
    "Bakken", "Niobrara", "Red Fork", "Clear Fork", "San Andres", "Canyon", "Strawn", "Atoka", "Hunton",
    "Viola", "Arbuckle",
)
DIRECTIONS = ("North", "South", "East", "West", "NE", "SW")
SERVICE_COMPANIES = (
    "Petrolog Wireline Services", "Apex Logging Company", "GeoScan Wireline", "Continental Well Surveys",
    "Tri-State Logging Inc.", "Prairie Wireline", "Delta Well Logging", "Summit Electric Log Co.",
    "Horizon Well Services", "Meridian Wireline",
)
LONG_LOG_NAMES = (
    "Dual Induction Laterolog", "Dual Induction - SFL", "Borehole Compensated Sonic",
    "Compensated Neutron - Litho Density", "Compensated Neutron - Formation Density",
    "Dual Laterolog - Micro SFL", "Spectral Gamma Ray", "Gamma Ray - Neutron", "Cement Bond Log",
    "Array Induction Imager", "Microlog", "Long Spaced Sonic", "Formation Density Compensated",
    "High Resolution Induction", "Induction Electrical Log", "Sidewall Neutron Porosity",
    "Gamma Ray - Caliper", "Dipmeter",
)
# LAS curve mnemonics grouped as they are run together in one tool string
CURVE_SUITES = (
    ("GR", "SP", "ILD", "ILM", "SFLU"),
    ("GR", "CALI", "LLD", "LLS", "MSFL"),
    ("GR", "CALI", "RHOB", "NPHI", "PE", "DRHO"),
    ("GR", "SP", "CALI", "DT"),
    ("GR", "SP", "RT", "RXO"),
)
MUD_TYPES = (
    "Water Based", "Oil Based", "Salt Saturated", "Lignosulfonate", "Fresh Water Gel", "Freshwater Polymer",
    "KCl Polymer", "Native Mud", "Brine", "Invert Emulsion", "Starch", "Lime",
)
MUD_RM_RANGE = {"Salt Saturated": (0.035, 0.09), "Brine": (0.05, 0.2), "KCl Polymer": (0.1, 0.45)}
MUD_DENSITY_RANGE = {"Oil Based": (9.0, 16.0), "Invert Emulsion": (9.0, 16.0), "Salt Saturated": (9.9, 10.6),
                     "Brine": (8.9, 10.2)}
# bit size (in) -> casing that bit drills out of (in)
BIT_TO_CASING = {6.125: (7.0,), 7.875: (8.625, 9.625), 8.5: (9.625,), 8.75: (9.625, 10.75), 9.875: (10.75,),
                 12.25: (13.375,), 17.5: (20.0,)}
BIT_WEIGHTS = {6.125: 2, 7.875: 6, 8.5: 3, 8.75: 6, 9.875: 1, 12.25: 2, 17.5: 1}
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
RUN_WORDS = ("ONE", "TWO", "THREE", "FOUR")
DATUMS = ("Ground Level", "Ground Level", "Ground Level", "Mean Sea Level")

# fields whose printed case follows the header's upper/title-case style
NAME_FIELDS = frozenset({"COMPANY", "WELL", "FIELD", "COUNTY", "STATE", "PERMANENT DATUM", "LOG TYPE",
                         "MUD TYPE", "RECORDED BY", "WITNESSED BY"})

PRINTED_LABELS: dict[str, tuple[str, ...]] = {
    "COMPANY": ("Company", "COMPANY", "Operator"),
    "WELL": ("Well", "Well Name", "Well No."),
    "FIELD": ("Field", "Field / Pool"),
    "COUNTY": ("County", "Cnty."),
    "STATE": ("State", "St."),
    "API": ("API No.", "API Number", "UWI", "API/UWI"),
    "PERMANENT DATUM": ("Permanent Datum", "Perm. Datum"),
    "ELEV KB": ("K.B.", "Elev. KB", "KB"),
    "ELEV DF": ("D.F.", "Elev. DF", "DF"),
    "ELEV GL": ("G.L.", "Elev. GL", "GL"),
    "LOG TYPE": ("Log Type", "Type Log", "Logs Run"),
    "DATE": ("Date", "Log Date"),
    "RUN NO": ("Run No.", "Run Number", "Run"),
    "DEPTH DRILLER": ("Depth - Driller", "Depth Driller", "TD Driller"),
    "DEPTH LOGGER": ("Depth - Logger", "Depth Logger", "TD Logger"),
    "BTM LOG INTERVAL": ("Btm. Log Interval", "Bottom Logged Interval", "Btm. Logged Int."),
    "TOP LOG INTERVAL": ("Top Log Interval", "Top Logged Interval", "Top Logged Int."),
    "BIT SIZE": ("Bit Size", "Bit"),
    "CASING": ("Casing - Driller", "Casing @ Depth", "Csg. Size @ Depth"),
    "MUD TYPE": ("Type Fluid in Hole", "Mud Type", "Fluid Type"),
    "MUD DENSITY": ("Density", "Mud Weight", "Mud Dens."),
    "MUD VISCOSITY": ("Viscosity", "Visc.", "Funnel Visc."),
    "RM": ("Rm @ Meas. Temp", "Rm @ Temp", "Rm"),
    "RMF": ("Rmf @ Meas. Temp", "Rmf @ Temp", "Rmf"),
    "MAX REC TEMP": ("Max. Rec. Temp.", "Max Recorded Temp", "BHT Max"),
    "RECORDED BY": ("Recorded By", "Engineer", "Logging Engineer"),
    "WITNESSED BY": ("Witnessed By", "Witness", "Co. Rep."),
}
DISTRACTOR_LABELS = {
    "LOCATION": "Location",
    "LOG MEASURED FROM": "Log Measured From",
    "DRILLING MEASURED FROM": "Drilling Measured From",
    "OTHER SERVICES": "Other Services",
}

# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def _person(rng: random.Random) -> str:
    surname = rng.choice(SURNAMES)
    form = rng.randrange(3)
    if form == 0:
        return f"{rng.choice(FIRST_NAMES)[0]}. {surname}"
    if form == 1:
        return f"{rng.choice(FIRST_NAMES)[0]}. {rng.choice(FIRST_NAMES)[0]}. {surname}"
    return f"{rng.choice(FIRST_NAMES)} {surname}"


def _company(rng: random.Random) -> str:
    stem = rng.choice(SURNAMES) if rng.random() < 0.4 else rng.choice(PLACE_WORDS)
    return f"{stem} {rng.choice(COMPANY_KINDS)} {rng.choice(COMPANY_SUFFIXES)}"


def _well_name(rng: random.Random) -> str:
    lease = rng.choice(SURNAMES)
    number = rng.randint(1, 48)
    section = rng.randint(1, 36)
    form = rng.randrange(5)
    if form == 0:
        return f"{lease} {rng.choice(LEASE_WORDS)} #{number}"
    if form == 1:
        return f"{lease} {number}-{section}{'H' if rng.random() < 0.4 else ''}"
    if form == 2:
        return f"State {''.join(rng.choice('ABCDEFGHKLMNPRST') for _ in range(2))} No. {number}"
    if form == 3:
        return f"{lease} '{rng.choice('ABCDE')}' {number}"
    return f"{rng.choice(FIRST_NAMES)[0]}. {rng.choice(FIRST_NAMES)[0]}. {lease} {rng.choice(LEASE_WORDS)} {number}"


def _field_name(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return rng.choice(KNOWN_FIELDS)
    name = f"{rng.choice(DIRECTIONS)} {rng.choice(PLACE_WORDS + SURNAMES)}"
    if rng.random() < 0.5:
        name += f" ({rng.choice(FORMATIONS)})"
    return name


def _location(rng: random.Random, state_abbrev: str) -> str:
    if state_abbrev == "TX":
        return (f"Sec. {rng.randint(1, 48)}, Blk. {rng.randint(1, 60)}, "
                f"{rng.choice(('T&P RR Co.', 'H&TC RR Co.', 'GC&SF RR Co.', 'PSL'))} Survey")
    return (f"{rng.randrange(330, 2640, 10)}' F{rng.choice('NS')}L & {rng.randrange(330, 2640, 10)}' "
            f"F{rng.choice('EW')}L, Sec. {rng.randint(1, 36)}, T{rng.randint(1, 40)}{rng.choice('NS')}, "
            f"R{rng.randint(1, 40)}{rng.choice('EW')}")


def _api_number(rng: random.Random, state_code: int, county_code: int) -> str:
    """API/UWI: state, county, unique id, then optional sidetrack and event codes."""
    parts = [f"{state_code:02d}", f"{county_code:03d}", f"{rng.randint(1, 99999):05d}"]
    if rng.random() < 0.6:
        parts.append(f"{rng.choice((0, 0, 0, 1, 2)):02d}")
        if rng.random() < 0.6:
            parts.append(f"{rng.choice((0, 0, 1)):02d}")
    return ("-" if rng.random() < 0.85 else "").join(parts)


def _date(rng: random.Random) -> str:
    year, month, day = rng.randint(1952, 2019), rng.randint(1, 12), rng.randint(1, 28)
    form = rng.randrange(3)
    if form == 0:
        return f"{day:02d}-{MONTHS[month - 1]}-{year}"
    if form == 1:
        return f"{month:02d}/{day:02d}/{year}"
    return f"{year}-{month:02d}-{day:02d}"


def _log_type(rng: random.Random) -> str:
    if rng.random() < 0.6:
        name = rng.choice(LONG_LOG_NAMES)
        return name + (" / Gamma Ray" if "Gamma" not in name and rng.random() < 0.3 else "")
    suite = rng.choice(CURVE_SUITES)
    curves = sorted(rng.sample(range(len(suite)), rng.randint(3, min(4, len(suite)))))
    return rng.choice(("-", " / ", ", ")).join(suite[i] for i in curves)


def _feet(value: float, thousands: bool) -> str:
    return f"{value:,} ft" if thousands else f"{value} ft"


def _inches(value: float) -> str:
    return f"{value:.3f} in"


def _ohm_m(value: float, temp_f: int) -> str:
    digits = 3 if value < 0.1 else 2
    return f"{value:.{digits}f} ohm-m @ {temp_f} degF"


def _weighted_choice(rng: random.Random, weights: dict) -> object:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def _values(rng: random.Random) -> tuple[dict[str, str], dict[str, str]]:
    """Answer values (in the printed case) and distractor cell values, physically consistent."""
    state, abbrev, state_code, gl_range, counties = rng.choice(STATES)
    county, county_code = rng.choice(counties)
    thousands = rng.random() < 0.35

    gl = rng.randint(*gl_range)
    df = gl + rng.randint(10, 22)
    kb = df + rng.randint(1, 3)

    driller = rng.randint(1500, 16000)
    logger = driller + rng.randint(-25, 15)
    bottom = logger - rng.randint(2, 40)
    casing_depth = rng.randint(int(driller * 0.1), int(driller * 0.5))
    top = casing_depth + rng.randint(0, 30)

    bit = _weighted_choice(rng, BIT_WEIGHTS)
    casing = rng.choice(BIT_TO_CASING[bit])

    mud = rng.choice(MUD_TYPES)
    density = rng.uniform(*MUD_DENSITY_RANGE.get(mud, (8.6, 11.5)))
    rm = rng.uniform(*MUD_RM_RANGE.get(mud, (0.3, 3.5)))
    rm_temp = rng.randint(60, 85)
    rmf = rm * rng.uniform(0.6, 0.9)
    rmf_temp = rm_temp if rng.random() < 0.7 else rng.randint(60, 85)
    surface_temp = rng.randint(60, 80)
    max_temp = round(surface_temp + rng.uniform(1.0, 1.8) * logger / 100)

    run = rng.randint(1, 4)
    values = {
        "COMPANY": _company(rng),
        "WELL": _well_name(rng),
        "FIELD": _field_name(rng),
        "COUNTY": county,
        "STATE": state if rng.random() < 0.8 else abbrev,
        "API": _api_number(rng, state_code, county_code),
        "PERMANENT DATUM": rng.choice(DATUMS),
        "ELEV KB": _feet(kb, thousands),
        "ELEV DF": _feet(df, thousands),
        "ELEV GL": _feet(gl, thousands),
        "LOG TYPE": _log_type(rng),
        "DATE": _date(rng),
        "RUN NO": RUN_WORDS[run - 1] if rng.random() < 0.3 else str(run),
        "DEPTH DRILLER": _feet(driller, thousands),
        "DEPTH LOGGER": _feet(logger, thousands),
        "BTM LOG INTERVAL": _feet(bottom, thousands),
        "TOP LOG INTERVAL": _feet(top, thousands),
        "BIT SIZE": _inches(bit),
        "CASING": f"{_inches(casing)} @ {_feet(casing_depth, thousands)}",
        "MUD TYPE": mud,
        "MUD DENSITY": f"{density:.1f} lb/gal",
        "MUD VISCOSITY": f"{rng.randint(32, 75)} s",
        "RM": _ohm_m(rm, rm_temp),
        "RMF": _ohm_m(rmf, rmf_temp),
        "MAX REC TEMP": f"{max_temp} degF",
        "RECORDED BY": _person(rng),
        "WITNESSED BY": ("Mr. " if rng.random() < 0.3 else "") + _person(rng),
    }
    if rng.random() < 0.7:
        for name in NAME_FIELDS:
            values[name] = values[name].upper()
    suite = rng.choice(CURVE_SUITES)
    distractors = {
        "LOCATION": _location(rng, abbrev),
        "LOG MEASURED FROM": rng.choice(("KB", "K.B.", "DF")),
        "DRILLING MEASURED FROM": rng.choice(("KB", "K.B.", "DF")),
        "OTHER SERVICES": ", ".join(rng.sample(suite, min(3, len(suite)))),
    }
    return values, distractors


# ---------------------------------------------------------------------------------------------
# Layout and drawing
# ---------------------------------------------------------------------------------------------

HEADER_LAYOUTS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("COMPANY",), ("WELL",), ("FIELD",), ("COUNTY", "STATE"), ("API", "LOCATION"),
     ("PERMANENT DATUM", "ELEV KB", "ELEV DF", "ELEV GL"), ("LOG TYPE",)),
    (("COMPANY", "WELL"), ("FIELD", "COUNTY", "STATE"), ("API", "LOCATION"),
     ("PERMANENT DATUM", "ELEV KB", "ELEV DF", "ELEV GL"), ("LOG TYPE", "LOG MEASURED FROM")),
    (("COMPANY",), ("WELL", "FIELD"), ("COUNTY", "STATE", "API"), ("LOCATION",),
     ("PERMANENT DATUM", "LOG MEASURED FROM", "DRILLING MEASURED FROM"), ("ELEV KB", "ELEV DF", "ELEV GL"),
     ("LOG TYPE",)),
)
TABLE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("DATE", "RUN NO"),
    ("DEPTH DRILLER", "DEPTH LOGGER"),
    ("BTM LOG INTERVAL", "TOP LOG INTERVAL"),
    ("BIT SIZE", "CASING"),
    ("MUD TYPE", "MUD DENSITY", "MUD VISCOSITY"),
    ("RM", "RMF", "MAX REC TEMP"),
    ("RECORDED BY", "WITNESSED BY"),
)
CELL_WEIGHTS = {"ELEV KB": 0.6, "ELEV DF": 0.6, "ELEV GL": 0.6, "STATE": 0.8, "LOG MEASURED FROM": 0.6,
                "DRILLING MEASURED FROM": 0.7, "PERMANENT DATUM": 1.2, "LOCATION": 1.6, "LOG TYPE": 1.6}

SANS, SANS_BOLD, SANS_OBLIQUE = "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique"
SERIF, SERIF_BOLD = "DejaVuSerif", "DejaVuSerif-Bold"
MONO, MONO_BOLD = "DejaVuSansMono", "DejaVuSansMono-Bold"
LABEL_FAMILIES = (SANS, SANS_BOLD, SERIF_BOLD, SANS_OBLIQUE, SERIF)
VALUE_FAMILIES = (SANS, SERIF, MONO, MONO_BOLD, SANS_BOLD)
TITLE_FAMILIES = (SANS_BOLD, SERIF_BOLD, MONO_BOLD)
MIN_FONT_SIZE = 7
MIN_ASPECT, MAX_ASPECT = 0.6, 0.8


@dataclass(frozen=True)
class Style:
    """How one header is drawn; drawn from the sample's rng so layouts vary but stay reproducible."""

    label_family: str
    value_family: str
    title_family: str
    labels_upper: bool
    label_on_top: bool
    colon: bool
    rule_after_label: bool
    center_values: bool
    line_width: int
    logo_box: str  # "left", "right" or "none"
    label_variant: int


@functools.cache
def _font_dir() -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    return path if os.path.isdir(path) else None


@functools.lru_cache(maxsize=1024)
def _font(family: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    folder = _font_dir()
    if folder is not None:
        path = os.path.join(folder, family + ".ttf")
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def _fitted_font(family: str, size: int, text: str, max_width: float):
    """The largest font of `family` up to `size` that fits `text` in `max_width` pixels."""
    size = max(size, MIN_FONT_SIZE)
    font = _font(family, size)
    width = font.getlength(text)
    if width <= max_width:
        return font
    size = max(MIN_FONT_SIZE, int(size * max_width / width))
    font = _font(family, size)
    while size > MIN_FONT_SIZE and font.getlength(text) > max_width:
        size -= 1
        font = _font(family, size)
    return font


def _style(rng: random.Random) -> Style:
    return Style(
        label_family=rng.choice(LABEL_FAMILIES),
        value_family=rng.choice(VALUE_FAMILIES),
        title_family=rng.choice(TITLE_FAMILIES),
        labels_upper=rng.random() < 0.6,
        label_on_top=rng.random() < 0.4,
        colon=rng.random() < 0.5,
        rule_after_label=rng.random() < 0.3,
        center_values=rng.random() < 0.3,
        line_width=rng.choice((1, 1, 2, 2, 3)),
        logo_box=rng.choice(("left", "left", "right", "none")),
        label_variant=rng.randrange(1 << 30),
    )


def _rows(rng: random.Random) -> list[tuple[str, ...]]:
    """Header rows then the run table, each row a tuple of field or distractor keys."""
    header = list(rng.choice(HEADER_LAYOUTS))
    groups = list(TABLE_GROUPS)
    if rng.random() < 0.25:
        rng.shuffle(groups)
    cells = [key for group in groups for key in group]
    if rng.random() < 0.5:
        cells.append("OTHER SERVICES")
    columns = rng.choice((2, 3))
    table = [tuple(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return header + table


def _printed_label(key: str, style: Style) -> str:
    if key in DISTRACTOR_LABELS:
        label = DISTRACTOR_LABELS[key]
    else:
        variants = PRINTED_LABELS[key]
        label = variants[(style.label_variant + FIELDS.index(key)) % len(variants)]
    label = label.upper() if style.labels_upper else label
    return label + ":" if style.colon else label


def _shared_sizes(style: Style, label: str, value: str, label_size: int, value_size: int,
                  room: float) -> tuple[int, int]:
    """Shrinks label and value together when a line is too long, so neither ends up tiny alone."""
    needed = (_font(style.label_family, label_size).getlength(label)
              + _font(style.value_family, value_size).getlength(value))
    if needed <= room:
        return label_size, value_size
    shrink = room / needed
    return max(MIN_FONT_SIZE, int(label_size * shrink)), max(MIN_FONT_SIZE, int(value_size * shrink))


def _draw_value(draw: ImageDraw.ImageDraw, left: int, right: int, y: int, value: str, font, style: Style) -> None:
    if style.center_values:
        draw.text(((left + right) // 2, y), value, font=font, fill=0, anchor="mm")
    else:
        draw.text((left, y), value, font=font, fill=0, anchor="lm")


def _draw_cell_label_on_top(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], label: str, value: str,
                            style: Style) -> None:
    x0, y0, x1, y1 = box
    height = y1 - y0
    pad = max(3, height // 8)
    label_font = _fitted_font(style.label_family, round(height * 0.27), label, x1 - x0 - 2 * pad)
    draw.text((x0 + pad, y0 + pad // 2), label, font=label_font, fill=0, anchor="la")
    value_font = _fitted_font(style.value_family, round(height * 0.42), value, x1 - x0 - 3 * pad)
    _draw_value(draw, x0 + 2 * pad, x1 - pad, y0 + round(height * 0.66), value, value_font, style)


def _draw_cell_label_left(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], label: str, value: str,
                          style: Style) -> None:
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    pad, gap = max(3, height // 8), max(6, height // 4)
    label_size, value_size = _shared_sizes(style, label, value, round(height * 0.36), round(height * 0.5),
                                           width - 2 * pad - gap)
    label_font = _fitted_font(style.label_family, label_size, label, width * 0.62)
    middle = (y0 + y1) // 2
    draw.text((x0 + pad, middle), label, font=label_font, fill=0, anchor="lm")
    value_x = x0 + pad + round(label_font.getlength(label)) + gap
    if style.rule_after_label:
        draw.line([(value_x - gap // 2, y0), (value_x - gap // 2, y1)], fill=0, width=1)
    value_font = _fitted_font(style.value_family, value_size, value, x1 - pad - value_x)
    _draw_value(draw, value_x, x1 - pad, middle, value, value_font, style)


def _draw_title(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], company: str, log_type: str,
                service: str, style: Style) -> None:
    """Title band: service-company 'logo' box, company name and log type large."""
    x0, y0, x1, y1 = box
    height = y1 - y0
    if style.logo_box != "none":
        logo_width = (x1 - x0) * 22 // 100
        lx0 = x0 if style.logo_box == "left" else x1 - logo_width
        lx1 = lx0 + logo_width
        draw.line([(lx1 if style.logo_box == "left" else lx0, y0), (lx1 if style.logo_box == "left" else lx0, y1)],
                  fill=0, width=style.line_width)
        words = service.upper().split()
        half = (len(words) + 1) // 2
        for line, y in ((" ".join(words[:half]), y0 + height * 0.38), (" ".join(words[half:]), y0 + height * 0.66)):
            font = _fitted_font(style.title_family, round(height * 0.2), line, logo_width - 12)
            draw.text(((lx0 + lx1) // 2, round(y)), line, font=font, fill=0, anchor="mm")
        x0, x1 = (lx1, x1) if style.logo_box == "left" else (x0, lx0)
    center = (x0 + x1) // 2
    room = x1 - x0 - 20
    company_font = _fitted_font(style.title_family, round(height * 0.3), company, room)
    draw.text((center, y0 + round(height * 0.32)), company, font=company_font, fill=0, anchor="mm")
    log_font = _fitted_font(style.title_family, round(height * 0.24), log_type.upper(), room)
    draw.text((center, y0 + round(height * 0.72)), log_type.upper(), font=log_font, fill=0, anchor="mm")


class _WordRecorder:
    """An ImageDraw that also notes the box of every word it draws (the word-box sidecar); all else delegates."""

    def __init__(self, draw: ImageDraw.ImageDraw):
        self._draw = draw
        self.words: list[list] = []

    def __getattr__(self, name: str):
        return getattr(self._draw, name)

    def text(self, xy, text: str, font=None, anchor: str | None = None, **kwargs) -> None:
        self._draw.text(xy, text, font=font, anchor=anchor, **kwargs)
        left, top, _, bottom = self._draw.textbbox(xy, text, font=font, anchor=anchor)
        position = 0
        for word in text.split():
            start = text.index(word, position)
            position = start + len(word)
            self.words.append([word, left + font.getlength(text[:start]), top,
                               left + font.getlength(text[:position]), bottom])


def _render_form(rng: random.Random, values: dict[str, str], distractors: dict[str, str],
                 width: int, recorder: list | None = None) -> Image.Image:
    """The clean header as a grayscale image: ruled title band and label/value cells. The words drawn, with
    their boxes, are appended to `recorder` when one is given."""
    style = _style(rng)
    rows = _rows(rng)
    service = rng.choice(SERVICE_COMPANIES)
    aspect = min(MAX_ASPECT, max(MIN_ASPECT, 0.44 + 0.022 * len(rows) + rng.uniform(-0.03, 0.03)))
    height = round(width * aspect)
    margin = max(6, width // 50)
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image) if recorder is None else _WordRecorder(ImageDraw.Draw(image))
    left, top, right, bottom = margin, margin, width - margin, height - margin
    draw.rectangle([left, top, right, bottom], outline=0, width=style.line_width + 1)

    title_bottom = top + round((bottom - top) * rng.uniform(0.15, 0.2))
    _draw_title(draw, (left, top, right, title_bottom), values["COMPANY"], values["LOG TYPE"], service, style)
    draw.line([(left, title_bottom), (right, title_bottom)], fill=0, width=style.line_width + 1)

    cell_texts = {**distractors, **values}
    row_height = (bottom - title_bottom) / len(rows)
    for row_index, row in enumerate(rows):
        y0 = round(title_bottom + row_index * row_height)
        y1 = round(title_bottom + (row_index + 1) * row_height)
        if row_index:
            draw.line([(left, y0), (right, y0)], fill=0, width=style.line_width)
        weights = [CELL_WEIGHTS.get(key, 1.0) for key in row]
        total = sum(weights)
        x = float(left)
        for key, weight in zip(row, weights):
            x_next = x + (right - left) * weight / total
            if x > left:
                draw.line([(round(x), y0), (round(x), y1)], fill=0, width=style.line_width)
            draw_cell = _draw_cell_label_on_top if style.label_on_top else _draw_cell_label_left
            draw_cell(draw, (round(x), y0, round(x_next), y1), _printed_label(key, style), cell_texts[key], style)
            x = x_next
    if recorder is not None:
        recorder.extend(draw.words)
    return image


@dataclass(frozen=True)
class ScanDefects:
    """Scanner and paper effects; all zero at difficulty 0."""

    angle: float
    blur_sigma: float
    noise_sigma: float
    noise_offset: tuple[int, int]
    ink_level: float
    paper_level: float
    yellow_tint: float


NOISE_TILE_SIGMA = 32.0
NOISE_TILE_MARGIN = 256


def _scan_defects(rng: random.Random, difficulty: float) -> ScanDefects:
    """Always draws the same number of random values, so difficulty never shifts other choices."""
    return ScanDefects(
        angle=rng.uniform(-1.5, 1.5) * difficulty,
        blur_sigma=rng.uniform(0.3, 1.1) * difficulty,
        noise_sigma=rng.uniform(3.0, 18.0) * difficulty,
        noise_offset=(rng.randrange(NOISE_TILE_MARGIN), rng.randrange(NOISE_TILE_MARGIN)),
        ink_level=rng.uniform(0.0, 90.0) * difficulty,
        paper_level=255.0 - rng.uniform(0.0, 35.0) * difficulty,
        yellow_tint=rng.uniform(0.0, 25.0) * difficulty,
    )


@functools.lru_cache(maxsize=4)
def _noise_tile(width: int) -> Image.Image:
    """Fixed-seed Gaussian noise around 128, cropped at a per-sample offset: drawing fresh noise per
    image would cost more than all the drawing."""
    rng = np.random.default_rng(20240601)
    height = math.ceil(width * MAX_ASPECT) + 1
    noise = 128.0 + NOISE_TILE_SIGMA * rng.standard_normal((height + NOISE_TILE_MARGIN, width + NOISE_TILE_MARGIN))
    return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), mode="L")


@functools.lru_cache(maxsize=64)
def _gaussian_kernel(sigma: float) -> ImageFilter.Kernel:
    weights = [math.exp(-(x * x + y * y) / (2 * sigma * sigma)) for y in (-1, 0, 1) for x in (-1, 0, 1)]
    return ImageFilter.Kernel((3, 3), weights, sum(weights))


def _add_noise(image: Image.Image, sigma: float, offset: tuple[int, int]) -> Image.Image:
    tile = _noise_tile(image.width)
    x, y = offset
    patch = tile.crop((x, y, x + image.width, y + image.height))
    gain = sigma / NOISE_TILE_SIGMA
    patch = patch.point([min(255, max(0, round(128 + (v - 128) * gain))) for v in range(256)])
    return ImageChops.add(image, patch, scale=1.0, offset=-128)


def _apply_defects(image: Image.Image, defects: ScanDefects) -> Image.Image:
    if abs(defects.angle) >= 0.01:
        image = image.rotate(defects.angle, resample=Image.Resampling.BILINEAR, fillcolor=255)
    if defects.blur_sigma >= 0.25:
        image = image.filter(_gaussian_kernel(round(defects.blur_sigma, 2)))
    if defects.noise_sigma >= 0.5:
        image = _add_noise(image, defects.noise_sigma, defects.noise_offset)
    return _tone(image, defects)


def _tone(gray: Image.Image, defects: ScanDefects) -> Image.Image:
    """Maps black/white to ink/paper per channel: contrast, brightness and paper colour in one lookup."""
    paper = (defects.paper_level, defects.paper_level - 0.35 * defects.yellow_tint,
             defects.paper_level - defects.yellow_tint)
    channels = []
    for paper_level in paper:
        lut = [round(defects.ink_level + (paper_level - defects.ink_level) * v / 255) for v in range(256)]
        channels.append(gray.point(lut))
    return Image.merge("RGB", channels)


def _check_sample_args(difficulty: float, width: int) -> None:
    if not 0.0 <= difficulty <= 1.0:
        raise UserError(f"difficulty must be in [0, 1], got {difficulty}")
    if width < MIN_WIDTH:
        raise UserError(f"width must be at least {MIN_WIDTH} pixels, got {width}")


def make_sample(seed: int, index: int, difficulty: float = 0.3, width: int = 1024) -> tuple[Image.Image, str]:
    """One header image and its answer; depends only on (seed, index), so slices regenerate independently."""
    image, answer, _ = _sample(seed, index, difficulty, width, record_words=False)
    return image, answer


def make_sample_with_words(seed: int, index: int, difficulty: float = 0.3,
                           width: int = 1024) -> tuple[Image.Image, str, list[list]]:
    """`make_sample` (the same image and answer) plus every word drawn on it: `[text, x0, y0, x1, y1]` in pixels
    of the returned image (the box of the word as drawn, turned with the scan's rotation), in drawing order.

    These are the true words in their true boxes: what a perfect OCR engine would return, so the label-anchored
    parser (wellocr.labelparse) can be tested on them alone.
    """
    return _sample(seed, index, difficulty, width, record_words=True)


def _sample(seed: int, index: int, difficulty: float, width: int,
            record_words: bool) -> tuple[Image.Image, str, list[list]]:
    _check_sample_args(difficulty, width)
    rng = random.Random(f"wellocr-synth:{seed}:{index}")
    values, distractors = _values(rng)
    words: list[list] = []
    form = _render_form(rng, values, distractors, width, words if record_words else None)
    defects = _scan_defects(rng, difficulty)
    image = _apply_defects(form, defects)
    answer = "\n".join(f"{field}: {values[field]}" for field in FIELDS)
    return image, answer, [_rotated_word(w, defects.angle, form.size) for w in words]


def _rotated_word(word: list, angle: float, size: tuple[int, int]) -> list:
    """A word's box after `Image.rotate(angle)` (counter-clockwise about the centre): the box around its corners."""
    text, x0, y0, x1, y1 = word
    if abs(angle) < 0.01:  # _apply_defects does not rotate below this
        return [text, round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)]
    cx, cy = size[0] / 2, size[1] / 2
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    xs, ys = [], []
    for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1)):
        xs.append(cx + (x - cx) * cos + (y - cy) * sin)
        ys.append(cy - (x - cx) * sin + (y - cy) * cos)
    return [text, round(min(xs), 1), round(min(ys), 1), round(max(xs), 1), round(max(ys), 1)]


def encode_image(image: Image.Image, image_format: str = "JPEG") -> str:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Data set on disk
# ---------------------------------------------------------------------------------------------


def split_path(out_dir: Path, split: str) -> Path:
    return out_dir / "data" / f"{split}-00000-of-00001.parquet"


def words_path(out_dir: Path, split: str) -> Path:
    """The optional word-box sidecar of a split (outside data/, so `datasets` never reads it as a split)."""
    return out_dir / "words" / f"{split}.jsonl"


def _write_split(path: Path, split: str, count: int, seed: int, difficulty: float, width: int,
                 image_format: str, words_file: Path | None = None) -> None:
    """Streams rows into row groups under a hidden temp name, renamed only once complete; with `words_file`, the
    words drawn on each row go there, one JSON line per row ({"row": i, "words": [[text, x0, y0, x1, y1], ...]})."""
    offset = SPLIT_INDEX_OFFSET[split]
    report_every = max(1, count // 10)
    started = time.perf_counter()
    batch: dict[str, list[str]] = {"image_base64": [], "instruction": [], "answer": []}
    word_lines: list[str] = []
    with atomic_path(path) as temp_path, pq.ParquetWriter(temp_path, SCHEMA) as writer:
        for i in range(count):
            image, answer, words = _sample(seed, offset + i, difficulty, width, record_words=words_file is not None)
            if words_file is not None:
                word_lines.append(json.dumps({"row": i, "words": words}, ensure_ascii=False) + "\n")
            batch["image_base64"].append(encode_image(image, image_format))
            batch["instruction"].append(INSTRUCTION)
            batch["answer"].append(answer)
            if len(batch["answer"]) == ROW_GROUP_SIZE:
                writer.write_table(pa.table(batch, schema=SCHEMA))
                batch = {key: [] for key in batch}
            done = i + 1
            if done % report_every == 0 or done == count:
                rate = done / max(time.perf_counter() - started, 1e-9)
                print(f"synth: {split} {done}/{count} ({rate:.0f} img/s)", file=sys.stderr, flush=True)
        if batch["answer"]:
            writer.write_table(pa.table(batch, schema=SCHEMA))
    if words_file is not None:
        words_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(words_file, "".join(word_lines))


def card_header(splits, tags: tuple[str, ...] = ("ocr", "well-logs"), pretty_name: str | None = None) -> str:
    """A data set card's YAML header in the project's layout: each split's parquet files (the `configs` block is
    what keeps `eval` a split of its own: without it `datasets` maps a file named `eval*` to the split `test`) and
    SCHEMA's columns. `wellocr.synth` and `wellocr.prepare` both write it."""
    split_configs = "".join(f"  - split: {split}\n    path: data/{split}-*\n" for split in splits)
    features = "".join(f"  - name: {column.name}\n    dtype: string\n" for column in SCHEMA)
    return ("---\n" + (f"pretty_name: {pretty_name}\n" if pretty_name else "") +
            "task_categories:\n- image-to-text\n"
            "tags:\n" + "".join(f"- {tag}\n" for tag in tags) +
            "configs:\n- config_name: default\n  data_files:\n" + split_configs +
            "dataset_info:\n  features:\n" + features + "---\n\n")


def _readme(counts: dict[str, int], seed: int, difficulty: float, width: int, image_format: str) -> str:
    split_lines = "\n".join(f"- `{split}`: {count} rows" for split, count in counts.items())
    return (
        card_header(counts, ("synthetic", "ocr", "well-logs"), "Synthetic well-log headers (OCR)") +
        "# Synthetic well-log headers\n\n"
        "**Synthetic data**, made by `wellocr.synth`: rendered images of the header block of a scanned paper "
        "well log, with invented but plausible values. It follows the schema of "
        "`wrath/well-log-headers-ocr`.\n\n"
        "Columns (all strings):\n\n"
        f"- `image_base64`: base64-encoded {image_format} image, {width} px wide;\n"
        "- `instruction`: the same prompt in every row;\n"
        "- `answer`: one `LABEL: value` line per field, in this order: " + ", ".join(FIELDS) + ".\n\n"
        f"Splits:\n\n{split_lines}\n\n"
        f"Generated with seed {seed} and difficulty {difficulty} (0 = clean scan, 1 = rotated, blurred, "
        "noisy, toned paper).\n"
    )


def write_dataset(out_dir, train: int, eval: int, test: int = 0, seed: int = 0, difficulty: float = 0.3,
                  width: int = 1024, image_format: str = "JPEG", word_boxes: bool = False) -> Path:
    """Writes a folder `datasets.load_dataset` (or the hub) reads with splits train, eval and optional test.

    `word_boxes` adds the sidecar `words/<split>.jsonl` (`words_path`): the words drawn on each row and their boxes,
    as `make_sample_with_words` returns them, for testing OCR parsers on perfectly read words.

    The README's `configs` block is what keeps `eval` a split of its own: without it `datasets` maps a
    file named `eval*` to the split `test`.
    """
    for name, count, least in (("train", train, 1), ("eval", eval, 1), ("test", test, 0)):
        if count < least:
            raise UserError(f"{name} count must be >= {least}, got {count} ({EMPTY_SPLIT_REASON})")
    _check_sample_args(difficulty, width)
    image_format = image_format.upper()
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format}")
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    counts = {"train": train, "eval": eval}
    if test:
        counts["test"] = test
    for split in SPLITS:
        if split not in counts or not word_boxes:
            words_path(out_dir, split).unlink(missing_ok=True)
        if split not in counts:
            split_path(out_dir, split).unlink(missing_ok=True)
    for split, count in counts.items():
        _write_split(split_path(out_dir, split), split, count, seed, difficulty, width, image_format,
                     words_path(out_dir, split) if word_boxes else None)
    write_text_atomic(out_dir / "README.md", _readme(counts, seed, difficulty, width, image_format))
    return out_dir
