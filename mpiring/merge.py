"""Stable log-space merge of two partial attention results over disjoint key sets.

Given ``(out_a, lse_a)`` over keys A and ``(out_b, lse_b)`` over keys B (each
``out`` already normalised over its own keys), attention over A ∪ B is::

    lse = log(exp(lse_a) + exp(lse_b))
    out = out_a − sigmoid(lse_b − lse_a) · (out_a − out_b)

The naive form ``out = (exp(lse_a)·out_a + exp(lse_b)·out_b) / exp(lse)``
overflows for logits of ±1e4; the form above (ring-flash-attention's
``_update_out_and_lse``) never exponentiates a positive number. A side with
``lse = −inf`` (no allowed keys) has weight 0; if both are −inf the row stays
``out = 0``, ``lse = −inf`` with no NaN.
"""

from __future__ import annotations

from mpiring._xp import array_module

__all__ = ["merge_partials"]


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge two partial results; returns ``(out, lse)`` as new arrays.

    Parameters
    ----------
    out_a, out_b : float array ``(batch, seqlen, heads, head_dim)``
    lse_a, lse_b : float array ``(batch, heads, seqlen)``, natural log, −inf for empty rows.

    Returns
    -------
    out : ``(batch, seqlen, heads, head_dim)`` in the dtype of ``out_a``.
    lse : ``(batch, heads, seqlen)`` in the dtype of ``lse_a``.
    """
    xp = array_module(out_a)
    lse = xp.logaddexp(lse_a, lse_b)  # == lse_a − logsigmoid(lse_a − lse_b), stable at ±inf
    # Weight of b: sigmoid(lse_b − lse_a), from the difference of the inputs (not of the
    # rounded merged lse, which at |lse| ~ 1e4 in float32 has lost 3 decimal digits).
    both_empty = xp.isneginf(lse_a) & xp.isneginf(lse_b)
    diff = lse_b - xp.where(both_empty, 0, lse_a)  # −inf where both are empty
    e = xp.exp(-xp.abs(diff))
    weight_b = xp.where(diff >= 0, 1 / (1 + e), e / (1 + e))
    weight_b = xp.moveaxis(weight_b, 1, 2)[..., None].astype(out_a.dtype)
    out = out_a - weight_b * (out_a - out_b)
    out = xp.where(xp.moveaxis(both_empty, 1, 2)[..., None], 0, out)
    return out.astype(out_a.dtype), lse.astype(lse_a.dtype)
