"""Checkpoints of a training run: the only module that imports orbax.

Layout: `WORKDIR/checkpoints/<step>/` holds three orbax items:
  state    the train state pytree {'step', 'params', 'opt_state'} (sharded arrays)
  meta     small JSON: phase index, config name, ... (whatever the trainer wants to check)
  metrics  JSON written by orbax when a step was evaluated; ranks the best checkpoint

Which steps survive: the latest `keep_latest` (so a run can always resume) and the best
`keep_best` by `best_metric` (higher is better). A checkpoint saved without metrics (a
SIGTERM save between evaluations) is kept only while it is among the latest.
"""
from __future__ import annotations

import logging as pylogging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from wstal_jax.errors import WstalError

_cm = ocp.checkpoint_managers


class _ExpectedWarnings(pylogging.Filter):
  """Orbax warnings about what this module does on purpose: saves between evaluations
  (SIGTERM, checkpoint_every) carry no metrics; evaluation opens the directory read-only."""
  _EXPECTED = ("did not provide metrics", "read_only=True, setting",
               "Given directory is read only")

  def filter(self, record):
    message = record.getMessage()
    return not any(text in message for text in self._EXPECTED)


pylogging.getLogger("absl").addFilter(_ExpectedWarnings())


class Checkpoints:
  """CheckpointManager with "latest N + best by metric" preservation.

  `read_only=True` is for evaluation: it never creates, deletes or cleans anything.
  Saves are asynchronous by default: `save` returns once the arrays are copied off the
  device (so the trainer may donate them), the files are written in the background and
  committed by an atomic rename; call `wait()` before reading them back or exiting.
  """

  def __init__(self, directory: str, *, keep_latest: int = 2, keep_best: int = 1,
               best_metric: str = "average_mAP", read_only: bool = False,
               async_save: bool = True):
    if keep_latest < 1:
      raise WstalError(f"checkpoint.keep_latest must be >= 1 (got {keep_latest}): the latest "
                       "checkpoint is what a re-run resumes from")
    if read_only and not _exists(directory):
      raise WstalError(f"{directory}: no checkpoints here (was the run trained with this "
                       "--workdir?)")
    self.directory = directory
    self.best_metric = best_metric
    metric_fn = lambda metrics: float(metrics[best_metric])
    policy = _cm.AnyPreservationPolicy([
        _cm.LatestN(n=keep_latest),
        _cm.BestN(get_metric_fn=metric_fn, reverse=False, n=keep_best,
                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        # best_fn makes orbax store the metrics with each step and rank them in best_step();
        # the preservation policy above ranks the same way (ties: the later step wins).
        best_fn=metric_fn, best_mode="max",
        read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save and not read_only)
    self._manager = ocp.CheckpointManager(directory, options=options)

  # Queries -------------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest `best_metric`; None if no saved step has metrics."""
    ranked = [s for s in self.all_steps() if self.metrics(s) is not None]
    if not ranked:
      return None
    return self._manager.best_step()

  def metrics(self, step: int) -> dict | None:
    return self._manager.metrics(step)

  def resolve(self, which: str | int) -> int:
    """'best' | 'latest' | a step number -> an existing step; WstalError otherwise."""
    steps = self.all_steps()
    if not steps:
      raise WstalError(f"{self.directory}: no checkpoints here")
    if which == "latest":
      return steps[-1]
    if which == "best":
      step = self.best_step()
      if step is None:
        raise WstalError(f"{self.directory}: no evaluated checkpoint to call 'best' "
                         f"(steps present: {steps}); use --checkpoint=latest")
      return step
    try:
      step = int(which)
    except (TypeError, ValueError):
      raise WstalError(f"--checkpoint must be best, latest or a step number, got {which!r}")
    if step not in steps:
      raise WstalError(f"{self.directory}: no checkpoint for step {step} (present: {steps})")
    return step

  # Save / restore ------------------------------------------------------------------------------

  def save(self, step: int, state: Any, *, meta: dict, metrics: dict | None = None) -> bool:
    """Saves `state` (a pytree of jax arrays) at `step`; returns False if it already exists."""
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
    self._manager.save(step, args=args, metrics=metrics, force=True)
    return True

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores the full state into `abstract_state` (ShapeDtypeStructs carrying shardings)."""
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
        meta=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except (ValueError, KeyError) as e:
      raise WstalError(f"{self.directory}/{step}: checkpoint does not fit this model/optimizer "
                       f"({type(e).__name__}: {_first_line(e)}); was it written with a "
                       "different config?") from e
    return restored["state"], dict(restored["meta"])

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only state['params'] (evaluation needs no optimizer state)."""
    target = {"params": abstract_params}
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    try:
      restored = self._manager.restore(step, args=args)
    except (ValueError, KeyError) as e:
      raise WstalError(f"{self.directory}/{step}: checkpoint parameters do not fit this model "
                       f"({type(e).__name__}: {_first_line(e)}); was it written with a "
                       "different config?") from e
    return restored["state"]["params"]

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed with `sharding`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _exists(path: str) -> bool:
  if "://" in path:
    from etils import epath  # orbax's own path layer, present wherever orbax is
    return epath.Path(path).exists()
  return os.path.isdir(path)


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ""


