"""The judge server over real HTTP on 127.0.0.1: every endpoint, the openai SDK, bad requests, a bounded load
with a replica killed in the middle. One Serve (tests/serve/conftest.py) for the whole module.

References are independent of the code under test where it matters: a batched request against the same inputs
sent one per request (a batch of one each), the chat and reward answers against /v1/judge's score for the same
fields, and the load test's scores against an in-process ``Judge`` scoring each input alone.
"""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from serve_helpers import API_KEY, LOAD_ID, SMOL_ID, judge_config, short_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _post(server, path, body, auth=None, **kw):
    return httpx.post(server + path, json=body, headers=auth or {}, timeout=120, **kw)


def _replica_batches(app: str) -> list[int]:
    from ray import serve

    return serve.get_deployment_handle("JudgeModel", app).recent_batch_sizes.remote().result(timeout_s=30)


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
    r = httpx.get(server + "/v1/models", timeout=30)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(server + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    for headers in (auth, {"x-api-key": API_KEY}):
        r = httpx.get(server + "/v1/models", headers=headers, timeout=30)
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [SMOL_ID]
    assert httpx.get(server + "/load/v1/models", timeout=30).json()["data"][0]["id"] == LOAD_ID  # no key set


def test_batched_equals_unbatched(server, auth, inputs, single_scores):
    r = _post(server, "/v1/judge", {"inputs": inputs, "mode": "rail"}, auth)
    assert r.status_code == 200, r.text
    assert _replica_batches("smol")[-1] == len(inputs)  # the three calls were one forward batch
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
    rubric in labels; the reward is the RAIL score of (instruction, response) under that rubric."""
    tok = tokenizers["smollm2"]
    xs = inputs[:2]
    prompts = [tok.apply_chat_template([{"role": "user", "content": x["instruction"]}], add_generation_prompt=True,
                                       tokenize=False) for x in xs]
    queries = [p + x["response"] + tok.eos_token for p, x in zip(prompts, xs)]
    labels = [json.dumps({"criteria": x["criteria"], "score_descriptions": x["score_descriptions"]}) for x in xs]
    # the first query's prompt is given; the second's is not (""): split at the template's assistant header
    r = _post(server, "/get_reward", {"query": queries, "prompts": [prompts[0], ""], "labels": labels,
                                      "mode": "rail"}, auth)
    assert r.status_code == 200, r.text
    rewards = r.json()["rewards"]
    assert [abs(r - single_scores[x["id"]]["score"]) <= 1e-5 for r, x in zip(rewards, xs)] == [True, True]


BAD = {  # (path, body or raw bytes, status, text the message must contain)
    "missing field": ("/v1/judge", {"input": {"instruction": "a", "criteria": "c",
                                              "score_descriptions": list("12345")}}, 422, "input.response"),
    "mistyped n_cots": ("/v1/judge", {"input": {}, "n_cots": "three"}, 422, "n_cots"),
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
