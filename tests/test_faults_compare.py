"""compare's arms: matched by prompt id, named apart, refused when evaluated on other prompts."""

from __future__ import annotations

import json
from pathlib import Path

from selfplay.cli import main


def _run(root: Path, ids: list[str], right: list[list[bool]]) -> Path:
    """A run directory as `selfplay run` leaves it: the start's and each iteration's
    evaluation of the same prompts."""
    for where, correct in zip(["base"] + [f"iter{t}" for t in range(len(right) - 1)], right):
        rows = [{"prompt_id": i, "family": "arith", "answer": "1", "response": "1",
                 "n_tokens": 1, "finish_reason": "eos", "correct": c}
                for i, c in zip(ids, correct)]
        d = root / where
        d.mkdir(parents=True, exist_ok=True)
        (d / "eval.json").write_text(json.dumps({
            "n": len(rows), "accuracy": sum(correct) / len(rows), "per_family": {},
            "reference_logp_per_token": None, "mean_response_tokens": 1.0,
            "truncated_share": 0.0, "settings": {}, "rows": rows, "model": str(d)}))
    return root


def test_arms_of_the_same_folder_name_are_named_apart(tmp_path, capsys):
    """Before: one arm dropped, the other's numbers under the first's name."""
    ids = ["a", "b", "c", "d"]
    one = _run(tmp_path / "x" / "base", ids, [[True, False, False, False], [True] * 4])
    two = _run(tmp_path / "y" / "base", ids,
               [[True, False, False, False], [True, False, True, True]])
    assert main(["compare", str(one), str(two), "--output_dir", str(tmp_path / "c")]) == 0
    table = (tmp_path / "c" / "compare.md").read_text()
    assert "x/base (?)" in table and "y/base (?)" in table
    assert "| iteration 0 | 100.0% | 75.0% | -25.0 pts (0↑ 1↓" in table


def test_arms_evaluated_on_other_prompts_are_refused(tmp_path, capsys):
    """Before: a "paired" test over prompts that do not overlap, matched by position:
    "+0.0 pts (0↑ 0↓, p = 1)"."""
    one = _run(tmp_path / "a", ["a", "b", "c"], [[True, False, True]] * 2)
    two = _run(tmp_path / "b", ["d", "e", "f"], [[True, False, True]] * 2)
    assert main(["compare", str(one), str(two), "--output_dir", str(tmp_path / "c")]) == 2
    assert "was evaluated on other prompts than arm a (?)" in capsys.readouterr().err
    assert not (tmp_path / "c" / "compare.md").exists()


def test_differences_are_taken_against_the_control_arm_wherever_it_stands(tmp_path):
    """The SFT control arm (--method sft) is the reference of every difference column, even
    when it is not the first directory given."""
    ids = ["a", "b", "c", "d"]
    spin = _run(tmp_path / "spin", ids, [[True, False, False, False], [True, True, True, False]])
    ctrl = _run(tmp_path / "ctrl", ids, [[True, False, False, False], [True, True, False, False]])
    for d, m in ((spin, "spin"), (ctrl, "sft")):
        (d / "manifest.json").write_text(json.dumps({"recipe": {"method": m}, "stages": {}}))
    assert main(["compare", str(spin), str(ctrl), "--output_dir", str(tmp_path / "c")]) == 0
    page = (tmp_path / "c" / "compare.md").read_text()
    assert "| step | spin (spin) | ctrl (sft) | spin (spin) − ctrl (sft) |" in page
    assert "| iteration 0 | 75.0% | 50.0% | +25.0 pts (1↑ 0↓" in page
