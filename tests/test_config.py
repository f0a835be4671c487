"""Options: override styles, aliases, recipes, checks and their one-line messages, help."""

import pytest

from selfplay.config import Config, load_config, parse_overrides
from selfplay.errors import SelfplayError


def test_defaults_target_the_embedded_model():
    cfg = load_config("generate")
    assert cfg.model.model_name_or_path == "default"
    assert cfg.data.dataset == "builtin:tasks"
    assert cfg.generation.temperature == 0.0          # the paper's greedy HF generation


def test_both_override_styles_and_aliases():
    cfg = load_config("generate", None, ["--max_new_tokens", "64", "--temperature=0.7",
                                         "--model", "some/model", "--input_dir=data.jsonl",
                                         "--num-samples", "3", "--top_p", "0.9"])
    g = cfg.generation
    assert (g.max_new_tokens, g.temperature, g.num_samples) == (64, 0.7, 3)
    assert cfg.model.model_name_or_path == "some/model" and cfg.data.dataset == "data.jsonl"


def test_alias_resolves_per_command():
    # --input_dir is the dataset for generate (as in spin/generate.py), the shards for convert.
    assert load_config("convert", None, ["--input_dir", "gen"]).convert.shards_dir == "gen"
    assert load_config("convert").job.output_dir == "pairs"
    assert load_config("tasks", None, ["--seed", "3"]).data.tasks_seed == 3
    assert load_config("generate", None, ["--seed", "3"]).job.seed == 3


def test_bare_flag_is_true_and_explicit_false():
    assert load_config("generate", None, ["--score"]).generation.score is True
    assert load_config("generate", None, ["--score", "--overwrite"]).job.overwrite is True
    assert load_config("generate", None, ["--score=false"]).generation.score is False


def test_recipe_then_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_new_tokens: 32\nmodel: x/y\ntemperature: 0.5\n")
    cfg = load_config("generate", recipe, ["--max_new_tokens=16"])
    assert cfg.generation.max_new_tokens == 16 and cfg.generation.temperature == 0.5
    assert cfg.model.model_name_or_path == "x/y"


def test_unknown_key_names_the_nearest():
    with pytest.raises(SelfplayError, match=r"unknown option --max_new_tokns; did you mean "
                                            r"--max_new_tokens\?"):
        load_config("generate", None, ["--max_new_tokns", "3"])


def test_unknown_key_in_recipe_names_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("temprature: 0.7\n")
    with pytest.raises(SelfplayError, match=r"--temprature in .*bad.yaml; did you mean "
                                            r"--temperature"):
        load_config("generate", recipe)


def test_bad_value_names_option_and_what_it_takes():
    with pytest.raises(SelfplayError, match=r"--max_new_tokens got 'many', but it takes an "
                                            r"integer"):
        load_config("generate", None, ["--max_new_tokens", "many"])
    with pytest.raises(SelfplayError, match=r"--dataset_layout .* one of: auto, messages"):
        load_config("generate", None, ["--dataset_layout", "csv"])
    with pytest.raises(SelfplayError, match=r"--score got 'maybe'"):
        load_config("generate", None, ["--score=maybe"])


def test_option_of_another_command_is_refused():
    with pytest.raises(SelfplayError, match=r"--num_fracs does not apply to `selfplay generate`"):
        load_config("generate", None, ["--num_fracs", "3"])


def test_cross_option_checks():
    with pytest.raises(SelfplayError, match="num_samples 5 with --temperature 0"):
        load_config("generate", None, ["--num_samples", "5"])
    with pytest.raises(SelfplayError, match="--data_frac 2 needs --frac_len"):
        load_config("generate", None, ["--data_frac", "2"])
    with pytest.raises(SelfplayError, match="max_prompt_length"):
        load_config("score", None, ["--max_length", "64", "--max_prompt_length", "128"])


def test_value_missing():
    with pytest.raises(SelfplayError, match="--max_new_tokens needs a value"):
        load_config("generate", None, ["--max_new_tokens"])


def test_negative_number_is_a_value():
    assert parse_overrides(["--seed", "-1"], "generate") == [("seed", "-1")]


def test_every_field_has_help_and_a_command():
    from selfplay.config import FIELDS
    for name, f in FIELDS.items():
        assert len(f.metadata["help"]) > 10 and f.metadata["commands"], name


def test_keys_are_flat_and_grouped():
    cfg = load_config("run", None, ["--learning_rate", "1e-5", "--max_new_tokens", "9"])
    flat = cfg.flat()
    assert flat["learning_rate"] == 1e-5 and flat["max_new_tokens"] == 9
    assert Config.from_flat(flat) == cfg
    assert cfg.replace(beta=5.0).training.beta == 5.0 and cfg.training.beta == 0.1


def test_help_lists_only_the_commands_options_under_headings():
    from selfplay.config import format_help
    text = format_help("convert")
    assert "convert:" in text and "output:" in text and "training:" not in text
    assert "--num_fracs" in text and "--learning_rate" not in text
    train = format_help("train")
    assert "LoRA / QLoRA:" in train and "--temperature" not in train
    # each command's own options first: what its user reaches for most
    assert train.startswith("training:") and format_help("run").startswith("the loop:")
    assert format_help("evaluate").startswith("evaluation:")


def test_help_piped_to_a_closed_reader_exits_cleanly():
    import subprocess
    import sys
    out = subprocess.run(f"{sys.executable} -m selfplay generate --help | head -2", shell=True,
                         capture_output=True, text=True)
    assert out.stdout.startswith("usage: selfplay generate") and "Traceback" not in out.stderr


@pytest.mark.parametrize("recipe", sorted(p.name for p in
                                          (__import__("pathlib").Path(__file__).parents[1] /
                                           "recipes").glob("*.yaml")))
def test_shipped_recipes_load(recipe):
    from pathlib import Path
    path = Path(__file__).parents[1] / "recipes" / recipe
    cfg = load_config("run" if recipe.endswith("-run.yaml") else "train", path)
    assert cfg.model.model_name_or_path


def test_method_sppo_defaults_and_what_overrides_them(tmp_path):
    spin = load_config("run")
    assert (spin.generation.num_samples, spin.training.loss_type, spin.data.max_prompts) == \
        (1, "sigmoid", 128)
    cfg = load_config("run", None, ["--method", "sppo"])
    g = cfg.generation
    assert (g.num_samples, g.temperature, g.top_p, cfg.training.loss_type, cfg.run.data_policy) == \
        (5, 0.7, 0.9, "sppo", "current")
    assert (cfg.data.max_prompts, cfg.training.learning_rate, cfg.job.output_dir) == \
        (64, 5e-6, "runs/sppo")
    mine = load_config("run", None, ["--method", "sppo", "--num_samples", "3",
                                     "--max_prompts", "10", "--loss_type", "sppo_hard"])
    assert (mine.generation.num_samples, mine.data.max_prompts, mine.training.loss_type) == \
        (3, 10, "sppo_hard")
    # A run recipe given to `selfplay train` keeps the method's loss, not the run's sizing.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: sppo\n")
    train = load_config("train", recipe)
    assert train.training.loss_type == "sppo" and train.data.max_prompts == 0
    assert train.job.output_dir == "checkpoints/spin"


def test_a_recipe_key_given_twice_is_refused(tmp_path):
    """As on the command line (before: YAML kept the last value without a word)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_new_tokens: 4\nlearning_rate: 1.0e-6\nmax_new_tokens: 8\n")
    with pytest.raises(SelfplayError, match=r"gives 'max_new_tokens' twice \(lines 1 and 3\)"):
        load_config("run", recipe)
    recipe.write_text("iterations:\n  - {beta: 0.1, beta: 0.2}\n")
    with pytest.raises(SelfplayError, match="gives 'beta' twice"):
        load_config("run", recipe)
