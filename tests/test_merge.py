"""The stable log-space merge of partial results."""

import numpy as np
import pytest

from mpiring import attention_reference, merge_partials

pytestmark = pytest.mark.serial


def test_merge_equals_attention_over_the_union(seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 5, 3, 4)) for _ in range(3))
    k2, v2 = (rng.standard_normal((2, 7, 3, 4)) for _ in range(2))
    out_a, lse_a = attention_reference(q, k, v)
    out_b, lse_b = attention_reference(q, k2, v2)
    out_ab, lse_ab = attention_reference(q, np.concatenate([k, k2], 1), np.concatenate([v, v2], 1))
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    np.testing.assert_allclose(out, out_ab, atol=1e-13)
    np.testing.assert_allclose(lse, lse_ab, atol=1e-13)


@pytest.mark.parametrize("logit", (1e4, -1e4))
def test_merge_extreme_logits(logit):
    out_a, out_b = np.full((1, 1, 1, 2), 1.0, np.float32), np.full((1, 1, 1, 2), 3.0, np.float32)
    lse_a, lse_b = np.full((1, 1, 1), logit, np.float32), np.full((1, 1, 1), logit + 1, np.float32)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    w = 1 / (1 + np.exp(-1.0))  # weight of b: sigmoid(lse_b - lse_a)
    np.testing.assert_allclose(out, 1 + 2 * w, rtol=1e-6)
    np.testing.assert_allclose(lse, logit + 1 + np.log1p(np.exp(-1.0)), rtol=1e-6)
    assert out.dtype == np.float32 and lse.dtype == np.float32


def test_merge_fully_masked_rows():
    """Rows where one side (or both) has no keys: lse = -inf there, no NaN, out = 0 if both."""
    out_a = np.array([[[[1.0, 2.0]], [[5.0, 6.0]], [[0.0, 0.0]]]])  # (1, 3 rows, 1 head, 2)
    out_b = np.array([[[[3.0, 4.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
    lse_a = np.array([[[-np.inf, 0.5, -np.inf]]])
    lse_b = np.array([[[2.0, -np.inf, -np.inf]]])
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(out[0, :, 0], [[3.0, 4.0], [5.0, 6.0], [0.0, 0.0]])
    np.testing.assert_array_equal(lse[0, 0], [2.0, 0.5, -np.inf])


def test_reference_fully_masked_rows():
    """A row with no allowed key (window into an empty document) gives out 0, lse -inf, grads 0."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 1, 2)) for _ in range(3))
    out, lse = attention_reference(q, k, v, window=(0, -1), cu_seqlens=[0, 2, 4], causal=False)
    assert np.all(np.isfinite(out))
    out, lse = attention_reference(q, k, v, window=(-1, -1), causal=True, k_positions=[5, 6, 7, 8])
    assert np.all(out == 0) and np.all(lse == -np.inf)
