"""The quality benchmark's step-checking task generator (benchmarks/quality/make_task.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def make_task():
    spec = importlib.util.spec_from_file_location("quality_make_task", REPO / "benchmarks" / "quality" / "make_task.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_STEP = re.compile(r"^Step (\d): (\d+) \+ (\d+) = (-?\d+)$")


def _correct_steps(response: str) -> int:
    """Independent re-check of a response: parse every line and count the true sums."""
    lines = response.split("\n")
    assert len(lines) == 4
    n = 0
    for i, line in enumerate(lines):
        m = _STEP.match(line)
        assert m, line
        assert int(m.group(1)) == i + 1
        n += int(m.group(2)) + int(m.group(3)) == int(m.group(4))
    return n


@pytest.mark.parametrize("variant", ["reference", "arith", "annotator"])
def test_score_is_one_plus_correct_steps(make_task, variant):
    train, test = make_task.make_task(200, 100, seed=3, variant=variant)
    for ex in train + test:
        assert ex["score"] == 1 + _correct_steps(ex["response"])
        assert ex["category"] == f"{ex['score'] - 1}_correct"
        # the annotated CoT's tally agrees with the score and it never states the score phrase itself
        assert "So the overall score is" not in ex["feedback"]
        words = ["zero", "one", "two", "three", "four"]
        assert re.search(rf"\b({ex['score'] - 1}|{words[ex['score'] - 1]})\b", ex["feedback"].rsplit(".", 2)[-2])


def test_reference_variant_gives_true_results_and_running_counts(make_task):
    train, test = make_task.make_task(150, 50, seed=4, variant="reference")
    for ex in train + test:
        steps = [_STEP.match(line).groups() for line in ex["response"].split("\n")]
        assert ex["reference_answer"] == "\n".join(f"Answer {i}: {int(a) + int(b)}" for i, a, b, _ in steps)
        # each step is quoted with its answer, and the running count after it is the number of true sums so far
        quoted = re.findall(r"Step (\d): (\d+) \+ (\d+) = (-?\d+) \S+ Answer \1: (\d+)\D+?(\d) (?:right |correct )?so far",
                            ex["feedback"])
        assert [q[:4] for q in quoted] == steps
        running = 0
        for i, a, b, c, s, k in quoted:
            assert int(s) == int(a) + int(b)
            running += int(a) + int(b) == int(c)
            assert int(k) == running
    assert all(ex["reference_answer"] is None for ex in make_task.make_task(20, 5, seed=4, variant="arith")[0])
    with pytest.raises(ValueError, match="unknown task variant"):
        make_task.make_task(5, 5, seed=4, variant="other")


def test_balanced_scores(make_task):
    train, test = make_task.make_task(100, 50, seed=0)
    assert Counter(ex["score"] for ex in train) == {k: 20 for k in range(1, 6)}
    assert Counter(ex["score"] for ex in test) == {k: 10 for k in range(1, 6)}


def test_deterministic_and_seed_dependent(make_task):
    a = make_task.make_task(40, 20, seed=7)
    b = make_task.make_task(40, 20, seed=7)
    c = make_task.make_task(40, 20, seed=8)
    assert a == b
    assert a != c
    # the training set does not depend on the size of the test set
    assert make_task.make_task(40, 30, seed=7)[0] == a[0]


def test_disjoint_split(make_task):
    train, test = make_task.make_task(300, 100, seed=1)
    assert not {ex["response"] for ex in train} & {ex["response"] for ex in test}
    ids = [ex["id"] for ex in train + test]
    assert len(ids) == len(set(ids))


def test_jsonl_reads_through_project_reader(make_task, tmp_path):
    from tract_dist.data.formats import read_examples

    paths = make_task.main(["--out", str(tmp_path), "--train", "15", "--test", "10", "--seed", "2"])  # reference
    train = read_examples(paths["train"], "jsonl")
    test = read_examples(paths["test"], "jsonl", require_feedback=False)
    assert (len(train.examples), len(test.examples)) == (15, 10)
    assert not train.invalid and not test.invalid
    first = json.loads(Path(paths["train"]).read_text().splitlines()[0])
    ex = train.examples[0]
    assert (ex.id, ex.score, ex.response, ex.reference_answer) == (first["id"], first["score"], first["response"],
                                                                   first["reference_answer"])
    assert ex.reference_answer.startswith("Answer 1: ")
    assert ex.feedback and len(ex.score_descriptions) == 5


_WORD_VALUES = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen".split())}


def _reparse_annotator_step(segment: str) -> dict:
    """One step's statement of an annotator CoT, read back with this test's own patterns: the operand and sum
    words, the offset of a wrong result, the response's result, the cross-check product, the verdict."""
    offset = re.search(r"\b([a-z]+) too (high|low)\b", segment)
    body = segment.replace(offset.group(0), "") if offset else segment
    cross = re.search(r"\b(\d) x (\d) = (\d+)\b", body)
    body = body.replace(cross.group(0), "") if cross else body
    prose = re.sub(r"\bthis one\b", "", body.lower())  # "this one holds": a pronoun, not a number
    words = [_WORD_VALUES[w] for w in re.findall(r"\b[a-z]+\b", prose) if w in _WORD_VALUES]
    low = body.lower()
    bad = [w for w in ("wrong", "incorrect", "fails") if re.search(rf"\b{w}\b", low)]
    good = [w for w in ("right", "correct", "holds") if re.search(rf"\b{w}\b", low)]
    digits = [int(x) for x in re.findall(r"(?<![\w.])(\d+)(?![\w])", body)]
    return {"words": sorted(words), "offset": (_WORD_VALUES[offset.group(1)], offset.group(2)) if offset else None,
            "cross": tuple(int(x) for x in cross.groups()) if cross else None, "digits": digits,
            "verdict": None if bool(bad) == bool(good) else bool(good)}


def test_annotator_variant_reparsed_independently(make_task):
    """variant=annotator (#24): the reference prompt of the `reference` variant, and a stronger annotator's CoT
    that never quotes the reference, states every sum in words, the offset of each wrong result and a product,
    and only a closing tally. Every statement is re-derived here from the response alone."""
    train, test = make_task.make_task(150, 50, seed=6, variant="annotator")
    for ex in train + test:
        steps = [tuple(int(x) for x in _STEP.match(line).groups()[1:]) for line in ex["response"].split("\n")]
        assert ex["reference_answer"] == "\n".join(f"Answer {i}: {a + b}" for i, (a, b, _) in enumerate(steps, 1))
        fb = ex["feedback"]
        assert "Answer" not in fb and "so far" not in fb and "So the overall score is" not in fb
        marks = [m.start() for m in re.finditer(r"\b[Ss]tep (\d)\b", fb)]
        assert [int(re.match(r"[Ss]tep (\d)", fb[m:]).group(1)) for m in marks] == [1, 2, 3, 4]
        tally_at = fb.rfind(". ") + 2
        for k, (start, end) in enumerate(zip(marks, marks[1:] + [tally_at]), start=1):
            a, b, c = steps[k - 1]
            got = _reparse_annotator_step(fb[start:end])
            assert got["cross"] == (a, b, a * b)
            assert got["words"] == sorted([a, b, a + b])  # the operands and their sum, in words
            assert got["verdict"] is (a + b == c)
            if a + b == c:
                assert got["offset"] is None and got["digits"] == [k]  # only the step number
            else:
                assert got["offset"] == (abs(c - (a + b)), "high" if c > a + b else "low")
                assert sorted(got["digits"]) == sorted([k, c])
        tally = re.search(r"\b(zero|one|two|three|four) of the four\b", fb[tally_at:])
        assert tally and _WORD_VALUES[tally.group(1)] + 1 == ex["score"] == 1 + _correct_steps(ex["response"])
