"""Faults of `convert`: a corrupt shard is one sentence, empty generated answers are counted.

Nothing of the user's lost, nothing false saved, every mistake one sentence: each case failed
before these rules (issue: "Nothing lost, nothing false")."""

import json

from selfplay.cli import main


def test_a_corrupt_shard_is_one_sentence_in_convert(tmp_path, capsys):
    shards = tmp_path / "gen"
    shards.mkdir()
    (shards / "train-frac00000-rank000-of001.jsonl").write_text('{"prompt_id": "p0", "pro')
    assert main(["convert", "--input_dir", str(shards), "--output_dir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "line 1: not a JSON row" in err and "truncated or corrupt" in err
    assert "Traceback" not in err


def test_empty_generated_answers_are_counted_in_convert(tmp_path, capsys):
    from selfplay.data.shards import shard_name
    from selfplay.io import write_jsonl_atomic
    gen = tmp_path / "gen"
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"Q{i}?"}],
             "reference": f"A{i}.", "responses": [["gen", ""][i % 2]], "response_tokens": [1],
             "finish_reasons": ["eos"], "extra": {}} for i in range(4)]
    write_jsonl_atomic(gen / shard_name("train", 0, 0, 1), rows)
    assert main(["convert", "--input_dir", str(gen), "--output_dir", str(tmp_path / "p")]) == 0
    assert "4 pairs from 1 shards, 0.0% generations cut by the token limit, 2 with an empty " \
           "generated answer (kept: it is what θ_t answered)" in capsys.readouterr().out
    rep = json.loads((tmp_path / "p" / "convert_report.json").read_text())["splits"]["train"]
    assert rep["empty_responses"] == 2
