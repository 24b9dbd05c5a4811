"""Checkpoints of a training run: the only module that imports orbax.

Layout: `WORKDIR/checkpoints/<step>/` holds three orbax items:
  state    the train state pytree {'step', 'params', 'opt_state'} (sharded arrays)
  meta     small JSON: phase index, config name, ... (whatever the trainer wants to check)
  metrics  JSON written by orbax when a step was evaluated; ranks the best checkpoint

Which steps survive: the latest `keep_latest` (so a run can always resume) and the best
`keep_best` by `best_metric` (higher is better). A checkpoint saved without metrics (a
SIGTERM save between evaluations) is kept only while it is among the latest.

Damaged checkpoints (a killed copy, a quota hit, deleted files on a shared filesystem or an
object store): a resumed run restores the newest checkpoint that restores (`restore_newest`)
and sets the damaged ones aside, renamed `<step>.damaged` (deleted on gs:// and other object
stores, which cannot rename a folder), so that training re-creates them; a damaged metrics
file is set aside the same way when a run opens the folder. Evaluation (read-only) reports a
damaged checkpoint with the steps that are present.
"""
from __future__ import annotations

import json
import logging as pylogging
import os
from typing import Any, Callable

from absl import logging
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

# What orbax / tensorstore raise for a checkpoint that cannot be read back: ValueError
# (tensorstore's DATA_LOSS / NOT_FOUND / OUT_OF_RANGE, JSON decoding, a tree that no longer
# matches), KeyError, OSError (FileNotFoundError), TypeError.
_READ_ERRORS = (ValueError, KeyError, OSError, TypeError)
# tensorstore's status codes for files that are missing, cut short or corrupt.
_DAMAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "INTERNAL")
DAMAGED_SUFFIX = ".damaged"


class CheckpointUnreadable(WstalError):
  """A checkpoint that cannot be restored into the requested state."""


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
    self.read_only = read_only
    damaged = _damaged_metrics(directory) if _exists(directory) else {}
    if damaged and read_only:
      step, why = min(damaged.items())
      raise WstalError(f"{directory}/{step}/metrics/metrics: damaged ({why}); checkpoints "
                       f"present: {_step_dirs(directory)}. Move that step's folder away to "
                       "evaluate the others")
    if damaged:
      for step, why in sorted(damaged.items()):
        logging.warning("%s/%d/metrics/metrics is damaged (%s): checkpoint %d set aside "
                        "(%s)", directory, step, why, step, self._set_aside(step))
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
    """Restores the full state into `abstract_state` (ShapeDtypeStructs carrying shardings).
    CheckpointUnreadable if it cannot (damaged, or written by another model/optimizer)."""
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
        meta=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except _READ_ERRORS as e:
      raise self._unreadable(step, e, "model/optimizer") from e
    return restored["state"], dict(restored["meta"])

  def restore_newest(self, abstract_for: Callable[[int], Any]) -> tuple[int, Any, dict]:
    """(step, state, meta) of the newest checkpoint that restores, `abstract_for(step)` giving
    its abstract state. Newer ones that do not restore are set aside (renamed
    `<step>.damaged`; deleted on object stores) with one warning naming them and the step
    resumed from; WstalError when none restores."""
    failures = []
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_for(step))
      except CheckpointUnreadable as e:
        failures.append((step, e))
        continue
      if failures:
        where = [self._set_aside(s) for s, _ in failures] if not self.read_only else []
        logging.warning(
            "checkpoint%s %s cannot be restored (%s); resuming from step %d, the newest that "
            "restores%s", "s" * (len(failures) > 1), ", ".join(str(s) for s, _ in failures),
            "; ".join(e.reason for _, e in failures), step,
            f" (set aside: {', '.join(where)})" if where else "")
      return step, state, meta
    raise WstalError(f"{self.directory}: no checkpoint restores ("
                     + "; ".join(f"step {s}: {e.reason}" for s, e in failures)
                     + "); move the folder away to start the run over")

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only state['params'] (evaluation needs no optimizer state)."""
    target = {"params": abstract_params}
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    try:
      restored = self._manager.restore(step, args=args)
    except _READ_ERRORS as e:
      raise self._unreadable(step, e, "model") from e
    return restored["state"]["params"]

  def _unreadable(self, step: int, e: BaseException, what: str) -> CheckpointUnreadable:
    detail = f"{type(e).__name__}: {_first_line(e)[:160]}"
    if isinstance(e, (OSError, json.JSONDecodeError)) or str(e).startswith(_DAMAGE_CODES):
      reason = f"damaged or incomplete ({detail})"
    else:   # a tree or shape that does not match (or metadata damaged into another tree)
      reason = (f"it does not fit this {what} ({detail}); was it written with a different "
                "config, or is it damaged?")
    err = CheckpointUnreadable(f"{self.directory}/{step}: checkpoint cannot be restored: "
                               f"{reason}; checkpoints present: {self.all_steps()}")
    err.reason = reason
    return err

  def _set_aside(self, step: int) -> str:
    """Moves WORKDIR/checkpoints/<step> out of orbax's sight (process 0 renames it; on an
    object store it is deleted); every process then re-reads the step list. Returns where."""
    src = f"{self.directory.rstrip('/')}/{step}"
    if "://" in src:
      dst = "deleted (an object store cannot rename a folder)"
    else:
      dst, n = src + DAMAGED_SUFFIX, 1
      while os.path.exists(dst):
        dst, n = f"{src}{DAMAGED_SUFFIX}{n}", n + 1
    if jax.process_index() == 0:
      if "://" in src:
        from etils import epath
        epath.Path(src).rmtree()
      else:
        os.replace(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"wstal_jax set aside checkpoint {step}")
    if getattr(self, "_manager", None) is not None:
      self._manager.reload()
    return dst

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


def _step_dirs(directory: str) -> list[int]:
  from etils import epath
  return sorted(int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit())


def _damaged_metrics(directory: str) -> dict[int, str]:
  """{step: what is wrong} for the steps whose metrics file orbax could not parse (orbax reads
  every step's metrics when it opens the folder, and a bad one stops it)."""
  from etils import epath
  damaged = {}
  for step in _step_dirs(directory):
    path = epath.Path(directory) / str(step) / "metrics" / "metrics"
    try:
      if path.exists():
        json.loads(path.read_text())
    except (ValueError, OSError, UnicodeDecodeError) as e:
      damaged[step] = f"{type(e).__name__}: {_first_line(e)}"
  return damaged


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ""


