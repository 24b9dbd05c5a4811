"""Flax Linen modules of PVLR (pvlr.txt Sec. 3.2): probabilistic adapters and P-CAS.

`PVLRModel` = the CO2-Net trunk (`models/co2net.py`, Eq. 1-2) + probabilistic adapters on
X_B (Eq. 7) + class text embeddings (Eq. 9) + P-CAS (Eq. 10). Outputs, besides the trunk's:

  mu_BxTxE       g_mu(X_B), a linear layer: the Gaussian's mean (Eq. 7)
  var_BxTxE      g_Sigma(X_B) = ReLU(linear): the diagonal covariance (Eq. 7)
  text_CxE       x_c, the C class text embeddings (Eq. 9)
  pcas_BxTxC1    S_prob over C classes + the learnable background vector (Eq. 10)

P-CAS (Eq. 10): s(t, c) = (1/K) sum_k cos(x_c, z_t^(k)) / tau with z = mu + eps * sqrt(Sigma)
* eps_std, eps ~ N(0, I) (Eq. 8). Readings: Eq. 7 makes g_Sigma a covariance, so a sample's
standard deviation is sqrt(g_Sigma) (Eq. 8's "eps * g_Sigma" read as the usual
reparameterisation; eps_std = 1 is the paper's unit Gaussian; the authors' public code uses
eps_std 0.005 with exp(Sigma / 2)). At evaluation, and with num_samples = 0 (Table 4's
"deterministic CAS", Table 5's K = 0), P-CAS is cos(x_c, mu_t) / tau: "we computed the action
confidence score using the estimated mean without utilizing the reparameterization strategy"
(Sec. 4.1). The background class is a learnable vector in the embedding space (Sec. 4.2).

Class text embeddings (Eq. 9), two modes:
* 'clip': a frozen CLIP text transformer over [SOS; 4 learnable vectors; the class name's word
  embeddings; 4 learnable vectors; EOT] (`models/clip_text.PromptedClassEncoder`). The frozen
  weights are not parameters of this model: the method passes them as constants and merges
  them at apply time (`clip_params`), so checkpoints hold only what trains.
* 'precomputed' (no CLIP checkpoint, e.g. the built-in benchmark): the dataset's class text
  embeddings e_c in the image features' space plus a learnable offset per class,
  x_c = e_c + d_c, d_c ~ N(0, 0.01^2) at init (CoOp's class-specific-context variant, in the
  embedding space). A shared offset, the literal analogue of the 4 + 4 shared context
  vectors, was tried first and fails without an encoder between it and x_c: one vector added
  to every class makes the classes alike as it grows (measured on the built-in benchmark:
  video accuracy at chance after 400 steps), whereas CLIP's transformer mixes the shared
  context with each name. The choice is logged at start-up.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from wstal_jax.models import co2net
from wstal_jax.layers import l2_normalize

TEXT_MODES = ("precomputed", "clip")


def sample_std(var, var_param: str):
  """The standard deviation of a sample around mu: sqrt(var) (Eq. 8 with Eq. 7's covariance),
  or exp(var / 2) with var_param='code' (the authors' release reads the ReLU output as a
  log-variance when sampling, and as the variance in the divergences)."""
  if var_param == "code":   # clamped: exp of an unbounded ReLU output overflows past ~177
    return jnp.exp(0.5 * jnp.minimum(var, 20.0))
  return jnp.sqrt(var + 1e-8)


class PrecomputedClassText(nn.Module):
  """x_c = e_c + d_c, d_c learnable, N(0, init_std^2) (module docstring, 'precomputed')."""
  init_std: float = 0.01

  @nn.compact
  def __call__(self, text_CxE):
    offsets_CxE = self.param("offsets", nn.initializers.normal(self.init_std), text_CxE.shape)
    return text_CxE + offsets_CxE


class PVLRModel(nn.Module):
  """See the module docstring. `clip_config` is the CLIP text tower's `ClipTextConfig` in
  'clip' mode (a PromptedClassEncoder, params under text/...), None in 'precomputed' mode."""
  num_classes: int
  rgb_dim: int
  embed_dim: int
  attn_hidden: int = 512
  dropout: float = 0.7
  attn_dropout: float = 0.5
  num_samples: int = 20
  eps_std: float = 1.0
  temperature: float = 0.03
  text_mode: str = "precomputed"
  clip_config: object = None
  n_pre: int = 4
  n_post: int = 4
  var_param: str = "relu"       # 'relu' (Eq. 7 literally) | 'softplus' (small-variance init)
                                # | 'code' (the authors' release: ReLU output used as the
                                # variance in the divergences but as a log-variance when
                                # sampling, std = exp(v / 2))
  var_init: float = 0.01        # softplus: the variance at a zero pre-activation
  logit_scale: str = "fixed"    # 'fixed' 1 / tau | 'learnable' (CLIP's, init 1 / tau)
  max_logit_scale: float = 100.0
  train_similarity: str = "cosine"  # training P-CAS: 'cosine' / tau (Eq. 10) or 'dot':
                                    # z . x_c / dot_divisor (the authors' released training)
  dot_divisor: float = 8.0
  adapter_init: str = "flax"    # g_mu / g_Sigma init: 'flax' (lecun-normal kernel, zero bias)
                                # or 'torch' (nn.Linear's default, U(+-1/sqrt(fan_in)) for
                                # kernel and bias: the authors' release)
  background_init: str = "small"  # learnable background vector: 'small' N(0, 0.01^2) or 'unit'
                                # N(0, 1/E), norm ~1 like a CLIP text feature (the release's
                                # background is a CLIP-encoded token; it matters for raw 'dot')
  dot_text_norm: bool = True    # 'dot': L2-normalise the class / background vectors (ours) or
                                # use them raw (the authors' release)

  @nn.compact
  def __call__(self, batch, consts, *, train: bool):
    mask_BxT = batch["mask_BxT"]
    valid_BxTx1 = mask_BxT[:, :, None] > 0
    out = co2net.CO2NetTrunk(self.rgb_dim, self.attn_hidden, self.dropout,
                             self.attn_dropout, name="trunk")(
        batch["feat_BxTxD"], mask_BxT, train=train)
    x = nn.Dropout(self.dropout, deterministic=not train)(out["base_BxTxF"])
    dense = {}
    if self.adapter_init == "torch":   # torch.nn.Linear: kaiming_uniform(a=sqrt(5)) + U bias
      bound = 1.0 / math.sqrt(x.shape[-1])
      dense = {"kernel_init": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
               "bias_init": lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                   key, shape, dtype, -bound, bound)}
    mu = nn.Dense(self.embed_dim, name="g_mu", **dense)(x)
    pre_var = nn.Dense(self.embed_dim, name="g_sigma", **dense)(x)
    if self.var_param == "softplus":
      # softplus(h + b) with softplus(b) = var_init: smooth, never dead, and sqrt(var) has a
      # bounded gradient; the samples start close to their mean (review finding 3).
      offset = math.log(math.expm1(self.var_init))
      var = nn.softplus(pre_var + offset)
    else:
      var = nn.relu(pre_var)
    out["mu_BxTxE"] = jnp.where(valid_BxTx1, mu, 0.0)
    out["var_BxTxE"] = jnp.where(valid_BxTx1, var, 0.0)

    if self.text_mode == "clip":
      from wstal_jax.models import clip_text  # pylint: disable=import-outside-toplevel
      encoder = clip_text.PromptedClassEncoder(self.clip_config, n_pre=self.n_pre,
                                               n_post=self.n_post, name="text")
      text_CxE = encoder(consts["class_name_ids_CxM"], consts["class_name_len_C"])
    else:
      text_CxE = PrecomputedClassText(name="text")(consts["text_CxE"])
    out["text_CxE"] = text_CxE
    bg_std = (1.0 / math.sqrt(text_CxE.shape[-1]) if self.background_init == "unit" else 0.01)
    bg_E = self.param("background", nn.initializers.normal(bg_std), (text_CxE.shape[-1],))
    raw_C1xE = jnp.concatenate([text_CxE, bg_E[None]], axis=0)
    out["classes_C1xE"] = raw_C1xE
    classes_C1xE = l2_normalize(raw_C1xE)

    dot = train and self.train_similarity == "dot"
    if dot and not self.dot_text_norm:
      classes_C1xE = raw_C1xE
    if train and self.num_samples > 0:
      eps_BxTxKxE = jax.random.normal(self.make_rng("sample"),
                                      mu.shape[:2] + (self.num_samples, mu.shape[-1]))
      std = sample_std(var, self.var_param)
      z = mu[:, :, None, :] + self.eps_std * eps_BxTxKxE * std[:, :, None, :]
      sim_BxTxC1 = jnp.mean(jnp.einsum("btke,ce->btkc", z if dot else l2_normalize(z),
                                       classes_C1xE), axis=2)
    else:
      sim_BxTxC1 = jnp.einsum("bte,ce->btc", mu if dot else l2_normalize(mu), classes_C1xE)
    if dot:   # review finding 2: |mu| can restore the margin L_kd's direction takes away
      out["pcas_BxTxC1"] = jnp.where(valid_BxTx1, sim_BxTxC1 / self.dot_divisor, 0.0)
      return out
    if self.logit_scale == "learnable":
      # CLIP's learnable logit scale: exp(s), s initialised at log(1 / tau), clamped at
      # max_logit_scale (review finding 1: a fixed tau cannot sharpen near-collinear classes).
      log_scale = self.param("log_logit_scale", nn.initializers.constant(
          -math.log(self.temperature)), ())
      scale = jnp.minimum(jnp.exp(log_scale), self.max_logit_scale)
      out["logit_scale"] = scale
      out["pcas_BxTxC1"] = jnp.where(valid_BxTx1, sim_BxTxC1 * scale, 0.0)
    else:
      out["pcas_BxTxC1"] = jnp.where(valid_BxTx1, sim_BxTxC1 / self.temperature, 0.0)
    return out
