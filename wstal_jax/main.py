r"""Train or evaluate a method.

  python -m wstal_jax.main --config=configs/vlpo.py [--workdir=DIR]
  python -m wstal_jax.main --config=configs/vlpo.py:dataset=thumos14 --config.data.dir=SHARDS
  python -m wstal_jax.main --mode=eval --workdir=DIR [--checkpoint=best|latest|STEP]

Several processes (one per host, or per GPU), each seeing its local devices:

  python -m wstal_jax.main ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

On a Cloud TPU VM slice, a SLURM job or with JAX_COORDINATOR_ADDRESS set, jax finds these
values itself (--distributed=auto, the default; launch/tpu_pod.sh passes --distributed=on).

Training writes DIR/metrics.json (the selected checkpoint on the test split) and
DIR/results.json (ActivityNet format); re-running the same command resumes. --mode=eval reads
the run's DIR/config.json (`--config.x=y` overrides apply on top; an explicit --config
replaces it) and writes the same two files to --eval_dir (default DIR).
"""
import hashlib
import importlib.util
import logging as pylogging
import os
import sys
import urllib.request

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from wstal_jax.errors import WstalError, cli_main

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs", "vlpo.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file, e.g. configs/vlpo.py:dataset=thumos14.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default ./workdirs/<name>-<dataset>-seed<seed>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and resume) or evaluate.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "--mode=eval: best, latest or a step.")
_EVAL_DIR = flags.DEFINE_string("eval_dir", None, "--mode=eval: output folder (default workdir).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: host:port of process 0 (it listens there).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's id.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): 'on' always (what it is not given comes from the cluster: "
    "Cloud TPU VM metadata, SLURM, Open MPI), 'off' never (one process), 'auto' when "
    "--coordinator_address / --num_processes, JAX_COORDINATOR_ADDRESS, a SLURM job of several "
    "tasks or a Cloud TPU slice of several workers asks for it.")


class _QuietLibraries(pylogging.Filter):
  """Orbax logs every save step by step at INFO; keep its warnings, drop the chatter
  (`--verbosity=1` shows everything)."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


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


def _init_distributed():
  """jax.distributed.initialize() when this is a multi-process job; logs the layout."""
  import jax
  reason = distributed_reason(_DISTRIBUTED.value, coordinator=_COORDINATOR.value,
                              num_processes=_NUM_PROCESSES.value)
  if reason is not None:
    # CPU jobs need a cross-process collectives backend (jax's CPU default has been 'none').
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize (%s)", reason)
    try:
      jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                 num_processes=_NUM_PROCESSES.value,
                                 process_id=_PROCESS_ID.value)
    except (ValueError, TypeError, RuntimeError) as e:
      cause = _first_line(e).rstrip(".")
      raise WstalError(f"cannot start the multi-process job ({reason}): {cause}; pass "
                       "--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or "
                       "--distributed=off for a single process") from None
  logging.info("JAX process %d of %d; %d local / %d global devices (%s)%s",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform,
               f"; local: {[d.id for d in jax.local_devices()]}" if reason else "")


def _first_line(e: BaseException) -> str:
  lines = [line for line in str(e).strip().splitlines() if line.strip()]
  return lines[0][:500] if lines else type(e).__name__


def _abandon_multiprocess_job(e: BaseException):
  """A runtime failure in a multi-process job (usually a collective whose peer died): say so and
  exit at once. os._exit skips jax.distributed's shutdown barrier, which would wait for the lost
  process until the heartbeat timeout (100 s) and then abort with a C++ stack dump."""
  import jax
  sys.stdout.flush()
  print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: "
        f"{_first_line(e)}\nAnother process of this job has probably died or stopped "
        "responding (see its log). Re-running the same command on every process resumes from "
        "the latest checkpoint.", file=sys.stderr, flush=True)
  os._exit(1)


def _eval_config(workdir):
  """The run's saved config with the command line's --config.x=y overrides on top."""
  if FLAGS["config"].present:
    return _CONFIG.value
  from wstal_jax import results_io
  path = os.path.join(workdir, "config.json")
  try:
    saved = results_io.load_json(path)
  except WstalError as e:
    raise WstalError(f"{e}: is {workdir} a training run? (or pass --config)") from None
  config = ml_collections.ConfigDict(saved)
  config.eval.tiou = tuple(config.eval.tiou)
  for key, value in config_flags.get_override_values(FLAGS["config"]).items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _default_workdir(config):
  """workdirs/<name>-<dataset>-seed<seed>[-<overrides>]: a command's own folder, so that
  re-running it resumes it and an ablation override never lands in another run's folder."""
  from wstal_jax import train
  name = f"{config.name}-{config.data.dataset}-seed{config.seed}"
  overrides = {k: v for k, v in config_flags.get_override_values(FLAGS["config"]).items()
               if k != "seed" and k not in train.RESUME_SAFE}
  if overrides:
    text = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(overrides.items()))
    if len(text) > 60 or not all(c.isalnum() or c in "_=,.-" for c in text):
      text = hashlib.sha1(repr(sorted(overrides.items())).encode()).hexdigest()[:10]
    name += "-" + text
  return os.path.join("workdirs", name)


@cli_main
def main(argv):
  if len(argv) > 1:
    raise WstalError(f"unexpected arguments: {' '.join(argv[1:])}")
  if logging.get_verbosity() <= logging.INFO:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  _init_distributed()
  import jax
  try:
    _run(jax.process_index() == 0)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    _abandon_multiprocess_job(e)


def _run(is_chief: bool):
  from wstal_jax import evaluate, train   # after distributed init: they touch devices
  try:
    config = _CONFIG.value
    config.name  # a config file that failed to load raises here
  except IOError as e:
    path = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]
    if not os.path.exists(path):
      raise WstalError(f"config file {path} not found (from {os.getcwd()})") from None
    raise WstalError(f"cannot load config file {path}: {str(e).strip().splitlines()[-1]}") from None
  workdir = _WORKDIR.value or _default_workdir(config)
  if _MODE.value == "eval":
    config = _eval_config(workdir)
    train.validate_config(config)
    out = evaluate.evaluate_checkpoint(config, workdir, checkpoint=_CHECKPOINT.value,
                                       eval_dir=_EVAL_DIR.value)
    where = _EVAL_DIR.value or workdir
  else:
    logging.info("workdir %s", os.path.abspath(workdir))
    out = train.train_and_evaluate(config, workdir)
    where = workdir
    if out is None:
      if is_chief:
        print(f"stopped early; checkpoint saved in {os.path.join(workdir, 'checkpoints')}. "
              "Run the same command again to resume.")
      return
  if not is_chief:   # process 0 wrote the files and reports them
    return
  print(f"step {out['step']} (selected on {out['selected_on']}), split {out['split']}:")
  print(evaluate.format_table(out, config.eval.tiou))
  print(f"metrics:     {os.path.join(where, 'metrics.json')}")
  print(f"results:     {os.path.join(where, 'results.json')} (ActivityNet format)")
  print(f"plots:       {os.path.join(where, 'plots')}")
  print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}")
  print(f"tensorboard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")


def _parse_flags(argv):
  """absl flag parsing, with a bad flag or config value reported as `error: ...`, exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # A config file's get_config error arrives with the traceback text in the message:
    # keep its last line (`ValueError: ...`).
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    message = lines[-1] if any("Traceback" in l for l in lines) else str(e)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


FLAGS = flags.FLAGS


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
