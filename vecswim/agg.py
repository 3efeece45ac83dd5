"""Aggregates a link keeps on the parent over its children: ``vecswim.agg.mean("x")``.

Sums are exact and drift-free: integer columns add as int64; float columns add as fixed point
``rint(x * scale)`` in int64 (default resolution 2**-16), so after any sequence of updates and
re-links a parent's sum equals the from-scratch sum over its current children, bit for bit.
Keep ``|sum of x| * scale < 2**63``. Non-finite child values (e.g. NaN before a first event)
are left out of sum/mean/min/max; ``count`` counts all linked children.
"""

from vecswim.schema import Agg

_DEFAULT_SCALE = 2.0**16


def count() -> Agg:
    """Number of children linked to the parent."""
    return Agg("count")


def sum(column: str, scale: float = _DEFAULT_SCALE) -> Agg:
    """Sum of the children's ``column`` (NaN-free)."""
    return Agg("sum", column, scale)


def mean(column: str, scale: float = _DEFAULT_SCALE) -> Agg:
    """Mean of the children's finite ``column`` values; NaN when there are none."""
    return Agg("mean", column, scale)


def min(column: str) -> Agg:
    """Smallest finite child value; recomputed only for parents whose minimum child left or rose."""
    return Agg("min", column)


def max(column: str) -> Agg:
    """Largest finite child value; recomputed only for parents whose maximum child left or fell."""
    return Agg("max", column)
