"""Integer micro-dollar arithmetic.

Every amount of money in the cost service is an ``int`` of micro-dollars
(1 USD = 1_000_000 micros). Prices are quoted per million tokens, also in
micros, so a record's cost is ``sum(tokens_i * price_i) / 1_000_000``.

Rounding rule (applied once per ledger record, never to sums): the exact
rational cost is rounded half-up to a whole micro-dollar. Because each stored
record holds an integer, totals are plain integer sums and are exact.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

MICROS_PER_UNIT = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


def round_half_up_div(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half away from zero, in integers only."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    if numerator >= 0:
        return (2 * numerator + denominator) // (2 * denominator)
    return -((-2 * numerator + denominator) // (2 * denominator))


def token_cost_micros(
    input_tokens: int,
    output_tokens: int,
    input_price: int,
    output_price: int,
    cached_input_tokens: int = 0,
    cached_input_price: int = 0,
) -> int:
    """Cost of one request in micros; prices are micros per million tokens.

    As in ``llmo.common.v1.Usage``, ``cached_input_tokens`` are prompt tokens
    served from a prompt cache, billed at ``cached_input_price`` and not
    included in ``input_tokens``.
    """
    if min(input_tokens, output_tokens, cached_input_tokens) < 0:
        raise ValueError("token counts must be non-negative")
    numerator = input_tokens * input_price + cached_input_tokens * cached_input_price + output_tokens * output_price
    return round_half_up_div(numerator, TOKENS_PER_PRICE_UNIT)


def usd_to_micros(value: str | int | Decimal) -> int:
    """Parse a decimal USD amount ("2.50") into micros exactly; floats are refused."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError("money must be given as a decimal string or integer, not float")
    try:
        amount = Decimal(value) if not isinstance(value, Decimal) else value
    except InvalidOperation as exc:
        raise ValueError(f"not a decimal amount: {value!r}") from exc
    if not amount.is_finite():
        raise ValueError(f"not a finite amount: {value!r}")
    micros = (amount * MICROS_PER_UNIT).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return int(micros)


def format_usd(micros: int, places: int = 2) -> str:
    """Human-readable dollars, e.g. 1234567 -> "$1.23" (display only)."""
    sign = "-" if micros < 0 else ""
    amount = Decimal(abs(micros)) / MICROS_PER_UNIT
    quantum = Decimal(1).scaleb(-places)
    return f"{sign}${amount.quantize(quantum, rounding=ROUND_HALF_UP):,}"
