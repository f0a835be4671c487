"""`selfplay convert`: shards -> the published SPIN pair layout, and back through the reader."""

import json

import pyarrow.parquet as pq
import pytest

from selfplay.config import ConvertSettings
from selfplay.data.formats import prompt_hash, read_examples
from selfplay.data.shards import shard_name
from selfplay.io import write_jsonl_atomic
from selfplay.errors import SelfplayError
from selfplay.stages.convert import convert as _convert


def convert(shards, out, num_fracs=0, allow_missing=False):
    """The convert stage with its settings spelled out, its report as JSON."""
    return _convert(ConvertSettings(str(shards), num_fracs, allow_missing), out).to_json()


def shard_row(i, scored=False, cut=False):
    r = {"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"Q{i}?"}],
         "reference": f"A{i}.", "responses": [f"gen {i}"], "response_tokens": [3],
         "finish_reasons": ["length" if cut else "eos"], "extra": {"family": "x", "answer": "1"},
         "settings": {"temperature": 0.0}}
    if scored:
        r.update({"ref_logp_reference": -1.5, "ref_ntok_reference": 4,
                  "ref_logp_responses": [-2.5], "ref_ntok_responses": [3],
                  "score_settings": {"model": "m", "max_length": 64, "max_prompt_length": 32}})
    return r


def make_shards(d, split, fracs, world=1, per=3, **kw):
    for f in fracs:
        for r in range(world):
            base = (f * world + r) * per
            write_jsonl_atomic(d / shard_name(split, f, r, world),
                               [shard_row(base + i, **kw) for i in range(per)])


def test_round_trip_published_layout(tmp_path):
    g = tmp_path / "gen"
    g.mkdir()
    make_shards(g, "train", [0, 1], world=2, scored=True)
    make_shards(g, "test", [0])
    rep = convert(g, tmp_path / "out", num_fracs=2)
    assert rep["splits"]["train"]["pairs"] == 12 and rep["splits"]["train"]["scored"]
    table = pq.read_table(tmp_path / "out" / "train_prefs-00000-of-00001.parquet")
    rows = table.to_pylist()
    # the published layout: real / generated as lists of {role, content}
    assert rows[0]["real"] == [{"role": "user", "content": "Q0?"},
                               {"role": "assistant", "content": "A0."}]
    assert rows[0]["generated"][-1] == {"role": "assistant", "content": "gen 0"}
    assert rows[0]["ref_logp_real"] == -1.5 and rows[0]["ref_ntok_generated"] == 3
    assert (tmp_path / "out" / "test_prefs-00000-of-00001.parquet").exists()
    # ... read back by the reader like a published SPIN dataset
    res = read_examples(str(tmp_path / "out"), split="train")
    assert res.layout == "spin" and [e.extra["source_prompt_id"] for e in res.examples] == \
        [f"p{i}" for i in range(12)]
    assert res.examples[0].prompt_id == prompt_hash([{"role": "user", "content": "Q0?"}])
    assert res.examples[5].reference == "A5."
    assert json.loads((tmp_path / "out" / "convert_report.json").read_text())["splits"]


def test_ultrachat_split_names_become_train_and_test_pairs(tmp_path):
    """Shards generated from UltraChat-200k's `train_sft`/`test_sft` splits give the train and
    test pair files that `selfplay train` reads (they were not found at all before)."""
    g = tmp_path / "gen"
    g.mkdir()
    make_shards(g, "train_sft", [0, 1])
    make_shards(g, "test_sft", [0])
    rep = convert(g, tmp_path / "out", num_fracs=2)
    assert list(rep["splits"]) == ["train", "test"]
    assert rep["splits"]["train"]["pairs"] == 6 and rep["splits"]["test"]["pairs"] == 3
    assert (tmp_path / "out" / "train_prefs-00000-of-00001.parquet").exists()
    with pytest.raises(SelfplayError, match="missing train_sft fraction 2"):
        convert(g, tmp_path / "out", num_fracs=3)
    make_shards(g, "train", [0])
    with pytest.raises(SelfplayError, match="splits train and train_sft, which would both "
                                            "become train pairs"):
        convert(g, tmp_path / "out2")


def test_missing_fraction_fails_unless_told(tmp_path):
    g = tmp_path / "gen"
    g.mkdir()
    make_shards(g, "train", [0, 2])
    with pytest.raises(SelfplayError, match="missing train fraction 1"):
        convert(g, tmp_path / "out")
    with pytest.raises(SelfplayError, match="missing train fraction 1; train fraction 3"):
        convert(g, tmp_path / "out", num_fracs=4)
    rep = convert(g, tmp_path / "out", allow_missing=True)
    assert rep["splits"]["train"]["missing"] == ["train fraction 1"]
    assert rep["splits"]["train"]["pairs"] == 6


def test_missing_process_shard_is_named(tmp_path):
    g = tmp_path / "gen"
    g.mkdir()
    write_jsonl_atomic(g / shard_name("train", 0, 1, 3), [shard_row(0)])
    with pytest.raises(SelfplayError, match=r"process shard\(s\) \[0, 2\] of 3"):
        convert(g, tmp_path / "out")


def test_duplicates_and_truncation_are_reported(tmp_path):
    g = tmp_path / "gen"
    g.mkdir()
    write_jsonl_atomic(g / shard_name("train", 0, 0, 1), [shard_row(0), shard_row(1, cut=True)])
    write_jsonl_atomic(g / shard_name("train", 1, 0, 1), [shard_row(1), shard_row(2)])
    rep = convert(g, tmp_path / "out")["splits"]["train"]
    assert rep["duplicate_prompt_ids_dropped"] == 1 and rep["pairs"] == 3
    assert rep["truncated_share"] == pytest.approx(1 / 3)


def test_unfinished_temp_files_are_ignored(tmp_path):
    g = tmp_path / "gen"
    g.mkdir()
    make_shards(g, "train", [0])
    (g / (shard_name("train", 1, 0, 1) + ".tmp")).write_text("{partial")
    assert convert(g, tmp_path / "out")["splits"]["train"]["pairs"] == 3


def test_no_shards(tmp_path):
    with pytest.raises(SelfplayError, match="holds no generation shards"):
        convert(tmp_path, tmp_path / "out")


def test_drop_identical_leaves_out_answers_equal_to_the_reference(tmp_path):
    g = tmp_path / "gen"
    g.mkdir()
    rows = [shard_row(i) for i in range(4)]
    rows[1]["responses"] = [" A1. "]             # the reference, up to surrounding space
    rows[3]["responses"] = ["A3."]
    write_jsonl_atomic(g / shard_name("train", 0, 0, 1), rows)
    kept = _convert(ConvertSettings(str(g), drop_identical=True), tmp_path / "out")
    assert (kept.splits["train"].pairs, kept.splits["train"].identical_pairs_dropped) == (2, 2)
    ids = [r["prompt_id"] for r in pq.read_table(tmp_path / "out" /
                                                 "train_prefs-00000-of-00001.parquet").to_pylist()]
    assert ids == ["p0", "p2"]
    assert convert(g, tmp_path / "all")["splits"]["train"]["pairs"] == 4     # off by default
