"""The judge server over real HTTP on 127.0.0.1: every endpoint, bad and hostile requests, deadlines and
disconnects, the real client libraries (openai, LiteLLM with prometheus-eval, OpenRLHF's reward request), a
bounded load with a replica killed in the middle. One Serve (tests/serve/conftest.py) for the whole module.

References are independent of the code under test where it matters: a batched request against the same inputs
sent one per request (a batch of one each), the chat and reward answers against /v1/judge's score for the same
fields, and the load test's scores against an in-process ``Judge`` scoring each input alone.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest

from serve_helpers import API_KEY, LOAD_ID, SLOW_BUDGET, SLOW_ID, SLOW_TIMEOUT_S, SMOL_ID, judge_config, short_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _post(server, path, body, auth=None, **kw):
    return httpx.post(server + path, json=body, headers=auth or {}, timeout=120, **kw)


def _replica_batches(app: str) -> list[int]:
    from ray import serve

    return serve.get_deployment_handle("JudgeModel", app).recent_batch_sizes.remote().result(timeout_s=30)


def _activity(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("JudgeModel", app).activity.remote().result(timeout_s=30)


def _idle(app: str, within_s: float = 10.0) -> dict:
    """The replica's activity once nothing is queued or running on it (asserted to happen within the time)."""
    end = time.monotonic() + within_s
    while True:
        a = _activity(app)
        if (a["in_flight"], a["running_rows"]) == (0, 0) or time.monotonic() > end:
            assert (a["in_flight"], a["running_rows"]) == (0, 0), a
            return a
        time.sleep(0.2)


@pytest.fixture(scope="module")
def inputs(quickstart_examples):
    return short_inputs(quickstart_examples, 3)


@pytest.fixture(scope="module")
def single_scores(server, auth, inputs):
    """Each input judged alone (one request each, sequentially: batches of one)."""
    out = {}
    for x in inputs:
        r = _post(server, "/v1/judge", {"input": x, "mode": "rail"}, auth)
        assert r.status_code == 200, r.text
        out[x["id"]] = r.json()["result"]
    assert _replica_batches("smol")[-len(inputs):] == [1] * len(inputs)
    return out


def test_health_models_and_api_key(server, auth):
    assert httpx.get(server + "/health", timeout=30).json() == {"status": "ok", "model": SMOL_ID, "backend": "hf"}
    head = httpx.head(server + "/health", timeout=30)  # uptime monitors use HEAD
    assert head.status_code == 200 and head.content == b""
    r = httpx.get(server + "/v1/models", timeout=30)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(server + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    for headers in (auth, {"x-api-key": API_KEY}, {"x-api-key": "", **auth}):  # an empty header vetoes nothing
        r = httpx.get(server + "/v1/models", headers=headers, timeout=30)
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [SMOL_ID]
    assert httpx.get(server + "/v1/models", auth=("tract", API_KEY), timeout=30).status_code == 200  # HTTP Basic
    assert httpx.get(server + "/v1/models", auth=("tract", "wrong"), timeout=30).status_code == 401
    assert httpx.get(server + "/rail/v1/models", headers=auth, timeout=30).status_code == 200
    assert httpx.get(server + "/load/v1/models", timeout=30).json()["data"][0]["id"] == LOAD_ID  # no key set
    # everything the app answers itself is OpenAI-shaped; an over-large header block is refused before the key
    for method, path, status, says in (("GET", "/nope", 404, "no such route"), ("GET", "/v1/judge", 405, "not allowed"),
                                       ("POST", "/fast/v1/judge", 404, "unknown mode prefix /fast")):
        r = httpx.request(method, server + path, headers=auth, timeout=30)
        assert r.status_code == status and says in r.json()["error"]["message"], r.text
    r = httpx.get(server + "/v1/models", headers={"x-padding": "a" * (40 << 10)}, timeout=30)
    assert r.status_code == 431 and "headers" in r.json()["error"]["message"]


def test_batched_equals_unbatched(server, auth, inputs, single_scores):
    r = _post(server, "/v1/judge", {"inputs": inputs, "mode": "rail"}, auth)
    assert r.status_code == 200, r.text
    assert _replica_batches("smol")[-1] == len(inputs), _replica_batches("smol")  # the three calls: one batch
    results = r.json()["results"]
    assert [x["id"] for x in results] == [x["id"] for x in inputs]
    for res in results:
        ref = single_scores[res["id"]]
        assert res["failure"] is None and res["mode"] == "rail"
        assert abs(res["score"] - ref["score"]) <= 1e-5
        dist = {int(k): v for k, v in res["distribution"].items()}
        assert sorted(dist) == [1, 2, 3, 4, 5]
        assert abs(sum(k * p for k, p in dist.items()) - res["score"]) < 1e-9  # ŷ = Σ v p (full softmax)
        assert 0 < sum(dist.values()) <= 1 + 1e-9
    assert len({round(x["score"], 6) for x in results}) > 1  # three inputs, three different judgements


def test_cot_rail_judgement(server, auth, inputs):
    body = {"input": dict(inputs[0], reference_answer="Plan your day, set priorities, avoid distractions."),
            "mode": "cot_rail", "n_cots": 2, "seed": 7}
    res = _post(server, "/v1/judge", body, auth).json()["result"]
    assert res["failure"] is None and res["mode"] == "cot_rail"
    assert len(res["cots"]) == 2 and len(res["per_cot"]) == 2
    assert res["cots"][0] != res["cots"][1]  # sampled (n_cots > 1), each CoT with its own seed
    assert abs(res["score"] - sum(res["per_cot"]) / 2) < 1e-9
    assert abs(res["spread"] - abs(res["per_cot"][0] - res["per_cot"][1])) < 1e-12
    assert all(1 <= s <= 5 for s in res["per_cot"])


def test_chat_completions_with_the_openai_sdk(server, inputs, single_scores):
    import openai

    from tract_dist.data.prompts import render_prompt, score_text
    from tract_dist.data.schema import JudgeExample

    x = inputs[1]
    prompt = render_prompt(JudgeExample(score=math.nan, **x))
    client = openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)
    out = client.chat.completions.create(model=SMOL_ID, messages=[{"role": "user", "content": prompt}],
                                         extra_body={"mode": "rail"}, temperature=0)
    text = out.choices[0].message.content
    tract = out.model_extra["tract"]
    assert abs(tract["score"] - single_scores[x["id"]]["score"]) <= 1e-5
    assert text.endswith(f"[RESULT] {score_text(tract['score'])}")
    assert out.model == SMOL_ID and out.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": prompt}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).chat.completions.create(
            model=SMOL_ID, messages=[{"role": "user", "content": prompt}])
    with pytest.raises(openai.UnprocessableEntityError, match="section '###Task Description:' missing"):
        client.chat.completions.create(model=SMOL_ID, messages=[{"role": "user", "content": "Rate this: hi"}])


def test_get_reward_openrlhf_protocol(server, auth, inputs, single_scores, tokenizers):
    """OpenRLHF posts chat-templated prompt+response queries (its prompts alongside in newer versions) and the
    rubric in labels; the reward is the RAIL score of (instruction, response) under that rubric, whatever the
    policy's chat template: a ChatML query (the judge's own) split by its prompt, a Llama-3 and a Mistral one
    by their detected templates. Template text is never graded: a query not in the template a request names,
    or one in a template the server does not know, is a 422 naming it."""
    xs = inputs[:3]
    queries, prompts = [], []
    for name, x in zip(("smollm2", "llama3", "mistral"), xs):
        tok = tokenizers[name]
        p = tok.apply_chat_template([{"role": "user", "content": x["instruction"]}], add_generation_prompt=True,
                                    tokenize=False)
        prompts.append(p)
        queries.append(p + x["response"] + tok.eos_token)
    labels = [json.dumps({"criteria": x["criteria"], "score_descriptions": x["score_descriptions"]}) for x in xs]
    # the first query's prompt is given; the others' are not (""): split at their template's assistant header
    r = _post(server, "/rail/get_reward", {"query": queries, "prompts": [prompts[0], "", ""], "labels": labels}, auth)
    assert r.status_code == 200, r.text
    rewards = r.json()["rewards"]
    assert [abs(r - single_scores[x["id"]]["score"]) <= 1e-5 for r, x in zip(rewards, xs)] == [True] * 3
    assert r.json()["scores"] == pytest.approx([(v - 1) / 4 for v in rewards])  # [0, 1], for dynamic filtering
    r = _post(server, "/get_reward", {"query": queries[2:], "labels": labels[2:], "policy_template": "llama3"}, auth)
    assert r.status_code == 422 and "query.0" in r.json()["error"]["message"]  # named wrong: refused
    plain = [f"<|user|>{xs[0]['instruction']}<|bot|>"]
    r = _post(server, "/get_reward", {"query": [plain[0] + "Fine."], "prompts": plain, "labels": labels[:1]}, auth)
    assert r.status_code == 422 and "chat-template text" in r.json()["error"]["message"], r.text


BAD = {  # (path, body or raw bytes, status, text the message must contain)
    "missing field": ("/v1/judge", {"input": {"instruction": "a", "criteria": "c",
                                              "score_descriptions": list("12345")}}, 422, "input.response"),
    "mistyped n_cots": ("/v1/judge", {"input": {}, "n_cots": "three"}, 422, "n_cots"),
    "seed as a string": ("/v1/judge", {"input": {"instruction": "a", "response": "b", "criteria": "c",
                                                 "score_descriptions": list("12345")}, "seed": "5"}, 422, "seed"),
    "n_cots as a boolean": ("/v1/chat/completions", {"model": SMOL_ID, "n_cots": True,
                                                     "messages": [{"role": "user", "content": "x"}]}, 422, "n_cots"),
    "mode twice, disagreeing": ("/rail/v1/judge", {"input": {"instruction": "a", "response": "b", "criteria": "c",
                                                             "score_descriptions": list("12345")}, "mode": "decode"},
                                422, "the path asks for 'rail'"),
    "chat content over the cap": ("/v1/chat/completions", {"model": SMOL_ID, "messages": [
        {"role": "user", "content": "x" * 400_001}]}, 422, "at most 400000"),
    "unknown mode": ("/v1/judge", {"inputs": [{"instruction": "a", "response": "b", "criteria": "c",
                                               "score_descriptions": list("12345")}], "mode": "vibes"},
                     422, "mode"),
    "unknown field": ("/v1/judge", {"input": {"instruction": "a", "response": "b", "criteria": "c",
                                              "score_descriptions": list("12345"), "respones": "x"}},
                      422, "unknown field 'respones'"),
    "over-long response": ("/v1/judge", {"input": {"instruction": "a", "response": "x" * 100_001, "criteria": "c",
                                                   "score_descriptions": list("12345")}}, 422, "input.response"),
    "wrong rubric size": ("/v1/judge", {"input": {"instruction": "a", "response": "b", "criteria": "c",
                                                  "score_descriptions": list("123")}}, 422,
                          "input.score_descriptions"),
    "too many inputs": ("/v1/judge", {"inputs": [{"instruction": "a", "response": "b", "criteria": "c",
                                                  "score_descriptions": list("12345")}] * 65}, 422, "inputs"),
    "not JSON": ("/v1/judge", b"{not json", 400, "JSON"),
    "oversize body": ("/v1/judge", b"{" + b" " * (1 << 20) + b"}", 413, "limit"),
    "stream": ("/v1/chat/completions", {"model": SMOL_ID, "stream": True,
                                        "messages": [{"role": "user", "content": "x"}]}, 422, "stream"),
    "no messages": ("/v1/chat/completions", {"model": SMOL_ID, "messages": []}, 422, "messages"),
    "query not a list": ("/get_reward", {"query": "a b"}, 422, "query"),
    "unsplittable query": ("/get_reward", {"query": ["no template here"], "labels": [""]}, 422, "query.0"),
    "rubric missing": ("/get_reward", {"query": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo"]},
                       422, "labels.0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_requests_are_4xx_naming_the_field(server, auth, case):
    path, body, status, needle = BAD[case]
    if isinstance(body, bytes):
        r = httpx.post(server + path, content=body, headers={**auth, "content-type": "application/json"}, timeout=60)
    else:
        r = _post(server, path, body, auth)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_replica_survives_bad_requests(server, auth, inputs, single_scores):
    """After every malformed request above, the same replica still answers the same score."""
    r = _post(server, "/v1/judge", {"input": inputs[0], "mode": "rail"}, auth)
    assert r.status_code == 200 and abs(r.json()["result"]["score"] - single_scores[inputs[0]["id"]]["score"]) <= 1e-5


def test_a_pathological_prompt_is_refused_at_once_while_a_valid_request_is_answered(server, auth, inputs,
                                                                                       single_scores):
    """The chat prompt that stalled every route (#22: the Prometheus section headers repeated, a backtracking
    regex), at ten times its reported size: a 422 naming the repeated header in well under a second, while a
    valid request sent at the same time is answered."""
    block = ("###Task Description:\nx\n\n###The instruction to evaluate:\nWhy?\n\n###Response to evaluate:\nr\n\n"
             "###Score Rubrics:\n[c]\nScore 1: a\n\n")
    evil = {"model": SMOL_ID, "messages": [{"role": "user", "content": block * 1050 + "###Feedback: "}]}
    assert len(evil["messages"][0]["content"]) > 130_000

    async def both():
        async with httpx.AsyncClient(base_url=server, headers=auth, timeout=120) as client:
            valid = asyncio.ensure_future(client.post("/v1/judge", json={"input": inputs[0], "mode": "rail"}))
            t = time.perf_counter()
            bad = await client.post("/v1/chat/completions", json=evil)
            return bad, time.perf_counter() - t, await valid

    bad, seconds, valid = asyncio.run(both())
    assert bad.status_code == 422 and "'###Task Description:' 1050 times" in bad.json()["error"]["message"]
    assert seconds < 1.0, seconds
    assert valid.status_code == 200
    assert abs(valid.json()["result"]["score"] - single_scores[inputs[0]["id"]]["score"]) <= 1e-5


def test_timed_out_and_abandoned_requests_stop_their_work(server, quickstart_examples):
    """A request past its deadline (504) and one whose client gave up both stop their generation on the replica
    (stopped before the budget, nothing left running), and the request sent right after each is answered at
    once. The slow app's CoTs run far past its 6 s deadline (serve_helpers.SLOW_BUDGET says why), yet its work
    bound lets them in."""
    import glob

    import ray

    url = server + "/slow/v1/judge"
    xs = short_inputs(quickstart_examples, 4, chars=200)
    long = {"inputs": xs, "mode": "cot_rail", "n_cots": 16, "seed": 1}  # 64 sampled rows
    quick = {"input": xs[0], "mode": "rail"}
    assert httpx.post(url, json=quick, timeout=60).status_code == 200  # warm
    before = _activity("slow")["counts"]

    t = time.perf_counter()
    r = httpx.post(url, json=long, timeout=120)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    assert SLOW_TIMEOUT_S - 0.5 < time.perf_counter() - t < SLOW_TIMEOUT_S + 10
    t = time.perf_counter()
    assert httpx.post(url, json=quick, timeout=60).status_code == 200
    assert time.perf_counter() - t < 5.0  # not queued behind the 504's CoTs (they would run for 12-60 s more)
    stopped = _idle("slow")["recent_stops"][-4:]
    assert len(stopped) == 4 and all(s.split(":")[0] in ("deadline", "cancelled") for s in stopped), stopped
    assert all(int(s.split("stopped after ")[1].split(" of")[0]) < SLOW_BUDGET for s in stopped), stopped

    with pytest.raises(httpx.ReadTimeout):  # the client gives up and disconnects
        httpx.post(url, json=dict(long, seed=2), timeout=2.0)
    t = time.perf_counter()
    assert httpx.post(url, json=quick, timeout=60).status_code == 200
    assert time.perf_counter() - t < 5.0
    after = _idle("slow")
    assert after["counts"].get("cancelled", 0) - before.get("cancelled", 0) >= 4
    assert all(s.startswith("cancelled: stopped after ") for s in after["recent_stops"][-4:]), after["recent_stops"]
    logs = ray._private.worker._global_node.get_logs_dir_path()
    for f in glob.glob(logs + "/worker-*.err"):  # a disconnect used to log a CancelledError traceback
        with open(f, errors="replace") as fh:
            assert "exception was never retrieved" not in fh.read(), f


def test_real_clients_in_the_default_mode_and_in_rail(server, inputs, single_scores, tokenizers, monkeypatch):
    """The client libraries as users run them, against the served SmolLM2, in the default mode (cot_rail, one
    greedy CoT of at most 8 tokens) and in rail (the /rail path prefix, for clients that cannot add a field):
    the openai SDK, sync and async, retries on (its default); LiteLLM through prometheus-eval's absolute
    grading, sync and async; and OpenRLHF's remote reward request built as its SingleTurnAgentExecutor builds it
    (aiohttp, the policy's decoded Llama-3 prompt+response, the key as the URL's user info). All at once, so
    the replica batches them. Each answer equals /v1/judge's score for the same fields, the text ends with
    "[RESULT] n" (n: ŷ rounded), every client posted exactly once (no retries) and nothing is left running."""
    import os
    import threading

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list from the internet
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # prometheus-eval's LiteLLM passes no key: LiteLLM reads it
    try:
        import litellm  # noqa: F401
        import prometheus_eval  # noqa: F401
    except ImportError as e:  # CI installs them (scripts/setup-env.sh, requirements/clients.txt)
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"client libraries not installed ({e}); see requirements/clients.txt")
    import aiohttp
    import openai
    from prometheus_eval import PrometheusEval
    from prometheus_eval.litellm import AsyncLiteLLM, LiteLLM
    from prometheus_eval.prompts import ABSOLUTE_PROMPT_WO_REF, SCORE_RUBRIC_TEMPLATE

    from tract_dist.data.prompts import parse_prompt, render_prompt, score_text
    from tract_dist.data.schema import JudgeExample

    x = inputs[2]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = _post(server, "/v1/judge", {"input": x, "mode": "cot_rail"}, auth)
    assert r.status_code == 200, r.text
    refs = {"cot_rail": r.json()["result"]["score"], "rail": single_scores[x["id"]]["score"]}
    calls_before = _activity("smol")["counts"]["calls"]
    prompt = render_prompt(JudgeExample(score=math.nan, **x))
    rubric = SCORE_RUBRIC_TEMPLATE.format(criteria=x["criteria"], **{f"score{k + 1}_description": d for k, d in
                                                                     enumerate(x["score_descriptions"])})
    # prometheus-eval 0.1.20's template words step 3 slightly differently from its benchmark data (no
    # "Feedback: " before "(write a feedback"); the server parses the fields and renders the judge's own layout
    sent = parse_prompt(ABSOLUTE_PROMPT_WO_REF.format(instruction=x["instruction"], response=x["response"],
                                                      rubric=rubric))
    assert {k: sent[k] for k in x if k != "id"} == {k: v for k, v in x.items() if k != "id"}
    policy = tokenizers["llama3"]  # OpenRLHF: the policy's chat template, not the judge's (ChatML)
    policy_prompt = policy.apply_chat_template([{"role": "user", "content": x["instruction"]}], tokenize=False,
                                               add_generation_prompt=True)
    prompt_ids = policy(text=policy_prompt, add_special_tokens=False)["input_ids"]
    action_ids = policy(text=x["response"], add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
    query = policy.decode(prompt_ids + action_ids, skip_special_tokens=False)
    label = json.dumps({"criteria": x["criteria"], "score_descriptions": x["score_descriptions"]})
    host = server.removeprefix("http://")
    out: dict[tuple[str, str], object] = {}

    def base(mode):
        return server + ("/rail" if mode == "rail" else "")

    def openai_sync(mode):
        c = openai.OpenAI(base_url=base(mode) + "/v1", api_key=API_KEY)
        out["openai", mode] = c.chat.completions.create(model=SMOL_ID, messages=[{"role": "user", "content": prompt}])

    async def openai_async(mode):
        c = openai.AsyncOpenAI(base_url=base(mode) + "/v1", api_key=API_KEY)
        out["openai-async", mode] = await c.chat.completions.create(
            model=SMOL_ID, messages=[{"role": "user", "content": prompt}])

    def prometheus(mode):
        judge = PrometheusEval(model=LiteLLM(f"openai/{SMOL_ID}", api_base=base(mode) + "/v1"),
                               absolute_grade_template=ABSOLUTE_PROMPT_WO_REF)
        out["prometheus", mode] = judge.single_absolute_grade(instruction=x["instruction"], response=x["response"],
                                                              rubric=rubric)

    def prometheus_async(mode):  # absolute_grade runs its own event loop (asyncio.run): a thread of its own
        judge = PrometheusEval(model=AsyncLiteLLM(f"openai/{SMOL_ID}", api_base=base(mode) + "/v1"),
                               absolute_grade_template=ABSOLUTE_PROMPT_WO_REF)
        out["prometheus-async", mode] = judge.absolute_grade(instructions=[x["instruction"]],
                                                             responses=[x["response"]], rubric=rubric)

    async def openrlhf(mode):  # as openrlhf/utils/agent.py _fetch_rewards_via_http posts it
        url = f"http://tract:{API_KEY}@{host}{'/rail' if mode == 'rail' else ''}/get_reward"
        payload = {"query": [query], "prompts": [policy_prompt], "labels": [label]}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            async with session.post(url, json=payload) as response:
                response.raise_for_status()
                out["openrlhf", mode] = await response.json()

    async def everything():
        threads = [threading.Thread(target=f, args=(m,)) for f in (openai_sync, prometheus, prometheus_async)
                   for m in refs]
        for t in threads:
            t.start()
        await asyncio.gather(*(f(m) for f in (openai_async, openrlhf) for m in refs))
        for t in threads:
            await asyncio.to_thread(t.join, 300)

    asyncio.run(everything())
    assert len(out) == 10, sorted(out)
    for mode, ref in refs.items():
        n = score_text(ref)
        for client in ("openai", "openai-async"):
            completion = out[client, mode]
            assert abs(completion.model_extra["tract"]["score"] - ref) <= 1e-5, (client, mode)
            assert completion.choices[0].message.content.endswith(f"[RESULT] {n}"), (client, mode)
        feedback, score = out["prometheus", mode]
        assert score == int(n) and feedback.endswith(f"[RESULT] {n}"), (mode, feedback, score)
        feedbacks, scores = out["prometheus-async", mode]
        assert scores == [int(n)] and feedbacks[0].endswith(f"[RESULT] {n}"), (mode, feedbacks, scores)
        reward = out["openrlhf", mode]
        assert abs(reward["rewards"][0] - ref) <= 1e-5
        assert reward["scores"][0] == pytest.approx((reward["rewards"][0] - 1) / 4)
    for mode in refs:  # the default mode really is cot_rail (one CoT), and the path prefix really chose rail
        tract = out["openai", mode].model_extra["tract"]
        assert (tract["mode"], len(tract["cots"])) == (mode, 1 if mode == "cot_rail" else 0)
    after = _idle("smol")
    assert after["counts"]["calls"] - calls_before == 10  # one call per client request: no retry, no duplicate
    # OpenRLHF without a key: the same request to the app that has none
    r = httpx.post(server + "/load/rail/get_reward", json={"query": [query], "prompts": [policy_prompt],
                                                            "labels": [label]}, timeout=120)
    assert r.status_code == 200 and len(r.json()["rewards"]) == 1


def test_load_with_a_replica_killed(server, tiny_export, quickstart_examples):
    """200 requests, 16 at a time, to the two-replica app; one replica is killed (ray.kill) after 60 answers.
    Every request is answered exactly once: 200 with its own id and the score the input has when judged alone
    in-process, or a clear 503; nothing is lost or mixed up."""
    import ray

    from tract_dist.judge import Judge

    pool = short_inputs(quickstart_examples, 8, chars=200)
    reference = Judge.from_config(judge_config(tiny_export), tiny_export)
    ref = {x["id"]: reference.score(x, mode="rail").score for x in pool}  # each input alone
    answers: dict[str, list[tuple[int, dict]]] = {}
    killed: list[str] = []

    def kill_one_replica() -> None:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::load#JudgeModel")]
        assert len(names) == 2, names
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        killed.append(names[0])

    async def run() -> None:
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server + "/load", timeout=90) as client:
            async def one(i: int) -> None:
                x = dict(pool[i % len(pool)])
                rid = f"req-{i}"
                async with sem:
                    r = await client.post("/v1/judge", json={"input": dict(x, id=rid), "mode": "rail"})
                answers.setdefault(rid, []).append((r.status_code, r.json()))
                if len(answers) == 60 and not killed:
                    await asyncio.to_thread(kill_one_replica)

            await asyncio.gather(*(one(i) for i in range(200)))

    asyncio.run(run())
    assert killed and sorted(answers) == sorted(f"req-{i}" for i in range(200))
    assert all(len(v) == 1 for v in answers.values())
    statuses = {rid: v[0][0] for rid, v in answers.items()}
    assert set(statuses.values()) <= {200, 503}, statuses
    for rid, [(status, body)] in answers.items():
        if status == 503:
            assert "replica" in body["error"]["message"]
            continue
        res = body["result"]
        x = pool[int(rid.split("-")[1]) % len(pool)]
        assert res["id"] == rid and res["failure"] is None
        assert abs(res["score"] - ref[x["id"]]) <= 1e-5, (rid, res["score"], ref[x["id"]])
    assert sum(s == 200 for s in statuses.values()) >= 190  # a dead replica's calls are retried on the other


def test_relative_grading_judge_chat_litellm_and_pairwise_reward(server, auth, inputs, monkeypatch):
    """Relative grading (#29 item 3) on the served SmolLM2, in rail (the verdict read right after the prompt):
    /v1/judge with a pair judged in both orders (p(A) renormalised over the verdict tokens, the swapped order's
    p(A) the one a pair with A and B exchanged gets); the openai SDK with prometheus-eval's relative prompt (the
    verdict in the text, p(A) in the tract field, equal to /v1/judge's); prometheus-eval's relative_grade
    through LiteLLM (its parser reads the verdict); OpenRLHF's reward request asking for a pairwise reward (the
    debiased p(A) of the policy's response against the label's compare_to). A malformed pair is a 422 naming
    the field."""
    import openai
    from prometheus_eval import PrometheusEval
    from prometheus_eval.litellm import LiteLLM
    from prometheus_eval.prompts import RELATIVE_PROMPT_WO_REF

    from tract_dist.data.relative import REL_SYSTEM_PROMPT, PairExample, render_relative_prompt

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    a, b = inputs[0], inputs[1]
    pair = {"id": "p", "instruction": a["instruction"], "response_a": a["response"], "response_b": b["response"],
            "rubric": a["criteria"]}
    flipped = dict(pair, id="q", response_a=pair["response_b"], response_b=pair["response_a"])
    r = _post(server, "/v1/judge", {"inputs": [pair, flipped], "mode": "rail", "swap": True}, auth)
    assert r.status_code == 200, r.text
    res, flip = r.json()["results"]
    assert res["failure"] is None and res["mode"] == "rail" and 0 < res["p_a"] < 1 and 0 < res["mass"] <= 1
    assert res["verdict"] == ("A" if res["p_a"] > 0.5 else "B")
    assert abs(res["swapped"]["p_a"] - flip["p_a"]) <= 1e-5 and abs(flip["swapped"]["p_a"] - res["p_a"]) <= 1e-5
    assert res["p_a_debiased"] == pytest.approx((res["p_a"] + 1 - res["swapped"]["p_a"]) / 2)

    prompt = render_relative_prompt(PairExample(preference=math.nan, **pair))
    client = openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)
    out = client.chat.completions.create(model=SMOL_ID, extra_body={"mode": "rail"}, messages=[
        {"role": "system", "content": REL_SYSTEM_PROMPT}, {"role": "user", "content": prompt}])
    tract = out.model_extra["tract"]
    assert abs(tract["p_a"] - res["p_a"]) <= 1e-5 and out.choices[0].message.content == f"[RESULT] {res['verdict']}"

    judge = PrometheusEval(model=LiteLLM(f"openai/{SMOL_ID}", api_base=server + "/rail/v1"),
                           relative_grade_template=RELATIVE_PROMPT_WO_REF)
    feedback, verdict = judge.single_relative_grade(instruction=pair["instruction"], response_A=pair["response_a"],
                                                    response_B=pair["response_b"], rubric=pair["rubric"])
    assert verdict == res["verdict"] and feedback.endswith(f"[RESULT] {verdict}")

    query = f"<|im_start|>user\n{pair['instruction']}<|im_end|>\n<|im_start|>assistant\n{pair['response_a']}"
    label = json.dumps({"compare_to": pair["response_b"], "rubric": pair["rubric"]})
    r = _post(server, "/rail/get_reward", {"query": [query], "labels": [label]}, auth)
    assert r.status_code == 200, r.text
    assert abs(r.json()["rewards"][0] - res["p_a_debiased"]) <= 1e-5 and r.json()["scores"] == r.json()["rewards"]

    bad = _post(server, "/v1/judge", {"input": {k: v for k, v in pair.items() if k != "rubric"}}, auth)
    assert bad.status_code == 422 and "input.rubric" in bad.json()["error"]["message"], bad.text
