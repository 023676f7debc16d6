"""The OpenAI HTTP API, translated to and from llmarket jobs (no I/O here).

What ``llmarket gateway`` accepts and answers, in OpenAI's shapes:

- requests: ``/v1/chat/completions`` and ``/v1/completions`` bodies become
  ``JobSpec``s (validated; every problem is a 400 naming the parameter; null
  means absent, as OpenAI treats it). A completions request with a list of
  prompts becomes one job per prompt, one choice each;
- responses: full completions, streamed chunks (``choices[].delta``), usage,
  and ``logprobs`` in the chat and the legacy completions shapes;
- errors: OpenAI's ``{"error": {message, type, param, code}}`` with the HTTP
  status that fits (400 bad parameter, 401 bad key, 402 funds, 404 unknown
  model, 413 body too large, 503 no worker, 504 deadline);
- ``/v1/models`` and ``/v1/models/{id}``: the live market's models, one entry
  per CID with its friendly name, cheapest price and number of workers;
- ``/metrics``: Prometheus text.

A model may be named by CID, by the friendly name workers advertise
(case-insensitive), or ``default``; responses name the model served (its
friendly name, else its CID).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from node.errors import (
    ApiError,
    DeadlineExceeded,
    InsufficientAllowance,
    InsufficientBalance,
    InvalidRequest,
    JobFailed,
    ModelError,
    NoWorker,
    PaymentError,
)
from node.inference.sampling import MAX_GRAMMAR_CHARS, MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob
from node.market.requester import JobResult, JobSpec
from node.models.cid import parse_cid
from node.models.default import DEFAULT_MODEL_CID
from node.protocol.messages import Offer

MAX_PROMPTS = 16  # prompts in one /v1/completions request (one job each, run concurrently)
MIN_LOGPROB = -9999.0  # what OpenAI reports for a token with no probability (JSON has no -inf)
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code="invalid_value")


def error_for(err: BaseException) -> ApiError:
    """The API error for anything a request can raise (500 for anything unexpected: a bug)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, (InvalidRequest, ModelError)):
        return bad_request(str(err))
    if isinstance(err, (InsufficientBalance, InsufficientAllowance)):
        return ApiError(402, str(err), type="insufficient_quota", code="insufficient_funds")
    if isinstance(err, NoWorker):
        return ApiError(503, str(err), type="service_unavailable", code="no_worker")
    if isinstance(err, DeadlineExceeded):
        return ApiError(504, str(err), type="timeout", code="deadline_exceeded")
    if isinstance(err, JobFailed):
        return ApiError(503, str(err), type="service_unavailable", code="all_workers_failed")
    if isinstance(err, PaymentError):  # the chain or the escrow failed us: say so, it is not a bug
        return ApiError(503, str(err), type="service_unavailable", code="payment_unavailable")
    return ApiError(500, f"internal error: {err.__class__.__name__}; the gateway's log has the details",
                    type="server_error")  # fmt: skip


# ------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ApiCall:
    """A parsed completions request."""

    model_name: str  # the model served, as responses name it: its friendly name, else its CID
    specs: tuple[JobSpec, ...]  # one job per prompt (a chat request has one); their model is the CID
    stream: bool
    include_usage: bool
    chat: bool

    @property
    def spec(self) -> JobSpec:
        return self.specs[0]

    @property
    def logprobs(self) -> bool:
        return self.spec.params.logprobs is not None


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"{name} must be a number between {low} and {high}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int, what: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise bad_request(f"{name} must be {what}", name)
    return value


def _content(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise bad_request(f"messages[{index}] must be an object", "messages")
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise bad_request(f"messages[{index}].role {role!r} is not a known role", "messages")
    if message.get("tool_calls"):
        raise bad_request(f"messages[{index}] has tool_calls; tools are not supported", "messages")
    if isinstance(content, list):  # content parts: only text is understood
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(f"messages[{index}].content[{j}] is not text; only text is supported", "messages")
            if not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content[{j}].text must be a string", "messages")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad_request(f"messages[{index}].content must be a string or a list of text parts", "messages")
    return {"role": "system" if role == "developer" else role, "content": content}


def _max_tokens(body: dict) -> tuple[int, str | None]:
    """max_completion_tokens (or max_tokens, older), and the name the client used (None: the default)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_request(f"{name} must be a positive integer", name)
        return value, name
    return 256, None


def _logprobs(body: dict, *, chat: bool) -> int | None:
    """SamplingParams.logprobs: None (off), or how many alternatives to report with each token."""
    if not chat:  # legacy completions: logprobs is the number of alternatives
        return _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad_request("logprobs must be true or false", "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    if top is not None and not wanted:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def _json_schema(body: dict) -> str | None:
    """response_format as the JSON Schema text the worker constrains sampling with (None: free text)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise bad_request(
            'response_format must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name": …, "schema": {…}}}',
            "response_format",
        )
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise bad_request("response_format.json_schema.schema must be a JSON Schema object", "response_format")
    text = json.dumps(schema)
    if len(text) > MAX_GRAMMAR_CHARS:
        raise bad_request(f"response_format's schema is over {MAX_GRAMMAR_CHARS} characters", "response_format")
    return text


def _refuse_unsupported(body: dict, *, chat: bool) -> None:
    """Parameters whose meaning cannot be honoured are refused, never ignored."""
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(
                f"{name} are not supported: the market's models answer in text only; send the request without "
                f"{name} (response_format json_schema can constrain the answer instead)",
                name,
            )
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise bad_request(f"{name} {body[name]!r} needs tools, which are not supported", name)
    _integer(body, "n", 1, 1, "1 (only one choice per prompt is supported)")
    if not chat:
        _integer(body, "best_of", 1, 1, "1 (best_of is not supported)")
        if body.get("echo"):
            raise bad_request("echo is not supported; prepend the prompt yourself", "echo")
        if body.get("suffix"):
            raise bad_request("suffix (insertion) is not supported", "suffix")


def _prompts(body: dict) -> list[str]:
    raw = body.get("prompt")
    prompts = raw if isinstance(raw, list) else [raw]
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise bad_request(f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings", "prompt")
    for prompt in prompts:
        if isinstance(prompt, (int, list)) and not isinstance(prompt, bool):
            raise bad_request("token-id prompts are not supported; send the prompt as text", "prompt")
        if not isinstance(prompt, str) or not prompt:
            raise bad_request("prompt must be a non-empty string (or a list of them)", "prompt")
    return prompts


def parse_request(body: Any, *, chat: bool, offers: Sequence[Offer], max_price_per_1k: int) -> ApiCall:
    """Validate an OpenAI request body against the live market ``offers`` (an unknown model is a 404)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad_request("model is required", "model")
    _refuse_unsupported(body, chat=chat)
    max_tokens, max_tokens_param = _max_tokens(body)
    seed = _integer(body, "seed", 0, 2**32 - 1, "an integer in [0, 2^32)")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a string or a list of at most 4 strings", "stop")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2, 1.0),
        top_p=_number(body, "top_p", 1e-9, 1, 1.0),
        seed=seed,
        stop=tuple(stop),
        logprobs=_logprobs(body, chat=chat),
        json_schema=_json_schema(body),
    )
    try:
        params.validate()
    except InvalidRequest as err:
        raise bad_request(str(err)) from None
    cid = model_resolver(offers)(name)
    contexts = [m.context_size for o in offers for m in o.models if m.cid == cid]
    if max_tokens_param and contexts and max_tokens >= max(contexts):
        raise bad_request(
            f"{max_tokens_param}={max_tokens} does not fit the model's context of {max(contexts)} tokens "
            "(prompt included); ask for fewer",
            max_tokens_param,
        )
    if chat:
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise bad_request("messages must be a non-empty list", "messages")
        messages = [_content(m, i) for i, m in enumerate(raw)]
        specs = [JobSpec(model=cid, params=params, messages=messages, max_price_per_1k=max_price_per_1k)]
    else:
        specs = [
            JobSpec(model=cid, params=params, prompt=prompt, max_price_per_1k=max_price_per_1k)
            for prompt in _prompts(body)
        ]
    return ApiCall(served_name(offers, cid), tuple(specs), bool(stream), include_usage, chat)


def model_resolver(offers: Iterable[Offer]):
    """A ``resolve_model(name) -> CID`` over the live market: ``default``, a CID, or a friendly name."""
    by_name = {m.name.lower(): m.cid for o in offers for m in o.models}

    def resolve(name: str) -> str:
        if name == "default":
            return DEFAULT_MODEL_CID
        if name.lower() in by_name:
            return by_name[name.lower()]
        try:
            return str(parse_cid(name))
        except ModelError:
            raise model_not_found(name) from None

    return resolve


def model_not_found(name: str) -> ApiError:
    return ApiError(
        404, f"the model {name!r} is not on the market; GET /v1/models lists what is",
        type="invalid_request_error", param="model", code="model_not_found",
    )  # fmt: skip


def served_name(offers: Iterable[Offer], cid: str) -> str:
    """How responses name model ``cid``: the friendly name its workers advertise (the most common), else the CID.

    A CID given as a name (a worker that fetched the model before it learnt its name) is no name."""
    names = Counter(m.name for o in offers for m in o.models if m.cid == cid and m.name and m.name != cid)
    return min(names, key=lambda n: (-names[n], n)) if names else cid


# ------------------------------------------------------------------ responses


def usage_json(results: Sequence[JobResult]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)  # also maps -inf (and NaN) to a number JSON can carry


def _token_json(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode("utf-8", "replace"))}


def chat_logprobs_json(logprobs: Sequence[TokenLogprob]) -> dict:
    """Chat's ``choices[].logprobs``: each token with its logprob, bytes and top alternatives."""
    content = [
        {**_token_json(t.token, t.logprob), "top_logprobs": [_token_json(tok, lp) for tok, lp in t.top]}
        for t in logprobs
    ]
    return {"content": content, "refusal": None}


def completion_logprobs_json(logprobs: Sequence[TokenLogprob], offset: int) -> dict:
    """Legacy completions' ``choices[].logprobs``; ``offset``: where the first token starts in prompt + text."""
    offsets = []
    for t in logprobs:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in logprobs],
        "token_logprobs": [_logprob(t.logprob) for t in logprobs],
        "top_logprobs": [{tok: _logprob(lp) for tok, lp in t.top} for t in logprobs],
        "text_offset": offsets,
    }


def completion_json(
    call: ApiCall,
    completion_id: str,
    created: int,
    results: Sequence[JobResult],
    logprobs: Sequence[Sequence[TokenLogprob]] = (),
) -> dict:
    """The non-streaming response: one choice per job, with its logprobs when the call asked for them."""
    choices = []
    for index, result in enumerate(results):
        lps = logprobs[index] if call.logprobs and index < len(logprobs) else None
        if call.chat:
            choice = {
                "index": index,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": None if lps is None else chat_logprobs_json(lps),
                "finish_reason": result.finish_reason,
            }
        else:
            prompt = call.specs[index].prompt or ""
            choice = {
                "index": index,
                "text": result.text,
                "logprobs": None if lps is None else completion_logprobs_json(lps, len(prompt)),
                "finish_reason": result.finish_reason,
            }
        choices.append(choice)
    return {
        "id": completion_id, "object": "chat.completion" if call.chat else "text_completion", "created": created,
        "model": call.model_name, "choices": choices, "usage": usage_json(results),
    }  # fmt: skip


def chunk_json(
    call: ApiCall,
    completion_id: str,
    created: int,
    text: str | None,
    finish_reason: str | None = None,
    *,
    index: int = 0,
    first: bool = False,
    logprobs: Sequence[TokenLogprob] | None = None,
    offset: int = 0,
) -> dict:
    """One streamed chunk (``text`` None: the closing chunk of choice ``index``, with ``finish_reason``).

    ``logprobs`` are this chunk's tokens (None: not asked for); ``offset`` is where the chunk's
    text starts in prompt + completion (legacy completions' ``text_offset``).
    """
    if call.chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        lps = None if logprobs is None else chat_logprobs_json(logprobs)
        choice = {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        lps = None if logprobs is None else completion_logprobs_json(logprobs, offset)
        choice = {"index": index, "text": text or "", "logprobs": lps, "finish_reason": finish_reason}
        kind = "text_completion"
    return {"id": completion_id, "object": kind, "created": created, "model": call.model_name, "choices": [choice]}


def usage_chunk_json(call: ApiCall, completion_id: str, created: int, results: Sequence[JobResult]) -> dict:
    kind = "chat.completion.chunk" if call.chat else "text_completion"
    return {
        "id": completion_id, "object": kind, "created": created, "model": call.model_name,
        "choices": [], "usage": usage_json(results),
    }  # fmt: skip


def models_json(offers: Iterable[Offer], created: int) -> dict:
    """``/v1/models``: one entry per CID on the market, named as ``served_name`` names it."""
    offers = list(offers)
    entries: dict[str, dict] = {}
    for offer in offers:
        for model in offer.models:
            entry = entries.setdefault(
                model.cid,
                {"id": model.cid, "object": "model", "created": created, "owned_by": "llmarket",
                 "name": model.name, "context_size": model.context_size, "workers": 0, "cheapest_price_per_1k": None},
            )  # fmt: skip
            entry["workers"] += 1
            price = offer.price_per_1k
            if entry["cheapest_price_per_1k"] is None or price < entry["cheapest_price_per_1k"]:
                entry["cheapest_price_per_1k"] = price
    for entry in entries.values():
        entry["name"] = served_name(offers, entry["id"])
    return {"object": "list", "data": sorted(entries.values(), key=lambda e: e["id"])}


def model_json(offers: Sequence[Offer], name: str, created: int) -> dict:
    """``/v1/models/{name}``: the entry of a model on the market (by CID, friendly name or ``default``), else 404."""
    cid = model_resolver(offers)(name)
    for entry in models_json(offers, created)["data"]:
        if entry["id"] == cid:
            return entry
    raise model_not_found(name)


# -------------------------------------------------------------------- metrics


@dataclass
class Metrics:
    """Counters for ``/metrics`` (Prometheus text exposition format)."""

    requests: dict[str, int] = field(default_factory=dict)  # by status code
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # by error type
    failovers: int = 0
    spend: int = 0  # token base units signed to workers
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    checks: dict[str, int] = field(default_factory=dict)  # by who checked ("local", "spot") and result

    def audit(self, checks: Any) -> None:
        """Count a finished job's checks (a ``node.verify.fraud.Audit``); a spot check's price is spend too."""
        for who, verdict in (("local", checks.local), ("spot", checks.spot.verdict if checks.spot else None)):
            if verdict is not None:
                key = f"{who},{'pass' if verdict.ok else 'fail'}"
                self.checks[key] = self.checks.get(key, 0) + 1
        if checks.spot is not None:
            self.spend += checks.spot.cost

    def request(self, status: int) -> None:
        key = str(status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def error(self, err: ApiError) -> None:
        self.errors[err.type] = self.errors.get(err.type, 0) + 1

    def job(self, result: JobResult) -> None:
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        self.spend += result.cost
        self.failovers += max(len(result.workers) - 1, 0)
        if result.first_token_s is not None:
            self.ttft_sum_s += result.first_token_s
            self.ttft_count += 1

    def render(self) -> str:
        lines = [
            "# HELP llmarket_gateway_requests_total HTTP requests by status code.",
            "# TYPE llmarket_gateway_requests_total counter",
            *(f'llmarket_gateway_requests_total{{code="{k}"}} {v}' for k, v in sorted(self.requests.items())),
            "# HELP llmarket_gateway_tokens_total Tokens processed, by kind.",
            "# TYPE llmarket_gateway_tokens_total counter",
            f'llmarket_gateway_tokens_total{{kind="prompt"}} {self.prompt_tokens}',
            f'llmarket_gateway_tokens_total{{kind="completion"}} {self.completion_tokens}',
            "# HELP llmarket_gateway_errors_total Errors by OpenAI error type.",
            "# TYPE llmarket_gateway_errors_total counter",
            *(f'llmarket_gateway_errors_total{{type="{k}"}} {v}' for k, v in sorted(self.errors.items())),
            "# HELP llmarket_gateway_failovers_total Workers replaced mid-job.",
            "# TYPE llmarket_gateway_failovers_total counter",
            f"llmarket_gateway_failovers_total {self.failovers}",
            "# HELP llmarket_gateway_spend_base_units_total Token base units signed to workers.",
            "# TYPE llmarket_gateway_spend_base_units_total counter",
            f"llmarket_gateway_spend_base_units_total {self.spend}",
            "# HELP llmarket_gateway_time_to_first_token_seconds Time to the first streamed token.",
            "# TYPE llmarket_gateway_time_to_first_token_seconds summary",
            f"llmarket_gateway_time_to_first_token_seconds_sum {self.ttft_sum_s:.6f}",
            f"llmarket_gateway_time_to_first_token_seconds_count {self.ttft_count}",
            "# HELP llmarket_gateway_checks_total Answers checked against the model, by checker and result.",
            "# TYPE llmarket_gateway_checks_total counter",
            *(
                f'llmarket_gateway_checks_total{{by="{k.split(",")[0]}",result="{k.split(",")[1]}"}} {v}'
                for k, v in sorted(self.checks.items())
            ),
        ]
        return "\n".join(lines) + "\n"
