// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @notice TEST ONLY. An ERC-20 that, when armed, calls back into a target
/// contract from inside `transfer`, to prove the escrow cannot be re-entered.
contract ReentrantToken is ERC20 {
    address public target;
    bytes public payload;

    constructor(uint256 initialSupply) ERC20("Reentrant", "REE") {
        _mint(msg.sender, initialSupply);
    }

    /// Arm the attack: the next `transfer` calls `target` with `payload`.
    function arm(address target_, bytes calldata payload_) external {
        target = target_;
        payload = payload_;
    }

    function transfer(address to, uint256 value) public override returns (bool) {
        address t = target;
        if (t != address(0)) {
            target = address(0);
            (bool ok, bytes memory ret) = t.call(payload);
            if (!ok) {
                // Bubble up the callee's revert reason so the test sees which guard fired.
                assembly {
                    revert(add(ret, 32), mload(ret))
                }
            }
        }
        return super.transfer(to, value);
    }
}
