"""Per-token fingerprints of the model's output distribution: the format (a leaf module, numpy only).

While it generates, a worker records one 15-byte record per sampled token
(docs/verification.md):

====== ====== ==================================================================
bytes  type   what
====== ====== ==================================================================
0-2    u24    the sampled token's id
3-5    u24    the id of the token with the highest raw logit
6-8    u24    the id of the token with the second highest raw logit
9-10   f16    the highest raw logit
11-12  f16    the second highest raw logit
13-14  f16    the sampled token's raw logit
====== ====== ==================================================================

Little-endian. "Raw" means the model's output, before the repeat penalty,
temperature, top-k/top-p/min-p or any grammar: what a verifier recomputes with
one batched prefill. The sampled token ends the answer when it is the model's
end-of-generation token, so an answer of n tokens that stopped on EOG has n + 1
records. The records of a job are concatenated; ``JobDone.fingerprints``
carries them, and the worker's signed ``ResultReceipt`` commits to their
SHA-256 (``fingerprints_hash``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

RECORD_BYTES = 15
MAX_TOKEN_ID = (1 << 24) - 1

_RECORD = np.dtype(
    [("token", "u1", 3), ("top1", "u1", 3), ("top2", "u1", 3), ("logit1", "<f2"), ("logit2", "<f2"), ("logit", "<f2")]
)
assert _RECORD.itemsize == RECORD_BYTES


@dataclass(frozen=True)
class Fingerprints:
    """A job's records, unpacked into columns (numpy arrays of one length)."""

    tokens: np.ndarray  # int64: the sampled tokens
    top1: np.ndarray  # int64
    top2: np.ndarray  # int64
    logit1: np.ndarray  # float32 (from f16)
    logit2: np.ndarray  # float32
    logit: np.ndarray  # float32: the sampled token's raw logit

    def __len__(self) -> int:
        return len(self.tokens)


def _u24(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype="<u4")
    return ids.view("u1").reshape(-1, 4)[:, :3]


def _from_u24(column: np.ndarray) -> np.ndarray:
    return column[:, 0].astype(np.int64) | column[:, 1].astype(np.int64) << 8 | column[:, 2].astype(np.int64) << 16


def pack(tokens, top1, top2, logit1, logit2, logit) -> bytes:
    """The records of ``len(tokens)`` tokens (equal-length sequences of ids and raw logits)."""
    n = len(tokens)
    if not all(len(column) == n for column in (top1, top2, logit1, logit2, logit)):
        raise ValueError("fingerprint columns differ in length")
    records = np.zeros(n, dtype=_RECORD)
    for name, ids in (("token", tokens), ("top1", top1), ("top2", top2)):
        ids = np.asarray(ids, dtype=np.int64)
        if n and (ids.min() < 0 or ids.max() > MAX_TOKEN_ID):
            raise ValueError("a token id does not fit in 24 bits")
        records[name] = _u24(ids)
    with np.errstate(over="ignore"):  # a logit beyond f16's range saturates to ±inf
        for name, values in (("logit1", logit1), ("logit2", logit2), ("logit", logit)):
            records[name] = np.asarray(values, dtype=np.float32)
    return records.tobytes()


def unpack(data: bytes) -> Fingerprints:
    """The columns of packed records; ``ValueError`` if ``data`` is not a whole number of records."""
    if len(data) % RECORD_BYTES:
        raise ValueError(f"fingerprints are {len(data)} bytes, not a multiple of {RECORD_BYTES}")
    records = np.frombuffer(data, dtype=_RECORD)
    return Fingerprints(
        tokens=_from_u24(records["token"]),
        top1=_from_u24(records["top1"]),
        top2=_from_u24(records["top2"]),
        logit1=records["logit1"].astype(np.float32),
        logit2=records["logit2"].astype(np.float32),
        logit=records["logit"].astype(np.float32),
    )


def digest(data: bytes) -> bytes:
    """What a result receipt commits to: SHA-256 of the packed records (b"" when there are none)."""
    return hashlib.sha256(data).digest() if data else b""


class Recorder:
    """Collects the records of one job, one ``add(logits, token)`` per sampled token (in the generation thread).

    ``logits`` is the raw logit row the token was sampled from. The cost per
    token is two passes over the vocabulary and a copy of it (bench/verify.py).
    """

    def __init__(self) -> None:
        self._rows: list[tuple[int, int, int, float, float, float]] = []

    def add(self, logits: np.ndarray, token: int) -> None:
        first = int(logits.argmax())
        rest = logits.copy()  # two argmax passes and a copy: ~20 µs, where argpartition takes ~170 µs
        rest[first] = -np.inf
        second = int(rest.argmax())
        self._rows.append((token, first, second, float(logits[first]), float(logits[second]), float(logits[token])))

    def __len__(self) -> int:
        return len(self._rows)

    def packed(self, start: int = 0, end: int | None = None) -> bytes:
        """The records of tokens ``start`` to ``end`` (default: all), packed."""
        rows = self._rows[start:end]
        if not rows:
            return b""
        columns = list(zip(*rows, strict=True))
        return pack(*columns)


@dataclass(frozen=True)
class Observations:
    """What a verifier's engine saw at each position of an answer it re-ran (``Engine.observe``).

    ``replayed`` positions were looked at: all of them, unless a record named a
    token outside the vocabulary or a grammar forbade a token (replay stops
    there; ``broken`` says why). Logits are the verifier's raw logits; ``gap``,
    ``between`` and ``p`` describe the claimed token in the replayed sampler
    chain (``Sampler.replay`` in node/inference/sampler.py).
    """

    replayed: int
    broken: str  # "" or why replay stopped early
    prompt_tokens: int  # evaluated before the answer (the prompt and any text resumed after a failover)
    top: np.ndarray  # the verifier's highest raw logit
    at_top1: np.ndarray  # the verifier's raw logit for the worker's claimed top-1 id
    at_top2: np.ndarray
    at_token: np.ndarray  # …for the sampled token
    pick: np.ndarray  # the replayed chain's own pick
    allowed: np.ndarray  # bool: the sampled token is among the chain's final candidates
    gap: np.ndarray  # chain logit of the pick minus the token's (0 when they agree; inf when not allowed)
    between: np.ndarray  # chain probability strictly between pick and token
    p: np.ndarray  # the token's chain probability
    entropy: np.ndarray  # of the chain's final distribution (what a sampled token's surprisal averages to)
    spread: np.ndarray  # the variance of that surprisal
    seeded: bool  # the draw was replayed with the job's own seed
    text: str  # the answer's tokens as text, end-of-generation excluded
    ends_on_eog: bool  # the last record is an end-of-generation token
    eog: np.ndarray  # bool, one per record: the worker's token is an end-of-generation token
    pick_eog: np.ndarray  # bool: the replayed chain's own pick is an end-of-generation token
    stop_p: np.ndarray  # the chain's probability of an end-of-generation token here (1/0 for greedy's pick)


def evidence(observations: Observations) -> bytes:
    """A verifier's per-token evidence: for each replayed position, its own logits at the worker's claimed
    top-1, top-2 and sampled ids (f16 each) and its replayed pick (u24; 0xFFFFFF for none): 9 bytes a token."""
    m = observations.replayed
    rows = np.zeros(m, dtype=[("at_top1", "<f2"), ("at_top2", "<f2"), ("at_token", "<f2"), ("pick", "u1", 3)])
    with np.errstate(over="ignore"):
        for name in ("at_top1", "at_top2", "at_token"):
            rows[name] = getattr(observations, name)[:m]
    rows["pick"] = _u24(np.where(observations.pick[:m] < 0, MAX_TOKEN_ID, observations.pick[:m]))
    return rows.tobytes()
