"""Multi-process start-up: whether to join a job, jax.distributed.initialize, losing a peer.

Start-up. `initialize(mode, ...)` runs before anything touches a device (train.py and
evaluate.py are imported after it). `distributed_reason` decides whether this process is one
of several: --distributed=on always, =off never, =auto (the default) when the command line
(--coordinator_address / --num_processes) or the cluster asks for it: JAX_COORDINATOR_ADDRESS,
a SLURM job of several tasks, a TPU worker list of several hosts, a multislice TPU, or a Cloud
TPU VM slice of several workers (`cloud_tpu_vm_workers`, the GCE metadata server; only asked
when libtpu is installed and nothing else decided). What the flags leave unset
jax.distributed finds itself from the cluster. CPU jobs get gloo cross-process collectives.
A failed start-up is a WstalError (`error: ...`, exit 2) naming the reason and the flags that
fix it.

Failure. A runtime error in a multi-process job (jax.errors.JaxRuntimeError, usually a
collective whose peer died) is reported in one `error:` paragraph and the process exits at
once with code 1 (`run_or_abandon`, `abandon_job`): the normal shutdown barrier would wait
for the lost process until the heartbeat timeout (100 s) and then abort with a C++ stack
dump. Re-running the same command on every process resumes from the latest checkpoint. A
single process re-raises the error.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import urllib.request

from absl import logging

from wstal_jax.errors import WstalError


def first_line(e: BaseException) -> str:
  """The first non-blank line of an exception's message (at most 500 characters)."""
  lines = [line for line in str(e).strip().splitlines() if line.strip()]
  return lines[0][:500] if lines else type(e).__name__


def cloud_tpu_vm_workers(timeout_s: float = 5.0) -> int:
  """Workers of the Cloud TPU VM slice this machine is part of; 0 when it is not a TPU VM.

  A TPU VM has libtpu installed (the package's [tpu] extra) and its GCE metadata server lists
  one `worker-network-endpoints` entry per worker (the attribute jax.distributed itself reads).
  Without libtpu nothing is queried; elsewhere the query fails fast and counts as 0.
  """
  if importlib.util.find_spec("libtpu") is None or "TPU_SKIP_MDS_QUERY" in os.environ:
    return 0
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
      headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      text = response.read().decode()
  except (OSError, ValueError):
    return 0
  return len([w for w in text.split(",") if w.strip()])


def distributed_reason(mode, *, coordinator=None, num_processes=None, env=None,
                       tpu_workers=cloud_tpu_vm_workers) -> str | None:
  """Why this process joins a multi-process job (None: it runs on its own).

  mode: --distributed. env: the environment (default os.environ). tpu_workers: a function
  giving the Cloud TPU VM worker count, only called when nothing else decided."""
  env = os.environ if env is None else env
  explicit = [f for f, v in (("--coordinator_address", coordinator),
                             ("--num_processes", num_processes)) if v is not None]
  if mode == "off":
    if explicit:
      raise WstalError(f"--distributed=off contradicts {' and '.join(explicit)}")
    return None
  if mode == "on":
    return "--distributed=on"
  if explicit:
    return explicit[0]
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  try:
    if int(env.get("SLURM_NTASKS", "1")) > 1:
      return f"SLURM job of {env['SLURM_NTASKS']} tasks"
  except ValueError:
    pass
  for var in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    if "," in env.get(var, ""):
      return f"{var} lists several TPU workers"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "multislice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
  workers = tpu_workers()
  if workers > 1:
    return f"Cloud TPU VM slice of {workers} workers"
  return None


def initialize(mode, *, coordinator_address=None, num_processes=None,
               process_id=None) -> str | None:
  """jax.distributed.initialize() when this is a multi-process job; logs the layout.

  mode: --distributed ('auto', 'on', 'off'); the other arguments are the flags of the same
  names (None: jax.distributed finds them from the cluster). Returns distributed_reason's
  answer (None: a single process). WstalError when the job cannot start."""
  import jax
  reason = distributed_reason(mode, coordinator=coordinator_address,
                              num_processes=num_processes)
  if reason is not None:
    # CPU jobs need a cross-process collectives backend (jax's CPU default has been 'none').
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize (%s)", reason)
    try:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id)
    except (ValueError, TypeError, RuntimeError) as e:
      cause = first_line(e).rstrip(".")
      raise WstalError(f"cannot start the multi-process job ({reason}): {cause}; pass "
                       "--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or "
                       "--distributed=off for a single process") from None
  logging.info("JAX process %d of %d; %d local / %d global devices (%s)%s",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform,
               f"; local: {[d.id for d in jax.local_devices()]}" if reason else "")
  return reason


def abandon_job(e: BaseException):
  """A runtime failure in a multi-process job (usually a collective whose peer died): say so and
  exit at once. os._exit skips jax.distributed's shutdown barrier, which would wait for the lost
  process until the heartbeat timeout (100 s) and then abort with a C++ stack dump."""
  import jax
  sys.stdout.flush()
  print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: "
        f"{first_line(e)}\nAnother process of this job has probably died or stopped "
        "responding (see its log). Re-running the same command on every process resumes from "
        "the latest checkpoint.", file=sys.stderr, flush=True)
  os._exit(1)


def run_or_abandon(fn, *args, **kwargs):
  """fn(*args, **kwargs); a jax.errors.JaxRuntimeError in a multi-process job abandons the
  job (`abandon_job`), in a single process it is re-raised."""
  import jax
  try:
    return fn(*args, **kwargs)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    abandon_job(e)
