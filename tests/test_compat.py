"""Files of earlier versions still read: a test per compatibility branch, each file as written.

The run manifest of before 08ba4b1 (checksums keyed by the run's output_dir) is written and
resumed in tests/test_loop.py (test_a_run_resumes_and_redoes_only_what_changed).
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest

from selfplay.data.evaluations import Evaluation
from selfplay.data.formats import Example
from selfplay.data.pairs import ScoreStamp, pair_from_example
from selfplay.data.run_paths import ModelPaths
from selfplay.data.shards import ShardRow, write_shard
from selfplay.errors import SelfplayError
from selfplay.rendering import Encoded
from selfplay.stages.evaluate import format_table, saved_rows
from selfplay.stages.generate import reuse_problem
from selfplay.stages.report import ModelRow, table
from selfplay.stages.train import TrainPair, _fingerprint
from selfplay.trainer import claim


def test_a_model_directory_from_before_markers_is_ours_to_clear(tmp_path):
    """7e57f44 (2026-11-23) added the .selfplay-output marker; a directory a training wrote
    before holds only our records, and --overwrite still clears it."""
    out = ModelPaths(tmp_path / "model")
    out.root.mkdir()
    out.log.write_text('{"step": 1, "loss": 0.69}\n')
    (out.root / "model.safetensors").write_bytes(b"old weights")
    one = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    claim(one, out, overwrite=True, resume=False)
    assert sorted(p.name for p in out.root.iterdir()) == [".selfplay-output"]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("not ours")
    with pytest.raises(SelfplayError, match="did not write"):
        claim(one, ModelPaths(tmp_path / "theirs"), overwrite=True, resume=False)


def test_a_float32_reference_cache_from_before_bf16_keeps_its_fingerprint():
    """f513a22 (2026-11-24) added --bf16 and its mark in the cache's fingerprint; a float32
    cache, as written before, is fingerprinted exactly as then."""
    stamp = ScoreStamp("m", 64, 32, "abcd", bf16=False)
    pairs = [TrainPair(None, Encoded([1, 2, 3], 1, False), Encoded([1, 2, 4, 5], 1, False))]
    before = hashlib.sha256(b"abcd|64|32|False")
    before.update(repr(([1, 2, 3], [1, 2, 4, 5])).encode())
    assert _fingerprint(stamp, False, pairs) == before.hexdigest()[:16]
    assert _fingerprint(ScoreStamp("m", 64, 32, "abcd", bf16=True), False, pairs) != \
        before.hexdigest()[:16]


def test_stored_log_probs_from_before_fingerprints_are_never_used():
    """015e55c (2026-11-23) stamped stored log-probs with the weights' fingerprint; pairs
    scored before carry a model name only, which proves nothing about the weights."""
    prompt = [{"role": "user", "content": "2+2?"}]
    row = {"generated": prompt + [{"role": "assistant", "content": "5"}],
           "ref_logp_real": -1.0, "ref_logp_generated": -2.0, "score_model": "m",
           "score_max_length": 64, "score_max_prompt_length": 32}       # no score_fingerprint
    pair = pair_from_example(Example("id", prompt, "4", row), "old.parquet")
    assert pair.has_reference and pair.scored_with.fingerprint is None
    assert not ScoreStamp("m", 64, 32, None).matches(pair.scored_with)
    assert not ScoreStamp("m", 64, 32, "abcd").matches(pair.scored_with)


def _old_ids_shard(path, n):
    rows = [ShardRow(prompt_id=f"tasks-{i}", prompt=[{"role": "user", "content": f"q{i}"}],
                     reference="a", responses=["b"], response_tokens=[1],
                     finish_reasons=["eos"], settings={"model": "m"}) for i in range(n)]
    write_shard(path, rows)


def test_a_shard_with_the_ids_of_before_08ba4b1_is_generated_again(tmp_path):
    """08ba4b1 (2026-11-23) made a prompt's id the hash of its messages; a shard written
    before holds a dataset's own ids: ours and incomplete, so generated again."""
    path = tmp_path / "train-frac00000-rank000-of001.jsonl"
    _old_ids_shard(path, 2)
    why = reuse_problem(path, ["3f2a", "9c1d"], {"model": "m"}, scored=False)
    assert "08ba4b1" in why


def test_a_baseline_evaluation_with_the_ids_of_before_08ba4b1_is_named(tmp_path):
    old = tmp_path / "eval.json"
    old.write_text(json.dumps({"n": 1, "accuracy": 1.0, "rows": [
        {"prompt_id": "tasks-0", "correct": True}]}))
    with pytest.raises(SelfplayError, match="before 08ba4b1"):
        saved_rows(old, ["3f2a"])


def test_an_evaluation_of_the_first_version_reads(tmp_path):
    """9bf23e8 (2026-11-21) wrote no intervals, engine, dataset or split."""
    first = {"n": 2, "accuracy": 0.5,
             "per_family": {"arith": {"n": 2, "accuracy": 0.5}},
             "reference_logp_per_token": -1.25, "mean_response_tokens": 3.0,
             "truncated_share": 0.0,
             "settings": {"max_new_tokens": 8, "batch_size": 2, "greedy": True},
             "rows": [{"prompt_id": "a", "family": "arith", "answer": "4", "response": "4",
                       "n_tokens": 1, "finish_reason": "eos", "correct": True},
                      {"prompt_id": "b", "family": "arith", "answer": "5", "response": "6",
                       "n_tokens": 1, "finish_reason": "eos", "correct": False}],
             "model": "m"}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(first))
    e = Evaluation.read(path)
    assert e.correct() == [True, False] and e.accuracy_ci95 is None
    assert "arith" in format_table(e) and "50.0%" in format_table(e)
    assert "| start | 50.0% |" in table([ModelRow("start", e)])


def test_a_checkpoint_from_before_content_hashes_resumes(tiny_model_dir, tmp_path):
    """Training checkpoints of selfplay before d75f237 kept the data as token counts alone,
    and no sharding options: they resume, compared on what they kept."""
    from helpers import interrupted_training, write_parquet
    from selfplay.cli import main
    u = {"role": "user", "content": "What is 2 plus 2?"}
    rows = [{"real": [u, {"role": "assistant", "content": f"It is {i}."}],
             "generated": [u, {"role": "assistant", "content": f"Maybe {i + 1}."}]}
            for i in range(16)]
    data = write_parquet(tmp_path / "pairs" / "train_prefs-00000-of-00001.parquet", rows)
    out = tmp_path / "model"
    args = interrupted_training(tiny_model_dir, data.parent, out)
    for state in out.glob("checkpoints/step-*/trainer_state.json"):
        s = json.loads(state.read_text())
        for key in ("content", "fsdp", "fsdp_bf16_params"):
            del s["recipe"][key]
        state.write_text(json.dumps(s))
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "training_complete.json").read_text())["steps"] == 40
