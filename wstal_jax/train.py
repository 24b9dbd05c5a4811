"""Training: `train_and_evaluate(config, workdir)`.

Data parallel over a 1-D mesh of all devices (or the first config.mesh.num_devices), ordered
by process: one `jax.jit`-compiled step with the state donated and replicated, the batch sharded
over its first axis. Every process reads its own rows of the global batch; the rows are joined
into global arrays by `jax.make_array_from_process_local_data`.

Multi-process. The global batch of a step does not depend on the process layout
(`input_pipeline.train_batches`), so 1 process x 4 devices and 2 processes x 2 devices run the
same per-device computation; they differ only in the order in which the cross-device gradient
sum is accumulated (float rounding: parameters agree to ~1e-6 relative after a few steps), and
a run may resume under another layout. In evaluation every process runs the same number of
batches (its own videos, padded with dummy videos) and receives all predictions (replicated
outputs), so every process computes the same metrics (the orbax checkpoint ranking needs that);
only process 0 writes config.json, TensorBoard events, metrics.json, results.json and plots;
every process takes part in orbax saves and restores.

Resuming. The batch of step s is a pure function of (seed, s) (`input_pipeline.train_batches(
start_step=s)`), the step's RNG is `fold_in(key, s)`, and the optimizer phase is a function of
s, so a run restarted from its latest checkpoint ends with exactly the numbers of an
uninterrupted run. Re-running the same command resumes; a finished run only re-does the final
evaluation.

Phases. A method may declare `phase_starts = (0, s1, s2, ...)`: at each start step the trainer
asks `method.param_labels(params, start)` for a pytree of 'train' / 'freeze' labels, builds
`optax.multi_transform({'train': <Adam...>, 'freeze': set_to_zero}, labels)`, recompiles the
step, and starts the new phase's optimizer state from `tx.init(params)` (a fresh optimizer per
stage, as when a second training stage is launched). The switch happens right after the update
that ends the previous phase, so the checkpoint of step s always holds phase(s)'s state.

Health. Loss terms (the total `loss` and every aux term) are fetched to the host every
`train.sync_every` steps (this also bounds how far the host runs ahead of the devices); the
first non-finite one stops the run with a WstalError naming the step and the term.
SIGTERM (and a first Ctrl-C) sets a flag; at the next sync point the loop saves a checkpoint
and returns None.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf

from wstal_jax import checkpointing
from wstal_jax import evaluate
from wstal_jax import input_pipeline
from wstal_jax import results_io
from wstal_jax.errors import WstalError

# Config fields that may differ when a run is resumed: they change neither the batches, the
# updates nor which checkpoint is selected (mesh.num_devices: only up to float tolerance).
RESUME_SAFE = ("train.num_steps", "train.log_every", "train.sync_every",
               "train.checkpoint_every", "eval.num_plots",
               "eval.batch_size", "data.dir", "data.cache_dir", "checkpoint.async_save",
               "checkpoint.keep_latest", "mesh.num_devices")


# ----------------------------------------------------------------------------- config


def validate_config(config):
  """Checks choices and ranges; raises WstalError naming the field."""
  def need(ok, field, msg):
    if not ok:
      raise WstalError(f"config.{field}: {msg}")
  need(config.optim.weight_decay_style in ("l2", "decoupled"), "optim.weight_decay_style",
       f"must be 'l2' or 'decoupled', got {config.optim.weight_decay_style!r}")
  need(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
  need(config.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
  need(config.optim.grad_clip_norm >= 0, "optim.grad_clip_norm", "must be >= 0 (0: off)")
  need(config.eval.select_on in ("test", "heldout"), "eval.select_on",
       f"must be 'test' or 'heldout', got {config.eval.select_on!r}")
  if config.eval.select_on == "heldout":
    need(0 < config.eval.heldout_fraction < 1, "eval.heldout_fraction", "must be in (0, 1)")
  need(config.eval.split in ("train", "test"), "eval.split",
       f"must be 'train' or 'test', got {config.eval.split!r}")
  need(len(config.eval.tiou) > 0 and all(0 < t <= 1 for t in config.eval.tiou), "eval.tiou",
       f"needs thresholds in (0, 1], got {tuple(config.eval.tiou)}")
  for field in ("num_steps", "log_every", "eval_every", "sync_every", "batch_size"):
    need(config.train[field] > 0, f"train.{field}", f"must be > 0, got {config.train[field]}")
  need(config.train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: off)")
  need(config.data.num_snippets > 0, "data.num_snippets", "must be > 0")
  need(config.checkpoint.keep_latest >= 1, "checkpoint.keep_latest", "must be >= 1")
  need(config.checkpoint.keep_best >= 1, "checkpoint.keep_best", "must be >= 1")


def config_to_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def config_differences(old: dict, new: dict, ignore=()) -> list[str]:
  """Flattened `field: old -> new` lines, except fields under the prefixes in `ignore`."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict) and v:
        out.update(flat(v, f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = v
    return out
  a, b = flat(old), flat(new)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if any(key == p or key.startswith(p.rstrip(".") + ".") for p in ignore):
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return diffs


def _check_workdir_config(workdir: str, config):
  path = os.path.join(workdir, "config.json")
  if not tf.io.gfile.exists(path):
    return
  old = results_io.load_json(path)
  diffs = config_differences(old, config_to_json(config), ignore=RESUME_SAFE)
  if diffs:
    raise WstalError(f"{workdir} holds a run with a different config ({'; '.join(diffs[:6])}"
                     f"{'; ...' if len(diffs) > 6 else ''}); pass a new --workdir for this one "
                     "(or delete the old run)")


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(config, labels) -> optax.GradientTransformation:
  """Adam for the 'train' leaves, nothing for the 'freeze' leaves.

  optim.weight_decay_style='l2' is torch.optim.Adam(weight_decay=wd) (ASL, VLPO): wd * w is
  added to the gradient before Adam normalises it; 'decoupled' is AdamW.
  """
  o = config.optim
  parts = []
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.weight_decay_style == "l2":
    if o.weight_decay:
      parts.append(optax.add_decayed_weights(o.weight_decay))
    parts.append(optax.adam(o.lr, b1=o.b1, b2=o.b2, eps=o.eps))
  else:
    parts.append(optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
  return optax.multi_transform({"train": optax.chain(*parts), "freeze": optax.set_to_zero()},
                               labels)


def phase_starts(method) -> tuple[int, ...]:
  starts = tuple(int(s) for s in getattr(method, "phase_starts", (0,)))
  if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
    raise WstalError(f"method {type(method).__name__}: phase_starts must be increasing and "
                     f"start at 0, got {starts}")
  return starts


def phase_of(starts, step: int) -> int:
  return int(np.searchsorted(np.asarray(starts), step, side="right")) - 1


def _labels(method, params, start):
  labels = method.param_labels(params, start)
  bad = {l for l in jax.tree.leaves(labels) if l not in ("train", "freeze")}
  if bad:
    raise WstalError(f"method {type(method).__name__}: param_labels gave {sorted(bad)}; "
                     "labels must be 'train' or 'freeze'")
  return labels


# ----------------------------------------------------------------------------- step


def make_train_step(run: evaluate.Setup, tx):
  """The trainer's jitted training step for `run`'s method and the optax transform `tx`.

  Returns step(state, batch, consts, key) -> (new_state, terms): state is {'step',
  'params', 'opt_state'} (donated), the step's RNG is fold_in(key, state['step']), and terms
  holds the float32 'loss' and every aux term of `method.loss`.
  """
  method = run.method

  def train_step(state, batch, consts, key):
    step = state["step"]
    rng = jax.random.fold_in(key, step)

    def loss_fn(params):
      return method.loss(params, batch, consts, rng, step)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    terms = {"loss": loss, **aux}
    terms = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
    return {"step": step + 1, "params": params, "opt_state": opt_state}, terms

  repl, data = run.replicated, run.data_sharding
  return jax.jit(train_step, in_shardings=(repl, data, repl, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


class _Phase:
  """The optimizer and compiled step of one phase."""

  def __init__(self, run, config, starts, index, params):
    self.index = index
    self.start = starts[index]
    self.tx = make_optimizer(config, _labels(run.method, params, self.start))
    self.step_fn = make_train_step(run, self.tx)


# ----------------------------------------------------------------------------- signals


class _StopFlag:
  """SIGTERM / first SIGINT -> flag; the loop saves and returns at its next sync point."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    if signum == signal.SIGINT:   # a second Ctrl-C interrupts at once
      signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def requested(self) -> bool:
    flag = self.signum is not None
    if jax.process_count() > 1:   # all processes stop at the same step
      from jax.experimental import multihost_utils
      flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
    return flag


# ----------------------------------------------------------------------------- loop


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _check_finite(host_terms):
  """host_terms: [(step, {name: float})]; raises at the first non-finite value."""
  for step, terms in host_terms:
    bad = {k: v for k, v in terms.items() if not np.isfinite(v)}
    if bad:
      # Name an aux term rather than the total when both are bad: it is the cause.
      culprit = next((k for k in bad if k != "loss"), "loss")
      raise WstalError(
          f"loss term {culprit!r} is {bad[culprit]} at step {step} (non-finite: "
          f"{', '.join(f'{k}={v}' for k, v in bad.items())}); training stopped. Lower "
          "config.optim.lr, set config.optim.grad_clip_norm, or check the data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       method=None) -> dict | None:
  """Trains, evaluates every config.train.eval_every steps, keeps the latest and the best
  checkpoints, and finally evaluates the selected checkpoint on the test split.

  Writes WORKDIR/config.json, checkpoints/, tensorboard/, and at the end metrics.json,
  results.json and plots/. Returns the metrics.json content, or None when stopped by a
  signal (a checkpoint was saved; run again to resume). `method` replaces
  methods.get_method(...) (tests).
  """
  validate_config(config)
  workdir = evaluate.absolute(workdir)
  is_chief = jax.process_index() == 0
  tf.io.gfile.makedirs(workdir)   # gfile: gs:// workdirs work too
  _check_workdir_config(workdir, config)
  run = evaluate.setup(config, method=method)
  # Both batch sizes are global: checked against the process and device layout before any
  # data is read.
  evaluate.check_batch_size(config.train.batch_size, run.mesh, "config.train.batch_size")
  evaluate.check_batch_size(config.eval.batch_size, run.mesh, "config.eval.batch_size")
  if is_chief:
    evaluate.write_json_atomic(os.path.join(workdir, "config.json"), config_to_json(config))
  mesh = run.mesh
  logging.info("process %d/%d, %d local / %d global devices, mesh %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               dict(mesh.shape))

  # Which training videos train and which (select_on='heldout') select the checkpoint.
  num_train = run.manifest["splits"]["train"]["num_videos"]
  train_idx = heldout_idx = None
  if config.eval.select_on == "heldout":
    train_idx, heldout_idx = evaluate.heldout_split(num_train, config.eval.heldout_fraction,
                                                    config.seed)
    logging.info("model selection on %d held-out TRAIN videos (excluded from training); the "
                 "selected checkpoint is evaluated on %r at the end", len(heldout_idx),
                 config.eval.split)
  else:
    logging.info("model selection on the %r split (the field's practice)", config.eval.split)
  select_split = "train" if heldout_idx is not None else config.eval.split
  select_eval = evaluate.Evaluator(run, split=select_split, video_indices=heldout_idx)
  select_prefix = "heldout" if heldout_idx is not None else config.eval.split

  ckpts = checkpointing.Checkpoints(
      os.path.join(workdir, "checkpoints"), keep_latest=config.checkpoint.keep_latest,
      keep_best=config.checkpoint.keep_best, best_metric="average_mAP",
      async_save=config.checkpoint.async_save)
  # TensorBoard event files on process 0 (the log lines below are written by the loop).
  writer = (metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")) if is_chief
            else metric_writers.MultiWriter([]))
  peer_lost = False
  try:
    metrics = _train_loop(config, workdir, run, ckpts, writer, select_eval, select_prefix,
                          train_idx)
  except jax.errors.JaxRuntimeError:
    # In a multi-process job this is mostly a collective whose peer died; finishing the saves
    # would wait at orbax's cross-process barriers for that peer.
    peer_lost = jax.process_count() > 1
    raise
  finally:
    if not peer_lost:
      ckpts.wait()
      ckpts.close()
    writer.close()
  return metrics


def _train_loop(config, workdir, run, ckpts, writer, select_eval, select_prefix, train_idx):
  num_steps = config.train.num_steps
  per_process_batch = evaluate.per_process_batch_size(config.train.batch_size, run.mesh,
                                                      "config.train.batch_size")
  starts = phase_starts(run.method)
  start_step = ckpts.latest_step() or 0
  if start_step > num_steps:
    raise WstalError(f"{workdir}: the latest checkpoint is at step {start_step}, past "
                     f"config.train.num_steps={num_steps}")
  batches = input_pipeline.train_batches(
      run.data_dir, split="train", batch_size=per_process_batch,
      num_snippets=config.data.num_snippets, seed=config.seed, start_step=start_step,
      sampling=config.data.sampling, vlm_feature=config.data.vlm_feature,
      video_indices=train_idx, process_index=jax.process_index(),
      process_count=jax.process_count())
  first_batch = run.put_batch(next(batches))

  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  phase_idx = phase_of(starts, start_step)
  if start_step:
    abstract_params = run.abstract_params(first_batch)
    phase = _Phase(run, config, starts, phase_idx, abstract_params)
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                "opt_state": jax.eval_shape(phase.tx.init, abstract_params)}
    state, meta = ckpts.restore(start_step, checkpointing.abstract_like(abstract,
                                                                        run.replicated))
    if meta.get("phase", phase_idx) != phase_idx:
      raise WstalError(f"{workdir}: checkpoint {start_step} is from phase {meta.get('phase')}, "
                       f"the method puts step {start_step} in phase {phase_idx}")
    logging.info("resumed from %s at step %d", ckpts.directory, start_step)
  else:
    params = run.init_params(init_key, first_batch)
    phase = _Phase(run, config, starts, phase_idx, params)
    opt_init = jax.jit(phase.tx.init, out_shardings=run.replicated)
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
             "params": params, "opt_state": opt_init(params)}
    num_params = sum(x.size for x in jax.tree.leaves(params))
    logging.info("initialised %s: %d parameters", type(run.method).__name__, num_params)

  def save(step, metrics=None):
    meta = {"phase": phase.index, "name": config.name, "method": config.method}
    if ckpts.save(step, state, meta=meta, metrics=metrics):
      logging.info("checkpoint saved at step %d%s", step,
                   f" ({select_prefix} average mAP {metrics['average_mAP']})" if metrics
                   else "")

  last_eval = None   # (step, EvalResult) of the most recent evaluation on the select split
  pending = []       # (step, device terms) not yet fetched
  window = {}        # name -> list of floats since the last log line
  window_steps, window_time, eval_seconds = 0, 0.0, 0.0
  tick = time.time()
  stopped = False

  with _StopFlag() as stop:
    step = start_step
    batch = first_batch
    while step < num_steps:
      state, terms = phase.step_fn(state, batch, run.consts, train_key)
      step += 1
      pending.append((step, terms))
      if step in starts:   # the update that ends a phase: switch to the next one now
        phase = _Phase(run, config, starts, phase_of(starts, step), state["params"])
        state["opt_state"] = jax.jit(phase.tx.init, out_shardings=run.replicated)(
            state["params"])
        logging.info("step %d: phase %d starts (optimizer re-initialised)", step, phase.index)
      is_eval = step % config.train.eval_every == 0 or step == num_steps
      is_log = step % config.train.log_every == 0 or step == num_steps
      is_ckpt = bool(config.train.checkpoint_every) and step % config.train.checkpoint_every == 0
      first = step == start_step + 1   # includes compilation: timed apart from the rest
      if first or is_eval or is_log or is_ckpt or step % config.train.sync_every == 0:
        host_terms = jax.device_get(pending)
        pending = []
        _check_finite(host_terms)
        for _, t in host_terms:
          for k, v in t.items():
            window.setdefault(k, []).append(float(v))
        now = time.time()
        if first:
          logging.info("step %d done (%.1fs, including compilation)", step, now - tick)
        else:
          window_time += now - tick
          window_steps += len(host_terms)
        tick = now
        if is_log:
          rate = window_steps / max(window_time, 1e-9) if window_steps else float("nan")
          remaining = num_steps - step
          evals_left = remaining // config.train.eval_every
          eta = (remaining / rate if window_steps else 0.0) + evals_left * eval_seconds
          means = {k: float(np.mean(v)) for k, v in window.items()}
          speed = f"{rate:.2f} steps/s  ETA {_fmt_time(eta)}" if window_steps else ""
          logging.info("step %d/%d  %s  %s", step, num_steps,
                       "  ".join(f"{k} {v:.4f}" for k, v in means.items()), speed)
          scalars = {f"train/{k}": v for k, v in means.items()}
          if window_steps:
            scalars["train/steps_per_sec"] = rate
          writer.write_scalars(step, scalars)
          window, window_steps, window_time = {}, 0, 0.0
        if is_eval:
          t0 = time.time()
          result = select_eval(state["params"], keep_scores=(
              config.eval.num_plots if select_prefix == "test" else 0))
          eval_seconds = time.time() - t0
          last_eval = (step, result)
          logging.info("step %d: %s evaluation (%d videos, %.1fs)\n%s", step, select_prefix,
                       result.num_videos, eval_seconds,
                       evaluate.format_table(result.metrics, select_eval.tiou))
          writer.write_scalars(step, {f"{select_prefix}/{k}": v
                                      for k, v in result.metrics.items() if v is not None})
          ranked = dict(result.metrics)
          if ranked["average_mAP"] is None:
            ranked["average_mAP"] = -1.0   # no ground truth: rank it last, keep the run going
          ranked["selected_on"] = select_prefix
          save(step, ranked)
          tick = time.time()   # evaluation time is not training time
        elif is_ckpt:
          save(step)
        if step < num_steps and stop.requested():
          save(step)
          logging.warning("stopped by signal %s at step %d; checkpoint saved. Run the same "
                          "command again to resume.", stop.signum, step)
          stopped = True
          break
      if step < num_steps:
        batch = run.put_batch(next(batches))

  if stopped:
    return None
  return _final_evaluation(config, workdir, run, ckpts, writer, state, last_eval,
                           select_prefix, step)


def _final_evaluation(config, workdir, run, ckpts, writer, state, last_eval, select_prefix,
                      step):
  """Evaluates the selected (best) checkpoint on config.eval.split; writes the outputs."""
  ckpts.wait()
  best = ckpts.best_step()
  if best is None:
    raise WstalError(f"{workdir}: no evaluated checkpoint to select from")
  selection = ckpts.metrics(best) or {}
  if select_prefix != "heldout" and last_eval is not None and last_eval[0] == best:
    result = last_eval[1]
  else:
    params = state["params"] if best == step else ckpts.restore_params(
        best, checkpointing.abstract_like(state["params"], run.replicated))
    test_eval = evaluate.Evaluator(run, split=config.eval.split)
    result = test_eval(params, keep_scores=config.eval.num_plots)
  extra = {"step": int(best), "selected_on": select_prefix, "split": result.split,
           "num_steps": int(config.train.num_steps)}
  if select_prefix == "heldout":
    extra["heldout_average_mAP"] = selection.get("average_mAP")
  content = evaluate.write_outputs(workdir, result, run, extra=extra)
  writer.write_scalars(int(best), {f"final/{k}": v for k, v in result.metrics.items()
                                   if v is not None})
  logging.info("selected step %d (on %s); %s evaluation:\n%s", best, select_prefix,
               result.split, evaluate.format_table(result.metrics, config.eval.tiou))
  return content
