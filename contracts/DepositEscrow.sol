// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

/// @title DepositEscrow: one deposit pays any worker.
/// @notice A requester deposits once, and signs EIP-712 receipts
/// `Receipt(worker, cumulativeAmount)`, each saying "I owe this worker this much
/// in total, ever". A worker redeems the increase since its last claim, drawn
/// first from the requester's deposit (first come, first served), then from its
/// share of the requester's reserve.
///
/// The reserve bounds over-commitment: it is cut into `slots` equal shares, and a
/// share is bound to one worker at its first claim. Whatever other workers claim
/// (the requester's own sock puppets included), a slot holder can still draw its
/// share. Withdrawing needs an unlock period, during which claims keep working.
///
/// Design choices (see docs/contracts.md):
/// - One token per escrow, fixed at deployment. No owner, no admin, no upgrade path.
/// - A requester's account is two storage slots; a claim drawn from the deposit
///   writes only the first. A (requester, worker) pair is one slot.
/// - `claim` credits the worker's `earnings` (pull, `withdrawEarnings`);
///   `claimBatch` pays the batch's total in one transfer.
/// - Checks-effects-interactions everywhere, plus a (transient) reentrancy guard.
contract DepositEscrow is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    /// A requester's first slot: what a claim from the deposit reads and writes.
    struct Account {
        uint128 deposit; // drawn by any worker's claims, first
        uint32 slots; // K: how many shares the reserve is cut into (0 = never funded)
        uint32 slotsUsed; // shares bound to a worker so far
        uint64 unlockAt; // unix seconds; 0 = not unlocking
    }

    /// A requester's second slot: the reserve.
    struct Reserve {
        uint128 left; // what slot holders can still draw
        uint128 total; // ever funded since the last withdrawal; a share is total / slots
    }

    /// One (requester, worker) pair: one slot.
    struct Pair {
        uint128 paid; // total ever paid to the worker on this requester's receipts
        uint96 fromReserve; // the part of `paid` drawn from the reserve
        bool hasSlot; // the worker holds one of the requester's reserve shares
    }

    /// One entry of `claimBatch`.
    struct Claim {
        address requester;
        uint256 cumulativeAmount;
        bytes signature;
    }

    bytes32 public constant RECEIPT_TYPEHASH = keccak256("Receipt(address worker,uint256 cumulativeAmount)");

    /// @notice The ERC-20 every amount of this escrow is denominated in.
    IERC20 public immutable token;

    /// @notice Seconds between `unlock` and the earliest `withdraw`.
    uint64 public immutable unlockPeriod;

    /// @notice What `claim` credited to each worker and it has not withdrawn yet.
    mapping(address worker => uint256) public earnings;

    mapping(address requester => Account) private _accounts;
    mapping(address requester => Reserve) private _reserves;
    mapping(address requester => mapping(address worker => Pair)) private _pairs;

    event Deposited(address indexed requester, uint256 amount, uint256 deposit);
    event ReserveFunded(address indexed requester, uint256 amount, uint256 reserveTotal, uint32 slots);
    event UnlockStarted(address indexed requester, uint64 unlockAt);
    event UnlockCancelled(address indexed requester);
    event Withdrawn(address indexed requester, uint256 amount);
    event SlotTaken(address indexed requester, address indexed worker);
    event Claimed(
        address indexed requester,
        address indexed worker,
        uint256 cumulativeAmount,
        uint256 fromDeposit,
        uint256 fromReserve
    );
    event EarningsWithdrawn(address indexed worker, uint256 amount);

    /// An amount of zero where something must move.
    error ZeroAmount();
    /// An amount that does not fit the 128-bit accounting: a deposit or reserve that
    /// would reach 2**128, a reserve share over 2**96 - 1, or a receipt for 2**128 or more.
    error AmountTooLarge(uint256 amount);
    /// `fundReserve`'s slot count is zero, or differs from the current one while a slot is used.
    error InvalidSlots(uint32 requested, uint32 current);
    /// `cancelUnlock` or `withdraw` without a pending `unlock`.
    error NotUnlocking();
    /// `withdraw` before the unlock period is over.
    error UnlockPending(uint64 unlockAt);
    /// The signature is malformed or not the requester's over a receipt to the caller.
    error InvalidSignature();
    /// The receipt pays nothing new: its amount is at most what the pair was paid.
    error NothingToClaim(uint256 cumulativeAmount);
    /// The receipt is owed `owed` more, but neither the deposit nor the caller's
    /// reserve share has anything left to pay it with.
    error NothingAvailable(address requester, uint256 owed);

    constructor(IERC20 token_, uint64 unlockPeriod_) EIP712("DepositEscrow", "1") {
        token = token_;
        unlockPeriod = unlockPeriod_;
    }

    // ----------------------------------------------------------------- requester

    /// @notice Add `amount` to the caller's deposit (approve the escrow first).
    /// Cancels a pending unlock.
    function deposit(uint256 amount) external nonReentrant {
        _deposit(amount);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice `deposit`, with the allowance given by an EIP-2612 permit in the same
    /// transaction. A failing permit (say, front-run) is ignored; the transfer then
    /// needs an existing allowance.
    function depositWithPermit(uint256 amount, uint256 permitDeadline, uint8 v, bytes32 r, bytes32 s)
        external
        nonReentrant
    {
        _deposit(amount);
        _permit(amount, permitDeadline, v, r, s);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Add `amount` to the caller's reserve, cut into `slots` shares. `slots`
    /// is free to change while no worker holds a slot, and fixed after. Cancels a
    /// pending unlock.
    function fundReserve(uint256 amount, uint32 slots) external nonReentrant {
        _fundReserve(amount, slots);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice `fundReserve`, with an EIP-2612 permit.
    function fundReserveWithPermit(
        uint256 amount,
        uint32 slots,
        uint256 permitDeadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external nonReentrant {
        _fundReserve(amount, slots);
        _permit(amount, permitDeadline, v, r, s);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Start the unlock period: `withdraw` is possible from `now + unlockPeriod`.
    /// Calling it again restarts the period.
    function unlock() external nonReentrant {
        uint64 unlockAt = uint64(block.timestamp) + unlockPeriod;
        _accounts[msg.sender].unlockAt = unlockAt;
        emit UnlockStarted(msg.sender, unlockAt);
    }

    /// @notice Stop a pending unlock.
    function cancelUnlock() external nonReentrant {
        Account storage acct = _accounts[msg.sender];
        if (acct.unlockAt == 0) revert NotUnlocking();
        acct.unlockAt = 0;
        emit UnlockCancelled(msg.sender);
    }

    /// @notice After the unlock period, take back the deposit and what is left of
    /// the reserve. Slots stay bound to their workers (see docs/contracts.md).
    function withdraw() external nonReentrant {
        Account memory acct = _accounts[msg.sender];
        if (acct.unlockAt == 0) revert NotUnlocking();
        if (block.timestamp < acct.unlockAt) revert UnlockPending(acct.unlockAt);
        uint256 amount = uint256(acct.deposit) + _reserves[msg.sender].left;
        acct.deposit = 0;
        acct.unlockAt = 0;
        _accounts[msg.sender] = acct;
        delete _reserves[msg.sender];
        emit Withdrawn(msg.sender, amount);
        if (amount > 0) token.safeTransfer(msg.sender, amount);
    }

    // -------------------------------------------------------------------- worker

    /// @notice Redeem a receipt the requester signed to the caller: what it owes
    /// beyond what this pair was paid, as far as the deposit and the caller's
    /// reserve share cover it, credited to `earnings[caller]`. A later top-up lets
    /// the same receipt pay the rest.
    function claim(address requester, uint256 cumulativeAmount, bytes calldata signature) external nonReentrant {
        uint256 amount = _claim(requester, cumulativeAmount, signature);
        if (amount == 0) {
            uint256 paid = _pairs[requester][msg.sender].paid;
            if (cumulativeAmount <= paid) revert NothingToClaim(cumulativeAmount);
            revert NothingAvailable(requester, cumulativeAmount - paid);
        }
        unchecked {
            earnings[msg.sender] += amount; // cannot wrap: bounded by the token's supply
        }
    }

    /// @notice Redeem many receipts (from many requesters) in one transaction and
    /// one transfer to the caller. Entries that pay nothing are skipped; an invalid
    /// signature reverts the whole batch. Returns what was paid.
    function claimBatch(Claim[] calldata claims) external nonReentrant returns (uint256 total) {
        uint256 n = claims.length;
        for (uint256 i; i < n;) {
            Claim calldata c = claims[i];
            unchecked {
                total += _claim(c.requester, c.cumulativeAmount, c.signature);
                ++i;
            }
        }
        if (total > 0) token.safeTransfer(msg.sender, total);
    }

    /// @notice Pay the caller what `claim` credited to it.
    function withdrawEarnings() external nonReentrant {
        uint256 amount = earnings[msg.sender];
        if (amount == 0) revert ZeroAmount();
        earnings[msg.sender] = 0;
        emit EarningsWithdrawn(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    // --------------------------------------------------------------------- reads

    /// @notice A requester's account.
    function accountOf(address requester)
        external
        view
        returns (
            uint256 deposit_,
            uint256 reserveLeft,
            uint256 reserveTotal,
            uint32 slots,
            uint32 slotsUsed,
            uint64 unlockAt
        )
    {
        Account memory acct = _accounts[requester];
        Reserve memory res = _reserves[requester];
        return (acct.deposit, res.left, res.total, acct.slots, acct.slotsUsed, acct.unlockAt);
    }

    /// @notice What `requester`'s receipts paid `worker` so far, and its slot.
    function pairOf(address requester, address worker)
        external
        view
        returns (uint256 paid, uint256 fromReserve, bool hasSlot)
    {
        Pair memory pair = _pairs[requester][worker];
        return (pair.paid, pair.fromReserve, pair.hasSlot);
    }

    /// @notice What the reserve still guarantees `worker` whatever other workers
    /// claim: its share less what it drew, if it holds a slot; else 0.
    function guaranteeOf(address requester, address worker) external view returns (uint256) {
        Pair memory pair = _pairs[requester][worker];
        if (!pair.hasSlot) return 0;
        Reserve memory res = _reserves[requester];
        uint256 share = uint256(res.total) / _accounts[requester].slots;
        if (share <= pair.fromReserve) return 0;
        uint256 room = share - pair.fromReserve;
        return room < res.left ? room : res.left;
    }

    /// @notice The EIP-712 digest a requester signs for `Receipt(worker, cumulativeAmount)`.
    function receiptDigest(address worker, uint256 cumulativeAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(RECEIPT_TYPEHASH, worker, cumulativeAmount)));
    }

    /// @notice The EIP-712 domain separator of this escrow on this chain.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ------------------------------------------------------------------ internals

    function _deposit(uint256 amount) private {
        if (amount == 0) revert ZeroAmount();
        Account memory acct = _accounts[msg.sender];
        uint256 balance = acct.deposit;
        // Compare with the room left, not the sum, so that amounts near 2**256 get
        // AmountTooLarge and not Panic(0x11). Neither line can wrap.
        unchecked {
            if (amount > type(uint128).max - balance) revert AmountTooLarge(amount);
            balance += amount;
        }
        acct.deposit = uint128(balance);
        _cancelUnlock(acct);
        _accounts[msg.sender] = acct;
        emit Deposited(msg.sender, amount, balance);
    }

    function _fundReserve(uint256 amount, uint32 slots) private {
        if (amount == 0) revert ZeroAmount();
        Account memory acct = _accounts[msg.sender];
        if (slots == 0 || (acct.slotsUsed > 0 && slots != acct.slots)) revert InvalidSlots(slots, acct.slots);
        Reserve memory res = _reserves[msg.sender];
        uint256 total = res.total;
        unchecked {
            if (amount > type(uint128).max - total) revert AmountTooLarge(amount);
            total += amount;
            // A pair's draw on the reserve is kept in 96 bits: so must a share be.
            if (total / slots > type(uint96).max) revert AmountTooLarge(amount);
            res.left += uint128(amount); // left <= total, so this fits too
        }
        res.total = uint128(total);
        acct.slots = slots;
        _cancelUnlock(acct);
        _accounts[msg.sender] = acct;
        _reserves[msg.sender] = res;
        emit ReserveFunded(msg.sender, amount, total, slots);
    }

    function _cancelUnlock(Account memory acct) private {
        if (acct.unlockAt != 0) {
            acct.unlockAt = 0;
            emit UnlockCancelled(msg.sender);
        }
    }

    function _permit(uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s) private {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s) {} catch {}
    }

    /// Redeem one receipt to msg.sender; returns what it pays (0: nothing changed).
    /// Reverts on a bad signature or an amount of 2**128 or more.
    function _claim(address requester, uint256 cumulativeAmount, bytes calldata signature)
        private
        returns (uint256)
    {
        if (cumulativeAmount > type(uint128).max) revert AmountTooLarge(cumulativeAmount);
        Pair memory pair = _pairs[requester][msg.sender];
        if (cumulativeAmount <= pair.paid) return 0;
        (address signer, ECDSA.RecoverError err,) =
            ECDSA.tryRecoverCalldata(receiptDigest(msg.sender, cumulativeAmount), signature);
        if (err != ECDSA.RecoverError.NoError || signer != requester) revert InvalidSignature();
        return _pay(requester, pair, cumulativeAmount);
    }

    /// Pay `pair` (of requester and msg.sender) what `cumulativeAmount` owes beyond
    /// its `paid`: from the deposit first, then from the worker's reserve share.
    function _pay(address requester, Pair memory pair, uint256 cumulativeAmount) private returns (uint256 amount) {
        uint256 owed;
        unchecked {
            owed = cumulativeAmount - pair.paid; // > 0, checked by the caller
        }
        Account memory acct = _accounts[requester];
        bool tookSlot = !pair.hasSlot && acct.slotsUsed < acct.slots;
        if (tookSlot) pair.hasSlot = true;
        uint256 fromDeposit = owed < acct.deposit ? owed : acct.deposit;
        uint256 fromReserve;
        if (owed > fromDeposit && pair.hasSlot) {
            fromReserve = _drawReserve(requester, pair.fromReserve, acct.slots, owed - fromDeposit);
        }
        amount = fromDeposit + fromReserve;
        if (amount == 0) return 0; // nothing to pay with: change nothing, the slot included
        unchecked {
            // All fit: paid + amount <= cumulativeAmount < 2**128; fromReserve <= share < 2**96.
            pair.paid += uint128(amount);
            pair.fromReserve += uint96(fromReserve);
            if (fromDeposit > 0 || tookSlot) {
                acct.deposit -= uint128(fromDeposit);
                if (tookSlot) ++acct.slotsUsed;
                _accounts[requester] = acct;
            }
        }
        _pairs[requester][msg.sender] = pair;
        if (tookSlot) emit SlotTaken(requester, msg.sender);
        emit Claimed(requester, msg.sender, cumulativeAmount, fromDeposit, fromReserve);
    }

    /// Draw up to `want` from `requester`'s reserve for a slot holder that drew
    /// `drawn` already: at most its share less that, and what is left.
    function _drawReserve(address requester, uint256 drawn, uint32 slots, uint256 want)
        private
        returns (uint256 got)
    {
        Reserve memory res = _reserves[requester];
        uint256 share = uint256(res.total) / slots;
        if (share <= drawn) return 0;
        unchecked {
            got = share - drawn;
        }
        if (want < got) got = want;
        if (res.left < got) got = res.left;
        if (got > 0) {
            unchecked {
                _reserves[requester].left = res.left - uint128(got);
            }
        }
    }
}
