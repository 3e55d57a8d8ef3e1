"""Tests for wellocr.metrics: the original spec's cases plus corpus, normalisation and field metrics."""

import json

import pytest

from wellocr.metrics import (
    compute_cer,
    compute_wer,
    corpus_error_rates,
    field_scores,
    normalize_text,
    parse_fields,
    per_sample_scores,
    score,
)

# --------------------------------------------------------------------------- original spec


def test_cer_identical_strings_is_zero():
    assert compute_cer("hello", "hello") == 0.0


def test_cer_all_characters_wrong_is_one():
    assert compute_cer("abc", "xyz") == 1.0


def test_cer_one_substitution_in_five_characters():
    assert abs(compute_cer("hello", "hallo") - 0.2) < 0.01


def test_wer_identical_strings_is_zero():
    assert compute_wer("hello world", "hello world") == 0.0


def test_wer_one_substituted_word_in_two():
    assert abs(compute_wer("hello world", "hallo world") - 0.5) < 0.01


def test_wer_counts_an_inserted_word():
    assert abs(compute_wer("hello world", "hello big world") - 0.5) < 0.01


def test_wer_counts_a_deleted_word():
    # 1 deletion / 2 reference words, as the seed's comment says.
    assert abs(compute_wer("hello world", "hello") - 0.5) < 0.01


def test_wer_of_the_seed_deletion_pair_is_one_third():
    # The seed's literal deletion case ("hello big world" -> "hello world") was labelled 0.5, but its reference
    # has 3 words: 1 deletion / 3 words. Per-sample and corpus WER must agree, so it is 1/3 here.
    assert abs(compute_wer("hello big world", "hello world") - 1 / 3) < 0.01


# --------------------------------------------------------------------------- empty references


def test_empty_reference_and_empty_hypothesis_score_zero():
    assert compute_cer("", "") == 0.0
    assert compute_wer("", "") == 0.0


def test_empty_reference_with_nonempty_hypothesis_scores_one():
    assert compute_cer("", "abc") == 1.0
    assert compute_wer("", "a b c") == 1.0


def test_wer_splits_words_on_any_whitespace():
    assert compute_wer("hello\tworld\n", "hello world") == 0.0


# --------------------------------------------------------------------------- corpus


def test_corpus_cer_is_edit_weighted_not_mean_of_samples():
    rates = corpus_error_rates(["a", "bbbbbbbbbb"], ["b", "bbbbbbbbbb"])
    assert rates["cer"] == pytest.approx(1 / 11)
    assert (rates["char_edits"], rates["ref_chars"]) == (1, 11)


def test_corpus_wer_is_edit_weighted_not_mean_of_samples():
    rates = corpus_error_rates(["x", "a b c"], ["y", "a b c"])
    assert rates["wer"] == pytest.approx(1 / 4)
    assert (rates["word_edits"], rates["ref_words"]) == (1, 4)


def test_corpus_counts_insertions_against_empty_references():
    rates = corpus_error_rates(["", "abcd"], ["xy", "abcd"])
    assert rates["cer"] == pytest.approx(2 / 4)


def test_corpus_of_only_empty_references_follows_per_sample_rule():
    assert corpus_error_rates(["", ""], ["", ""])["cer"] == 0.0
    assert corpus_error_rates(["", ""], ["", "x"])["cer"] == 1.0


def test_corpus_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 references and 1 hypotheses"):
        corpus_error_rates(["a", "b"], ["a"])


def test_corpus_rejects_empty_reference_list():
    with pytest.raises(ValueError, match="empty"):
        corpus_error_rates([], [])


# --------------------------------------------------------------------------- normalisation


def test_normalize_text_folds_case_width_and_whitespace():
    assert normalize_text("  Ｈello\t\n  WORLD ") == "hello world"


def test_normalised_rates_forgive_formatting_that_raw_rates_count():
    scores = per_sample_scores("Hello   World", "hello world")
    assert scores["cer"] > 0
    assert scores["cer_normalized"] == 0.0
    assert scores["wer_normalized"] == 0.0


def test_corpus_reports_normalised_rates_next_to_raw():
    rates = corpus_error_rates(["Hello   World"], ["hello world"])
    assert rates["cer"] > 0 and rates["cer_normalized"] == 0.0


# --------------------------------------------------------------------------- parse_fields


def test_parse_fields_reads_json_object_and_stringifies_values():
    text = '{"well": "A-1", "depth": 1000, "logs": ["GR", "SP"], "scale": {"x": 1}, "note": null}'
    assert parse_fields(text) == {
        "WELL": "A-1",
        "DEPTH": "1000",
        "LOGS": '["GR", "SP"]',
        "SCALE": '{"x": 1}',
        "NOTE": "",
    }


def test_parse_fields_reads_key_value_lines():
    text = "well name: A-1\n  Depth :  1000 ft \nno colon here\nTIME: 10:30"
    assert parse_fields(text) == {"WELL NAME": "A-1", "DEPTH": "1000 ft", "TIME": "10:30"}


def test_parse_fields_keeps_first_of_repeated_keys():
    assert parse_fields("DEPTH: 1\ndepth: 2") == {"DEPTH": "1"}
    assert parse_fields('{"depth": "1", "DEPTH": "2"}') == {"DEPTH": "1"}


def test_parse_fields_accepts_json_in_code_fence():
    assert parse_fields('```json\n{"well": "A-1"}\n```') == {"WELL": "A-1"}


def test_parse_fields_returns_empty_for_unstructured_text():
    assert parse_fields("SCHLUMBERGER COMPENSATED NEUTRON LOG") == {}
    assert parse_fields("[1, 2, 3]") == {}


# --------------------------------------------------------------------------- field_scores


REF = json.dumps({"WELL": "A-1", "DEPTH": "1000", "OPERATOR": "Shell"})
# DEPTH is wrong, OPERATOR is missing, COUNTY is invented.
HYP = "WELL: A-1\nDEPTH: 1001\nCOUNTY: Kern"


def test_field_precision_counts_invented_fields():
    # predicted WELL, DEPTH, COUNTY; only WELL and DEPTH are in the reference
    assert field_scores([REF], [HYP])["precision"] == pytest.approx(2 / 3)


def test_field_recall_counts_missing_fields():
    # reference WELL, DEPTH, OPERATOR; OPERATOR was not predicted
    assert field_scores([REF], [HYP])["recall"] == pytest.approx(2 / 3)


def test_field_f1_is_harmonic_mean():
    assert field_scores([REF], [HYP])["f1"] == pytest.approx(2 / 3)


def test_field_exact_match_counts_missing_as_wrong():
    # only WELL of the 3 reference fields has the exact value
    assert field_scores([REF], [HYP])["exact_match"] == pytest.approx(1 / 3)


def test_per_field_scores_missing_field_as_empty_hypothesis():
    per_field = field_scores([REF], [HYP])["per_field"]
    assert per_field["OPERATOR"] == {"exact": 0.0, "cer": 1.0, "support": 1}
    assert per_field["DEPTH"] == {"exact": 0.0, "cer": pytest.approx(1 / 4), "support": 1}
    assert "COUNTY" not in per_field


def test_per_field_exact_and_cer_aggregate_over_samples():
    per_field = field_scores(["DEPTH: 1000", "DEPTH: 20"], ["DEPTH: 1000", "DEPTH: 21"])["per_field"]
    assert per_field["DEPTH"] == {"exact": 0.5, "cer": pytest.approx(1 / 6), "support": 2}


def test_field_scores_is_none_without_structured_references():
    assert field_scores(["plain text"], ["WELL: A-1"]) is None


def test_field_scores_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        field_scores([REF], [HYP, HYP])


# --------------------------------------------------------------------------- score


def test_score_is_json_serialisable_and_complete():
    result = json.loads(json.dumps(score([REF, "plain"], [HYP, "plain"])))
    assert result["samples"] == 2
    assert result["fields"]["samples"] == 1
    assert {"cer", "wer", "cer_normalized", "wer_normalized", "char_edits", "ref_chars"} <= result.keys()
