"""rank and evaluate under a launcher: each process its share of the prompts, merged as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfplay.cli import main

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
          "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
          "selfplay"]


def launch_two(args: list[str]) -> subprocess.CompletedProcess:
    tests = str(Path(__file__).parent)          # the stand-in judges, as a user's module
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(LAUNCH + args, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def samples(tiny_model_dir, tmp_path_factory) -> Path:
    """K = 3 sampled answers to 7 prompts (7: the processes' shares are 4 and 3)."""
    out = tmp_path_factory.mktemp("samples")
    assert main(["generate", "--model", str(tiny_model_dir), "--output_dir", str(out),
                 "--max_prompts", "7", "--num_samples", "3", "--temperature", "1.0",
                 "--max_new_tokens", "12"]) == 0
    return out


def test_two_processes_rank_as_one(samples, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["rank", "--input_dir", str(samples), "--judge", "stand_in_judges:by_length"]
    assert main(args + ["--output_dir", str(one)]) == 0
    launch_two(args + ["--output_dir", str(two)])
    name = "train-frac00000-rank000-of001.jsonl"
    a = (one / name).read_text().splitlines()
    assert len(a) == 7 and a == (two / name).read_text().splitlines()
    assert any(json.loads(r)["matrix"][0][1] != 0.5 for r in a)       # not all ties


def test_two_processes_evaluate_as_one(tiny_model_dir, tmp_path):
    """Every row (answer, correctness) the same; the reference likelihood, summed over other
    batches, within float32 rounding; one eval.json, written by the main process."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["evaluate", "--model", str(tiny_model_dir), "--tasks_test_size", "9",
            "--max_new_tokens", "8"]
    assert main(args + ["--output_dir", str(one)]) == 0
    res = launch_two(args + ["--output_dir", str(two)])
    assert res.stdout.count("wrote ") == 1
    a, b = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert a["rows"] == b["rows"] and len(a["rows"]) == 9
    assert (a["accuracy"], a["per_family"], a["mean_response_tokens"]) == \
        (b["accuracy"], b["per_family"], b["mean_response_tokens"])
    assert a["reference_logp_per_token"] == pytest.approx(b["reference_logp_per_token"],
                                                          rel=1e-6)
