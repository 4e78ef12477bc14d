"""Synthetic "step checking" judge task for the CPU quality benchmark (issue #6 item 6).

Each example is a 4-step arithmetic response ("Step i: a + b = c"); some steps carry a wrong result. The gold
score is ``1 + number of correct steps`` (1..5), drawn uniformly, so the judge must check every step to score
well: the score is a count over independently verifiable facts, which a judge can get by reasoning (CoT: check
each step, then count) or try to guess in one shot (RAFT without CoT).

The annotated feedback (the stage-1 training CoTs) is written in a deliberately verbose, varied style: several
paraphrase templates per step, the sum re-derived in words, a closing tally that restates the rubric line.
A 135M model fine-tuned on a few dozen of these writes shorter, more uniform CoTs of its own; that
distribution gap is what TRACT's stage 2 (training on self-generated CoTs) addresses.

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


def annotated_feedback(rng: random.Random, steps: list[tuple[int, int, int]]) -> str:
    parts = [rng.choice(_OPENERS)]
    for i, (a, b, c) in enumerate(steps):
        tmpl = rng.choice(_RIGHT if a + b == c else _WRONG)
        text = tmpl.format(i=i + 1, a=a, b=b, c=c, s=a + b)
        parts.append(text[0].upper() + text[1:])
    n = sum(a + b == c for a, b, c in steps)
    parts.append(rng.choice(_CLOSERS).format(n=n, w=WORDS[n], pl="" if n == 1 else "s", be="is" if n == 1 else "are",
                                             d=SCORE_DESCRIPTIONS[n]))
    return " ".join(parts)


def make_example(rng: random.Random, ex_id: str, score: int) -> dict[str, Any]:
    steps = _steps(rng, score - 1)
    return {
        "id": ex_id,
        "instruction": INSTRUCTION,
        "response": render_response(steps),
        "criteria": CRITERIA,
        "score_descriptions": list(SCORE_DESCRIPTIONS),
        "score": score,
        "reference_answer": None,
        "feedback": annotated_feedback(rng, steps),
        "category": f"{score - 1}_correct",
    }


def make_split(rng: random.Random, n: int, prefix: str, seen: set[str]) -> list[dict[str, Any]]:
    """``n`` examples with scores balanced over 1..5 (cycled, then shuffled); responses never in ``seen``."""
    scores = [1 + i % 5 for i in range(n)]
    rng.shuffle(scores)
    out = []
    for i, score in enumerate(scores):
        while True:
            ex = make_example(rng, f"{prefix}-{i:05d}", score)
            if ex["response"] not in seen:
                seen.add(ex["response"])
                out.append(ex)
                break
    return out


def make_task(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    test = make_split(rng, n_test, "stepcheck-test", seen)  # test first: its size does not shift the train set
    train = make_split(random.Random(seed + 1_000_003), n_train, "stepcheck-train", seen)
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
    a = ap.parse_args(argv)
    train, test = make_task(a.train, a.test, a.seed)
    out = Path(a.out)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")
    paths = {"train": str(out / "train.jsonl"), "test": str(out / "test.jsonl")}
    print(json.dumps(paths))
    return paths


if __name__ == "__main__":
    main()
