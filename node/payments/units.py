"""Token amounts as people read them: base units shown as an exact decimal.

The chain counts in base units (``10**decimals`` of them make one token; the
``LLMToken`` has 18 decimals, like ETH has wei). Wallets show both:
``102000000000000 (0.000102 LLM)``. Everything here is integer arithmetic on
the decimal digits, so no amount is ever rounded, however large.
"""

from __future__ import annotations

#: ``LLMToken.decimals()`` (OpenZeppelin's ERC-20 default) and the ETH/wei ratio.
DEFAULT_DECIMALS = 18
#: ``LLMToken.symbol()``; read the token contract where one is at hand.
DEFAULT_SYMBOL = "LLM"


def format_units(amount: int, decimals: int = DEFAULT_DECIMALS, symbol: str | None = None) -> str:
    """``amount`` base units as an exact decimal number of tokens, trailing zeros trimmed.

    ``format_units(102000000000000)`` is ``"0.000102"``; with ``symbol="LLM"`` it
    is ``"0.000102 LLM"``. Whole amounts have no decimal point (``"1"``).

    Raises:
        TypeError: ``amount`` or ``decimals`` is not an int (a float has already
            lost digits, so it is refused rather than shown wrong).
        ValueError: ``decimals`` is negative.
    """
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError(f"amount must be an int of base units, not {type(amount).__name__}")
    if not isinstance(decimals, int) or isinstance(decimals, bool):
        raise TypeError(f"decimals must be an int, not {type(decimals).__name__}")
    if decimals < 0:
        raise ValueError(f"decimals must be >= 0, not {decimals}")
    whole, fraction = divmod(abs(amount), 10**decimals)
    text = ("-" if amount < 0 else "") + str(whole)
    if fraction:
        text += "." + str(fraction).rjust(decimals, "0").rstrip("0")
    return f"{text} {symbol}" if symbol else text


def format_amount(amount: int, decimals: int = DEFAULT_DECIMALS, symbol: str = DEFAULT_SYMBOL) -> str:
    """Base units with tokens after them, as wallets show: ``"102000000000000 (0.000102 LLM)"``."""
    return f"{amount} ({format_units(amount, decimals, symbol)})"


def parse_amount(text: str, decimals: int = DEFAULT_DECIMALS, symbol: str = DEFAULT_SYMBOL) -> int:
    """An amount as a person types it: base units (``"2500000000000000000"``), or tokens followed by the token's
    symbol (``"2.5LLM"``, ``"2.5 LLM"``), exactly; returns base units.

    Raises:
        ValueError: not a whole number of base units nor a token amount, negative, or finer than a base unit.
    """
    raw = text.strip().replace("_", "").replace(",", "")
    if symbol and raw.upper().endswith(symbol.upper()):
        number = raw[: -len(symbol)].strip()
        whole, _, fraction = number.partition(".")
        if not (whole or fraction) or not (whole or "0").isdigit() or (fraction and not fraction.isdigit()):
            raise ValueError(f"{text!r} is not an amount of {symbol}: write e.g. 2.5{symbol}")
        if len(fraction.rstrip("0")) > decimals:
            raise ValueError(f"{text!r} is finer than one base unit ({decimals} decimals)")
        return int(whole or "0") * 10**decimals + int(fraction.ljust(decimals, "0")[:decimals] or "0")
    if not raw.isdigit():
        raise ValueError(
            f"{text!r} is not an amount: give base units (a whole number) or tokens with the symbol, e.g. 2.5{symbol}"
        )
    return int(raw)
