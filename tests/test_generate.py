"""`selfplay generate` / `score` on the tiny model: shards, idempotence, resume, scoring."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import write_jsonl
from selfplay.cli import main
from selfplay.data.formats import prompt_hash
from selfplay.data.shards import fraction, process_slice
from selfplay.io import read_jsonl
from selfplay.engines.hf import SamplingSettings, generate
from selfplay.logprobs import response_logps, score_texts
from selfplay.rendering import collate, encode

ROWS = [{"prompt_id": f"p{i}", "messages": [
    {"role": "user", "content": f"Question {i}: what is {i} + {i}?" + " Think." * (i % 4)},
    {"role": "assistant", "content": f"{i} + {i} = {2 * i}.\nAnswer: {2 * i}"}]}
    for i in range(10)]


@pytest.fixture
def dataset(tmp_path):
    return write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)


def _gen(model_dir, dataset, out, *extra):
    return main(["generate", "--model", str(model_dir), "--dataset", str(dataset),
                 "--output_dir", str(out), "--max_new_tokens", "8", "--batch_size", "4", *extra])


def test_rows_hold_everything_and_rerun_changes_nothing(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "gen"
    assert _gen(tiny_model_dir, dataset, out, "--score") == 0
    shard = out / "train-frac00000-rank000-of001.jsonl"
    rows = read_jsonl(shard)
    assert [r["extra"]["source_prompt_id"] for r in rows] == [f"p{i}" for i in range(10)]
    assert rows[0]["prompt_id"] == prompt_hash(ROWS[0]["messages"][:1])
    r = rows[3]
    assert r["prompt"] == ROWS[3]["messages"][:1] and r["reference"].endswith("Answer: 6")
    assert len(r["responses"]) == 1 and r["finish_reasons"][0] in ("eos", "length")
    assert r["response_tokens"][0] <= 8 and r["settings"]["temperature"] == 0.0
    assert isinstance(r["ref_logp_reference"], float) and len(r["ref_logp_responses"]) == 1
    before = shard.read_bytes()
    mtime = shard.stat().st_mtime_ns
    assert _gen(tiny_model_dir, dataset, out, "--score") == 0        # skipped: complete
    assert shard.stat().st_mtime_ns == mtime
    assert _gen(tiny_model_dir, dataset, out, "--score", "--overwrite") == 0
    assert shard.read_bytes() == before                              # same rows, no duplicates
    assert len(read_jsonl(shard)) == 10


def test_fractions_and_sampling(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "gen"
    for k in range(3):
        assert _gen(tiny_model_dir, dataset, out, "--frac_len", "4", "--data_frac", str(k),
                    "--temperature", "1.0", "--num_samples", "2", "--seed", "7") == 0
    ids = [r["extra"]["source_prompt_id"] for k in range(3)
           for r in read_jsonl(out / f"train-frac{k:05d}-rank000-of001.jsonl")]
    assert ids == [f"p{i}" for i in range(10)]                       # disjoint, complete
    rows = read_jsonl(out / "train-frac00001-rank000-of001.jsonl")
    assert all(len(r["responses"]) == 2 for r in rows)
    assert any(r["responses"][0] != r["responses"][1] for r in rows)  # two sampled streams
    again = tmp_path / "again"
    assert _gen(tiny_model_dir, dataset, again, "--frac_len", "4", "--data_frac", "1",
                "--temperature", "1.0", "--num_samples", "2", "--seed", "7") == 0
    assert read_jsonl(again / "train-frac00001-rank000-of001.jsonl") == rows   # seeded
    assert _gen(tiny_model_dir, dataset, out, "--frac_len", "4", "--data_frac", "3") == 2


def test_fraction_and_process_slices():
    assert fraction(10, 2, 4) == (8, 10) and fraction(10, 0, 0) == (0, 10)
    parts = [process_slice(10, r, 3) for r in range(3)]
    assert parts == [(0, 4), (4, 7), (7, 10)]


def test_killed_shard_is_redone(tiny_model_dir, tmp_path):
    rows = [{"prompt_id": f"q{i}", "messages": [{"role": "user", "content": f"Say {i}."},
                                                 {"role": "assistant", "content": f"{i}"}]}
            for i in range(160)]
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "selfplay", "generate", "--model", str(tiny_model_dir),
           "--dataset", str(data), "--output_dir", str(out), "--max_new_tokens", "16",
           "--batch_size", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "generate:" not in seen:                     # killed in the middle of generating
        line = proc.stderr.readline()
        assert line, "generation never started"
        seen += line
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shard = out / "train-frac00000-rank000-of001.jsonl"
    assert not shard.exists()                          # an unfinished shard is never visible
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    got = read_jsonl(shard)
    assert [r["extra"]["source_prompt_id"] for r in got] == [f"q{i}" for i in range(160)]


def test_accelerate_launch_splits_prompts_across_processes(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "gen"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's torchrun launcher (--multi_gpu) also runs CPU processes, over gloo.
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                          "no", "--dynamo_backend", "no", "-m", "selfplay", "generate",
                          "--model", str(tiny_model_dir), "--dataset", str(dataset),
                          "--output_dir", str(out), "--max_new_tokens", "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a = read_jsonl(out / "train-frac00000-rank000-of002.jsonl")
    b = read_jsonl(out / "train-frac00000-rank001-of002.jsonl")
    assert [r["extra"]["source_prompt_id"] for r in a + b] == [f"p{i}" for i in range(10)]
    assert main(["convert", "--input_dir", str(out), "--output_dir", str(tmp_path / "pairs")]) == 0


def test_scored_logps_match_a_fresh_computation(tiny_model_dir, tiny_model, tokenizer, dataset,
                                                tmp_path):
    out = tmp_path / "gen"
    assert _gen(tiny_model_dir, dataset, out, "--score", "--max_length", "40",
                "--max_prompt_length", "24") == 0
    rows = read_jsonl(out / "train-frac00000-rank000-of001.jsonl")
    for r in rows[:4]:
        seqs = [encode(tokenizer, r["prompt"], t, 40, 24) for t in [r["reference"]] +
                r["responses"]]
        with torch.no_grad():
            lp, n = response_logps(tiny_model, **collate(seqs, tokenizer.pad_token_id))
        assert abs(lp[0].item() - r["ref_logp_reference"]) < 1e-4
        assert abs(lp[1].item() - r["ref_logp_responses"][0]) < 1e-4
        assert n.tolist() == [r["ref_ntok_reference"], r["ref_ntok_responses"][0]]
    from selfplay.models import fingerprint
    assert rows[0]["score_settings"] == {"model": str(tiny_model_dir), "max_length": 40,
                                         "max_prompt_length": 24,
                                         "fingerprint": fingerprint(str(tiny_model_dir))}


def test_bf16_generates_and_scores_under_autocast(tiny_model_dir, tiny_model, tokenizer,
                                                  dataset, tmp_path):
    """--bf16: our decoder and the scoring run under bfloat16 autocast (the trainer's), the
    shard says so, and the log-probs are not the float32 ones."""
    out = tmp_path / "gen"
    assert _gen(tiny_model_dir, dataset, out, "--score", "--bf16", "true") == 0
    rows = read_jsonl(out / "train-frac00000-rank000-of001.jsonl")
    assert rows[0]["settings"]["bf16"] is True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = generate(tiny_model, tokenizer, [r["prompt"] for r in rows],
                        SamplingSettings(max_new_tokens=8, batch_size=4))
    assert [r["responses"][0] for r in rows] == [g.text for g in want]
    items = [(r["prompt"], [r["reference"]] + r["responses"]) for r in rows]
    stored = [[r["ref_logp_reference"]] + r["ref_logp_responses"] for r in rows]
    bf16 = [lp for lp, _ in score_texts(tiny_model, tokenizer, items, 1024, 512, 4, bf16=True)]
    fp32 = [lp for lp, _ in score_texts(tiny_model, tokenizer, items, 1024, 512, 4)]
    assert stored == bf16
    assert max(abs(a - b) for x, y in zip(stored, fp32) for a, b in zip(x, y)) > 1e-3


def test_score_command_on_published_pairs(tiny_model_dir, tmp_path, capsys):
    from helpers import write_parquet
    u = {"role": "user", "content": "Hi?"}
    pairs = [{"real": [u, {"role": "assistant", "content": "Hello!"}],
              "generated": [u, {"role": "assistant", "content": "Bye."}]}] * 3
    src = tmp_path / "SPIN_iter0"
    write_parquet(src / "train_prefs-00000-of-00001.parquet", pairs)
    assert main(["score", "--model", str(tiny_model_dir), "--dataset", str(src),
                 "--output_dir", str(tmp_path / "scored")]) == 0
    import pyarrow.parquet as pq
    t = pq.read_table(tmp_path / "scored" / "train_prefs-00000-of-00001.parquet").to_pylist()
    # the same row three times is one pair, said in one line
    assert "2 rows repeat a prompt read before" in capsys.readouterr().err
    assert len(t) == 1 and t[0]["generated"][-1]["content"] == "Bye."
    assert t[0]["ref_logp_real"] < 0 and t[0]["ref_logp_generated"] < 0


def test_greedy_generation_is_batch_independent(tokenizer, tiny_model):
    prompts = [r["messages"][:1] for r in ROWS]
    a = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=6, batch_size=1))
    b = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=6, batch_size=5))
    assert [g.text for g in a] == [g.text for g in b]


def test_info_and_help_run():
    assert main(["--help"]) == 0
    for cmd in ("generate", "score", "convert", "evaluate", "tasks", "info"):
        assert main([cmd, "--help"]) == 0
    assert main(["gnerate"]) == 2


def test_bad_input_is_one_sentence(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "assistant",
                                                              "content": "x"}]}])
    assert main(["generate", "--dataset", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl: row 1: roles out of order" in err
    assert "Traceback" not in err


def test_a_sample_depends_on_its_seed_not_on_its_batch(tiny_model_dir):
    """The K samples of a prompt go in one pass as K seeded copies: a row's sample must be the
    one it draws alone (issue: K samples in one batched pass)."""
    from dataclasses import replace

    from selfplay.engines.base import SamplingSettings, stream_seed
    from selfplay.engines.hf import HFEngine

    engine = HFEngine(str(tiny_model_dir), "cpu", "float32")
    prompts = [[{"role": "user", "content": f"Question {i}: " + "more " * (3 * i)}]
               for i in range(6)]
    s = SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1, batch_size=8)
    seeds = [stream_seed(1, "x", i) for i in range(6)]
    together = engine.generate(prompts, s, seeds)
    alone = [engine.generate([p], replace(s, batch_size=1), [seed])[0]
             for p, seed in zip(prompts, seeds)]
    assert [(g.text, g.n_tokens) for g in together] == [(g.text, g.n_tokens) for g in alone]
    twice = engine.generate(prompts + prompts, s, seeds + [stream_seed(1, "y", i)
                                                           for i in range(6)])
    assert [g.text for g in twice[:6]] == [g.text for g in together]
    assert sum(a.text != b.text for a, b in zip(twice[:6], twice[6:])) >= 4   # other seeds
