"""A job's prompt as tokens: the one tokenization the worker, its verifiers and the requester all run.

A worker bills ``prompt_tokens`` = the length of what these functions return, and a
requester counts the same request with the same functions on the model's own
vocabulary (node/inference/tokenizer.py), so the two counts agree by construction,
not by two implementations kept in step. ``vocab`` is anything with llama-cpp-python's
tokenizer calls: a loaded ``llama_cpp.Llama`` (the engines) or a vocabulary-only
``llama_cpp._internals.LlamaModel`` (the requester); ``Llama``'s calls hand straight
on to its ``LlamaModel``'s, so both run the same llama.cpp code on the same vocabulary.

- a chat: the model's chat template (``tokenizer.chat_template``, rendered by
  llama-cpp-python's Jinja2 formatter with the model's BOS/EOS text), tokenized
  with special tokens parsed, BOS added unless the template wrote it; then the
  text the assistant already said in this turn (``assistant_prefix``, after a
  failover), tokenized on its own and appended;
- a plain prompt: ``prompt + resume_text`` tokenized as plain text with BOS.

Both return ``(tokens, said)``: every token the model evaluates before it samples,
and the last ``len(said)`` of them, the answer text already given, which the
sampler takes as its own. llama_cpp is imported inside the functions only: the
requester imports this module without loading llama.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from node.errors import InvalidRequest


class Vocab(Protocol):
    """The tokenizer calls of llama-cpp-python that prompts need (``Llama`` and ``LlamaModel`` both have them)."""

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]: ...

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes: ...

    def token_bos(self) -> int: ...

    def token_eos(self) -> int: ...


def chat_tokens(vocab: Any, chat_template: str | None, messages: Sequence[dict[str, str]]) -> list[int]:
    """The tokens of ``messages`` (validated ``{role, content}`` dicts) rendered by ``chat_template``.

    Raises:
        InvalidRequest: the model has no chat template.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    if not chat_template:
        raise InvalidRequest("the model has no chat template; send a plain prompt instead")
    special = lambda token: vocab.detokenize([token], special=True).decode(errors="replace")  # noqa: E731
    formatter = Jinja2ChatFormatter(
        template=chat_template, eos_token=special(vocab.token_eos()), bos_token=special(vocab.token_bos())
    )
    formatted = formatter(messages=list(messages))
    return vocab.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)


def text_tokens(vocab: Any, prompt: str) -> list[int]:
    """The tokens of a plain prompt: its text, BOS first, special-token text taken literally."""
    return vocab.tokenize(prompt.encode(), add_bos=True, special=False)


def said_tokens(vocab: Any, text: str) -> list[int]:
    """The tokens of answer text already given (no BOS, special-token text taken literally)."""
    return vocab.tokenize(text.encode(), add_bos=False, special=False) if text else []


def chat_prompt(
    vocab: Any, chat_template: str | None, messages: Sequence[dict[str, str]], assistant_prefix: str = ""
) -> tuple[list[int], list[int]]:
    """``(tokens, said)`` of a chat job (see the module docstring)."""
    said = said_tokens(vocab, assistant_prefix)
    return chat_tokens(vocab, chat_template, messages) + said, said


def completion_prompt(vocab: Any, prompt: str, resume_text: str = "") -> tuple[list[int], list[int]]:
    """``(tokens, said)`` of a plain completion job (see the module docstring)."""
    return text_tokens(vocab, prompt + resume_text), said_tokens(vocab, resume_text)


def answer_bytes(vocab: Any, tokens: Sequence[int]) -> bytes:
    """The bytes of an answer's tokens as a worker's stream appends them: each token's piece on its own,
    special tokens as empty text (``TokenStream``, node/inference/stream.py; ``observe_answer`` alike)."""
    return b"".join(vocab.detokenize([int(token)]) for token in tokens)
