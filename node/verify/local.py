"""Checking answers on this machine, with an engine that has the model.

``check`` re-runs a request's answer on an engine (``Engine.observe``) and
``judge``s it (node/verify/judge.py). Two users: ``LocalVerifier`` checks the
jobs a requester ran (``request --verify``, ``gateway --verify``), and
``CheckingEngine`` serves verification jobs for others on
``/llmarket/verify/1.0.0`` (a worker's second ``WorkerService``), answering
with the verdict as its output text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from node.concurrency import open_service_nursery
from node.errors import InvalidRequest, ModelError
from node.inference.fingerprints import RECORD_BYTES, Observations, unpack
from node.inference.sampling import FINISH_STOP, Delta, Finished, Usage
from node.market.jobs import check_result_receipt
from node.protocol.messages import CheckTask, JobDone, JobRequest
from node.verify.judge import Verdict, describe, judge, noise_class, request_params, verdict_text

log = logging.getLogger(__name__)


async def check(
    engine,
    request: JobRequest,
    fingerprints: bytes,
    *,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    numerics: str = "",
) -> Verdict:
    """Re-run ``request``'s answer on ``engine`` (which loads the request's model) and judge it.

    ``prompt_tokens`` and ``completion_tokens`` are the usage the worker billed (its receipt's); ``numerics``
    is what its receipt claims, which picks the class of honest noise it is checked in (``noise_class``: exact
    when it is the engine's own).

    Raises:
        InvalidRequest: the request or the fingerprints cannot be checked at all.
        ContextTooLong: prompt + answer do not fit the engine's context.
    """
    verdict, _ = await examine(
        engine,
        request,
        fingerprints,
        text=text,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        numerics=numerics,
    )
    return verdict


async def examine_answer(engine, request: JobRequest, text: str, done: JobDone) -> tuple[Verdict, Observations]:
    """``examine`` a worker's answer to ``request``: the ``text`` it streamed and its ``JobDone``, whose signed
    receipt gives the usage billed and the numerics claimed."""
    return await examine(
        engine,
        request,
        done.fingerprints,
        text=text,
        finish_reason=done.finish_reason,
        prompt_tokens=done.receipt.prompt_tokens,
        completion_tokens=done.receipt.completion_tokens,
        numerics=done.receipt.numerics,
    )


async def examine(
    engine,
    request: JobRequest,
    fingerprints: bytes,
    *,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    numerics: str = "",
) -> tuple[Verdict, Observations]:
    """``check``, with the observations the verdict rests on."""
    params = request_params(request)
    try:
        records = unpack(fingerprints)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    if request.messages is not None:
        observing = engine.observe_chat(request.messages, params, fingerprints, assistant_prefix=request.resume_text)
    elif request.prompt is not None:
        observing = engine.observe_completion(request.prompt, params, fingerprints, resume_text=request.resume_text)
    else:
        raise InvalidRequest("the request has neither messages nor a prompt")
    observations = await observing
    verdict = judge(
        observations,
        records,
        params,
        text=text,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        noise=noise_class(numerics, getattr(engine, "batch_numerics", "")),
    )
    return verdict, observations


# ------------------------------------------------------------------ self-check


@dataclass
class LocalVerifier:
    """Checks finished jobs with engines on this machine (``request --verify``, ``gateway --verify``).

    ``engines`` maps a model CID to an engine that loads it. A job for another
    model is not checked (``check_result`` returns None).
    """

    engines: dict[str, Any]

    async def check_result(self, result) -> Verdict | None:
        """The verdict on ``result`` (a ``node.market.requester.JobResult``); None when it cannot be checked here."""
        proof = result.proof
        engine = self.engines.get(result.model)
        if proof is None or engine is None or not proof.done.fingerprints:
            return None
        verdict, _ = await examine_answer(engine, proof.request, proof.text, proof.done)
        log.info("job %s from %s…: %s", proof.request.job_id, proof.worker[:12], describe(verdict))
        return verdict


def local_model_path(data_dir: Path, cid: str) -> Path:
    """The file of model ``cid`` on this machine (the model cache, or the embedded default model).

    Raises:
        ModelError: the model is not here; it says how to get it.
    """
    from node.models.default import DEFAULT_MODEL_CID, default_model_file
    from node.models.store import ModelStore

    if cid == DEFAULT_MODEL_CID:
        return default_model_file()
    stored = ModelStore.in_data_dir(data_dir).get(cid)
    if stored is None:
        raise ModelError(f"--verify needs model {cid} on this machine; fetch it first: llmarket models add {cid}")
    return stored.path


@asynccontextmanager
async def open_local_verifier(data_dir: Path, cid: str, *, n_ctx: int = 4096) -> AsyncIterator[LocalVerifier]:
    """A ``LocalVerifier`` for model ``cid``, with a one-slot engine (loaded in a thread)."""
    from node.inference.engine import open_engine

    path = await trio.to_thread.run_sync(local_model_path, Path(data_dir), cid)
    async with open_engine(path, slots=1, n_ctx=n_ctx) as engine:
        yield LocalVerifier({cid: engine})


# ------------------------------------------------------------------ verification jobs (worker side)


def checked_task(request: JobRequest) -> CheckTask:
    """``request``'s check task, if it can be checked at all; ``InvalidRequest`` (one line) if not."""
    task = request.check
    if task is None:
        raise InvalidRequest("not a verification job")
    original = task.original
    if original.check is not None:
        raise InvalidRequest("a verification job cannot check another verification job")
    if original.model != request.model:
        raise InvalidRequest("the answer to check is for another model")
    problem = check_result_receipt(task.done.receipt, original, task.text, task.done.fingerprints)
    if problem:
        raise InvalidRequest(f"the answer to check: {problem}")
    if not task.done.fingerprints:
        raise InvalidRequest("the answer to check has no fingerprints")
    return task


@dataclass
class CheckingEngine:
    """Serves verification jobs with ``engine``: a ``WorkerService`` with ``protocol=VERIFY_PROTOCOL`` calls
    ``stream_check`` for each request. The job's usage is the tokens evaluated (prompt + answer, billed as
    prompt tokens); its output text is ``verdict_text``, so the worker's signed receipt signs the verdict."""

    engine: Any

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    @asynccontextmanager
    async def stream_check(self, request: JobRequest) -> AsyncIterator[trio.MemoryReceiveChannel]:
        task = checked_task(request)
        send, recv = trio.open_memory_channel(2)

        async def run() -> None:
            async with send:
                started = time.perf_counter()
                verdict, observations = await examine_answer(self.engine, task.original, task.text, task.done)
                log.info("checked job %s of %s…: %s", task.original.job_id, task.done.receipt.worker[:12],
                         describe(verdict))  # fmt: skip
                text = verdict_text(task, verdict, observations)
                records = len(task.done.fingerprints) // RECORD_BYTES
                usage = Usage(prompt_tokens=observations.prompt_tokens + records, completion_tokens=0)
                took = time.perf_counter() - started
                await send.send(Delta(text, 0, usage.prompt_tokens))
                await send.send(Finished(text, usage, FINISH_STOP, took, took))

        async with open_service_nursery() as nursery:
            nursery.start_soon(run)
            try:
                async with recv:
                    yield recv
            finally:
                nursery.cancel_scope.cancel()
