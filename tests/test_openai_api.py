"""The OpenAI request/response translation (pure; the gateway serves it)."""

from __future__ import annotations

import json
import math

import pytest

from node.api.openai_api import (
    ApiError,
    Metrics,
    chunk_json,
    completion_json,
    error_for,
    model_json,
    models_json,
    parse_request,
    usage_chunk_json,
)
from node.errors import ChainUnreachable, ContextTooLong, DeadlineExceeded, InsufficientBalance, InvalidRequest
from node.inference.sampling import TokenLogprob
from node.market.requester import JobFailed, JobResult, NoWorker
from node.models.default import DEFAULT_MODEL_CID
from node.protocol.messages import ModelInfo

from .factories import offer

CID = "bafybeifvmoiokowzsdfjoiosxsk3t5p42iq6lajhmfld5v22b3osnrzmj4"
MARKET = [
    offer("a", models=[ModelInfo(CID, "SmolLM2-135M-Instruct.Q4_1", 2048)], price_per_1k=5),
    offer("b", models=[ModelInfo(CID, "SmolLM2-135M-Instruct.Q4_1", 2048)], price_per_1k=3),
]


def parse(body, chat=True):
    return parse_request(body, chat=chat, offers=MARKET, max_price_per_1k=10)


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
    assert call.spec.model == CID and call.model_name == "SmolLM2-135M-Instruct.Q4_1"  # the model served
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
        ContextTooLong("the prompt and max_tokens do not fit the context of 2048 tokens"): 400,
        DeadlineExceeded("the job did not finish within its 5s deadline"): 504,
        JobFailed("every worker failed; one missed its deadline"): 503,  # the type decides, not the words
        ChainUnreachable("no chain at http://127.0.0.1:8545"): 503,
        RuntimeError("boom"): 500,
    }
    for err, status in cases.items():
        api = error_for(err)
        assert api.status == status and set(api.body()["error"]) == {"message", "type", "param", "code"}


def test_response_shapes():
    result = JobResult("Hello!", "stop", prompt_tokens=5, completion_tokens=2, workers=["a"], cost=7)
    chat = parse({"model": "default", "messages": [{"role": "user", "content": "x"}]})
    full = completion_json(chat, "id1", 100, [result])
    assert full["object"] == "chat.completion" and full["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello!",
        "refusal": None,
    }
    assert full["choices"][0]["logprobs"] is None
    assert full["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    first = chunk_json(chat, "id1", 100, "Hel", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    last = chunk_json(chat, "id1", 100, None, "stop")
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert usage_chunk_json(chat, "id1", 100, [result])["choices"] == []
    text = parse({"model": "default", "prompt": "x"}, chat=False)
    assert completion_json(text, "id2", 100, [result])["choices"][0]["text"] == "Hello!"


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


CHAT = {"model": "default", "messages": [{"role": "user", "content": "x"}]}


def test_null_means_absent():
    nulls = dict.fromkeys(
        ["n", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
         "stop", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "user"]
    )  # fmt: skip
    call = parse({**CHAT, **nulls})
    assert not call.stream and not call.include_usage and not call.logprobs
    assert call.spec.params.max_tokens == 256 and call.spec.params.json_schema is None
    completion = parse({"model": "default", "prompt": "x", **nulls, "best_of": None, "echo": None}, chat=False)
    assert completion.spec.prompt == "x"


@pytest.mark.parametrize(
    "changes, param, words",
    [
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages", "content[0].text"),
        ({"max_completion_tokens": -1}, "max_completion_tokens", "max_completion_tokens"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens"),
        ({"max_completion_tokens": 4096}, "max_completion_tokens", "context of 2048 tokens"),
        ({"max_tokens": 2048}, "max_tokens", "context of 2048 tokens"),
        ({"n": True}, "n", "n must be 1"),
        ({"stream": "yes"}, "stream", "stream"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"logprobs": 3}, "logprobs", "true or false"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ({"response_format": "json"}, "response_format", "json_object"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": []}}}, "response_format", "schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"x": "y" * 70_000}}}},
            "response_format",
            "65536",
        ),
    ],
)
def test_more_bad_parameters_are_400_naming_what_the_client_sent(changes, param, words):
    with pytest.raises(ApiError) as info:
        parse({**CHAT, **changes})
    assert info.value.status == 400 and info.value.param == param and words in str(info.value)


@pytest.mark.parametrize(
    "changes, param",
    [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [[1, 2]]}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"prompt": ["a"] * 17}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "end"}, "suffix"),
    ],
)
def test_bad_completion_parameters(changes, param):
    with pytest.raises(ApiError) as info:
        parse({"model": "default", "prompt": "x", **changes}, chat=False)
    assert info.value.status == 400 and info.value.param == param


def test_tools_may_be_absent_or_empty_and_tool_choice_none():
    for changes in ({"tools": []}, {"tool_choice": "none"}, {"tools": None, "tool_choice": "auto"}):
        assert parse({**CHAT, **changes}).spec.messages == [{"role": "user", "content": "x"}]


def test_response_format_becomes_a_json_schema_for_the_worker():
    def schema_of(response_format):
        return parse({**CHAT, "response_format": response_format}).spec.params.json_schema

    assert schema_of({"type": "text"}) is None
    assert schema_of({"type": "json_object"}) == '{"type": "object"}'
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    assert json.loads(schema_of(fmt)) == schema


def test_logprobs_become_sampling_params():
    assert parse({**CHAT, "logprobs": True}).spec.params.logprobs == 0
    assert parse({**CHAT, "logprobs": True, "top_logprobs": 5}).spec.params.logprobs == 5
    assert parse({**CHAT, "logprobs": False}).spec.params.logprobs is None
    assert parse({"model": "default", "prompt": "x", "logprobs": 3}, chat=False).spec.params.logprobs == 3


def test_a_list_of_prompts_is_one_job_each():
    call = parse({"model": "default", "prompt": ["One", "Two", "Three"], "max_tokens": 5}, chat=False)
    assert [s.prompt for s in call.specs] == ["One", "Two", "Three"]
    assert all(s.params.max_tokens == 5 and s.model == DEFAULT_MODEL_CID for s in call.specs)
    results = [JobResult(t, "stop", 3, 1) for t in ("a", "b", "c")]
    full = completion_json(call, "id", 1, results)
    assert [(c["index"], c["text"]) for c in full["choices"]] == [(0, "a"), (1, "b"), (2, "c")]
    assert full["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert chunk_json(call, "id", 1, "b", index=1)["choices"][0]["index"] == 1


def test_the_response_names_the_model_served():
    assert parse({**CHAT, "model": CID}).model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert parse_request({**CHAT, "model": "default"}, chat=True, offers=[], max_price_per_1k=0).model_name == CID
    market = [*MARKET, *(offer(p, models=[ModelInfo(CID, "smol", 8192)]) for p in "cde")]  # most workers say smol
    call = parse_request({**CHAT, "model": "default", "max_tokens": 4096}, chat=True, offers=market, max_price_per_1k=0)
    assert call.model_name == "smol" and call.spec.params.max_tokens == 4096  # fits the largest context


def test_logprobs_shapes():
    lps = (
        TokenLogprob("Hel", -0.25, (("Hel", -0.25), ("Hi", -1.5))),
        TokenLogprob("lo", -math.inf, (("lo", -0.5),)),
    )
    chat = parse({**CHAT, "logprobs": True, "top_logprobs": 2})
    result = JobResult("Hello", "stop", 5, 2)
    content = completion_json(chat, "id", 1, [result], [list(lps)])["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108],
        "top_logprobs": [{"token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108]},
                         {"token": "Hi", "logprob": -1.5, "bytes": [72, 105]}],
    }  # fmt: skip
    assert content[1]["logprob"] == -9999.0  # JSON has no -inf
    chunk = chunk_json(chat, "id", 1, "lo", logprobs=lps[1:])
    assert [t["token"] for t in chunk["choices"][0]["logprobs"]["content"]] == ["lo"]
    text = parse({"model": "default", "prompt": "Say", "logprobs": 1}, chat=False)
    legacy = completion_json(text, "id", 1, [result], [list(lps)])["choices"][0]["logprobs"]
    assert legacy == {
        "tokens": ["Hel", "lo"], "token_logprobs": [-0.25, -9999.0],
        "top_logprobs": [{"Hel": -0.25, "Hi": -1.5}, {"lo": -0.5}], "text_offset": [3, 6],
    }  # fmt: skip
    assert chunk_json(text, "id", 1, "lo", logprobs=lps[1:], offset=6)["choices"][0]["logprobs"]["text_offset"] == [6]
    json.dumps(legacy, allow_nan=False)


def test_one_model_by_id_or_name():
    assert model_json(MARKET, CID, 1)["workers"] == 2
    assert model_json(MARKET, "smollm2-135m-instruct.q4_1", 1)["id"] == CID
    assert model_json(MARKET, "default", 1)["id"] == DEFAULT_MODEL_CID
    for market, name in ((MARKET, "gpt-4"), ([], "default"), ([], CID)):  # unknown, or nobody serves it
        with pytest.raises(ApiError) as info:
            model_json(market, name, 1)
        assert info.value.status == 404 and info.value.code == "model_not_found"
