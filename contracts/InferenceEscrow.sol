// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

/// @title InferenceEscrow: unidirectional payment channels for llmarket.
/// @notice A requester locks tokens in a channel to one worker. As jobs run, the
/// requester signs EIP-712 receipts `Receipt(channelId, cumulativeAmount)`, each
/// covering everything owed so far. The worker redeems the latest receipt with
/// `claim` (and keeps the channel open) or `close` (and returns the rest to the
/// requester). After `expiry` the worker can no longer redeem and the requester
/// takes back what is left with `refund`.
///
/// Design choices (see docs/contracts.md):
/// - One token per escrow, fixed at deployment. No owner, no admin, no upgrade path:
///   nobody but a channel's two parties can move its funds.
/// - A channel fits in three storage slots; `deposit` and `paid` share one, so a
///   claim writes a single slot.
/// - Checks-effects-interactions everywhere, plus a (transient) reentrancy guard.
contract InferenceEscrow is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    enum Status {
        None, // never opened
        Open,
        Closed, // closed by the worker: settled, the rest returned
        Refunded // refunded to the requester after expiry
    }

    struct Channel {
        address requester; // pays, signs receipts, gets the rest back
        uint64 expiry; // unix seconds; redeeming is allowed strictly before it
        Status status;
        address worker; // the only party that can redeem receipts
        uint128 deposit; // total ever deposited
        uint128 paid; // total ever paid to the worker
    }

    bytes32 public constant RECEIPT_TYPEHASH = keccak256("Receipt(bytes32 channelId,uint256 cumulativeAmount)");

    /// @notice The ERC-20 every channel of this escrow is denominated in.
    IERC20 public immutable token;

    /// @notice Number of channels ever opened; the next channel's nonce.
    uint256 public channelCount;

    mapping(bytes32 channelId => Channel) private _channels;

    event ChannelOpened(
        bytes32 indexed channelId, address indexed requester, address indexed worker, uint256 amount, uint64 expiry
    );
    event ChannelToppedUp(bytes32 indexed channelId, uint256 amount, uint256 deposit, uint64 expiry);
    event Claimed(bytes32 indexed channelId, address indexed worker, uint256 amount, uint256 cumulativeAmount);
    event ChannelClosed(bytes32 indexed channelId, uint256 paid, uint256 returned);
    event ChannelRefunded(bytes32 indexed channelId, address indexed requester, uint256 amount);

    /// An amount of zero where something must move.
    error ZeroAmount();
    /// The worker is the zero address, or the requester itself.
    error InvalidWorker(address worker);
    /// The expiry is not in the future.
    error ExpiryInPast(uint64 expiry, uint256 nowTimestamp);
    /// A top-up tried to move the expiry earlier.
    error ExpiryShortened(uint64 current, uint64 requested);
    /// An amount that does not fit the channel's 128-bit accounting: `open`'s amount
    /// is over 2**128 - 1, or a top-up's would take the deposit over it.
    error AmountTooLarge(uint256 amount);
    /// No channel with this id, or it is closed or refunded already.
    error ChannelNotOpen(bytes32 channelId);
    /// The caller is not the channel's requester.
    error NotRequester(address caller);
    /// The caller is not the channel's worker.
    error NotWorker(address caller);
    /// The channel expired: receipts can no longer be redeemed, only refunded.
    error ChannelExpired(bytes32 channelId, uint64 expiry);
    /// A refund before the channel's expiry.
    error NotExpired(bytes32 channelId, uint64 expiry);
    /// The signature is malformed or not the requester's over this receipt.
    error InvalidSignature();
    /// The receipt is for more than the channel holds.
    error AmountExceedsDeposit(uint256 cumulativeAmount, uint256 deposit);
    /// The receipt is for less than the worker was already paid.
    error AmountBelowPaid(uint256 cumulativeAmount, uint256 paid);
    /// The receipt pays nothing new.
    error NothingToClaim(uint256 cumulativeAmount);

    constructor(IERC20 token_) EIP712("InferenceEscrow", "1") {
        token = token_;
    }

    // ----------------------------------------------------------------- requester

    /// @notice Open a channel to `worker`, funded with `amount` tokens taken from
    /// the caller through `transferFrom` (approve the escrow first).
    /// @return channelId the new channel's id.
    function open(address worker, uint256 amount, uint64 expiry) external nonReentrant returns (bytes32 channelId) {
        channelId = _open(worker, amount, expiry);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice `open`, with the allowance given by an EIP-2612 permit signature in
    /// the same transaction. A permit that fails (for example because someone
    /// front-ran it) is ignored; the transfer then needs an existing allowance.
    function openWithPermit(
        address worker,
        uint256 amount,
        uint64 expiry,
        uint256 permitDeadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external nonReentrant returns (bytes32 channelId) {
        channelId = _open(worker, amount, expiry);
        _permit(amount, permitDeadline, v, r, s);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Add `amount` tokens to an open channel and set its expiry to
    /// `newExpiry`, which may not be earlier than the current one. `amount` may
    /// be zero only to extend the expiry.
    function topUp(bytes32 channelId, uint256 amount, uint64 newExpiry) external nonReentrant {
        _topUp(channelId, amount, newExpiry);
        if (amount > 0) token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice `topUp`, with the allowance given by an EIP-2612 permit.
    function topUpWithPermit(
        bytes32 channelId,
        uint256 amount,
        uint64 newExpiry,
        uint256 permitDeadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external nonReentrant {
        _topUp(channelId, amount, newExpiry);
        if (amount > 0) {
            _permit(amount, permitDeadline, v, r, s);
            token.safeTransferFrom(msg.sender, address(this), amount);
        }
    }

    /// @notice After expiry, return everything the worker has not been paid to
    /// the requester and end the channel. Requester only.
    function refund(bytes32 channelId) external nonReentrant {
        Channel storage ch = _openChannel(channelId);
        if (msg.sender != ch.requester) revert NotRequester(msg.sender);
        if (block.timestamp < ch.expiry) revert NotExpired(channelId, ch.expiry);
        uint256 rest = uint256(ch.deposit) - ch.paid;
        ch.status = Status.Refunded;
        emit ChannelRefunded(channelId, msg.sender, rest);
        if (rest > 0) token.safeTransfer(msg.sender, rest);
    }

    // -------------------------------------------------------------------- worker

    /// @notice Redeem a receipt: pay the worker `cumulativeAmount` minus what it
    /// was already paid. The channel stays open. Worker only, before expiry.
    function claim(bytes32 channelId, uint256 cumulativeAmount, bytes calldata signature) external nonReentrant {
        Channel storage ch = _redeemable(channelId);
        uint256 paid = ch.paid;
        if (cumulativeAmount == paid) revert NothingToClaim(cumulativeAmount);
        uint256 amount = _settle(ch, channelId, cumulativeAmount, signature);
        token.safeTransfer(msg.sender, amount);
    }

    /// @notice Redeem a final receipt and close the channel: the worker gets
    /// `cumulativeAmount` minus what it was already paid, the requester gets the
    /// rest of the deposit back. A receipt equal to what was already paid needs
    /// no signature (an empty one will do). Worker only, before expiry.
    function close(bytes32 channelId, uint256 cumulativeAmount, bytes calldata signature) external nonReentrant {
        Channel storage ch = _redeemable(channelId);
        uint256 amount = cumulativeAmount == ch.paid ? 0 : _settle(ch, channelId, cumulativeAmount, signature);
        uint256 rest = uint256(ch.deposit) - cumulativeAmount;
        ch.status = Status.Closed;
        emit ChannelClosed(channelId, cumulativeAmount, rest);
        if (amount > 0) token.safeTransfer(msg.sender, amount);
        if (rest > 0) token.safeTransfer(ch.requester, rest);
    }

    // --------------------------------------------------------------------- reads

    /// @notice Everything a worker needs to decide whether to serve against a
    /// channel, in one call. Unknown ids return a zeroed channel (status None).
    function getChannel(bytes32 channelId) external view returns (Channel memory) {
        return _channels[channelId];
    }

    /// @notice The EIP-712 digest a requester signs for `Receipt(channelId, cumulativeAmount)`.
    function receiptDigest(bytes32 channelId, uint256 cumulativeAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(RECEIPT_TYPEHASH, channelId, cumulativeAmount)));
    }

    /// @notice The EIP-712 domain separator of this escrow on this chain.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ------------------------------------------------------------------ internals

    function _open(address worker, uint256 amount, uint64 expiry) private returns (bytes32 channelId) {
        if (amount == 0) revert ZeroAmount();
        if (amount > type(uint128).max) revert AmountTooLarge(amount);
        if (worker == address(0) || worker == msg.sender) revert InvalidWorker(worker);
        if (expiry <= block.timestamp) revert ExpiryInPast(expiry, block.timestamp);
        uint256 nonce = channelCount++;
        channelId = keccak256(abi.encode(block.chainid, address(this), nonce));
        _channels[channelId] = Channel({
            requester: msg.sender,
            expiry: expiry,
            status: Status.Open,
            worker: worker,
            deposit: uint128(amount),
            paid: 0
        });
        emit ChannelOpened(channelId, msg.sender, worker, amount, expiry);
    }

    function _topUp(bytes32 channelId, uint256 amount, uint64 newExpiry) private {
        Channel storage ch = _openChannel(channelId);
        if (msg.sender != ch.requester) revert NotRequester(msg.sender);
        uint64 expiry = ch.expiry;
        if (newExpiry < expiry) revert ExpiryShortened(expiry, newExpiry);
        if (amount == 0 && newExpiry == expiry) revert ZeroAmount();
        if (newExpiry <= block.timestamp) revert ExpiryInPast(newExpiry, block.timestamp);
        uint256 deposit = ch.deposit;
        // Compare with the room left, not the sum: `deposit + amount` overflows
        // uint256 for amounts near 2**256 and would revert with Panic(0x11)
        // instead of AmountTooLarge. Neither line can wrap, as deposit <= 2**128 - 1.
        unchecked {
            if (amount > type(uint128).max - deposit) revert AmountTooLarge(amount);
            deposit += amount;
        }
        ch.deposit = uint128(deposit);
        ch.expiry = newExpiry;
        emit ChannelToppedUp(channelId, amount, deposit, newExpiry);
    }

    function _permit(uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s) private {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s) {} catch {}
    }

    function _openChannel(bytes32 channelId) private view returns (Channel storage ch) {
        ch = _channels[channelId];
        if (ch.status != Status.Open) revert ChannelNotOpen(channelId);
    }

    function _redeemable(bytes32 channelId) private view returns (Channel storage ch) {
        ch = _openChannel(channelId);
        if (msg.sender != ch.worker) revert NotWorker(msg.sender);
        if (block.timestamp >= ch.expiry) revert ChannelExpired(channelId, ch.expiry);
    }

    /// Check a receipt for more than was paid and record it as paid; returns the
    /// amount now owed to the worker.
    function _settle(Channel storage ch, bytes32 channelId, uint256 cumulativeAmount, bytes calldata signature)
        private
        returns (uint256 amount)
    {
        uint256 paid = ch.paid;
        uint256 deposit = ch.deposit;
        if (cumulativeAmount < paid) revert AmountBelowPaid(cumulativeAmount, paid);
        if (cumulativeAmount > deposit) revert AmountExceedsDeposit(cumulativeAmount, deposit);
        (address signer, ECDSA.RecoverError err,) =
            ECDSA.tryRecover(receiptDigest(channelId, cumulativeAmount), signature);
        if (err != ECDSA.RecoverError.NoError || signer != ch.requester) revert InvalidSignature();
        amount = cumulativeAmount - paid;
        ch.paid = uint128(cumulativeAmount);
        emit Claimed(channelId, msg.sender, amount, cumulativeAmount);
    }
}
