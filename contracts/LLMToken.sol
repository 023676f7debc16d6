// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title LLMToken: the ERC-20 that llmarket requesters pay workers in.
/// @notice Plain OpenZeppelin ERC-20 with EIP-2612 `permit`, so a requester can
/// fund an escrow channel in one transaction. The whole initial supply goes to
/// the deployer. `mint` exists for testnet faucets and is owner-only; on a
/// production chain the owner can renounce ownership to fix the supply.
contract LLMToken is ERC20, ERC20Permit, Ownable {
    constructor(uint256 initialSupply)
        ERC20("llmarket Token", "LLM")
        ERC20Permit("llmarket Token")
        Ownable(msg.sender)
    {
        _mint(msg.sender, initialSupply);
    }

    /// @notice Create `amount` new tokens for `to`. Owner only (testnet faucet).
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
