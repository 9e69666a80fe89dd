"""Question sets: the built-in ones are complete; bad files fail with one line."""

from __future__ import annotations

import json

import pytest

from corral.errors import CorralError
from corral.eval.data import CATEGORIES, builtin_sets, load_questions


def test_chat_zh_en_covers_eight_categories_in_both_languages():
    qs = load_questions("builtin:chat-zh-en")
    assert len(qs) >= 80
    assert {q.category for q in qs} == set(CATEGORIES)
    for cat in CATEGORIES:
        langs = [q.language for q in qs if q.category == cat]
        assert langs.count("zh") >= 5 and langs.count("en") >= 5, cat
    # Round-robin order: any --limit >= 8 samples every category.
    assert {q.category for q in qs[:8]} == set(CATEGORIES)
    assert all(q.language == "zh" for q in qs if "-zh-" in q.id)


def test_choice_mini_is_well_formed():
    qs = load_questions("builtin:choice-mini")
    assert len(qs) >= 8 and all(q.is_choice and q.answer is not None for q in qs)
    assert {q.language for q in qs} == {"zh", "en"}
    assert set(builtin_sets()) >= {"chat-zh-en", "choice-mini"}


def test_user_file_limit_and_answer_forms(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"id": 1, "question": "Pick B", "choices": ["x", "y"], "answer": "B"},
            {"id": 2, "question": "Pick y", "choices": ["x", "y"], "answer": "y"},
            {"id": 3, "question": "Free text"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    qs = load_questions(str(path))
    assert [q.answer for q in qs] == [1, 1, None]
    assert qs[2].category == "general" and qs[2].language == "en"
    assert [q.id for q in load_questions(str(path), limit=2)] == ["1", "2"]


@pytest.mark.parametrize("line, msg", [
    ("{not json", "not valid JSON"),
    ('{"question": "no id"}', "missing 'id'"),
    ('{"id": 1, "question": "q", "choices": ["a"]}', "at least 2"),
    ('{"id": 1, "question": "q", "choices": ["a", "b"], "answer": 5}', "'answer' must be"),
])
def test_bad_files_raise_one_line(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(CorralError, match=msg):
        load_questions(str(path))


def test_missing_and_duplicate(tmp_path):
    with pytest.raises(CorralError, match="not found"):
        load_questions(str(tmp_path / "nope.jsonl"))
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": 1, "question": "a"}\n{"id": 1, "question": "b"}\n')
    with pytest.raises(CorralError, match="duplicate id"):
        load_questions(str(path))
