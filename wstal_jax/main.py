r"""Train or evaluate a method.

  python -m wstal_jax.main --config=configs/vlpo.py [--workdir=DIR]
  python -m wstal_jax.main --config=configs/vlpo.py:dataset=thumos14 --config.data.dir=SHARDS
  python -m wstal_jax.main --mode=eval --workdir=DIR [--checkpoint=best|latest|STEP]

Training writes DIR/metrics.json (the selected checkpoint on the test split) and
DIR/results.json (ActivityNet format); re-running the same command resumes. --mode=eval reads
the run's DIR/config.json (`--config.x=y` overrides apply on top; an explicit --config
replaces it) and writes the same two files to --eval_dir (default DIR).
"""
import hashlib
import logging as pylogging
import os
import sys

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
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's id.")


class _QuietLibraries(pylogging.Filter):
  """Orbax logs every save step by step at INFO; keep its warnings, drop the chatter
  (`--verbosity=1` shows everything)."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def _maybe_init_distributed():
  import jax
  env = os.environ
  auto = ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if _COORDINATOR.value or _NUM_PROCESSES.value is not None or auto:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  logging.info("JAX process %d of %d; %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


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
  _maybe_init_distributed()
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
      print(f"stopped early; checkpoint saved in {os.path.join(workdir, 'checkpoints')}. "
            "Run the same command again to resume.")
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
