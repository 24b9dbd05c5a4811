"""Flax Linen modules of MLLM4WTAL (mllm4wtal.txt Sec. 3): the KSM text encoder (Eq. 4-5),
the CSR branch (Eq. 11-16, with the A-weighted attention of Eq. 14-15) and the prior-guided
localization head (Eq. 18). The method, its losses and every reading are in
methods/mllm4wtal.py; the video side of KSM is the base's (DELU / CO2-Net, models/co2net.py).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from wstal_jax.data import descriptions as desc
from wstal_jax.layers import MaskedTemporalConv, zero_padding

class TransformerLayer(nn.Module):
  """Pre-norm self-attention + MLP block over [N, L, D] with a key mask [N, L]."""
  dim: int
  heads: int
  dropout: float

  @nn.compact
  def __call__(self, x, mask_NxL, train: bool):
    attn_mask = nn.make_attention_mask(mask_NxL > 0, mask_NxL > 0)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, dropout_rate=self.dropout,
                                        deterministic=not train, name="attn")(
        nn.LayerNorm(name="ln1")(x), mask=attn_mask)
    x = x + h
    h = nn.Dense(2 * self.dim, name="mlp1")(nn.LayerNorm(name="ln2")(x))
    h = nn.Dense(self.dim, name="mlp2")(nn.gelu(h))
    return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class KSMText(nn.Module):
  """Eq. 4-5: word tokens [N, L] (+ the background row) -> class queries [N, ksm_dim]."""
  dim: int
  out_dim: int
  layers: int
  heads: int
  num_context: int
  dropout: float

  @nn.compact
  def __call__(self, tokens_NxL, word_vectors_VxD, background_N, train: bool):
    n, length = tokens_NxL.shape
    words = nn.Dense(self.dim, name="word_proj")(word_vectors_VxD[tokens_NxL])
    bg_token = self.param("background_token", nn.initializers.zeros, (self.dim,))
    words = jnp.where(background_N[:, None, None], jnp.broadcast_to(bg_token, words.shape),
                      words)
    word_mask = jnp.where(background_N[:, None], jnp.arange(length)[None, :] == 0,
                          tokens_NxL != desc.PAD)
    start = self.param("start", nn.initializers.normal(0.02), (self.dim,))
    context = self.param("context", nn.initializers.normal(0.02), (self.num_context, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(start, (n, 1, self.dim)),
                         jnp.broadcast_to(context, (n, self.num_context, self.dim)), words], 1)
    mask = jnp.concatenate([jnp.ones((n, 1 + self.num_context), bool), word_mask], 1)
    pos = self.param("pos", nn.initializers.normal(0.02), (x.shape[1], self.dim))
    x = x + pos[None]
    for i in range(self.layers):
      x = TransformerLayer(self.dim, self.heads, self.dropout, name=f"layer{i}")(
          x, mask.astype(jnp.float32), train)
    return nn.Dense(self.out_dim, name="out")(nn.LayerNorm(name="ln")(x[:, 0]))


def a_weighted_attention(q_BxQxD, k_BxTxD, v_BxTxD, a_BxT, mask_BxT, gate: str = "logits"):
  """Eq. 14-15: softmax over the keys of (q k^T / sqrt(d)) * a_key, padded keys excluded.
  gate='probs' (the method's default, methods/mllm4wtal.py says why): the attention
  probabilities are weighted by a_key instead,
  softmax(q k^T / sqrt(d) + log a_key), so a key with a ~ 0 gets no weight."""
  d = q_BxQxD.shape[-1]
  logits = jnp.einsum("bqd,btd->bqt", q_BxQxD, k_BxTxD) / jnp.sqrt(jnp.float32(d))
  if gate == "probs":
    logits = logits + jnp.log(jnp.maximum(a_BxT, 1e-12))[:, None, :]
  else:
    logits = logits * a_BxT[:, None, :]
  logits = jnp.where(mask_BxT[:, None, :] > 0, logits, -1e30)
  return jnp.einsum("bqt,btd->bqd", jax.nn.softmax(logits, axis=-1), v_BxTxD)


class CSR(nn.Module):
  """Eq. 11-16: video features + masked description -> (A_CSR [B, T], word logits
  [B, L, V])."""
  dim: int
  vocab: int
  dropout: float
  gate: str = "logits"

  @nn.compact
  def __call__(self, feat_BxTxD, mask_BxT, tokens_BxL, masked_BxL, word_vectors_VxD,
               train: bool):
    """tokens_BxL=None: A_CSR alone (it reads no text; inference diagnostics)."""
    f = zero_padding(nn.Dense(self.dim, name="embed")(feat_BxTxD), mask_BxT)      # Eq. 12
    h = nn.relu(MaskedTemporalConv(self.dim // 2, 3, name="attn1")(f, mask_BxT))
    a_BxT = jax.nn.sigmoid(MaskedTemporalConv(1, 1, name="attn2")(h, mask_BxT)[..., 0])
    a_BxT = jnp.where(mask_BxT > 0, a_BxT, 0.0)                                   # Eq. 13
    if tokens_BxL is None:
      return a_BxT
    drop = nn.Dropout(self.dropout, deterministic=not train)
    f_fg = a_weighted_attention(nn.Dense(self.dim, name="wq")(f), nn.Dense(self.dim,
                                name="wk")(f), nn.Dense(self.dim, name="wv")(f), a_BxT,
                                mask_BxT, self.gate)                              # Eq. 14
    f_fg = drop(zero_padding(f_fg, mask_BxT))
    words = nn.Dense(self.dim, name="word_embed")(word_vectors_VxD[tokens_BxL])
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (self.dim,))
    words = jnp.where(masked_BxL[..., None], mask_token, words)
    pos = self.param("pos", nn.initializers.normal(0.02), (tokens_BxL.shape[1], self.dim))
    f_c = words + pos[None]
    hidden = a_weighted_attention(nn.Dense(self.dim, name="wqd")(f_c),
                                  nn.Dense(self.dim, name="wkd")(f_fg),
                                  nn.Dense(self.dim, name="wvd")(f_fg), a_BxT, mask_BxT,
                                  self.gate)
    hidden = nn.LayerNorm(name="ln")(drop(hidden) + f_c)                          # Eq. 15
    return a_BxT, nn.Dense(self.vocab, name="vocab")(hidden)                      # Eq. 16


class LocHead(nn.Module):
  """Eq. 18's head: per-snippet class logits [B, T, C] and (start, end) distances [B, T, 2]
  in snippets (softplus)."""
  num_classes: int
  hidden: int

  @nn.compact
  def __call__(self, feat_BxTxF, mask_BxT):
    h = nn.relu(MaskedTemporalConv(self.hidden, 3, name="conv1")(feat_BxTxF, mask_BxT))
    h = nn.relu(MaskedTemporalConv(self.hidden, 3, name="conv2")(h, mask_BxT))
    # Bias of the class logits at -log((1 - 0.01) / 0.01): focal-loss practice (RetinaNet,
    # ActionFormer), so that the background-heavy start is stable.
    logits = MaskedTemporalConv(self.num_classes, 1, name="cls")(h, mask_BxT) - 4.595
    dist = jax.nn.softplus(MaskedTemporalConv(2, 1, name="reg")(h, mask_BxT) + 1.0)
    return zero_padding(logits, mask_BxT), zero_padding(dist, mask_BxT)
