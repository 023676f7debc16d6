"""What a requester pays for: the usage it can check itself, without the model's weights.

A paid worker reports its usage (prompt and completion tokens), and the price
is usage × price. A worker that reports more than it used is paid more, so the
requester checks every count against the model's own tokenizer, which it has
without the weights (node/inference/tokenizer.py: the GGUF's head, fetched and
verified against the model's CID):

- **Prompt tokens** are exact: the requester tokenizes the request as the
  worker does (the same code, node/inference/prompt.py) and pays for that many.
  A worker that announces more is an overcharger (``prompt_problem``).
- **Completion tokens** come with their fingerprint records: every chunk
  carries one 15-byte record per token it bills, naming the token sampled
  (node/inference/fingerprints.py). The requester pays for records, not for
  claims: each chunk must hold as many records as it bills tokens, the
  records' tokens must spell the text received, and no record may be the
  end-of-generation token (a worker that goes on after the model ended pays
  for nothing after it: it is caught on its next chunk). At the end, the
  records in the worker's signed ``JobDone`` must be the ones streamed (plus
  the end-of-generation record, if the answer ended so), its billed count must
  be theirs, and its finish reason must be true (``completion_problem``).

Whether the tokens are the *model's* tokens is the verifier's question
(node/verify/judge.py); this module only makes the count honest.
"""

from __future__ import annotations

import bisect
import codecs
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from node.inference.fingerprints import unpack
from node.inference.sampling import FINISH_LENGTH, FINISH_STOP
from node.inference.stream import find_stop
from node.protocol.messages import JobChunk, JobDone, JobRequest


class Tokenizer(Protocol):
    """A model's tokenizer, checked against its CID (node/inference/tokenizer.py)."""

    def count_sync(self, request: JobRequest) -> int:
        """How many tokens the worker evaluates for ``request`` (chat template, resume text included)."""

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation."""

    def answer_bytes(self, tokens: Sequence[int]) -> bytes:
        """The bytes ``tokens`` add to an answer's text (special tokens spell nothing)."""


_UTF8 = codecs.getincrementaldecoder("utf-8")


@dataclass
class CheckedUsage:
    """One request's usage as the requester counts it with ``tokenizer``: the prompt exactly, the answer by
    its records as they stream."""

    tokenizer: Tokenizer
    prompt_tokens: int  # exact
    # A verification job's answer is its verdict (node/verify/), billed as prompt tokens only: it has no tokens
    # and no records, and its text is not spelled by any.
    answer: bool = True
    tokens: list[int] = field(default_factory=list)  # the answer's tokens, from the records streamed
    spelled: str = ""  # what they spell, built as the worker builds its text (node/inference/stream.py)
    ends: list[int] = field(default_factory=list)  # len(spelled) after each token
    _decoder: codecs.IncrementalDecoder = field(default_factory=lambda: _UTF8("replace"))

    def prompt_problem(self, claimed: int) -> str | None:
        if claimed > self.prompt_tokens:
            return (
                f"worker claims {claimed} prompt tokens; the model's tokenizer gives {self.prompt_tokens} "
                f"({claimed - self.prompt_tokens} more)"
            )
        return None

    def take(self, chunk: JobChunk) -> str | None:
        """Count ``chunk``'s records; why the chunk bills tokens it does not back, or None."""
        try:
            tokens = [int(t) for t in unpack(chunk.fingerprints).tokens] if chunk.fingerprints else []
        except ValueError as err:
            return f"bad fingerprint records: {err}"
        if len(tokens) != chunk.tokens:
            return f"a chunk bills {chunk.tokens} tokens with {len(tokens)} fingerprint records"
        if tokens and not self.answer:
            return f"a verdict bills {len(tokens)} tokens"
        for token in tokens:
            if self.tokenizer.is_eog(token):  # the tokens before it still count
                return "the answer goes on after the model's end-of-generation token"
            self.tokens.append(token)
            self.spelled += self._decoder.decode(self.tokenizer.answer_bytes([token]))
            self.ends.append(len(self.spelled))
        return None

    def payable(self, text: str) -> int:
        """How many of the tokens streamed may be paid for, ``text`` having been received: the leading tokens
        whose spelling the text holds."""
        agree = len(os.path.commonprefix([self.spelled, text]))
        return bisect.bisect_right(self.ends, agree)

    def kept(self, text: str) -> tuple[str, int]:
        """The text and number of the leading tokens that ``text`` holds (what an overcharger is paid for)."""
        n = self.payable(text)
        return (self.spelled[: self.ends[n - 1]] if n else ""), n

    def text_problem(self, text: str) -> str | None:
        if self.answer and not self.spelled.startswith(text):
            return "the text received is not what the records' tokens spell"
        return None

    def completion_problem(self, done: JobDone, text: str, request: JobRequest) -> str | None:
        """Why ``done`` does not bill exactly the records streamed, or says a false finish reason; or None."""
        if not self.answer:
            billed = done.receipt.completion_tokens
            return f"a verdict bills {billed} completion tokens" if billed or done.fingerprints else None
        try:
            tokens = [int(t) for t in unpack(done.fingerprints).tokens] if done.fingerprints else []
        except ValueError as err:
            return f"bad fingerprint records: {err}"
        n = len(self.tokens)
        if tokens[:n] != self.tokens:
            return "the final records are not the ones streamed"
        rest = tokens[n:]
        ends_on_eog = len(rest) == 1 and self.tokenizer.is_eog(rest[0])
        if rest and not ends_on_eog:
            return f"the final records hold {len(rest)} tokens that were never streamed"
        if done.receipt.completion_tokens != n:
            return f"worker bills {done.receipt.completion_tokens} completion tokens; its records hold {n}"
        spelled = self.spelled
        stops = [str(stop) for stop in request.params.get("stop") or []]
        hit = find_stop(spelled, stops, 0) if stops else None
        max_tokens = int(request.params["max_tokens"])
        if done.finish_reason == FINISH_STOP and hit is not None:
            expected = spelled[:hit]
        elif done.finish_reason == FINISH_STOP and ends_on_eog:
            expected = spelled
        elif done.finish_reason == FINISH_STOP:
            return "finish 'stop' without an end-of-generation token or a stop string"
        elif done.finish_reason == FINISH_LENGTH and not ends_on_eog and n == max_tokens:
            expected = spelled + self._decoder.decode(b"", final=True)  # as the worker ends a cut-off answer
        elif done.finish_reason == FINISH_LENGTH:
            return f"finish 'length' after {n} of max_tokens {max_tokens}"
        else:
            return f"finish reason {done.finish_reason!r} is not a finished answer"
        if text != expected:
            return "the text received is not what the records' tokens spell"
        return None
