"""Every llmarket wire message, in one place (the registry is ``node.protocol.wire``).

Type names carry their version; a change that old peers cannot ignore gets a
new name (``job.request/2``) and both are served for a while. Fields may be
added with defaults at any time: decoders ignore what they do not know.
docs/protocol.md describes the exchanges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from node.protocol.wire import Message, message

# ---------------------------------------------------------------- offers (gossip)


@dataclass(frozen=True)
class ModelInfo:
    cid: str
    name: str
    context_size: int
    quantization: str = ""


@message("offer/1")
@dataclass(frozen=True)
class Offer(Message):
    """A worker's signed advertisement of its capacity, published on the offers topic."""

    peer_id: str
    addrs: list[str]
    payee: str  # Ethereum address that is paid, "" if none
    binding: bytes  # the payee key's signature over the peer id (node.net.identity)
    models: list[ModelInfo]
    price_per_1k: int  # token base units per 1,000 tokens (prompt + completion); 0 = free
    chain_id: int  # 0 = no chain (free worker)
    escrow: str  # escrow contract address, "" for none
    slots_total: int
    slots_free: int
    tokens_per_s: float
    first_token_ms: float
    hardware: str
    version: str
    seq: int  # increases with every offer from this peer
    expires_at: float  # unix seconds
    signature: bytes = b""  # the peer's libp2p key over the offer with signature=b""
    # The same request gives byte-identical tokens whatever ran before (cache, slot, other jobs): a CPU
    # worker's engine guarantees it (node/inference/); a GPU's kernels are not known to, so it says False.
    reproducible: bool = False
    verify_price_per_1k: int = 0  # what a verification job costs per 1,000 tokens (prompt + answer checked)
    # The worker's class of exact numerics (``Engine.numerics``, node/inference/numerics.py), "" if none: its
    # receipts claim it, so a verifier of that class checks its answers exactly (routing prefers it).
    numerics: str = ""


@message("offer.delta/1")
@dataclass(frozen=True)
class OfferDelta(Message):
    """What changed in a worker's offer since its full ``offer/1`` (``base_seq``): free slots, price and expiry.

    Published on the offers topic between full offers, on a change and as the worker's "still here" (a later
    expiry); signed by the peer like an offer. It carries the three values whole, not differences, so any one
    delta applies to the base offer (node/market/offers.py).
    """

    peer_id: str
    base_seq: int  # the seq of the full offer it amends
    seq: int  # > base_seq; increases with every offer or delta from this peer
    slots_free: int
    price_per_1k: int
    expires_at: float
    signature: bytes = b""  # the peer's libp2p key over the delta with signature=b""


@message("offers.get/1")
@dataclass(frozen=True)
class OffersRequest(Message):
    """Ask a peer for the live offers it knows (``/llmarket/offers/1.0.0``), to join the market at once; or, with
    ``peers``, for only those peers' offers (a delta came without its base)."""

    peers: list[str] = field(default_factory=list)  # [] for every offer; else at most 256 peer ids


@message("offers.batch/1")
@dataclass(frozen=True)
class OffersBatch(Message):
    # each an encoded, signed ``offer/1`` (or an ``offer.delta/1`` right after its base), checked like a gossiped one
    offers: list[bytes]


# -------------------------------------------------------- /llmarket/job/1.0.0


SCHEME_DEPOSIT = "deposit"


@dataclass(frozen=True)
class DepositTerms:
    """How a paid job is paid from the requester's deposit in a ``DepositEscrow`` (docs/payments.md).

    The worker reads ``requester``'s deposit, reserve and unlock from the chain (never from these terms), and
    takes ``deposit.receipt/1`` messages signed by ``requester``. Amounts are uint256 base units, as decimal
    strings.

    ``binding`` ties the terms to whoever sends them: the requester's Ethereum signature (EIP-712, the escrow's
    domain) over ``JobTerms(jobId, worker, peerId, expiresAt)``, where ``peerId`` is the libp2p peer the request
    comes from (node/payments/deposit_receipts.py). The worker admits the job only if ``requester`` signed it for
    this job, to its own payee address, for the stream's remote peer, and ``expires_at`` (unix seconds) has not
    passed: nobody can name someone else's deposit.
    """

    requester: str  # the address whose deposit pays, and whose key signs the receipts
    chain_id: int
    escrow: str  # the DepositEscrow's address
    price_per_1k: int
    credit_window: str  # how far (in base units) the worker may stream ahead of the last receipt
    scheme: str = SCHEME_DEPOSIT
    expires_at: int = 0  # the binding is refused after this (unix seconds)
    binding: bytes = b""  # 65 bytes: the requester's signature over JobTerms(jobId, worker, peerId, expiresAt)


@message("job.request/1")
@dataclass(frozen=True)
class JobRequest(Message):
    job_id: str
    model: str  # CID
    params: dict  # SamplingParams fields
    messages: list[dict[str, str]] | None = None  # a chat…
    prompt: str | None = None  # …or a plain completion
    max_price_per_1k: int = 0
    resume_text: str = ""  # output already streamed by a worker that died: continue from it
    payment: DepositTerms | None = None  # None: a free job
    # A verification job (/llmarket/verify/1.0.0): check another worker's answer instead of generating. Its
    # messages/prompt are the checked job's, and resume_text is the checked job's resume_text + answer, so
    # the prompt-size bound a requester pays against covers everything the verifier evaluates.
    check: CheckTask | None = None


@message("job.accepted/1")
@dataclass(frozen=True)
class JobAccepted(Message):
    job_id: str
    price_per_1k: int
    prompt_tokens: int


REJECT_BUSY = "busy"
REJECT_UNKNOWN_MODEL = "unknown_model"
REJECT_PRICE = "price"
REJECT_MALFORMED = "malformed"
REJECT_PAYMENT = "payment"  # no usable payment: no terms, another escrow, no deposit, unlocking, over the bound
REJECT_TOO_LONG = "too_long"  # prompt + max_tokens do not fit the model's context (detail names the limit)

#: Rejections that say the request is at fault, not the worker: they never count against its reputation.
REQUEST_FAULTS = (REJECT_MALFORMED, REJECT_TOO_LONG)


@message("job.rejected/1")
@dataclass(frozen=True)
class JobRejected(Message):
    job_id: str
    reason: str  # one of the REJECT_* values
    detail: str = ""


@dataclass(frozen=True)
class Logprob:
    """One sampled token's log-probability, and its top alternatives (best first), when the request asked."""

    token: str
    logprob: float
    top_tokens: list[str] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@message("job.chunk/1")
@dataclass(frozen=True)
class JobChunk(Message):
    """Text as it is generated. A chunk with no text and no tokens announces ``prompt_tokens`` (and asks a paid
    job's requester to pay for the prompt)."""

    job_id: str
    text: str
    tokens: int = 0  # sampled tokens this text took
    prompt_tokens: int = 0  # the job's prompt size (what a paid job is billed for besides the tokens)
    logprobs: list[Logprob] = field(default_factory=list)  # one per token, if params asked for logprobs
    # The fingerprint records of this chunk's ``tokens`` (15 bytes each, node/inference/fingerprints.py): a
    # paying requester counts them, so it pays for tokens it can check as they arrive (node/payments/usage.py).
    fingerprints: bytes = b""


@dataclass(frozen=True)
class ResultReceipt:
    """The worker's signed statement of what it produced."""

    job_id: str
    model: str
    request_hash: bytes  # sha256 of the encoded JobRequest
    output_hash: bytes  # sha256 of the UTF-8 output
    prompt_tokens: int
    completion_tokens: int
    worker: str  # peer id
    signature: bytes = b""
    fingerprints_hash: bytes = b""  # sha256 of JobDone.fingerprints (node/inference/fingerprints.py), b"" if none
    numerics: str = ""  # the worker's class of exact numerics (node/inference/numerics.py), "" if none


@message("job.done/1")
@dataclass(frozen=True)
class JobDone(Message):
    job_id: str
    finish_reason: str
    receipt: ResultReceipt
    fingerprints: bytes = b""  # 15 bytes per sampled token (node/inference/fingerprints.py): what a verifier checks


@dataclass(frozen=True)
class CheckTask:
    """What a verification job checks: a worker's answer to ``original``, with the receipt it signed."""

    original: JobRequest
    text: str  # what that worker streamed
    done: JobDone  # its finish reason, signed receipt and fingerprints


@dataclass(frozen=True)
class SignedVerdict:
    """A verifier's verdict, as it signed it: the verification job's request, the verdict (JSON, the job's
    output text) and the verifier's result receipt over both (node/verify/)."""

    request: JobRequest
    text: str
    receipt: ResultReceipt


@message("fraud.report/1")
@dataclass(frozen=True)
class FraudReport(Message):
    """Gossiped on ``llmarket/fraud/1`` when a check fails: the accused worker's signed answer and the
    verdicts against it. Every node re-checks it before acting (node/verify/fraud.py)."""

    original: JobRequest
    text: str
    done: JobDone
    verdicts: list[SignedVerdict]
    reporter: str  # peer id of the node that publishes it
    signature: bytes = b""  # the reporter's libp2p key over the report with signature=b""


ERROR_PAYMENT = "payment"  # the requester's receipts fell behind the credit window
ERROR_ENGINE = "engine"  # the worker's engine failed mid-job (nothing is billed; the worker takes no more jobs)


@message("job.error/1")
@dataclass(frozen=True)
class JobError(Message):
    job_id: str
    detail: str
    reason: str = ""  # ERROR_PAYMENT, or "" for the worker's own failure


@message("deposit.receipt/1")
@dataclass(frozen=True)
class DepositReceipt(Message):
    """Requester → worker: an EIP-712 ``Receipt(worker, cumulativeAmount)`` on the (requester, worker) pair of a
    ``DepositEscrow``, and how much of the pair's total is this job's (node/payments/deposit_metering.py).

    ``cumulative`` is what the requester owes the worker in all, ever (every job, concurrent ones included);
    ``job_amount`` is this job's cost so far. Both are uint256, decimal.
    """

    job_id: str
    cumulative: str
    job_amount: str
    signature: bytes


@message("job.cancel/1")
@dataclass(frozen=True)
class JobCancel(Message):
    job_id: str


# ------------------------------------------------------ /llmarket/model/1.0.0


@message("model.block/1")
@dataclass(frozen=True)
class BlockRequest(Message):
    cid: str


@message("model.cat/1")
@dataclass(frozen=True)
class CatRequest(Message):
    cid: str


@message("model.data/1")
@dataclass(frozen=True)
class DataChunk(Message):
    data: bytes


@message("model.end/1")
@dataclass(frozen=True)
class DataEnd(Message):
    size: int = 0


@message("model.missing/1")
@dataclass(frozen=True)
class NotFound(Message):
    cid: str
    detail: str = ""
