"""Plain helpers shared by tests: tiny models, data files, TRL's oracle, commands run and killed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def make_tiny_model(tokenizer, seed: int = 0):
    """A tiny random Llama (2 layers, hidden size 64) for `tokenizer`, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def write_jsonl(path: Path, rows: list) -> Path:
    """`rows` as a JSON-lines file (a str row written as it is); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """`rows` as a parquet file; returns `path`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def trl_oracle(tokenizer, tmp_path, rows: list[dict], loss_type: str, beta: float):
    """TRL's DPOTrainer on one batch of `rows` (a policy and a different reference model).

    Returns (policy, reference, batch, TRL's loss, TRL's gradients): our loss on the same
    token tensors must give the same loss and gradients.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = make_tiny_model(tokenizer, seed=0).train()
    ref = make_tiny_model(tokenizer, seed=1).eval()          # a different θ_t: margins ≠ 0
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[loss_type],
                     per_device_train_batch_size=len(rows), report_to=[], use_cpu=True,
                     bf16=False)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    policy.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    return policy, ref, batch, loss, grads


def interrupted_training(model_dir, pairs_dir: Path, out: Path, *extra: str) -> list[str]:
    """`selfplay train` on the pairs of `pairs_dir`, a checkpoint every 2 updates, killed -9
    after the first: its arguments, to resume with `--resume`."""
    args = ["train", "--model", str(model_dir), "--dataset", str(pairs_dir), "--output_dir",
            str(out), "--per_device_train_batch_size", "2", "--max_steps", "40", "--save_steps",
            "2", "--report_to", "none", *extra]
    kill_after_first_checkpoint(args, out)
    return args


def kill_after_first_checkpoint(args: list[str], out: Path, timeout: float = 120) -> None:
    """Run `python -m selfplay ARGS` and kill -9 it once its first checkpoint in `out` is
    complete: an interrupted training to resume."""
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "selfplay", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not list((out / "checkpoints").glob("step-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the end"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "training_complete.json").exists()


def _selfplay(args: list[str]):
    """Start `python -m selfplay ARGS` with its stderr piped and the tests directory importable."""
    import subprocess
    import sys
    # the tests directory importable, as the stand-in judges (`stand_in_judges:NAME`) need
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "selfplay", *args],
                            env={**os.environ, "PYTHONPATH": path},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(proc, marker: str, timeout: float) -> None:
    """Read the process's stderr until `marker` appears (bytes: progress bars end in \r)."""
    import select
    import time
    seen, deadline = b"", time.time() + timeout
    while marker.encode() not in seen:
        assert time.time() < deadline, f"no {marker!r} on stderr before the deadline"
        if select.select([proc.stderr], [], [], 0.1)[0]:
            chunk = os.read(proc.stderr.fileno(), 65536)
            assert chunk, f"ended before {marker!r}: {seen[-2000:].decode(errors='replace')}"
            seen += chunk


def seconds_after(args: list[str], marker: str, timeout: float = 120) -> float:
    """Run `python -m selfplay ARGS` to its end; the seconds from `marker` on stderr to exit."""
    import time
    proc = _selfplay(args)
    _wait_for(proc, marker, timeout)
    t = time.perf_counter()
    proc.stderr.read()                               # drained, so it never blocks on a pipe
    assert proc.wait() == 0
    return time.perf_counter() - t


def kill_at_random_point(args: list[str], marker: str, window: float, rng,
                         timeout: float = 120) -> float:
    """Run `python -m selfplay ARGS`, wait until `marker` appears on its stderr (its work has
    begun), then kill -9 it after a delay drawn uniformly from [0, window) seconds.

    Returns the delay; fails if the command ended before it was killed.
    """
    import signal
    import time
    proc = _selfplay(args)
    _wait_for(proc, marker, timeout)
    delay = float(rng.uniform(0, window))
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"ended before the kill ({delay:.2f} s)"
    return delay


def kill_tree(pid: int) -> None:
    """kill -9 a process and every process below it (a launcher's workers may sit in
    sessions of their own, out of reach of a process-group kill)."""
    import signal
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
