"""Masked temporal ops and small shared layers: what more than one method uses.

Every method's model and loss import these rather than each other's files. Conventions
(shape-suffixed names): `mask_BxT` is 1 on valid snippets and 0 on padding; a padded snippet
is never selected, averaged or normalised over, so a video's result does not depend on how
much padding its batch carries.

  topk_count(mask, divisor)           k_B = max(1, n_valid // divisor)
  topk_select(x, mask, k)             boolean top-k of each (video, class) column
  pool_selected / masked_topk_mean    mean over the selected / top-k valid snippets
  temporal_minmax(x, mask)            min-max over the valid snippets of each column
  masked_softmax_time(x, mask)        softmax over the valid snippets of each column
  masked_time_mean(x, mask)           mean over the valid snippets of each video: [B, D]
  snippet_mean(l_BxT, mask)           per-video mean of a per-snippet loss
  video_mean(l_B, valid_B)            mean of a per-video loss over the real videos
  l2_normalize(x)                     x / ||x|| on the last axis (zero rows stay zero)
  zero_padding(x, mask)               padded snippets set to exactly 0
  MaskedTemporalConv                  'SAME' temporal conv that never reads padding
"""
import flax.linen as nn
import jax
import jax.numpy as jnp


# ------------------------------------------------------------------------------------------
# Masked top-k and temporal reductions (pure functions).


def topk_count(mask_BxT, divisor: int):
  """k_B = max(1, n_valid // divisor) (the paper's k = T / divisor on valid snippets)."""
  n_B = jnp.sum(mask_BxT > 0, axis=1).astype(jnp.int32)
  return jnp.maximum(n_B // divisor, 1)


def topk_bound(mask_BxT, divisor: int) -> int:
  """A static upper bound of topk_count(mask_BxT, divisor): max(1, T // divisor)."""
  return max(int(mask_BxT.shape[1]) // int(divisor), 1)


def topk_select(x_BxTxC, mask_BxT, k_B, k_max: int | None = None):
  """Boolean [B, T, C]: the k_B[b] largest valid entries of each (video, class) column.

  Padded snippets are never selected; if a video has fewer than k valid snippets all of them
  are. Ties at the k-th value go to the earlier snippets, so exactly min(k, n_valid) entries
  are selected. The selection is read off the sort permutation (one (value, position) sort +
  a scatter) rather than by comparing x with its sorted k-th value: under jit XLA may recompute
  x in each fusion with different FMA contraction, so x == kth can miss by 1 ulp. Indices
  carry no gradient.

  k_max (static, >= every k_B, e.g. topk_bound): the same selection from a partial sort
  (lax.top_k of k_max gives the k-th value; ties at it go to the earlier snippets as above),
  several times faster than the full sort on CPU for k_max = T / 8.
  """
  valid_BxTx1 = mask_BxT[:, :, None] > 0
  x_BxTxC = jnp.where(valid_BxTx1, jax.lax.stop_gradient(x_BxTxC), -jnp.inf)
  if k_max is not None and k_max < x_BxTxC.shape[1]:
    # The k-th largest value v of each column from a partial sort, then every entry above v
    # and the earliest entries equal to v up to k (lax.top_k's own order among ties is not
    # specified). The barrier materialises x once, so every comparison reads the values
    # top_k read (no FMA recontraction in another fusion).
    x_BxTxC = jax.lax.optimization_barrier(x_BxTxC)
    top_BxCxK, _ = jax.lax.top_k(jnp.swapaxes(x_BxTxC, 1, 2), int(k_max))
    kth_Bx1xC = jnp.take_along_axis(top_BxCxK, (k_B - 1)[:, None, None], axis=2)[:, :, 0][
        :, None, :]
    above_BxTxC = x_BxTxC > kth_Bx1xC
    tie_BxTxC = x_BxTxC == kth_Bx1xC
    need_Bx1xC = k_B[:, None, None] - jnp.sum(above_BxTxC, axis=1, keepdims=True)
    first_ties_BxTxC = tie_BxTxC & (jnp.cumsum(tie_BxTxC, axis=1) <= need_Bx1xC)
    return (above_BxTxC | first_ties_BxTxC) & valid_BxTx1
  pos_BxTxC = jax.lax.broadcasted_iota(jnp.int32, x_BxTxC.shape, 1)
  # Stable descending sort; ties keep time order, so they go to the earlier snippets.
  _, order_BxTxC = jax.lax.sort((-x_BxTxC, pos_BxTxC), dimension=1, num_keys=1,
                                is_stable=True)
  valid_sorted_BxTxC = jnp.take_along_axis(jnp.broadcast_to(valid_BxTx1, x_BxTxC.shape),
                                           order_BxTxC, axis=1)
  sel_sorted_BxTxC = (pos_BxTxC < k_B[:, None, None]) & valid_sorted_BxTxC
  b_BxTxC = jax.lax.broadcasted_iota(jnp.int32, x_BxTxC.shape, 0)
  c_BxTxC = jax.lax.broadcasted_iota(jnp.int32, x_BxTxC.shape, 2)
  return jnp.zeros(x_BxTxC.shape, bool).at[b_BxTxC, order_BxTxC, c_BxTxC].set(
      sel_sorted_BxTxC, unique_indices=True)


def pool_selected(x_BxTxC, sel_BxTxC):
  """Mean of x over the selected snippets of each column (0 if none): -> BxC."""
  n_BxC = jnp.sum(sel_BxTxC, axis=1)
  total_BxC = jnp.sum(jnp.where(sel_BxTxC, x_BxTxC, 0.0), axis=1)
  return total_BxC / jnp.maximum(n_BxC, 1).astype(x_BxTxC.dtype)


def masked_topk_mean(x_BxTxC, mask_BxT, k_B, k_max: int | None = None):
  """(1/k) sum of the top-k valid entries per column (Sec. 3.1 pooling): -> BxC.
  k_max: as in topk_select."""
  return pool_selected(x_BxTxC, topk_select(x_BxTxC, mask_BxT, k_B, k_max))


def temporal_minmax(x_BxTxC, mask_BxT):
  """Min-max normalisation over the valid snippets of each (video, class): -> BxTxC in [0, 1].

  Padded snippets and constant columns give 0.
  """
  valid_BxTx1 = mask_BxT[:, :, None] > 0
  lo_Bx1xC = jnp.min(jnp.where(valid_BxTx1, x_BxTxC, jnp.inf), axis=1, keepdims=True)
  hi_Bx1xC = jnp.max(jnp.where(valid_BxTx1, x_BxTxC, -jnp.inf), axis=1, keepdims=True)
  span_Bx1xC = hi_Bx1xC - lo_Bx1xC
  ok_Bx1xC = span_Bx1xC > 0
  safe_lo_Bx1xC = jnp.where(ok_Bx1xC, lo_Bx1xC, 0.0)
  safe_span_Bx1xC = jnp.where(ok_Bx1xC, span_Bx1xC, 1.0)
  return jnp.where(valid_BxTx1 & ok_Bx1xC, (x_BxTxC - safe_lo_Bx1xC) / safe_span_Bx1xC, 0.0)


def masked_softmax_time(x_BxTxC, mask_BxT):
  """Softmax over the valid snippets of each (video, class) column."""
  valid_BxTx1 = mask_BxT[:, :, None] > 0
  x = jnp.where(valid_BxTx1, x_BxTxC, -jnp.inf)
  x = x - jax.lax.stop_gradient(jnp.max(x, axis=1, keepdims=True))
  e = jnp.where(valid_BxTx1, jnp.exp(x), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=1, keepdims=True), 1e-30)


def masked_time_mean(x_BxTxD, mask_BxT):
  """Mean over the valid snippets of each video: [B, D]."""
  m_BxTx1 = mask_BxT[:, :, None].astype(x_BxTxD.dtype)
  return jnp.sum(x_BxTxD * m_BxTx1, axis=1) / jnp.maximum(jnp.sum(m_BxTx1, axis=1), 1.0)


def video_mean(l_B, valid_B):
  """Mean of per-video losses over the valid (real) videos."""
  return jnp.sum(l_B * valid_B) / jnp.maximum(jnp.sum(valid_B), 1.0)


def snippet_mean(l_BxT, mask_BxT):
  """Per-video mean over valid snippets: -> l_B (0 for a video without valid snippets)."""
  m_BxT = (mask_BxT > 0).astype(l_BxT.dtype)
  return jnp.sum(l_BxT * m_BxT, axis=1) / jnp.maximum(jnp.sum(m_BxT, axis=1), 1.0)


# ------------------------------------------------------------------------------------------
# Vectors and layers.


def l2_normalize(x_NxE, eps: float = 1e-12):
  """x / ||x|| along the last axis; an all-zero row (a zeroed padded snippet) stays zero."""
  sq_Nx1 = jnp.sum(x_NxE * x_NxE, axis=-1, keepdims=True)
  return x_NxE * jax.lax.rsqrt(jnp.maximum(sq_Nx1, eps))


def zero_padding(x_BxTxD, mask_BxT):
  """x with padded snippets set to exactly 0. `where`, not a product: NaN/inf padding is
  removed too, so neither the forward pass nor any gradient can see it."""
  return jnp.where(mask_BxT[:, :, None] > 0, x_BxTxD, jnp.zeros((), x_BxTxD.dtype))


class MaskedTemporalConv(nn.Module):
  """1-D temporal convolution ('SAME' zero padding) that never reads padded snippets.

  x_BxTxD, mask_BxT -> y_BxTxF. Padded inputs are zeroed first, so the outputs on valid
  snippets equal those of the same video without padding.
  """
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT):
    x_BxTxD = zero_padding(x_BxTxD, mask_BxT)
    return nn.Conv(self.features, (self.kernel_size,), padding="SAME", name="conv")(x_BxTxD)
