"""Short trainings of the real default model (slow: run with `pytest -m slow`)."""

import pytest

from helpers import write_parquet
from selfplay.cli import main
from selfplay.data.tasks import generate as tasks


@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory):
    ts = tasks("train", 9, seed=0)
    rows = [{"real": [{"role": "user", "content": t.prompt},
                      {"role": "assistant", "content": t.reference}],
             "generated": [{"role": "user", "content": t.prompt},
                           {"role": "assistant", "content": ts[i + 1].reference}]}
            for i, t in enumerate(ts[:8])]
    d = tmp_path_factory.mktemp("real-pairs")
    write_parquet(d / "train_prefs-00000-of-00001.parquet", rows)
    return d


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_default_model_trains_and_its_checkpoint_generates(real_pairs, tmp_path, mode, capsys):
    extra = {"full": [], "lora": ["--use_peft"], "qlora": ["--use_peft", "--load_in_4bit"]}[mode]
    out = tmp_path / mode
    assert main(["train", "--dataset", str(real_pairs), "--output_dir", str(out),
                 "--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps",
                 "1", *extra]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--max_prompts", "2", "--max_new_tokens", "24",
                 "--output_dir", str(tmp_path / "gen")]) == 0
    from selfplay.io import read_jsonl
    rows = read_jsonl(next((tmp_path / "gen").glob("*.jsonl")))
    assert all(r["responses"][0].strip() for r in rows)
    print(mode, repr(rows[0]["responses"][0]))


@pytest.mark.slow
@pytest.mark.real_model
def test_default_model_sft_lowers_the_reference_nll(tmp_path):
    import json
    out = tmp_path / "sft"
    assert main(["sft", "--max_prompts", "32", "--per_device_train_batch_size", "8",
                 "--num_train_epochs", "2", "--logging_steps", "1", "--output_dir",
                 str(out)]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and log[-1]["loss"] < log[0]["loss"]
