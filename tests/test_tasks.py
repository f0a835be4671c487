"""The built-in task suite: seeded splits, families, checkers, `tasks export`, `evaluate`."""

import re
from collections import Counter

import pytest

from selfplay.data import tasks
from selfplay.data.formats import prompt_hash


def test_same_seed_same_tasks_other_seed_other_tasks():
    a = tasks.generate("train", 60, seed=0)
    assert a == tasks.generate("train", 60, seed=0)
    assert a != tasks.generate("train", 60, seed=1)


def test_no_split_depends_on_another_splits_size():
    small = {"train": 10, "validation": 5, "test": 50}
    large = {"train": 3000, "validation": 400, "test": 50}
    assert tasks.split_rows("test", 0, small) == tasks.split_rows("test", 0, large)
    assert tasks.split_rows("validation", 0, {**small, "validation": 7}) == \
        tasks.split_rows("validation", 0, {**large, "validation": 7})


def test_splits_never_share_a_prompt():
    train = {t.prompt for t in tasks.generate("train", 3000, seed=0)}
    val = {t.prompt for t in tasks.generate("validation", 400, seed=0)}
    test = {t.prompt for t in tasks.generate("test", 600, seed=0)}
    assert (len(train), len(val), len(test)) == (3000, 400, 600)
    assert not train & test and not train & val and not val & test


def test_held_out_splits_are_drawn_like_train():
    # the same generators and templates: every held-out reference opening occurs in train
    def openings(split, n):
        return {(t.family, re.sub(r"\d+", "#", " ".join(t.reference.split()[:2])))
                for t in tasks.generate(split, n)}
    train = openings("train", 3000)
    assert openings("test", 500) <= train and openings("validation", 300) <= train


def test_families_are_balanced_and_worded_variously():
    ts = tasks.generate("train", 600, seed=0)
    assert set(Counter(t.family for t in ts).values()) == {100}
    for fam in tasks.FAMILIES:
        # several templates per family: many distinct first three words
        openings = {" ".join(t.prompt.split()[:3]) for t in ts if t.family == fam}
        assert len(openings) >= 5, fam


def test_every_reference_passes_its_own_checker_and_ends_with_answer():
    for t in tasks.generate("train", 1200, seed=3) + tasks.generate("test", 300, seed=3):
        assert t.reference.split("\n")[-1] == f"Answer: {t.answer}"
        assert tasks.check(t.family, t.answer, t.reference), t


@pytest.mark.parametrize("family,answer,response,ok", [
    # right, in several formats
    ("arithmetic", "42", "Answer: 42", True),
    ("arithmetic", "42", "6 x 7 = 42, so the answer is 42.", True),
    ("arithmetic", "42", "First 40, then 2 more... The total is 42", True),
    ("arithmetic", "1200", "Answer: 1,200", True),
    ("units", "300", "So 3 meters is 300 centimeters.\nAnswer: 300 centimeters", True),
    ("strings", "tac", 'Reversed, "cat" becomes "tac".', True),
    ("strings", "tac", "Answer: tac", True),
    ("strings", "CAT", "Answer: CAT", True),
    ("strings", "CAT", "Answer: cat", False),                 # capitalisation is the task
    ("sorting", "2, 7, 9", "Sorted: 2, 7, 9", True),
    ("sorting", "2, 7, 9", "Answer: 2, 7, 9.", True),
    ("calendar", "Thursday", "Tuesday, Wednesday, Thursday.\nAnswer: Thursday", True),
    ("comparison", "even", "The number 12 is even.", True),
    ("comparison", "Maya", "Maya is older.\nAnswer: Maya", True),
    # wrong
    ("arithmetic", "42", "Answer: 24", False),
    ("arithmetic", "42", "It is 42 or maybe 41", False),     # last number counts
    ("sorting", "2, 7, 9", "Answer: 9, 7, 2", False),
    ("calendar", "Thursday", "Answer: Friday", False),
    # malformed: no final answer at all
    ("arithmetic", "42", "I am not sure.", False),
    ("sorting", "2, 7, 9", "", False),
    ("strings", "tac", "", False),
    # buried: the marker wins over numbers around it
    ("arithmetic", "42", "We had 40 and 3, gave 1. Answer: 42. Then 99 more words 17", True),
])
def test_checker(family, answer, response, ok):
    assert tasks.check(family, answer, response) is ok


def test_rows_are_in_messages_layout():
    row = tasks.split_rows("train", 0, {"train": 6})[0]
    assert set(row) == {"prompt_id", "prompt", "messages", "family", "answer"}
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    # the id every reader gives this prompt, in any layout
    assert row["prompt_id"] == prompt_hash(row["messages"][:1])


def test_export_command_writes_readable_splits(tmp_path):
    from selfplay.cli import main
    from selfplay.data.formats import read_examples
    assert main(["tasks", "export", str(tmp_path / "suite"), "--n", "30", "--seed", "0",
                 "--tasks_test_size", "12"]) == 0
    train = read_examples(str(tmp_path / "suite"), split="train")
    test = read_examples(str(tmp_path / "suite"), split="test")
    val = read_examples(str(tmp_path / "suite"), split="validation")
    assert (len(train.examples), len(val.examples), len(test.examples)) == (30, 300, 12)
    assert [e.prompt_id for e in train.examples] == \
        [r["prompt_id"] for r in tasks.split_rows("train", 0, {"train": 30})]
    assert main(["tasks", "export", str(tmp_path / "pq"), "--n", "6", "--export_format",
                 "parquet"]) == 0
    assert len(read_examples(str(tmp_path / "pq" / "train.parquet")).examples) == 6


def test_evaluate_command_with_baseline(tiny_model_dir, tmp_path, capsys):
    import json
    from selfplay.cli import main
    assert main(["evaluate", "--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir),
                 "--tasks_test_size", "12", "--max_new_tokens", "4", "--output_dir",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "win rate vs baseline" in out
    r = json.loads((tmp_path / "eval.json").read_text())
    assert r["n"] == 12 and r["win_rate"] == 0.5          # a model against itself ties
    assert r["baseline"]["accuracy"] == r["accuracy"]
    assert set(r["per_family"]) == set(tasks.FAMILIES)


def test_evaluate_against_a_saved_evaluation(tiny_model_dir, tmp_path, capsys):
    import json
    from pathlib import Path
    from selfplay.cli import main
    common = ["evaluate", "--model", str(tiny_model_dir), "--max_new_tokens", "4"]
    assert main(common + ["--tasks_test_size", "12", "--output_dir", str(tmp_path / "a")]) == 0
    saved = str(tmp_path / "a" / "eval.json")
    assert main(common + ["--tasks_test_size", "12", "--baseline", saved, "--output_dir",
                          str(tmp_path / "b"), "--reference_likelihood", "false"]) == 0
    r = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert r["win_rate"] == 0.5 and (r["paired"]["gained"], r["paired"]["lost"]) == (0, 0)
    assert r["reference_logp_per_token"] is None        # not measured, not made up
    assert r["rows"] == json.loads(Path(saved).read_text())["rows"]
    out = capsys.readouterr().out
    assert "paired change" in out and "reference log-lik/token           -" in out
    assert main(common + ["--tasks_test_size", "10", "--baseline", saved, "--output_dir",
                          str(tmp_path / "c")]) != 0
    assert "evaluated other prompts" in capsys.readouterr().err


def test_answer_budget_is_sized_from_the_references(tokenizer):
    from selfplay.data.formats import read_examples
    from selfplay.rendering import response_ids
    from selfplay.stages.evaluate import answer_budget
    tok = tokenizer
    ex = read_examples("builtin:tasks", "test", tasks_sizes={"test": 60}).examples
    longest = max(len(response_ids(tok, e.reference)) for e in ex)
    got = answer_budget(tok, ex, cap=256)
    assert got % 16 == 0 and 1.5 * longest <= got < 1.5 * longest + 16
    assert answer_budget(tok, ex, cap=40) == 40                    # never above --max_new_tokens
    assert answer_budget(tok, ex, cap=256, explicit=7) == 7         # --eval_max_new_tokens
    assert answer_budget(tok, ex[:0], cap=256) == 32
