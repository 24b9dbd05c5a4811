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

Phases. Every method declares `phase_starts = (0, s1, s2, ...)` (methods.Method): at each start step the trainer
asks `method.param_labels(params, start)` for a pytree of 'train' / 'freeze' labels, builds
`optax.multi_transform({'train': <Adam...>, 'freeze': set_to_zero}, labels)`, recompiles the
step, and starts the new phase's optimizer state from `tx.init(params)` (a fresh optimizer per
stage, as when a second training stage is launched). The switch happens right after the update
that ends the previous phase, so the checkpoint of step s always holds phase(s)'s state.

Health. Loss terms (the total `loss` and every aux term) are fetched to the host every
`train.sync_every` steps (this also bounds how far the host runs ahead of the devices); the
first non-finite one stops the run with a WstalError naming the step and the term.
Progress (steps/s over the log window, ETA, the share of time spent in evaluation) is clu's
`periodic_actions.ReportProgress`, logged every `train.log_every` steps and written to
TensorBoard as `steps_per_sec`.
SIGTERM (and a first Ctrl-C) sets a flag; at the next sync point the loop saves a checkpoint
and returns None.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from absl import logging
from clu import metric_writers
from clu import periodic_actions
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
from wstal_jax import run_setup
from wstal_jax import workdir as workdir_lib
from wstal_jax.errors import WstalError


# ----------------------------------------------------------------------------- optimizer


def alternating(inner: optax.GradientTransformation, slot: int, num_slots: int, every: int,
                start: int = 0) -> optax.GradientTransformation:
  """`inner` on the training steps s with (s // every) % num_slots == slot, where s = start +
  the number of updates since init (the trainer's step: the phase's first step is `start`);
  on the other steps zero updates and `inner`'s state (Adam's moments and count) unchanged,
  as if those steps did not exist for these parameters."""
  def init_fn(params):
    return inner.init(params), jnp.zeros([], jnp.int32)

  def update_fn(updates, state, params=None):
    inner_state, count = state
    on = ((start + count) // every) % num_slots == slot
    new_updates, new_inner = inner.update(updates, inner_state, params)
    new_updates = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree.map(lambda a, b: jnp.where(on, a, b), new_inner, inner_state)
    return new_updates, (new_inner, count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config, labels, lr_scale: float = 1.0, *, start: int = 0,
                   alternate_steps: int = 1) -> optax.GradientTransformation:
  """Adam for the 'train' leaves, nothing for the 'freeze' leaves; learning rate
  optim.lr x lr_scale (a method's `phase_lr_scale`, methods.Method). Leaves labelled
  'train@i' (i = 0 .. n-1) are trained in turns (`alternating`): on the steps s with
  (s // alternate_steps) % n == i, each group with its own Adam state (MLLM4WTAL's
  alternating KSM / CSR phases); `start` is the phase's first step.

  optim.weight_decay_style='l2' is torch.optim.Adam(weight_decay=wd) (ASL, VLPO): wd * w is
  added to the gradient before Adam normalises it; 'decoupled' is AdamW.
  """
  o = config.optim
  decay_mask = weight_decay_mask(labels, tuple(o.get("no_decay", ())))
  parts = []
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.weight_decay_style == "l2":
    if o.weight_decay:
      parts.append(optax.add_decayed_weights(o.weight_decay, mask=decay_mask))
    parts.append(optax.adam(o.lr * lr_scale, b1=o.b1, b2=o.b2, eps=o.eps))
  else:
    parts.append(optax.adamw(o.lr * lr_scale, b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=decay_mask))
  transforms = {"train": optax.chain(*parts), "freeze": optax.set_to_zero()}
  slots = sorted({int(l.split("@")[1]) for l in jax.tree.leaves(labels) if "@" in l})
  for i in slots:
    transforms[f"train@{i}"] = alternating(optax.chain(*parts), i, max(slots) + 1,
                                           int(alternate_steps), start)
  return optax.multi_transform(transforms, labels)


def weight_decay_mask(tree, no_decay: tuple[str, ...]):
  """Pytree of bools like `tree`: False for a leaf whose path names one of `no_decay`
  (config.optim.no_decay; CLIP does not decay its logit scale, PVLR's `log_logit_scale`)."""
  def keep(path, _):
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    return not names & set(no_decay)
  return jax.tree_util.tree_map_with_path(keep, tree)


def phase_starts(method) -> tuple[int, ...]:
  starts = tuple(int(s) for s in method.phase_starts)
  if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
    raise WstalError(f"method {type(method).__name__}: phase_starts must be increasing and "
                     f"start at 0, got {starts}")
  return starts


def phase_of(starts, step: int) -> int:
  return int(np.searchsorted(np.asarray(starts), step, side="right")) - 1


def is_trained(label: str) -> bool:
  """'train' or 'train@i' (trained in turns, `make_optimizer`)."""
  return label == "train" or label.startswith("train@")


def _labels(method, params, start):
  labels = method.param_labels(params, start)
  ok = lambda l: l in ("train", "freeze") or (
      l.startswith("train@") and l[6:].isdigit() and hasattr(method, "alternate_steps"))
  bad = {l for l in jax.tree.leaves(labels) if not ok(l)}
  if bad:
    raise WstalError(f"method {type(method).__name__}: param_labels gave {sorted(bad)}; "
                     "labels must be 'train', 'freeze' or (a method with alternate_steps) "
                     "'train@i'")
  return labels


# ----------------------------------------------------------------------------- step


def _phase_kwargs(method, phase):
  """{'phase': i} for a method with `static_phase` (methods.Method), else {}."""
  return {"phase": int(phase)} if phase is not None and getattr(
      method, "static_phase", False) else {}


def make_train_step(run: run_setup.Setup, tx, phase=None):
  """The trainer's jitted training step for `run`'s method and the optax transform `tx`.

  Returns step(state, batch, consts, key) -> (new_state, terms): state is {'step',
  'params', 'opt_state'} (donated), the step's RNG is fold_in(key, state['step']), and terms
  holds the float32 'loss' and every aux term of `method.loss`. phase: the index of the
  phase the step belongs to (passed on to a `static_phase` method's loss).
  """
  method = run.method
  kwargs = _phase_kwargs(method, phase)

  def train_step(state, batch, consts, key):
    step = state["step"]
    rng = jax.random.fold_in(key, step)

    def loss_fn(params):
      return method.loss(params, batch, consts, rng, step, **kwargs)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    terms = {"loss": loss, **aux}
    terms = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
    return {"step": step + 1, "params": params, "opt_state": opt_state}, terms

  repl, data = run.replicated, run.data_sharding
  return jax.jit(train_step, in_shardings=(repl, data, repl, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def term_grad_norms_fn(method, labels, phase=None):
  """-> fn(params, batch, consts, rng, step) -> [K] float32: for each weighted loss term k
  of `method.loss_weights()` (in that order), the global norm of the gradient of
  weight_k * term_k over the parameters `labels` marks 'train'.

  The trainer logs these as each term's gradient share (norm_k / sum_j norm_j): a term
  whose loss share is small can still be the one that trains some parameters (VLPO's L_kl and
  L_vl alone train the VLM projections), and a term with zero gradient does not act at all.
  One forward pass and K backward passes (jax.jacrev), at log steps only.
  """
  names = tuple(method.loss_weights())
  weights = jnp.asarray([method.loss_weights()[k] for k in names], jnp.float32)
  train_leaves = [is_trained(l) for l in jax.tree.leaves(labels)]
  kwargs = _phase_kwargs(method, phase)

  def fn(params, batch, consts, rng, step):
    def weighted_terms(p):
      _, aux = method.loss(p, batch, consts, rng, step, **kwargs)
      return weights * jnp.stack([jnp.asarray(aux[k], jnp.float32) for k in names])

    jac = jax.jacrev(weighted_terms)(params)   # leaves [K, *leaf.shape]
    sq = jnp.zeros((len(names),), jnp.float32)
    for g, trained in zip(jax.tree.leaves(jac), train_leaves):
      if trained:
        sq = sq + jnp.sum(jnp.reshape(g, (len(names), -1)).astype(jnp.float32) ** 2, axis=1)
    return jnp.sqrt(sq)

  return names, fn


def phase_optimizer(method, config, params, start: int):
  """(labels, lr scale, optax transform) of the phase starting at `start` (the trainer's
  phases and --mode=compile build them the same way)."""
  labels = _labels(method, params, start)
  scale_fn = getattr(method, "phase_lr_scale", None)
  lr_scale = float(scale_fn(start)) if scale_fn is not None else 1.0
  tx = make_optimizer(config, labels, lr_scale, start=start,
                      alternate_steps=getattr(method, "alternate_steps", 1))
  return labels, lr_scale, tx


class _Phase:
  """The optimizer and compiled step of one phase, and its per-term gradient norms."""

  def __init__(self, run, config, starts, index, params):
    self.index = index
    self.start = starts[index]
    labels, self.lr_scale, self.tx = phase_optimizer(run.method, config, params, self.start)
    self.step_fn = make_train_step(run, self.tx, index)
    self.grad_names, grad_norms = term_grad_norms_fn(run.method, labels, index)
    repl, data = run.replicated, run.data_sharding
    self.grad_norms_fn = jax.jit(grad_norms, in_shardings=(repl, data, repl, repl, repl),
                                 out_shardings=repl)


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


HISTORY_FILE = "eval_history.json"


def _load_history(workdir: str) -> dict:
  path = os.path.join(workdir, HISTORY_FILE)
  if not tf.io.gfile.exists(path):
    return {}
  try:
    history = results_io.load_json(path)
  except WstalError as e:   # damaged: only the "best on test" report reads it
    logging.warning("%s; starting a new evaluation history", e)
    return {}
  return history if isinstance(history, dict) else {}


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       method=None) -> dict | None:
  """Trains, evaluates every config.train.eval_every steps, keeps the latest and the best
  checkpoints, and finally evaluates the selected checkpoint on the test split.

  Writes WORKDIR/config.json, checkpoints/, tensorboard/, and at the end metrics.json,
  results.json and plots/. Returns the metrics.json content, or None when stopped by a
  signal (a checkpoint was saved; run again to resume). `method` replaces
  methods.get_method(...) (tests).
  """
  run_setup.validate_config(config)
  workdir = workdir_lib.absolute(workdir)
  is_chief = jax.process_index() == 0
  tf.io.gfile.makedirs(workdir)   # gfile: gs:// workdirs work too
  # Process 0 holds the folder's run lock until the end: a second run on it (a second
  # terminal, a re-submitted job) stops here, before it writes anything.
  with (workdir_lib.RunLock(workdir, what="training run") if is_chief
        else contextlib.nullcontext()):
    return _train_and_evaluate(config, workdir, is_chief, method)


def _train_and_evaluate(config, workdir, is_chief, method):
  workdir_lib.check_config(workdir, config)
  run = run_setup.setup(config, method=method)
  # Both batch sizes are global: checked against the process and device layout before any
  # data is read.
  run_setup.check_batch_size(config.train.batch_size, run.mesh, "config.train.batch_size")
  run_setup.check_batch_size(config.eval.batch_size, run.mesh, "config.eval.batch_size")
  if is_chief:
    workdir_lib.save_config(workdir, config)
  logging.info("process %d/%d, %d local / %d global devices, mesh %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               dict(run.mesh.shape))
  train_idx, selection = run_setup.selection(config, run)

  ckpts = checkpointing.Checkpoints(
      os.path.join(workdir, "checkpoints"), keep_latest=config.checkpoint.keep_latest,
      keep_best=config.checkpoint.keep_best, best_metric="average_mAP",
      async_save=config.checkpoint.async_save)
  # TensorBoard event files on process 0 (the log lines below are written by the loop).
  writer = (metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")) if is_chief
            else metric_writers.MultiWriter([]))
  peer_lost = False
  try:
    loop = _Loop(config, workdir, run, ckpts, writer, selection, train_idx)
    metrics = loop.run()
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


class _Loop:
  """The training loop of one run, in named pieces:

    restore_or_init   the state at the start step (latest checkpoint, or fresh parameters)
    run               step, switch phase, and at sync points `sync`; then `final_evaluation`
    sync              fetch the pending loss terms, check them, log, evaluate / save, stop
    eval_and_rank     evaluate on the selection videos and save a checkpoint ranked by it
    final_evaluation  evaluate the selected checkpoint on config.eval.split, write outputs

  Progress (steps/s, ETA, the share of time spent evaluating) is clu's ReportProgress.
  """

  def __init__(self, config, workdir, run, ckpts, writer, selection, train_idx):
    self.config = config
    self.workdir = workdir
    self.run_ = run
    self.ckpts = ckpts
    self.writer = writer
    self.selection = selection
    self.train_idx = train_idx
    self.select_eval = evaluate.Evaluator(run, split=selection.split,
                                          video_indices=selection.video_indices)
    self.starts = phase_starts(run.method)
    self.loss_weights = dict(run.method.loss_weights())
    self.num_steps = config.train.num_steps
    self.state = None
    self.phase = None
    self.train_key = None
    self.last_eval = None    # (step, EvalResult) of the most recent selection evaluation
    # Every evaluation of the run, {step: {"selection": name, <selection metrics>,
    # "test": <test-split metrics> (held-out selection only)}}, kept in WORKDIR/
    # eval_history.json across resumes: "best on test" of a held-out-selected run reads it.
    self.history = _load_history(workdir)
    self.test_eval = None    # held-out selection: the test-split evaluator, built on first use
    self.window = {}         # loss term name -> floats since the last log line
    self.first_tick = None   # start time of the first step of this process, until synced
    self.report = periodic_actions.ReportProgress(
        num_train_steps=self.num_steps, writer=writer, every_steps=config.train.log_every,
        every_secs=None)

  # -------------------------------------------------------------------------- pieces

  def restore_or_init(self, first_batch, start_step: int) -> int:
    """Sets self.state and self.phase for `start_step` (0: fresh parameters). Returns the step
    restored: an older one than `start_step` when the newer checkpoints are damaged
    (Checkpoints.restore_newest sets them aside and says so)."""
    run, config = self.run_, self.config
    init_key = jax.random.split(jax.random.key(config.seed))[0]
    if start_step:
      abstract_params = run.abstract_params(first_batch)
      phases = {}

      def abstract_for(step):
        phases[step] = _Phase(run, config, self.starts, phase_of(self.starts, step),
                              abstract_params)
        abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                    "opt_state": jax.eval_shape(phases[step].tx.init, abstract_params)}
        return checkpointing.abstract_like(abstract, run.replicated)

      step, self.state, meta = self.ckpts.restore_newest(abstract_for)
      self.phase = phases[step]
      if meta.get("phase", self.phase.index) != self.phase.index:
        raise WstalError(f"{self.workdir}: checkpoint {step} is from phase "
                         f"{meta.get('phase')}, the method puts step {step} in phase "
                         f"{self.phase.index}")
      logging.info("resumed from %s at step %d", self.ckpts.directory, step)
      return step
    phase_idx = phase_of(self.starts, start_step)
    params = run.init_params(init_key, first_batch)
    self.phase = _Phase(run, config, self.starts, phase_idx, params)
    opt_init = jax.jit(self.phase.tx.init, out_shardings=run.replicated)
    self.state = {"step": jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
                  "params": params, "opt_state": opt_init(params)}
    num_params = sum(x.size for x in jax.tree.leaves(params))
    logging.info("initialised %s: %d parameters", type(run.method).__name__, num_params)
    return start_step

  def switch_phase(self, step: int):
    """After the update that ends a phase: the next phase's optimizer, from tx.init."""
    run = self.run_
    self.phase = _Phase(run, self.config, self.starts, phase_of(self.starts, step),
                        self.state["params"])
    self.state["opt_state"] = jax.jit(self.phase.tx.init, out_shardings=run.replicated)(
        self.state["params"])
    logging.info("step %d: phase %d starts (optimizer re-initialised, lr x %g)", step,
                 self.phase.index, self.phase.lr_scale)

  def save(self, step: int, metrics=None):
    meta = {"phase": self.phase.index, "name": self.config.name,
            "method": self.config.method}
    if self.ckpts.save(step, self.state, meta=meta, metrics=metrics):
      logging.info("checkpoint saved at step %d%s", step,
                   f" ({self.selection.name} average mAP {metrics['average_mAP']})"
                   if metrics else "")

  def log(self, step: int, batch):
    """The mean of every loss term since the last log line, each weighted term's share of
    the total (method.loss_weights) and, with config.train.grad_shares, each weighted term's
    share of the summed gradient norms on this step's batch (`term_grad_norms_fn`): log line
    + TensorBoard (train/<term>, train/share/<term>, train/grad_share/<term>)."""
    means = {k: float(np.mean(v)) for k, v in self.window.items()}
    total = means.get("loss", 0.0)
    shares = {k: w * means[k] / total for k, w in self.loss_weights.items()
              if k in means and total}
    grad_shares = {}
    if self.config.train.grad_shares and len(self.loss_weights) > 1:
      # The terms of the phase that takes the next step (`step`: a method may gate its
      # terms by phase), at the current parameters, on the batch just used.
      norms = np.asarray(jax.device_get(self.phase.grad_norms_fn(
          self.state["params"], batch, self.run_.consts,
          jax.random.fold_in(self.train_key, step), jnp.int32(step))))
      norm_sum = float(norms.sum())
      grad_shares = {k: float(n) / norm_sum if norm_sum else 0.0
                     for k, n in zip(self.phase.grad_names, norms)}
    logging.info("step %d/%d  %s  (share of the loss: %s)%s", step, self.num_steps,
                 "  ".join(f"{k} {v:.4f}" for k, v in means.items()),
                 ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()),
                 f"  (share of the gradient norm: "
                 f"{', '.join(f'{k} {100 * v:.1f}%' for k, v in grad_shares.items())})"
                 if grad_shares else "")
    scalars = {f"train/{k}": v for k, v in means.items()}
    scalars.update({f"train/share/{k}": v for k, v in shares.items()})
    scalars.update({f"train/grad_share/{k}": v for k, v in grad_shares.items()})
    self.writer.write_scalars(step, scalars)
    self.window = {}

  def eval_and_rank(self, step: int):
    """Evaluates on the selection videos and saves a checkpoint ranked by average mAP."""
    config, name = self.config, self.selection.name
    t0 = time.time()
    with self.report.timed("eval", wait_jax_async_dispatch=False):
      result = self.select_eval(self.state["params"], keep_scores=(
          config.eval.num_plots if name == "test" else 0))
    self.last_eval = (step, result)
    logging.info("step %d: %s evaluation (%d videos, %.1fs)\n%s", step, name,
                 result.num_videos, time.time() - t0,
                 evaluate.format_table(result.metrics, self.select_eval.tiou))
    self.writer.write_scalars(step, {f"{name}/{k}": v for k, v in result.metrics.items()
                                     if _is_number(v)})
    entry = {"selection": name, **{k: v for k, v in result.metrics.items()
                                   if _is_number(v) or v is None}}
    if self.selection.is_heldout:
      # Also on the test split, for the honest table's "best on test" column (what a
      # test-selected run would have reported); never used to select.
      if self.test_eval is None:
        self.test_eval = evaluate.Evaluator(self.run_, split=config.eval.split)
      test = self.test_eval(self.state["params"])
      entry["test"] = {k: v for k, v in test.metrics.items() if _is_number(v) or v is None}
      self.writer.write_scalars(step, {f"test/{k}": v for k, v in test.metrics.items()
                                       if _is_number(v)})
    self.history[str(step)] = entry
    if jax.process_index() == 0:
      results_io.write_json_atomic(os.path.join(self.workdir, HISTORY_FILE), self.history,
                                   indent=1)
    ranked = dict(result.metrics)
    if ranked["average_mAP"] is None:
      ranked["average_mAP"] = -1.0   # no ground truth: rank it last, keep the run going
    ranked["selected_on"] = name
    self.save(step, ranked)

  def sync(self, step: int, pending, stop, batch) -> bool:
    """A sync point: fetch and check the pending terms, log, evaluate or save; True when a
    signal asks the run to stop (a checkpoint of `step` was saved). `batch`: the batch of
    `step` (the log line's gradient shares are measured on it)."""
    config = self.config
    host_terms = jax.device_get(pending)
    if self.first_tick is not None:   # the first step includes compilation
      logging.info("step %d done (%.1fs, including compilation)", step,
                   time.time() - self.first_tick)
      self.first_tick = None
    _check_finite(host_terms)
    for _, t in host_terms:
      for k, v in t.items():
        self.window.setdefault(k, []).append(float(v))
    if step % config.train.log_every == 0 or step == self.num_steps:
      self.log(step, batch)
    if step % config.train.eval_every == 0 or step == self.num_steps:
      self.eval_and_rank(step)
    elif config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
      self.save(step)
    if step < self.num_steps and stop.requested():
      self.save(step)
      logging.warning("stopped by signal %s at step %d; checkpoint saved. Run the same "
                      "command again to resume.", stop.signum, step)
      return True
    return False

  def is_sync_point(self, step: int, start_step: int) -> bool:
    t = self.config.train
    return (step == start_step + 1 or step == self.num_steps or step % t.sync_every == 0
            or step % t.log_every == 0 or step % t.eval_every == 0
            or bool(t.checkpoint_every) and step % t.checkpoint_every == 0)

  # -------------------------------------------------------------------------- run

  def run(self) -> dict | None:
    config, run = self.config, self.run_
    per_process_batch = run_setup.per_process_batch_size(config.train.batch_size, run.mesh,
                                                         "config.train.batch_size")
    start_step = self.ckpts.latest_step() or 0
    if start_step > self.num_steps:
      raise WstalError(f"{self.workdir}: the latest checkpoint is at step {start_step}, past "
                       f"config.train.num_steps={self.num_steps}")

    def batches_from(step):   # batches are a function of the step: resume is exact
      return input_pipeline.train_batches(
          run.data_dir, split="train", batch_size=per_process_batch,
          num_snippets=config.data.num_snippets, seed=config.seed, start_step=step,
          sampling=config.data.sampling, vlm_feature=config.data.vlm_feature,
          video_indices=self.train_idx, process_index=jax.process_index(),
          process_count=jax.process_count(), token_fields=run_setup.token_fields(config),
          max_proposals=run_setup.max_proposals(config))
    batches = batches_from(start_step)
    batch = run.put_batch(next(batches))
    restored = self.restore_or_init(batch, start_step)
    if restored != start_step:   # the newer checkpoints were damaged
      start_step = restored
      batches = batches_from(start_step)
      batch = run.put_batch(next(batches))
    train_key = self.train_key = jax.random.split(jax.random.key(config.seed))[1]

    pending = []   # (step, device terms) not yet fetched
    step = start_step
    self.first_tick = time.time()
    with _StopFlag() as stop:
      while step < self.num_steps:
        self.state, terms = self.phase.step_fn(self.state, batch, run.consts, train_key)
        step += 1
        pending.append((step, terms))
        if step in self.starts:   # the update that ends a phase: switch to the next one now
          self.switch_phase(step)
        if self.is_sync_point(step, start_step):
          stopped = self.sync(step, pending, stop, batch)
          pending = []
          if stopped:
            return None
        self.report(step)
        if step < self.num_steps:
          batch = run.put_batch(next(batches))
    return self.final_evaluation(step)

  def final_evaluation(self, step: int) -> dict:
    """Evaluates the selected (best) checkpoint on config.eval.split; writes the outputs."""
    config, run, ckpts = self.config, self.run_, self.ckpts
    ckpts.wait()
    best = ckpts.best_step()
    if best is None:
      raise WstalError(f"{self.workdir}: no evaluated checkpoint to select from")
    selection = ckpts.metrics(best) or {}
    if (not self.selection.is_heldout and self.last_eval is not None
        and self.last_eval[0] == best):
      result = self.last_eval[1]
    else:
      params = self.state["params"] if best == step else ckpts.restore_params(
          best, checkpointing.abstract_like(self.state["params"], run.replicated))
      test_eval = evaluate.Evaluator(run, split=config.eval.split)
      result = test_eval(params, keep_scores=config.eval.num_plots)
    extra = {"step": int(best), "selected_on": self.selection.name, "split": result.split,
             "num_videos": int(result.num_videos), "num_steps": int(config.train.num_steps)}
    if self.selection.is_heldout:
      extra["heldout_average_mAP"] = selection.get("average_mAP")
    # The last checkpoint on the same split: what a run reports without any selection.
    if best == step:
      last = result.metrics
    elif (not self.selection.is_heldout and self.last_eval is not None
          and self.last_eval[0] == step):
      last = self.last_eval[1].metrics
    else:
      last = (self.test_eval or evaluate.Evaluator(run, split=config.eval.split))(
          self.state["params"]).metrics
    extra["last"] = dict(last, step=int(step))
    extra["best_on_test"] = self.best_on_test(int(best), result.metrics)
    content = evaluate.write_outputs(self.workdir, result, run, extra=extra)
    self.writer.write_scalars(int(best), {f"final/{k}": v for k, v in result.metrics.items()
                                          if _is_number(v)})
    logging.info("%s evaluation, selected step %d (on %s), the last checkpoint%s:\n%s",
                 result.split, best, self.selection.name,
                 " and the best on test" if self.selection.is_heldout else "",
                 evaluate.format_rows(evaluate.comparison_rows(content), config.eval.tiou))
    return content

  def best_on_test(self, best: int, selected: dict) -> dict:
    """The evaluation with the highest test-split average mAP and its step: the selected one
    when selecting on test; with held-out selection, from the run's evaluation history."""
    if not self.selection.is_heldout:
      return dict(selected, step=best)
    tested = [(int(s), e["test"]) for s, e in self.history.items()
              if "test" in e and int(s) <= self.num_steps]
    if not tested:
      return {}
    step, metrics = max(tested, key=lambda x: (x[1].get("average_mAP") or -1.0, x[0]))
    return dict(metrics, step=step)
