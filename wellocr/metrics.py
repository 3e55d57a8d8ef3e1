"""OCR metrics for well-log header transcriptions.

Definitions (these are what every number in an evaluation report means):

Character error rate (CER)
    Levenshtein edits (substitutions + deletions + insertions) needed to turn the
    hypothesis into the reference, counted over characters, divided by the number of
    characters in the reference. Raw CER compares the strings exactly as given: every
    character counts, whitespace and case included. It can exceed 1.0 when the
    hypothesis is much longer than the reference.

Word error rate (WER)
    The same over words, where words are the result of ``str.split()`` (any run of
    Unicode whitespace separates words; leading/trailing whitespace is ignored).

Empty references
    A reference with no characters (CER) or no words (WER) scores 0.0 when the
    hypothesis is empty too and 1.0 otherwise; dividing by zero is not an option and
    counting the inserted units as a "rate" would be unbounded.

Corpus rates
    ``cer`` and ``wer`` over a corpus are edit-weighted: total edits / total reference
    length, not the mean of per-sample rates, so a one-character label cannot weigh as
    much as a full header. When every reference is empty the per-sample rule applies
    to the corpus: 0.0 if every hypothesis is empty too, else 1.0.

Normalised rates
    ``cer_normalized`` / ``wer_normalized`` apply :func:`normalize_text` to both sides
    first (NFKC, casefold, whitespace collapsed, stripped). They forgive formatting,
    not content, and are always reported next to, never instead of, the raw rates.

Field metrics (structured answers)
    Answers that are a JSON object or ``KEY: value`` lines are parsed into fields by
    :func:`parse_fields` (keys upper-cased). :func:`field_scores` then reports, over
    the samples whose reference has fields:

    * ``precision``: predicted fields whose key is in the reference / all predicted
      fields (invented fields lower it);
    * ``recall``: reference fields whose key is in the prediction / all reference
      fields (missing fields lower it);
    * ``f1``: harmonic mean of the two;
    * ``exact_match``: reference fields whose predicted value is exactly equal /
      all reference fields (a missing field is wrong);
    * ``per_field``: for each reference key, ``exact`` (exact-match accuracy over the
      samples whose reference has the key), ``cer`` (corpus CER of its values, a
      missing prediction counting as an empty string) and ``support`` (that sample
      count).

    A ratio with a zero denominator (e.g. precision when nothing was predicted) is 0.0.

Edit counting is delegated to jiwer (``jiwer.process_words``); jiwer's own default
transforms are bypassed because they split words on spaces only and strip characters,
and jiwer 4.0 returns an insertion *count* for empty references, so those are handled
here.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import jiwer

__all__ = [
    "compute_cer",
    "compute_wer",
    "normalize_text",
    "corpus_error_rates",
    "parse_fields",
    "field_scores",
    "per_sample_scores",
    "score",
]

Tokenizer = Callable[[str], list[str]]

_WHITESPACE_RUN = re.compile(r"\s+")
_CODE_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(.*?)\n?```$", re.DOTALL)


# --------------------------------------------------------------------------- tokenising


def _chars(text: str) -> list[str]:
    """Every character, unchanged: raw CER must see exactly what the model wrote."""
    return list(text)


def _words(text: str) -> list[str]:
    """Whitespace split; jiwer's default splits on ' ' only, so tabs/newlines would glue words."""
    return text.split()


def _count_edits(
    references: Sequence[str], hypotheses: Sequence[str], tokenize: Tokenizer
) -> tuple[int, int]:
    """Return (total edits, total reference units) over aligned pairs.

    Pairs with an empty reference never reach jiwer (older releases raise on them, 4.0 returns
    a count as the "rate"); every hypothesis unit there is an insertion.
    """
    ref_tokens = [tokenize(r) for r in references]
    hyp_tokens = [tokenize(h) for h in hypotheses]
    edits = sum(len(h) for r, h in zip(ref_tokens, hyp_tokens) if not r)
    pairs = [(r, h) for r, h in zip(ref_tokens, hyp_tokens) if r]
    if not pairs:
        return edits, 0
    out = jiwer.process_words(
        [r for r, _ in pairs],
        [h for _, h in pairs],
        reference_transform=_identity_transform,
        hypothesis_transform=_identity_transform,
    )
    edits += out.substitutions + out.deletions + out.insertions
    ref_len = out.hits + out.substitutions + out.deletions
    return edits, ref_len


def _identity_transform(sentences: list[list[str]]) -> list[list[str]]:
    """jiwer transform for input we already tokenised (jiwer wants a list of token lists)."""
    return sentences


def _rate(edits: int, ref_len: int) -> float:
    """Edits per reference unit, with the empty-reference rule (0.0 if no edits, else 1.0)."""
    if ref_len == 0:
        return 0.0 if edits == 0 else 1.0
    return edits / ref_len


# --------------------------------------------------------------------------- per sample


def compute_cer(reference: str, hypothesis: str) -> float:
    """Raw character error rate of one sample (see module docstring)."""
    return _rate(*_count_edits([reference], [hypothesis], _chars))


def compute_wer(reference: str, hypothesis: str) -> float:
    """Raw word error rate of one sample; words are ``str.split()`` tokens."""
    return _rate(*_count_edits([reference], [hypothesis], _words))


def normalize_text(text: str) -> str:
    """Normalise formatting so the normalised rates measure content, not typography.

    Exactly, in order: Unicode NFKC (full-width digits, ligatures and the like become their
    plain forms), ``str.casefold()`` (case-insensitive, stronger than ``lower()``), every run
    of whitespace (spaces, tabs, newlines, Unicode spaces) replaced by one space, and leading/
    trailing whitespace stripped. Punctuation, digits and word order are left alone.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return _WHITESPACE_RUN.sub(" ", text).strip()


def per_sample_scores(reference: str, hypothesis: str) -> dict[str, float]:
    """Raw and normalised CER/WER of one sample, e.g. for a per-sample table."""
    ref_n, hyp_n = normalize_text(reference), normalize_text(hypothesis)
    return {
        "cer": compute_cer(reference, hypothesis),
        "wer": compute_wer(reference, hypothesis),
        "cer_normalized": compute_cer(ref_n, hyp_n),
        "wer_normalized": compute_wer(ref_n, hyp_n),
    }


# --------------------------------------------------------------------------- corpus


def _check_corpus(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    """Fail loudly: zip() would silently drop unmatched samples and skew every rate."""
    if len(references) == 0:
        raise ValueError("no references to score: the reference list is empty")
    if len(references) != len(hypotheses):
        raise ValueError(
            f"references and hypotheses must pair up one to one: got {len(references)} "
            f"references and {len(hypotheses)} hypotheses"
        )


def corpus_error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """Edit-weighted corpus CER/WER, raw and normalised, with the raw counts behind them.

    Raises ValueError when the lists are empty or of different lengths.
    """
    _check_corpus(references, hypotheses)
    char_edits, ref_chars = _count_edits(references, hypotheses, _chars)
    word_edits, ref_words = _count_edits(references, hypotheses, _words)
    refs_n = [normalize_text(r) for r in references]
    hyps_n = [normalize_text(h) for h in hypotheses]
    return {
        "cer": _rate(char_edits, ref_chars),
        "wer": _rate(word_edits, ref_words),
        "cer_normalized": _rate(*_count_edits(refs_n, hyps_n, _chars)),
        "wer_normalized": _rate(*_count_edits(refs_n, hyps_n, _words)),
        "char_edits": char_edits,
        "ref_chars": ref_chars,
        "word_edits": word_edits,
        "ref_words": ref_words,
    }


# --------------------------------------------------------------------------- fields


def _field_value(value: Any) -> str:
    """Stringify a JSON value: strings stripped, null empty, everything else as JSON text."""
    if isinstance(value, str):
        return value.strip()
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


class _Pairs(list):
    """A JSON object as its (key, value) pairs, kept in order so repeated keys are visible."""


def _to_plain(value: Any) -> Any:
    """Turn nested pair lists back into dicts (first repeated key wins) for json.dumps."""
    if isinstance(value, _Pairs):
        out: dict[str, Any] = {}
        for key, item in value:
            out.setdefault(key, _to_plain(item))
        return out
    if isinstance(value, list):
        return [_to_plain(item) for item in value]
    return value


def _parse_json_object(text: str) -> dict[str, str] | None:
    """Fields of a JSON object, or None when the text is not one.

    json.loads keeps the last of repeated keys; the pairs hook lets the first win instead,
    matching the line format.
    """
    try:
        obj = json.loads(text, object_pairs_hook=_Pairs)
    except ValueError:
        return None
    if not isinstance(obj, _Pairs):
        return None  # a JSON array, string or number: not a field set
    fields: dict[str, str] = {}
    for key, value in obj:
        key = key.strip().upper()
        if key:
            fields.setdefault(key, _field_value(_to_plain(value)))
    return fields


def _parse_key_value_lines(text: str) -> dict[str, str]:
    """Fields of ``KEY: value`` lines, split at the first colon; other lines are ignored."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().upper()
        if sep and key:
            fields.setdefault(key, value.strip())
    return fields


def parse_fields(text: str) -> dict[str, str]:
    """Parse a structured answer into {KEY: value}; {} for unstructured text.

    A JSON object (optionally inside a ```json code fence, as chat models like to emit) wins;
    otherwise ``KEY: value`` lines. In both formats keys are stripped and upper-cased and a
    repeated key keeps its first value, so a JSON reference and a line-format hypothesis
    compare field by field. Nested JSON values are kept as their JSON text.
    """
    stripped = text.strip()
    fence = _CODE_FENCE.match(stripped)
    if fence:
        stripped = fence.group(1).strip()
    fields = _parse_json_object(stripped)
    if fields is not None:
        return fields
    return _parse_key_value_lines(stripped)


def _ratio(num: int, den: int) -> float:
    """num/den, 0.0 when there is nothing to divide by."""
    return num / den if den else 0.0


def _per_field(pairs: list[tuple[dict[str, str], dict[str, str]]]) -> dict[str, dict[str, Any]]:
    """Exact-match accuracy, corpus CER and support of every key seen in a reference."""
    keys = sorted({key for ref, _ in pairs for key in ref})
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        refs = [ref[key] for ref, _ in pairs if key in ref]
        hyps = [hyp.get(key, "") for ref, hyp in pairs if key in ref]
        exact = sum(r == h for r, h in zip(refs, hyps))
        out[key] = {
            "exact": exact / len(refs),
            "cer": _rate(*_count_edits(refs, hyps, _chars)),
            "support": len(refs),
        }
    return out


def field_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any] | None:
    """Field precision/recall/F1, exact match and per-field scores (see module docstring).

    Only samples whose reference parses into at least one field are scored (free-text
    samples are left to CER/WER); returns None when there are none, so "no structured data"
    cannot be mistaken for a score of zero. Raises ValueError like :func:`corpus_error_rates`.
    """
    _check_corpus(references, hypotheses)
    pairs = [(parse_fields(r), parse_fields(h)) for r, h in zip(references, hypotheses)]
    pairs = [(ref, hyp) for ref, hyp in pairs if ref]
    if not pairs:
        return None
    ref_fields = sum(len(ref) for ref, _ in pairs)
    pred_fields = sum(len(hyp) for _, hyp in pairs)
    matched = sum(len(ref.keys() & hyp.keys()) for ref, hyp in pairs)
    exact = sum(hyp.get(key) == value for ref, hyp in pairs for key, value in ref.items())
    precision, recall = _ratio(matched, pred_fields), _ratio(matched, ref_fields)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "exact_match": exact / ref_fields,
        "ref_fields": ref_fields,
        "pred_fields": pred_fields,
        "matched_fields": matched,
        "samples": len(pairs),
        "per_field": _per_field(pairs),
    }


def score(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """Every corpus metric in one JSON-serialisable dict: error rates, ``fields``, ``samples``.

    ``fields`` is :func:`field_scores`' result (None when no reference is structured).
    """
    result = corpus_error_rates(references, hypotheses)
    result["fields"] = field_scores(references, hypotheses)
    result["samples"] = len(references)
    return result
