"""The server's parts without a server: request models, query splitting, the ingress's deadline and retry, the
CLI's refusals. Fast (no Ray cluster, no model)."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from tract_dist.serve.prompting import ChatMarkers, RequestError, chat_to_fields, completion_text, rubric_from_label
from tract_dist.serve.prompting import split_query
from tract_dist.serve.schemas import JudgeInput, JudgeRequest, describe_errors

RUBRIC = {"criteria": "Is it right?", "score_descriptions": ["no", "barely", "partly", "mostly", "yes"]}


def test_score_descriptions_as_a_list_or_prometheus_keys():
    keyed = JudgeInput(instruction="i", response="r", criteria="c",
                       **{f"score{k}_description": f"d{k}" for k in range(1, 6)})
    assert keyed.score_descriptions == [f"d{k}" for k in range(1, 6)]
    with pytest.raises(ValidationError, match="not consecutive"):
        JudgeInput(instruction="i", response="r", criteria="c", score1_description="a", score3_description="b")
    with pytest.raises(ValidationError, match="score_descriptions: missing"):
        JudgeInput(instruction="i", response="r", criteria="c")


def test_validation_messages_name_the_field():
    with pytest.raises(ValidationError) as e:
        JudgeRequest.model_validate({"inputs": [{"instruction": "i", "criteria": "c", **RUBRIC}], "seed": -1})
    msg, first = describe_errors(e.value)
    assert first == "inputs.0.response" and "inputs.0.response: Field required" in msg and "seed:" in msg
    with pytest.raises(ValidationError, match="exactly one of input"):
        JudgeRequest.model_validate({})


def test_chat_prompt_parsed_back_into_fields(quickstart_examples):
    from tract_dist.data.prompts import render_prompt
    from tract_dist.serve.schemas import ChatMessage

    ex = quickstart_examples[0]
    msgs = [ChatMessage(role="system", content="ignored"), ChatMessage(role="user", content=render_prompt(ex))]
    fields = chat_to_fields(msgs, (1, 5))
    assert fields == {"instruction": ex.instruction, "response": ex.response, "reference_answer": ex.reference_answer,
                      "criteria": ex.criteria, "score_descriptions": ex.score_descriptions}
    with pytest.raises(RequestError, match="this judge scores 1-10") as e:
        chat_to_fields(msgs, (1, 10))
    assert e.value.field == "messages.1.content"


def test_completion_text_ends_with_the_rounded_score():
    assert completion_text({"score": 3.5, "cots": ["Good but vague. So the overall score is 4"]}, (1, 5)) == \
        "Good but vague. [RESULT] 4"
    assert completion_text({"score": 1.49, "cots": []}, (1, 5)) == "[RESULT] 1"
    assert completion_text({"score": 9.0, "cots": [""]}, (1, 5)) == "[RESULT] 5"


@pytest.mark.parametrize("name", ["smollm2", "llama3", "mistral"])
def test_openrlhf_query_split_with_real_chat_templates(tokenizers, name):
    tok = tokenizers[name]
    markers = ChatMarkers.from_tokenizer(tok)
    instruction, response = "How do I sort a list in Python?", "Use sorted(xs), or xs.sort() in place."
    prompt = tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                     tokenize=False)
    query = prompt + response + (tok.eos_token or "")
    assert split_query(query, prompt, markers, 0) == (instruction, response)
    assert split_query(query, None, markers, 0) == (instruction, response)
    multi = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                     {"role": "user", "content": instruction}], add_generation_prompt=True,
                                    tokenize=False)
    assert split_query(multi + response, None, markers, 3) == (instruction, response)  # the last user turn
    with pytest.raises(RequestError, match="cannot be split") as e:
        split_query("plain text", None, markers, 3)
    assert e.value.field == "query.3"


def test_reward_rubric_from_labels():
    assert rubric_from_label(json.dumps(RUBRIC), None, 0) == RUBRIC
    assert rubric_from_label("the gold answer", RUBRIC, 0) == {**RUBRIC, "reference_answer": "the gold answer"}
    with pytest.raises(RequestError, match="no criteria"):
        rubric_from_label("", None, 2)
    with pytest.raises(RequestError, match="unknown key"):
        rubric_from_label({"criterion": "x"}, RUBRIC, 1)


class _Settings:
    request_timeout_s = 0.3


class _Method:
    def __init__(self, behaviour):
        self.behaviour, self.calls = behaviour, 0

    def remote(self, *args):
        self.calls += 1
        return self.behaviour(self.calls, *args)


class _Handle:
    def __init__(self, behaviour):
        self.score = _Method(behaviour)


def _ingress(behaviour):
    """The ingress's methods on a stand-in object: a fake judge handle instead of Serve's."""
    from types import SimpleNamespace

    from tract_dist.serve.ingress import JudgeServer

    cls = JudgeServer.func_or_class
    obj = SimpleNamespace(judge=_Handle(behaviour), settings=_Settings())
    obj._call = lambda method, *a: cls._call(obj, method, *a)
    return cls, obj


def test_deadline_answers_504():
    from tract_dist.serve.ingress import ApiError

    async def slow(n, call):
        await asyncio.sleep(5)

    cls, obj = _ingress(slow)
    with pytest.raises(ApiError) as e:
        asyncio.run(cls._judge_all(obj, [{"fields": {}}]))
    assert e.value.status == 504 and "did not answer within 0.3 s" in e.value.message


def test_dead_replica_is_retried_then_503():
    from ray.exceptions import ActorDiedError

    from tract_dist.serve.ingress import REPLICA_RETRIES, ApiError

    async def dies_once(n, call):
        if n == 1:
            raise ActorDiedError()
        return {"score": 3.0}

    cls, obj = _ingress(dies_once)
    obj.settings.request_timeout_s = 30
    assert asyncio.run(cls._judge_all(obj, [{"fields": {}}])) == [{"score": 3.0}]
    assert obj.judge.score.calls == 2

    async def always_dead(n, call):
        raise ActorDiedError()

    cls, obj = _ingress(always_dead)
    obj.settings.request_timeout_s = 30
    with pytest.raises(ApiError) as e:
        asyncio.run(cls._judge_all(obj, [{"fields": {}}]))
    assert e.value.status == 503 and "no judge replica could answer" in e.value.message
    assert obj.judge.score.calls == REPLICA_RETRIES + 1


def test_cli_refusals(tmp_path, monkeypatch, capsys):
    from tract_dist.cli import main

    monkeypatch.delenv("TRACT_TEST_KEY", raising=False)
    assert main(["serve", "smollm2", "--api-key-env", "TRACT_TEST_KEY"]) == 2
    assert "TRACT_TEST_KEY is unset" in capsys.readouterr().err
    bad = tmp_path / "rubric.json"
    bad.write_text('{"criteria": "x"}')
    assert main(["serve", "smollm2", "--rubric", str(bad)]) == 2
    assert "score_descriptions" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit):
        main(["serve", "smollm2", "--port", "70000"])
    for argv, says in ((["--replicas", "2", "--min-replicas", "1", "--max-replicas", "3"], "one or the other"),
                       (["--max-replicas", "3"], "needs both"),
                       (["--min-replicas", "4", "--max-replicas", "3"], "more than --max-replicas 3")):
        assert main(["serve", "smollm2", *argv]) == 2
        assert says in capsys.readouterr().err


def test_fixed_or_autoscaled_replicas():
    """A fixed count, or Serve's autoscaler between the bounds with a full batch per replica as its target."""
    from tract_dist.serve.app import ServeOptions
    from tract_dist.serve.replica import judge_deployment

    fixed = judge_deployment(num_replicas=2, num_cpus=1, num_gpus=0, max_ongoing_requests=32)
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None
    auto = judge_deployment(num_replicas=1, num_cpus=1, num_gpus=0, max_ongoing_requests=32, autoscale=(0, 3),
                            target_ongoing_requests=16)
    a = auto._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.initial_replicas, a.target_ongoing_requests) == (0, 3, 1, 16)
    opts = ServeOptions(model_id="m", autoscale=(1, 4))
    assert opts.max_replicas == 4 and opts.describe_replicas() == "1-4 replicas, autoscaled"
    assert ServeOptions(model_id="m", replicas=2).max_replicas == 2
