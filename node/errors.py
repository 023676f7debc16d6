"""Every error llmarket raises on purpose.

One root, ``NodeError``; the CLI prints any of them as a single line (the
message says what is wrong and what to do) and exits non-zero. Anything that is
not a ``NodeError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class NodeError(Exception):
    """Root of every deliberate llmarket error."""


class ConfigError(NodeError):
    """A setting, flag or configuration file is missing or invalid."""


# --------------------------------------------------------------------- payments


class PaymentError(NodeError):
    """Something about the chain, the contracts or a payment.

    When a contract refused a call, ``error`` is the Solidity custom error's
    name (``"UnlockPending"``, ``"ERC20InsufficientAllowance"``, ...) and
    ``error_args`` its decoded arguments; otherwise ``error`` is None.
    """

    def __init__(self, message: str, *, error: str | None = None, error_args: tuple = ()) -> None:
        super().__init__(message)
        self.error = error
        self.error_args = error_args


class ChainUnreachable(PaymentError):
    """No Ethereum JSON-RPC endpoint answers at the configured URL."""


class WrongChain(PaymentError):
    """The RPC endpoint serves a different chain than the one expected."""


class DeploymentNotFound(PaymentError):
    """No deployment record for this chain, or its contracts are not on the chain."""


class InsufficientBalance(PaymentError):
    """The account holds fewer tokens (or less ETH for gas) than the action needs."""


class InsufficientAllowance(PaymentError):
    """The escrow may not move as many of the account's tokens as the action needs."""


class InvalidReceipt(PaymentError):
    """A receipt does not verify: not signed by the requester, to this worker, for this chain and escrow."""


class ContractReverted(PaymentError):
    """The contract refused a call for a reason with no more specific class here."""


class Overcharge(PaymentError):
    """A worker asked to be paid for more than the job can have used (more prompt or completion tokens).

    ``kept`` is the part of its answer that checked out and was paid for (text, tokens), when the payer could
    tell; a job continues after it on another worker."""

    def __init__(self, message: str, *, kept: tuple[str, int] | None = None) -> None:
        super().__init__(message)
        self.kept = kept


class PaymentRefused(PaymentError):
    """A worker will not serve a job on these payment terms; the message is the reason (sent to the requester)."""


# ----------------------------------------------------------------------- models


class ModelError(NodeError):
    """A model, a CID or the model store: bad input, a missing model, a failed verification."""


class ModelNotFound(ModelError):
    """The model is not in the cache, and no source has it."""


class InvalidRequest(NodeError):
    """A job's parameters are invalid: bad sampling values, a prompt too long for the context, …"""


class ContextTooLong(InvalidRequest):
    """The prompt plus ``max_tokens`` does not fit the model's context; the message names the limit."""


# ------------------------------------------------------------------------ market


class IdentityError(NodeError):
    """A key is missing, unreadable, or may not be used here (e.g. a dev key on a real chain)."""


class WireError(NodeError):
    """A peer sent bytes that are not a valid llmarket message (bad frame, bad msgpack, bad fields)."""


class PeerUnreachable(NodeError):
    """A peer could not be dialled, or would not open a stream, before the deadline."""


class NoWorker(NodeError):
    """No worker on the market can take the job (none offers the model, all are busy, or all failed)."""


class JobFailed(NodeError):
    """The job did not finish: every worker tried failed."""


class DeadlineExceeded(JobFailed):
    """The job did not finish within its deadline."""


# ---------------------------------------------------------------------- gateway


class VerificationFailed(NodeError):
    """A worker's answer failed a check against the model (node/verify/)."""


class ApiError(NodeError):
    """An error as the OpenAI API reports it: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------- text


def one_line(err: BaseException, *, with_type: bool = False, limit: int = 300) -> str:
    """``err`` as one line for a log or an error message: whitespace collapsed, at most ``limit`` characters.

    ``with_type`` puts the exception's class first (for errors from libraries, whose
    messages alone often do not say what failed); an empty message gives the class name.
    """
    text = " ".join(str(err).split())[:limit]
    if not text:
        return type(err).__name__
    return f"{type(err).__name__}: {text}" if with_type else text
