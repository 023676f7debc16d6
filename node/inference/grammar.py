"""Grammars: a job's ``json_schema`` or ``grammar`` turned into GBNF that llama.cpp's parser accepts.

Both engines check a job's grammar here, in a thread, before it takes a slot; the
``Sampler`` (node/inference/sampler.py) then constrains sampling with it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from node.errors import InvalidRequest, one_line
from node.inference.sampling import SamplingParams

# JSON Schema repetition bounds (minLength, maxItems, {m,n} in a pattern) above this
# are refused: llama-cpp-python's converter spells a bound n out n times, so one
# number could make it build gigabytes, and llama.cpp refuses over 2,000 anyway.
MAX_SCHEMA_REPEAT = 1000
MAX_COMPILED_GRAMMAR_CHARS = 1 << 20
_REPEAT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_PATTERN_BOUNDS = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def schema_problem(schema: Any) -> str | None:
    """Why llmarket will not convert ``schema``, in a few words; None when it may.

    Two things are refused before llama-cpp-python's converter sees them: a
    repetition bound over ``MAX_SCHEMA_REPEAT`` (the converter writes a bound n
    out n times) and a ``$ref`` to anything but this document (the converter
    would fetch an ``https://`` one when Python runs with ``-O``).
    """
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in _REPEAT_KEYS and isinstance(value, (int, float)) and value > MAX_SCHEMA_REPEAT:
                    return f"{key} {value} is over {MAX_SCHEMA_REPEAT}, the most repetitions supported"
                if key == "pattern" and isinstance(value, str):
                    for match in _PATTERN_BOUNDS.finditer(value):
                        if any(n and (len(n) > 9 or int(n) > MAX_SCHEMA_REPEAT) for n in match.groups()):
                            return (
                                f"the pattern's {match.group(0)[:20]} is over {MAX_SCHEMA_REPEAT}, "
                                "the most repetitions supported"
                            )
                if key == "$ref" and not (isinstance(value, str) and value.startswith("#/")):
                    return "only local $refs (#/...) are supported"
                todo.append(value)
    return None


def checked_grammar(vocab: Any, params: SamplingParams) -> str | None:
    """The GBNF text that constrains ``params``' output, accepted by llama.cpp's parser; None if unconstrained.

    Blocking (a schema conversion and a grammar parse): call it from a thread.
    ``vocab`` is any slot's ``llama_vocab`` (read only, so safe while that slot decodes).

    Raises:
        InvalidRequest: a schema or grammar llama.cpp cannot use, in one line.
    """
    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if params.json_schema is not None:
        what = "json_schema"
        try:
            schema = json.loads(params.json_schema)
        except (ValueError, RecursionError) as err:
            raise InvalidRequest(f"json_schema is not valid JSON: {one_line(err)}") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("json_schema must be a JSON object (a JSON Schema)")
        if (problem := schema_problem(schema)) is not None:
            raise InvalidRequest(f"json_schema: {problem}")
        try:
            gbnf = json_schema_to_gbnf(params.json_schema)
        except Exception as err:  # the converter raises whatever it trips on: KeyError, ValueError, TypeError, ...
            raise InvalidRequest(f"json_schema cannot be turned into a grammar: {one_line(err)}") from None
        if len(gbnf) > MAX_COMPILED_GRAMMAR_CHARS:
            raise InvalidRequest("json_schema makes a grammar too large to use; simplify the schema")
    elif params.grammar is not None:
        what, gbnf = "grammar", params.grammar
    else:
        return None
    try:
        encoded = gbnf.encode()
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid Unicode text") from None
    if b"\x00" in encoded:
        raise InvalidRequest(f"{what} must not contain NUL characters")
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, encoded, b"root")
    if not sampler:
        raise InvalidRequest(
            f"{what}: llama.cpp cannot use this grammar (a GBNF syntax error, an undefined rule, no 'root' rule, "
            "left recursion, or too many repetitions)"
        )
    llama_cpp.llama_sampler_free(sampler)
    return gbnf
