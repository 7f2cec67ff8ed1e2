"""Prompt text, option parsing and answer grading (core.conversation)."""

from __future__ import annotations

import pytest

from mofserve.core.conversation import (
    Option,
    answer_to_letter,
    build_prompt,
    clean_answer,
    parse_options,
    split_prompt,
)

STANDING_SITTING = [Option("a", "Standing"), Option("b", "Sitting")]


def test_prompt_is_the_llava_v1_template_as_the_official_mmvp_script_builds_it():
    # MMVP row 279, written out by hand from LLaVA's conv_llava_v1 and scripts/evaluate_mllm.py
    expected = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
                "Is the elderly person standing or sitting in the picture? (a) Standing (b) Sitting ASSISTANT:")
    prompt = build_prompt("Is the elderly person standing or sitting in the picture?", "(a) Standing (b) Sitting")
    assert prompt == expected


def test_prompt_without_options_is_the_question_alone():
    prompt = build_prompt("What is in the image?")
    assert prompt.endswith("USER: <image>\nWhat is in the image? ASSISTANT:")
    assert build_prompt("What is in the image?", "  ") == prompt


def test_json_list_options_are_written_into_the_prompt_mmvp_style():
    assert build_prompt("Q?", '["Standing", "Sitting"]') == build_prompt("Q?", "(a) Standing (b) Sitting")


def test_prompt_splits_around_the_single_image_placeholder():
    before, after = split_prompt(build_prompt("Q?", "(a) x (b) y"))
    assert before.endswith("USER: ") and after == "\nQ? (a) x (b) y ASSISTANT:"


@pytest.mark.parametrize("question", ["", "   ", "look at <image> here"])
def test_empty_question_or_one_holding_the_placeholder_is_refused(question):
    with pytest.raises(ValueError, match=r"^question: "):
        build_prompt(question)


@pytest.mark.parametrize("text", [
    "(a) Standing (b) Sitting",
    "(A) Standing (B) Sitting",
    "(a)Standing(b)Sitting",
    "  ( a )  Standing \n ( b ) Sitting  ",
    "(a) Standing\n(b) Sitting",
    "(a) Standing, (b) Sitting",
    '["Standing", "Sitting"]',
    '  ["(a) Standing", "(b) Sitting"] ',
])
def test_options_parse_whatever_the_spacing_case_or_form(text):
    assert parse_options(text) == STANDING_SITTING


def test_option_texts_keep_their_words_and_a_marker_out_of_order_stays_text():
    assert parse_options("(a) A dog (left side) (b) Vitamin (c) pill (c) None") == [
        Option("a", "A dog (left side)"), Option("b", "Vitamin"), Option("c", "pill (c) None")]
    assert parse_options("(a) Yes (b) No (c) Maybe")[2] == Option("c", "Maybe")
    assert Option("b", "Sitting").label == "(b) Sitting"


@pytest.mark.parametrize("text, detail", [
    ("", "at least two options"),
    ("Standing or sitting", "at least two options"),
    ("(a) Standing", "at least two options"),
    ("(a) Standing (c) Sitting", "at least two options"),
    ("(b) Standing (a) Sitting", "at least two options"),
    ("Options: (a) Standing (b) Sitting", "unexpected text 'Options:' before '\\(a\\)'"),
    ("(a) (b) Sitting", "option \\(a\\) has no text"),
    ("(a) Standing (b)  ", "option \\(b\\) has no text"),
    ('["Standing"]', "2 to 26 options"),
    ('["Standing", ""]', "option \\(b\\) is empty"),
    ('["Standing", 3]', "JSON list of strings"),
    ('{"a": "Standing"}', "MMVP-style"),
    ('["Standing", "Sitting"', "not valid JSON"),
])
def test_malformed_options_fail_naming_the_field_and_what_was_expected(text, detail):
    with pytest.raises(ValueError, match=r"^options: ") as error:
        parse_options(text)
    assert error.match(detail)


def test_mmvp_style_error_says_what_was_expected():
    with pytest.raises(ValueError) as error:
        parse_options("Standing or sitting")
    assert str(error.value) == ("options: expected MMVP-style '(a) ... (b) ...' with at least two options, "
                                "got 'Standing or sitting'")


@pytest.mark.parametrize("answer, letter", [
    ("(a)", "a"),
    ("(b)", "b"),
    ("( B )", "b"),
    ("a", "a"),
    ("A", "a"),
    ("A.", "a"),
    ("b)", "b"),
    ("B: Sitting", "b"),
    ("Standing", "a"),
    ("sitting.", "b"),
    ("The person is sitting on a bench.", "b"),
    ("The answer is (b) Sitting", "b"),
    ("(b) Sitting, not (a) Standing", "b"),
    ("The answer is B.", "b"),
    ("Answer: a", "a"),
    ("Option A", "a"),
    ("I think the answer is a standing person", "a"),  # 'a' is an article here; the text decides
    ("", None),
    ("I cannot tell.", None),
    ("Standing or sitting, hard to say", None),
    ("(a) Standing (b) Sitting? Not sure", "a"),  # starts with a marker: that one
    ("Maybe (a) Standing or (b) Sitting", None),
    ("(c)", None),  # not an option of this question
    ("\ufffd\x04 garbled", None),
])
def test_answers_map_to_the_option_letter_by_letter_or_by_text(answer, letter):
    assert answer_to_letter(answer, STANDING_SITTING) == letter


def test_grading_takes_the_options_string_and_prefers_the_longer_matching_text():
    options = "(a) Open (b) Not open"
    assert answer_to_letter("It is not open.", options) == "b"
    assert answer_to_letter("Open", options) == "a"
    assert answer_to_letter("(a)", "(a) Yes (b) No") == "a"  # the Correct Answer column of MMVP


def test_decoded_answer_loses_the_stop_string_and_space():
    assert clean_answer("  (a) Standing</s> ") == "(a) Standing"
