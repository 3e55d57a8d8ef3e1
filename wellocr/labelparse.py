"""From an OCR engine's words and boxes to the `LABEL: value` answer format: a label-anchored header parser.

A classical OCR engine returns words where it saw them, not fields. Well-log headers print each field under one of
several labels (WELL / Well No., API / UWI, Field / Pool, ...), with its value to the right of the label or below
it. The parser:

1. rebuilds lines from the word boxes (words joined left to right when their vertical centres are close, which
   follows a slightly rotated scan), and splits words glued to a label by a colon ("COMPANY:ACME");
2. finds the printed labels (`LabelTable`, from `header_labels.yaml` plus the user's additions): consecutive words
   whose letters and digits, upper-cased, spell a label (one wrong character forgiven in labels of six or more);
   a candidate counts as a label only where a label would stand: first in its line, after a gap, or ending in a
   colon, and not straight after another label (then it is that label's value: "Log Measured From: KB");
3. takes each label's value: the words after it on its line up to the next label, else the words below it (the
   first line under the label whose words lie in the label's column, up to the next label's start).

Where a field's label occurs more than once, one printed with a colon wins, else the last (a title band, read
first, may hold a label word: "Apex Logging Company"). Labels listed under `ignore` (cells
that answer no field, like Location) are found and given values too, so their words are never taken for another
field's, but they produce no answer line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import yaml
from rapidfuzz.distance import Levenshtein

from wellocr.errors import UserError

DEFAULT_LABELS = "header_labels.yaml"
MAX_LABEL_WORDS = 6
FUZZY_MIN_LENGTH = 6  # labels this long forgive one wrong character
LABEL_GAP = 0.55  # a label starts after a gap of this many word heights (or first in line, or with a colon)
GAP_IN_LABEL = 2.5  # a label's words are at most this many word heights apart (a dropped "-" leaves a hole)
GAP_IN_VALUE = 1.5  # a wider gap between two words of a value ends the value: the next cell begins there
SAME_LINE = 0.6  # words are on one line when their centres differ by less than this many word heights
BELOW_LINES = 3.0  # a value below its label starts within this many label heights of the label's bottom
_GLUED_COLON = re.compile(r"^([^\W\d_][^:]*:)(\S+)$")
RULES = "|[]"  # what engines read a cell's vertical rule as: a boundary, never text


class Word(NamedTuple):
    """One word an engine read, with its box in image pixels (x0, y0 top-left, x1, y1 bottom-right)."""

    text: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def height(self) -> float:
        return max(self.y1 - self.y0, 1.0)

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2


def label_key(text: str) -> str:
    """What a label is matched on: its letters and digits, upper-cased ("Depth - Driller:" -> DEPTHDRILLER)."""
    return "".join(ch for ch in text.upper() if ch.isalnum())


@dataclass
class LabelTable:
    """Answer fields in answer order, each with the printed labels that name it; `ignore`: labels of no field."""

    fields: dict[str, list[str]]
    ignore: list[str] = field(default_factory=list)

    def keys(self) -> dict[str, str | None]:
        """label key -> answer field (None for ignored labels); a key claimed twice keeps its first field."""
        out: dict[str, str | None] = {}
        for name, labels in self.fields.items():
            for label in labels:
                out.setdefault(label_key(label), name)
        for label in self.ignore:
            out.setdefault(label_key(label), None)
        out.pop("", None)
        return out


def _read_table(data: object, source: str) -> LabelTable:
    if not isinstance(data, dict) or not set(data) <= {"fields", "ignore"}:
        raise UserError(f"{source}: a label table is a mapping with the keys 'fields' (answer label -> list of "
                        "printed labels) and 'ignore' (list of printed labels); see wellocr/header_labels.yaml")
    fields = data.get("fields") or {}
    ignore = data.get("ignore") or []
    if not isinstance(fields, dict) or not isinstance(ignore, list):
        raise UserError(f"{source}: 'fields' must be a mapping and 'ignore' a list")
    table = LabelTable({}, [str(label) for label in ignore])
    for name, labels in fields.items():
        if isinstance(labels, str):
            labels = [labels]
        if not isinstance(labels, list) or not labels or not str(name).strip():
            raise UserError(f"{source}: fields.{name} must be a non-empty list of printed labels")
        table.fields[str(name).strip().upper()] = [str(label) for label in labels]
    return table


def load_label_table(extra: Path | None = None) -> LabelTable:
    """The shipped table (`wellocr/header_labels.yaml`), extended by `extra` (same format): its labels are added
    to a field's, and its new fields are appended to the answer order."""
    text = resources.files("wellocr").joinpath(DEFAULT_LABELS).read_text(encoding="utf-8")
    table = _read_table(yaml.safe_load(text), DEFAULT_LABELS)
    if extra is None:
        return table
    try:
        data = yaml.safe_load(Path(extra).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"--labels {extra}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--labels {extra}: not valid YAML ({str(exc).splitlines()[0]})") from None
    added = _read_table(data, str(extra))
    for name, labels in added.fields.items():
        table.fields.setdefault(name, []).extend(labels)
    table.ignore.extend(added.ignore)
    return table


# ---------------------------------------------------------------- lines


def split_glued(words: list[Word]) -> list[Word]:
    """Words like "COMPANY:ACME" (engines that drop spaces) as "COMPANY:" + "ACME", and a cell's rule read into a
    word ("|Acme", "ft|DF") as a word "|" of its own; boxes are split in proportion to the characters."""
    out: list[Word] = []
    for word in words:
        pieces: list[str] = []
        for part in re.split(f"([{re.escape(RULES)}]+)", word.text):
            glued = _GLUED_COLON.match(part)
            if part and part.strip(RULES) == "":
                pieces.append("|")
            elif glued:
                pieces += glued.groups()
            elif part:
                pieces.append(part)
        if len(pieces) == 1:
            out.append(word if pieces[0] == word.text else word._replace(text=pieces[0]))
            continue
        per_char, x = (word.x1 - word.x0) / max(sum(len(p) for p in pieces), 1), word.x0
        for piece in pieces:
            out.append(Word(piece, x, word.y0, x + per_char * len(piece), word.y1))
            x += per_char * len(piece)
    return out


def build_lines(words: list[Word]) -> list[list[Word]]:
    """Words grouped into lines, each left to right, lines top to bottom.

    A word joins the line whose last word ends left of it and whose centre is nearest, within `SAME_LINE` word
    heights. Grouped once, the lines give the scan's skew (the median slope between neighbouring words), and the
    words are grouped again with that slope taken out, so a rotated scan's lines hold together across wide gaps.
    """
    words = [w for w in words if w.text.strip()]
    slope = skew(_group(words, 0.0))
    return _group(words, slope) if slope else _group(words, 0.0)


def skew(lines: list[list[Word]]) -> float:
    """Median dy/dx between neighbouring words of the lines (0.0 with fewer than 5 pairs)."""
    slopes = sorted((b.cy - a.cy) / ((b.x0 + b.x1 - a.x0 - a.x1) / 2) for line in lines for a, b in zip(line, line[1:])
                    if b.x0 - a.x1 < 2 * max(a.height, b.height) and b.x1 > a.x1)
    return slopes[len(slopes) // 2] if len(slopes) >= 5 else 0.0


def _group(words: list[Word], slope: float) -> list[list[Word]]:
    def level(word: Word) -> float:
        return word.cy - slope * (word.x0 + word.x1) / 2

    lines: list[list[Word]] = []
    for word in sorted(words, key=lambda w: (w.x0, w.y0)):
        best, best_distance = None, None
        for line in lines:
            last = line[-1]
            distance = abs(level(last) - level(word))
            if last.x0 < word.x0 + 0.5 * word.height and distance < SAME_LINE * max(last.height, word.height):
                if best_distance is None or distance < best_distance:
                    best, best_distance = line, distance
        if best is None:
            lines.append([word])
        else:
            best.append(word)
    return sorted(lines, key=lambda line: sum(level(w) for w in line) / len(line))


# ---------------------------------------------------------------- labels


@dataclass
class Label:
    """A label found on a line: words [start, end) of line `line`; field None for an ignored label."""

    field: str | None
    line: int
    start: int
    end: int
    value: str = ""


class _Matcher:
    def __init__(self, table: LabelTable):
        self.keys = table.keys()
        self.fuzzy = [k for k in self.keys if len(k) >= FUZZY_MIN_LENGTH]

    def lookup(self, key: str, fuzzy: bool) -> tuple[bool, str | None]:
        if key in self.keys:
            return True, self.keys[key]
        if fuzzy and len(key) >= FUZZY_MIN_LENGTH:
            for candidate in self.fuzzy:
                if abs(len(candidate) - len(key)) <= 1 and Levenshtein.distance(candidate, key, score_cutoff=1) <= 1:
                    return True, self.keys[candidate]
        return False, None

    def match_at(self, line: list[Word], i: int) -> tuple[int, str | None] | None:
        """(words in the longest label starting at word i, its field), or None; exact spellings before near ones,
        so a misread label never swallows the initial after it ("Witnessed By G." is not "Witnessed ByG")."""
        for fuzzy in (False, True):
            for n in range(min(MAX_LABEL_WORDS, len(line) - i), 0, -1):
                span = line[i:i + n]
                if any(b.x0 - a.x1 > GAP_IN_LABEL * max(a.height, b.height) or "|" in (a.text, b.text)
                       for a, b in zip(span, span[1:])):
                    continue
                key = label_key("".join(w.text for w in span))
                if not key or (n > 1 and not label_key(span[-1].text)):
                    continue
                found, name = self.lookup(key, fuzzy)
                if found:
                    return n, name
        return None


def find_labels(lines: list[list[Word]], matcher: _Matcher) -> list[Label]:
    labels: list[Label] = []
    for line_no, line in enumerate(lines):
        previous_label: Label | None = None
        i = 0
        while i < len(line):
            word = line[i]
            match = matcher.match_at(line, i)
            if match is not None:
                n, name = match
                gap = word.x0 - line[i - 1].x1 if i else None
                height = max(word.height, line[i - 1].height) if i else word.height
                after_label = previous_label is not None and previous_label.end == i
                stands_alone = gap is None or gap >= LABEL_GAP * height or line[i - 1].text.endswith((":", "|"))
                has_colon = line[i + n - 1].text.rstrip().endswith(":")
                if (stands_alone or has_colon) and not (after_label and gap is not None and gap < 3 * height):
                    previous_label = Label(name, line_no, i, i + n)
                    labels.append(previous_label)
                    i += n
                    continue
            i += 1
    return _labels_under_label_lines_are_values(lines, labels)


def _labels_under_label_lines_are_values(lines: list[list[Word]], labels: list[Label]) -> list[Label]:
    """A line of labels only (labels printed above their values) is followed by a line of values: a value that
    reads like a label there ("Well: / State AB No. 5") is a value."""
    by_line: dict[int, list[Label]] = {}
    for label in labels:
        by_line.setdefault(label.line, []).append(label)
    for line_no in range(len(lines) - 1):
        found = by_line.get(line_no, [])
        if found and sum(label.end - label.start for label in found) == len(lines[line_no]):
            by_line.pop(line_no + 1, None)
    return [label for line_no in sorted(by_line) for label in by_line[line_no]]


def _value(words: list[Word]) -> str:
    """The value's text: its words up to a rule, a wide gap (the next cell) or an unknown label ("Xyz:")."""
    taken: list[Word] = []
    for word in words:
        if word.text == "|":
            if taken:
                break
            continue
        if taken and (word.x0 - taken[-1].x1 > GAP_IN_VALUE * max(word.height, taken[-1].height)
                      or (word.text.endswith(":") and len(word.text) > 1 and taken[-1].text != ":")):
            break
        taken.append(word)
    return " ".join(w.text for w in taken).strip().lstrip(":：").strip()


def assign_values(lines: list[list[Word]], labels: list[Label]) -> None:
    """Fill each label's value: right of it on its line, else the first line below it in its column."""
    starts = {(label.line, label.start) for label in labels}
    by_line: dict[int, list[Label]] = {}
    for label in labels:
        by_line.setdefault(label.line, []).append(label)
    for label in labels:
        line = lines[label.line]
        following = [other for other in by_line[label.line] if other.start >= label.end]
        stop = following[0].start if following else len(line)
        label.value = _value(line[label.end:stop])
        if label.value:
            continue
        first, last = line[label.start], line[label.end - 1]
        left = first.x0 - first.height
        right = line[following[0].start].x0 - 0.5 * first.height if following else float("inf")
        for below_no in range(label.line + 1, len(lines)):
            below = lines[below_no]
            if min(w.y0 for w in below) - last.y1 > BELOW_LINES * first.height:
                break
            column = [j for j, w in enumerate(below) if left <= (w.x0 + w.x1) / 2 < right]
            if not any(label_key(below[j].text) for j in column):  # nothing, or a stray dash of the line above
                continue
            taken = []
            for j in column:
                if (below_no, j) in starts:
                    break
                taken.append(below[j])
            label.value = _value(taken)
            break


def parse_words(words: list[Word], table: LabelTable) -> dict[str, str]:
    """{answer field: value} read from an engine's words, first occurrence of a field winning."""
    lines = build_lines(split_glued(words))
    labels = find_labels(lines, _Matcher(table))
    assign_values(lines, labels)
    found: dict[str, list[Label]] = {}
    for label in labels:
        if label.field is not None and label.value:
            found.setdefault(label.field, []).append(label)
    return {name: _pick(lines, candidates).value for name, candidates in found.items()}


def _pick(lines: list[list[Word]], candidates: list[Label]) -> Label:
    """The occurrence of a field to believe: one printed with a colon if any is, else the last one (headers print
    their title band, where a service company's logo may read "Logging Company", above the labelled cells)."""
    with_colon = [c for c in candidates if lines[c.line][c.end - 1].text.rstrip().endswith(":")]
    return (with_colon or candidates)[-1 if not with_colon else 0]


def answer_text(fields: dict[str, str], table: LabelTable) -> str:
    """`LABEL: value` lines in the table's field order; fields not found are left out."""
    return "\n".join(f"{name}: {fields[name]}" for name in table.fields if name in fields)
