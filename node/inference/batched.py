"""Continuous batching: one llama.cpp context decodes every running job's next token in one pass.

``open_engine(..., kind="batched")`` builds a ``BatchedEngine``: the same
``Engine`` to its callers (``stream_chat``, ``stream_completion``, ``observe``,
slots, events), but its slots are *sequences* of one context instead of one
context each. A scheduler thread runs the loop:

1. admit new jobs, each on a free sequence whose cache already holds as much of
   its prompt as can be found (``Scheduler._place``: its own cells, another
   sequence's stream copied, or a prefix another job is computing, waited for);
2. build one ``llama_batch``: the next token of every sequence that is
   generating, then prompt tokens of sequences still prefilling, in chunks of
   at most ``PREFILL_CHUNK`` per step so a long prompt never stalls the others;
3. decode once; each generating sequence samples from its own row of logits
   with its own sampler chain (``Sampler``), records its fingerprint, and
   streams its text as the per-slot engine does (``TokenStream``: stops, logprobs, ``Finished``);
4. drop sequences that finished or were cancelled: the sequence is free at
   once (a cancel frees it within one step), and its cells stay in its own
   stream for a later prompt that begins the same way.

Weights are read once per step for all sequences, which is where the
throughput comes from on CPUs as on GPUs. Verification (``observe``) runs on
the engine's own separate context, one check at a time, on the scheduler's
thread; every batch it decodes there is followed by one step of the running jobs
(``Scheduler._interleaved``), so a check of thousands of tokens stalls the streams
for one of its batches at a time, not for the whole pass. What the check computes
is unchanged: the same batches, in the same order, on its own context.

A llama.cpp failure stops the engine: every job running or queued ends with
``EngineFailed`` (never a ``Finished``, which a worker would sign and bill), and
new jobs are refused.
"""

from __future__ import annotations

import collections
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from node.inference.base import Engine
from node.inference.numerics import PROBE_TOKENS
from node.inference.sampler import Sampler
from node.inference.sampling import FINISH_CANCELLED, SamplingParams
from node.inference.slot import Slot
from node.inference.stream import TokenStream

PREFILL_CHUNK = PROBE_TOKENS  # prompt tokens a sequence may add to one step: under 64, so that flash attention
# computes every row one at a time, as a decoded token's (batch invariance: ``batched_context``)
SPLIT_FROM = 256  # cells a sequence may hold before a single token's attention view reaches 512 (``_step``)
COPY_MIN = 32  # prompt tokens a copy from another sequence must save: it copies that sequence's whole stream


class EngineFailed(RuntimeError):
    """llama.cpp failed under the batched engine: the job did not finish, and the engine takes no more jobs."""


class _Stopped(Exception):
    """``Scheduler.stop`` was called: the loop ended, and whatever is queued behind the stop is refused."""


def _common(held: list[int], prompt: list[int]) -> int:
    """How many leading tokens ``held`` and ``prompt`` share."""
    n = min(len(held), len(prompt))
    if held[:n] == prompt[:n]:
        return n
    lo, hi = 0, n  # held[:lo] matches, held[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if held[:mid] == prompt[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Job:
    """One sequence's job, as the scheduler thread runs it."""

    prompt: list[int]
    said: list[int]
    params: SamplingParams
    grammar: str | None
    emit: Any  # trio-side: takes each event (the scheduler posts them, a batch per step)
    cancelled: threading.Event
    record: bool
    done: Any  # trio-side: called once the job's last event was delivered
    trio_token: Any = None  # where ``emit`` and ``done`` run
    seq: int = -1  # the sequence the scheduler placed it on
    kv: list[int] = field(default_factory=list)  # the tokens in the sequence's cache, by position
    leader: _Job | None = None  # a job still prefilling the prefix this one waits to copy (``_place``)
    promised: int = 0  # how much of it
    fed: int = 0  # prompt tokens in the cache
    next_token: int | None = None  # the last sampled token, to feed at the next step
    sampler: Sampler | None = None
    stream: TokenStream | None = None  # its text, streamed as it is sampled
    started: float = field(default_factory=time.perf_counter)


def _run_all(calls: list) -> None:
    for fn, args in calls:
        fn(*args)


@dataclass
class _Call:
    """A function to run on the scheduler's thread (``Scheduler.call``)."""

    fn: Callable[[], Any]
    result: Future = field(default_factory=Future)


class Scheduler:
    """The loop that owns the batched context (see the module docstring). Runs in its own thread."""

    def __init__(self, n_batch: int, *, reuse_prefixes: bool = True) -> None:
        import llama_cpp

        self._c = llama_cpp
        self._llama: Any = None  # the model, vocabulary and detokenizer (its own context is for observe)
        self._ctx: Any = None
        self._memory: Any = None
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._incoming: queue.SimpleQueue[_Job | _Call | None] = queue.SimpleQueue()
        self._running: list[_Job] = []
        self._reuse = reuse_prefixes
        self._held: list[list[int]] = []  # per free sequence: the tokens its cache still holds
        self._free: set[int] = set()
        self.reused_tokens = 0  # prompt tokens found in a cache instead of computed, for tests and benchmarks
        self.copies = 0  # streams copied from another sequence
        self.prefill_chunk = PREFILL_CHUNK  # benchmarks try others (bench/throughput.py --chunks)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llmarket-batched", daemon=True)
        self._lock = threading.Lock()  # ``_failure`` and enqueueing: no job is queued once the loop has died
        self._failure: BaseException | None = None
        self._calling = False  # a ``call`` is running; the steps between its decodes admit jobs only
        self._later: collections.deque[_Job | _Call | None] = collections.deque()  # taken during a call, for after it
        self._broken: BaseException | None = None  # a step between a call's decodes failed: the loop ends after it
        self.steps = 0  # decode calls, for tests and benchmarks
        self.mixed_steps = 0  # of which some sequences decoded while others prefilled
        self._outbox: list[tuple[Any, Callable[..., None], tuple]] = []  # trio calls of this step, in order

    def start(self) -> None:
        self._thread.start()

    def attach(self, llama: Any, ctx: Any, slots: int) -> None:
        """The model (``llama``) and the batched context of ``slots`` sequences the loop decodes with (call
        through ``call``)."""
        self._llama, self._ctx = llama, ctx
        self._memory = self._c.llama_get_memory(ctx)
        self._held = [[] for _ in range(slots)]
        self._free = set(range(slots))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the scheduler's thread, the running jobs stepping between its decodes (``_interleaved``);
        its result (blocking the calling thread).

        Everything that computes with llama.cpp runs on this one thread: loading, the numerics probe,
        verification passes. llama.cpp's CPU backend runs on OpenMP, whose worker teams belong to the thread
        that started them; decoding from a second thread once the first has computed was measured 2-5×
        slower on this machine (bench/throughput.py's notes in docs/benchmarks.md).
        """
        call = _Call(fn)
        self.submit(call)
        return call.result.result()

    def stop(self) -> None:
        self._incoming.put(None)
        self._wake.set()
        self._thread.join()
        self._c.llama_batch_free(self._batch)

    def submit(self, job: _Job | _Call) -> None:
        """Queue ``job`` (or a call) for the loop.

        Raises:
            EngineFailed: the loop has died; nothing was queued. A job queued before that ends with the
                error instead (``_die``): under the lock, the loop cannot die between the check and the put.
        """
        with self._lock:
            if self._failure is not None:
                raise self._failed()
            self._incoming.put(job)
        self._wake.set()

    def _failed(self) -> EngineFailed:
        """A fresh error for one job (each raises its own, with its own traceback)."""
        if isinstance(self._failure, _Stopped):
            return EngineFailed("the batched engine was stopped")
        err = EngineFailed(f"the batched engine stopped: llama.cpp failed ({self._failure})")
        err.__cause__ = self._failure
        return err

    # ------------------------------------------------------------ the loop

    def _post(self, job: _Job, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` to run in trio; sent with the step's other events in one wake-up (``_flush``)."""
        self._outbox.append((job.trio_token, fn, args))

    def _flush(self) -> None:
        if not self._outbox:
            return
        by_token: dict[Any, list] = {}
        for token, fn, args in self._outbox:
            by_token.setdefault(token, []).append((fn, args))
        self._outbox.clear()
        for token, calls in by_token.items():
            token.run_sync_soon(_run_all, calls)

    def _loop(self) -> None:
        try:
            while True:
                admitted = self._admit()
                self._flush()
                if not admitted:  # stopped: a job or call queued behind the stop must fail, not wait forever
                    self._die(_Stopped())
                    return
                if not self._running:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._step()
                self._flush()
        except BaseException as err:  # a llama.cpp failure: every job fails, the engine refuses new ones
            self._die(err)

    def _die(self, err: BaseException) -> None:
        """End every job, running or still queued, with ``EngineFailed``; fail queued calls likewise.

        A job that ended as cancelled here would be billed: the worker signs a ``JobDone`` for any
        ``Finished``. Once ``_failure`` is set under the lock, ``submit`` queues nothing more, so draining the
        queue after that reaches every job that will ever be waiting.
        """
        with self._lock:
            self._failure = err
        for job in list(self._running):
            self._fail(job, self._failed())
        self._running.clear()
        waiting = list(self._later)
        self._later.clear()
        while True:
            try:
                waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        for item in waiting:
            if isinstance(item, _Call):
                item.result.set_exception(self._failed())
            elif item is not None:
                self._post(item, item.emit, self._failed())
                self._post(item, item.done)
        self._flush()

    def _admit(self) -> bool:
        """Take the jobs that arrived; False when the engine is stopping.

        During a call (``_interleaved``), only jobs are taken: the first call or stop to arrive waits, with
        whatever came after it, until the call has returned.
        """
        while True:
            if self._later and not self._calling:
                job = self._later.popleft()
            elif self._later:
                return True
            else:
                try:
                    job = self._incoming.get_nowait()
                except queue.Empty:
                    return True
            if self._calling and not isinstance(job, _Job):
                self._later.append(job)
                return True
            if job is None:
                for running in list(self._running):
                    self._finish(running, FINISH_CANCELLED)
                return False
            if isinstance(job, _Call):
                self._call(job)
                continue
            self._place(job)
            seed = job.params.seed if job.params.seed is not None else secrets.randbits(31)
            try:
                job.sampler = Sampler(self._llama, job.params, job.grammar, seed, job.said, ctx=self._ctx)
            except Exception as err:  # a grammar llama.cpp refuses: the job ends with the error
                self._release(job, keep=True)
                self._post(job, job.emit, err)
                self._post(job, job.done)
                continue
            job.stream = TokenStream(
                self._llama, job.params, job.sampler, partial(self._post, job, job.emit),
                prompt_tokens=len(job.prompt), cancelled=job.cancelled, record=job.record, started=job.started,
                ctx=self._ctx,
            )  # fmt: skip
            self._running.append(job)

    def _call(self, call: _Call) -> None:
        """Run ``call`` with the running jobs stepping between its decodes; a step that failed then ends the loop."""
        self._calling = True
        try:
            with self._interleaved():
                call.result.set_result(call.fn())
        except BaseException as err:
            call.result.set_exception(err)
        finally:
            self._calling = False
        if self._broken is not None:
            raise self._broken

    @contextmanager
    def _interleaved(self) -> Iterator[None]:
        """While a call computes on the model's own context (a verification pass: ``Engine.observe``), each
        ``decode`` it makes there is followed by one step of the running jobs on the batched context.

        A pass of thousands of tokens thus stalls the streams for one of its batches (at most ``n_batch``
        tokens of prompt, or ``PROBE_TOKENS`` of answer) at a time instead of for the whole pass. The pass's own
        batches, positions and order are untouched, and the steps compute on the other context, so its result
        is bit for bit what it was inline. Both contexts are computed on this one thread (see ``call``).
        Before ``attach`` (loading, the numerics probe) there are no jobs, and nothing is interleaved.
        """
        if self._ctx is None:
            yield
            return
        own = self._llama._ctx  # llama-cpp-python's LlamaContext: Llama.eval and observe decode through it
        decode = own.decode

        def decode_then_step(batch: Any) -> Any:
            result = decode(batch)
            if self._broken is None:
                try:
                    self._admit()
                    self._flush()
                    if self._running:
                        self._step()
                        self._flush()
                except BaseException as err:  # the batched context failed: the call fails, then the loop
                    self._broken = err
                    raise
            return result

        own.decode = decode_then_step  # on this instance, for this call only
        try:
            yield
        finally:
            del own.decode

    def _place(self, job: _Job) -> None:
        """Put ``job`` on a free sequence whose cache will hold the longest prefix of its prompt to be found.

        A prompt often begins as an earlier one did (the same system prompt, or a conversation's earlier
        turns). A finished sequence's cells stay in its own stream until the sequence is reused (every stream
        is allocated up front, so keeping them costs nothing), and a new job takes the free sequence whose
        cache shares most with its prompt: that prefix is not computed again. When another sequence, running
        or free, holds at least ``COPY_MIN`` more of it, its whole stream is copied instead (``_fill``). When a
        job still prefilling will hold that much more, the new job waits for it (``leader``) and copies then,
        so jobs that arrive together with one system prompt compute it once. The last prompt token is always
        computed, for its logits.
        """
        shares = lambda held: self._shares(held, job)  # noqa: E731
        own = {s: shares(self._held[s]) for s in self._free}
        found = max([*own.values(), *(shares(j.kv) for j in self._running)])
        leader = max(self._running, key=lambda j: shares(j.prompt), default=None)
        promised = shares(leader.prompt) if leader is not None else 0
        best = max(own.values())
        if max(found, promised) >= best + COPY_MIN:  # a copy will replace the cache: take the one worth least
            seq = min(self._free, key=lambda s: (own[s], s))
        else:
            seq = max(self._free, key=lambda s: (own[s], -s))
        self._free.discard(seq)
        job.seq, job.kv, self._held[seq] = seq, self._held[seq], []
        if promised >= max(found, best) + COPY_MIN:
            job.leader, job.promised = leader, promised
        else:
            self._fill(job)

    def _shares(self, held: list[int], job: _Job) -> int:
        """How many of ``job``'s prompt tokens a cache holding ``held`` would spare it (not the last one)."""
        return min(_common(held, job.prompt), len(job.prompt) - 1) if self._reuse else 0

    def _fill(self, job: _Job) -> None:
        """Make ``job``'s cache hold the longest prefix of its prompt found: its own cells trimmed, or another
        sequence's stream copied (in llama.cpp, cross-stream copies are whole buffers, made at the next
        decode before its tokens are written) and trimmed."""
        c = self._c
        keep = self._shares(job.kv, job)
        holders = [(s, self._held[s]) for s in self._free] + [(j.seq, j.kv) for j in self._running if j is not job]
        source, shared = max(((s, self._shares(held, job)) for s, held in holders), key=lambda h: h[1], default=(0, 0))
        if shared >= keep + COPY_MIN:
            c.llama_memory_seq_cp(self._memory, source, job.seq, -1, -1)
            self.copies += 1
            keep = shared
        c.llama_memory_seq_rm(self._memory, job.seq, keep if keep else -1, -1)
        job.kv, job.fed = job.prompt[:keep], keep
        self.reused_tokens += keep

    def _release(self, job: _Job, *, keep: bool) -> None:
        """``job``'s sequence is free again; its cache is kept for later prompts (``keep``) or cleared."""
        if job.seq < 0 or job.seq in self._free:
            return
        if not keep:
            self._c.llama_memory_seq_rm(self._memory, job.seq, -1, -1)
        self._held[job.seq] = job.kv if keep else []
        self._free.add(job.seq)

    def _step(self) -> None:
        """One decode over every running sequence; then sampling for those whose logits are due."""
        c, batch = self._c, self._batch
        for job in [j for j in self._running if j.cancelled.is_set()]:
            self._finish(job, FINISH_CANCELLED)
        for job in self._running:  # a leader computed what it promised, or ended: take what there is now
            if job.leader is not None and (job.leader.fed >= job.promised or job.leader not in self._running):
                job.leader = None
                self._fill(job)
        plan: list[tuple[_Job, list[int], bool]] = []  # (job, its tokens this step, whether its logits are due)
        room = self._n_batch
        for job in self._running:  # decoding sequences first: one token each
            if job.next_token is not None:
                plan.append((job, [job.next_token], True))
                room -= 1
        decoding = len(plan)
        for job in self._running:  # then prompts, a chunk each, while the batch has room
            left = len(job.prompt) - job.fed
            if left <= 0 or job.next_token is not None or job.leader is not None:
                continue
            take = min(left, self.prefill_chunk, room)
            if take <= 0:
                break
            plan.append((job, job.prompt[job.fed : job.fed + take], job.fed + take == len(job.prompt)))
            job.fed += take
            room -= take
        if not plan:
            return
        # In sequence order: llama.cpp cuts a batch of several streams into ubatches of consecutive sequence ids
        # (split_equal), so ordered rows share ubatches and fewer sequences decode alone.
        rows: list[tuple[_Job, int]] = []  # (job, batch row holding its logits)
        n = 0
        for job, tokens, due in sorted(plan, key=lambda entry: entry[0].seq):
            for k, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, len(job.kv), 1
                batch.seq_id[n][0], batch.logits[n] = job.seq, due and k == len(tokens) - 1
                job.kv.append(token)
                n += 1
            if due:
                rows.append((job, n - 1))
        batch.n_tokens = n
        # A single-token ubatch runs on ``n_threads``. Its flash attention splits the KV cells among them once the
        # view (the sequence's cells, padded to 256) reaches 512 cells, and reduces the parts in another order than
        # the row path: there, one thread (``batched_context``); below, every core, as no split happens.
        far = any(len(job.kv) > SPLIT_FROM for job, _, _ in plan)
        c.llama_set_n_threads(
            self._ctx, 1 if far else c.llama_n_threads_batch(self._ctx), c.llama_n_threads_batch(self._ctx)
        )
        status = c.llama_decode(self._ctx, batch)
        self.steps += 1
        self.mixed_steps += 0 < decoding < len(plan)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for job, row in rows:
            try:
                self._sample(job, row)
            except Exception as err:  # this job's own failure (a grammar with no way on): it alone ends
                self._fail(job, err)

    def _sample(self, job: _Job, row: int) -> None:
        """``job``'s next token, from batch row ``row``, streamed; the job ends here or feeds it next step."""
        token = job.stream.next(row)
        if token is None:
            self._finish(job, job.stream.reason)
        else:
            job.next_token = token

    def _fail(self, job: _Job, err: BaseException) -> None:
        if job in self._running:
            self._running.remove(job)
        self._release(job, keep=False)
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        self._post(job, job.emit, err)
        self._post(job, job.done)

    def _finish(self, job: _Job, reason: str) -> None:
        if job in self._running:
            self._running.remove(job)
        self._release(job, keep=True)
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        job.stream.finish(reason)  # its last events, posted
        self._post(job, job.done)


@dataclass
class BatchedEngine(Engine):
    """``Engine`` with continuous batching: ``slots`` sequences of one context (built by ``open_engine``)."""

    _scheduler: Any = field(default=None, repr=False)
    _observing: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1), repr=False)

    @property
    def numerics(self) -> str:
        """Whatever its threads: a single-token ubatch runs on one thread (``batched_context``), so a sequence's
        logits are those of the verification pass, whatever shares its batch (docs/verification.md)."""
        return self._claim(self.batch_numerics)

    async def _run(self, slot: Slot, tokens, said, params, grammar, send, cancelled, record: bool) -> None:
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        failure: list[BaseException] = []

        def deliver(event: object) -> None:  # runs in trio, in order
            if isinstance(event, BaseException):
                failure.append(event)
                return
            try:
                send.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                cancelled.set()  # nobody is listening any more

        job = _Job(
            prompt=tokens, said=said, params=params, grammar=grammar,
            emit=deliver, cancelled=cancelled, record=record, done=finished.set, trio_token=token,
        )  # fmt: skip
        self._scheduler.submit(job)  # EngineFailed once the engine has died
        try:
            await finished.wait()
        except BaseException:
            cancelled.set()  # the scheduler frees the sequence at its next step
            with trio.CancelScope(shield=True):
                await finished.wait()
            raise
        if failure:  # raised with ``send`` still open: the consumer is cancelled, never shown an end of stream
            raise failure[0]
        await send.aclose()

    async def _blocking(self, fn, *args):
        """``fn(*args)`` on the scheduler's thread (see ``Scheduler.call``); a trio worker thread waits."""
        return await trio.to_thread.run_sync(self._scheduler.call, lambda: fn(*args))

    async def observe(self, tokenize, params, fingerprints):
        async with self._observing:  # one check at a time on the engine's own context
            return await super().observe(tokenize, params, fingerprints)


def batched_context(llama: Any, *, slots: int, n_ctx: int, threads: int, n_batch: int = 512) -> Any:
    """A context for ``slots`` sequences of ``n_ctx`` tokens each, with flash attention as the engine's own context
    has, in which a sequence's logits do not depend on what shares its batch (batch invariance).

    ggml's CPU flash attention takes one of three paths per ubatch (ggml-cpu ops.cpp), and their floats differ:
    rows one at a time over the KV cells in order (the verification pass's path); a tiled path once a ubatch
    holds 64 rows of one stream; and, for a ubatch of a single token, a split of the KV cells among the threads
    once the view reaches 512 cells. So: one stream per sequence (non-unified KV), whose cells then hold its
    positions in order, whatever was freed and reused or copied (``llama_memory_seq_cp`` copies cell for cell);
    prefill chunks under 64 tokens (``PREFILL_CHUNK``); and single-token ubatches on one thread (``n_threads``;
    ``n_threads_batch`` for the rest), where the split is one chunk, the rows' path. Q4_0/Q4_1/Q8_0 matrix
    products are per row whatever the batch (``probe_numerics`` checks the model's).
    """
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx * slots
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = slots
    params.n_threads, params.n_threads_batch = 1, threads  # single-token ubatches: see ``Scheduler._step``
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.kv_unified = False
    ctx = llama_cpp.llama_init_from_model(llama._model.model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create the batched context")
    return ctx
