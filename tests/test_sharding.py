"""FSDP2 on CPU processes (gloo): sharded training equals one process, shards, and resumes.

Each launch is `accelerate launch --multi_gpu` on CPU processes with `--fsdp true` (or the
shipped FSDP config made to run on CPU): the same code path as NCCL on GPUs. The one-process
reference is plain, unsharded training at the same global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import kill_tree, write_parquet
from selfplay.cli import main

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision",
          "no", "--dynamo_backend", "no"]
COMMON = ["--learning_rate", "1e-3", "--logging_steps", "1", "--optim", "adamw",
          "--report_to", "none"]


def _pair_rows(n: int, sppo: bool) -> list[dict]:
    rows = []
    for i in range(n):
        u = {"role": "user", "content": f"What is {i} plus {i}?"}
        good = {"role": "assistant", "content": f"{i} + {i} = {2 * i}.\nAnswer: {2 * i}"}
        bad = {"role": "assistant", "content": f"Maybe {i}? " * (1 + i % 3)}
        if sppo:
            rows.append({"prompt": [u], "chosen": [u, good], "rejected": [u, bad],
                         "chosen_probs": 0.8, "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3})
        else:
            rows.append({"prompt_id": f"p{i}", "real": [u, good], "generated": [u, bad]})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """18 pairs: the reference pass's 5 batches of 4 do not split evenly over 2 processes."""
    d = tmp_path_factory.mktemp("sharding-data")
    for name, n, sppo in (("spin", 18, False), ("sppo", 18, True), ("spin16", 16, False)):
        write_parquet(d / name / "train_prefs-00000-of-00001.parquet", _pair_rows(n, sppo))
    return {"spin": d / "spin", "sppo": d / "sppo", "spin16": d / "spin16"}


CASES = {        # the command, its data (a key of the `data` fixture) and its own options
    "spin": ("train", "spin", []),
    "sppo-lora": ("train", "sppo", ["--loss_type", "sppo", "--beta", "1.0", "--use_peft", "true",
                                    "--lora_dropout", "0"]),
    "sft": ("sft", "builtin:tasks", ["--max_prompts", "16", "--gradient_checkpointing", "true"]),
    # 16 pairs: global batches of 8 whole at any process count (a last, short batch is filled
    # to a multiple of the process count, so 18 would train otherwise on 4 processes than 2)
    "spin16": ("train", "spin16", []),
}


def _args(case: str, model: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    command, dataset, own = CASES[case]
    return [str(a) for a in [command, "--dataset", data.get(dataset, dataset), *own, "--model",
                             model, "--output_dir", out, *COMMON, *extra]]


def launch(args: list[str], processes: int = 2, *, config: Path | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """`accelerate launch ... -m selfplay ARGS` on CPU processes; fails the test on an error."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)] \
        if config else LAUNCH + ["--num_processes", str(processes), "--num_machines", "1"]
    res = subprocess.run(cmd + ["-m", "selfplay", *args], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def assert_same_training(a: Path, b: Path, weights: str = "model.safetensors") -> None:
    """Losses and gradient norms at every update, and the final weights, within float32
    tolerance (the sums run in another order across processes)."""
    for x, y in zip(_log(a), _log(b), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4, abs=1e-6)
    wa, wb = load_file(a / weights), load_file(b / weights)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def assert_sharded(out: Path, processes: int) -> dict:
    """Every decoder layer its own FSDP unit, the rest under the root, and each process
    holding its share of the weights, gradients and optimizer state."""
    s = json.loads((out / "training_complete.json").read_text())["sharding"]
    assert s["processes"] == processes
    assert s["decoder_layers"] == s["decoder_layers_sharded"] == 2 and s["root_sharded"]
    for b in s["state_bytes_per_process"]:
        assert b <= s["state_bytes_whole"] / processes * 1.05
    return s


def _shipped_fsdp_config(tmp_path: Path) -> Path:
    """recipes/accelerate/fsdp.yaml made to run on 2 CPU processes."""
    import yaml
    cfg = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "accelerate" / "fsdp.yaml")
                         .read_text())
    cfg.update(num_processes=2, use_cpu=True, mixed_precision="no")
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


@pytest.mark.parametrize("case", ["spin", "sppo-lora", "sft"])
def test_fsdp_on_two_processes_equals_one_process(case, tiny_model_dir, data, tmp_path):
    """SPIN's, SPPO's and SFT's losses, full fine-tuning and LoRA: 2 sharded processes at
    batch 2 against one unsharded process at batch 4. SPIN runs under the shipped
    recipes/accelerate/fsdp.yaml (made to run on CPU: our FSDP2, not accelerate's, which
    refuses a CPU, nor plain data parallelism); the others under --fsdp true."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(case, tiny_model_dir, data, one, "--max_steps", "3",
                      "--per_device_train_batch_size", "4")) == 0
    args = _args(case, tiny_model_dir, data, two, "--max_steps", "3",
                 "--per_device_train_batch_size", "2")
    if case == "spin":
        res = launch(args, config=_shipped_fsdp_config(tmp_path))
    else:
        res = launch(args + ["--fsdp", "true"])
    assert "sharded over 2 processes" in res.stderr
    assert_same_training(one, two)
    assert_sharded(two, 2)
    assert _log(two)[-1]["loss"] != _log(two)[0]["loss"]       # it trained


def _kill_after_checkpoint(args: list[str], out: Path, processes: int = 2,
                           timeout: float = 300) -> None:
    """Launch the processes and kill -9 the whole launch once its first checkpoint is whole."""
    cmd = LAUNCH + ["--num_processes", str(processes), "--num_machines", "1", "-m", "selfplay",
                    *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + timeout
    while not list((out / "checkpoints").glob("step-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the end"
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    assert not (out / "training_complete.json").exists()


def test_a_sharded_training_killed_after_a_checkpoint_resumes_on_any_process_count(
        tiny_model_dir, data, tmp_path):
    """kill -9 after the checkpoint of update 2 of 6; resumed on 2 processes and on 1 (the
    checkpoint is resharded as it is read), both reach the weights of an uninterrupted run
    (one unsharded process, which 2 sharded ones equal). Each process wrote its own shard:
    none holds the whole optimizer state."""
    run = ["--max_steps", "6", "--save_steps", "2", "--fsdp", "true"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_args("spin", tiny_model_dir, data, whole, "--max_steps", "6",
                      "--per_device_train_batch_size", "4")) == 0     # unsharded, as 2 x 2
    _kill_after_checkpoint(_args("spin", tiny_model_dir, data, cut, *run,
                                 "--per_device_train_batch_size", "2"), cut)
    ckpt = sorted((cut / "checkpoints").glob("step-*"))[0]
    shards = sorted(p.name for p in ckpt.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [(ckpt / s).stat().st_size for s in shards]
    assert max(sizes) < 0.6 * sum(sizes)
    alone = tmp_path / "alone"
    shutil.copytree(cut, alone)
    launch(_args("spin", tiny_model_dir, data, cut, *run, "--per_device_train_batch_size", "2",
                 "--resume", "true"))
    assert_same_training(whole, cut)
    # the same global batch on one process: 1 x 4 for 2 x 2
    assert main(_args("spin", tiny_model_dir, data, alone, *run, "--per_device_train_batch_size",
                      "4", "--resume", "true")) == 0
    assert_same_training(whole, alone)
    assert_sharded(alone, 1)


def test_two_machines_launched_by_torchrun_shard_as_two_processes(tiny_model_dir, data,
                                                                   tmp_path):
    """Two torchrun launchers, --nnodes 2 with node ranks 0 and 1 (a multi-node job, here on
    one host), one process each, no accelerate launcher: sharded over both, equal to one
    process."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args("spin", tiny_model_dir, data, one, "--max_steps", "2",
                      "--per_device_train_batch_size", "4")) == 0
    args = _args("spin", tiny_model_dir, data, two, "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--fsdp", "true")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                               "--node_rank", str(r), "--nproc_per_node", "1", "--master_addr",
                               "127.0.0.1", "--master_port", port, "-m", "selfplay", *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:]
    assert_same_training(one, two)
    assert_sharded(two, 2)


def test_a_sharded_run_that_diverges_stops_before_the_update(tiny_model_dir, data, tmp_path,
                                                             capsys):
    """The non-finite check over sharded gradients (one process, its own group)."""
    from safetensors.torch import save_file
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    w = load_file(broken / "model.safetensors")
    w["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(w, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "nan"
    assert main(_args("spin", broken, data, out, "--max_steps", "2", "--fsdp", "true",
                      "--per_device_train_batch_size", "4")) == 2
    assert "update 1: the loss (nan)" in capsys.readouterr().err
    assert not (out / "training_complete.json").exists()


def test_bf16_weights_compute_the_reference_the_same_way(tiny_model_dir, data, tmp_path):
    """--fsdp_bf16_params (FSDP2's mixed-precision policy: bf16 weights, float32 gradient
    reduction): the reference log-probs come from the same policy, so the first update's
    SPIN loss is exactly log 2, as in float32; CPU offload on a CPU is refused at once."""
    import math
    scored = tmp_path / "scored"         # float32 reference log-probs stored, stamped
    assert main(["score", "--model", str(tiny_model_dir), "--dataset", str(data["spin"]),
                 "--output_dir", str(scored)]) == 0
    out = tmp_path / "bf16"
    assert main(_args("spin", tiny_model_dir, {"spin": scored}, out, "--max_steps", "4",
                      "--fsdp", "true", "--fsdp_bf16_params", "true",
                      "--per_device_train_batch_size", "4")) == 0
    assert json.loads((out / "training_complete.json").read_text())["stored_reference"] == 0
    log = _log(out)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert log[-1]["loss"] < log[0]["loss"] - 0.01
    assert main(_args("spin", tiny_model_dir, data, tmp_path / "off", "--fsdp", "true",
                      "--fsdp_cpu_offload", "true")) == 2


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 4), (4, 2)])
def test_four_processes_resume_two_and_the_reverse(first, then, tiny_model_dir, data, tmp_path):
    """Resume across 2 and 4 processes at the same global batch (8), both ways."""
    run = ["--max_steps", "4", "--save_steps", "2", "--fsdp", "true"]
    batch = {2: "4", 4: "2"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_args("spin16", tiny_model_dir, data, whole, "--max_steps", "4",
                      "--per_device_train_batch_size", "8")) == 0
    _kill_after_checkpoint(_args("spin16", tiny_model_dir, data, cut, *run,
                                 "--per_device_train_batch_size", batch[first]), cut, first)
    launch(_args("spin16", tiny_model_dir, data, cut, *run, "--per_device_train_batch_size",
                 batch[then], "--resume", "true"), then)
    assert_same_training(whole, cut)
    assert_sharded(cut, then)
