"""The HTTP side of the judge server: a FastAPI app as a Serve ingress deployment in front of the judge replicas.

Why a separate ingress: it validates and authenticates every request without a model, so a malformed body is
a 4xx before any replica sees it; it fans a list of inputs out as one call per input (``serve.batch`` in the
replicas regroups them across clients); and it holds the per-request deadline and the retry when a replica
dies (the judgement is deterministic given its seed, so a retry on another replica gives the same answer).
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` so the openai SDK raises with
the message.

The API key never reaches Ray: the ingress gets only its SHA-256 and compares digests in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from tract_dist.serve.prompting import RequestError, chat_to_fields, completion_text, rubric_from_label
from tract_dist.serve.schemas import (MAX_BODY_BYTES, ChatCompletionRequest, JudgeInput, JudgeRequest,
                                      RewardRequest, describe_errors)

DEFAULT_REQUEST_TIMEOUT_S = 120.0
"""Deadline of one HTTP request (all its inputs): a CoT-RAIL judgement of 512 new tokens takes ~10-30 s on a
CPU replica, well under a second on a GPU; a request still waiting then is answered 504, not left hanging."""
REPLICA_RETRIES = 2  # a call whose replica died is retried this many times on the others, then 503


@dataclass(frozen=True)
class IngressSettings:
    model_id: str
    api_key_sha256: str | None = None  # None: no key required
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    max_body_bytes: int = MAX_BODY_BYTES
    default_rubric: dict[str, Any] | None = None  # /get_reward's rubric when a label gives none
    created: int = field(default_factory=lambda: int(time.time()))


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                        status_code=e.status)


api = FastAPI(title="tract-dist judge", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e)


@api.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:  # never a traceback to the client
    import traceback

    traceback.print_exc()  # the replica's log (request bodies and keys are never printed)
    return error_response(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))


_REPLICA_GONE: tuple[type[BaseException], ...] = ()


def _replica_gone_errors() -> tuple[type[BaseException], ...]:
    global _REPLICA_GONE
    if not _REPLICA_GONE:
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

        _REPLICA_GONE = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)
    return _REPLICA_GONE


def _judgement(input_id: str | None, r: dict[str, Any]) -> dict[str, Any]:
    """The answer for one input: ŷ, the mean distribution, per-CoT ŷ and CoTs, their spread, any failure."""
    per = [x for x in (r.get("per_cot") or []) if x is not None]
    spread = (max(per) - min(per)) if len(per) > 1 else 0.0 if per else None
    std = None
    if per:
        m = sum(per) / len(per)
        std = (sum((x - m) ** 2 for x in per) / len(per)) ** 0.5
    out = {"score": r.get("score"), "distribution": r.get("distribution") or {}, "per_cot": r.get("per_cot") or [],
           "cots": r.get("cots") or [], "spread": spread, "std": std, "mode": r.get("mode"),
           "failure": r.get("failure"), "truncated": bool(r.get("truncated")),
           "unparseable": r.get("unparseable", 0), "empty_cots": r.get("empty_cots", 0)}
    return {"id": input_id, **out} if input_id is not None else out


# Serve pickles the class when it is decorated: every module-level name it uses must be defined above.
@serve.deployment(name="JudgeServer", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=256)
@serve.ingress(api)
class JudgeServer:
    """Routes: POST /v1/judge, /v1/chat/completions, /get_reward; GET /health, /v1/models."""

    def __init__(self, judge: Any, settings: IngressSettings):
        self.judge = judge
        self.settings = settings
        self.info: dict[str, Any] | None = None

    # -- plumbing --------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        want = self.settings.api_key_sha256
        if want is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given or not hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), want):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                           kind="authentication_error", code="invalid_api_key")

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        self._authorize(request)
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body.strip():
            raise ApiError(400, "empty request body: expected a JSON object")
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            msg, param = describe_errors(e)
            status = 400 if any(err.get("type") == "json_invalid" for err in e.errors()) else 422
            raise ApiError(status, msg, param=param) from None

    async def _info(self) -> dict[str, Any]:
        if self.info is None:
            self.info = await self._call("describe")
        return self.info

    async def _call(self, method: str, *args: Any) -> Any:
        """One call to a judge replica; retried on another replica if the one serving it died."""
        from ray.serve.exceptions import BackPressureError

        last: BaseException | None = None
        for attempt in range(REPLICA_RETRIES + 1):
            try:
                return await getattr(self.judge, method).remote(*args)
            except BackPressureError:
                raise ApiError(503, "the judge is overloaded (its queue is full); retry later", kind="server_error",
                               code="overloaded") from None
            except _replica_gone_errors() as e:
                last = e
                await asyncio.sleep(0.5 * (attempt + 1))
        raise ApiError(503, f"no judge replica could answer (tried {REPLICA_RETRIES + 1} times; last: "
                            f"{type(last).__name__}); retry later", kind="server_error", code="replica_unavailable")

    async def _judge_all(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        tasks = [asyncio.ensure_future(self._call("score", c)) for c in calls]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*tasks), self.settings.request_timeout_s))
        except asyncio.TimeoutError:
            raise ApiError(504, f"the judge did not answer within {self.settings.request_timeout_s:g} s "
                                f"({len(calls)} input(s)); send fewer inputs or raise --request-timeout-s",
                           kind="server_error", code="timeout") from None
        finally:
            for t in tasks:
                t.cancel()

    @staticmethod
    def _call_for(fields: dict[str, Any], mode: Any, n_cots: Any, seed: Any) -> dict[str, Any]:
        return {"fields": fields, "mode": mode, "n_cots": n_cots, "seed": seed}

    @staticmethod
    def _check_scale(inputs: list[JudgeInput], info: dict[str, Any], paths: list[str]) -> None:
        lo, hi = info["scale"]
        for x, path in zip(inputs, paths):
            if len(x.score_descriptions or []) != hi - lo + 1:
                raise ApiError(422, f"{path}.score_descriptions: {len(x.score_descriptions or [])} descriptions; "
                                    f"this judge scores {lo}-{hi} ({hi - lo + 1} descriptions)",
                               param=f"{path}.score_descriptions")

    # -- routes ----------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self._call("describe"), 10)
        except (ApiError, asyncio.TimeoutError):
            return error_response(ApiError(503, "no judge replica answers", kind="server_error"))
        return JSONResponse({"status": "ok", "model": self.settings.model_id, "backend": info["backend"]})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": self.settings.model_id, "object": "model",
                                                          "created": self.settings.created,
                                                          "owned_by": "tract-dist"}]})

    @api.post("/v1/judge")
    async def judge_route(self, request: Request) -> JSONResponse:
        req: JudgeRequest = await self._body(request, JudgeRequest)
        info = await self._info()
        key = "input" if req.input is not None else "inputs"
        inputs = req.all_inputs()
        self._check_scale(inputs, info, ["input"] if key == "input" else [f"inputs.{i}" for i in range(len(inputs))])
        calls = [self._call_for(x.fields(i), req.mode, req.n_cots, req.seed) for i, x in enumerate(inputs)]
        results = await self._judge_all(calls)
        out = [_judgement(c["fields"]["id"], r) for c, r in zip(calls, results)]
        return JSONResponse({"model": self.settings.model_id,
                             **({"result": out[0]} if key == "input" else {"results": out})})

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> JSONResponse:
        req: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        if req.model != self.settings.model_id:
            raise ApiError(404, f"model: {req.model!r} is not served here; this server serves "
                                f"{self.settings.model_id!r} (GET /v1/models)", param="model", code="model_not_found")
        info = await self._info()
        scale = tuple(info["scale"])
        try:
            fields = chat_to_fields(req.messages, scale)
        except RequestError as e:
            raise ApiError(422, str(e), param=e.field) from None
        fields["id"] = "0"
        result = (await self._judge_all([self._call_for(fields, req.mode, req.n_cots, req.seed)]))[0]
        if result.get("score") is None:
            raise ApiError(422, f"the judge produced no score: {result.get('failure')}", kind="judge_error",
                           code="no_score")
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.settings.model_id,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": completion_text(result, scale)}}],
            "usage": None,
            "tract": _judgement(None, result),
        })

    @api.post("/get_reward")
    async def get_reward(self, request: Request) -> JSONResponse:
        req: RewardRequest = await self._body(request, RewardRequest)
        info = await self._info()
        splits = await self._call("split_queries", req.query, req.prompts)
        calls = []
        for i, s in enumerate(splits):
            if "error" in s:
                raise ApiError(422, s["error"], param=s["field"])
            try:
                rubric = rubric_from_label(req.labels[i] if req.labels else None, self.settings.default_rubric, i)
                x = JudgeInput(instruction=s["instruction"], response=s["response"], **rubric)
            except RequestError as e:
                raise ApiError(422, str(e), param=e.field) from None
            except ValidationError as e:
                msg, _ = describe_errors(e)
                raise ApiError(422, f"labels.{i}: {msg}", param=f"labels.{i}") from None
            self._check_scale([x], info, [f"labels.{i}"])
            calls.append(self._call_for(x.fields(i), req.mode, req.n_cots, req.seed))
        results = await self._judge_all(calls)
        bad = [i for i, r in enumerate(results) if r.get("score") is None]
        if bad:
            i = bad[0]
            raise ApiError(422, f"query.{i}: the judge produced no score: {results[i].get('failure')} "
                                f"({len(bad)} of {len(results)} queries)", param=f"query.{i}", kind="judge_error",
                           code="no_score")
        return JSONResponse({"rewards": [r["score"] for r in results],
                             "details": [_judgement(None, r) for r in results]})

