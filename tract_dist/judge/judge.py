"""``Judge``: CoT-RAIL inference (the paper's method) and its two baselines on one model, on either backend.

- ``cot_rail``: n CoTs (greedy when n = 1 unless ``sample_single_cot``, sampled otherwise), then for each one forward pass over
  ``<prompt><CoT> So the overall score is`` built with :func:`scale_prompt_ids` — the tokens training used —
  and ŷ = Σ_k v_k p_k read from the full-vocabulary softmax (Σ_v v·p(v) over the value trie when a value is
  several tokens, :mod:`tract_dist.judge.rail`); the CoTs' ŷ are averaged. ``n_cots="auto"``
  samples rounds of CoTs per input until the standard error of its mean ŷ reaches ``cot_se_target`` or
  ``max_cots`` (:mod:`tract_dist.judge.adaptive`).
- ``decode``: generate the whole answer (no stop strings) and parse the number after the score phrase or
  ``[RESULT]``; unparseable answers are counted, never guessed.
- ``rail``: RAIL without CoT: the prompt followed immediately by "So the overall score is".

``score_batch(..., stops=)`` takes one :class:`~tract_dist.runtime.deadline.StopSignal` per input (a server's
request deadline or cancellation): the engine stops that input's generation at its next step, and an input whose
signal has fired gets no read-out and the failure ``"deadline: ..."`` or ``"cancelled: ..."``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from tract_dist.data.encode import DroppedExample, EncodeOptions, fit_prompt
from tract_dist.data.prompts import ABS_SYSTEM_PROMPT
from tract_dist.data.schema import JudgeExample
from tract_dist.data.score_scale import ScoreScale, derive_score_scale, scale_prompt_ids, split_at_value
from tract_dist.data.score_tokens import ScoreTokens, parse_scale
from tract_dist.judge.adaptive import MIN_COTS, converged, next_count
from tract_dist.judge.parsing import parse_decoded_score
from tract_dist.judge.rail import RailReadout, scale_readouts
from tract_dist.protocol import SCORE_PHRASE, STOP_STRINGS
from tract_dist.runtime.deadline import StopSignal, fired
from tract_dist.runtime.engine import EngineSpec, Generation, InferenceEngine, VllmOptions, extract_cot
from tract_dist.runtime.sampling import SamplingParams, example_seed

if TYPE_CHECKING:
    from tract_dist.config import Config, DataSection, EvaluationSection, GenerationSection

Mode = Literal["cot_rail", "decode", "rail"]
NCots = int | Literal["auto"]
MODES: tuple[str, ...] = ("cot_rail", "decode", "rail")
_SUFFIX_RESERVE = 32  # tokens kept free after the CoT for " So the overall score is"


@dataclass
class JudgeResult:
    """One judgement. ``score`` is None only when it could not be produced (``failure`` says why)."""

    score: float | None
    cots: list[str] = field(default_factory=list)
    distribution: dict[int, float] = field(default_factory=dict)  # mean p(score token) over CoTs (RAIL modes)
    per_cot: list[float | None] = field(default_factory=list)  # ŷ (RAIL) or parsed score (decode) per CoT
    mode: str = "cot_rail"
    failure: str | None = None
    unparseable: int = 0  # decode: CoTs without a readable score
    empty_cots: int = 0  # cot_rail: CoTs that were empty (scored right after the prompt)
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["distribution"] = {str(k): v for k, v in self.distribution.items()}
        return d


def as_example(example_or_fields: JudgeExample | dict[str, Any], index: int = 0) -> JudgeExample:
    """Accept a JudgeExample or a dict of its fields (id and score optional: an unlabeled input)."""
    if isinstance(example_or_fields, JudgeExample):
        return example_or_fields
    d = dict(example_or_fields)
    missing = [k for k in ("instruction", "response", "criteria", "score_descriptions") if not d.get(k)]
    if missing:
        raise ValueError(f"judge input {index}: missing field(s) {', '.join(missing)}")
    d.setdefault("id", str(index))
    d["id"] = str(d["id"])
    if d.get("score") is None:
        d["score"] = math.nan
    return JudgeExample.from_dict(d)


class Judge:
    """A judge: an inference engine (HF or vLLM) with its score tokens, prompt options and sampling parameters.

    ``Judge(model, tokenizer)`` wraps a loaded transformers model (HF backend); ``Judge(engine=...)`` takes any
    :class:`~tract_dist.runtime.engine.InferenceEngine`; :meth:`from_pretrained` / :meth:`from_config` build one.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, engine: InferenceEngine | None = None,
                 scale: str | tuple[int, int] = "1-5", system_prompt: str | None = ABS_SYSTEM_PROMPT,
                 max_length: int = 3000, sampling: SamplingParams | None = None, seed: int = 0,
                 rail_normalize: bool = False, batch_size: int = 8, cot_se_target: float = 0.1,
                 max_cots: int = 8, sample_single_cot: bool = False, enable_thinking: bool = False):
        if engine is None:
            if model is None or tokenizer is None:
                raise ValueError("Judge needs a model and its tokenizer, or engine=")
            from tract_dist.runtime.hf_engine import HFEngine

            engine = HFEngine(model, tokenizer, batch_size=batch_size)
        self.engine = engine
        if hasattr(engine, "keep_prompt_cache"):  # HF: the read-out after a CoT reuses its prompt's keys/values
            engine.keep_prompt_cache = True
        self.model = getattr(engine, "model", None)  # the transformers model (HF backend only)
        self.tokenizer = tokenizer = engine.tokenizer
        self.scale = parse_scale(scale)
        # Every value's tokens after the score phrase; a multi-token scale (Mistral's "10") is read out through
        # its trie (judge.rail.scale_readouts). score_tokens: the single-token view, None for multi-token scales.
        self.score_scale: ScoreScale = derive_score_scale(tokenizer, self.scale)
        self.score_tokens: ScoreTokens | None = (self.score_scale.score_tokens() if self.score_scale.single_token
                                                 else None)
        self.opts = EncodeOptions(max_length=max_length, system_prompt=system_prompt, scale=self.scale,
                                  enable_thinking=enable_thinking)
        self.sampling = sampling or SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=512,
                                                   stop=STOP_STRINGS)
        self.seed = seed
        self.rail_normalize = rail_normalize
        self.batch_size = batch_size
        if not cot_se_target > 0 or max_cots < MIN_COTS:
            raise ValueError(f"cot_se_target must be > 0 and max_cots >= {MIN_COTS}, got {cot_se_target}, {max_cots}")
        self.cot_se_target = cot_se_target  # num_cots="auto": the standard error to reach
        self.max_cots = max_cots
        self.sample_single_cot = sample_single_cot  # the official inference samples its one CoT (temperature 1.0)
        # "So the overall score is" straight after the prompt (RAIL without CoT), ending where the score is read.
        self._bare_suffix = split_at_value(tokenizer, f"{SCORE_PHRASE} {self.scale[0]}", self.score_scale,
                                           self.scale[0])

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, tokenizer: str | None = None, dtype: str = "auto",
                        device: str | None = None, attn_implementation: str | None = None,
                        trust_remote_code: bool = False, backend: str = "hf", tensor_parallel_size: int = 1,
                        vllm: VllmOptions | None = None, **kwargs: Any) -> "Judge":
        """Load a judge from an HF folder (e.g. a TRACT export), a LoRA adapter folder (served unmerged), a hub
        name or an offline alias (``smollm2``) on ``backend`` (hf or vllm)."""
        from tract_dist.models.loading import materialize_alias
        from tract_dist.runtime.backend import build_engine

        spec = EngineSpec(backend=backend, model_path=materialize_alias(name_or_path), tokenizer=tokenizer,
                          dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                          tensor_parallel_size=tensor_parallel_size, batch_size=kwargs.get("batch_size", 8),
                          device=device, vllm=vllm or VllmOptions())
        return cls(engine=build_engine(spec), **kwargs)

    @classmethod
    def from_config(cls, cfg: Config, model_path: str | None = None, device: str | None = None) -> "Judge":
        """A judge with the config's model options, ``evaluation.backend``, prompt layout, sampling and
        evaluation settings; ŷ is read as ``evaluation.rail_normalize`` says, unset: as the export at
        ``model_path`` (default ``model.name_or_path``) records its training read it (resolved once, here)."""
        from dataclasses import replace as dc_replace

        from tract_dist.export_record import resolve_rail_normalize
        from tract_dist.models.loading import materialize_alias
        from tract_dist.runtime.backend import build_engine, choose_backend, engine_spec

        e = cfg.evaluation
        choice = choose_backend(e, "evaluation", use_gpu=cfg.cluster.use_gpu)
        spec = engine_spec(cfg.model, cfg.generation.vllm, materialize_alias(model_path or cfg.model.name_or_path),
                           choice.backend, tensor_parallel_size=e.tensor_parallel_size, batch_size=e.batch_size)
        rail = resolve_rail_normalize(e.rail_normalize, model_path or cfg.model.name_or_path)
        return cls(engine=build_engine(dc_replace(spec, device=device)),
                   **judge_kwargs(cfg.data, cfg.generation, e, rail_normalize=rail))

    # -- prompts ---------------------------------------------------------------------------------------
    def _prompt(self, ex: JudgeExample, reserve: int) -> tuple[list[int], bool]:
        budget = max(self.opts.max_length - reserve, 64)
        return fit_prompt(self.tokenizer, ex, budget, self.opts)

    def score_sequence(self, prompt: list[int], cot: str | None) -> list[int]:
        """The ids whose last position predicts the score: prompt + CoT + " So the overall score is"."""
        if cot:
            return prompt + scale_prompt_ids(self.tokenizer, cot, self.score_scale)
        return prompt + self._bare_suffix

    # -- generation ------------------------------------------------------------------------------------
    def _generate(self, jobs: list[tuple[str, int, list[int]]], params: SamplingParams,
                  stops: list[StopSignal | None] | None = None) -> list[Generation]:
        """Generations for (example id, CoT index, prompt ids) jobs; each samples with its own id-derived seed.

        All jobs go to the engine at once: HF batches them by ``batch_size``, vLLM schedules them continuously
        (and the n CoTs of one prompt share its cached prefix). ``stops`` (one per job) is passed only when a
        job has one, so engines without stop signals keep working."""
        prompts = [p for _, _, p in jobs]
        seeds = [example_seed(self.seed, ex_id, j) for ex_id, j, _ in jobs]
        if stops and any(s is not None for s in stops):
            return self.engine.generate(prompts, seeds, params, stops=stops)
        return self.engine.generate(prompts, seeds, params)

    def _params(self, n_cots: int, decode: bool) -> SamplingParams:
        p = self.sampling
        if n_cots == 1 and not self.sample_single_cot:
            p = replace(p, temperature=0.0)
        return replace(p, stop=()) if decode else p

    # -- public API ------------------------------------------------------------------------------------
    def score(self, example_or_fields: JudgeExample | dict[str, Any], n_cots: NCots = 1,
              mode: Mode = "cot_rail") -> JudgeResult:
        """Judge one input (a JudgeExample or a dict of its fields)."""
        return self.score_batch([example_or_fields], n_cots=n_cots, mode=mode)[0]

    def score_batch(self, examples: list[JudgeExample | dict[str, Any]], n_cots: NCots = 1,
                    mode: Mode = "cot_rail", stops: list[StopSignal | None] | None = None) -> list[JudgeResult]:
        """Judge many inputs, batching generation and scoring passes; one result per input, in order.
        ``stops[i]`` (optional) ends input i's work early: see the module docstring. ``n_cots="auto"``
        (cot_rail only) adapts the count per input (:mod:`tract_dist.judge.adaptive`)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if n_cots == "auto":
            if mode == "decode":
                raise ValueError("n_cots='auto' needs a RAIL read-out per CoT (mode cot_rail), not decode")
        elif not isinstance(n_cots, int) or isinstance(n_cots, bool) or n_cots < 1:
            raise ValueError(f"n_cots must be an integer >= 1 or 'auto', got {n_cots!r}")
        exs = [as_example(e, i) for i, e in enumerate(examples)]
        results: list[JudgeResult] = [JudgeResult(score=None, mode=mode) for _ in exs]
        reserve = 0 if mode == "rail" else self.sampling.max_new_tokens + _SUFFIX_RESERVE
        prompts: dict[int, list[int]] = {}
        for i, ex in enumerate(exs):
            try:
                prompts[i], results[i].truncated = self._prompt(ex, reserve)
            except DroppedExample as e:
                results[i].failure = f"dropped: {e}"
        if mode == "rail":
            self._drop_stopped(results, prompts, stops, None)
            seqs = {i: p + self._bare_suffix for i, p in prompts.items()}
            self._read(results, {i: [s] for i, s in seqs.items()})
            return results
        if mode == "cot_rail":
            self._cot_rail(results, exs, prompts, n_cots, stops)
            return results
        assert n_cots != "auto"
        owners = [i for i in prompts for _ in range(n_cots)]
        jobs = [(exs[i].id, j, prompts[i]) for i in prompts for j in range(n_cots)]
        params = self._params(n_cots, decode=True)
        gens = self._generate(jobs, params, [stops[i] for i in owners] if stops else None)
        made: dict[int, int] = {}  # most new tokens of any of the input's CoTs (for a stop's failure message)
        for i, g in zip(owners, gens):
            made[i] = max(made.get(i, 0), g.new_tokens)
        self._drop_stopped(results, prompts, stops, {i: (n, params.max_new_tokens) for i, n in made.items()})
        by_example: dict[int, list[str]] = {}
        for i, g in zip(owners, gens):
            if i in prompts:
                by_example.setdefault(i, []).append(g.text)
        for i, outs in by_example.items():  # decode
            r = results[i]
            r.cots = outs
            parsed = [parse_decoded_score(t, self.scale) for t in outs]
            r.per_cot = [s for s, _ in parsed]
            r.unparseable = sum(s is None for s, _ in parsed)
            good = [s for s, _ in parsed if s is not None]
            r.score = sum(good) / len(good) if good else None
            r.failure = None if good else "unparseable: " + ",".join(sorted({w for _, w in parsed if w}))
        return results

    def _cot_rail(self, results: list[JudgeResult], exs: list[JudgeExample], prompts: dict[int, list[int]],
                  n_cots: NCots, stops: list[StopSignal | None] | None) -> None:
        """CoTs, then the RAIL read-out of each, averaged per input. A fixed count is one round (one generation
        call, one read-out call); ``auto`` repeats rounds for the inputs whose standard error is still above
        the target, each round drawing up to the count the estimate asks for (``adaptive.next_count``). An
        input whose stop signal fires leaves with its failure (``_drop_stopped``), its partial CoTs unscored."""
        adaptive = n_cots == "auto"
        params = self._params(MIN_COTS if adaptive else int(n_cots), decode=False)  # auto samples
        want = {i: next_count([], self.cot_se_target, self.max_cots) if adaptive else int(n_cots) for i in prompts}
        reads: dict[int, list[RailReadout]] = {i: [] for i in prompts}
        cots_of: dict[int, list[str]] = {i: [] for i in prompts}
        while want:
            jobs = [(i, j) for i, n in want.items() for j in range(len(reads[i]), n)]
            gens = self._generate([(exs[i].id, j, prompts[i]) for i, j in jobs], params,
                                  [stops[i] for i, _ in jobs] if stops else None)
            made: dict[int, int] = {}  # most new tokens of any of the input's CoTs (for a stop's failure message)
            for (i, _), g in zip(jobs, gens):
                made[i] = max(made.get(i, 0), g.new_tokens)
            self._drop_stopped(results, prompts, stops, {i: (n, params.max_new_tokens) for i, n in made.items()})
            live = [(i, extract_cot(g.text, self.sampling.stop)) for (i, _), g in zip(jobs, gens) if i in prompts]
            reads_now = scale_readouts(self.engine, [self.score_sequence(prompts[i], c) for i, c in live],
                                       self.score_scale, normalize=self.rail_normalize)
            for (i, cot), r in zip(live, reads_now):
                cots_of[i].append(cot)
                reads[i].append(r)
            if not adaptive:
                break
            want = {i: next_count([r.score for r in reads[i]], self.cot_se_target, self.max_cots) for i in want
                    if i in prompts and not converged([r.score for r in reads[i]], self.cot_se_target, self.max_cots)}
        for i, rs in reads.items():
            if i not in prompts or not rs:  # stopped: its failure says so, nothing is scored
                continue
            res = results[i]
            res.cots = cots_of[i]
            res.empty_cots = sum(not c for c in cots_of[i])
            res.per_cot = [r.score for r in rs]
            res.score = sum(res.per_cot) / len(rs)
            res.distribution = {k: sum(r.probs[n] for r in rs) / len(rs)
                                for n, k in enumerate(self.score_scale.scores)}

    @staticmethod
    def _drop_stopped(results: list[JudgeResult], prompts: dict[int, list[int]],
                      stops: list[StopSignal | None] | None, made: dict[int, tuple[int, int]] | None) -> None:
        """Inputs whose signal has fired leave ``prompts`` (no read-out: nobody waits for it) with a failure."""
        if not stops:
            return
        for i in list(prompts):
            why = fired(stops, i)
            if why:
                del prompts[i]
                n, budget = made.get(i, (0, 0)) if made is not None else (0, 0)
                results[i].failure = (f"{why}: stopped after {n} of {budget} new tokens" if made is not None
                                      else f"{why}: stopped before the read-out")

    def _read(self, results: list[JudgeResult], seqs_by: dict[int, list[list[int]]]) -> None:
        """Run the RAIL read-out over every sequence and average ŷ and p over each input's CoTs."""
        flat = [(i, s) for i, seqs in seqs_by.items() for s in seqs]
        reads = scale_readouts(self.engine, [s for _, s in flat], self.score_scale, normalize=self.rail_normalize)
        grouped: dict[int, list[Any]] = {}
        for (i, _), r in zip(flat, reads):
            grouped.setdefault(i, []).append(r)
        for i, rs in grouped.items():
            res = results[i]
            res.per_cot = [r.score for r in rs]
            res.score = sum(res.per_cot) / len(rs)
            res.distribution = {k: sum(r.probs[n] for r in rs) / len(rs)
                                for n, k in enumerate(self.score_scale.scores)}


def judge_kwargs(d: DataSection, g: GenerationSection, e: EvaluationSection, *,
                 rail_normalize: bool) -> dict[str, Any]:
    """Judge constructor options from the data, generation and evaluation sections; ``rail_normalize``: how ŷ
    is read, resolved once by the caller (``evaluation.rail_normalize``, or unset the export's record:
    :func:`tract_dist.export_record.resolve_rail_normalize`). The engine is built separately
    (:func:`tract_dist.runtime.backend.engine_spec`)."""
    from tract_dist.generate.spec import inference_max_length

    return {"scale": d.scale, "system_prompt": d.system_prompt, "max_length": inference_max_length(g, d),
            "sampling": SamplingParams.from_config(g), "seed": g.seed, "rail_normalize": rail_normalize,
            "batch_size": e.batch_size, "cot_se_target": e.cot_se_target, "max_cots": e.max_cots,
            "sample_single_cot": e.sample_single_cot, "enable_thinking": d.enable_thinking}
