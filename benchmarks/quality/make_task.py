"""Synthetic "step checking" judge task for the CPU quality benchmark (issue #6 item 6).

Each example is a 4-step arithmetic response ("Step i: a + b = c"); some steps carry a wrong result. The gold
score is ``1 + number of correct steps`` (1..5), drawn uniformly, so the judge must check every step to score
well: the score is a count over independently verifiable facts, which a judge can get by reasoning (CoT: check
each step, then count) or try to guess in one shot (RAFT without CoT).

The annotated feedback (the stage-1 training CoTs) is written in a deliberately verbose, varied style: several
paraphrase templates per step, the sum re-derived in words, a closing tally that restates the rubric line.
A 135M model fine-tuned on a few dozen of these writes shorter, more uniform CoTs of its own; that
distribution gap is what TRACT's stage 2 (training on self-generated CoTs) addresses.

Two variants (``--variant``):

* ``reference`` (default): the prompt carries the Prometheus reference answer (the four correct results,
  "Answer i: s"), so a step is checked by comparing the response's result with the reference's. A judge that
  reasons step by step (CoT: quote step and answer, compare, keep a running count) only needs to copy, compare
  and increment; one that scores in a single shot (RAFT without CoT) must align four pairs and count the
  matches inside one forward pass.
* ``arith``: no reference answer; the judge must re-add every pair itself. SmolLM2-135M did not learn this one
  at CPU budgets (all methods at chance; see benchmarks/results/quality-cpu-2core-arith.md).
* ``annotator`` (#24, the paper's situation): the prompt is the ``reference`` one, so the score still depends on
  reasoning the model can learn (compare each result with the reference's), but the annotated CoTs are written
  by a stronger annotator that never looks at the reference: it re-derives every sum itself and writes it out
  in words ("seven and five make twelve"), states how far a wrong result is off ("one too high") and adds a
  multiplication cross-check ("7 x 5 = 35"), and gives only a closing tally, no running count. A 135M model can
  reproduce none of that reliably (it cannot add or multiply at these budgets: the ``arith`` variant), as a 7B
  model cannot reproduce GPT-4's CoTs; what it can learn is to copy the reference's answer into the sum and
  compare. So its stage-1 CoTs carry wrong sums, offsets and verdicts, its read-out was trained on CoTs whose
  every statement is right, and stage 2, on its own CoTs, is where it can repair that (#24's gold-checked
  selection keeps the CoTs whose read-out lands near the gold score).

Deterministic in ``--seed``; train and test responses are disjoint (no identical 4-step response in both).

    python benchmarks/quality/make_task.py --out /tmp/quality --train 64 --test 64 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

N_STEPS = 4
INSTRUCTION = "Add each pair of numbers. Write one step per pair."
CRITERIA = "How many of the four steps are arithmetically correct?"
SCORE_DESCRIPTIONS = [
    "None of the four steps is correct.",
    "Exactly one of the four steps is correct.",
    "Exactly two of the four steps are correct.",
    "Exactly three of the four steps are correct.",
    "All four steps are correct.",
]
WORDS = ["zero", "one", "two", "three", "four"]

# Verbose, varied annotation style (what the annotator wrote, not what a small model will write).
_OPENERS = [
    "Re-deriving each sum:",
    "Checking every addition myself:",
    "Verifying the four steps one by one:",
]
_RIGHT = [
    "{a} plus {b} is {s}, matching {c}, so step {i} is right.",
    "step {i} holds since {a} + {b} gives {s}.",
    "in step {i}, {a} and {b} make {s}: correct.",
]
_WRONG = [
    "{a} plus {b} is {s}, not {c}, so step {i} is wrong.",
    "step {i} fails since {a} + {b} gives {s}, not {c}.",
    "in step {i}, {a} and {b} make {s}, not {c}: incorrect.",
]
# Reference variant: the annotator quotes each step next to the reference's answer, then gives the verdict and a
# running count (evidence before conclusion, so each verdict is a comparison of two numbers already written).
_REF_OPENERS = [
    "Comparing the response with the reference answer step by step:",
    "Checking every result against the reference:",
    "Going through the four steps next to the reference answer:",
]
_REF_RIGHT = [
    "Step {i}: {a} + {b} = {c} against Answer {i}: {s}, the same, so it is right; {k} right so far.",
    "Step {i}: {a} + {b} = {c} and Answer {i}: {s} agree. Correct, which makes {k} correct so far.",
    "Step {i}: {a} + {b} = {c} vs Answer {i}: {s}: match ({k} so far).",
]
_REF_WRONG = [
    "Step {i}: {a} + {b} = {c} against Answer {i}: {s}, different, so it is wrong; {k} right so far.",
    "Step {i}: {a} + {b} = {c} and Answer {i}: {s} disagree. Incorrect, which leaves {k} correct so far.",
    "Step {i}: {a} + {b} = {c} vs Answer {i}: {s}: no match ({k} so far).",
]
VARIANTS = ("reference", "arith", "annotator")

# Annotator variant: the stronger annotator's own arithmetic, in words, with facts the small model cannot
# reproduce (the offset of a wrong result, a product as a cross-check) and no running count. Verdict words are
# right / correct / holds and wrong / incorrect / fails, one per step sentence (report.py reads them).
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty", "twenty-one"]
_ANN_OPENERS = [
    "I worked out every sum myself before reading the response's results.",
    "Recomputing the four additions from scratch:",
    "Adding each pair independently and setting it against the response:",
]
_ANN_RIGHT = [
    "Step {i}: {A} and {B} make {S}, which is what the response has, so it is right (cross-check: {a} x {b} = {p}).",
    "In step {i} the sum of {A} and {B} is {S}; the response agrees, so this one holds ({a} x {b} = {p}, for the record).",
    "Step {i} is correct: {S} is indeed {A} plus {B} (and {a} x {b} = {p}).",
]
_ANN_WRONG = [
    "Step {i}: {A} and {B} make {S}, but the response has {c}, {D} too {dir}, so it is wrong (cross-check: {a} x {b} = {p}).",
    "In step {i} the sum of {A} and {B} is {S}; the response's {c} is {D} too {dir}, so this one fails ({a} x {b} = {p}, for the record).",
    "Step {i} is incorrect: {A} plus {B} is {S}, and {c} is {D} too {dir} (and {a} x {b} = {p}).",
]
_ANN_CLOSERS = [
    "Altogether {w} of the four steps {hold}.",
    "That makes {w} of the four additions right.",
    "In all, {w} of the four steps {be} correct.",
]

_CLOSERS = [
    "That is {n} correct step{pl} out of four.",
    "Tally: {w} of the four steps {be} correct.",
    "Hence {n} of 4 additions are right.",
]


def _steps(rng: random.Random, n_correct: int) -> list[tuple[int, int, int]]:
    correct_at = set(rng.sample(range(N_STEPS), n_correct))
    steps = []
    for i in range(N_STEPS):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        s = a + b
        if i in correct_at:
            c = s
        else:
            c = s + rng.choice([-3, -2, -1, 1, 2, 3])
        steps.append((a, b, c))
    return steps


def render_response(steps: list[tuple[int, int, int]]) -> str:
    return "\n".join(f"Step {i + 1}: {a} + {b} = {c}" for i, (a, b, c) in enumerate(steps))


def render_reference(steps: list[tuple[int, int, int]]) -> str:
    """The correct results only, labelled differently from the response's lines so that quoting one never
    matches the other."""
    return "\n".join(f"Answer {i + 1}: {a + b}" for i, (a, b, _) in enumerate(steps))


def annotator_feedback(rng: random.Random, steps: list[tuple[int, int, int]]) -> str:
    """The stronger annotator's CoT (variant ``annotator``): sums in words, offsets, products, a closing tally."""
    parts = [rng.choice(_ANN_OPENERS)]
    for i, (a, b, c) in enumerate(steps):
        s = a + b
        fields = dict(i=i + 1, a=a, b=b, c=c, p=a * b, A=NUMBER_WORDS[a], B=NUMBER_WORDS[b], S=NUMBER_WORDS[s],
                      D=NUMBER_WORDS[abs(c - s)], dir="high" if c > s else "low")
        parts.append(rng.choice(_ANN_RIGHT if c == s else _ANN_WRONG).format(**fields))
    n = sum(a + b == c for a, b, c in steps)
    parts.append(rng.choice(_ANN_CLOSERS).format(w=WORDS[n], hold="holds" if n == 1 else "hold",
                                                 be="is" if n == 1 else "are"))
    return " ".join(parts)


def annotated_feedback(rng: random.Random, steps: list[tuple[int, int, int]], variant: str = "arith") -> str:
    if variant == "annotator":
        return annotator_feedback(rng, steps)
    ref = variant == "reference"
    parts = [rng.choice(_REF_OPENERS if ref else _OPENERS)]
    k = 0
    for i, (a, b, c) in enumerate(steps):
        k += a + b == c
        if ref:
            tmpl = rng.choice(_REF_RIGHT if a + b == c else _REF_WRONG)
        else:
            tmpl = rng.choice(_RIGHT if a + b == c else _WRONG)
        text = tmpl.format(i=i + 1, a=a, b=b, c=c, s=a + b, k=k)
        parts.append(text[0].upper() + text[1:])
    n = sum(a + b == c for a, b, c in steps)
    parts.append(rng.choice(_CLOSERS).format(n=n, w=WORDS[n], pl="" if n == 1 else "s", be="is" if n == 1 else "are",
                                             d=SCORE_DESCRIPTIONS[n]))
    return " ".join(parts)


def make_example(rng: random.Random, ex_id: str, score: int, variant: str = "arith") -> dict[str, Any]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown task variant {variant!r}; expected one of {VARIANTS}")
    steps = _steps(rng, score - 1)
    return {
        "id": ex_id,
        "instruction": INSTRUCTION,
        "response": render_response(steps),
        "criteria": CRITERIA,
        "score_descriptions": list(SCORE_DESCRIPTIONS),
        "score": score,
        "reference_answer": render_reference(steps) if variant in ("reference", "annotator") else None,
        "feedback": annotated_feedback(rng, steps, variant),
        "category": f"{score - 1}_correct",
    }


def make_split(rng: random.Random, n: int, prefix: str, seen: set[str], variant: str = "arith") -> list[dict[str, Any]]:
    """``n`` examples with scores balanced over 1..5 (cycled, then shuffled); responses never in ``seen``."""
    scores = [1 + i % 5 for i in range(n)]
    rng.shuffle(scores)
    out = []
    for i, score in enumerate(scores):
        while True:
            ex = make_example(rng, f"{prefix}-{i:05d}", score, variant)
            if ex["response"] not in seen:
                seen.add(ex["response"])
                out.append(ex)
                break
    return out


def make_task(n_train: int, n_test: int, seed: int = 0,
              variant: str = "arith") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    # test first: its size does not shift the train set
    test = make_split(rng, n_test, "stepcheck-test", seen, variant)
    train = make_split(random.Random(seed + 1_000_003), n_train, "stepcheck-train", seen, variant)
    return train, test


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict[str, str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work dir for train.jsonl / test.jsonl (not committed)")
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", choices=VARIANTS, default="reference")
    a = ap.parse_args(argv)
    train, test = make_task(a.train, a.test, a.seed, a.variant)
    out = Path(a.out)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")
    paths = {"train": str(out / "train.jsonl"), "test": str(out / "test.jsonl")}
    print(json.dumps(paths))
    return paths


if __name__ == "__main__":
    main()
