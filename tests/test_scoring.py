"""Parsing and scoring of generated answers: perfect, partial, clean-board and garbage answers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stabguard.data.synth import DEFECT_CLASSES, INSTRUCTIONS, answer
from stabguard.scoring import (PROMPT, EvalError, greedy_match, iou, parse_answer, result_record, score_sample,
                               summarize, truth_of)

TRUTH = [{"bbox_2d": [10, 10, 30, 30], "label": "open"}, {"bbox_2d": [100, 50, 120, 90], "label": "pin-hole"}]


def metrics(answers, truths):
    return summarize([result_record(f"s{i}", a, t)[0] for i, (a, t) in enumerate(zip(answers, truths))])


def test_prompt_is_the_synthetic_sets_detection_instruction():
    assert PROMPT == INSTRUCTIONS[0]


def test_iou_values():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges share no area


def test_greedy_match_takes_the_best_pair_first_and_uses_each_box_once():
    pred = [{"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": [1, 0, 11, 10]}]
    truth = [{"bbox_2d": [1, 0, 11, 10]}, {"bbox_2d": [50, 50, 60, 60]}]
    assert greedy_match(pred, truth) == [(1, 0, 1.0)]  # pred 0 overlaps only truth 0, already taken


def test_perfect_answers_score_one():
    truths = [TRUTH, [], TRUTH[:1]]
    m = metrics([answer(t) for t in truths], truths)
    assert m == {"samples": 3, "answers_parsed": 1.0, "count_accuracy": 1.0, "type_accuracy": 1.0,
                 "box_iou": 1.0, "precision_50": 1.0, "recall_50": 1.0}


def test_partial_answer():
    shifted = {"bbox_2d": [15, 10, 35, 30], "label": "open"}  # IoU 15*20 / (2*400 - 300) = 0.6
    extra = {"bbox_2d": [200, 200, 210, 210], "label": "spur"}
    text = "Found 3 defects:\n" + json.dumps([shifted, {"bbox_2d": [100, 50, 120, 90], "label": "short"}, extra])
    s = score_sample(parse_answer(text), TRUTH)
    assert s["recognised"] and not s["count_ok"] and not s["types_ok"]
    assert s["iou_sum"] == pytest.approx(1.6) and s["box_slots"] == 3
    assert s["hits"] == 1  # the shifted open; the second box has the wrong label
    m = summarize([s])
    assert m["box_iou"] == pytest.approx(1.6 / 3) and m["precision_50"] == pytest.approx(1 / 3)
    assert m["recall_50"] == pytest.approx(1 / 2)


def test_answer_cut_off_mid_json_keeps_the_count_and_the_complete_boxes():
    text = answer(TRUTH)[:-20]  # max_new_tokens ran out inside the second object
    parsed = parse_answer(text)
    assert parsed.recognised and parsed.count == 2
    assert parsed.defects == [{"bbox_2d": [10.0, 10.0, 30.0, 30.0], "label": "open"}]


def test_labels_compare_without_case_or_separators():
    s = score_sample(parse_answer(json.dumps([{"bbox_2d": [100, 50, 120, 90], "label": "Pin Hole"}])),
                     TRUTH[1:])
    assert s["types_ok"] is False  # a bare list is readable but not the answer format
    assert s["count_ok"] and s["hits"] == 1


def test_clean_board():
    ok, wrong = score_sample(parse_answer("No defects found."), []), score_sample(parse_answer(answer(TRUTH)), [])
    assert ok["count_ok"] and ok["types_ok"] and ok["box_slots"] == 0
    assert not wrong["count_ok"] and not wrong["types_ok"] and wrong["iou_sum"] == 0 and wrong["box_slots"] == 2
    assert summarize([ok])["box_iou"] is None  # nothing to measure, not a perfect score


GARBAGE = ["", " lessuch base</think> these1ork need classistant typemplate{ than| {", "[" * 5000 + "]" * 5000,
           "Found defects: [{", '{"bbox_2d": [1, 2], "label": "open"} {"bbox_2d": "x", "label": 3}',
           '[{"bbox_2d": [30, 30, 10, 10], "label": "open"}]', '[{"bbox_2d": [1, 2, 3, NaN], "label": "o"}]',
           '{"bbox_2d": [1e999, 0, 1e999, 5], "label": "spur"}', None, "No defects found." * 3 + "{"]


@pytest.mark.parametrize("text", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_scores_zero_and_does_not_raise(text):
    s = score_sample(parse_answer(text), TRUTH)
    assert not s["count_ok"] and not s["types_ok"] and s["iou_sum"] == 0 and s["hits"] == 0


def test_garbage_set_scores_zero_overall():
    m = metrics([t for t in GARBAGE if t is None or "No defects" not in t], [TRUTH] * 9)
    assert m["count_accuracy"] == m["type_accuracy"] == m["box_iou"] == m["recall_50"] == 0.0
    assert m["precision_50"] is None  # no box predicted


@settings(deadline=None, max_examples=200)
@given(st.text())
def test_any_text_parses_without_error(text):
    parsed = parse_answer(text)
    assert parsed.count is None or parsed.count >= 0
    assert all(d["bbox_2d"][0] < d["bbox_2d"][2] and d["bbox_2d"][1] < d["bbox_2d"][3] for d in parsed.defects)


_box = st.tuples(st.integers(0, 500), st.integers(0, 500), st.integers(1, 100), st.integers(1, 100))
_defects = st.lists(st.builds(lambda b, label: {"bbox_2d": [b[0], b[1], b[0] + b[2], b[1] + b[3]], "label": label},
                              _box, st.sampled_from(DEFECT_CLASSES)), max_size=5)


@settings(deadline=None, max_examples=100)
@given(_defects)
def test_the_training_answer_format_round_trips(defects):
    parsed = parse_answer(answer(defects))
    assert parsed.recognised and parsed.count == len(defects)
    assert parsed.defects == [{"bbox_2d": [float(v) for v in d["bbox_2d"]], "label": d["label"]} for d in defects]
    s = score_sample(parsed, defects)
    assert s["count_ok"] and s["types_ok"] and s["hits"] <= len(defects)


def test_truth_from_defects_key_or_from_the_answer():
    row = {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": answer(TRUTH)}]}
    assert truth_of(row, "f:1") == [{"bbox_2d": [float(v) for v in d["bbox_2d"]], "label": d["label"]} for d in TRUTH]
    assert truth_of({"messages": [{"role": "assistant", "content": "maybe"}]}, "f:2") is None
    with pytest.raises(EvalError, match=r"f:3: defects"):
        truth_of({**row, "defects": [{"bbox_2d": [1, 2, 3], "label": "open"}]}, "f:3")
