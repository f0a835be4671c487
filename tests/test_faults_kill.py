"""Kill -9 at a random point, then the same command again: the same outputs, no row twice.

For score, rank, convert and evaluate: the same outputs as a run that was never interrupted, no
row twice, nothing of the user's touched. (generate, train, sft and run have theirs beside them:
tests/test_generate.py, test_training.py, test_sft.py, test_loop.py.)
"""

import json

import pytest

from selfplay.cli import main


def _shards(d, n_shards=3, rows=200):
    """Generation shards as `selfplay generate --data_frac i` writes them, K = 2 answers."""
    from selfplay.data.shards import ShardRow, shard_name, write_shard
    for f in range(n_shards):
        write_shard(d / shard_name("train", f, 0, 1), [
            ShardRow(prompt_id=f"p{f}-{i}",
                     prompt=[{"role": "user", "content": f"Add {i} and {f}."}],
                     reference=f"{i} + {f} = {i + f}.",
                     responses=[f"{i + f}", f"It is {i + f + 1}."],
                     response_tokens=[2, 6], finish_reasons=["stop", "stop"],
                     settings={"model": "m", "max_new_tokens": 8})
            for i in range(rows)])
    return d


def _outputs(out, command):
    """What a command made, comparable across output directories."""
    if command == "evaluate":
        r = json.loads((out / "eval.json").read_text())
        return {"rows": r["rows"], "accuracy": r["accuracy"]}
    if command == "convert":
        import pyarrow.parquet as pq
        report = json.loads((out / "convert_report.json").read_text())
        report["splits"]["train"].pop("file")
        return {"pairs": pq.read_table(out / "train_prefs-00000-of-00001.parquet").to_pylist(),
                "report": report}
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))}


def _tree(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# score's kill (the slowest: 600 rows scored twice) runs with -m slow; generate's own shard
# resumption covers the same writer (tests/test_generate.py)
@pytest.mark.parametrize("command", [pytest.param("score", marks=pytest.mark.slow), "rank",
                                     "convert", "evaluate"])
def test_a_command_killed_anywhere_reruns_to_the_same_outputs(command, tiny_model_dir, tmp_path):
    import numpy as np
    from helpers import kill_at_random_point, seconds_after
    shards = _shards(tmp_path / "gen", rows=2000 if command == "convert" else 200)
    args, marker = {
        "score": (["score", "--model", str(tiny_model_dir), "--dataset", str(shards)], "score"),
        "rank": (["rank", "--input_dir", str(shards), "--judge", "stand_in_judges:slow_by_length"],
                 "rank train-frac"),
        "convert": (["convert", "--input_dir", str(shards)], "convert train"),
        "evaluate": (["evaluate", "--model", str(tiny_model_dir), "--tasks_test_size", "96",
                      "--eval_max_new_tokens", "24", "--batch_size", "8"], "evaluate model"),
    }[command]
    inputs = _tree(shards)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    span = seconds_after([*args, "--output_dir", str(whole)], marker)
    cut.mkdir()
    (cut / "notes.txt").write_text("mine")                 # the user's file beside our outputs
    rng = np.random.default_rng(sum(map(ord, command)))    # a random point, the same each time
    kill_at_random_point([*args, "--output_dir", str(cut)], marker, 0.8 * span, rng)
    assert main([*args, "--output_dir", str(cut)]) == 0
    assert _outputs(cut, command) == _outputs(whole, command)
    rows = [r for f in cut.glob("*.jsonl") for r in f.read_text().splitlines()]
    ids = [json.loads(r)["prompt_id"] for r in rows]
    assert len(ids) == len(set(ids))                       # no row twice
    assert (cut / "notes.txt").read_text() == "mine" and _tree(shards) == inputs
