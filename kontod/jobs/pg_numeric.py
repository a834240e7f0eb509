"""PostgreSQL's numeric arithmetic, as the snapshot statement uses it, in Python ``Decimal``.

The snapshot of a Konto kept in SQLite is computed in Python, and must give, to the last digit,
what the PostgreSQL statement of kontod/jobs/snapshots.py gives for the same data. Four rules
of PostgreSQL matter there, and each has its function here:

- a float read as numeric (``float8::numeric``) keeps 15 significant digits (``DBL_DIG``, the
  ``%.15g`` text of the float), not the float's exact binary value: ``from_float``;
- numeric sums and products are exact: ``EXACT``, a context wide enough for any sum of floats
  of the snapshot, whose ``Inexact`` trap turns a lost digit into an error instead of a wrong
  total;
- a quotient is computed to a scale PostgreSQL picks from its operands (``select_div_scale``
  in numeric.c) and rounded half away from zero there; ``round(x, 8)`` rounds half away from
  zero again: ``convert``;
- numeric -> double precision is correctly rounded, as Python's ``float(Decimal)`` is.
"""

from __future__ import annotations

import decimal
import math
from decimal import Decimal

# Wide enough for any sum of the snapshot: floats span about 10^-338 (15 digits of the
# smallest subnormal) to 10^308, a converted value 10^320; 2 000 digits leave room for all.
EXACT = decimal.Context(
    prec=2000,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    rounding=decimal.ROUND_HALF_UP,
    traps=[decimal.Inexact, decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)
# The digits of a float read as numeric (DBL_DIG).
FLOAT_DIGITS = 15
# numeric.c: NUMERIC_MIN_SIG_DIGITS, DEC_DIGITS, NUMERIC_MAX_DISPLAY_SCALE.
MIN_SIG_DIGITS = 16
DEC_DIGITS = 4
MAX_DISPLAY_SCALE = 1000
# The scale of ``round(..., 8)`` in the conversion, and the least scale of the divisor.
CONVERTED_SCALE = 8
DIVISOR_MIN_SCALE = 24

# What a double precision column holds (the statement's _FITS bounds, as numeric literals).
DOUBLE_MIN = Decimal("2.2250738585072014e-308")
DOUBLE_MAX = Decimal("1.7976931348623157e308")


def from_float(value: float) -> Decimal | None:
    """``value::numeric`` as PostgreSQL computes it from a double: 15 significant digits; None
    for NaN and +-Infinity (not a number: left out and counted by the snapshot)."""
    if not math.isfinite(value):
        return None
    if value == 0:
        return Decimal(0)  # numeric has no negative zero
    return Decimal(f"{value:.{FLOAT_DIGITS}g}")


def scale(value: Decimal) -> int:
    """PostgreSQL's display scale of a numeric (``scale()``): digits after the point."""
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int), "finite values only"
    return max(0, -exponent)


def fits_double(value: Decimal) -> bool:
    """Whether a double precision column can hold ``value`` (zero, or a normal float)."""
    return value == 0 or DOUBLE_MIN <= abs(value) <= DOUBLE_MAX


def convert(amount: Decimal, base_amount: Decimal, currency_amount: Decimal) -> Decimal:
    """``round(amount * base_amount / round(currency_amount, greatest(scale, 24)), 8)`` as
    PostgreSQL computes it: the exact product, the quotient rounded half away from zero at
    the scale ``select_div_scale`` picks, then rounded half away from zero to 8 decimals."""
    dividend = EXACT.multiply(amount, base_amount)
    dividend_scale = scale(amount) + scale(base_amount)
    divisor_scale = max(scale(currency_amount), DIVISOR_MIN_SCALE)
    rscale = _div_scale(dividend, dividend_scale, currency_amount, divisor_scale)
    quotient = _divide(dividend, currency_amount, rscale)  # the quotient times 10**rscale
    rounded = _round_half_away(quotient, 10 ** (rscale - CONVERTED_SCALE))
    return Decimal(rounded).scaleb(-CONVERTED_SCALE, EXACT)


def _weight_and_first_digit(value: Decimal) -> tuple[int, int]:
    """The weight (a power of 10000) of the first non-zero base-10000 digit of ``value``, and
    that digit, as numeric.c stores the number (both 0 for zero)."""
    if value == 0:
        return 0, 0
    weight = value.adjusted() // DEC_DIGITS
    first = int(abs(value).scaleb(-DEC_DIGITS * weight, EXACT))
    return weight, first


def _div_scale(var1: Decimal, scale1: int, var2: Decimal, scale2: int) -> int:
    """numeric.c's ``select_div_scale``: at least 16 significant digits in the quotient, and
    no fewer decimals than either operand has."""
    weight1, first1 = _weight_and_first_digit(var1)
    weight2, first2 = _weight_and_first_digit(var2)
    qweight = weight1 - weight2
    if first1 <= first2:
        qweight -= 1
    rscale = MIN_SIG_DIGITS - qweight * DEC_DIGITS
    rscale = max(rscale, scale1, scale2, 0)
    return min(rscale, MAX_DISPLAY_SCALE)


def _divide(dividend: Decimal, divisor: Decimal, rscale: int) -> int:
    """``dividend / divisor`` times ``10**rscale``, rounded half away from zero, in integers."""
    n1, e1 = _integer_and_exponent(dividend)
    n2, e2 = _integer_and_exponent(divisor)
    shift = e1 - e2 + rscale
    if shift >= 0:
        return _round_half_away(n1 * 10**shift, n2)
    return _round_half_away(n1, n2 * 10**-shift)


def _integer_and_exponent(value: Decimal) -> tuple[int, int]:
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int), "finite values only"
    n = int("".join(map(str, digits)) or "0")
    return (-n if sign else n), exponent


def _round_half_away(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded to an integer, halves away from zero."""
    quotient, remainder = divmod(abs(numerator), abs(denominator))
    if 2 * remainder >= abs(denominator):
        quotient += 1
    return -quotient if (numerator < 0) != (denominator < 0) else quotient
