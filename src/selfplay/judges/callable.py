"""A user's own judge: `module:function`, called as function(prompt_messages, responses, extra)
and returning a K×K preference matrix (checked)."""

from __future__ import annotations

import importlib
from typing import Sequence

from selfplay.errors import SelfplayError
from selfplay.judges.preferences import Matrix, check_matrix


class CallableJudge:
    def __init__(self, spec: str):
        mod, _, fn = spec.partition(":")
        try:
            self.fn = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError, ValueError):
            raise SelfplayError(f"--judge {spec!r}: no function {fn!r} in module {mod!r}; "
                                "write it as module:function.") from None
        self.name = spec

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix:
        return check_matrix(self.fn(prompt, list(responses), extra), len(responses), self.name)
