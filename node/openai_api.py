"""The OpenAI HTTP API, translated to and from llmarket jobs (no I/O here).

What ``llmarket gateway`` accepts and answers, in OpenAI's shapes:

- requests: ``/v1/chat/completions`` and ``/v1/completions`` bodies become a
  ``JobSpec`` (validated; every problem is a 400 naming the parameter);
- responses: full completions, streamed chunks (``choices[].delta``), usage;
- errors: OpenAI's ``{"error": {message, type, param, code}}`` with the HTTP
  status that fits (400 bad parameter, 401 bad key, 402 funds, 404 unknown
  model, 503 no worker, 504 deadline);
- ``/v1/models``: the live market's models, one entry per CID with its
  friendly name, cheapest price and number of workers;
- ``/metrics``: Prometheus text.

A model may be named by CID, by the friendly name workers advertise
(case-insensitive), or ``default``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from node.engine import SamplingParams
from node.errors import (
    ApiError,
    DeadlineExceeded,
    InsufficientAllowance,
    InsufficientBalance,
    InvalidRequest,
    JobFailed,
    ModelError,
    NoWorker,
)
from node.messages import Offer
from node.models.cid import parse_cid
from node.models.default import DEFAULT_MODEL_CID
from node.requester import JobResult, JobSpec


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code="invalid_value")


def error_for(err: BaseException) -> ApiError:
    """The API error for anything a request can raise."""
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
    return ApiError(500, f"internal error: {err.__class__.__name__}", type="server_error")


# ------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ApiCall:
    """A parsed completions request."""

    model_name: str
    spec: JobSpec  # its model field is the resolved CID
    stream: bool
    include_usage: bool
    chat: bool


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"{name} must be a number between {low} and {high}", name)
    return float(value)


def _content(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise bad_request(f"messages[{index}] must be an object", "messages")
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise bad_request(f"messages[{index}].role {role!r} is not a known role", "messages")
    if isinstance(content, list):  # content parts: only text is understood
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content):
            raise bad_request(f"messages[{index}] has non-text content; only text is supported", "messages")
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad_request(f"messages[{index}].content must be a string", "messages")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_request(body: Any, *, chat: bool, resolve_model, max_price_per_1k: int) -> ApiCall:
    """Validate an OpenAI request body; ``resolve_model(name) -> CID`` raises ApiError(404)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad_request("model is required", "model")
    if body.get("n", 1) != 1:
        raise bad_request("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if max_tokens is None:
        max_tokens = 256
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad_request("max_tokens must be a positive integer", "max_tokens")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise bad_request("seed must be an integer in [0, 2^32)", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a string or a list of at most 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2, 1.0),
        top_p=_number(body, "top_p", 1e-9, 1, 1.0),
        seed=seed,
        stop=tuple(stop),
    )
    messages = prompt = None
    if chat:
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise bad_request("messages must be a non-empty list", "messages")
        messages = [_content(m, i) for i, m in enumerate(raw)]
    else:
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
            raw = raw[0]
        if not isinstance(raw, str) or not raw:
            raise bad_request("prompt must be a non-empty string", "prompt")
        prompt = raw
    spec = JobSpec(
        model=resolve_model(name), params=params, messages=messages, prompt=prompt, max_price_per_1k=max_price_per_1k
    )
    return ApiCall(name, spec, stream, include_usage, chat)


def model_resolver(offers: Iterable[Offer]):
    """A ``resolve_model`` over the live market: ``default``, a CID, or a friendly name."""
    by_name = {m.name.lower(): m.cid for o in offers for m in o.models}

    def resolve(name: str) -> str:
        if name == "default":
            return DEFAULT_MODEL_CID
        if name.lower() in by_name:
            return by_name[name.lower()]
        try:
            return str(parse_cid(name))
        except ModelError:
            raise ApiError(
                404, f"the model {name!r} is not on the market; GET /v1/models lists what is",
                type="invalid_request_error", param="model", code="model_not_found",
            ) from None  # fmt: skip

    return resolve


# ------------------------------------------------------------------ responses


def usage_json(result: JobResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def completion_json(call: ApiCall, completion_id: str, created: int, result: JobResult) -> dict:
    """The non-streaming response."""
    if call.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": result.finish_reason,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        kind = "text_completion"
    return {
        "id": completion_id, "object": kind, "created": created, "model": call.model_name,
        "choices": [choice], "usage": usage_json(result),
    }  # fmt: skip


def chunk_json(call: ApiCall, completion_id: str, created: int, text: str | None, finish_reason: str | None = None,
               *, first: bool = False) -> dict:  # fmt: skip
    """One streamed chunk (``text`` None: the closing chunk with ``finish_reason``)."""
    if call.chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    return {"id": completion_id, "object": kind, "created": created, "model": call.model_name, "choices": [choice]}


def usage_chunk_json(call: ApiCall, completion_id: str, created: int, result: JobResult) -> dict:
    kind = "chat.completion.chunk" if call.chat else "text_completion"
    return {
        "id": completion_id, "object": kind, "created": created, "model": call.model_name,
        "choices": [], "usage": usage_json(result),
    }  # fmt: skip


def models_json(offers: Iterable[Offer], created: int) -> dict:
    """``/v1/models``: one entry per CID on the market."""
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
    return {"object": "list", "data": sorted(entries.values(), key=lambda e: e["id"])}


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
        ]
        return "\n".join(lines) + "\n"
