"""Flax Linen modules of VLPO (Vision-Language Preference Optimization, vlpo.txt Sec. 3).

`VLPOModel` maps a batch to named, shape-suffixed outputs; it holds no loss and reads no
config (the method object in `wstal_jax/methods/vlpo.py` wires both):

  cas_BxTxC      A = F_mil(emb(X)), class activation logits (Sec. 3.1)
  s_a_BxT        S^a = sigmoid(F_act(X)), actionness in (0, 1) (Sec. 3.1)
  s_v_BxT        S^v = sigmoid(F_va(X^v)), VLM temporal action score (Eq. 8; only with APR)
  s_rgb_BxT, s_flow_BxT   only with act_heads='three' (the released code's reading): separate
                 heads on the RGB and flow halves of X; S^a is then their fixed mix
                 (0.1 s_rgb + 0.4 s_flow) / 0.5, so (S^a + S^v) / 2 is the code's
                 0.1 s_rgb + 0.4 s_flow + 0.5 s_vl
  sim_t_BxTxC    cos(X^v, (X^t + X^pt) / 2), the similarity behind M^t (Eq. 3)
  sim_v_BxTxC    cos((X^v + X^pv) / 2, X^t), the similarity behind M^v (Eq. 3)

Padding never reaches a valid snippet: every input is zeroed on padded snippets before the
first temporal convolution (so the 'SAME' convolution sees exactly the zeros it would see at
the end of an unpadded video), and every per-snippet output is zeroed on padded snippets.
"""
import flax.linen as nn
import jax.numpy as jnp

from wstal_jax.layers import MaskedTemporalConv, l2_normalize, zero_padding

# How the vision-language similarity is formed (see `VLPOModel.vl_mode`).
VL_MODES = ("none", "cm_afa", "frozen", "clip_adapter")


def identity_init(key, shape, dtype=jnp.float32):
  """Dense kernel initialiser: the identity [E, E] (the projection starts as a no-op)."""
  del key
  return jnp.eye(shape[0], shape[1], dtype=dtype)


class SnippetEmbedding(nn.Module):
  """Task embedding of the I3D features (Sec. 3.1): temporal conv + ReLU (+ dropout).

  x_BxTxD, mask_BxT -> emb_BxTxF.
  """
  features: int
  kernel_size: int
  dropout: float

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, *, train: bool):
    h_BxTxF = nn.relu(MaskedTemporalConv(self.features, self.kernel_size, name="conv")(
        x_BxTxD, mask_BxT))
    return nn.Dropout(self.dropout, deterministic=not train)(h_BxTxF)


class ActionnessHead(nn.Module):
  """Class-agnostic snippet scorer: F_act on X (Eq. 1) or F_va on X^v (Eq. 8).

  temporal conv + ReLU + dropout + 1x1 linear + sigmoid: x_BxTxD, mask_BxT -> s_BxT in (0, 1).
  The sigmoid is the squashing of both S^a and S^v, so GCE (Eq. 1, 13) reads them as
  probabilities of "action".
  """
  hidden: int
  kernel_size: int
  dropout: float

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, *, train: bool):
    h_BxTxH = nn.relu(MaskedTemporalConv(self.hidden, self.kernel_size, name="conv")(
        x_BxTxD, mask_BxT))
    h_BxTxH = nn.Dropout(self.dropout, deterministic=not train)(h_BxTxH)
    logit_BxT = nn.Dense(1, name="out")(h_BxTxH)[:, :, 0]
    return nn.sigmoid(logit_BxT)


class CrossModalAlignment(nn.Module):
  """CM-AFA (Eq. 3): anchored cross-modal similarities of projected VLM features.

  vlm_BxTxE (X^v), text_CxE (X^t) -> (sim_t_BxTxC, sim_v_BxTxC), cosines in [-1, 1]:
    sim_t = cos(X^v, (X^t + P_t X^t) / 2)     (text projected, vision as the anchor)
    sim_v = cos((X^v + P_v X^v) / 2, X^t)     (vision projected, text as the anchor)
  Both feature sets are L2-normalised before projection (the VLM's own embedding geometry)
  and the anchored averages are L2-normalised again, so the similarities are cosines.

  proj_init: 'default' (flax's lecun-normal Dense init; the default) or 'identity'. With the
  identity, P_v and P_t start as no-ops, both similarities equal the frozen VLM cosine, and
  L_kl (Eq. 4) starts at its minimum with zero gradient: the consistency term never acts
  (review finding, issue 20). A random projection is what the anchored average (X + PX) / 2
  exists to tolerate: the anchor keeps half of the VLM geometry while M^t and M^v start apart,
  so lambda1 L_kl is a visible share of the loss from the first step.
  """
  proj_init: str = "default"

  @nn.compact
  def __call__(self, vlm_BxTxE, text_CxE):
    xv_BxTxE = l2_normalize(vlm_BxTxE)
    xt_CxE = l2_normalize(text_CxE)
    init = (identity_init if self.proj_init == "identity"
            else nn.linear.default_kernel_init)
    xpv_BxTxE = nn.Dense(xv_BxTxE.shape[-1], kernel_init=init, name="p_v")(xv_BxTxE)
    xpt_CxE = nn.Dense(xt_CxE.shape[-1], kernel_init=init, name="p_t")(xt_CxE)
    text_anchor_CxE = l2_normalize((xt_CxE + xpt_CxE) / 2)
    vis_anchor_BxTxE = l2_normalize((xv_BxTxE + xpv_BxTxE) / 2)
    sim_t_BxTxC = jnp.einsum("bte,ce->btc", xv_BxTxE, text_anchor_CxE)
    sim_v_BxTxC = jnp.einsum("bte,ce->btc", vis_anchor_BxTxE, xt_CxE)
    return sim_t_BxTxC, sim_v_BxTxC


class ClipAdapter(nn.Module):
  """CLIP-Adapter (Gao et al., vlpo ref. [6]) on the visual stream, the Table 4 alternative.

  vlm_BxTxE, text_CxE -> sim_BxTxC = cos(ratio * MLP(x^v) + (1 - ratio) * x^v, x^t), with
  MLP = Dense(E / reduction) + ReLU + Dense(E) + ReLU (the adapter's bottleneck) and x^v, x^t
  the L2-normalised features. The text side is left untouched (CLIP-Adapter's visual adapter).
  """
  ratio: float
  reduction: int

  @nn.compact
  def __call__(self, vlm_BxTxE, text_CxE):
    xv_BxTxE = l2_normalize(vlm_BxTxE)
    xt_CxE = l2_normalize(text_CxE)
    e = xv_BxTxE.shape[-1]
    h_BxTxH = nn.relu(nn.Dense(max(e // self.reduction, 1), name="down")(xv_BxTxE))
    h_BxTxE = nn.relu(nn.Dense(e, name="up")(h_BxTxH))
    adapted_BxTxE = l2_normalize(self.ratio * h_BxTxE + (1.0 - self.ratio) * xv_BxTxE)
    return jnp.einsum("bte,ce->btc", adapted_BxTxE, xt_CxE)


def frozen_similarity(vlm_BxTxE, text_CxE):
  """cos(X^v, X^t) of the raw VLM features (zero-shot / training-free): -> sim_BxTxC."""
  return jnp.einsum("bte,ce->btc", l2_normalize(vlm_BxTxE), l2_normalize(text_CxE))


class VLPOModel(nn.Module):
  """The VLPO network: baseline (Sec. 3.1) + VLM branch (Sec. 3.2, Eq. 3, 8).

  Attributes:
    num_classes: C.
    embed_dim: width of the temporal-conv embedding feeding F_mil.
    act_hidden_dim: hidden width of F_act / F_va.
    conv_kernel: temporal kernel of every temporal convolution.
    dropout: dropout rate after each convolution (train only).
    vl_mode: 'none' (baseline; X^v and X^t are never read), 'cm_afa' (Eq. 3), 'frozen'
      (raw-feature cosine, sim_t = sim_v; zero-shot / training-free) or 'clip_adapter'
      (sim_t = sim_v from a visual CLIP-Adapter).
    use_va: build F_va (Eq. 8); only APR trains it.
    adapter_ratio, adapter_reduction: CLIP-Adapter residual ratio and bottleneck reduction.
    proj_init: CM-AFA's projection init ('default' or 'identity', see CrossModalAlignment).
    cas_vlm: the CAS embedding also reads the raw VLM features, concatenated to X (the
      released code's encoder; the paper's F_mil sees X only).
    act_heads: 'two' (the paper: F_act on X, F_va on X^v) or 'three' (the released code: F_rgb
      and F_flow on the two halves of X, plus F_va); see s_rgb_BxT in the module docstring.

  __call__(batch, consts, *, train) reads batch['feat_BxTxD'], batch['mask_BxT'] and, when
  the VLM branch is on, batch['vlm_BxTxE'] and consts['text_CxE']; returns the dict described
  in the module docstring (VLM keys only when computed).
  """
  num_classes: int
  embed_dim: int = 512
  act_hidden_dim: int = 512
  conv_kernel: int = 3
  dropout: float = 0.5
  vl_mode: str = "none"
  use_va: bool = False
  adapter_ratio: float = 0.2
  adapter_reduction: int = 4
  proj_init: str = "default"
  cas_vlm: bool = False
  act_heads: str = "two"

  # The released code's fixed mix of its RGB / flow / VLM actionness heads.
  RGB_WEIGHT, FLOW_WEIGHT = 0.1, 0.4

  @nn.compact
  def __call__(self, batch, consts, *, train: bool):
    if self.vl_mode not in VL_MODES:
      raise ValueError(f"vl_mode={self.vl_mode!r} not in {VL_MODES}")
    mask_BxT = batch["mask_BxT"]
    valid_BxTx1 = mask_BxT[:, :, None] > 0
    feat_BxTxD = zero_padding(batch["feat_BxTxD"], mask_BxT)

    cas_in_BxTxD = feat_BxTxD
    if self.cas_vlm:
      cas_in_BxTxD = jnp.concatenate(
          [feat_BxTxD, zero_padding(batch["vlm_BxTxE"], mask_BxT)], axis=-1)
    emb_BxTxF = SnippetEmbedding(self.embed_dim, self.conv_kernel, self.dropout,
                                 name="embedding")(cas_in_BxTxD, mask_BxT, train=train)
    cas_BxTxC = nn.Dense(self.num_classes, name="f_mil")(emb_BxTxF)
    out = {"cas_BxTxC": jnp.where(valid_BxTx1, cas_BxTxC, 0.0)}
    if self.act_heads == "three":
      half = feat_BxTxD.shape[-1] // 2
      if half < 1 or 2 * half != feat_BxTxD.shape[-1]:
        raise ValueError(f"act_heads='three' splits X into RGB and flow halves; its dim "
                         f"{feat_BxTxD.shape[-1]} is not even")
      s_rgb_BxT = ActionnessHead(self.act_hidden_dim, self.conv_kernel, self.dropout,
                                 name="f_rgb")(feat_BxTxD[..., :half], mask_BxT, train=train)
      s_flow_BxT = ActionnessHead(self.act_hidden_dim, self.conv_kernel, self.dropout,
                                  name="f_flow")(feat_BxTxD[..., half:], mask_BxT, train=train)
      s_a_BxT = ((self.RGB_WEIGHT * s_rgb_BxT + self.FLOW_WEIGHT * s_flow_BxT)
                 / (self.RGB_WEIGHT + self.FLOW_WEIGHT))
      out["s_rgb_BxT"] = jnp.where(mask_BxT > 0, s_rgb_BxT, 0.0)
      out["s_flow_BxT"] = jnp.where(mask_BxT > 0, s_flow_BxT, 0.0)
    else:
      s_a_BxT = ActionnessHead(self.act_hidden_dim, self.conv_kernel, self.dropout,
                               name="f_act")(feat_BxTxD, mask_BxT, train=train)
    out["s_a_BxT"] = jnp.where(mask_BxT > 0, s_a_BxT, 0.0)
    if self.vl_mode == "none" and not self.use_va:
      return out

    vlm_BxTxE = zero_padding(batch["vlm_BxTxE"], mask_BxT)
    if self.use_va:
      s_v_BxT = ActionnessHead(self.act_hidden_dim, self.conv_kernel, self.dropout,
                               name="f_va")(vlm_BxTxE, mask_BxT, train=train)
      out["s_v_BxT"] = jnp.where(mask_BxT > 0, s_v_BxT, 0.0)
    if self.vl_mode == "none":
      return out

    text_CxE = consts["text_CxE"]
    if self.vl_mode == "cm_afa":
      sim_t_BxTxC, sim_v_BxTxC = CrossModalAlignment(self.proj_init, name="cm_afa")(
          vlm_BxTxE, text_CxE)
    elif self.vl_mode == "clip_adapter":
      sim_t_BxTxC = sim_v_BxTxC = ClipAdapter(self.adapter_ratio, self.adapter_reduction,
                                              name="clip_adapter")(vlm_BxTxE, text_CxE)
    else:
      sim_t_BxTxC = sim_v_BxTxC = frozen_similarity(vlm_BxTxE, text_CxE)
    out["sim_t_BxTxC"] = jnp.where(valid_BxTx1, sim_t_BxTxC, 0.0)
    out["sim_v_BxTxC"] = jnp.where(valid_BxTx1, sim_v_BxTxC, 0.0)
    return out
