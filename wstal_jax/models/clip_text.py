"""CLIP's text transformer in Flax Linen, and the CoOp-style prompted class encoder of PVLR.

`ClipTextEncoder` is OpenAI CLIP's text tower (Radford et al. 2021, Sec. 2.4):
  x = E_tok[ids] + E_pos[:L]
  x = x + MHSA_causal(LN_1(x));  x = x + MLP(LN_2(x))        (pre-LN, `layers` times)
  h = LN_final(x)
  text = h[eot] @ W_proj                                      (no bias)
MLP = Dense(mlp_dim) -> act -> Dense(width) with act QuickGELU (x * sigmoid(1.702 x), OpenAI)
or GELU (open_clip / HF configs). LayerNorm eps 1e-5. The EOT position `eot` is the argmax of
the ids (OpenAI, and HF configs whose eos_token_id is 2) or the first position holding
`eot_token_id` (HF configs since transformers PR #24773).

`PromptedClassEncoder` (CoOp, Zhou et al. 2022; PVLR uses 4 + 4 context vectors) encodes C
class names with learnable context around each name:
  [SOS; ctx_pre (n_pre x D); word embeddings of the name; ctx_post (n_post x D); EOT; pad...]
at positions 0, 1.., and returns text_CxE. Class names are tokenized once on the host with
`tokenize_class_names` (numpy), never inside jit.

Parameter trees (what `init` returns under "params"; checkpoints converted by
`wstal_jax/models/clip_convert.py` fill the ClipTextEncoder tree):
  ClipTextEncoder:
    token_embedding/embedding          [vocab_size, D]
    positional_embedding               [context_length, D]
    resblocks_{i}/ln_1/{scale,bias}    [D]
    resblocks_{i}/attn/{q_proj,k_proj,v_proj,out_proj}/{kernel [D, D], bias [D]}
    resblocks_{i}/ln_2/{scale,bias}    [D]
    resblocks_{i}/mlp/c_fc/{kernel [D, F], bias [F]}
    resblocks_{i}/mlp/c_proj/{kernel [F, D], bias [D]}
    ln_final/{scale,bias}              [D]
    text_projection                    [D, E]
  PromptedClassEncoder:
    ctx_pre  [n_pre, D]      trainable
    ctx_post [n_post, D]     trainable
    clip/... the ClipTextEncoder tree above, frozen by the trainer (see `prompt_param_labels`)
"""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wstal_jax.errors import WstalError

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
POOLINGS = ("argmax", "eot_id")


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """Sizes and conventions of a CLIP text tower.

  Attributes:
    width: D, the residual width.
    layers: number of residual attention blocks.
    heads: attention heads (D must be a multiple).
    output_dim: E, columns of the text projection.
    vocab_size: rows of the token embedding (49408 for CLIP's BPE).
    context_length: rows of the positional embedding (77); inputs may be shorter.
    mlp_dim: F, hidden width of the MLP; None means 4 * width (every CLIP).
    activation: "quick_gelu" (OpenAI), "gelu" (exact erf; open_clip, some HF configs) or
      "gelu_tanh" (HF "gelu_new" / "gelu_pytorch_tanh").
    pooling: "argmax" (EOT = largest id, OpenAI) or "eot_id" (first `eot_token_id`, HF).
    sot_token_id, eot_token_id: <|startoftext|>, <|endoftext|> ids (49406, 49407).
    layer_norm_eps: 1e-5 as in CLIP.
  """
  width: int = 512
  layers: int = 12
  heads: int = 8
  output_dim: int = 512
  vocab_size: int = 49408
  context_length: int = 77
  mlp_dim: int | None = None
  activation: str = "quick_gelu"
  pooling: str = "argmax"
  sot_token_id: int = 49406
  eot_token_id: int = 49407
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    for name in ("width", "layers", "heads", "output_dim", "vocab_size", "context_length"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise WstalError(f"ClipTextConfig.{name} must be a positive int, got "
                         f"{getattr(self, name)!r}")
    if self.width % self.heads:
      raise WstalError(f"ClipTextConfig: width {self.width} is not a multiple of heads "
                       f"{self.heads}")
    if self.activation not in ACTIVATIONS:
      raise WstalError(f"ClipTextConfig.activation must be one of {ACTIVATIONS}, got "
                       f"{self.activation!r}")
    if self.pooling not in POOLINGS:
      raise WstalError(f"ClipTextConfig.pooling must be one of {POOLINGS}, got "
                       f"{self.pooling!r}")
    for name in ("sot_token_id", "eot_token_id"):
      if not 0 <= getattr(self, name) < self.vocab_size:
        raise WstalError(f"ClipTextConfig.{name}={getattr(self, name)} is outside the "
                         f"vocabulary (size {self.vocab_size})")

  @property
  def mlp_width(self) -> int:
    return 4 * self.width if self.mlp_dim is None else self.mlp_dim

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict, source: str = "ClipTextConfig") -> "ClipTextConfig":
    """Inverse of `to_dict`; `source` (e.g. a file name) goes into the error message."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise WstalError(f"{source}: unknown CLIP text config fields {unknown}")
    return cls(**d)


# OpenAI CLIP text towers (clip/model.py build_model: heads = width // 64, 12 layers).
CLIP_TEXT_PRESETS = {
    "RN50": ClipTextConfig(width=512, layers=12, heads=8, output_dim=1024),
    "RN101": ClipTextConfig(width=512, layers=12, heads=8, output_dim=512),
    "RN50x4": ClipTextConfig(width=640, layers=12, heads=10, output_dim=640),
    "RN50x16": ClipTextConfig(width=768, layers=12, heads=12, output_dim=768),
    "RN50x64": ClipTextConfig(width=1024, layers=12, heads=16, output_dim=1024),
    "ViT-B/32": ClipTextConfig(width=512, layers=12, heads=8, output_dim=512),
    "ViT-B/16": ClipTextConfig(width=512, layers=12, heads=8, output_dim=512),
    "ViT-L/14": ClipTextConfig(width=768, layers=12, heads=12, output_dim=768),
    "ViT-L/14@336px": ClipTextConfig(width=768, layers=12, heads=12, output_dim=768),
}


def clip_text_config(name: str) -> ClipTextConfig:
  """Preset by OpenAI model name ("RN50", "ViT-B/16", ...; "ViT-B-16" is accepted too)."""
  key = {k.replace("/", "-"): k for k in CLIP_TEXT_PRESETS}.get(name.replace("/", "-"))
  if key is None:
    raise WstalError(f"unknown CLIP text preset {name!r}; known: {sorted(CLIP_TEXT_PRESETS)}")
  return CLIP_TEXT_PRESETS[key]


def quick_gelu(x):
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name):
  if name == "quick_gelu":
    return quick_gelu
  return lambda x: jax.nn.gelu(x, approximate=(name == "gelu_tanh"))


class CausalSelfAttention(nn.Module):
  """Multi-head self attention with CLIP's causal mask: x_NxLxD -> y_NxLxD.

  Position q attends to positions k <= q, so a token never sees the tokens after it (and the
  EOT output never sees the padding).
  """
  width: int
  heads: int
  proj_std: float

  @nn.compact
  def __call__(self, x_NxLxD):
    n, l, d = x_NxLxD.shape
    dh = d // self.heads
    in_init = nn.initializers.normal(self.width ** -0.5)
    split = lambda y: y.reshape(n, l, self.heads, dh)  # noqa: E731
    q_NxLxHxK = split(nn.Dense(d, kernel_init=in_init, name="q_proj")(x_NxLxD))
    k_NxLxHxK = split(nn.Dense(d, kernel_init=in_init, name="k_proj")(x_NxLxD))
    v_NxLxHxK = split(nn.Dense(d, kernel_init=in_init, name="v_proj")(x_NxLxD))
    logits_NxHxLxL = jnp.einsum("nqhk,nphk->nhqp", q_NxLxHxK * dh ** -0.5, k_NxLxHxK)
    causal_LxL = jnp.tril(jnp.ones((l, l), bool))
    logits_NxHxLxL = jnp.where(causal_LxL, logits_NxHxLxL,
                               jnp.finfo(logits_NxHxLxL.dtype).min)
    attn_NxHxLxL = jax.nn.softmax(logits_NxHxLxL, axis=-1)
    y_NxLxD = jnp.einsum("nhqp,nphk->nqhk", attn_NxHxLxL, v_NxLxHxK).reshape(n, l, d)
    return nn.Dense(d, kernel_init=nn.initializers.normal(self.proj_std),
                    name="out_proj")(y_NxLxD)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x)). x_NxLxD -> x_NxLxD."""
  config: ClipTextConfig

  @nn.compact
  def __call__(self, x_NxLxD):
    c = self.config
    proj_std = c.width ** -0.5 * (2 * c.layers) ** -0.5
    h_NxLxD = nn.LayerNorm(epsilon=c.layer_norm_eps, name="ln_1")(x_NxLxD)
    x_NxLxD = x_NxLxD + CausalSelfAttention(c.width, c.heads, proj_std, name="attn")(h_NxLxD)
    h_NxLxD = nn.LayerNorm(epsilon=c.layer_norm_eps, name="ln_2")(x_NxLxD)
    x_NxLxD = x_NxLxD + _Mlp(c, proj_std, name="mlp")(h_NxLxD)
    return x_NxLxD


class _Mlp(nn.Module):
  config: ClipTextConfig
  proj_std: float

  @nn.compact
  def __call__(self, x_NxLxD):
    c = self.config
    h_NxLxF = nn.Dense(c.mlp_width, kernel_init=nn.initializers.normal((2 * c.width) ** -0.5),
                       name="c_fc")(x_NxLxD)
    h_NxLxF = _activation(c.activation)(h_NxLxF)
    return nn.Dense(c.width, kernel_init=nn.initializers.normal(self.proj_std),
                    name="c_proj")(h_NxLxF)


class ClipTextEncoder(nn.Module):
  """CLIP text tower: token_ids_NxL (L <= context_length) -> text_NxE (projected EOT state).

  Entry points (`apply(..., method=...)`):
    __call__(token_ids_NxL, return_hidden=False): text_NxE, or (text_NxE, hidden_NxLxD).
    embed_tokens(token_ids_NxL): word embeddings x_NxLxD (no positions).
    encode_embeddings(x_NxLxD, eot_index_N, return_hidden=False): the tower from word
      embeddings on, pooling at the given positions (what the prompted encoder uses).
    eot_index(token_ids_NxL): pooling positions per `config.pooling`.
  `hidden_NxLxD` is the final-LayerNorm output (HF's last_hidden_state).
  """
  config: ClipTextConfig

  def setup(self):
    c = self.config
    self.token_embedding = nn.Embed(c.vocab_size, c.width,
                                    embedding_init=nn.initializers.normal(0.02))
    self.positional_embedding = self.param("positional_embedding",
                                           nn.initializers.normal(0.01),
                                           (c.context_length, c.width))
    self.resblocks = [ResidualAttentionBlock(c) for _ in range(c.layers)]
    self.ln_final = nn.LayerNorm(epsilon=c.layer_norm_eps)
    self.text_projection = self.param("text_projection",
                                      nn.initializers.normal(c.width ** -0.5),
                                      (c.width, c.output_dim))

  def embed_tokens(self, token_ids_NxL):
    return self.token_embedding(token_ids_NxL)

  def eot_index(self, token_ids_NxL):
    if self.config.pooling == "argmax":
      return jnp.argmax(token_ids_NxL, axis=-1)
    return jnp.argmax(token_ids_NxL == self.config.eot_token_id, axis=-1)  # first occurrence

  def encode_embeddings(self, x_NxLxD, eot_index_N, return_hidden: bool = False):
    l = x_NxLxD.shape[1]
    if l > self.config.context_length:
      raise WstalError(f"token sequences of length {l} exceed the CLIP context length "
                       f"{self.config.context_length}")
    x_NxLxD = x_NxLxD + self.positional_embedding[None, :l]
    for block in self.resblocks:
      x_NxLxD = block(x_NxLxD)
    hidden_NxLxD = self.ln_final(x_NxLxD)
    pooled_NxD = jnp.take_along_axis(hidden_NxLxD, eot_index_N[:, None, None], axis=1)[:, 0]
    text_NxE = pooled_NxD @ self.text_projection
    return (text_NxE, hidden_NxLxD) if return_hidden else text_NxE

  def __call__(self, token_ids_NxL, return_hidden: bool = False):
    return self.encode_embeddings(self.embed_tokens(token_ids_NxL),
                                  self.eot_index(token_ids_NxL), return_hidden)


class PromptedClassEncoder(nn.Module):
  """CoOp prompt learning over a frozen CLIP text tower: class names -> text_CxE.

  Sequence of class c (length L = config.context_length), with a = 1 + n_pre, b = a + len_c:
    position 0: SOS | 1..a-1: ctx_pre | a..b-1: name tokens | b..b+n_post-1: ctx_post |
    b+n_post: EOT (the pooled position) | after: token 0 (CLIP's padding id)
  Context vectors replace word embeddings; positional embeddings are added as usual, so the
  name shifts right by n_pre. The sequence must fit: 1 + n_pre + len_c + n_post + 1 <= L,
  which `tokenize_class_names` checks on the host (inside jit a longer name would lose EOT).

  Attributes:
    config: the CLIP text tower's sizes.
    n_pre, n_post: context vectors before / after the name (PVLR: 4 and 4).
    ctx_init_std: std of the N(0, std^2) context initialisation (CoOp / PVLR: 0.01).
  Params: ctx_pre [n_pre, D], ctx_post [n_post, D], clip/... (ClipTextEncoder, to freeze).
  """
  config: ClipTextConfig
  n_pre: int = 4
  n_post: int = 4
  ctx_init_std: float = 0.01

  def setup(self):
    init = nn.initializers.normal(self.ctx_init_std)
    self.clip = ClipTextEncoder(self.config)
    self.ctx_pre = self.param("ctx_pre", init, (self.n_pre, self.config.width))
    self.ctx_post = self.param("ctx_post", init, (self.n_post, self.config.width))

  def prompt_embeddings(self, name_ids_CxM, name_len_C):
    """-> (x_CxLxD word/context embeddings without positions, eot_index_C, token_ids_CxL).

    token_ids_CxL holds the ids at non-context positions (0 at context positions).
    """
    c = self.config
    l = c.context_length
    num_classes, m = name_ids_CxM.shape
    p_1xL = jnp.arange(l)[None, :]
    a = 1 + self.n_pre
    b_Cx1 = a + name_len_C[:, None]
    eot_Cx1 = b_Cx1 + self.n_post
    is_name_CxL = (p_1xL >= a) & (p_1xL < b_Cx1)
    name_tok_CxL = jnp.take_along_axis(name_ids_CxM, jnp.clip(p_1xL - a, 0, m - 1)
                                       .repeat(num_classes, axis=0), axis=1)
    ids_CxL = jnp.where(is_name_CxL, name_tok_CxL, 0)
    ids_CxL = jnp.where(p_1xL == 0, c.sot_token_id, ids_CxL)
    ids_CxL = jnp.where(p_1xL == eot_Cx1, c.eot_token_id, ids_CxL)
    x_CxLxD = self.clip.embed_tokens(ids_CxL)
    n_ctx = self.n_pre + self.n_post
    if n_ctx:
      ctx_KxD = jnp.concatenate([self.ctx_pre, self.ctx_post], axis=0).astype(x_CxLxD.dtype)
      is_pre_CxL = (p_1xL >= 1) & (p_1xL < a)
      is_post_CxL = (p_1xL >= b_Cx1) & (p_1xL < eot_Cx1)
      slot_CxL = jnp.where(is_pre_CxL, p_1xL - 1, self.n_pre + p_1xL - b_Cx1)
      ctx_CxLxD = ctx_KxD[jnp.clip(slot_CxL, 0, n_ctx - 1)]
      x_CxLxD = jnp.where((is_pre_CxL | is_post_CxL)[:, :, None], ctx_CxLxD, x_CxLxD)
    return x_CxLxD, jnp.minimum(eot_Cx1[:, 0], l - 1), ids_CxL

  def __call__(self, name_ids_CxM, name_len_C, return_hidden: bool = False):
    """name_ids_CxM int [C, M] (0-padded name tokens, no SOS/EOT), name_len_C int [C]
    (from `tokenize_class_names`) -> text_CxE, or (text_CxE, hidden_CxLxD)."""
    x_CxLxD, eot_C, _ = self.prompt_embeddings(name_ids_CxM, name_len_C)
    return self.clip.encode_embeddings(x_CxLxD, eot_C, return_hidden)


def split_camel_case(name: str) -> str:
  """Class id -> words: "BaseballPitch" -> "baseball pitch", "Clean_and_Jerk" -> likewise."""
  words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
  return " ".join(words.replace("_", " ").split()).lower()


def tokenize_class_names(class_texts, tokenizer=None, *, n_pre: int = 4, n_post: int = 4,
                         context_length: int = 77):
  """Tokenizes C class names once, on the host, for `PromptedClassEncoder`.

  Args:
    class_texts: C strings as they should be read ("baseball pitch"; see `split_camel_case`).
    tokenizer: a `clip_tokenizer.ClipTokenizer` (default: a new one with the default vocab).
    n_pre, n_post, context_length: the prompted encoder's, to check that every prompt fits.
  Returns:
    name_ids_CxM int32 (0-padded, M = the longest name), name_len_C int32.
  Raises:
    WstalError: a name with no tokens, or one whose prompt exceeds the context length.
  """
  if tokenizer is None:
    from wstal_jax.models import clip_tokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = clip_tokenizer.ClipTokenizer()
  encoded = [tokenizer.encode(t) for t in class_texts]
  room = context_length - 2 - n_pre - n_post
  for text, ids in zip(class_texts, encoded):
    if not ids:
      raise WstalError(f"class name {text!r} has no tokens")
    if len(ids) > room:
      raise WstalError(f"class name {text!r} is {len(ids)} tokens; with SOS, EOT and "
                       f"{n_pre}+{n_post} context vectors only {room} fit in "
                       f"{context_length} positions")
  m = max((len(ids) for ids in encoded), default=1)
  name_ids_CxM = np.zeros((len(encoded), m), np.int32)
  for i, ids in enumerate(encoded):
    name_ids_CxM[i, :len(ids)] = ids
  return name_ids_CxM, np.array([len(ids) for ids in encoded], np.int32)


def init_prompt_params(rng, model: PromptedClassEncoder, clip_params):
  """`model`'s params around already converted CLIP params, drawing only the context vectors.

  Cheaper than `model.init` (which draws a whole random CLIP tower only to discard it):
  ctx_pre / ctx_post ~ N(0, ctx_init_std^2), clip = clip_params (not copied).
  """
  k_pre, k_post = jax.random.split(rng)
  d = model.config.width
  return {"ctx_pre": model.ctx_init_std * jax.random.normal(k_pre, (model.n_pre, d)),
          "ctx_post": model.ctx_init_std * jax.random.normal(k_post, (model.n_post, d)),
          "clip": clip_params}


def prompt_param_labels(params):
  """Labels for optax.multi_transform: "frozen" for the clip/ subtree, "trainable" otherwise.

  Usage: optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
  prompt_param_labels(params)). Accepts the tree with or without the outer "params" key.
  """
  def label(path, _):
    keys = [getattr(k, "key", None) for k in path]
    return "frozen" if "clip" in keys else "trainable"
  return jax.tree_util.tree_map_with_path(label, params)
