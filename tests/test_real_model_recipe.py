"""The real-model recipe end to end, tiny, on local stand-ins in an offline hub cache.

The recipe (recipes/spin-qwen2.5-0.5b-ultrachat.yaml): its hub model id and hub dataset id read
from a Hugging Face hub cache laid out as `hf download` leaves it, under HF_HUB_OFFLINE, with no
network; then the recipe end to end, tiny.

The stand-ins: a 2-layer Qwen2 model (hidden size 64) with the default model's tokenizer,
saved as models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/<commit>/, and UltraChat-shaped
parquet files (prompt, prompt_id, messages) for the four splits of ultrachat_200k under
datasets--HuggingFaceH4--ultrachat_200k/snapshots/<commit>/data/, with the dataset card's
`configs` block, as the real snapshot has them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import write_parquet
from selfplay.cli import main
from selfplay.errors import SelfplayError

RECIPE = Path(__file__).parents[1] / "recipes" / "spin-qwen2.5-0.5b-ultrachat.yaml"
MODEL_ID = "Qwen/Qwen2.5-0.5B-Instruct"
DATASET_ID = "HuggingFaceH4/ultrachat_200k"
COMMIT = "1f0bdc5a9e3c4d7b8a6f2e0d9c8b7a6f5e4d3c2b"     # any 40 hex digits: the cache's key
SPLITS = {"train_sft": 8, "test_sft": 6, "train_gen": 8, "test_gen": 4}
# The published card's configs block: load_dataset takes the split names from it.
CARD = "---\nconfigs:\n- config_name: default\n  data_files:\n" + "".join(
    f"  - split: {s}\n    path: data/{s}-*\n" for s in SPLITS) + "---\n# UltraChat 200k stand-in\n"
# What keeps a run tiny: the recipe's keys, made small.
TINY = ["--max_new_tokens", "4", "--batch_size", "4"]
TINY_TRAIN = ["--max_steps", "1", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "1", "--save_steps", "0"]


def ultrachat_rows(split: str, n: int) -> list[dict]:
    """Multi-turn chats as ultrachat_200k has them; the first assistant turn is the reference."""
    rows = []
    for i in range(n):
        q = f"[{split} {i}] Write two sentences about the number {i}."
        rows.append({"prompt": q, "prompt_id": hashlib.sha256(q.encode()).hexdigest(),
                     "messages": [{"role": "user", "content": q},
                                  {"role": "assistant", "content": f"The number {i} is small."},
                                  {"role": "user", "content": "And one more?"},
                                  {"role": "assistant", "content": f"{i} follows {i - 1}."}]})
    return rows


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tokenizer) -> Path:
    """A hub cache holding the stand-in model and dataset, as `hf download` writes it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("hf-hub")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    repo = root / ("models--" + MODEL_ID.replace("/", "--"))
    Qwen2ForCausalLM(cfg).save_pretrained(repo / "snapshots" / COMMIT)
    tokenizer.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    drepo = root / ("datasets--" + DATASET_ID.replace("/", "--"))
    snap = drepo / "snapshots" / COMMIT
    for split, n in SPLITS.items():
        write_parquet(snap / "data" / f"{split}-00000-of-00001.parquet", ultrachat_rows(split, n))
    (snap / "README.md").write_text(CARD)
    (drepo / "refs").mkdir()
    (drepo / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture
def offline(hub_cache, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with `hub_cache` as the hub cache, in this process; every attempt to
    open a network connection is refused and recorded (the returned list must stay empty)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    # The libraries read these at import, so the module values are what a user's environment
    # variables would have set; the environment is set too, for selfplay.hub's check.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")      # restored after selfplay sets it
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    tried: list = []
    connect = socket.socket.connect

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            tried.append(address)
            raise OSError(f"network access in an offline test: {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tried


# ---------------------------------------------------------------------------------------
# (a) the hub model id, (b) the hub dataset id
# ---------------------------------------------------------------------------------------

def test_hub_model_id_loads_the_cached_snapshot_offline(offline, hub_cache):
    from safetensors.torch import load_file
    from selfplay.models import fingerprint, load_model, load_tokenizer, resolve

    assert resolve(MODEL_ID).kind == "hub"
    model, tok = load_model(MODEL_ID, device="cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.hidden_size == 64
    saved = load_file(hub_cache / f"models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/{COMMIT}/"
                      "model.safetensors")
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight,
                       saved["model.layers.1.mlp.down_proj.weight"])
    assert tok.chat_template                             # prompts are rendered with it
    # shards and pairs are stamped with the snapshot's commit, so a new revision of the model
    # is never mistaken for the one that scored them
    assert fingerprint(MODEL_ID) == hashlib.sha256(
        f"hub:{MODEL_ID}@{COMMIT}".encode()).hexdigest()[:16]
    with pytest.raises(SelfplayError, match=r"'Qwen/Qwen2.5-7B-Instruct' is not in the local "
                                            r"Hugging Face cache"):
        load_tokenizer("Qwen/Qwen2.5-7B-Instruct")
    assert offline == []


def test_hub_dataset_id_reads_its_split_from_the_cache_offline(offline):
    from selfplay.data.formats import read_examples

    res = read_examples(DATASET_ID, "train_sft")
    want = ultrachat_rows("train_sft", SPLITS["train_sft"])
    assert res.layout == "messages" and len(res.examples) == len(want)
    assert [e.prompt for e in res.examples] == [r["messages"][:1] for r in want]  # not train_gen
    assert [e.reference for e in res.examples] == [r["messages"][1]["content"] for r in want]
    assert [e.extra["source_prompt_id"] for e in res.examples] == [r["prompt_id"] for r in want]
    # the recipe's held-out split is a slice, in datasets' own syntax
    sliced = read_examples(DATASET_ID, "test_sft[:3]").examples
    assert [e.prompt[0]["content"] for e in sliced] == \
        [r["prompt"] for r in ultrachat_rows("test_sft", 3)]
    # a split the dataset lacks names the ones it has, in one sentence
    with pytest.raises(SelfplayError, match=r"in the local Hugging Face cache .* split 'train' "
                                            r"cannot be read from it: .*'train_sft'"):
        read_examples(DATASET_ID, "train")
    assert offline == []


def test_a_fresh_process_with_the_offline_environment_variables(hub_cache, tmp_path):
    # What a user types: the variables set before Python starts, both hub ids on the command
    # line; a hub that cannot be reached (nothing listens on port 9) would fail any request.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    env.pop("HF_DATASETS_OFFLINE", None)
    r = subprocess.run([sys.executable, "-m", "selfplay", "evaluate", "--model", MODEL_ID,
                        "--dataset", DATASET_ID, "--split", "test_sft", "--max_new_tokens", "4",
                        "--output_dir", str(tmp_path / "eval")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (result["model"], result["dataset"], result["split"], result["n"]) == \
        (MODEL_ID, DATASET_ID, "test_sft", SPLITS["test_sft"])
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------
# (c) the recipe end to end
# ---------------------------------------------------------------------------------------

def test_the_recipe_runs_end_to_end_from_the_hub_ids(offline, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", str(RECIPE), "--output_dir", str(out), "--max_prompts", "4",
               "--num_iterations", "2", "--iterations", "[{}, {learning_rate: 1.0e-7}]",
               *TINY, *TINY_TRAIN])
    # the recipe's split (train_sft) for the iterations: ultrachat_200k has no `train`
    assert rc == 0, capsys.readouterr().err[-2000:]
    shard = next((out / "iter0" / "generated").glob("*.jsonl"))
    prompts = [json.loads(x)["prompt"][0]["content"] for x in shard.read_text().splitlines()]
    assert prompts == [r["prompt"] for r in ultrachat_rows("train_sft", 4)]
    check_report(out, iterations=2)
    assert offline == []


def test_the_recipe_stage_by_stage_as_on_8_gpus(offline, tmp_path):
    """docs/real-model.md's multi-GPU commands, one process: generate (scored), convert, train
    (iteration 1 on iteration 0's and its own pairs), evaluate against the previous model,
    then `selfplay report` on the directory they fill, laid out as `selfplay run`'s."""
    out, theta, recipe = tmp_path / "run", MODEL_ID, str(RECIPE)
    assert main(["evaluate", recipe, "--model", theta, "--output_dir", str(out / "base"),
                 *TINY]) == 0
    for t in (0, 1):
        it = out / f"iter{t}"
        assert main(["generate", recipe, "--model", theta, "--score", "--max_prompts", "4",
                     "--output_dir", str(it / "generated"), *TINY]) == 0
        assert main(["convert", "--input_dir", str(it / "generated"),
                     "--output_dir", str(it / "pairs")]) == 0
        pairs = str(it / "pairs") if t == 0 else f"{out / 'iter0' / 'pairs'}:1.0,{it / 'pairs'}:1.0"
        assert main(["train", recipe, "--model", theta, "--dataset", pairs, "--split", "train",
                     "--max_prompts", "0", "--output_dir", str(it / "model"), *TINY_TRAIN]) == 0
        prev = out / ("base" if t == 0 else f"iter{t - 1}") / "eval.json"
        assert main(["evaluate", recipe, "--model", str(it / "model"), "--baseline", str(prev),
                     "--output_dir", str(it), *TINY]) == 0
        theta = str(it / "model")
    shard = next((out / "iter0" / "generated").glob("*.jsonl"))
    assert shard.name.startswith("train_sft-")            # the recipe's split, not train_gen
    prompts = [json.loads(x)["prompt"][0]["content"] for x in shard.read_text().splitlines()]
    assert prompts == [r["prompt"] for r in ultrachat_rows("train_sft", 4)]
    done = json.loads((out / "iter1" / "model" / "training_complete.json").read_text())
    assert [s["pairs"] for s in done["sources"]] == [4, 4]       # previous + current
    assert main(["report", str(out)]) == 0
    check_report(out, iterations=2)
    assert offline == []


def check_report(out: Path, iterations: int) -> None:
    """What a run on a dataset without checkable answers reports: no accuracy and no paired
    test (nothing to check), the references' likelihood, lengths, the training columns."""
    base = json.loads((out / "base" / "eval.json").read_text())
    assert base["model"] == MODEL_ID and base["split"] == "test_sft[:2000]"   # the recipe's
    assert base["n"] == SPLITS["test_sft"] and base["accuracy"] is None
    last = json.loads((out / f"iter{iterations - 1}" / "eval.json").read_text())
    assert last["win_rate"] is None and last["paired"]["n"] == 0
    page = (out / "report.md").read_text()
    rows = [x for x in page.splitlines() if x.startswith(("| start |", "| iteration "))]
    table = [r.split(" | ") for r in rows[:1 + iterations]]     # the first table is the main one
    assert [r[0] for r in table] == ["| start"] + [f"| iteration {t}" for t in range(iterations)]
    for cells in table:
        assert cells[1:4] == ["–", "–", "–"]               # accuracy, change, win rate
        float(cells[4])                                     # reference log-lik per token
    assert all(c[7] != "–" for c in table[1:])              # each iteration's final loss
    assert "From start to" not in page and "Accuracy per task family" not in page
    assert "| iteration 0 | 4 | 4 |" in page                # prompts, pairs
    assert (out / "plots" / "iterations.png").stat().st_size > 1000
