"""Flax Linen modules of Ju et al. 2023 (ju2023_distill_vlp.txt Sec. 3.2): the two branches.

`Ju2023Model` holds the CBP branch (scope 'cbp') and the VLP branch (scope 'vlp'); the
method freezes one scope while the other trains (Sec. 3.3). Outputs:

  cbp_logits_BxTxK   CBP frame logits over the C classes (+ a background column: K = C + 1
                     with the 'softmax_bg' reading)
  cbp_emb_BxTxF      CBP frame features (the f of Eq. 7 in F steps)
  vlp_logits_BxTxC   logit_scale * cos(F_vid, F_txt) (Eq. 3 before its softmax)
  vlp_emb_BxTxE      F_vid (the f of Eq. 7 in B steps)

CBP branch (Sec. 3.2, 4.1: "Transformer architectures (multi-head self-attention, layer norm,
and MLPs)"; sizes not given): a masked temporal conv (kernel 3) embeds the I3D RGB || flow
features (it also gives the otherwise permutation-invariant attention the order of the
snippets), then `num_layers` pre-LN Transformer blocks with padding masked out of the
attention, a final layer norm and a linear head over the C classes (Eq. 1), or C + 1 with a
background column (an option, documented in methods/ju2023.py).

VLP branch: the frozen CLIP image features F_vis -> `vlp_layers` (2, Sec. 4.1) pre-LN
Transformer blocks whose output projections start at zero, so F_vid = F_vis at init and the
untrained branch is exactly vanilla CLIP (the "VLP zero-shot" row); class text F_txt from
the frozen CLIP text encoder over [SOS; 16 learnable vectors; name; 16 learnable vectors;
EOT] (`models/clip_text.PromptedClassEncoder`, N(0, 0.01^2) init), or, without a CLIP
checkpoint, the dataset's class text embeddings + a learnable offset per class
(`models/pvlr.PrecomputedClassText`, the same fallback as PVLR's).
"""
import flax.linen as nn
import jax.numpy as jnp

from wstal_jax.layers import MaskedTemporalConv, l2_normalize, zero_padding
from wstal_jax.models.co2net import CO2NetModel
from wstal_jax.models.pvlr import PrecomputedClassText

TEXT_MODES = ("precomputed", "clip")


class TransformerBlock(nn.Module):
  """Pre-LN block: x + MHSA(LN(x)) with padded keys masked, then x + MLP(LN(x)).

  zero_init_out: the attention's and the MLP's output projections start at zero (the block
  is the identity at init).
  window: 0 (global attention) or w > 0 (local: snippet t attends to snippets t - w .. t + w).
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  zero_init_out: bool = False
  window: int = 0

  @nn.compact
  def __call__(self, x_BxTxF, mask_BxT, *, train: bool):
    valid_BxT = mask_BxT > 0
    out_init = (nn.initializers.zeros if self.zero_init_out
                else nn.initializers.lecun_normal())
    attn_mask = nn.make_attention_mask(valid_BxT, valid_BxT)   # [B, 1, T, T]
    if self.window > 0:
      pos = jnp.arange(x_BxTxF.shape[1])
      near_TxT = jnp.abs(pos[:, None] - pos[None, :]) <= self.window
      attn_mask = attn_mask * near_TxT[None, None].astype(attn_mask.dtype)
    y = nn.LayerNorm(name="ln_attn")(x_BxTxF)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, deterministic=not train,
        out_kernel_init=out_init, name="attn")(y, y, mask=attn_mask)
    x_BxTxF = x_BxTxF + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(name="ln_mlp")(x_BxTxF)
    y = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(y))
    y = nn.Dense(x_BxTxF.shape[-1], kernel_init=out_init, name="mlp_out")(y)
    x_BxTxF = x_BxTxF + nn.Dropout(self.dropout, deterministic=not train)(y)
    return zero_padding(x_BxTxF, mask_BxT)


class CBPBranch(nn.Module):
  """I3D features -> frame logits and frame features (module docstring)."""
  num_classes: int
  width: int = 256
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  dropout: float = 0.5
  background: bool = False
  window: int = 0

  @nn.compact
  def __call__(self, feat_BxTxD, mask_BxT, *, train: bool):
    x = nn.Dropout(self.dropout, deterministic=not train)(feat_BxTxD)
    x = nn.relu(MaskedTemporalConv(self.width, 3, name="embed")(x, mask_BxT))
    for i in range(self.num_layers):
      x = TransformerBlock(self.num_heads, self.mlp_dim, self.dropout, window=self.window,
                           name=f"block{i}")(x, mask_BxT, train=train)
    emb = zero_padding(nn.LayerNorm(name="ln_out")(x), mask_BxT)
    h = nn.Dropout(self.dropout, deterministic=not train)(emb)
    logits = nn.Dense(self.num_classes + int(self.background), name="head")(h)
    return {"cbp_logits_BxTxK": zero_padding(logits, mask_BxT), "cbp_emb_BxTxF": emb}


class VLPBranch(nn.Module):
  """CLIP image features + class text -> scaled cosines (module docstring)."""
  num_layers: int = 2
  num_heads: int = 8
  mlp_dim: int = 1024
  dropout: float = 0.1
  logit_scale: float = 100.0
  text_mode: str = "precomputed"
  clip_config: object = None
  n_pre: int = 16
  n_post: int = 16
  prompt_init_std: float = 0.01
  window: int = 0

  @nn.compact
  def __call__(self, vis_BxTxE, mask_BxT, consts, *, train: bool):
    x = zero_padding(vis_BxTxE, mask_BxT)
    for i in range(self.num_layers):
      x = TransformerBlock(self.num_heads, self.mlp_dim, self.dropout, zero_init_out=True,
                           window=self.window, name=f"temporal{i}")(x, mask_BxT, train=train)
    if self.text_mode == "clip":
      from wstal_jax.models import clip_text  # pylint: disable=import-outside-toplevel
      text_CxE = clip_text.PromptedClassEncoder(
          self.clip_config, n_pre=self.n_pre, n_post=self.n_post,
          ctx_init_std=self.prompt_init_std, name="text")(
              consts["class_name_ids_CxM"], consts["class_name_len_C"])
    else:
      text_CxE = PrecomputedClassText(self.prompt_init_std, name="text")(consts["text_CxE"])
    sim = jnp.einsum("bte,ce->btc", l2_normalize(x), l2_normalize(text_CxE))
    return {"vlp_logits_BxTxC": zero_padding(self.logit_scale * sim, mask_BxT),
            "vlp_emb_BxTxE": x, "text_CxE": text_CxE}


class Ju2023Model(nn.Module):
  """Both branches; `consts` carries the class text inputs (and frozen CLIP weights).

  `__call__` runs both; `run_cbp` / `run_vlp` (`apply(..., method=...)`) run one, so a
  phase's loss computes only the branches it uses (methods/ju2023.py)."""
  num_classes: int
  cbp_args: dict
  vlp_args: dict
  cbp_arch: str = "transformer"    # or 'co2net' (Table 6: CO2-Net as the CBP branch)

  def setup(self):
    if self.cbp_arch == "co2net":
      self.cbp = CO2NetModel(self.num_classes, **self.cbp_args)
    else:
      self.cbp = CBPBranch(self.num_classes, **self.cbp_args)
    self.vlp = VLPBranch(**self.vlp_args)

  def run_cbp(self, batch, consts, *, train: bool):
    if self.cbp_arch == "co2net":
      # CO2-Net's outputs (its losses need them) + the CBP names: the CAS over C + 1 and
      # the fused features (Eq. 7's f in F steps).
      out = dict(self.cbp(batch, consts, train=train))
      out["cbp_logits_BxTxK"] = out["cas_BxTxC1"]
      out["cbp_emb_BxTxF"] = out["feat_BxTxF"]
      return out
    return self.cbp(batch["feat_BxTxD"], batch["mask_BxT"], train=train)

  def run_vlp(self, batch, consts, *, train: bool):
    return self.vlp(batch["vlm_BxTxE"], batch["mask_BxT"], consts, train=train)

  def __call__(self, batch, consts, *, train: bool):
    out = self.run_cbp(batch, consts, train=train)
    out.update(self.run_vlp(batch, consts, train=train))
    return out
