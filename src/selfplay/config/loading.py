"""Loading a config: defaults, then a YAML recipe, then `--key value` overrides, each value
coerced to its field's type; and the grouped `--help` text. Loading is fail-fast: an unknown
key names the nearest valid one, a bad value names the option and what it accepts, and a key
that does not apply to the command is refused before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from selfplay.config.schema import ALIASES, FIELDS, GROUPS, HINTS, Config, fields_for
from selfplay.config.training import METHOD_DEFAULTS, RUN_METHOD_DEFAULTS
from selfplay.errors import SelfplayError


class _GivenTwice(Exception):
    def __str__(self) -> str:
        return repr(self.args[0])


class _OnceLoader(yaml.SafeLoader):
    """YAML's safe loader, but a mapping that gives a key twice is an error: plain YAML
    keeps the last silently, as no command line would."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):   # YAML's own error follows
                continue
            if key in seen:
                raise _GivenTwice(key, seen[key] + 1, key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _canonical(key: str, command: str | None = None) -> str:
    """The field a key names; an alias shared by two fields resolves by the command."""
    key = key.strip().lstrip("-").replace("-", "_")
    targets = ALIASES.get(key)
    if not targets or (key in FIELDS and (command is None
                                          or command in FIELDS[key].metadata["commands"])):
        return key
    return next((t for t in targets if command in FIELDS[t].metadata["commands"]), targets[0])


def _type_name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list of mappings"}.get(tp, str(tp))


def coerce(name: str, value: Any, source: str = "") -> Any:
    """Turn a YAML or command-line value into the field's type, or say what the option takes."""
    f = FIELDS[name]
    tp = HINTS[name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    where = f" in {source}" if source else ""
    takes = f"one of: {', '.join(map(str, f.metadata['choices']))}" if f.metadata["choices"] \
        else _type_name(tp)
    bad = SelfplayError(f"option --{name}{where} got {value!r}, but it takes {takes}.")
    if tp is list:                   # `iterations`: per-iteration overrides, each key checked
        out = _coerce_overrides(name, value, source, bad)
    else:
        out = _coerce_scalar(tp, value, bad)
        if tp is float and not math.isfinite(out):
            raise SelfplayError(f"option --{name}{where} got {value!r}, but it takes a finite "
                                "number.")
    choices = f.metadata["choices"]
    if choices and out not in choices:
        raise bad
    return out


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _coerce_scalar(tp: type, value: Any, bad: SelfplayError) -> Any:
    """A bool, int, float or str from YAML or the command line; `bad` when it is none."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp in (int, float) and isinstance(value, bool):
        raise bad
    if tp is int:
        try:
            out = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            out = None
        if out is None:
            raise bad
        return out
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if isinstance(value, (dict, list)):      # str
        raise bad
    return str(value)


def _coerce_overrides(name: str, value: Any, source: str, bad: SelfplayError) -> list[dict]:
    """A list of per-iteration mappings, each key a known option with a valid value."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise bad from None
    if not isinstance(value, list) or not all(isinstance(v, dict) or v is None for v in value):
        raise bad
    out = []
    for t, over in enumerate(value):
        where = f"{source or 'the recipe'} `{name}` entry {t}"
        entry = {}
        for k, v in (over or {}).items():
            key = _canonical(str(k))
            if key not in FIELDS or key == name:
                raise _unknown(key, list(FIELDS), where, None)
            entry[key] = coerce(key, v, where)
        out.append(entry)
    return out


def _unknown(key: str, valid: list[str], source: str, command: str | None) -> SelfplayError:
    where = f" in {source}" if source else ""
    everything = list(FIELDS) + list(ALIASES)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6) or \
        difflib.get_close_matches(key, everything, n=1, cutoff=0.6)
    if key in FIELDS and command:
        return SelfplayError(f"option --{key}{where} does not apply to `selfplay {command}`; "
                             f"`selfplay {command} --help` lists the options it takes.")
    hint = f"; did you mean --{near[0]}?" if near else \
        f"; `selfplay {command or ''} --help` lists the valid options."
    return SelfplayError(f"unknown option --{key}{where}{hint}")


def parse_overrides(args: list[str], command: str | None = None) -> list[tuple[str, str]]:
    """`--key value`, `--key=value` and bare `--flag` (true), in order."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or tok == "--":
            raise SelfplayError(f"unexpected argument {tok!r}: options are written --key value "
                                "or --key=value.")
        if "=" in tok:
            k, v = tok[2:].split("=", 1)
            i += 1
        else:
            k = tok[2:]
            nxt = args[i + 1] if i + 1 < len(args) else None
            name = _canonical(k, command)
            is_bool = name in FIELDS and HINTS[name] is bool
            if nxt is None or (nxt.startswith("--") and not _looks_negative_number(nxt)):
                if not is_bool and name in FIELDS:
                    raise SelfplayError(f"option --{name} needs a value.")
                v = "true"
                i += 1
            elif is_bool and nxt.lower() not in ("true", "false", "1", "0", "yes", "no", "on",
                                                 "off"):
                v = "true"
                i += 1
            else:
                v = nxt
                i += 2
        out.append((k, v))
    return out


def _looks_negative_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_config(command: str, recipe: str | Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """Defaults, then the recipe's keys, then the command line; validated before returning."""
    valid = [f.name for f in fields_for(command)]
    valid_set = set(valid)
    values: dict[str, Any] = {f.name: f.metadata["command_defaults"][command]
                              for f in FIELDS.values() if command in f.metadata["command_defaults"]}
    explicit_keys: set[str] = set()     # set by the recipe or the command line
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise SelfplayError(f"recipe {path} does not exist.")
        try:
            data = yaml.load(path.read_text(), Loader=_OnceLoader) or {}
        except yaml.YAMLError as e:
            raise SelfplayError(f"recipe {path} is not valid YAML: {e}") from None
        except _GivenTwice as e:
            raise SelfplayError(f"recipe {path} gives {e} twice (lines {e.args[1]} and "
                                f"{e.args[2]}); give it once.") from None
        if not isinstance(data, dict):
            raise SelfplayError(f"recipe {path} must be a mapping of option: value.")
        for key, value in data.items():
            name = _canonical(str(key), command)
            if name not in FIELDS:
                raise _unknown(name, valid, str(path), None)
            # A recipe may hold keys of other commands (one recipe for a whole run).
            values[name] = coerce(name, value, str(path))
            explicit_keys.add(name)
    given: dict[str, str] = {}
    for key, value in parse_overrides(overrides or [], command):
        name = _canonical(key, command)
        if name not in valid_set:
            raise _unknown(name, valid, "", command)
        if name in given:
            raise SelfplayError(f"option --{name} is given twice ({given[name]!r} and {value!r}) "
                                "on the command line; give it once.")
        given[name] = value
        values[name] = coerce(name, value)
        explicit_keys.add(name)
    method = values.get("method", "")
    for k, v in {**METHOD_DEFAULTS.get(method, {}),
                 **(RUN_METHOD_DEFAULTS.get(method, {}) if command == "run" else {})}.items():
        if k not in explicit_keys:
            values[k] = v
    cfg = Config.from_flat(values)
    cfg.validate()
    return cfg


# The group a command is about comes first in its help: what its user reaches for most.
OWN_GROUP = {"run": "run", "train": "training", "sft": "training", "generate": "generation",
             "score": "scoring", "rank": "rank", "convert": "convert",
             "evaluate": "evaluation"}


def format_help(command: str) -> str:
    """The options `command` reads, under their groups' headings, its own group first."""
    lines = []
    first = OWN_GROUP.get(command)
    for group, klass, heading in sorted(GROUPS, key=lambda g: g[0] != first):
        fields = [f for f in dataclasses.fields(klass) if command in f.metadata["commands"]]
        if not fields:
            continue
        lines += ["", f"{heading}:"]
        for f in fields:
            names = ", ".join([f"--{f.name}"] + [f"--{a}" for a in f.metadata["aliases"]
                                                  if _canonical(a, command) == f.name])
            default = f.metadata["command_defaults"].get(
                command, f.default if f.default is not dataclasses.MISSING else f.default_factory())
            lines.append(f"  {names}  ({_type_name(HINTS[f.name])}, default: {default!r})")
            text = f.metadata["help"]
            if f.metadata["choices"]:
                text += f" Choices: {', '.join(map(str, f.metadata['choices']))}."
            lines.extend("      " + ln for ln in textwrap.wrap(text, 86) or [""])
    return "\n".join(lines[1:])


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """`a` or `a:1.0,b:0.5` from the command line: datasets and the share of each used (the
    paper trains iteration t on iteration t-1's and t's pairs)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path, _, frac = part.rpartition(":")
        try:
            f = float(frac)
        except ValueError:
            path, f = part, 1.0
        if not 0 < f <= 1:
            raise SelfplayError(f"--dataset {part!r}: the mixing fraction must lie in (0, 1].")
        out.append((path, f))
    return out
