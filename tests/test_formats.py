"""The dataset reader: every layout, bad rows named or skipped, splits, the hub offline."""

import json

import pytest

from helpers import write_jsonl, write_parquet
from selfplay.data.formats import prompt_hash, read_examples
from selfplay.errors import SelfplayError

U = {"role": "user", "content": "What is 2 + 2?"}
A = {"role": "assistant", "content": "2 + 2 = 4.\nAnswer: 4"}


def test_messages_layout_ultrachat_style(tmp_path):
    sysm = {"role": "system", "content": "Be brief."}
    rows = [{"prompt": U["content"], "prompt_id": "p1", "messages": [sysm, U, A,
             {"role": "user", "content": "And 3 + 3?"},
             {"role": "assistant", "content": "6"}]}]
    f = write_jsonl(tmp_path / "train_sft.jsonl", rows)
    first = read_examples(str(f)).examples[0]
    # the id is the prompt's, whatever the layout; the dataset's own is kept beside it
    assert first.prompt_id == prompt_hash([sysm, U]) and first.extra["source_prompt_id"] == "p1"
    assert first.prompt == [sysm, U] and first.reference == A["content"]
    last = read_examples(str(f), reference_turn="last").examples[0]
    assert last.prompt == [sysm, U, A, {"role": "user", "content": "And 3 + 3?"}]
    assert last.reference == "6"


def test_published_spin_pairs_parquet(tmp_path):
    rows = [{"real": [U, A], "generated": [U, {"role": "assistant", "content": "5"}]}]
    d = tmp_path / "SPIN_iter0"
    write_parquet(d / "train_prefs-00000-of-00001.parquet", rows)
    write_parquet(d / "test_prefs-00000-of-00001.parquet", rows * 2)
    res = read_examples(str(d), split="train")
    assert res.layout == "spin" and len(res.examples) == 1
    ex = res.examples[0]
    assert ex.prompt == [U] and ex.reference == A["content"]
    assert ex.extra["generated"][-1]["content"] == "5"
    assert ex.prompt_id == prompt_hash([U])               # no id in the data: a stable hash
    test = read_examples(str(d), split="test")          # the same row twice: counted once
    assert len(test.examples) == 1 and test.repeats_dropped == 1


def test_prompt_completion_strings_and_conversational(tmp_path):
    rows = [{"prompt": "Say hi.", "completion": "Hi!"},
            {"prompt": [U], "completion": [A]}]
    res = read_examples(str(write_jsonl(tmp_path / "pc.jsonl", rows)))
    assert res.layout == "prompt_completion"
    assert [e.reference for e in res.examples] == ["Hi!", A["content"]]
    assert res.examples[1].prompt == [U]


def test_alpaca(tmp_path):
    rows = [{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(rows))
    res = read_examples(str(f))
    assert res.layout == "alpaca"
    assert res.examples[0].prompt == [{"role": "user", "content": "Translate to French.\n\ncat"}]
    assert res.examples[1].prompt[0]["content"] == "Name a colour."


def test_preference_rows_trl_and_sppo(tmp_path):
    trl = [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}]
    sppo = [{"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "5"}],
             "chosen_probs": 0.7, "chosen_probs_win": 0.8, "chosen_probs_lose": 0.3}]
    e1 = read_examples(str(write_jsonl(tmp_path / "trl.jsonl", trl))).examples[0]
    assert (e1.prompt, e1.reference, e1.extra["rejected"]) == ([{"role": "user",
                                                                  "content": "Q?"}], "good", "bad")
    res = read_examples(str(write_parquet(tmp_path / "sppo.parquet", sppo)))
    assert res.layout == "preference"
    e2 = res.examples[0]
    assert e2.prompt == [U] and e2.reference == A["content"]
    assert e2.extra["chosen_probs_win"] == 0.8


def test_layout_can_be_named(tmp_path):
    rows = [{"prompt": "Q?", "completion": "A.", "messages": "not a list"}]
    f = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(SelfplayError, match="row 1"):
        read_examples(str(f))                      # detected as messages: bad
    assert read_examples(str(f), layout="prompt_completion").examples[0].reference == "A."


@pytest.mark.parametrize("bad,reason", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ({"messages": [U]}, "no assistant turn"),
    ({"messages": [U, {"role": "assistant", "content": "  "}]}, "empty reference"),
    ({"messages": [A, U]}, "roles out of order"),
    ({"messages": [{"role": "user"}]}, "not a {role, content} pair"),
])
def test_malformed_row_names_file_and_row(tmp_path, bad, reason):
    good = {"messages": [U, A]}
    f = write_jsonl(tmp_path / "data.jsonl", [good, good, bad, good])
    with pytest.raises(SelfplayError) as e:
        read_examples(str(f))
    msg = str(e.value)
    assert "data.jsonl: row 3:" in msg and reason in msg and "--skip_bad_rows" in msg


def test_skip_bad_rows_counts_them(tmp_path):
    good = {"messages": [U, A]}
    other = {"messages": [{"role": "user", "content": "And 3 + 3?"}, A]}
    f = write_jsonl(tmp_path / "data.jsonl", [good, "{oops", {"messages": [A]}, other])
    res = read_examples(str(f), skip_bad_rows=True)
    assert len(res.examples) == 2 and len(res.skipped) == 2
    assert res.skipped[0].endswith("row 2: not valid JSON (Expecting property name enclosed in "
                                   "double quotes)")
    assert "skipped 2 bad rows" in res.summary()


def test_missing_field_in_other_layouts(tmp_path):
    f = write_jsonl(tmp_path / "alp.jsonl", [{"instruction": "x", "output": "y"},
                                              {"instruction": "", "output": "y"}])
    with pytest.raises(SelfplayError, match=r"alp.jsonl: row 2: missing or empty `instruction`"):
        read_examples(str(f))


def test_unknown_columns_and_missing_paths(tmp_path):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(SelfplayError, match=r"odd.jsonl: cannot tell the layout"):
        read_examples(str(f))
    with pytest.raises(SelfplayError, match=r"dataset ./nope.jsonl does not exist"):
        read_examples("./nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelfplayError, match="holds no .jsonl"):
        read_examples(str(tmp_path / "empty"))


def test_directory_split_selection(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"messages": [U, A]}])
    with pytest.raises(SelfplayError, match="no files for split 'validation'; it has: train"):
        read_examples(str(tmp_path / "d"), split="validation")


def test_builtin_task_suite_reads_like_any_dataset():
    res = read_examples("builtin:tasks", split="test", tasks_sizes={"test": 12})
    assert len(res.examples) == 12 and res.layout == "messages"
    assert all(e.reference.rstrip().split("\n")[-1].startswith("Answer: ") for e in res.examples)
    assert all("family" in e.extra and "answer" in e.extra for e in res.examples)


def test_uncached_hub_dataset_offline_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SelfplayError, match=r"dataset 'someorg/not-cached' split 'train' is "
                                            r"neither a local file .* pass a local path"):
        read_examples("someorg/not-cached")


def test_skip_and_max_prompts_make_a_window():
    first = read_examples("builtin:tasks", "train", max_prompts=30).examples
    window = read_examples("builtin:tasks", "train", max_prompts=10, skip_prompts=20).examples
    assert [e.prompt_id for e in window] == [e.prompt_id for e in first[20:30]]
    assert len(read_examples("builtin:tasks", "train", skip_prompts=1990).examples) == 10
