"""A user's own judge: `module:function`, called as function(prompt_messages, responses, extra)
and returning a K×K preference matrix (checked).

The module is imported as Python imports any module, with the current directory searched
too (where a user keeps a judge next to the data). What goes wrong in the user's code, at
import or at a call, is shown with the user's own traceback, framed by a sentence that says
which judge and where.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path
from typing import Sequence

from selfplay.errors import SelfplayError, UserCodeError
from selfplay.judges.preferences import Matrix, check_matrix


def _user_traceback(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip()


def _import(mod: str, spec: str):
    """The judge's module, from the import path or the current directory."""
    here = str(Path.cwd())
    local = (Path(here) / f"{mod.split('.')[0]}.py").is_file() or \
        (Path(here) / mod.split(".")[0] / "__init__.py").is_file()
    if local and here not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and (mod == e.name or mod.startswith(e.name + ".")):
            raise SelfplayError(
                f"--judge {spec!r}: there is no module {mod!r} to import (not installed, not on "
                f"PYTHONPATH, and no {mod.split('.')[0]}.py in the current directory "
                f"{here}).") from None
        raise UserCodeError(f"--judge {spec!r}: importing module {mod!r} failed: it imports "
                            f"{e.name!r}, which is not installed (its traceback is above).",
                            _user_traceback(e)) from None
    except Exception as e:  # noqa: BLE001 - a user's module can fail in any way
        raise UserCodeError(f"--judge {spec!r}: importing module {mod!r} failed with "
                            f"{type(e).__name__} (its traceback is above).",
                            _user_traceback(e)) from None


class CallableJudge:
    def __init__(self, spec: str):
        mod, _, fn = spec.partition(":")
        if not mod or not fn:
            raise SelfplayError(f"--judge {spec!r}: write a judge of your own as "
                                "module:function.")
        module = _import(mod, spec)
        self.fn = getattr(module, fn, None)
        if not callable(self.fn):
            where = f" ({module.__file__})" if getattr(module, "__file__", None) else ""
            raise SelfplayError(f"--judge {spec!r}: module {mod!r}{where} has no function "
                                f"{fn!r}.")
        self.name = spec

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix:
        k = len(responses)
        try:
            out = self.fn(prompt, list(responses), extra)
        except Exception as e:  # noqa: BLE001 - the user's code, shown as it failed
            raise UserCodeError(f"--judge {self.name} raised {type(e).__name__} judging a "
                                f"prompt's {k} responses (its traceback is above).",
                                _user_traceback(e)) from None
        if out is None:
            raise SelfplayError(f"--judge {self.name} returned None for a prompt's {k} "
                                f"responses; it must return a {k}x{k} matrix of preference "
                                "probabilities (P[i][j] = P(response i beats j)).")
        try:
            return check_matrix(out, k, self.name)
        except (TypeError, ValueError):
            raise SelfplayError(f"--judge {self.name} returned {type(out).__name__}, not a "
                                f"{k}x{k} matrix of numbers.") from None
