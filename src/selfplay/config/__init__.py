"""One config schema for every command, grouped: a YAML recipe plus `--key value` overrides.

  options.py   how an option is declared: help, commands, effects (feeds, resumable)
  settings.py  the inference and data groups; training.py the training and loop groups
  schema.py    Config: one settings object per group, and every field by its flat name
  effects.py   what the declared effects decide: resume keys, stages a change redoes
  loading.py   defaults, recipe, command line, coercion; the grouped --help
"""

from selfplay.config.effects import (RESUMABLE, affected_stages, backfilled, changes,
                                     describe_changes, feeds, recipe_of, stage_kind)
from selfplay.config.loading import (coerce, format_help, load_config, parse_mixture,
                                     parse_overrides)
from selfplay.config.schema import (ALIASES, FIELDS, GROUP_OF, GROUPS, Config, ConvertSettings,
                                    DataSettings, EvaluationSettings, GenerationSettings,
                                    JobSettings, LoraSettings, ModelSettings, RankSettings,
                                    RunSettings, ScoringSettings, TrainingSettings, fields_for)
from selfplay.config.training import METHOD_DEFAULTS, RANKED_METHODS, RUN_METHOD_DEFAULTS

__all__ = ["ALIASES", "FIELDS", "GROUPS", "GROUP_OF", "METHOD_DEFAULTS", "RANKED_METHODS",
           "RESUMABLE", "RUN_METHOD_DEFAULTS", "Config", "ConvertSettings", "DataSettings",
           "EvaluationSettings", "GenerationSettings", "JobSettings", "LoraSettings",
           "ModelSettings", "RankSettings", "RunSettings", "ScoringSettings", "TrainingSettings",
           "affected_stages", "backfilled", "changes", "coerce", "describe_changes", "feeds",
           "fields_for", "format_help", "load_config", "parse_mixture", "parse_overrides",
           "recipe_of", "stage_kind"]
