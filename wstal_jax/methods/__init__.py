"""Methods: the contract every method implements, and the table of methods.

A method is one file `wstal_jax/methods/<name>.py` with a class implementing `Method`, plus
one row in `REGISTRY` and its recipe `configs/<name>.py`. The trainer, the evaluator and the
benchmarks only talk to a method through `Method`; `get_method(config, ...)` builds the one
`config.method` names.

Shared masked ops (top-k, temporal means and softmaxes, L2 normalisation, the masked temporal
conv) live in `wstal_jax/layers.py`; a method imports another method's file only when it
builds on it (PVLR on CO2-Net).
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Protocol, runtime_checkable

import ml_collections

from wstal_jax.errors import WstalError

# config.method -> "module:Class" under wstal_jax.methods (imported on first use).
REGISTRY = {
    "base": "vlpo:Baseline",      # VLPO's MIL + actionness baseline (vlpo.txt Eq. 2)
    "vlpo": "vlpo:VLPO",          # VLPO (vlpo.txt), the main method
    "co2net": "co2net:CO2Net",    # CO2-Net (Hong et al. 2021), PVLR's base
    "pvlr": "pvlr:PVLR",          # PVLR (pvlr.txt) on CO2-Net
    "ju2023": "ju2023:Ju2023",    # Ju et al. 2023 (ju2023_distill_vlp.txt): CBP + VLP branches
    "delu": "delu:DELU",          # DELU (Chen et al. 2022) on CO2-Net, MLLM4WTAL's base
    "mllm4wtal": "mllm4wtal:MLLM4WTAL",  # MLLM4WTAL (mllm4wtal.txt) on DELU / CO2-Net
    "pmil": "pmil:PMIL",          # P-MIL (Ren et al. 2023) on candidate proposals, SEAL's base
    "seal": "seal:SEAL",          # SEAL (seal.txt) on P-MIL's fused network
}
METHODS = tuple(REGISTRY)


@runtime_checkable
class Method(Protocol):
  """What the trainer and the evaluator call. Every function is pure and jittable except
  `__init__` and `extra_consts`; `batch` is a dict of the input pipeline's arrays
  (docs/ARCHITECTURE.md "Batches"), `consts` the replicated constants (`text_CxE` when the
  dataset has class text embeddings, plus `extra_consts()`).

  postprocess_preset: the `postprocess.get_preset` name turning `predict`'s scores into
    proposals ('vlpo' or 'co2net').
  phase_starts: (0, s1, ...): the steps at which a training phase starts; at each the
    trainer asks `param_labels(params, start)` and builds a fresh optimizer. (0,) = one phase.
  Optional `static_phase = True`: the trainer (which compiles one step per phase) calls
    `loss(..., step, phase=i)` with the phase index i as a Python int, so the loss can compute
    only what phase i needs; called without `phase` (tests, tools) it must select by `step`.
  Optional `phase_lr_scale(start) -> float`: the phase starting at `start` trains with
    config.optim.lr times this (1 when the method has no such function).
  """
  postprocess_preset: str
  phase_starts: tuple[int, ...]

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               dims: dict[str, int | None], class_names: list[str] | None = None):
    """config: the whole experiment config (the method reads its own block, config.<name>);
    dims: {'feat': D, 'vlm': E or None, 'text': E or None}. Bad settings: WstalError."""

  def init(self, rng, batch: dict, consts: dict) -> dict:
    """-> flax variables {'params': ...}; shapes from `batch`."""

  def loss(self, params, batch: dict, consts: dict, rng, step) -> tuple[Any, dict]:
    """-> (total loss, aux): aux holds every weighted term the total sums (l_mil, ...), so
    the trainer logs each term's share of the total."""

  def predict(self, params, batch: dict, consts: dict) -> dict:
    """-> video_scores_BxC (video-level class probabilities), cas_BxTxC (per-class sequence
    the post-processing thresholds and scores), optionally actionness_BxT and oic_scores_BxC
    (the OIC gamma term's scores when they are not video_scores_BxC); 0 on padding."""

  # Optional, for exact chunked evaluation (eval_forward.py; VLPO and its baseline):
  # `receptive_field` (snippets on each side any per-snippet network output reads),
  # `snippet_outputs(params, batch, consts)` (the network: dict of [B, T, ...]) and
  # `predict_from_outputs(outputs, batch, consts)` (the per-video scoring), with
  # predict == predict_from_outputs(snippet_outputs(...)). Global-context networks omit them.

  def param_labels(self, params, step: int):
    """-> pytree like params of 'train' / 'freeze' for the phase starting at `step`."""

  def extra_consts(self) -> dict:
    """Constants the method brings (frozen weights, token ids); {} for most methods.
    Optional `dataset_consts(data_dir, video_indices) -> dict`: constants computed from the
    training split (`video_indices`: the training videos that train, None = all; SEAL's
    descriptors); run_setup adds them."""

  def loss_weights(self) -> dict[str, float]:
    """{aux term: weight} with loss == sum(weight * aux[term]) (the terms the total sums);
    the trainer logs each weighted term's share of the total, so a term that never acts is
    visible (tests/test_methods.py checks the identity on every method)."""


def method_class(name: str) -> type:
  """The class registered as `name` (WstalError for an unknown name)."""
  if name not in REGISTRY:
    raise WstalError(f"config.method={name!r}: unknown method; choose one of {METHODS}")
  module_name, class_name = REGISTRY[name].split(":")
  module = importlib.import_module(f"wstal_jax.methods.{module_name}")
  return getattr(module, class_name)


def get_method(config, num_classes: int, dims: dict[str, int], class_names=None) -> Method:
  """The method object for `config.method` (see `Method.__init__` for the arguments)."""
  name = config.get("method") if hasattr(config, "get") else getattr(config, "method", None)
  return method_class(name)(config, num_classes, dims, class_names=class_names)


def config_block(config, name: str, default_config,
                 legacy: dict | None = None) -> ml_collections.ConfigDict:
  """A copy of config.<name>, or `default_config()` when the config has no such block.

  Fields the block lacks (a run directory written before the field existed) take
  `legacy[field]`, the behaviour before the field was added, where the method gives one,
  else the default; a field the defaults do not know is a typo: one clear error."""
  block = config.get(name) if name in config else None
  defaults = default_config()
  if block is None:
    return defaults
  out = ml_collections.ConfigDict(block)
  unknown = sorted(set(out.keys()) - set(defaults.keys()))
  if unknown:
    close = {k: difflib.get_close_matches(k, list(defaults.keys()), n=1) for k in unknown}
    hint = "; ".join(f"config.{name}.{k}" + (f" (did you mean {close[k][0]!r}?)"
                                             if close[k] else "") for k in unknown)
    raise WstalError(f"unknown config field(s): {hint}")
  with out.unlocked():
    for key in defaults.keys():
      if key not in out:
        out[key] = (legacy or {}).get(key, defaults[key])
  return out
