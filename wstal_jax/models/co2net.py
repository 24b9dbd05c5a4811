"""Flax Linen modules of the CO2-Net base (Hong et al., MM 2021; PVLR Sec. 3.1.2, Eq. 1-3).

`CO2NetTrunk` maps I3D features [RGB; flow] to the fused base feature, the hidden classifier
feature X_B (Eq. 1) and the class-agnostic attentions (Eq. 2); `CO2NetModel` adds the
classifier f_cls that gives the CAS with a background class (Eq. 3). The PVLR model
(`wstal_jax/models/pvlr.py`) reuses the trunk and replaces f_cls's last layer by P-CAS.

Outputs (shape-suffixed; padded snippets are zeroed):

  feat_BxTxF     the fused feature after CO2-Net's 1x1 fusion layer (what CO2-Net's
                 co-activity loss, L_oppo, pools)
  base_BxTxF     X_B: the classifier's hidden temporal conv + LeakyReLU on the fused feature
  attn_BxT       a = (A(X_R, X_O) + A(X_O, X_R)) / 2 in (0, 1)         (Eq. 2)
  v_attn_BxT     A(X_R, X_O), the RGB branch's attention
  f_attn_BxT     A(X_O, X_R), the flow branch's attention
  cas_BxTxC1     S_base = f_cls(X_B), C action classes + background (last column) (Eq. 3)

The cross-modal consensus module (`ConsensusAttention`) follows CO2-Net's released layer
"BWA_fusion_dropout_feat_v2" (read, not copied): a channel attention from the temporal mean of
the main modality, a bit-wise attention from a temporal conv of the other modality, the main
features filtered by sigmoid(bit-wise * channel), and an attention head (two temporal convs of
kernel 3, a 1x1 conv, sigmoid). Its channel conv of kernel 3 runs on a length-1 sequence, so
only the centre tap acts: it is a dense layer here. Dropout rates are CO2-Net's (0.5 in the
attention, 0.7 elsewhere). The temporal mean runs over valid snippets only.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from wstal_jax.layers import MaskedTemporalConv, masked_time_mean, zero_padding


def leaky_relu(x):
  return nn.leaky_relu(x, negative_slope=0.2)


class ConsensusAttention(nn.Module):
  """CO2-Net's cross-modal consensus module A(main, other) -> (attention_BxT, filtered_BxTxD).

  main_BxTxD, other_BxTxD, mask_BxT. embed_dim is the width of the channel / bit-wise
  attentions (CO2-Net: 1024 = D), hidden the attention head's width (CO2-Net: 512).
  """
  embed_dim: int
  hidden: int
  dropout: float = 0.5

  @nn.compact
  def __call__(self, main_BxTxD, other_BxTxD, mask_BxT, *, train: bool):
    drop = lambda x: nn.Dropout(self.dropout, deterministic=not train)(x)
    channel_Bx1xE = drop(leaky_relu(nn.Dense(self.embed_dim, name="channel")(
        masked_time_mean(main_BxTxD, mask_BxT))))[:, None, :]
    bit_BxTxE = drop(leaky_relu(MaskedTemporalConv(self.embed_dim, 3, name="bit_wise")(
        other_BxTxD, mask_BxT)))
    filtered_BxTxD = jax.nn.sigmoid(bit_BxTxE * channel_Bx1xE) * main_BxTxD
    h = drop(leaky_relu(MaskedTemporalConv(self.hidden, 3, name="attn_conv1")(
        filtered_BxTxD, mask_BxT)))
    h = leaky_relu(MaskedTemporalConv(self.hidden, 3, name="attn_conv2")(h, mask_BxT))
    logit_BxT = drop(nn.Dense(1, name="attn_out")(h))[..., 0]
    return jax.nn.sigmoid(logit_BxT), zero_padding(filtered_BxTxD, mask_BxT)


class CO2NetTrunk(nn.Module):
  """Everything of CO2-Net but the classifier's last layer (see module docstring).

  rgb_dim: the first rgb_dim feature dims are RGB, the rest flow (I3D: 1024 + 1024).
  """
  rgb_dim: int
  attn_hidden: int = 512
  dropout: float = 0.7
  attn_dropout: float = 0.5

  @nn.compact
  def __call__(self, feat_BxTxD, mask_BxT, *, train: bool):
    feat_BxTxD = zero_padding(feat_BxTxD, mask_BxT)
    rgb, flow = feat_BxTxD[..., :self.rgb_dim], feat_BxTxD[..., self.rgb_dim:]
    width = feat_BxTxD.shape[-1]
    v_attn, v_feat = ConsensusAttention(rgb.shape[-1], self.attn_hidden, self.attn_dropout,
                                        name="rgb_attention")(rgb, flow, mask_BxT, train=train)
    f_attn, f_feat = ConsensusAttention(flow.shape[-1], self.attn_hidden, self.attn_dropout,
                                        name="flow_attention")(flow, rgb, mask_BxT, train=train)
    drop = lambda x, r: nn.Dropout(r, deterministic=not train)(x)
    fused = jnp.concatenate([v_feat, f_feat], axis=-1)
    fused = drop(leaky_relu(nn.Dense(width, name="fusion")(fused)), self.dropout)
    fused = zero_padding(fused, mask_BxT)
    base = leaky_relu(MaskedTemporalConv(width, 3, name="cls_conv")(
        drop(fused, self.dropout), mask_BxT))
    valid = mask_BxT > 0
    zero = lambda x: jnp.where(valid, x, 0.0)
    return {"feat_BxTxF": fused, "base_BxTxF": zero_padding(base, mask_BxT),
            "attn_BxT": zero((v_attn + f_attn) / 2), "v_attn_BxT": zero(v_attn),
            "f_attn_BxT": zero(f_attn)}


class CO2NetModel(nn.Module):
  """CO2-Net: trunk + f_cls's last layer (dropout 0.7, 1x1 conv to C + 1 classes)."""
  num_classes: int
  rgb_dim: int
  attn_hidden: int = 512
  dropout: float = 0.7

  @nn.compact
  def __call__(self, batch, consts=None, *, train: bool):
    del consts
    mask_BxT = batch["mask_BxT"]
    out = CO2NetTrunk(self.rgb_dim, self.attn_hidden, self.dropout, name="trunk")(
        batch["feat_BxTxD"], mask_BxT, train=train)
    x = nn.Dropout(self.dropout, deterministic=not train)(out["base_BxTxF"])
    cas = nn.Dense(self.num_classes + 1, name="classifier")(x)
    out["cas_BxTxC1"] = jnp.where(mask_BxT[:, :, None] > 0, cas, 0.0)
    return out
