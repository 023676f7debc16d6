"""What this node has been doing, for its web page: jobs as they happen, an hour of sums, and a live feed.

A worker's ``WorkerService`` and a gateway's requests report each job here
(started, tokens as they stream, ended, checked); the page reads the last jobs
and the per-10-second sums through ``node.api.dashboard`` and follows new events
over server-sent events. Everything is in memory and bounded: the last
``max_jobs`` jobs and one hour of buckets. One ``Activity`` per node, so two
nodes in one process keep separate books.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import trio

BUCKET_S = 10.0
HOUR_S = 3600.0
PROGRESS_EVERY_S = 0.5  # at most this often, a running job's token count goes to the feed
FEED_BUFFER = 256  # events a slow subscriber may lag behind before it is dropped (a browser reconnects)

RUNNING, DONE, FAILED, CANCELLED, REJECTED = "running", "done", "failed", "cancelled", "rejected"
SERVED, REQUESTED, VERIFY = "served", "requested", "verify"


@dataclass
class JobRecord:
    """One job as the page shows it (``/api/jobs``; docs/gateway.md)."""

    id: str
    kind: str  # SERVED (this worker ran it), REQUESTED (this node sent it), VERIFY (a verification job served)
    model: str
    peer: str  # the other side: the requester, or the worker that (last) ran it
    started_at: float
    model_name: str = ""
    ended_at: float | None = None
    prompt_tokens: int = 0
    tokens: int = 0
    tokens_per_s: float | None = None
    state: str = RUNNING
    detail: str = ""
    cost: int = 0  # token units earned (served) or spent (requested)
    failovers: list[str] = field(default_factory=list)  # workers dropped before the one that finished
    verification: dict | None = None  # {"ok", "how", "reason"} once checked
    _sent_at: float = field(default=-math.inf, repr=False)  # when progress last went to the feed

    def json(self) -> dict:
        body = asdict(self)
        body.pop("_sent_at")
        body["cost"] = str(self.cost)  # base units, as a decimal string (node/dashboard.py)
        return body


@dataclass
class Activity:
    """This node's jobs and sums. ``amount_label`` says what job costs are to this node: "earned" or "spent"."""

    amount_label: str = "earned"
    model_names: dict[str, str] = field(default_factory=dict)  # CID → file name, for the rows
    max_jobs: int = 500
    clock: Callable[[], float] = time.time
    _jobs: dict[str, JobRecord] = field(default_factory=dict)  # insertion order: oldest first
    _buckets: deque = field(default_factory=deque)  # [start, tokens, jobs, amount], oldest first
    _feeds: set[trio.MemorySendChannel] = field(default_factory=set)
    totals: dict = field(default_factory=lambda: {"jobs": 0, "tokens": 0, "failovers": 0, "checks": 0,
                                                  "checks_failed": 0, "amount": 0})  # fmt: skip

    # ------------------------------------------------------------ reporting

    def started(self, kind: str, job_id: str, model: str, peer: str = "", *, model_name: str = "") -> JobRecord:
        """A job began; returns its row. A job id already running (two requesters' ids can collide) gets a suffix:
        report the rest under ``JobRecord.id``."""
        if job_id in self._jobs and self._jobs[job_id].state == RUNNING:
            job_id = f"{job_id}~{len(self._jobs)}"
        self._jobs.pop(job_id, None)
        name = model_name or self.model_names.get(model, "")
        job = JobRecord(job_id, kind, model, peer, self.clock(), model_name=name)
        self._jobs[job_id] = job
        while len(self._jobs) > self.max_jobs:
            self._jobs.pop(next(iter(self._jobs)))
        self._publish("job", job.json())
        job._sent_at = self.clock()
        return job

    def progress(self, job_id: str, tokens: int, *, prompt_tokens: int = 0) -> None:
        """``tokens`` more completion tokens for a running job (and, when known, its prompt's size)."""
        job = self._jobs.get(job_id)
        if job is None or job.state != RUNNING:
            return
        job.tokens += tokens
        job.prompt_tokens = prompt_tokens or job.prompt_tokens
        self._add(tokens=tokens)
        self.totals["tokens"] += tokens
        now = self.clock()
        if now - job._sent_at >= PROGRESS_EVERY_S:
            job._sent_at = now
            self._publish("job", job.json())

    def failover(self, job_id: str, peer: str, reason: str) -> None:
        """The job left ``peer`` (it failed or was dropped) and goes on elsewhere."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.failovers.append(peer)
        job.detail = f"{peer[:12]}… failed: {reason}"
        self.totals["failovers"] += 1
        self._publish("job", job.json())

    def ended(
        self,
        job_id: str,
        state: str,
        *,
        detail: str = "",
        tokens: int | None = None,
        prompt_tokens: int | None = None,
        tokens_per_s: float | None = None,
        cost: int = 0,
    ) -> None:
        """The job is over. ``tokens``, when given, is its final completion count (counted tokens are corrected
        to it); ``tokens_per_s``, when given, its decode speed; ``cost`` is what it earned or spent."""
        job = self._jobs.get(job_id)
        if job is None or job.state != RUNNING:
            return
        if tokens is not None and tokens != job.tokens:
            self._add(tokens=tokens - job.tokens)
            self.totals["tokens"] += tokens - job.tokens
            job.tokens = tokens
        job.prompt_tokens = prompt_tokens if prompt_tokens is not None else job.prompt_tokens
        job.state, job.detail, job.cost, job.ended_at = state, detail, cost, self.clock()
        job.tokens_per_s = tokens_per_s if tokens_per_s is not None else job.tokens_per_s
        self._add(jobs=int(state == DONE), amount=cost)
        self.totals["jobs"] += int(state == DONE)
        self.totals["amount"] += cost
        self._publish("job", job.json())

    def checked(self, job_id: str, ok: bool, how: str, reason: str = "", *, cost: int = 0) -> None:
        """A verification verdict on a finished job (``how``: local, spot, reported); ``cost``: what the check
        cost (a spot check is paid), added to the job's."""
        self._add(amount=cost)
        self.totals["amount"] += cost
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.cost += cost
        job.verification = {"ok": ok, "how": how, "reason": reason}
        self.totals["checks"] += 1
        self.totals["checks_failed"] += 0 if ok else 1
        self._publish("job", job.json())

    def notify(self, event: str, data: dict) -> None:
        """Send any other event to the feed (``market``, ``node``)."""
        self._publish(event, data)

    # -------------------------------------------------------------- reading

    def get(self, job_id: str) -> JobRecord:
        """A job's row; a job no longer kept gets a detached one, so reporting never fails."""
        return self._jobs.get(job_id) or JobRecord(job_id, "", "", "", self.clock())

    def jobs(self, limit: int = 100) -> list[dict]:
        """The last ``limit`` jobs, newest first."""
        newest = list(self._jobs.values())[::-1][:limit]
        return [job.json() for job in newest]

    def series(self) -> dict:
        """The last hour in ``BUCKET_S`` buckets, oldest first, zero-filled up to now (``/api/series``)."""
        now = self.clock()
        self._trim(now)
        last = math.floor(now / BUCKET_S) * BUCKET_S
        count = int(HOUR_S / BUCKET_S)
        start = last - (count - 1) * BUCKET_S
        sums = {bucket[0]: bucket for bucket in self._buckets}
        t, tokens, jobs, amount = [], [], [], []
        for k in range(count):
            at = start + k * BUCKET_S
            _, tok, done, paid = sums.get(at, (at, 0, 0, 0))
            t.append(at)
            tokens.append(round(tok / BUCKET_S, 2))
            jobs.append(done * 60 / BUCKET_S)
            amount.append(paid * 60 / BUCKET_S)
        return {"bucket_s": BUCKET_S, "start": start, "t": t, "tokens_per_s": tokens, "jobs_per_min": jobs,
                "amount_per_min": amount, "amount_label": self.amount_label}  # fmt: skip

    @property
    def watched(self) -> bool:
        """Whether anyone follows the feed now."""
        return bool(self._feeds)

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel]:
        """A channel of (event, data) pairs from now on. A subscriber that falls ``FEED_BUFFER`` events behind
        is closed (its channel ends), so a stuck browser never holds the node back."""
        send, receive = trio.open_memory_channel(FEED_BUFFER)
        self._feeds.add(send)
        try:
            yield receive
        finally:
            self._feeds.discard(send)
            send.close()

    # ------------------------------------------------------------- internal

    def _publish(self, event: str, data: dict) -> None:
        for feed in list(self._feeds):
            try:
                feed.send_nowait((event, data))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                self._feeds.discard(feed)
                feed.close()

    def _add(self, *, tokens: int = 0, jobs: int = 0, amount: int = 0) -> None:
        now = self.clock()
        at = math.floor(now / BUCKET_S) * BUCKET_S
        if not self._buckets or self._buckets[-1][0] != at:
            self._buckets.append([at, 0, 0, 0])
            self._trim(now)
        bucket = self._buckets[-1]
        bucket[1] += tokens
        bucket[2] += jobs
        bucket[3] += amount

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] < now - HOUR_S - BUCKET_S:
            self._buckets.popleft()
