"""Token amounts shown to people: exact decimals of base units, never rounded."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.payments.units import format_amount, format_units

TOKEN = 10**18


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        (0, "0"),
        (1, "0.000000000000000001"),  # one base unit: all 18 decimals
        (10, "0.00000000000000001"),
        (TOKEN, "1"),  # whole tokens have no decimal point
        (10 * TOKEN, "10"),
        (TOKEN + 1, "1.000000000000000001"),
        (102_000_000_000_000, "0.000102"),  # the demo's kind of cost
        (1_500_000_000_000_000_000, "1.5"),
        (10**9 * TOKEN, "1000000000"),  # the initial supply
        (2**128 - 1, "340282366920938463463.374607431768211455"),  # the largest deposit (uint128)
        (2**256 - 1, "115792089237316195423570985008687907853269984665640564039457.584007913129639935"),
        (-25 * 10**16, "-0.25"),
    ],
)
def test_base_units_become_exact_token_decimals(amount, shown):
    assert format_units(amount) == shown


def test_other_decimals():
    assert format_units(123_456, decimals=0) == "123456"
    assert format_units(123_456, decimals=2) == "1234.56"
    assert format_units(5, decimals=6) == "0.000005"
    assert format_units(1_000_000, decimals=6) == "1"
    assert format_units(1, decimals=77) == "0." + "0" * 76 + "1"
    assert format_units(10**77 + 10**76, decimals=77) == "1.1"


def test_symbol_and_the_wallet_form():
    assert format_units(102_000_000_000_000, symbol="LLM") == "0.000102 LLM"
    assert format_units(0, symbol="ETH") == "0 ETH"
    assert format_amount(102_000_000_000_000) == "102000000000000 (0.000102 LLM)"
    assert format_amount(0) == "0 (0 LLM)"
    assert format_amount(2_500_000, decimals=6, symbol="USDC") == "2500000 (2.5 USDC)"


def test_float_rounding_cannot_creep_in():
    # A float has 53 bits: 1e18 + 1 base units as a float is exactly 1 token.
    assert format_units(TOKEN + 1) != format_units(int(float(TOKEN + 1)))
    with pytest.raises(TypeError):
        format_units(0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        format_units(True)
    with pytest.raises(TypeError):
        format_units(1, decimals=18.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        format_units(1, decimals=-1)


@given(amount=st.integers(-(2**256), 2**256), decimals=st.integers(0, 80))
def test_the_decimal_is_the_amount_exactly(amount, decimals):
    shown = format_units(amount, decimals)
    whole, _, fraction = shown.removeprefix("-").partition(".")
    back = int(whole + fraction.ljust(decimals, "0"))
    assert (-back if shown.startswith("-") else back) == amount  # nothing lost or rounded
    if "." in shown:
        assert not shown.endswith(("0", ".")) and len(shown.split(".")[1]) <= decimals
