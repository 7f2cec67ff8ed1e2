"""The MMVP evaluator without a server: reading the official layout (and every way it can be
wrong), the grading rules, question and pair accuracy, the label fixes, resume, the judge's
request and reply, and the written reports.

Datasets are built in tmp_path in the official format: ``MMVP Images/<k>.jpg`` (a space in the
folder name) drawn with Pillow, and ``Questions.csv`` with the official ``lndex`` header.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mofserve.cli import main
from mofserve.clients import ALL_MODES, AskResult, Provenance, ServerInfo, Timings
from mofserve.core.reports import markdown_table, write_csv
from mofserve.evaluation import datasets as D
from mofserve.evaluation import judge as J
from mofserve.evaluation import mmvp as M
from mofserve.evaluation import mmvp_report as R
from mofserve.evaluation import mmvp_scoring as S
from mofserve.evaluation.checkpoint import JsonlCheckpoint

NOTICE = "tiny profile: seeded random weights, answers are not meaningful"
PROVENANCE = {"profile": "tiny", "random_weights": True, "model_versions": {}}

# (Index, Question, Options, Correct Answer): 4 pairs, answers alternating as in MMVP
ROWS = [
    (1, "Is the dog facing left or right?", "(a) Left (b) Right", "(a)"),
    (2, "Is the dog facing left or right?", "(a) Left (b) Right", "(b)"),
    (3, "Is the door open or closed?", "(a) Open (b) Closed", "(b)"),
    (4, "Is the door open or closed?", "(a) Open (b) Closed", "(a)"),
    (5, "How many wheels can you see?", "(a) Two (b) Three", "(a)"),
    (6, "How many wheels can you see?", "(a) Two (b) Three", "(b)"),
    (7, "Is the elderly person standing or sitting in the picture?", "(a) Standing (b) Sitting", "(a)"),
    (8, "Is the elderly person standing or sitting in the picture?", "(a) Standing (b) Sitting", "(b)"),
]


def drawn_jpeg(k: int) -> bytes:
    image = Image.new("RGB", (64, 48), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x = 4 + (k * 7) % 40
    draw.ellipse((x, 10, x + 20, 30), fill=(200, 30 * (k % 8), 40))
    draw.rectangle((0, 40, 63, 47), fill=(20, 20, 180))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_mmvp(root: Path, rows=ROWS, header=("lndex", "Question", "Options", "Correct Answer"),
               images: str = "MMVP Images", skip_images=(), bad_images=()) -> Path:
    """An MMVP folder in the official layout (CSV written by the csv module, quoting as needed)."""
    (root / images).mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    for row in rows:
        writer.writerow(row)
        index = row[0]
        if index in skip_images:
            continue
        data = b"not a jpeg at all" if index in bad_images else drawn_jpeg(hash(index) % 97)
        (root / images / f"{index}.jpg").write_bytes(data)
    (root / "Questions.csv").write_text(buffer.getvalue(), encoding="utf-8")
    return root


def items_of(tmp_path, **kwargs) -> tuple[D.MMVPItem, ...]:
    return D.load_mmvp(write_mmvp(tmp_path, **kwargs)).items


def record(item: D.MMVPItem, spec: S.ModeSpec, answer: str | None = None, chosen: str = "a",
           error: str | None = None, max_new_tokens: int | None = None) -> dict:
    result = None
    if error is None:
        result = AskResult(answer or "", chosen, [-1.0, -2.0], Timings(1.0, 2.0, 2.0, 1.5, 0.5, 10.0, 14.0),
                           spec.mode, spec.alpha if spec.mode != "additive" or spec.alpha is not None else 0.75,
                           Provenance("tiny", True, NOTICE, {}))
    return S.answer_record(item, spec, max_new_tokens, PROVENANCE, result=result, error=error)


def server_info() -> ServerInfo:
    return ServerInfo("0.1.0", ["clip", "dinov2", "additive", "interleaved"], "interleaved", 0.75,
                      {"max_new_tokens": 512}, Provenance("tiny", True, NOTICE, {}))


# ---- reading the dataset ------------------------------------------------------------------------------


def test_official_layout_with_lndex_header_and_spaced_images_folder_is_read(tmp_path):
    dataset = D.load_mmvp(write_mmvp(tmp_path))
    assert dataset.images_dir == tmp_path / "MMVP Images"
    assert dataset.rows == 8 and [i.index for i in dataset.items] == list(range(1, 9))
    first = dataset.items[0]
    assert first.question == "Is the dog facing left or right?" and first.options == "(a) Left (b) Right"
    assert first.correct == "(a)" and first.correct_letter == "a" and dataset.items[1].correct_letter == "b"
    assert first.image == tmp_path / "MMVP Images" / "1.jpg" and len(first.image_sha256) == 64
    assert first.error is None and first.pair == 1 and dataset.items[1].pair == 1 and dataset.items[2].pair == 2
    assert first.prompt == "Is the dog facing left or right? (a) Left (b) Right"  # the official script's


@pytest.mark.parametrize("images", ["MMVP_Images", "images", "MMVP Imgaes"])
@pytest.mark.parametrize("index_header", ["Index", "lndex", " index "])
def test_other_image_folder_names_and_index_spellings_are_accepted(tmp_path, images, index_header):
    items = items_of(tmp_path, images=images, header=(index_header, "Question", "Options", "Correct Answer"))
    assert len(items) == 8 and all(i.error is None for i in items)


def test_a_utf8_bom_and_extra_columns_are_harmless(tmp_path):
    write_mmvp(tmp_path, rows=[(*r, "orientation") for r in ROWS],
               header=("lndex", "Question", "Options", "Correct Answer", "Type"))
    path = tmp_path / "Questions.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    items = D.load_mmvp(tmp_path).items
    assert len(items) == 8 and all(i.error is None for i in items)


def test_missing_folder_images_folder_and_csv_are_errors_naming_them(tmp_path):
    with pytest.raises(D.DatasetError, match="no such folder"):
        D.load_mmvp(tmp_path / "nowhere")
    with pytest.raises(D.DatasetError, match=r"no images folder; expected 'MMVP Images'"):
        D.load_mmvp(tmp_path)
    (tmp_path / "MMVP Images").mkdir()
    with pytest.raises(D.DatasetError, match=r"Questions\.csv: not found"):
        D.load_mmvp(tmp_path)


@pytest.mark.parametrize("header, message", [
    (("Idx", "Question", "Options", "Correct Answer"), r"line 1: unknown header: the first column must be 'Index' "
                                                       r"\(or the official file's typo 'lndex'\), got 'Idx'"),
    (("Index", "Question", "Options"), r"line 1: missing column\(s\) 'Correct Answer'"),
    (("lndex", "Question", "Answer", "Correct"), r"missing column\(s\) 'Options', 'Correct Answer'"),
    (None, r"unknown header: .* got '1'"),  # no header at all: the first data row is not one
])
def test_a_bad_header_is_an_error_naming_the_file_and_line(tmp_path, header, message):
    write_mmvp(tmp_path, header=header)
    with pytest.raises(D.DatasetError, match=message) as caught:
        D.load_mmvp(tmp_path)
    assert "Questions.csv" in str(caught.value)


def test_an_empty_csv_or_one_without_rows_is_an_error(tmp_path):
    write_mmvp(tmp_path, rows=[])
    with pytest.raises(D.DatasetError, match="no questions below the header"):
        D.load_mmvp(tmp_path)
    (tmp_path / "Questions.csv").write_text("")
    with pytest.raises(D.DatasetError, match="empty file"):
        D.load_mmvp(tmp_path)


@pytest.mark.parametrize("bad_index, message", [
    ("x", r"Questions\.csv line 3: Index must be a positive integer, got 'x'"),
    ("0", r"line 3: Index must be a positive integer, got '0'"),
    ("1", r"Questions\.csv line 3: Index 1 appears twice \(first on line 2\)"),
])
def test_a_bad_or_repeated_index_is_an_error_naming_the_line(tmp_path, bad_index, message):
    rows = [ROWS[0], (bad_index, *ROWS[1][1:]), *ROWS[2:]]
    write_mmvp(tmp_path, rows=rows)
    with pytest.raises(D.DatasetError, match=message):
        D.load_mmvp(tmp_path)


def test_per_item_problems_fail_that_item_only_with_a_message_naming_file_and_row(tmp_path):
    rows = list(ROWS)
    rows[1] = (2, ROWS[1][1], "Left or right", "(b)")  # options do not parse
    rows[2] = (3, ROWS[2][1], ROWS[2][2], "(c)")  # not one of the options
    rows[3] = (4, "", ROWS[3][2], "(a)")  # empty question
    rows[4] = (5, ROWS[4][1], ROWS[4][2], "(a)", "stray")  # an unquoted comma shifted the row
    items = items_of(tmp_path, rows=rows, skip_images=(6,), bad_images=(7,))
    errors = {i.index: i.error for i in items}
    assert errors[1] is None and errors[8] is None
    assert errors[2].startswith("Questions.csv line 3 (Index 2): options: expected MMVP-style")
    assert errors[3] == ("Questions.csv line 4 (Index 3): Correct Answer '(c)' names none of the options "
                         "'(a) Open (b) Closed'")
    assert errors[4] == "Questions.csv line 5 (Index 4): 'Question' is empty"
    assert "Questions.csv line 6 (Index 5): 5 fields but the header has 4 (an unquoted comma?)" in errors[5]
    assert errors[6] == "MMVP Images/6.jpg: image not found (for Questions.csv line 7 (Index 6))"
    assert errors[7].startswith("MMVP Images/7.jpg: cannot decode the image (")
    assert all(i.correct_letter is None for i in items if i.error)
    # never asked, and counted as failed in every rule
    assert [item.index for item, _ in S.pending_work(items, [S.ModeSpec("clip")], {})] == [1, 8]


def test_an_empty_or_unreadable_image_file_fails_its_item(tmp_path):
    write_mmvp(tmp_path, rows=ROWS[:2])
    (tmp_path / "MMVP Images" / "2.jpg").write_bytes(b"")
    items = D.load_mmvp(tmp_path).items
    assert items[1].error == "MMVP Images/2.jpg: empty file (for Questions.csv line 3 (Index 2))"
    truncated = drawn_jpeg(1)[:200]
    (tmp_path / "MMVP Images" / "1.jpg").write_bytes(truncated)
    assert D.load_mmvp(tmp_path).items[0].error.startswith("MMVP Images/1.jpg: cannot decode the image")


def test_limit_keeps_the_first_rows_but_remembers_every_label(tmp_path):
    dataset = D.load_mmvp(write_mmvp(tmp_path), limit=3)
    assert [i.index for i in dataset.items] == [1, 2, 3] and dataset.rows == 8
    assert dataset.correct_by_index[8] == "(b)"


# ---- label fixes --------------------------------------------------------------------------------------


def fix_rows() -> list[tuple]:
    q, o = "Are the elephant's tusks long or short?", "(a) Long (b) Short"
    q2, o2 = ROWS[6][1], ROWS[6][2]
    return [(97, q, o, "(a)"), (98, q, o, "(b)"), (99, q, o, "(a)"), (100, q, o, "(b)"),
            (279, q2, o2, "(a)"), (280, q2, o2, "(b)")]


def test_label_fixes_swap_the_correct_answers_of_99_100_and_279_280_only(tmp_path):
    dataset = D.load_mmvp(write_mmvp(tmp_path, rows=fix_rows()))
    fixed, fixes = dataset.label_fixed()
    before = {i.index: (i.correct, i.correct_letter) for i in dataset.items}
    after = {i.index: (i.correct, i.correct_letter) for i in fixed}
    assert after == {97: ("(a)", "a"), 98: ("(b)", "b"), 99: ("(b)", "b"), 100: ("(a)", "a"),
                     279: ("(b)", "b"), 280: ("(a)", "a")}
    assert before[99] == ("(a)", "a") and before[279] == ("(a)", "a")  # the raw items are left alone
    assert fixes.changes == [{"index": 99, "from": "(a)", "to": "(b)"}, {"index": 100, "from": "(b)", "to": "(a)"},
                             {"index": 279, "from": "(a)", "to": "(b)"}, {"index": 280, "from": "(b)", "to": "(a)"}]
    assert fixes.skipped == []


def test_label_fixes_use_the_partner_row_beyond_limit_and_skip_a_pair_missing_from_the_csv(tmp_path):
    dataset = D.load_mmvp(write_mmvp(tmp_path, rows=fix_rows()[:5]), limit=3)  # rows 97, 98, 99; 100 read
    fixed, fixes = dataset.label_fixed()
    assert [(i.index, i.correct) for i in fixed] == [(97, "(a)"), (98, "(b)"), (99, "(b)")]
    assert fixes.changes == [{"index": 99, "from": "(a)", "to": "(b)"}]
    assert fixes.skipped == ["279/280: Index 280 not in the CSV"]


# ---- modes ---------------------------------------------------------------------------------------------


def test_modes_take_alpha_for_additive_only_and_refuse_mistakes():
    specs = S.mode_specs(["clip", "additive", "additive:0.25"], alpha=0.5)
    assert [s.key for s in specs] == ["clip", "additive:0.5", "additive:0.25"]
    assert [s.selection for s in specs] == ["clip", ("additive", 0.5), ("additive", 0.25)]
    assert [s.key for s in S.mode_specs(["interleaved", "additive"])] == ["interleaved", "additive"]
    for modes, alpha, message in [
        (["clip"], 0.5, "--alpha: applies to the additive mode only"),
        (["additive"], 1.5, r"--alpha: alpha must be within \[0, 1\], got 1.5"),
        (["clip:0.5"], None, "only the additive mode takes an alpha"),
        (["cl1p"], None, "unknown mode 'cl1p'"),
        (["additive:x"], None, "alpha must be a number"),
        (["clip", "clip"], None, "clip given twice"),
        ([], None, "at least one mode"),
    ]:
        with pytest.raises(ValueError, match=message):
            S.mode_specs(modes, alpha)


def test_compare_asks_a_mode_with_both_encoders_first_so_each_encoder_sees_the_image_once():
    specs = S.mode_specs(["clip", "dinov2", "additive:0.5", "interleaved"])
    assert [s.key for s in M.compare_order(specs)] == ["additive:0.5", "interleaved", "clip", "dinov2"]
    assert [s.key for s in M.compare_order(S.mode_specs(["dinov2", "clip"]))] == ["dinov2", "clip"]


def test_what_the_server_would_refuse_for_every_item_is_refused_before_asking():
    info = ServerInfo("0.1.0", ["clip", "interleaved"], "interleaved", None,
                      {"max_new_tokens": 64, "max_compare_modes": 2}, Provenance("tiny", True, NOTICE, {}))
    M.check_server(info, S.mode_specs(["clip", "interleaved"]), 64, "s:1")
    with pytest.raises(ValueError, match=r"--mode: the server at s:1 does not serve additive:0.5 \(it serves clip, "
                                         r"interleaved\)"):
        M.check_server(info, S.mode_specs(["clip", "additive:0.5"]), None, "s:1")
    with pytest.raises(ValueError, match="compares at most 2 at once"):
        M.check_server(dataclasses.replace(info, modes=list(ALL_MODES)),
                       S.mode_specs(["clip", "dinov2", "interleaved"]), None, "s:1")
    with pytest.raises(ValueError, match="--max-new-tokens: 65 is over the server's limit of 64"):
        M.check_server(info, S.mode_specs(["clip"]), 65, "s:1")


# ---- grading and scores ----------------------------------------------------------------------------------


def test_pair_and_question_accuracy_hand_computed():
    # pairs: (1,2) both right; (3,4) one wrong; (5,6) 5 failed; (7,8) both right
    s = S.score({1: True, 2: True, 3: True, 4: False, 5: None, 6: True, 7: True, 8: True})
    assert (s.questions, s.questions_correct, s.question_accuracy) == (8, 6, 75.0)
    assert (s.pairs, s.pairs_correct, s.pair_accuracy) == (4, 2, 50.0)
    assert s.failed == [5] and s.failed_pairs == [[5, 6]] and s.incomplete_pairs == []


def test_pairs_are_odd_then_even_indices_never_even_then_odd():
    # 2 and 3 are both right, but they belong to different pairs: no pair is right
    s = S.score({1: False, 2: True, 3: True, 4: False})
    assert (s.pairs, s.pairs_correct, s.pair_accuracy) == (2, 0, 0.0)
    assert S.score({3: True, 4: True, 5: True, 6: False}).pairs_correct == 1  # pairs (3,4) and (5,6)


def test_a_pair_with_one_question_only_is_reported_and_left_out_of_the_pair_score():
    s = S.score({1: True, 2: True, 3: True, 7: True, 8: False})
    assert (s.pairs, s.pairs_correct, s.pair_accuracy) == (2, 1, 50.0)
    assert s.incomplete_pairs == [[3]] and (s.questions, s.questions_correct) == (5, 4)
    empty = S.score({})
    assert empty.pair_accuracy is None and empty.question_accuracy is None


def test_grading_by_generated_text_and_by_likelihood(tmp_path):
    items = items_of(tmp_path)
    spec = S.ModeSpec("clip")
    sitting = items[7]  # correct (b) Sitting
    for answer, parsed in [("(b)", "b"), ("Sitting", "b"), ("The answer is (b) Sitting.", "b"), ("B.", "b"),
                           ("(a) Standing", "a"), ("standing", "a"), ("I cannot tell", None), ("", None)]:
        g = S.grade(sitting, record(sitting, spec, answer, chosen="b"))
        assert (g.parsed_letter, g.generated, g.likelihood, g.failed) == (parsed, parsed == "b", True, False)
    g = S.grade(sitting, record(sitting, spec, "Sitting", chosen="a"))
    assert (g.generated, g.likelihood, g.likelihood_letter) == (True, False, "a")
    failed = S.grade(sitting, record(sitting, spec, error="DEADLINE_EXCEEDED: deadline"))
    assert failed.failed and failed.error == "DEADLINE_EXCEEDED: deadline" and failed.generated is None
    assert S.grade(sitting, None).error.startswith("not asked")


def test_score_mode_counts_failed_items_as_wrong_and_lists_them(tmp_path):
    items = items_of(tmp_path, bad_images=(8,))
    spec = S.ModeSpec("interleaved")
    letters = "abbaabab"  # the correct letters of ROWS
    generated = {1: "(a)", 2: "(b)", 3: "Closed", 4: "(b)", 5: "(a)", 6: "no idea", 7: "(a) Standing"}
    chosen = {1: "a", 2: "a", 3: "b", 4: "a", 5: "a", 6: "b", 7: "a"}
    answers = {(i, spec.key): record(items[i - 1], spec, generated[i], chosen[i]) for i in generated}
    answers[(2, spec.key)] = record(items[1], spec, error="UNAVAILABLE: triton restarting")
    s = R.score_mode(items, spec, answers, None)
    # generated: 1 ok, 2 failed, 3 ok, 4 wrong, 5 ok, 6 unparsed, 7 ok, 8 failed -> 4/8; pairs: (7,8) failed
    assert (s["generated"]["questions_correct"], s["generated"]["pairs_correct"]) == (4, 0)
    # likelihood: 1 ok, 2 failed, 3 ok, 4 ok, 5 ok, 6 ok, 7 ok, 8 failed -> 6/8; pairs (3,4) (5,6) -> 2/4
    assert (s["likelihood"]["questions_correct"], s["likelihood"]["pairs_correct"]) == (6, 2)
    assert s["likelihood"]["pair_accuracy"] == 50.0 and s["likelihood"]["failed_pairs"] == [[1, 2], [7, 8]]
    assert s["answered"] == 6 and s["unparsed_answers"] == 1
    assert [e["index"] for e in s["errors"]] == [2, 8] and s["errors"][0]["error"] == "UNAVAILABLE: triton restarting"
    assert "judge" not in s and letters


# ---- resume --------------------------------------------------------------------------------------------


def test_resume_skips_answered_items_and_retries_failed_and_stale_ones(tmp_path):
    items = items_of(tmp_path)
    clip, inter = S.ModeSpec("clip"), S.ModeSpec("interleaved")
    changed = D.MMVPItem(**{**items[2].__dict__, "image_sha256": "0" * 64})
    records = [
        record(items[0], clip, "(a)"), record(items[0], inter, "(b)"),  # 1: done in both modes
        record(items[1], clip, "(a)"), record(items[1], inter, error="DEADLINE_EXCEEDED: x"),  # 2: retry inter
        record(changed, clip, "(a)"), record(changed, inter, "(a)"),  # 3: the image changed since
        record(items[3], clip, "(a)", max_new_tokens=8),  # 4: asked with other settings
        record(items[4], S.ModeSpec("dinov2"), "(a)"),  # a mode not asked now
    ]
    chosen = S.select_records(records, items, [clip, inter], None)
    assert set(chosen) == {(1, "clip"), (1, "interleaved"), (2, "clip"), (2, "interleaved")}
    work = S.pending_work(items, [clip, inter], chosen)
    assert [(item.index, [s.key for s in specs]) for item, specs in work] == [
        (2, ["interleaved"]), (3, ["clip", "interleaved"]), (4, ["clip", "interleaved"]),
        (5, ["clip", "interleaved"]), (6, ["clip", "interleaved"]), (7, ["clip", "interleaved"]),
        (8, ["clip", "interleaved"])]


def test_a_later_error_never_replaces_an_answer_and_a_later_answer_replaces_an_error(tmp_path):
    item = items_of(tmp_path)[0]
    spec = S.ModeSpec("clip")
    ok, bad = record(item, spec, "(a)"), record(item, spec, error="INTERNAL: boom")
    assert S.select_records([ok, bad], [item], [spec], None)[(1, "clip")]["answer"] == "(a)"
    assert S.select_records([bad, ok], [item], [spec], None)[(1, "clip")]["answer"] == "(a)"
    assert S.select_records([bad], [item], [spec], None)[(1, "clip")]["error"] == "INTERNAL: boom"


def test_answers_from_another_model_are_refused(tmp_path):
    item = items_of(tmp_path)[0]
    old = record(item, S.ModeSpec("clip"), "(a)")
    S.check_provenance([old], PROVENANCE, tmp_path / "answers.jsonl")
    with pytest.raises(ValueError, match=r"answers\.jsonl: holds answers from profile 'tiny'.*serves profile "
                                         r"'paper'.*use another --out"):
        S.check_provenance([old], {"profile": "paper", "random_weights": False, "model_versions": {}},
                           tmp_path / "answers.jsonl")


def test_checkpoint_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    with JsonlCheckpoint(path) as checkpoint:
        checkpoint.append({"index": 1})
        checkpoint.append({"index": 2})
    path.write_text(path.read_text() + '{"index": 3, "answ')  # killed mid-write
    checkpoint = JsonlCheckpoint(path)
    assert [r["index"] for r in checkpoint.load()] == [1, 2] and checkpoint.bad_lines == [3]
    with checkpoint:
        checkpoint.append({"index": 4})
    assert [r["index"] for r in JsonlCheckpoint(path).load()] == [1, 2, 4]


# ---- judge ----------------------------------------------------------------------------------------------


def test_judge_request_is_the_official_graders_question():
    request = J.judge_request("gpt-4o", "Is it on? (a) On (b) Off", "(a)", "(b) Off")
    assert request["model"] == "gpt-4o" and request["temperature"] == 0.2
    system, user = request["messages"]
    assert system == {"role": "system", "content": "You are a helpful and precise assistant for checking the "
                                                   "quality of the answer. Please answer in only yes or no."}
    assert user == {"role": "user", "content": "Given the following question Is it on? (a) On (b) Off, the correct "
                                               "answer is (a). Does the following answer correctly answers the "
                                               "question, answer:(b) Off?"}


@pytest.mark.parametrize("reply, verdict", [("yes", "yes"), ("No", "no"), (" YES\n", "yes"), ("no.", "no"),
                                            ("Yes, it is correct", None), ("maybe", None), ("", None),
                                            (None, None)])
def test_judge_replies_other_than_yes_or_no_are_undetermined(reply, verdict):
    assert J.parse_judge_reply(reply) == verdict
    assert J.verdict_correct(J.parse_judge_reply(reply)) is (verdict == "yes")


def test_judge_work_asks_again_for_rows_whose_label_was_fixed(tmp_path):
    dataset = D.load_mmvp(write_mmvp(tmp_path, rows=fix_rows()))
    fixed, _ = dataset.label_fixed()
    spec = S.ModeSpec("clip")
    answers = {(i.index, spec.key): record(i, spec, "(a)") for i in dataset.items}
    work = S.judge_work({"raw": dataset.items, "fixed": fixed}, [spec], answers, {})
    assert [(item.index, item.correct) for item, _, _ in work] == [
        (97, "(a)"), (98, "(b)"), (99, "(a)"), (100, "(b)"), (279, "(a)"), (280, "(b)"),
        (99, "(b)"), (100, "(a)"), (279, "(b)"), (280, "(a)")]
    judged = [{"index": item.index, "mode_key": s.key, "correct": item.correct, "answer": a, "model": "m",
               "reply": "yes", "verdict": "yes", "error": None} for item, s, a in work[:8]]
    judged.append({**judged[0], "index": 279, "correct": "(b)", "verdict": None, "error": "APIConnectionError"})
    done = S.select_judgements(judged, "m")
    assert [(i.index, i.correct) for i, _, _ in S.judge_work({"raw": dataset.items, "fixed": fixed}, [spec],
                                                               answers, done)] == [(279, "(b)"), (280, "(a)")]
    assert S.select_judgements(judged, "another model") == {}
    g = S.grade(dataset.items[0], answers[(97, "clip")], S.judgement_for(dataset.items[0], spec,
                                                                         answers[(97, "clip")], done), judged=True)
    assert (g.judge_verdict, g.judge) == ("yes", True)
    assert S.grade(fixed[4], answers[(279, "clip")], None, judged=True).judge is None  # not judged: failed


# ---- reports --------------------------------------------------------------------------------------------


def full_report(tmp_path, fix_labels=True, judged=False):
    dataset = D.load_mmvp(write_mmvp(tmp_path / "data", rows=fix_rows(), bad_images=(98,)))
    label_sets = {"raw": dataset.items}
    fixes = None
    if fix_labels:
        label_sets["fixed"], fixes = dataset.label_fixed()
    specs = [S.ModeSpec("clip"), S.ModeSpec("additive", 0.5)]
    answers = {}
    for item in dataset.items:
        if item.error:
            continue
        answers[(item.index, "clip")] = record(item, specs[0], "(a)", chosen="a")
        answers[(item.index, "additive:0.5")] = record(item, specs[1], "Short", chosen="b")
    judgements = None
    if judged:
        work = S.judge_work(label_sets, specs, answers, {})
        judgements = S.select_judgements(
            [{"index": i.index, "mode_key": s.key, "correct": i.correct, "answer": a, "model": "m",
              "reply": "yes" if i.index % 2 else "No", "verdict": J.parse_judge_reply("yes" if i.index % 2 else "No"),
              "error": None} for i, s, a in work], "m")
    settings = {"modes": [s.key for s in specs], "alpha": 0.5, "concurrency": 4, "timeout_s": 300.0,
                "max_new_tokens": None, "decoding": "greedy", "prompt": "p", "limit": None, "fix_labels": fix_labels,
                "judge": None}
    run = {"requests": 5, "failed_requests": 0, "reused_answers": 5, "judged": 0, "wall_s": 1.5, "out": "x"}
    report = R.build_report(dataset=dataset, label_sets=label_sets, fixes=fixes, specs=specs, answers=answers,
                            judgements=judgements, server="127.0.0.1:1", server_info=server_info(),
                            settings=settings, run=run)
    return dataset, label_sets, specs, answers, judgements, report


def test_report_scores_raw_and_fixed_labels_side_by_side(tmp_path):
    _, _, _, _, _, report = full_report(tmp_path)
    raw, fixed = report["scores"]["raw"], report["scores"]["fixed"]
    # clip always says (a): raw labels a,b(failed),a,b,a,b -> right on 97, 99, 279; pairs (97,98) failed
    assert raw["clip"]["generated"]["questions_correct"] == 3 and raw["clip"]["generated"]["pairs_correct"] == 0
    # fixed labels a,b(failed),b,a,b,a -> right on 97, 100, 280
    assert fixed["clip"]["generated"]["questions_correct"] == 3
    # additive chooses (b): raw right on 100, 280 (98 failed); fixed right on 99, 279 -> no pair either way.
    # It says "Short", which names no option of 279/280 (Standing / Sitting): generated right on 100 / on 99
    assert raw["additive:0.5"]["likelihood"]["questions_correct"] == 2
    assert fixed["additive:0.5"]["likelihood"]["questions_correct"] == 2
    assert raw["additive:0.5"]["generated"]["questions_correct"] == 1
    assert fixed["additive:0.5"]["generated"]["questions_correct"] == 1
    assert raw["additive:0.5"]["unparsed_answers"] == 2 and fixed["additive:0.5"]["likelihood"]["pairs_correct"] == 0
    assert report["labels"]["fixes"]["changes"][0] == {"index": 99, "from": "(a)", "to": "(b)"}
    assert report["dataset"]["pairs"] == 3 and report["dataset"]["questions"] == 6
    assert report["dataset"]["item_errors"][0]["index"] == 98
    assert report["modes"][1]["paper_counterpart"] == {"model": "LLaVA + A-MoF a=0.5 (224 px, not 1.5)",
                                                      "pair_accuracy": 12.0}
    assert report["reference"]["pair_accuracy"]["LLaVA-1.5"] == 24.7
    assert report["random_weights"] is True and report["warnings"][0].startswith("RANDOM WEIGHTS")
    json.dumps(report, allow_nan=False)


def test_markdown_report_puts_each_mode_beside_the_papers_numbers_and_warns_about_random_weights(tmp_path):
    *_, report = full_report(tmp_path)
    text = R.render_markdown(report)
    assert text.startswith("# MMVP results")
    assert f"> **WARNING: RANDOM WEIGHTS: the server runs seeded random weights ({NOTICE})" in text
    for line in ("| Human | 95.7 |", "| LLaVA-1.5 + I-MoF | 28.0 |", "| Random guess | 25.0 |", "| LLaVA-1.5 | 24.7 |"):
        assert line in text
    clip_row = next(line for line in text.splitlines() if line.startswith("| clip |"))
    assert "LLaVA-1.5 (CLIP only) | 24.7 |" in clip_row
    assert "| mode | generated | likelihood | generated, fixed labels | likelihood, fixed labels |" in text
    assert "- Index 279: (a) -> (b)" in text and "## Failed answers (2)" in text


def test_answers_csv_has_a_row_per_question_per_mode_with_both_gradings(tmp_path):
    _, label_sets, specs, answers, judgements, report = full_report(tmp_path, judged=True)
    assert report["scores"]["raw"]["clip"]["judge"]["questions_correct"] == 3  # odd indices said "yes"
    path = tmp_path / "answers.csv"
    write_csv(path, R.answer_columns(), R.answer_rows(label_sets, specs, answers, judgements))
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert len(rows) == 6 * 2 and list(rows[0]) == R.answer_columns()
    first = rows[0]
    assert (first["index"], first["mode"], first["correct"], first["answer"], first["parsed_letter"]) == (
        "97", "clip", "(a)", "(a)", "a")
    assert (first["generated_correct"], first["likelihood_correct"], first["judge_verdict"]) == ("1", "1", "yes")
    assert first["fixed_correct"] == "(a)" and first["llm_ms"] == "10" and first["error"] == ""
    failed = rows[2]  # 98, clip: unreadable image
    assert failed["index"] == "98" and failed["generated_correct"] == "" and "cannot decode" in failed["error"]
    flipped = next(r for r in rows if r["index"] == "99" and r["mode"] == "additive:0.5")
    assert (flipped["correct"], flipped["generated_correct"], flipped["fixed_correct"],
            flipped["fixed_generated_correct"], flipped["alpha"]) == ("(a)", "0", "(b)", "1", "0.5")


def test_markdown_table_escapes_pipes():
    assert markdown_table(["a", "b"], [["x|y", None]]).splitlines()[2] == "| x\\|y | - |"


# ---- the command line without a server --------------------------------------------------------------------


def test_cli_reports_dataset_errors_before_contacting_any_server(tmp_path, capsys):
    assert main(["eval", "mmvp", "--data", str(tmp_path / "none"), "--mode", "clip", "--server", "127.0.0.1:1",
                 "--no-progress"]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "mmvp", "--data", str(tmp_path), "--mode", "bogus"])
    assert "unknown mode 'bogus'" in capsys.readouterr().err
    assert main(["eval", "mmvp", "--data", str(tmp_path), "--mode", "clip", "--judge-url", "http://x"]) == 2
    assert "--judge-url and --judge-model go together" in capsys.readouterr().err


def test_cli_says_when_the_server_cannot_be_reached(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    write_mmvp(tmp_path)
    code = main(["eval", "mmvp", "--data", str(tmp_path), "--mode", "clip", "--server", f"127.0.0.1:{port}",
                 "--out", str(tmp_path / "out"), "--timeout", "10", "--no-progress"])
    assert code == 1
    assert f"mofserve eval mmvp: server 127.0.0.1:{port}: UNAVAILABLE" in capsys.readouterr().err
