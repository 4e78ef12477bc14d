"""The Hugging Face backend: batched ``generate`` with left padding, per-row seeds and stop strings, and the
RAIL read-out as one forward pass per batch.

Left padding keeps every row's last prompt token at the same position, which ``generate`` needs for batched
decoding; HF derives position ids from the attention mask. Static batches of ``batch_size`` rows: a batch runs
until its longest row ends (vLLM's continuous batching does not wait). Runs anywhere torch does, which is why
it stays the fallback and the backend of the GPU check machine (no vLLM wheel there).

A row may carry a :class:`~tract_dist.runtime.deadline.StopSignal` (a judge server's request deadline or
cancellation): :class:`RowStops` ends that row at the next decode step, the other rows of the batch go on, and a
batch whose rows have all stopped returns at once.

CoT-RAIL scores ``prompt + CoT + " So the overall score is"`` right after generating the CoT from ``prompt``: the
prompt's keys and values, which ``generate`` computed already, are kept per prompt (transformers' DynamicCache,
cut out of the batch) and the read-out runs only over the new tokens, as vLLM's prefix cache does. On a
Vicuna Bench prompt (~700 tokens) and a 40-token CoT that is one prefill instead of two per judgement.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from transformers import StoppingCriteria

from tract_dist.runtime.deadline import StopSignal, fired
from tract_dist.runtime.engine import EngineSpec, Generation
from tract_dist.runtime.sampling import PerRowSampler, SamplingParams

PREFIX_CACHE_BYTES = 1 << 30
"""Most key/value bytes kept for the read-out of the prompts of one ``generate`` call: a batch of Vicuna Bench
prompts on SmolLM2 in fp32 takes ~35 MB a prompt; a 7B model's 3000-token prompts ~400 MB each, where prompts
past the budget are simply re-read in full."""


class RowStops(StoppingCriteria):
    """A transformers stopping criterion (a ``StoppingCriteriaList`` member) that ends each row whose
    :class:`StopSignal` fired: generate marks the row finished and pads it, the batch ends when every row has.
    One clock read per decode step; a host-to-device copy of the flags only once a signal has fired (until then
    one all-False tensor made on the device is returned). ``fired_at[i]`` is the
    sequence length at which row i was first told to stop (its padding then starts there, which tells a row
    cut by its signal from one that had already ended, even where padding is the EOS token)."""

    def __init__(self, stops: list[StopSignal | None]):
        self.stops = stops
        self.fired_at: list[int | None] = [None] * len(stops)
        self._none: torch.Tensor | None = None  # all False, on the device: no copy while nothing has fired

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        now = time.monotonic()
        done = []
        for i, s in enumerate(self.stops):
            stop = s is not None and s.reason(now) is not None
            if stop and self.fired_at[i] is None:
                self.fired_at[i] = input_ids.shape[1]
            done.append(stop)
        if any(done):
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
        if self._none is None:
            self._none = torch.zeros(len(done), dtype=torch.bool, device=input_ids.device)
        return self._none


class HFEngine:
    """A transformers model + tokenizer behind the :class:`~tract_dist.runtime.engine.InferenceEngine` interface.

    ``batch_size`` rows go through one ``generate`` / forward call (None: all rows at once).
    """

    backend = "hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = sorted(eos)
        self._stop_cache: dict[tuple[str, ...], Any] = {}
        self._prefixes: dict[tuple[int, ...], Any] = {}  # prompt -> its keys/values from the last generate call
        self._prefix_bytes = 0
        # Set by a caller that reads out what it generates (the Judge); CoT generation alone keeps nothing.
        self.keep_prompt_cache = False

    def _stopping(self, stop: tuple[str, ...], row_stops: RowStops | None = None) -> Any:
        """Transformers' StopStringCriteria, built once per stop tuple (it pre-processes the whole vocabulary:
        seconds for a 50k vocabulary, so a server builds it at start-up), plus the rows' stop signals."""
        from transformers import StoppingCriteriaList

        criteria: list[Any] = []
        if stop:
            if stop not in self._stop_cache:
                from transformers import StopStringCriteria

                self._stop_cache[stop] = StopStringCriteria(self.tokenizer, list(stop))
            criteria.append(self._stop_cache[stop])
        if row_stops is not None:
            criteria.append(row_stops)
        return StoppingCriteriaList(criteria) if criteria else None

    def _chunks(self, n: int) -> list[slice]:
        step = self.batch_size or max(n, 1)
        return [slice(i, i + step) for i in range(0, n, step)]

    def generate(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams,
                 stops: list[StopSignal | None] | None = None) -> list[Generation]:
        """Generate one continuation per prompt; row i samples with ``seeds[i]`` only (ignored when greedy) and
        stops early when ``stops[i]`` fires (``finish_reason`` "deadline" or "cancelled"; a row whose signal has
        fired before its batch starts is not run at all)."""
        self._prefixes, self._prefix_bytes = {}, 0  # only the prompts of this call are read out next
        out: list[Generation | None] = [None] * len(prompts)
        for c in self._chunks(len(prompts)):
            rows = range(len(prompts))[c]
            live = []
            for i in rows:
                why = fired(stops, i)
                if why:
                    out[i] = Generation(text="", new_tokens=0, finish_reason=why)
                else:
                    live.append(i)
            if live:
                gens = self._generate_batch([prompts[i] for i in live], [seeds[i] for i in live], params,
                                            [stops[i] for i in live] if stops else None)
                for i, g in zip(live, gens):
                    out[i] = g
        return [g for g in out if g is not None]

    def score_probs(self, sequences: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """Float64 full-vocabulary softmax at the last position of each sequence, read at ``token_ids``.

        A sequence that extends a prompt of the last ``generate`` call is read from that prompt's cached keys and
        values (only its new tokens are computed); the others in batches of ``batch_size``."""
        return self._read_each(
            sequences, lambda kv, new, start: score_after_prefix(self.model, kv, new, start, token_ids),
            lambda seqs: score_token_probs(self.model, seqs, token_ids, pad_id=self.pad_id))

    def score_trie_probs(self, sequences: list[list[int]], nodes: list[list[int]],
                         token_ids: list[int]) -> list[list[list[float]]]:
        """Float64 probabilities of ``token_ids`` after each sequence extended by each trie node's tokens
        (``nodes[0] == []``, then each node after its parent, as ``ScoreTrie.nodes``): (S, N, K).

        One forward per batch computes every node of every sequence: the nodes' last tokens are appended after
        the sequence with a tree attention mask (each sees the sequence and its own ancestors) and the
        positions they would have in the extended sequence. A sequence that extends a prompt of the last
        ``generate`` call runs only its new tokens and the node tokens on that prompt's cached keys/values.
        Attention implementations that take no custom mask (flash-attention) read each node as its own
        sequence instead."""
        if len(nodes) == 1 or not _takes_custom_mask(self.model):
            flat = self.score_probs([s + n for s in sequences for n in nodes], token_ids)
            return [flat[i * len(nodes):(i + 1) * len(nodes)] for i in range(len(sequences))]
        return self._read_each(
            sequences, lambda kv, new, start: trie_after_prefix(self.model, kv, new, start, nodes, token_ids),
            lambda seqs: trie_token_probs(self.model, seqs, nodes, token_ids, pad_id=self.pad_id))

    def _read_each(self, sequences: list[list[int]], on_cached: Callable[[Any, list[int], int], Any],
                   on_batch: Callable[[list[list[int]]], list[Any]]) -> list[Any]:
        """One read-out per sequence: from the last ``generate`` call's cached prompt keys/values when the sequence
        extends one (``on_cached(cache, new_ids, start)``: only the new tokens are computed), the others in
        batches of ``batch_size`` (``on_batch``); then the cache's memory goes back."""
        results: list[Any] = [None] * len(sequences)
        rest: list[int] = []
        for i, seq in enumerate(sequences):
            cached = self._cached_prefix(seq)
            if cached is None:
                rest.append(i)
            else:
                results[i] = on_cached(cached[0], seq[cached[1]:], cached[1])
        for c in self._chunks(len(rest)):
            rows = rest[c]
            for i, out in zip(rows, on_batch([sequences[j] for j in rows])):
                results[i] = out
        self._prefixes, self._prefix_bytes = {}, 0
        return results

    def _cached_prefix(self, seq: list[int]) -> tuple[Any, int] | None:
        """(cache, length) of a kept prompt that ``seq`` extends by at least one token."""
        for prompt, cache in list(self._prefixes.items()):  # a copy: a server's other call may add to it
            n = len(prompt)
            if n < len(seq) and tuple(seq[:n]) == prompt:
                return cache, n
        return None

    def _keep_prefixes(self, prompts: list[list[int]], cache: Any, width: int) -> None:
        """Cut each row's prompt keys/values out of the left-padded batch cache (positions width-len .. width)."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return  # sliding-window, hybrid or quantised caches: read out in full
        for row, prompt in enumerate(prompts):
            key = tuple(prompt)
            if key in self._prefixes or not prompt:
                continue
            start = width - len(prompt)
            kv = [(layer.keys[row:row + 1, :, start:width].clone(), layer.values[row:row + 1, :, start:width].clone())
                  for layer in layers]
            size = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
            if self._prefix_bytes + size > PREFIX_CACHE_BYTES:
                return
            self._prefixes[key] = kv
            self._prefix_bytes += size

    def _prefill_rows(self, prompts: list[list[int]], width: int) -> Any:
        """On CPU, a batch of prompts of different lengths: the keys/values of every prompt but its last token,
        each computed alone and placed left-padded into one cache (``None``: let ``generate`` prefill the padded
        batch).

        Why: a padded batch's prefill passes sdpa an explicit mask, so its fused CPU kernel computes every
        (query, key) block, the masked upper half and the padding included; one prompt at a time needs no mask
        and the causal kernel skips that half. On one CPU thread, 4 Vicuna Bench prompts of 900-1,050 tokens on
        SmolLM2 in bf16: 8.0 s against 10.7-11.5 s (benchmarks/runtime/bench_row_prefill.py). On a GPU the padded
        batch keeps the device busy, so it stays. ``generate`` then runs the last prompt token of every row as
        one batched step (positions follow the attention mask, as the rows' own prefill did) and decodes as
        before; the padding slots of the cache are zeros under a zero mask."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        if self.device.type != "cpu" or len(prompts) < 2 or len({len(p) for p in prompts}) < 2 \
                or min(len(p) for p in prompts) < 2:
            return None
        rows = []
        for p in prompts:
            try:
                out = self.model(input_ids=torch.tensor([p[:-1]], device=self.device), use_cache=True,
                                 logits_to_keep=1)
            except TypeError:  # a model without logits_to_keep: the padded batch prefill
                return None
            layers = getattr(out.past_key_values, "layers", None)
            if not layers or any(type(layer) is not DynamicLayer for layer in layers):
                return None  # sliding-window, hybrid or quantised caches: the padded batch prefill
            rows.append([(layer.keys, layer.values) for layer in layers])
        merged = []
        for li in range(len(rows[0])):
            k0, v0 = rows[0][li]
            keys = k0.new_zeros((len(prompts), k0.shape[1], width - 1, k0.shape[3]))
            values = v0.new_zeros((len(prompts), v0.shape[1], width - 1, v0.shape[3]))
            for r, row in enumerate(rows):
                k, v = row[li]
                keys[r, :, width - 1 - k.shape[2]:] = k[0]
                values[r, :, width - 1 - v.shape[2]:] = v[0]
            merged.append((keys, values))
        return DynamicCache(ddp_cache_data=merged)

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams,
                        stops: list[StopSignal | None] | None = None) -> list[Generation]:
        from transformers import GenerationConfig, LogitsProcessorList

        if not prompts:
            return []
        ids, mask = left_pad(prompts, self.pad_id)
        width = ids.shape[1]
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False,
                                  repetition_penalty=params.repetition_penalty, pad_token_id=self.pad_id,
                                  eos_token_id=self.eos_ids or None, num_beams=1)
        processors = LogitsProcessorList()
        if not params.greedy:
            processors.append(PerRowSampler(seeds, params.temperature, params.top_p, self.device))
        row_stops = RowStops(stops) if stops and any(s is not None for s in stops) else None
        extra = {}
        prefilled = self._prefill_rows(prompts, width)
        if prefilled is not None:
            extra["past_key_values"] = prefilled
        gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=config, logits_processor=processors,
                                  stopping_criteria=self._stopping(params.stop, row_stops),
                                  return_dict_in_generate=True, **extra)
        out = gen.sequences
        if self.keep_prompt_cache and getattr(gen, "past_key_values", None) is not None:
            self._keep_prefixes(prompts, gen.past_key_values, width)
        results = []
        eos = set(self.eos_ids)
        for k, row in enumerate(out[:, width:].tolist()):
            n, reason = len(row), "length"
            for j, t in enumerate(row):  # finished rows are padded; EOS counts as generated, padding does not
                if t in eos or t == self.pad_id:
                    n, reason = (j + 1, "eos") if t in eos else (j, "stop")
                    break
            cut = row_stops.fired_at[k] if row_stops is not None else None
            if cut is not None and _end_index(row, eos, self.pad_id) >= cut - width:  # padded from where it was told
                n, reason = cut - width, fired(stops, k) or "cancelled"
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            if params.stop and any(s in text for s in params.stop):
                reason = "stop"
            results.append(Generation(text=text, new_tokens=n, finish_reason=reason))
        return results


def _end_index(row: list[int], eos: set[int], pad_id: int) -> int:
    """Index of a generated row's first EOS or padding token (its length when it has none)."""
    return next((j for j, t in enumerate(row) if t in eos or t == pad_id), len(row))


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), both (len(sequences), longest) long, with every sequence right-aligned.

    Left padding puts each row's last token in the final column: batched ``generate`` appends there, and the
    RAIL read-out takes that column's logits for every row at once. The mask is 0 on padding, 1 on tokens."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def score_token_probs(model: torch.nn.Module, sequences: list[list[int]], token_ids: list[int], *,
                      pad_id: int) -> list[list[float]]:
    """One forward pass over ``sequences``; the float64 softmax after each one's last token, at ``token_ids``.

    Sequences are left-padded with explicit position ids so every row's last token sits at the final column and
    only that column's logits are computed (``logits_to_keep=1``): a batch never materialises L x vocab logits.
    """
    if not sequences:
        return []
    device = next(model.parameters()).device
    ids, mask = left_pad(sequences, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=1, use_cache=False).logits[:, -1, :]
    probs = torch.softmax(logits.to(torch.float64), dim=-1)[:, torch.tensor(token_ids, device=device)]
    return probs.cpu().tolist()


@torch.no_grad()
def score_after_prefix(model: torch.nn.Module, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], suffix: list[int],
                       prefix_len: int, token_ids: list[int]) -> list[float]:
    """:func:`score_token_probs` of ``prefix + suffix`` for one sequence whose prefix keys/values are known
    (``prefix_kv``: per layer (1, heads, prefix_len, dim), computed at positions 0 .. prefix_len - 1): one forward
    over the suffix at positions prefix_len .., the float64 softmax after its last token, at ``token_ids``."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(ddp_cache_data=prefix_kv)  # filled by concatenation: prefix_kv itself is never changed
    n = len(suffix)
    ids = torch.tensor([suffix], dtype=torch.long, device=device)
    positions = torch.arange(prefix_len, prefix_len + n, device=device).unsqueeze(0)
    mask = torch.ones((1, prefix_len + n), dtype=torch.long, device=device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   logits_to_keep=1, use_cache=True).logits[:, -1, :]
    probs = torch.softmax(logits.to(torch.float64), dim=-1)[:, torch.tensor(token_ids, device=device)]
    return probs[0].cpu().tolist()


def _takes_custom_mask(model: torch.nn.Module) -> bool:
    """Whether the model's attention takes a custom 4D additive mask (sdpa, eager and the project's CPU
    attention do; flash-attention's kernels take none)."""
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return "flash" not in impl and "flex" not in impl and "paged" not in impl


def tree_suffix(nodes: list[list[int]]) -> tuple[list[int], list[int], torch.Tensor]:
    """(tokens, depths, ancestor mask (E, E) bool) of the non-root trie nodes appended after a sequence: node
    n >= 1 contributes its last token at depth len(node) after the score position and sees the tokens of its
    ancestors (and itself) among the appended ones."""
    extra = nodes[1:]
    tokens = [n[-1] for n in extra]
    depths = [len(n) for n in extra]
    sees = torch.tensor([[len(a) <= len(b) and b[:len(a)] == a for a in extra] for b in extra], dtype=torch.bool)
    return tokens, depths, sees.reshape(len(extra), len(extra))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attend-mask as the additive float mask every attention implementation with masks accepts."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def _trie_rows(logits: torch.Tensor, token_ids: list[int]) -> list[list[list[float]]]:
    probs = torch.softmax(logits.to(torch.float64), dim=-1)[..., torch.tensor(token_ids, device=logits.device)]
    return probs.cpu().tolist()


@torch.no_grad()
def trie_token_probs(model: torch.nn.Module, sequences: list[list[int]], nodes: list[list[int]],
                     token_ids: list[int], *, pad_id: int) -> list[list[list[float]]]:
    """:func:`score_token_probs` at every trie node of every sequence in one forward: each row is left-padded
    ``sequence + node tokens`` with a tree mask, and only the last N columns' logits are computed."""
    if not sequences:
        return []
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokens, depths, sees = tree_suffix(nodes)
    n_extra = len(tokens)
    width = max(len(s) for s in sequences) + n_extra
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(sequences), width), dtype=torch.long)
    allow = torch.eye(width, dtype=torch.bool).repeat(len(sequences), 1, 1)  # padding sees itself (no NaN rows)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for b, s in enumerate(sequences):
        start, end = width - n_extra - len(s), width - n_extra
        ids[b, start:end] = torch.tensor(s, dtype=torch.long)
        ids[b, end:] = torch.tensor(tokens, dtype=torch.long)
        positions[b, start:end] = torch.arange(len(s))
        positions[b, end:] = len(s) - 1 + torch.tensor(depths)
        allow[b, start:end, start:end] = causal[:len(s), :len(s)]
        allow[b, end:, start:end] = True
        allow[b, end:, end:] = sees
    mask = _additive(allow[:, None], dtype).to(device)
    logits = model(input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device),
                   logits_to_keep=n_extra + 1, use_cache=False).logits
    return _trie_rows(logits, token_ids)


@torch.no_grad()
def trie_after_prefix(model: torch.nn.Module, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], suffix: list[int],
                      prefix_len: int, nodes: list[list[int]], token_ids: list[int]) -> list[list[float]]:
    """:func:`trie_token_probs` of one ``prefix + suffix`` whose prefix keys/values are known (as
    :func:`score_after_prefix`): one forward over the suffix and the node tokens."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokens, depths, sees = tree_suffix(nodes)
    n, n_extra = len(suffix), len(tokens)
    q = n + n_extra
    allow = torch.zeros((q, prefix_len + q), dtype=torch.bool)
    allow[:, :prefix_len] = True
    allow[:n, prefix_len:prefix_len + n] = torch.ones((n, n), dtype=torch.bool).tril()
    allow[n:, prefix_len:prefix_len + n] = True
    allow[n:, prefix_len + n:] = sees
    end = prefix_len + n
    positions = torch.cat([torch.arange(prefix_len, end), end - 1 + torch.tensor(depths, dtype=torch.long)])
    cache = DynamicCache(ddp_cache_data=prefix_kv)
    logits = model(input_ids=torch.tensor([suffix + tokens], dtype=torch.long, device=device),
                   attention_mask=_additive(allow[None, None], dtype).to(device),
                   position_ids=positions[None].to(device), past_key_values=cache, logits_to_keep=n_extra + 1,
                   use_cache=True).logits
    return _trie_rows(logits, token_ids)[0]


def build_hf_engine(spec: EngineSpec) -> HFEngine:
    """Load model + tokenizer with the project's loader (same dtype/attention rules as training).

    A PEFT adapter folder is loaded on its base model and kept unmerged (``PeftModel``): the weights the LoRA
    stage 1 trained, without a merged export.
    """
    from tract_dist.models.loading import load_causal_lm, load_tokenizer_for, materialize_alias
    from tract_dist.runtime.adapters import adapter_base

    if spec.torch_threads and not torch.cuda.is_available():
        torch.set_num_threads(spec.torch_threads)
    base = adapter_base(spec.model_path)
    model = load_causal_lm(base or spec.model_path, dtype=spec.dtype, device=spec.device,
                           attn_implementation=spec.attn_implementation, trust_remote_code=spec.trust_remote_code)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.model_path, is_trainable=False)
    tok = load_tokenizer_for(materialize_alias(base or spec.model_path), spec.tokenizer, spec.trust_remote_code)
    return HFEngine(model, tok, batch_size=spec.batch_size)
