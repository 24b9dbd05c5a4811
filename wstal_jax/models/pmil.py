"""Flax Linen modules of P-MIL (Ren et al., CVPR 2023), SEAL's base: proposal features by
SCFE and the three proposal heads.

SCFE (surrounding contrastive feature extraction). Each candidate proposal [s, e] (snippet
units; snippet i spans [i, i + 1]) is extended by 25 % of its length L on each side and
pooled into 12 bins (2 left context, 8 inner, 2 right context); each region is max-pooled
over its bins and the proposal feature is [inner - left, inner, inner - right] (3 D).

Bin values (our choice, documented): the exact mean over the bin of the piecewise-linear
interpolant of the snippet features (snippet i's feature at i + 0.5, falling linearly to 0 one
snippet outside the valid part of the video, as P-MIL's zero padding makes it), computed in
closed form from a running integral: O(T D + M D) a video. P-MIL calls torchvision's RoI-align,
which averages the same interpolant at ceil(bin / 1 snippet) sample points per bin (1 to 77 on
THUMOS14): an estimate of this mean that converges to it as bins widen, at a cost of
O(M * 12 * samples * D) gathers or an [M, 12, T] weight matrix. The bin extent is max(1.5 L,
1) / 12 as there (a zero-length proposal reads the snippet it sits on).
"""
import flax.linen as nn
import jax.numpy as jnp

NUM_BINS = 12
CONTEXT_BINS = 2        # bins 0-1 left context, 2-9 inner, 10-11 right context
EXTENSION = 0.25


def _running_integral(feat_BxTxD):
  """Node values V [B, T + 3, D] of the zero-extended sequence (node n at position n - 1:
  V_0 = 0, V_1..T = features, V_T+1 = V_T+2 = 0) and C [B, T + 3, D] with C_n the integral
  of the interpolant from position -1 to position n - 1."""
  v = jnp.pad(feat_BxTxD, ((0, 0), (1, 2), (0, 0)))
  trapezoid = 0.5 * (v[:, 1:] + v[:, :-1])
  c = jnp.concatenate([jnp.zeros_like(v[:, :1]), jnp.cumsum(trapezoid, axis=1)], axis=1)
  return v, c


def _integral_at(v, c, y_BxK):
  """Integral of the interpolant from -1 to y (index space: snippet i's value at y = i),
  [B, K, D]; 0 before -1, the total after T."""
  num_nodes = v.shape[1]
  z = jnp.clip(y_BxK + 1.0, 0.0, num_nodes - 2.0)
  k = jnp.clip(jnp.floor(z).astype(jnp.int32), 0, num_nodes - 2)
  u = (z - k)[..., None]
  take = lambda a, idx: jnp.take_along_axis(a, idx[..., None], axis=1)
  v0, v1 = take(v, k), take(v, k + 1)
  return take(c, k) + u * v0 + 0.5 * u * u * (v1 - v0)


def bin_features(feat_BxTxD, proposals_BxMx2):
  """SCFE's 12 bin means per proposal: [B, M, 12, D] (module docstring). Features beyond a
  video's valid length must be zero (the input pipeline's padding is)."""
  s, e = proposals_BxMx2[..., 0], proposals_BxMx2[..., 1]
  length = e - s
  start = s - EXTENSION * length
  extent = jnp.maximum((1.0 + 2.0 * EXTENSION) * length, 1.0)
  edges_BxMxK = (start[..., None]
                 + extent[..., None] * jnp.linspace(0.0, 1.0, NUM_BINS + 1)[None, None])
  b, m = s.shape
  y = edges_BxMxK.reshape(b, m * (NUM_BINS + 1)) - 0.5   # snippet i's centre is at i + 0.5
  v, c = _running_integral(feat_BxTxD.astype(jnp.float32))
  integral = _integral_at(v, c, y).reshape(b, m, NUM_BINS + 1, -1)
  width = (extent / NUM_BINS)[..., None, None]
  return (integral[:, :, 1:] - integral[:, :, :-1]) / width


def scfe(feat_BxTxD, proposals_BxMx2):
  """[inner - left, inner, inner - right] of the region max-pools: [B, M, 3 D]."""
  bins = bin_features(feat_BxTxD, proposals_BxMx2)
  left = jnp.max(bins[:, :, :CONTEXT_BINS], axis=2)
  inner = jnp.max(bins[:, :, CONTEXT_BINS:NUM_BINS - CONTEXT_BINS], axis=2)
  right = jnp.max(bins[:, :, NUM_BINS - CONTEXT_BINS:], axis=2)
  return jnp.concatenate([inner - left, inner, inner - right], axis=-1)


class ProposalBranch(nn.Module):
  """One modality's (or the fused) backbone and heads: SCFE features [B, M, 3 D] ->
  Linear + ReLU + dropout -> three heads (each Linear + ReLU + Linear): class logits
  [B, M, C + 1] (last column background), attention logit [B, M], completeness logit
  [B, M]; and the backbone feature [B, M, hidden] (SEAL's semantic consistency reads it)."""
  num_classes: int
  hidden: int
  head_hidden: int
  dropout: float

  @nn.compact
  def __call__(self, x_BxMx3D, train: bool):
    h = nn.relu(nn.Dense(self.hidden, name="fuse")(x_BxMx3D))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    def head(name, out):
      z = nn.relu(nn.Dense(self.head_hidden, name=f"{name}_hidden")(h))
      return nn.Dense(out, name=name)(z)
    return {"cas_BxMxC1": head("cls", self.num_classes + 1),
            "attn_logit_BxM": head("attn", 1)[..., 0],
            "iou_logit_BxM": head("iou", 1)[..., 0],
            "emb_BxMxH": h}


class PMILModel(nn.Module):
  """P-MIL's proposal network. branches='separate' (P-MIL): an RGB and a flow branch on the
  two halves of the features (`split` columns for RGB), outputs keyed by modality;
  'fused' (SEAL's code): one branch on the whole feature, key 'fused'."""
  num_classes: int
  split: int
  hidden: int
  head_hidden: int
  dropout: float
  branches: str = "separate"

  @nn.compact
  def __call__(self, feat_BxTxD, proposals_BxMx2, train: bool = False):
    feats = ({"rgb": feat_BxTxD[..., :self.split], "flow": feat_BxTxD[..., self.split:]}
             if self.branches == "separate" else {"fused": feat_BxTxD})
    return {name: ProposalBranch(self.num_classes, self.hidden, self.head_hidden,
                                 self.dropout, name=name)(scfe(f, proposals_BxMx2), train)
            for name, f in feats.items()}


def proposal_iou(a_BxMx2, b_BxNx2, eps: float = 1e-6):
  """Continuous tIoU of every pair, [B, M, N] (P-MIL's losses: no +1)."""
  inter = jnp.maximum(0.0, jnp.minimum(a_BxMx2[..., :, None, 1], b_BxNx2[..., None, :, 1])
                      - jnp.maximum(a_BxMx2[..., :, None, 0], b_BxNx2[..., None, :, 0]))
  la = (a_BxMx2[..., 1] - a_BxMx2[..., 0])[..., :, None]
  lb = (b_BxNx2[..., 1] - b_BxNx2[..., 0])[..., None, :]
  return inter / (la + lb - inter + eps)

