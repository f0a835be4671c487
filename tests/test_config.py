import pytest

from selfplay.config import Config, load_config, parse_overrides
from selfplay.errors import SelfplayError


def test_defaults_target_the_embedded_model():
    cfg = load_config("generate")
    assert cfg.model_name_or_path == "default"
    assert cfg.dataset == "builtin:tasks"
    assert cfg.temperature == 0.0          # the paper's greedy HF generation


def test_both_override_styles_and_aliases():
    cfg = load_config("generate", None, ["--max_new_tokens", "64", "--temperature=0.7",
                                         "--model", "some/model", "--input_dir=data.jsonl",
                                         "--num-samples", "3", "--top_p", "0.9"])
    assert (cfg.max_new_tokens, cfg.temperature, cfg.num_samples) == (64, 0.7, 3)
    assert cfg.model_name_or_path == "some/model" and cfg.dataset == "data.jsonl"


def test_alias_resolves_per_command():
    # --input_dir is the dataset for generate (as in spin/generate.py), the shards for convert.
    assert load_config("convert", None, ["--input_dir", "gen"]).shards_dir == "gen"
    assert load_config("convert").output_dir == "pairs"
    assert load_config("tasks", None, ["--seed", "3"]).tasks_seed == 3
    assert load_config("generate", None, ["--seed", "3"]).seed == 3


def test_bare_flag_is_true_and_explicit_false():
    assert load_config("generate", None, ["--score"]).score is True
    assert load_config("generate", None, ["--score", "--overwrite"]).overwrite is True
    assert load_config("generate", None, ["--score=false"]).score is False


def test_recipe_then_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_new_tokens: 32\nmodel: x/y\ntemperature: 0.5\n")
    cfg = load_config("generate", recipe, ["--max_new_tokens=16"])
    assert cfg.max_new_tokens == 16 and cfg.model_name_or_path == "x/y" and cfg.temperature == 0.5


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


def test_every_field_has_help():
    import dataclasses
    for f in dataclasses.fields(Config):
        assert len(f.metadata["help"]) > 10, f.name


@pytest.mark.parametrize("recipe", sorted(p.name for p in
                                          (__import__("pathlib").Path(__file__).parents[1] /
                                           "recipes").glob("*.yaml")))
def test_shipped_recipes_load(recipe):
    from pathlib import Path
    path = Path(__file__).parents[1] / "recipes" / recipe
    cfg = load_config("run" if recipe.endswith("-run.yaml") else "train", path)
    assert cfg.model_name_or_path


def test_method_sppo_defaults_and_what_overrides_them(tmp_path):
    spin = load_config("run")
    assert (spin.num_samples, spin.loss_type, spin.max_prompts) == (1, "sigmoid", 128)
    cfg = load_config("run", None, ["--method", "sppo"])
    assert (cfg.num_samples, cfg.temperature, cfg.top_p, cfg.loss_type, cfg.data_policy) == \
        (5, 0.7, 0.9, "sppo", "current")
    assert (cfg.max_prompts, cfg.learning_rate, cfg.output_dir) == (64, 5e-6, "runs/sppo")
    mine = load_config("run", None, ["--method", "sppo", "--num_samples", "3",
                                     "--max_prompts", "10", "--loss_type", "sppo_hard"])
    assert (mine.num_samples, mine.max_prompts, mine.loss_type) == (3, 10, "sppo_hard")
    # A run recipe given to `selfplay train` keeps the method's loss, not the run's sizing.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: sppo\n")
    train = load_config("train", recipe)
    assert train.loss_type == "sppo" and train.max_prompts == 0
    assert train.output_dir == "checkpoints/spin"
