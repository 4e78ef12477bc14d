"""The HTTP side of the judge server: a FastAPI app as a Serve ingress deployment in front of the judge replicas.

Why a separate ingress: it validates and authenticates every request without a model, so a malformed body is
a 4xx before any replica sees it; it fans a list of inputs out as one call per input (``serve.batch`` in the
replicas regroups them across clients); and it holds the per-request deadline and the retry when a replica
dies (the judgement is deterministic given its seed, so a retry on another replica gives the same answer).
Every error, FastAPI's own 404 and 405 and an unexpected 500 included, uses OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` so the openai SDK raises with the message.

No request can stall the event loop: bodies and headers are capped, prompt parsing is linear in the text, and
validation, prompt parsing and query splitting run in a worker thread (``asyncio.to_thread``).

The deadline travels: each call to a replica carries the request's deadline (Unix time), the replica stops
the input's generation there, and a request the ingress gives up on (504) or whose client disconnects has its
replica calls cancelled (``DeploymentResponse.cancel``), which frees their batch slots at once. A request whose
generation cannot finish before the deadline at the replica's measured decode speed is refused up front (422).

Authentication: ``Authorization: Bearer KEY``, ``x-api-key: KEY`` or HTTP Basic with the key as the password
(``http://tract:KEY@host:8000/get_reward``: what OpenRLHF's aiohttp client, and ``requests``, send for a URL
with user info; OpenRLHF sends no other header a key could go in). The key never reaches Ray: the ingress gets
only its SHA-256 and compares digests in constant time.

Clients that cannot add body fields (OpenRLHF, prometheus-eval's LiteLLM) choose the mode by path:
``/rail/get_reward``, ``/rail/v1/chat/completions`` (an OpenAI ``base_url`` of ``http://host:8000/rail/v1``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tract_dist.serve.prompting import (RequestError, chat_to_fields, chat_to_pair, completion_text,
                                        pair_completion_text, pair_from_label, rubric_from_label)
from tract_dist.serve.schemas import (MAX_BODY_BYTES, MAX_HEADER_BYTES, ChatCompletionRequest, JudgeInput,
                                      JudgeRequest, PairInput, RewardRequest, describe_errors)
from tract_dist.serve.templates import ChatTemplate, split_query

logger = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_S = 120.0
"""Deadline of one HTTP request (all its inputs): a RAIL read-out takes ~1-2 s on a 2-core CPU replica, a
CoT-RAIL judgement of 512 new tokens minutes there and seconds on a GPU; a request still waiting then is
answered 504 and its work on the replica stopped, not left hanging."""
REPLICA_RETRIES = 2  # a call whose replica died is retried this many times on the others, then 503
MODES = ("cot_rail", "decode", "rail")


@dataclass(frozen=True)
class IngressSettings:
    model_id: str
    api_key_sha256: str | None = None  # None: no key required
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    max_body_bytes: int = MAX_BODY_BYTES
    default_rubric: dict[str, Any] | None = None  # /get_reward's rubric when a label gives none
    policy_template: str = "auto"  # /get_reward's query template when a request names none
    created: int = field(default_factory=lambda: int(time.time()))


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                        status_code=e.status, headers=e.headers)


class HeaderLimit:
    """ASGI middleware: a request whose headers (names and values) exceed ``MAX_HEADER_BYTES`` is answered 431
    before routing and authentication."""

    def __init__(self, app: Any, max_bytes: int = MAX_HEADER_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            size = sum(len(k) + len(v) for k, v in scope.get("headers") or ())
            if size > self.max_bytes:
                e = ApiError(431, f"request headers of {size} bytes are over the limit of {self.max_bytes} bytes",
                             code="headers_too_large")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped answers for everything FastAPI would answer itself (404, 405, 422) or crash on (500), and
    silence for a client that went away."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404:
            msg = f"no such route: {where} (POST /v1/judge, /v1/chat/completions, /get_reward, optionally under " \
                  f"a mode prefix such as /rail; GET /health, /v1/models)"
            return error_response(ApiError(404, msg, code="not_found"))
        if e.status_code == 405:
            return error_response(ApiError(405, f"method not allowed: {where} (allowed: "
                                                f"{(e.headers or {}).get('Allow', '?')})", code="method_not_allowed",
                                           headers=dict(e.headers or {})))
        return error_response(ApiError(e.status_code, str(e.detail), headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(422, "; ".join(str(x.get("msg")) for x in e.errors()[:5])))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect) -> JSONResponse:
        return error_response(ApiError(400, "the client disconnected before its request body arrived"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:  # never a traceback to the client
        logger.exception("judge server: unexpected error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))


api = FastAPI(title="tract-dist judge", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)
api.add_middleware(HeaderLimit)


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


def _pair_judgement(input_id: str | None, r: dict[str, Any]) -> dict[str, Any]:
    """The answer for one pair: p(A) (renormalised over the verdict tokens), the verdict, per-comparison p(A)
    and comparisons, any failure; with the swap check the swapped order's answer and the debiased p(A)."""
    out = {"p_a": r.get("p_a"), "verdict": r.get("verdict"), "per_cot": r.get("per_cot") or [],
           "cots": r.get("cots") or [], "mass": r.get("mass"), "mode": r.get("mode"), "failure": r.get("failure"),
           "truncated": bool(r.get("truncated")), "unparseable": r.get("unparseable", 0)}
    sw = r.get("swapped")
    if sw is not None:
        out["swapped"] = _pair_judgement(None, sw)
        ok = r.get("p_a") is not None and sw.get("p_a") is not None
        out["p_a_debiased"] = (r["p_a"] + 1.0 - sw["p_a"]) / 2.0 if ok else None
    return {"id": input_id, **out} if input_id is not None else out


def _credentials(request: Request) -> list[str]:
    """Every non-empty key the request offers: x-api-key, a Bearer token, or HTTP Basic's password (its user
    name when the password is empty: ``http://KEY@host``). An empty header offers nothing, so it vetoes nothing."""
    out = []
    x = (request.headers.get("x-api-key") or "").strip()
    if x:
        out.append(x)
    scheme, _, value = (request.headers.get("authorization") or "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        out.append(value)
    elif scheme.lower() == "basic" and value:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        if password or user:
            out.append(password or user)
    return out


def _parse_body(model: type[BaseModel], body: bytes) -> Any:
    """pydantic validation of a JSON body (run in a worker thread): the model, or an ApiError naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        msg, param = describe_errors(e)
        status = 400 if any(err.get("type") == "json_invalid" for err in e.errors()) else 422
        raise ApiError(status, msg, param=param) from None


def _least_cots(n_cots: int | str) -> int:
    """The fewest CoTs an input is judged with: ``evaluation.num_cots: auto`` draws at least MIN_COTS."""
    from tract_dist.judge.adaptive import MIN_COTS

    return MIN_COTS if n_cots == "auto" else int(n_cots)


def _work_bound(info: dict[str, Any], mode: str, n_cots: int | str, n_inputs: int) -> float:
    """A lower bound on a request's generation time: the replica's engine runs its rows in passes of
    ``rows_per_pass``, each at least ``max_new_tokens`` decode steps of one sequence. 0 for rail (no CoT)."""
    if mode == "rail":
        return 0.0
    passes = math.ceil(n_inputs * _least_cots(n_cots) / max(int(info["rows_per_pass"]), 1))
    return passes * int(info["max_new_tokens"]) * float(info["decode_step_s"])


def _reward_calls(req: RewardRequest, info: dict[str, Any], settings: IngressSettings) -> list[dict[str, Any]]:
    """Each query split into (instruction, response) and given its rubric (run in a worker thread); a label
    with ``compare_to`` makes it a pair (``task``: relative, judged in both orders)."""
    judge_t = ChatTemplate.from_dict(info["template"]) if info.get("template") else None
    template = req.policy_template or settings.policy_template
    lo, hi = info["scale"]
    fields = []
    for i, q in enumerate(req.query):
        try:
            ins, resp = split_query(q, req.prompts[i] if req.prompts else None, i, template=template, judge=judge_t)
            pair = pair_from_label(req.labels[i] if req.labels else None, settings.default_rubric, i)
            if pair is not None:
                p = PairInput(instruction=ins, response_a=resp, response_b=pair["compare_to"], rubric=pair["rubric"],
                              reference_answer=pair["reference_answer"])
                fields.append({"task": "relative", "swap": True, **p.fields(i)})
                continue
            rubric = rubric_from_label(req.labels[i] if req.labels else None, settings.default_rubric, i)
            x = JudgeInput(instruction=ins, response=resp, **rubric)
        except RequestError as e:
            raise ApiError(422, str(e), param=e.field) from None
        except ValidationError as e:
            msg, _ = describe_errors(e)
            raise ApiError(422, f"labels.{i}: {msg}", param=f"labels.{i}") from None
        if len(x.score_descriptions or []) != hi - lo + 1:
            raise ApiError(422, f"labels.{i}.score_descriptions: {len(x.score_descriptions or [])} descriptions; "
                                f"this judge scores {lo}-{hi} ({hi - lo + 1} descriptions)",
                           param=f"labels.{i}.score_descriptions")
        fields.append(x.fields(i))
    return fields


# Serve pickles the class when it is decorated: every module-level name it uses must be defined above.
@serve.deployment(name="JudgeServer", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=256)
@serve.ingress(api)
class JudgeServer:
    """Routes: POST /v1/judge, /v1/chat/completions, /get_reward (each also under /cot_rail, /decode, /rail);
    GET|HEAD /health; GET /v1/models."""

    def __init__(self, judge: Any, settings: IngressSettings):
        self.judge = judge
        self.settings = settings
        self.info: dict[str, Any] | None = None

    # -- plumbing --------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        want = self.settings.api_key_sha256
        if want is None:
            return
        ok = False
        for given in _credentials(request):  # every offered key is compared (constant time each)
            ok |= hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), want)
        if not ok:
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY', 'x-api-key: KEY', or "
                                "HTTP Basic with the key as password: http://user:KEY@host/...)",
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
        return await asyncio.to_thread(_parse_body, model, body)

    async def _info(self) -> dict[str, Any]:
        if self.info is None:
            self.info = await self._call("describe")
        return self.info

    async def _call(self, method: str, *args: Any) -> Any:
        """One call to a judge replica; retried on another replica if the one serving it died. Cancelled (the
        deadline passed, or the client went away), it cancels the replica's call too: Serve drops it from the
        batch queue, or the replica stops its rows at the next step."""
        from ray.serve.exceptions import BackPressureError

        last: BaseException | None = None
        for attempt in range(REPLICA_RETRIES + 1):
            response = getattr(self.judge, method).remote(*args)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise
            except BackPressureError:
                raise ApiError(503, "the judge is overloaded (its queue is full); retry later", kind="server_error",
                               code="overloaded") from None
            except _replica_gone_errors() as e:
                last = e
                await asyncio.sleep(0.5 * (attempt + 1))
        raise ApiError(503, f"no judge replica could answer (tried {REPLICA_RETRIES + 1} times; last: "
                            f"{type(last).__name__}); retry later", kind="server_error", code="replica_unavailable")

    def _deadline(self) -> float:
        return time.time() + self.settings.request_timeout_s

    async def _judge_all(self, calls: list[dict[str, Any]], deadline: float | None = None) -> list[dict[str, Any]]:
        """Every call's answer, in order; 504 at the deadline, the first replica error (503) at once. Whatever
        ends it (an answer, an error, the deadline, the client going away), the calls still running are
        cancelled, and every finished call's outcome is collected, so asyncio never logs an unretrieved
        exception (a client disconnect used to print a CancelledError traceback through ``gather``)."""
        deadline = deadline if deadline is not None else self._deadline()
        tasks = [asyncio.ensure_future(self._call("score", {**c, "deadline": deadline})) for c in calls]
        try:
            done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.time(), 0.0),
                                               return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t in done and not t.cancelled() and t.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            if pending:
                raise ApiError(504, f"the judge did not answer within {self.settings.request_timeout_s:g} s "
                                    f"({len(calls)} input(s)); its work was stopped. Send fewer inputs, use mode "
                                    "rail or a smaller serve.max_new_tokens, or raise --request-timeout-s",
                               kind="server_error", code="timeout")
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
                elif not t.cancelled():
                    t.exception()  # retrieved: a failure already answered is not logged again at collection

    @staticmethod
    def _call_for(fields: dict[str, Any], mode: Any, n_cots: Any, seed: Any, task: str = "absolute",
                  swap: bool = False) -> dict[str, Any]:
        return {"fields": fields, "mode": mode, "n_cots": n_cots, "seed": seed, "task": task, "swap": swap}

    @staticmethod
    def _mode(body_mode: str | None, path_mode: str | None) -> str | None:
        if path_mode is not None and path_mode not in MODES:
            raise ApiError(404, f"no such route: unknown mode prefix /{path_mode} (the prefixes are "
                                f"{', '.join('/' + m for m in MODES)})", code="not_found")
        if body_mode is not None and path_mode is not None and body_mode != path_mode:
            raise ApiError(422, f"mode: {body_mode!r} in the body, but the path asks for {path_mode!r}",
                           param="mode")
        return body_mode or path_mode

    def _check_work(self, info: dict[str, Any], mode: str | None, n_cots: int | None, n_inputs: int,
                    deadline: float) -> None:
        """Refuse (422) a request whose generation cannot finish before its deadline at the replica's measured
        decode speed, naming the options that would make it fit."""
        mode = mode or info["defaults"]["mode"]
        n = n_cots or info["defaults"]["n_cots"]
        bound = _work_bound(info, mode, n, n_inputs)
        left = deadline - time.time()
        if bound > left:
            raise ApiError(422, f"mode {mode}: this request generates up to {info['max_new_tokens']} new tokens per "
                                f"CoT ({info['budget_source']}) for {n_inputs * _least_cots(n)} CoT(s) or more; at this "
                                "replica's measured "
                                f"{info['decode_step_s'] * 1000:.1f} ms per decode step that takes {bound:.0f} s or "
                                f"more, more than the {left:.0f} s left before the deadline "
                                f"(--request-timeout-s {self.settings.request_timeout_s:g}). Use mode rail, fewer "
                                "inputs or n_cots, a smaller serve.max_new_tokens, or a longer --request-timeout-s",
                           param="mode", code="over_deadline")

    # -- routes ----------------------------------------------------------------------------------------
    @api.api_route("/health", methods=["GET", "HEAD"])
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

    @api.get("/{path_mode}/v1/models")
    async def models_under_mode(self, path_mode: str, request: Request) -> JSONResponse:
        self._mode(None, path_mode)
        return await self.models(request)

    @api.post("/v1/judge")
    async def judge_route(self, request: Request) -> JSONResponse:
        return await self._judge(request, None)

    @api.post("/{path_mode}/v1/judge")
    async def judge_route_under_mode(self, path_mode: str, request: Request) -> JSONResponse:
        return await self._judge(request, path_mode)

    async def _judge(self, request: Request, path_mode: str | None) -> JSONResponse:
        deadline = self._deadline()
        self._mode(None, path_mode)
        req: JudgeRequest = await self._body(request, JudgeRequest)
        mode = self._mode(req.mode, path_mode)
        info = await self._info()
        key = "input" if req.input is not None else "inputs"
        inputs = req.all_inputs()
        self._check_scale(inputs, info, ["input"] if key == "input" else [f"inputs.{i}" for i in range(len(inputs))])
        n_pairs = sum(isinstance(x, PairInput) for x in inputs)
        self._check_work(info, mode, req.n_cots, len(inputs) + (n_pairs if req.swap else 0), deadline)
        calls = [self._call_for(x.fields(i), mode, req.n_cots, req.seed, "relative", req.swap)
                 if isinstance(x, PairInput) else self._call_for(x.fields(i), mode, req.n_cots, req.seed)
                 for i, x in enumerate(inputs)]
        results = await self._judge_all(calls, deadline)
        out = [(_pair_judgement if c["task"] == "relative" else _judgement)(c["fields"]["id"], r)
               for c, r in zip(calls, results)]
        return JSONResponse({"model": self.settings.model_id,
                             **({"result": out[0]} if key == "input" else {"results": out})})

    @staticmethod
    def _check_scale(inputs: list[JudgeInput | PairInput], info: dict[str, Any], paths: list[str]) -> None:
        lo, hi = info["scale"]
        for x, path in zip(inputs, paths):
            if isinstance(x, PairInput):  # a pair's verdict is A or B whatever the scale
                continue
            if len(x.score_descriptions or []) != hi - lo + 1:
                raise ApiError(422, f"{path}.score_descriptions: {len(x.score_descriptions or [])} descriptions; "
                                    f"this judge scores {lo}-{hi} ({hi - lo + 1} descriptions)",
                               param=f"{path}.score_descriptions")

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> JSONResponse:
        return await self._chat(request, None)

    @api.post("/{path_mode}/v1/chat/completions")
    async def chat_under_mode(self, path_mode: str, request: Request) -> JSONResponse:
        return await self._chat(request, path_mode)

    async def _chat(self, request: Request, path_mode: str | None) -> JSONResponse:
        deadline = self._deadline()
        self._mode(None, path_mode)
        req: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        mode = self._mode(req.mode, path_mode)
        if req.model != self.settings.model_id:
            raise ApiError(404, f"model: {req.model!r} is not served here; this server serves "
                                f"{self.settings.model_id!r} (GET /v1/models)", param="model", code="model_not_found")
        info = await self._info()
        scale = tuple(info["scale"])
        try:
            pair = await asyncio.to_thread(chat_to_pair, req.messages)
            fields = pair if pair is not None else await asyncio.to_thread(chat_to_fields, req.messages, scale)
        except RequestError as e:
            raise ApiError(422, str(e), param=e.field) from None
        fields["id"] = "0"
        self._check_work(info, mode, req.n_cots, 1, deadline)
        task = "relative" if pair is not None else "absolute"
        call = self._call_for(fields, mode, req.n_cots, req.seed, task)
        result = (await self._judge_all([call], deadline))[0]
        if result.get("p_a" if pair is not None else "score") is None:
            raise ApiError(422, f"the judge produced no {'verdict' if pair is not None else 'score'}: "
                                f"{result.get('failure')}", kind="judge_error", code="no_score")
        content = pair_completion_text(result) if pair is not None else completion_text(result, scale)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.settings.model_id,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": None,
            "tract": _pair_judgement(None, result) if pair is not None else _judgement(None, result),
        })

    @api.post("/get_reward")
    async def get_reward(self, request: Request) -> JSONResponse:
        return await self._reward(request, None)

    @api.post("/{path_mode}/get_reward")
    async def get_reward_under_mode(self, path_mode: str, request: Request) -> JSONResponse:
        return await self._reward(request, path_mode)

    async def _reward(self, request: Request, path_mode: str | None) -> JSONResponse:
        deadline = self._deadline()
        self._mode(None, path_mode)
        req: RewardRequest = await self._body(request, RewardRequest)
        mode = self._mode(req.mode, path_mode)
        info = await self._info()
        fields = await asyncio.to_thread(_reward_calls, req, info, self.settings)
        pairs = [f.pop("task", None) == "relative" and bool(f.pop("swap")) for f in fields]
        self._check_work(info, mode, req.n_cots, len(fields) + sum(pairs), deadline)
        calls = [self._call_for(f, mode, req.n_cots, req.seed, "relative", True) if p
                 else self._call_for(f, mode, req.n_cots, req.seed) for f, p in zip(fields, pairs)]
        results = await self._judge_all(calls, deadline)
        details = [_pair_judgement(None, r) if p else _judgement(None, r) for r, p in zip(results, pairs)]
        bad = [i for i, (d, p) in enumerate(zip(details, pairs)) if d.get("p_a_debiased" if p else "score") is None]
        if bad:
            i = bad[0]
            raise ApiError(422, f"query.{i}: the judge produced no score: {results[i].get('failure')} "
                                f"({len(bad)} of {len(results)} queries)", param=f"query.{i}", kind="judge_error",
                           code="no_score")
        lo, hi = info["scale"]
        # a pair's reward is the debiased p(the policy's response is better), already in [0, 1]
        rewards = [d["p_a_debiased"] if p else d["score"] for d, p in zip(details, pairs)]
        scores = [r if p else (r - lo) / (hi - lo) for r, p in zip(rewards, pairs)]
        return JSONResponse({"rewards": rewards, "scores": scores, "details": details})
