"""``evaluation.rail_normalize`` unset follows the training choice the export records (``loss.rail_normalize``);
set and different, it is used with one warning naming both. Checked on the ŷ the judge actually produces: a
random tiny model puts almost no mass on the score tokens, so ŷ = Σ v_k p_k lies far below the 1-5 scale and
the renormalised Σ v_k p_k / Σ p_k on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tract_dist.config import load_config
from tract_dist.evaluate.runner import EvaluateSpec, evaluate_model, load_predictions
from tract_dist.export_record import RECORD_NAME, resolve_rail_normalize, write_export_record
from tract_dist.fsutil import CorruptStateError


@pytest.fixture(scope="module")
def exports(tiny_export, tmp_path_factory):
    """{True: EXPORT/model, False: EXPORT/model, None: a folder without a record}: copies of the tiny export,
    each recorded by the export writer with that training choice."""
    out = {}
    for choice in (True, False, None):
        export = tmp_path_factory.mktemp(f"export-{choice}")
        shutil.copytree(tiny_export, export / "model")
        if choice is not None:
            cfg = load_config(None, ["model.name_or_path=m", f"loss.rail_normalize={choice}"])
            write_export_record(export, cfg.loss)
        out[choice] = str(export / "model")
    return out


def _cfg(data_path, tmp_path, *extra):
    return load_config(None, [
        "model.name_or_path=/unused", "data.max_length=4096", "evaluation.mode=rail", "evaluation.ray=false",
        f"evaluation.benchmarks=[{{name: vic, path: '{data_path}', format: jsonl, max_examples: 4}}]",
        "tracking.enabled=false", *extra])


def _predictions(cfg, model, tmp_path):
    evaluate_model(EvaluateSpec.of(cfg), model, tmp_path / "eval", show_progress=False)
    return load_predictions(tmp_path / "eval" / "vic" / "predictions.jsonl")


def _readouts(pred):
    """(Σ v p, Σ v p / Σ p) from the score-token probabilities the judge reports with each prediction."""
    dist = {int(k): p for k, p in pred["detail"]["distribution"].items()}
    raw = sum(v * p for v, p in dist.items())
    return raw, raw / sum(dist.values())


def test_the_writer_records_the_loss_choice(exports):
    for choice in (True, False):
        record = json.loads((Path(exports[choice]) / RECORD_NAME).read_text())
        assert record["loss"]["rail_normalize"] is choice


@pytest.mark.parametrize("recorded", [True, False])
def test_unset_follows_the_recorded_choice(exports, quickstart_data, tmp_path, capsys, monkeypatch, recorded):
    import tract_dist.export_record as export_record

    calls = []

    def counted(configured, model_path):
        calls.append((configured, str(model_path)))
        return resolve_rail_normalize(configured, model_path)

    monkeypatch.setattr(export_record, "resolve_rail_normalize", counted)
    preds = _predictions(_cfg(quickstart_data, tmp_path), exports[recorded], tmp_path)
    assert calls == [(None, exports[recorded])]  # resolved once per evaluation, then handed to every judge
    assert len(preds) == 4
    for p in preds:
        raw, normalised = _readouts(p)
        assert p["prediction"] == pytest.approx(normalised if recorded else raw, rel=1e-9)
        assert (1 <= p["prediction"] <= 5) is recorded  # on the scale only when renormalised
    assert "warning" not in capsys.readouterr().err


def test_unset_without_a_record_reads_the_full_vocabulary_softmax(exports, quickstart_data, tmp_path):
    for p in _predictions(_cfg(quickstart_data, tmp_path), exports[None], tmp_path):
        assert p["prediction"] == pytest.approx(_readouts(p)[0], rel=1e-9) and p["prediction"] < 1


def test_a_set_value_that_differs_is_used_with_one_warning(exports, quickstart_data, tmp_path, capsys):
    preds = _predictions(_cfg(quickstart_data, tmp_path, "evaluation.rail_normalize=false"), exports[True], tmp_path)
    assert all(p["prediction"] == pytest.approx(_readouts(p)[0], rel=1e-9) and p["prediction"] < 1 for p in preds)
    err = capsys.readouterr().err
    assert err.count("warning: evaluation.rail_normalize") == 1
    assert "evaluation.rail_normalize=false" in err and "loss.rail_normalize=true" in err and RECORD_NAME in err


def test_a_set_value_that_agrees_gives_no_warning(exports, capsys):
    assert resolve_rail_normalize(True, exports[True]) is True
    assert resolve_rail_normalize(False, exports[False]) is False
    assert resolve_rail_normalize(True, "smollm2") is True and resolve_rail_normalize(None, "smollm2") is False
    assert "warning" not in capsys.readouterr().err


def test_the_judge_command_follows_the_record(exports, quickstart_examples, capsys):
    from tract_dist.cli import main

    ex = quickstart_examples[0]
    payload = json.dumps({"instruction": ex.instruction, "response": ex.response, "criteria": ex.criteria,
                          "score_descriptions": ex.score_descriptions})
    base = ["judge", "--json", payload, "--mode", "rail", "tracking.enabled=false", "data.max_length=4096"]
    scores = {}
    for choice in (True, False):
        assert main(base + ["--model", exports[choice]]) == 0
        scores[choice] = json.loads(capsys.readouterr().out)["score"]
    assert 1 <= scores[True] <= 5 and scores[False] < 1


def test_a_damaged_record_is_named(exports, tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / RECORD_NAME).write_text('{"loss": {"rail_normalize": "yes"}}')
    with pytest.raises(CorruptStateError, match=rf"{RECORD_NAME}: loss.rail_normalize must be true or false"):
        resolve_rail_normalize(None, bad)
    (bad / RECORD_NAME).write_text('{"loss": ')
    with pytest.raises(CorruptStateError, match="training record is corrupt"):
        resolve_rail_normalize(None, bad)

# The training run's own export writer leaving the record is checked where a real run is trained already:
# tests/train/test_training.py::test_real_smollm2_trains_a_step_and_records_its_loss_choice (no second training run here).
