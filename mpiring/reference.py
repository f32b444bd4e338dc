"""Dense float64 oracle: forward, lse and gradients by the analytic formulas.

Materialises the full ``(batch, heads, seqlen_q, seqlen_k)`` score matrix: for
tests and spot checks only. Positions default to ``0..S−1`` (the unsharded
sequence); pass ``q_positions``/``k_positions`` to check a subset of rows.
"""

from __future__ import annotations

import numpy as np

from mpiring.layout import make_mask

__all__ = ["attention_reference", "attention_reference_backward"]


def _host64(x) -> np.ndarray:
    x = x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else x
    return np.asarray(x).astype(np.float64)


def _scores(q, k, v, softmax_scale, mask, q_positions, k_positions):
    q, k, v = _host64(q), _host64(k), _host64(v)
    batch, seqlen_q, heads, head_dim = q.shape
    group = heads // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scale = 1.0 / np.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    qpos = np.arange(seqlen_q) if q_positions is None else np.asarray(q_positions)
    kpos = np.arange(k.shape[1]) if k_positions is None else np.asarray(k_positions)
    allowed = mask.allowed(qpos.astype(np.int64), kpos.astype(np.int64))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = np.where(allowed, s, -np.inf)
    smax = s.max(axis=-1, keepdims=True)
    smax = np.where(np.isfinite(smax), smax, 0.0)
    p = np.exp(s - smax)
    denom = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        lse = (np.log(denom) + smax)[..., 0]
    has_keys = denom != 0  # NaN (poisoned input) is not "no keys": it propagates
    p = np.where(has_keys, p / np.where(has_keys, denom, 1.0), 0.0)
    return q, k, v, p, lse, scale, group


def attention_reference(
    q, k, v, *, causal=False, softmax_scale=None, window=None, cu_seqlens=None,
    q_positions=None, k_positions=None,
):
    """Exact attention in float64 on whole (unsharded) arrays.

    Parameters
    ----------
    q : ``(batch, seqlen_q, heads, head_dim)``
    k, v : ``(batch, seqlen_k, heads_kv, head_dim)``, ``heads % heads_kv == 0``
    causal, softmax_scale, window, cu_seqlens : as in :func:`mpiring.ring_attention`.
    q_positions, k_positions : global positions of the rows (default ``arange``).

    Returns
    -------
    out : float64 ``(batch, seqlen_q, heads, head_dim)``, 0 on fully masked rows.
    lse : float64 ``(batch, heads, seqlen_q)``, natural log, −inf on fully masked rows.
    """
    mask = make_mask(causal, window, cu_seqlens)
    _, _, v, p, lse, _, _ = _scores(q, k, v, softmax_scale, mask, q_positions, k_positions)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def attention_reference_backward(
    dout, q, k, v, *, causal=False, softmax_scale=None, window=None, cu_seqlens=None,
    q_positions=None, k_positions=None,
):
    """Gradients of :func:`attention_reference` in float64: returns ``(dq, dk, dv)``.

    ``dout`` is ``(batch, seqlen_q, heads, head_dim)``; dk/dv are summed over the
    query heads of each KV group (GQA), so they have k's shape.
    """
    mask = make_mask(causal, window, cu_seqlens)
    q64, k64, v64, p, _, scale, group = _scores(q, k, v, softmax_scale, mask, q_positions, k_positions)
    do = _host64(dout)
    dv = np.einsum("bhqk,bqhd->bkhd", p, do)
    dp = np.einsum("bqhd,bkhd->bhqk", do, v64)
    delta = np.einsum("bhqk,bhqk->bhq", p, dp)[..., None]
    ds = p * (dp - delta) * scale
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k64)
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q64)

    def group_sum(x):
        b, s, h, d = x.shape
        return x.reshape(b, s, h // group, group, d).sum(axis=3)

    return dq, group_sum(dk), group_sum(dv)
