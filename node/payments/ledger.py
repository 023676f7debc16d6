"""What a node must not forget about payments, in SQLite in the data directory.

Both hold a **pair table**, one row per (requester, worker) pair of a
``DepositEscrow``:

- The **worker's ledger** (``worker-ledger.sqlite``) keeps, per requester, the
  best receipt it was given, how much of it was credited to jobs and how much
  the chain paid. A receipt is committed (``synchronous=FULL``) before the
  worker relies on it, so a worker killed at any point still claims everything
  it was owed after a restart.
- The **requester's ledger** (``wallet.sqlite``) keeps, per worker, the pair's
  cumulative amount, raised (and committed) before each signature leaves the
  process, so concurrent jobs' increments add up and a restart never signs a
  total twice for different work.

Files written before the channel scheme was removed still hold a ``channels``
table; it is left alone.

Amounts are uint256 values and are stored as decimal text. Every call opens its
own connection, so the ledgers can be used from any thread (the async layer
calls them through ``trio.to_thread``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@contextmanager
def _db(path: Path, schema: str) -> Iterator[sqlite3.Connection]:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(schema)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()


_WORKER_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    chain_id INTEGER NOT NULL,
    escrow TEXT NOT NULL,
    requester TEXT NOT NULL,
    best TEXT NOT NULL DEFAULT '0',
    signature BLOB,
    credited TEXT NOT NULL DEFAULT '0',
    claimed TEXT NOT NULL DEFAULT '0',
    unlock_at INTEGER NOT NULL DEFAULT 0,
    has_slot INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (chain_id, escrow, requester)
);
"""


class WorkerLedger:
    """A worker's receipts and claims, per requester."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> WorkerLedger:
        return cls(Path(data_dir) / "worker-ledger.sqlite")

    def _db(self):
        return _db(self.path, _WORKER_SCHEMA)

    def get_pair(self, chain_id: int, escrow: str, requester: str) -> WorkerPair | None:
        with self._db() as db:
            row = db.execute(_PAIR_WHERE.format("SELECT * FROM pairs"), (chain_id, escrow, requester)).fetchone()
        return _pair_row(row) if row else None

    def credit_pair(
        self, chain_id: int, escrow: str, requester: str, cumulative: int, signature: bytes, credit: int, *, floor: int
    ) -> WorkerPair:
        """Keep a verified receipt if it beats the one held, and credit ``credit`` more to jobs, atomically.

        ``floor`` is what the chain had paid on the pair (read from chain, never 0 for want of a read): a ledger
        that holds no receipt of the pair yet starts its jobs' credits there (a worker whose ledger was lost never
        credits a receipt the chain already paid). Once the pair holds a receipt its credits go on from what they
        are: the requester's increments add up from there, whatever the chain paid since. Returns the row as
        committed.

        Raises:
            ValueError: the jobs' credits would pass the best receipt held (nothing is written).
        """
        if not 0 <= cumulative < 2**256 or credit < 0:
            raise ValueError(f"amounts out of range: {cumulative}, {credit}")
        with self._db() as db:
            row = db.execute(_PAIR_WHERE.format("SELECT * FROM pairs"), (chain_id, escrow, requester)).fetchone()
            held = _pair_row(row) if row else WorkerPair(chain_id, escrow, requester, 0, None, 0, 0, 0, False, None)
            best, sig = (cumulative, signature) if cumulative > held.best else (held.best, held.signature)
            start = held.credited if held.best > 0 else max(held.credited, held.claimed, floor)
            credited = start + credit
            if credited > best:
                raise ValueError(f"jobs would be credited {credited}, past the {best} the requester signed")
            db.execute(
                "INSERT INTO pairs (chain_id, escrow, requester, best, signature, credited, claimed, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (chain_id, escrow, requester) DO UPDATE SET"
                " best = excluded.best, signature = excluded.signature, credited = excluded.credited,"
                " updated_at = excluded.updated_at",
                (chain_id, escrow, requester, str(best), sig, str(credited), str(held.claimed), time.time()),
            )
        return WorkerPair(chain_id, escrow, requester, best, sig, credited, held.claimed, held.unlock_at,
                          held.has_slot, held.last_error)  # fmt: skip

    def pending_pairs(self, chain_id: int, escrow: str) -> list[WorkerPair]:
        """Pairs holding a receipt for more than the chain paid: unlocking requesters first, soonest first."""
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM pairs WHERE chain_id = ? AND escrow = ? ORDER BY unlock_at = 0, unlock_at, updated_at",
                (chain_id, escrow),
            ).fetchall()
        return [p for p in map(_pair_row, rows) if p.claimable > 0]

    def update_pair(self, chain_id: int, escrow: str, requester: str, **fields) -> None:
        """Record what the chain says of a pair (``claimed``: its ``paid``, never lowered; ``unlock_at``,
        ``has_slot``) or why a claim failed (``last_error``). A pair not held yet is created."""
        allowed = {"claimed", "unlock_at", "has_slot", "last_error"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"can update only {sorted(allowed)}")
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO pairs (chain_id, escrow, requester, updated_at) VALUES (?, ?, ?, ?)",
                (chain_id, escrow, requester, time.time()),
            )
            row = _pair_row(db.execute(_PAIR_WHERE.format("SELECT * FROM pairs"), (chain_id, escrow, requester))
                            .fetchone())  # fmt: skip
            values = {
                "claimed": str(max(row.claimed, int(fields.get("claimed", 0)))),
                "unlock_at": int(fields.get("unlock_at", row.unlock_at)),
                "has_slot": int(bool(fields.get("has_slot", row.has_slot))),
                "last_error": fields.get("last_error", row.last_error),
            }
            db.execute(
                _PAIR_WHERE.format(
                    "UPDATE pairs SET claimed = ?, unlock_at = ?, has_slot = ?, last_error = ?, updated_at = ?"
                ),
                (*values.values(), time.time(), chain_id, escrow, requester),
            )

    def lower_claimed(self, chain_id: int, escrow: str, requester: str, paid: int) -> None:
        """The chain paid less on the pair than the ledger says (a claim was reorged out): record ``paid``, so the
        receipt held is claimed again."""
        with self._db() as db:
            db.execute(
                _PAIR_WHERE.format("UPDATE pairs SET claimed = ?, updated_at = ?"),
                (str(paid), time.time(), chain_id, escrow, requester),
            )

    def pairs(self) -> list[WorkerPair]:
        with self._db() as db:
            return [_pair_row(r) for r in db.execute("SELECT * FROM pairs ORDER BY updated_at").fetchall()]


_PAIR_WHERE = "{} WHERE chain_id = ? AND escrow = ? AND requester = ?"


@dataclass(frozen=True)
class WorkerPair:
    """What a worker holds of one requester's receipts on a ``DepositEscrow``."""

    chain_id: int
    escrow: str
    requester: str
    best: int  # the highest cumulative amount the requester signed to this worker
    signature: bytes | None  # its signature
    credited: int  # how much of it jobs were credited, ever (never more than ``best``)
    claimed: int  # what the chain paid on the pair, as last seen
    unlock_at: int  # the requester's unlock time as last seen (0: not unlocking)
    has_slot: bool  # whether this worker holds one of the requester's reserve slots, as last seen
    last_error: str | None

    @property
    def claimable(self) -> int:
        """Signed by the requester but not yet paid out on chain."""
        return self.best - self.claimed


def _pair_row(row: tuple) -> WorkerPair:
    chain_id, escrow, requester, best, signature, credited, claimed, unlock_at, has_slot, last_error, _ = row
    return WorkerPair(chain_id, escrow, requester, int(best), signature, int(credited), int(claimed), unlock_at,
                      bool(has_slot), last_error)  # fmt: skip


_WALLET_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    chain_id INTEGER NOT NULL,
    escrow TEXT NOT NULL,
    worker TEXT NOT NULL,
    signed TEXT NOT NULL DEFAULT '0',
    peer_id TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    PRIMARY KEY (chain_id, escrow, worker)
);
"""


class WalletLedger:
    """What a requester signed to each worker."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> WalletLedger:
        return cls(Path(data_dir) / "wallet.sqlite")

    def _db(self):
        return _db(self.path, _WALLET_SCHEMA)

    def allocate(self, chain_id: int, escrow: str, worker: str, increment: int, *, peer_id: str = "") -> int:
        """Raise the pair's cumulative amount by ``increment`` and commit it; returns the new total to sign.

        Committed before the signature leaves the process: a crash can only make the wallet remember more
        than it signed, never less, so no total is ever signed twice for different work.
        """
        if increment < 0:
            raise ValueError(f"an increment is never negative ({increment})")
        with self._db() as db:
            row = db.execute(
                "SELECT signed FROM pairs WHERE chain_id = ? AND escrow = ? AND worker = ?", (chain_id, escrow, worker)
            ).fetchone()
            total = (int(row[0]) if row else 0) + increment
            if total >= 2**256:
                raise ValueError(f"cannot sign {total}: not a uint256")
            db.execute(
                "INSERT INTO pairs (chain_id, escrow, worker, signed, peer_id, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (chain_id, escrow, worker) DO UPDATE SET signed = excluded.signed,"
                " peer_id = CASE WHEN excluded.peer_id = '' THEN peer_id ELSE excluded.peer_id END,"
                " updated_at = excluded.updated_at",
                (chain_id, escrow, worker, str(total), peer_id, time.time()),
            )
        return total

    def pairs(self, chain_id: int | None = None, escrow: str | None = None) -> list[WalletPair]:
        """The workers this wallet signed to, and how much in all (on one escrow, if given)."""
        query, args = "SELECT * FROM pairs", ()
        if chain_id is not None and escrow is not None:
            query, args = query + " WHERE chain_id = ? AND escrow = ?", (chain_id, escrow)
        with self._db() as db:
            rows = db.execute(query + " ORDER BY updated_at", args).fetchall()
        return [WalletPair(r[0], r[1], r[2], int(r[3]), r[4]) for r in rows]


@dataclass(frozen=True)
class WalletPair:
    """What a requester signed, in all, to one worker on a ``DepositEscrow``."""

    chain_id: int
    escrow: str
    worker: str
    signed: int  # the highest cumulative amount signed
    peer_id: str = ""
