"""The server's parts without a server: request models, query splitting in every chat template, the ingress's
deadline, cancellation, retry, work bound, authentication and error shapes, the CLI's refusals. Fast (no Ray
cluster, no model)."""

from __future__ import annotations

import asyncio
import base64
import gc
import json

import pytest
from pydantic import ValidationError

from tract_dist.serve.prompting import RequestError, chat_to_fields, completion_text, rubric_from_label
from tract_dist.serve.schemas import ChatCompletionRequest, JudgeInput, JudgeRequest, RewardRequest, describe_errors
from tract_dist.serve.templates import KNOWN, judge_template, split_query

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


def _chat(tok, turns, generation_prompt=True):
    return tok.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                   add_generation_prompt=generation_prompt, tokenize=False)


@pytest.mark.parametrize("policy", ["smollm2", "llama3", "mistral"])
def test_openrlhf_queries_split_in_the_policys_own_template(tokenizers, policy):
    """A ChatML judge (SmolLM2) gets queries in each real template: detected and split with that template
    (with or without prompts[i], single- and multi-turn), never with the judge's."""
    judge = judge_template(tokenizers["smollm2"])
    tok = tokenizers[policy]
    instruction, response = "How do I sort a list in Python?", "Use sorted(xs), or xs.sort() in place."
    prompt = _chat(tok, [("user", instruction)])
    query = prompt + response + (tok.eos_token or "")
    assert split_query(query, prompt, 0, judge=judge) == (instruction, response)
    assert split_query(query, None, 0, judge=judge) == (instruction, response)
    multi = _chat(tok, [("user", "Hi"), ("assistant", "Hello!"), ("user", instruction)])
    assert split_query(multi + response, None, 3, judge=judge) == (instruction, response)  # the last user turn
    name = {"smollm2": "chatml"}.get(policy, policy)
    assert split_query(query, prompt, 0, template=name, judge=judge) == (instruction, response)  # named
    other = next(n for n in ("llama3", "gemma") if n != name)
    with pytest.raises(RequestError, match=f"not in the {other} chat template") as e:  # named, but wrong
        split_query(query, None, 5, template=other, judge=judge)
    assert e.value.field == "query.5"
    with pytest.raises(RequestError, match="cannot be split") as e:
        split_query("plain text", None, 3, judge=judge)
    assert e.value.field == "query.3"


def test_gemma_phi3_and_plain_queries_and_template_text_is_never_graded():
    instruction, response = "Name a prime.", "7"
    gemma = f"<bos><start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n"
    assert split_query(gemma + response + "<end_of_turn>\n", None, 0) == (instruction, response)
    phi3 = f"<|user|>\n{instruction}<|end|>\n<|assistant|>\n"
    assert split_query(phi3 + response + "<|end|>", phi3, 0) == (instruction, response)
    plain = f"Question: {instruction}\nAnswer:"
    assert split_query(plain + " " + response, plain, 0) == (plain, response)  # no template: the prompt itself
    # the first template marker decides: ChatML text quoted inside a Llama-3 conversation stays content
    llama = KNOWN["llama3"]
    quoted = "Explain <|im_start|> tokens."
    q = f"<|begin_of_text|>{llama.user_open}{quoted}{llama.turn_end}{llama.assistant_open}"
    with pytest.raises(RequestError, match="instruction still holds chat-template text"):
        split_query(q + "They open a turn.<|eot_id|>", None, 1)  # ... which is then refused, not graded
    # a template the server does not know, split by prompts[i] as plain text: refused, naming the query
    other = "<|turn|>user: Name a prime.<|turn|>bot: "
    with pytest.raises(RequestError, match=r"query.2: after splitting with no chat template, the instruction") as e:
        split_query(other + "7", other, 2, template="none")
    assert "policy_template" in str(e.value) and e.value.field == "query.2"


def test_reward_rubric_from_labels():
    assert rubric_from_label(json.dumps(RUBRIC), None, 0) == RUBRIC
    assert rubric_from_label("the gold answer", RUBRIC, 0) == {**RUBRIC, "reference_answer": "the gold answer"}
    with pytest.raises(RequestError, match="no criteria"):
        rubric_from_label("", None, 2)
    with pytest.raises(RequestError, match="unknown key"):
        rubric_from_label({"criterion": "x"}, RUBRIC, 1)
    with pytest.raises(RequestError, match="labels.3.*nested more than 500 levels deep"):  # a 4xx, not a 500 (#23)
        rubric_from_label('{"criteria": ' + "[" * 5000 + "]" * 5000 + "}", None, 3)


class _Settings:
    request_timeout_s = 0.3


class _Response:
    """Stands in for Serve's DeploymentResponse: awaitable, and records ``cancel()``."""

    def __init__(self, coro, method):
        self.coro, self.method = coro, method

    def __await__(self):
        return self.coro.__await__()

    def cancel(self):
        self.method.cancelled += 1


class _Method:
    def __init__(self, behaviour):
        self.behaviour, self.calls, self.cancelled, self.args = behaviour, 0, 0, []

    def remote(self, *args):
        self.calls += 1
        self.args.append(args)
        return _Response(self.behaviour(self.calls, *args), self)


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
    obj._deadline = lambda: cls._deadline(obj)
    return cls, obj


def test_deadline_answers_504_and_cancels_the_replica_calls():
    """The deadline travels with each call (Unix time), and at it the ingress answers 504 and cancels the calls
    still running (Serve then drops them from the batch or the replica stops their rows)."""
    import time

    from tract_dist.serve.ingress import ApiError

    async def slow(n, call):
        await asyncio.sleep(5)

    cls, obj = _ingress(slow)
    t = time.time()
    with pytest.raises(ApiError) as e:
        asyncio.run(cls._judge_all(obj, [{"fields": {}}, {"fields": {}}]))
    assert e.value.status == 504 and "did not answer within 0.3 s" in e.value.message
    assert obj.judge.score.calls == 2 and obj.judge.score.cancelled == 2
    assert all(abs(args[0]["deadline"] - (t + 0.3)) < 0.2 for args in obj.judge.score.args)


def test_client_disconnect_cancels_the_replica_calls():
    """A request cancelled from outside (Serve cancels the route when its HTTP client goes away) cancels its
    replica calls too, and nothing is left to log as an unretrieved exception."""
    cls, obj = _ingress(lambda n, call: asyncio.sleep(5))
    obj.settings.request_timeout_s = 30

    logged = []

    async def client_goes_away():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: logged.append(ctx))
        route = asyncio.ensure_future(cls._judge_all(obj, [{"fields": {}}] * 3))
        await asyncio.sleep(0.1)
        route.cancel()
        with pytest.raises(asyncio.CancelledError):
            await route
        await asyncio.sleep(0)  # the cancelled calls run their handlers
        del route
        gc.collect()  # an unretrieved future's exception is reported when it is collected

    asyncio.run(client_goes_away())
    assert obj.judge.score.calls == 3 and obj.judge.score.cancelled == 3
    assert logged == []


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


def test_numbers_and_switches_are_strict_and_chat_content_is_capped():
    from tract_dist.serve.schemas import MAX_CHAT_CHARS

    x = {"instruction": "i", "response": "r", **RUBRIC}
    for body, where in (({"input": x, "seed": "5"}, "seed"), ({"input": x, "n_cots": True}, "n_cots"),
                        ({"input": x, "n_cots": 2.0}, "n_cots"), ({"input": x, "n_cots": "3"}, "n_cots")):
        with pytest.raises(ValidationError) as e:
            JudgeRequest.model_validate_json(json.dumps(body))
        assert describe_errors(e.value)[1] == where
    assert JudgeRequest.model_validate_json(json.dumps({"input": x, "n_cots": 3, "seed": 5})).n_cots == 3
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for extra, where in (({"stream": "false"}, "stream"), ({"n": True}, "n"), ({"seed": "1"}, "seed")):
        with pytest.raises(ValidationError) as e:
            ChatCompletionRequest.model_validate_json(json.dumps({**chat, **extra}))
        assert describe_errors(e.value)[1] == where
    with pytest.raises(ValidationError, match=f"at most {MAX_CHAT_CHARS}"):
        ChatCompletionRequest.model_validate({**chat, "messages": [{"role": "user",
                                                                    "content": "x" * (MAX_CHAT_CHARS + 1)}]})
    parts = [{"type": "text", "text": "x" * (MAX_CHAT_CHARS // 2)}] * 3  # each part under the cap, together over
    with pytest.raises(ValidationError, match=f"at most {MAX_CHAT_CHARS}"):
        ChatCompletionRequest.model_validate({**chat, "messages": [{"role": "user", "content": parts}]})
    with pytest.raises(ValidationError, match="policy_template"):
        RewardRequest.model_validate({"query": ["q"], "policy_template": "vicuna"})


class _Headers:
    def __init__(self, **h):
        self.headers = {k.replace("_", "-"): v for k, v in h.items()}


def test_credentials_bearer_x_api_key_and_basic_auth_and_empty_headers_veto_nothing():
    """OpenRLHF's aiohttp client (like requests) turns a URL's user info into HTTP Basic: the key as password."""
    import aiohttp

    from tract_dist.serve.ingress import _credentials

    key = "k-123"
    assert _credentials(_Headers(x_api_key="", authorization=f"Bearer {key}")) == [key]  # empty header: nothing
    assert _credentials(_Headers(x_api_key="  ", authorization="Bearer ")) == []
    assert _credentials(_Headers(authorization=aiohttp.BasicAuth("tract", key).encode())) == [key]
    assert _credentials(_Headers(authorization=aiohttp.BasicAuth(key, "").encode())) == [key]  # http://KEY@host
    assert _credentials(_Headers(authorization="Basic !!notbase64")) == []
    assert _credentials(_Headers(x_api_key="wrong", authorization=f"Bearer {key}")) == ["wrong", key]
    assert base64.b64decode(aiohttp.BasicAuth("tract", key).encode().split()[1]) == b"tract:k-123"


def test_every_error_is_openai_shaped_and_headers_are_capped():
    """FastAPI's own 404 and 405, an unexpected 500 and an over-large header block, through the handlers and the
    middleware the ingress installs (on a throwaway app: the ingress's routes need Serve)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tract_dist.serve.ingress import HeaderLimit, install_error_handlers
    from tract_dist.serve.schemas import MAX_HEADER_BYTES

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(HeaderLimit)

    @app.post("/v1/judge")
    async def judge():
        raise RuntimeError("boom: secret details")

    client = TestClient(app, raise_server_exceptions=False)
    for method, path, status, says in (("GET", "/nope", 404, "no such route: GET /nope"),
                                       ("GET", "/v1/judge", 405, "method not allowed: GET /v1/judge"),
                                       ("POST", "/v1/judge", 500, "internal error: RuntimeError")):
        r = client.request(method, path)
        err = r.json()["error"]
        assert r.status_code == status and says in err["message"] and set(err) == {"message", "type", "param",
                                                                                   "code"}
        assert "secret" not in r.text
    assert client.get("/v1/judge").headers["allow"] == "POST"
    r = client.get("/nope", headers={"x-big": "a" * MAX_HEADER_BYTES})
    assert r.status_code == 431 and "over the limit" in r.json()["error"]["message"]


def test_work_that_cannot_meet_the_deadline_is_refused_naming_the_options():
    import time

    from tract_dist.serve.app import budget_statement
    from tract_dist.serve.ingress import ApiError, _work_bound

    info = {"max_new_tokens": 512, "budget_source": "generation.max_new_tokens", "decode_step_s": 0.05,
            "rows_per_pass": 8, "defaults": {"mode": "cot_rail", "n_cots": 1}}
    assert _work_bound(info, "rail", 16, 64) == 0.0  # one forward pass, no generation
    assert _work_bound(info, "cot_rail", 1, 1) == pytest.approx(25.6)  # 512 steps of 50 ms
    assert _work_bound(info, "decode", 3, 3) == pytest.approx(2 * 25.6)  # 9 CoTs: two passes of up to 8 rows
    cls, obj = _ingress(None)
    obj.settings.request_timeout_s = 20
    with pytest.raises(ApiError) as e:
        cls._check_work(obj, info, None, None, 1, time.time() + 20)
    assert e.value.status == 422 and e.value.code == "over_deadline"
    for says in ("mode cot_rail", "512 new tokens per CoT (generation.max_new_tokens)", "26 s or more",
                 "serve.max_new_tokens", "--request-timeout-s", "mode rail"):
        assert says in e.value.message
    cls._check_work(obj, info, "rail", 16, 64, time.time() + 20)  # fits: no error
    cls._check_work(obj, info, None, None, 1, time.time() + 30)
    line = budget_statement(info, 20)
    assert "512 new tokens per CoT (generation.max_new_tokens)" in line and "warning" in line
    # evaluation.num_cots: auto (#24) as the served default: its bound counts the 3 CoTs it draws at least
    auto = {**info, "defaults": {"mode": "cot_rail", "n_cots": "auto"}}
    assert _work_bound(auto, "cot_rail", "auto", 3) == pytest.approx(2 * 25.6)  # 9 CoTs: two passes
    with pytest.raises(ApiError) as e:
        cls._check_work(obj, auto, None, None, 1, time.time() + 20)
    assert "for 3 CoT(s) or more" in e.value.message and "(n_cots auto)" in budget_statement(auto, 20)
    assert "serve.max_new_tokens=200" in line  # half of the 20 s deadline at 50 ms a step
    assert "warning" not in budget_statement(info, 120)


def test_pairwise_inputs_chat_prompts_and_reward_labels():
    """Relative grading (#29 item 3) without a server: /v1/judge bodies holding pairs (alone or mixed with single
    responses; errors name the pair's field), the chat prompt prometheus-eval's relative_grade sends parsed back
    into the pair, the completion text its parser reads, and OpenRLHF labels asking for a pairwise reward."""
    from types import SimpleNamespace

    from prometheus_eval.parser import parse_output
    from prometheus_eval.prompts import RELATIVE_PROMPT

    from tract_dist.serve.prompting import chat_to_pair, pair_completion_text, pair_from_label
    from tract_dist.serve.schemas import PairInput

    pair = {"instruction": "i", "response_a": "a", "response_b": "b", "rubric": "Which is kinder?"}
    req = JudgeRequest.model_validate({"inputs": [pair, {"instruction": "i", "response": "r", **RUBRIC}],
                                       "swap": True})
    assert [type(x) for x in req.all_inputs()] == [PairInput, JudgeInput] and req.swap
    assert req.all_inputs()[0].fields(0) == {"id": "0", "reference_answer": None, **pair}
    for body, where in (({"input": {k: v for k, v in pair.items() if k != "response_b"}}, "input.response_b"),
                        ({"inputs": [dict(pair, respones="x")]}, "inputs.0.respones"),
                        ({"input": pair, "swap": "yes"}, "swap")):
        with pytest.raises(ValidationError) as e:
            JudgeRequest.model_validate(body)
        assert describe_errors(e.value)[1] == where, describe_errors(e.value)

    text = RELATIVE_PROMPT.format(instruction="i", response_A="a", response_B="b", rubric="Which is kinder?",
                                  reference_answer="ref")  # prometheus-eval's own template (its PyPI wording)
    msgs = [SimpleNamespace(role="system", text=lambda: "sys"), SimpleNamespace(role="user", text=lambda: text)]
    assert chat_to_pair(msgs) == {"instruction": "i", "response_a": "a", "response_b": "b",
                                  "reference_answer": "ref", "rubric": "Which is kinder?"}
    absolute = [SimpleNamespace(role="user", text=lambda: "###Task Description:\nrate one response")]
    assert chat_to_pair(absolute) is None  # left to the absolute-grading parser
    broken = [SimpleNamespace(role="user", text=lambda: text.replace("###Score Rubric:", "###Rubric:"))]
    with pytest.raises(RequestError, match="'###Score Rubric:' missing"):
        chat_to_pair(broken)
    for p_a, verdict in ((0.8, "A"), (0.2, "B"), (0.5, "A")):
        out = pair_completion_text({"p_a": p_a, "cots": ["Feedback: A is kinder. [RESULT] B"]})
        assert out == f"A is kinder. [RESULT] {verdict}" and parse_output(out, mode="relative")[1] == verdict

    label = json.dumps({"compare_to": "baseline answer", "criteria": "Is it kind?"})
    assert pair_from_label(label, None, 0) == {"compare_to": "baseline answer", "rubric": "Is it kind?",
                                               "reference_answer": None}
    assert pair_from_label({"compare_to": "x"}, RUBRIC, 0)["rubric"] == RUBRIC["criteria"]  # the server's --rubric
    assert pair_from_label(json.dumps(RUBRIC), None, 0) is None  # an absolute-grading label
    for bad, where in (({"compare_to": ""}, "labels.0.compare_to"), ({"compare_to": "x"}, "no rubric"),
                       ({"compare_to": "x", "rubric": "r", "score": 3}, "unknown key")):
        with pytest.raises(RequestError, match=where):
            pair_from_label(bad, None, 0)
