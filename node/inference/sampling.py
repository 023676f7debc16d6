"""What a job asks of an engine and what comes back: sampling parameters and stream events.

A leaf module (no llama.cpp, no chain, no hardware probe): the requester, the
gateway and the CLI use these types, and the worker's own request checks
(``SamplingParams.validate``, ``validate_messages``, ``validate_prompt``),
without importing the engine. ``node.inference.engine`` re-exports all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.errors import InvalidRequest

FINISH_STOP = "stop"  # end-of-generation token, or a stop sequence
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_CANCELLED = "cancelled"

MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs
MAX_GRAMMAR_CHARS = 65_536

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """A chat's messages as clean ``{role, content}`` dicts; ``InvalidRequest`` naming the first bad one."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content}")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InvalidRequest(f"messages[{i}] needs a string 'content'")
        if message.get("role") not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        clean.append({"role": message["role"], "content": message["content"]})
    return clean


def validate_prompt(prompt: Any) -> str:
    """A plain completion prompt: a non-empty string, else ``InvalidRequest``."""
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt must be a non-empty string")
    return prompt


def prompt_bytes(prompt: str | None, messages: Any, resume_text: str = "") -> int:
    """The UTF-8 size of the text a job gives the model: the prompt or the messages' contents, and any text
    resumed after a failover. Known before tokenizing; bounds and timeouts on both sides are sized from it."""
    text = prompt or "".join(str(m.get("content", "")) for m in messages or [] if isinstance(m, dict))
    return len((text + resume_text).encode())


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy (and then ``seed`` does not matter).

    ``logprobs=k`` reports, for every sampled token, its log-probability and the
    ``k`` most likely tokens with theirs (``Delta.logprobs``). They are the
    log-softmax of the model's raw logits at that step: before the repeat
    penalty, temperature, top-k/top-p/min-p and any grammar, so they describe
    the model, not the sampler (as OpenAI's and llama-cpp-python's do). A token
    the grammar forced can therefore have a low logprob, and with
    ``repeat_penalty`` ≠ 1 greedy decoding need not pick the top entry.

    ``json_schema`` (JSON Schema text) or ``grammar`` (llama.cpp GBNF, start
    rule ``root``) constrain the output: every sampled token must keep the text
    a prefix of the language. A schema is turned into GBNF by llama-cpp-python's
    converter. Generation can still stop early at ``max_tokens`` or a stop
    string, leaving an incomplete document (finish reason ``length``/``stop``).
    The engine refuses a schema or grammar llama.cpp cannot use before the job
    takes a slot, and fails the job (``InvalidRequest``) if the grammar ever
    allows no token at all (it needs a character the model cannot produce).
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; k: each sampled token's logprob and its top k alternatives
    json_schema: str | None = None  # JSON Schema text: the output must match it (llama.cpp grammar)
    grammar: str | None = None  # GBNF: the output must match it (json_schema and grammar exclude each other)

    def validate(self) -> None:
        """Raise ``InvalidRequest`` naming the first bad value."""
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer ≥ 1"),
            (0 <= self.temperature <= 10, "temperature must be between 0 and 10"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer ≥ 0 (0 = off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (0 < self.repeat_penalty <= 10, "repeat_penalty must be in (0, 10]"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**32), "seed must be in [0, 2^32)"),
            (
                len(self.stop) <= 8 and all(isinstance(s, str) and s for s in self.stop),
                "stop: at most 8 non-empty strings",
            ),
            (
                self.logprobs is None
                or (
                    isinstance(self.logprobs, int)
                    and not isinstance(self.logprobs, bool)
                    and 0 <= self.logprobs <= MAX_TOP_LOGPROBS
                ),
                f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (self.json_schema is None or self.grammar is None, "send json_schema or grammar, not both"),
            (
                all(
                    g is None or (isinstance(g, str) and 0 < len(g) <= MAX_GRAMMAR_CHARS)
                    for g in (self.json_schema, self.grammar)
                ),
                f"json_schema and grammar must be non-empty strings of at most {MAX_GRAMMAR_CHARS} characters",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability, and the ``top`` alternatives (token text, logprob), best first.

    ``token`` is the token's own text (special tokens spelled out, e.g.
    ``<|im_end|>``; a token that holds part of a UTF-8 character shows U+FFFD),
    ``logprob`` ≤ 0 is the log-softmax of the raw logits it was sampled from,
    and ``top`` has ``SamplingParams.logprobs`` entries, best first (it may or
    may not include the sampled token).
    """

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """Streamed text, and how many sampled tokens it took (they add up to ``completion_tokens``).

    ``prompt_tokens`` is the job's prompt size, the same on every delta, so a
    consumer that bills as tokens arrive knows the whole cost so far.
    """

    text: str
    tokens: int
    prompt_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in ``tokens`` when params.logprobs is set
    records: bytes = b""  # the fingerprint records of these ``tokens`` (node/inference/fingerprints.py), if recorded


@dataclass(frozen=True)
class Finished:
    """The last event of a stream."""

    text: str
    usage: Usage
    finish_reason: str  # FINISH_STOP, FINISH_LENGTH or FINISH_CANCELLED
    first_token_s: float | None  # seconds from start to the first sampled token
    elapsed_s: float
    fingerprints: bytes = b""  # one record per sampled token, end-of-generation included (inference/fingerprints.py)
