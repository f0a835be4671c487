"""Two-iteration SPIN and SPPO runs on a tiny random model; prints every stage's checksums.

    python scripts/tiny_run_checksums.py OUT_DIR

A refactoring that must not change behaviour is checked by running this before and after it
with the same OUT_DIR (paths are recorded inside the outputs, so the directory must match) and
comparing the printed JSON. The tiny model is the test suite's (seeded; the default model's
tokenizer), the SPPO judge the tests' stand-in (prefers longer answers).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))   # stand_in_judges

from selfplay.cli import main as selfplay  # noqa: E402
from selfplay.models import DEFAULT_MODEL, load_tokenizer  # noqa: E402

COMMON = ["--tasks_test_size", "10", "--max_new_tokens", "6", "--learning_rate", "1e-3",
          "--logging_steps", "1"]
RUNS = {
    "spin": ["--max_prompts", "8", "--per_device_train_batch_size", "4"],
    "sppo": ["--method", "sppo", "--judge", "stand_in_judges:by_length", "--num_samples", "3",
             "--max_prompts", "6", "--per_device_train_batch_size", "3", "--beta", "0.1"],
}


def tiny_model(out: Path) -> Path:
    tok = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    model = tiny_model(out / "tiny")
    sums = {}
    for name, args in RUNS.items():
        run_dir = out / name
        with contextlib.redirect_stdout(sys.stderr):    # stdout: the checksums alone
            rc = selfplay(["run", "--model", str(model), "--output_dir", str(run_dir), *COMMON,
                           *args])
        if rc != 0:
            raise SystemExit(f"the {name} run failed")
        stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
        sums[name] = {stage: rec["checksums"] for stage, rec in stages.items()}
    return sums


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(json.dumps(main(Path(sys.argv[1]).resolve()), indent=1))
