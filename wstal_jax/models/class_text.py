"""Class text for the CLIP-based methods (PVLR, Ju et al.): where it comes from, one place.

Two modes (`resolve`):
* 'clip' (a CLIP checkpoint is configured): the frozen CLIP text transformer over
  [SOS; n_pre learnable vectors; the class name's tokens; n_post learnable vectors; EOT]
  (`models/clip_text.PromptedClassEncoder`). The frozen weights are not parameters: they travel
  as the constant `clip_text_params` and are merged at apply time (`variables`), so
  checkpoints hold only what trains (`strip_frozen` after init).
* 'precomputed' (no checkpoint, e.g. the built-in benchmark): the dataset's class text
  embeddings + a learnable offset per class (`models/pvlr.PrecomputedClassText`).
The choice is logged at start-up.
"""
import dataclasses

from absl import logging
import numpy as np

from wstal_jax.errors import WstalError

TEXT_MODES = ("precomputed", "clip")


@dataclasses.dataclass
class ClassText:
  """The resolved class-text source of one method.

  mode: 'clip' | 'precomputed'; clip_config: the CLIP text config ('clip'); dim: the text
  embedding size; consts: the constants the mode needs (token ids, frozen weights); names:
  the class prompts' names ('clip'); scope: the path of the text module in the params tree.
  """
  mode: str
  clip_config: object
  dim: int
  consts: dict
  names: list
  scope: tuple

  def variables(self, params, consts) -> dict:
    """{'params': params} with the frozen CLIP weights merged in under scope/'clip'."""
    if self.mode != "clip":
      return {"params": params}
    return {"params": _with_subtree(params, self.scope + ("clip",),
                                    consts["clip_text_params"])}

  def strip_frozen(self, params) -> dict:
    """params without scope/'clip' (what `init` returns in 'clip' mode)."""
    if self.mode != "clip":
      return params
    return _with_subtree(params, self.scope + ("clip",), None)


def _with_subtree(tree, path, value):
  """A copy of nested dict `tree` with tree[path] = value (removed when value is None)."""
  tree = dict(tree)
  if len(path) == 1:
    if value is None:
      tree.pop(path[0], None)
    else:
      tree[path[0]] = value
    return tree
  tree[path[0]] = _with_subtree(tree[path[0]], path[1:], value)
  return tree


def resolve(method: str, cfg, class_names, num_classes: int, dims: dict,
            scope: tuple) -> ClassText:
  """The class text of `method` from its config block `cfg` (text_mode, clip_checkpoint,
  clip_bpe_vocab, class_names, n_ctx_pre, n_ctx_post): a WstalError for anything missing."""
  mode = cfg.text_mode
  if mode == "auto":
    mode = "clip" if cfg.clip_checkpoint else "precomputed"
  if mode not in TEXT_MODES:
    raise WstalError(f"config.{method}.text_mode={mode!r}: choose 'auto' or one of {TEXT_MODES}")
  if mode == "clip":
    return _resolve_clip(method, cfg, class_names, num_classes, scope)
  logging.info("%s: no CLIP checkpoint (config.%s.clip_checkpoint): class text = the dataset's "
               "class text embeddings + a learnable offset per class (models/pvlr.py, "
               "'precomputed')", method, method)
  dim = dims.get("text")
  if not dim:
    raise WstalError(
        f"{method}: text_mode='precomputed' needs class text embeddings in the CLIP image "
        "space (the dataset's text_embeddings_<feature>.npy or text_embeddings.npy); or set "
        f"config.{method}.clip_checkpoint to encode the class names with CLIP")
  return ClassText("precomputed", None, int(dim), {}, [], tuple(scope))


def _resolve_clip(method, cfg, class_names, num_classes, scope):
  # pylint: disable=import-outside-toplevel
  from wstal_jax.models import clip_convert, clip_text, clip_tokenizer
  params, clip_config = clip_convert.load_clip_text(cfg.clip_checkpoint)
  if cfg.class_names:
    names = [n.strip() for n in str(cfg.class_names).split(",")]
  elif class_names:
    names = [clip_text.split_camel_case(n) for n in class_names]
  else:
    raise WstalError(f"{method}: text_mode='clip' needs class names (the dataset's, or "
                     f"config.{method}.class_names)")
  if len(names) != num_classes:
    raise WstalError(f"config.{method}.class_names has {len(names)} names; the dataset has "
                     f"{num_classes} classes")
  tok = clip_tokenizer.ClipTokenizer(cfg.clip_bpe_vocab) if cfg.clip_bpe_vocab \
      else clip_tokenizer.ClipTokenizer()
  n_pre, n_post = int(cfg.n_ctx_pre), int(cfg.n_ctx_post)
  ids, lens = clip_text.tokenize_class_names(names, tok, n_pre=n_pre, n_post=n_post,
                                             context_length=clip_config.context_length)
  # Causal attention: the pooled EOT state never sees later positions, so the prompts are
  # encoded in the shortest context that holds them (identical outputs; less work).
  needed = 1 + n_pre + int(np.max(lens)) + n_post + 1
  if needed > clip_config.context_length:
    raise WstalError(f"config.{method}: {n_pre} + {n_post} prompt vectors and the longest "
                     f"class name need {needed} tokens; CLIP's context is "
                     f"{clip_config.context_length}")
  clip_config = dataclasses.replace(clip_config, context_length=needed)
  params = dict(params)
  params["positional_embedding"] = np.asarray(params["positional_embedding"])[:needed]
  consts = {"class_name_ids_CxM": np.asarray(ids), "class_name_len_C": np.asarray(lens),
            "clip_text_params": params}
  logging.info("%s: class text from the CLIP text encoder %s (%s, %d layers, %d-d), "
               "tokenizer %s, prompts %r", method, cfg.clip_checkpoint, clip_config.activation,
               clip_config.layers, clip_config.output_dim, tok.backend,
               [f"X*{n_pre} {n} X*{n_post}" for n in names[:3]])
  return ClassText("clip", clip_config, int(clip_config.output_dim), consts, names,
                   tuple(scope))
