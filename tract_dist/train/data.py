"""Training data for the worker: encode once in the driver, then a deterministic global sample order.

Encoding happens before any worker starts (so a file with zero valid records fails fast, in the driver) and
is saved with ``datasets.save_to_disk``; every rank then loads the same Arrow table. The order of samples is
a pure function of (seed, epoch), and the samples of optimizer step ``s`` are a pure function of ``s``, so
resuming at a step restores the exact data position (nothing skipped or repeated) and every rank knows the
global token counts of a step without communicating (:meth:`StepPlan.loss_denominators`, the one home of the
loss-normalisation rule :func:`loss_denominators`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tract_dist.data.encode import IGNORE_INDEX, EncodeOptions, encode_examples
from tract_dist.errors import TractError
from tract_dist.fsutil import atomic_write_json
from tract_dist.data.formats import ReadResult, read_examples
from tract_dist.data.score_scale import derive_score_scale
from tract_dist.data.score_tokens import ScoreTokens, derive_score_tokens, parse_scale

if TYPE_CHECKING:
    from tract_dist.config import Config


class EmptyDatasetError(TractError, ValueError):
    """No example survived reading and encoding; training cannot start."""


def prepare_dataset(cfg: Config, tokenizer: Any, out_dir: str | Path) -> dict[str, Any]:
    """Read, validate and encode ``cfg.data.train_path``; save it to ``out_dir``; return the summary.

    Raises EmptyDatasetError (naming the file and what happened to its records) when nothing is left.
    """
    import datasets

    d = cfg.data
    if not d.train_path:
        raise EmptyDatasetError("data.train_path is not set: point it at a training file (or hf:NAME)")
    scale = parse_scale(d.scale)
    if d.task == "relative":
        encoded, stats, full, st, read = _encode_pairs(cfg, tokenizer)
    else:
        full = derive_score_scale(tokenizer, scale)  # any scale; one token per value keeps the score-token form
        st = derive_score_tokens(tokenizer, scale) if full.single_token else full
        read = read_examples(d.train_path, d.train_format, scale=scale, skip_invalid=d.skip_invalid,
                             limit=d.max_examples, split=d.split, require_feedback=d.use_cot)
        opts = EncodeOptions(max_length=d.max_length, truncation=d.truncation, system_prompt=d.system_prompt,
                             scale=scale, use_cot=d.use_cot, enable_thinking=d.enable_thinking)
        encoded, stats = encode_examples(tokenizer, read.examples, st, opts)
    summary = {**read.summary(), **{f"encode_{k}": v for k, v in stats.as_dict().items()},
               "score_token_ids": st.token_ids if full.single_token else [], "scores": full.scores,
               "task": d.task}
    if not full.single_token:  # each value's tokens (the loss's score_sequences; load_score_sequences)
        summary["score_sequences"] = [list(q) for q in full.sequences]
    if not encoded:
        raise EmptyDatasetError(
            f"{d.train_path}: no trainable example: {read.records} records, {len(read.invalid)} invalid, "
            f"{stats.dropped} dropped as too long ({stats.drop_reasons}); raise data.max_length or fix the file")
    rows = [{**e.to_dict(), "n_ce": sum(1 for x in e.labels if x != IGNORE_INDEX), "length": len(e.input_ids)}
            for e in encoded]
    weighted = any(e.weight is not None for e in encoded)
    for r in rows:  # a weight column only for a weighted data set (its rows then all carry one; missing = 1)
        w = r.pop("weight", None)
        if weighted:
            r["weight"] = 1.0 if w is None else float(w)
    if weighted:
        ws = [r["weight"] for r in rows]
        summary["weights"] = {"min": min(ws), "max": max(ws), "mean": sum(ws) / len(ws)}
    out = Path(out_dir)
    datasets.Dataset.from_list(rows).save_to_disk(str(out / "encoded"))
    atomic_write_json(out / "data_summary.json", summary)
    return summary


def _encode_pairs(cfg: Config, tokenizer: Any) -> tuple[list[Any], Any, Any, ScoreTokens, Any]:
    """A relative-grading data set: pairs read (``data.pair_formats``) and encoded as ``{feedback} [RESULT] A|B``
    with the verdict position as the score position and y as the score (``data.relative.encode_pair``); the
    score tokens are the verdict tokens, values A = 1, B = 0 (the loss renormalises over them: p(A))."""
    from tract_dist.data.pair_formats import read_pairs
    from tract_dist.data.relative import derive_verdict_scale, encode_pair, relative_system_prompt

    d = cfg.data
    verdicts = derive_verdict_scale(tokenizer)
    pairs, invalid = read_pairs(d.train_path, d.train_format, skip_invalid=d.skip_invalid, limit=d.max_examples,
                                split=d.split, require_feedback=d.use_cot)
    opts = EncodeOptions(max_length=d.max_length, truncation=d.truncation,
                         system_prompt=relative_system_prompt(d.system_prompt), use_cot=d.use_cot,
                         enable_thinking=d.enable_thinking)
    encoded, stats = encode_examples(tokenizer, pairs, verdicts, opts, encode=encode_pair)

    st = ScoreTokens(scores=list(verdicts.scores), token_ids=[q[0] for q in verdicts.sequences])
    read = ReadResult(path=d.train_path, format=d.train_format, records=len(pairs) + len(invalid), examples=pairs,
                      invalid=invalid)
    return encoded, stats, verdicts, st, read


def load_encoded(out_dir: str | Path) -> Any:
    import datasets

    return datasets.load_from_disk(str(Path(out_dir) / "encoded"))


def encoded_lengths(data: Any) -> list[int]:
    """Token count of every encoded sample (the ``length`` column; counted from ``input_ids`` for data prepared
    before the column existed)."""
    if "length" in data.column_names:
        return [int(x) for x in data["length"]]
    return [len(x) for x in data["input_ids"]]


def load_score_tokens(out_dir: str | Path) -> ScoreTokens:
    s = json.loads((Path(out_dir) / "data_summary.json").read_text())
    return ScoreTokens(scores=s["scores"], token_ids=s["score_token_ids"])


def load_score_sequences(out_dir: str | Path) -> list[list[int]] | None:
    """Each score value's tokens when the prepared data use a multi-token scale, else None."""
    s = json.loads((Path(out_dir) / "data_summary.json").read_text())
    return s.get("score_sequences")


def tree_batch(rows: list[dict[str, Any]], length: int, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Position ids, a (B, 1, T, T) boolean attention mask and ``score_branch_positions`` (B, E) for rows of a
    multi-token scale (``data.encode``): every token attends causally to the real tokens before it, except the
    appended trie-node tokens, which attend to the sequence up to the score position and to their own ancestors,
    at the positions they would have after the score phrase (score position + depth). Padding attends to
    itself only (no empty softmax rows)."""
    n = len(rows)
    positions = torch.arange(length).repeat(n, 1)
    allow = torch.eye(length, dtype=torch.bool).repeat(n, 1, 1)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    branch = []
    for i, r in enumerate(rows):
        t = int(mask[i].sum())
        allow[i, :t, :t] = causal[:t, :t]
        pos, parents = list(r["branch_positions"]), list(r["branch_parents"])
        root = int(r["score_position"])
        depth: list[int] = []
        for j, (p, parent) in enumerate(zip(pos, parents)):
            allow[i, p, :] = False
            allow[i, p, :root + 1] = True
            allow[i, p, p] = True
            a = parent
            while a >= 0:  # its ancestors among the node tokens
                allow[i, p, pos[a]] = True
                a = parents[a]
            depth.append(1 if parent < 0 else depth[parent] + 1)
            positions[i, p] = root + depth[j]
        branch.append(pos)
    if len({len(b) for b in branch}) != 1:
        raise ValueError("rows of one batch have different numbers of trie-node tokens (mixed scales)")
    return {"position_ids": positions, "attention_mask": allow[:, None],
            "score_branch_positions": torch.tensor(branch, dtype=torch.long)}


@dataclass(frozen=True)
class LossDenominators:
    """What the CoT-RAFT loss of one optimizer step is divided by (see :func:`loss_denominators`)."""

    ce: float  # CE targets of the whole global batch (every micro-batch of every rank)
    mse: float  # scored sequences of the whole global batch
    world_size: int

    def per_rank(self) -> dict[str, float]:
        """The forward's ``ce_denominator`` / ``mse_denominator`` on each rank: the global counts divided by
        the world size, because DeepSpeed averages (not sums) the gradients over data-parallel ranks."""
        return {"ce_denominator": self.ce / self.world_size, "mse_denominator": self.mse / self.world_size}


def loss_denominators(ce_tokens: int, sequences: int, *, ce_on_score_token: bool,
                      world_size: int) -> LossDenominators:
    """The loss-normalisation rule of a training step, in one place.

    tract-dist normalises over the *global* batch of an optimizer step: CE is the summed NLL divided by the
    number of CE targets in all micro-batches of all ranks (``ce_tokens``, the labelled CoT and EOS tokens,
    plus one per sequence when ``ce_on_score_token`` trains the score token with CE too), and the regression
    term is the summed squared error divided by the number of scored sequences (``sequences``). Any split
    into micro-batches, accumulation steps and ranks then gives exactly the gradient of one big batch (the
    tests compare with a single plain-PyTorch process). The official TRACT code normalises per device instead
    (CE by the device's label tokens, MSE by its batch size squared; /work/shared/FIDELITY.md): its MSE
    equals ours with ``lam = 1/B_device``, its CE differs under data parallelism.

    ``ce_tokens`` and ``sequences`` are counts of the whole step (the step plan knows them without
    communicating); :meth:`LossDenominators.per_rank` gives what each rank's forward is divided by."""
    if sequences <= 0:
        raise ValueError(f"a training step needs at least one sequence, got {sequences}")
    return LossDenominators(ce=float(ce_tokens + (sequences if ce_on_score_token else 0)), mse=float(sequences),
                            world_size=world_size)


@dataclass(frozen=True)
class StepPlan:
    """Which samples every optimizer step holds: a pure function of (seed, global batch, step).

    The global batch (samples per optimizer step, all workers together) is a property of the *run*, not of the
    number of workers: a run resumed on another number of workers keeps it, so every step holds the same samples
    and the learning-rate schedule keeps its length. How a step's samples are split over workers and
    micro-batches is :mod:`tract_dist.train.batching`'s business."""

    n_examples: int
    global_batch: int
    seed: int
    epochs: float
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.n_examples < 1:
            raise ValueError(f"a step plan needs examples and a global batch, got {self.n_examples} examples and a "
                             f"global batch of {self.global_batch}")

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_examples / self.global_batch))

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * self.steps_per_epoch))

    @property
    def padded_per_epoch(self) -> int:
        """Samples repeated to fill the last global batch of an epoch (as DistributedSampler pads)."""
        return self.steps_per_epoch * self.global_batch - self.n_examples

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_examples, generator=g)
        need = self.steps_per_epoch * self.global_batch
        if need > self.n_examples:  # wrap around to fill the last step
            order = torch.cat([order, order.repeat(math.ceil(need / self.n_examples))[: need - self.n_examples]])
        return order

    def step_indices(self, step: int) -> torch.Tensor:
        """Global sample indices of optimizer step ``step`` (0-based)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[i * self.global_batch:(i + 1) * self.global_batch]

    def loss_denominators(self, step: int, n_ce: Any, *, ce_on_score_token: bool,
                          world_size: int) -> LossDenominators:
        """The loss denominators of step ``step``: ``n_ce[i]`` is sample i's CE token count (the encoded
        column); every encoded sample has one score position, so the step's sequences are its samples."""
        idx = self.step_indices(step).tolist()
        return loss_denominators(sum(n_ce[i] for i in idx), len(idx), ce_on_score_token=ce_on_score_token,
                                 world_size=world_size)


def global_batch_size(training: Any, world_size: int) -> int:
    """Samples per optimizer step, all workers together: ``training.global_batch_size``, else
    micro_batch_size x gradient_accumulation_steps x workers (the run's first world size: a resumed run keeps the
    global batch its checkpoint records)."""
    if training.global_batch_size is not None:
        return int(training.global_batch_size)
    return training.micro_batch_size * training.gradient_accumulation_steps * world_size


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; the score position is unaffected by right padding.

    Rows of a weighted data set (a ``weight`` column: stage-2 selection weights) also give ``ce_weights`` and
    ``mse_weights`` (B,): the sequence's weight on its CE tokens and on its squared error (the same weight on
    both; the loss takes them separately so that a policy-gradient term can weight CE alone). The loss
    denominators stay counts (:func:`loss_denominators`): a weight scales its sequence's contribution."""
    length = max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, r in enumerate(rows):
        t = len(r["input_ids"])
        input_ids[i, :t] = torch.tensor(r["input_ids"])
        labels[i, :t] = torch.tensor(r["labels"])
        mask[i, :t] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "score_positions": torch.tensor([r["score_position"] for r in rows], dtype=torch.long),
        "score_targets": torch.tensor([r["score"] for r in rows], dtype=torch.float32),
    }
    if rows[0].get("branch_positions"):  # a multi-token scale: the trie-node tokens need their tree mask
        batch.update(tree_batch(rows, length, mask))
    if rows[0].get("weight") is not None:
        # float64 on the host: the loss casts to its compute dtype, so a weight reaches it rounded once
        weights = torch.tensor([float(r["weight"]) for r in rows], dtype=torch.float64)
        batch["ce_weights"] = weights
        batch["mse_weights"] = weights.clone()
    return batch
