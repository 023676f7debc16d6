"""The OpenAI request/response translation (pure; the gateway serves it)."""

from __future__ import annotations

import pytest

from node.errors import InsufficientBalance, InvalidRequest
from node.messages import ModelInfo
from node.models.default import DEFAULT_MODEL_CID
from node.openai_api import (
    ApiError,
    Metrics,
    chunk_json,
    completion_json,
    error_for,
    model_resolver,
    models_json,
    parse_request,
    usage_chunk_json,
)
from node.requester import JobFailed, JobResult, NoWorker

from .factories import offer

CID = "bafybeifvmoiokowzsdfjoiosxsk3t5p42iq6lajhmfld5v22b3osnrzmj4"
MARKET = [
    offer("a", models=[ModelInfo(CID, "SmolLM2-135M-Instruct.Q4_1", 2048)], price_per_1k=5),
    offer("b", models=[ModelInfo(CID, "SmolLM2-135M-Instruct.Q4_1", 2048)], price_per_1k=3),
]


def parse(body, chat=True):
    return parse_request(body, chat=chat, resolve_model=model_resolver(MARKET), max_price_per_1k=10)


def test_a_chat_request_becomes_a_job():
    call = parse(
        {
            "model": "smollm2-135m-instruct.q4_1",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "max_completion_tokens": 20, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "\n",
            "stream": True, "stream_options": {"include_usage": True}, "user": "someone",
        }
    )  # fmt: skip
    assert call.spec.model == CID and call.model_name == "smollm2-135m-instruct.q4_1"
    assert call.spec.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    p = call.spec.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (20, 0.0, 0.5, 7, ("\n",))
    assert call.stream and call.include_usage and call.spec.max_price_per_1k == 10
    completion = parse({"model": "default", "prompt": ["Once"]}, chat=False)
    assert completion.spec.prompt == "Once" and completion.spec.model == DEFAULT_MODEL_CID


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "default", "messages": []}, "messages"),
        ({"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"model": "default", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(body, param):
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.status == 400 and info.value.param == param


def test_unknown_models_are_404():
    with pytest.raises(ApiError) as info:
        parse({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    assert info.value.status == 404 and info.value.code == "model_not_found"
    assert parse({"model": CID, "messages": [{"role": "user", "content": "x"}]}).spec.model == CID


def test_errors_map_to_openai_statuses():
    cases = {
        InvalidRequest("bad"): 400,
        InsufficientBalance("poor"): 402,
        NoWorker("nobody"): 503,
        JobFailed("the job did not finish within its 5s deadline"): 504,
        JobFailed("every worker failed"): 503,
        RuntimeError("boom"): 500,
    }
    for err, status in cases.items():
        api = error_for(err)
        assert api.status == status and set(api.body()["error"]) == {"message", "type", "param", "code"}


def test_response_shapes():
    result = JobResult("Hello!", "stop", prompt_tokens=5, completion_tokens=2, workers=["a"], cost=7)
    chat = parse({"model": "default", "messages": [{"role": "user", "content": "x"}]})
    full = completion_json(chat, "id1", 100, result)
    assert full["object"] == "chat.completion" and full["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello!",
    }
    assert full["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    first = chunk_json(chat, "id1", 100, "Hel", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    last = chunk_json(chat, "id1", 100, None, "stop")
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert usage_chunk_json(chat, "id1", 100, result)["choices"] == []
    text = parse({"model": "default", "prompt": "x"}, chat=False)
    assert completion_json(text, "id2", 100, result)["choices"][0]["text"] == "Hello!"


def test_models_list_and_metrics():
    (entry,) = models_json(MARKET, 100)["data"]
    assert entry["id"] == CID and entry["workers"] == 2 and entry["cheapest_price_per_1k"] == 3
    metrics = Metrics()
    metrics.request(200)
    metrics.job(JobResult("x", "stop", 5, 2, workers=["a", "b"], first_token_s=0.25, cost=9))
    metrics.error(ApiError(503, "x", type="service_unavailable"))
    text = metrics.render()
    assert 'llmarket_gateway_requests_total{code="200"} 1' in text
    assert 'llmarket_gateway_tokens_total{kind="completion"} 2' in text
    assert "llmarket_gateway_failovers_total 1" in text and "llmarket_gateway_spend_base_units_total 9" in text
    assert "llmarket_gateway_time_to_first_token_seconds_count 1" in text
