r"""Train or evaluate a method.

  python -m wstal_jax.main --config=configs/vlpo.py [--workdir=DIR]
  python -m wstal_jax.main --config=configs/vlpo.py:dataset=thumos14 --config.data.dir=SHARDS
  python -m wstal_jax.main --mode=eval --workdir=DIR [--checkpoint=best|latest|STEP]
  python -m wstal_jax.main --mode=compile --config=... --topology=v5e:4x4 --workdir=DIR

Several processes (one per host, or per GPU), each seeing its local devices:

  python -m wstal_jax.main ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

On a Cloud TPU VM slice, a SLURM job or with JAX_COORDINATOR_ADDRESS set, jax finds these
values itself (--distributed=auto, the default; launch/tpu_pod.sh passes --distributed=on;
see wstal_jax/distributed.py for start-up and for what happens when a process is lost).

Training writes DIR/metrics.json (the selected checkpoint on the test split) and
DIR/results.json (ActivityNet format); re-running the same command resumes. --mode=eval reads
the run's DIR/config.json (`--config.x=y` overrides apply on top; an explicit --config
replaces it) and writes the same two files to --eval_dir (default DIR).
"""
import json
import logging as pylogging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from wstal_jax import distributed
from wstal_jax.errors import WstalError, cli_main

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs", "vlpo.py")


def _command_line_flags(argv, names):
  """{name: value} of `--name=value` / `--name value` in argv (before a bare `--`)."""
  found = {}
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    name, eq, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name in names:
      found[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
  return found


def default_config_file(argv) -> str:
  """The --config flag's default. --config.x.y=v overrides are parsed against it, so for
  --mode=eval --workdir=DIR without --config it is DIR's saved config (workdir.get_config):
  an override of any method's block (--config.ju2023.fusion=vlp on a Ju run) then parses
  against the run's own fields and types. Otherwise configs/vlpo.py."""
  given = _command_line_flags(argv, ("mode", "workdir", "config"))
  if given.get("mode") == "eval" and given.get("workdir") and "config" not in given:
    workdir = os.path.abspath(given["workdir"])
    try:   # an unreadable config.json is reported by _run (WstalError), not at flag definition
      with open(os.path.join(workdir, "config.json")) as f:
        json.load(f)
    except (OSError, ValueError):
      return _DEFAULT_CONFIG
    if ":" not in workdir:
      return os.path.join(_REPO_ROOT, "wstal_jax", "workdir.py") + ":" + workdir
  return _DEFAULT_CONFIG


def _did_you_mean(text: str) -> str:
  """ml_collections' 'Did you mean "x" instead of "y"?' as ' (did you mean x?)'."""
  m = re.search(r'Did you mean "([^"]+)"', text)
  return f" (did you mean {m.group(1)}?)" if m else ""


def _config_error(e: BaseException, config_file: str, explicit: bool):
  """A KeyError / AttributeError while the config was built: an override naming a field the
  config lacks, or a config file without get_config(). One `error:` line, exit 2."""
  given = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
  while e.args and isinstance(e.args[0], BaseException):   # AttributeError(KeyError(...))
    e = e.args[0]
  text = str(e.args[0]) if e.args else str(e)
  lines = [l.strip() for l in text.splitlines() if l.strip()] or [""]
  if "get_config" in lines[0]:
    _fail(f"--config={config_file}: not a config file (it defines no get_config())")
  field = lines[0].strip("\"'")
  named = [g for g in given if field in g.split(".")]
  if not named and "does not support indexing" in text:
    _fail(f"--config={config_file}: get_config() does not return an ml_collections.ConfigDict")
  if not named:   # not an override: the config file itself failed
    _fail(f"--config={config_file}: get_config() failed: {type(e).__name__} {text!r}")
  where = "" if explicit else (f"; without --config the fields are those of {config_file} "
                               "(pass --config, or --workdir of an evaluated run)")
  _fail(f"{' '.join(named)}: no such field{_did_you_mean(' '.join(lines[1:]))}{where}")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


try:   # config_flags parses --config.* overrides against the default config right here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", default_config_file(sys.argv),
      "Config file, e.g. configs/vlpo.py:dataset=thumos14.", lock_config=True)
except (KeyError, AttributeError) as _e:
  _config_error(_e, default_config_file(sys.argv), explicit=False)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default ./workdirs/<name>-<dataset>-seed<seed>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "compile"],
                          "Train (and resume), evaluate, or compile for a TPU topology.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "--mode=compile: a TPU slice topology, e.g. v5e:4x4 (v5e-16), v4:2x2x4 "
    "(v4-32); needs libtpu (the [tpu] extra), no TPU.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "--mode=eval: best, latest or a step.")
_EVAL_DIR = flags.DEFINE_string("eval_dir", None, "--mode=eval: output folder (default workdir).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: host:port of process 0 (it listens there).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's id.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100,
    "Multi-process: seconds without a heartbeat after which jax.distributed's coordination "
    "service declares a process dead and ends the others (a peer that hangs, or one that dies "
    "while the others wait outside a collective); jax's default is 100.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): 'on' always (what it is not given comes from the cluster: "
    "Cloud TPU VM metadata, SLURM, Open MPI), 'off' never (one process), 'auto' when "
    "--coordinator_address / --num_processes, JAX_COORDINATOR_ADDRESS, a SLURM job of several "
    "tasks or a Cloud TPU slice of several workers asks for it.")


class _QuietLibraries(pylogging.Filter):
  """Orbax logs every save step by step at INFO, and jax says at INFO that it found no TPU
  library on every CPU/GPU start; keep their warnings, drop the chatter (`--verbosity=1`
  shows everything)."""

  def filter(self, record):
    if record.levelno >= pylogging.WARNING:
      return True
    return "/orbax/" not in record.pathname and not (
        record.pathname.endswith("xla_bridge.py") and "Unable to initialize backend" in
        record.getMessage())


def _load_config():
  """The --config file's config; a file that does not load is a WstalError."""
  try:
    config = _CONFIG.value
    if not isinstance(config, ml_collections.ConfigDict):
      path = config_flags.get_config_filename(FLAGS["config"])
      raise WstalError(f"--config={path}: get_config() does not return an "
                       f"ml_collections.ConfigDict (it returned a {type(config).__name__})")
    config.name  # a config file that failed to load raises here
  except IOError as e:
    path = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]
    if not os.path.exists(path):
      raise WstalError(f"config file {path} not found (from {os.getcwd()})") from None
    raise WstalError(f"cannot load config file {path}: {str(e).strip().splitlines()[-1]}") from None
  return config


@cli_main
def main(argv):
  if len(argv) > 1:
    raise WstalError(f"unexpected arguments: {' '.join(argv[1:])}")
  if logging.get_verbosity() <= logging.INFO:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                         num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                         heartbeat_timeout_s=_HEARTBEAT.value)
  distributed.run_or_abandon(_run, heartbeat_timeout_s=_HEARTBEAT.value)


def _run():
  import jax
  from wstal_jax import compilation_cache, evaluate, train, workdir as workdirs   # after init
  is_chief = jax.process_index() == 0
  config = _load_config()
  overrides = config_flags.get_override_values(FLAGS["config"])
  workdir = _WORKDIR.value or workdirs.default_workdir(config, overrides)
  if _MODE.value == "compile":
    from wstal_jax import compile_check
    if not _TOPOLOGY.value:
      raise WstalError("--mode=compile needs --topology, e.g. --topology=v5e:4x4")
    os.makedirs(workdir, exist_ok=True)
    out = compile_check.compile_for_topology(config, _TOPOLOGY.value, workdir)
    print(compile_check.format_report(out))
    print(f"compile report: {os.path.join(workdir, 'compile.json')}")
    return
  if _MODE.value == "eval":
    if not FLAGS["config"].present:   # an explicit --config replaces the saved one
      config = workdirs.saved_config(workdir, overrides)
  compilation_cache.enable(config)   # before the first compilation
  if _MODE.value == "eval":
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
  if is_chief:   # process 0 wrote the files and reports them
    _print_summary(out, config, workdir, where, evaluate)


def _print_summary(out, config, workdir, where, evaluate):
  print(f"step {out['step']} (selected on {out['selected_on']}), split {out['split']} "
        f"({out.get('num_videos', '?')} videos), protocol {out.get('protocol', 'official')}:")
  if out.get("last"):   # a training run: the selected, the last and the best on test
    print(evaluate.format_rows(evaluate.comparison_rows(out), config.eval.tiou))
  else:
    print(evaluate.format_table(out, config.eval.tiou))
  print(f"metrics:     {os.path.join(where, 'metrics.json')}")
  print(f"results:     {os.path.join(where, 'results.json')} (ActivityNet format)")
  print(f"plots:       {os.path.join(where, 'plots')}")
  print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}")
  print(f"tensorboard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")


_PYTHON_ERROR = re.compile(r"^(\w+\.)*\w*(Error|Exception): ")


def _flag_message(text: str, config_file: str | None) -> str:
  """absl's `flag --name=value: <parser message>` as `--name=value: <what is wrong>`; a
  config file's get_config error arrives with its traceback text: its last line is kept."""
  lines = [l for l in text.strip().splitlines() if l.strip()]
  if any("Traceback" in l for l in lines):
    return f"--config={config_file}: {_PYTHON_ERROR.sub('', lines[-1].strip())}"
  message = text.strip()
  m = re.match(r"^flag (--[^=]+)=(.*?): (.*)$", message, re.S)
  if not m:
    return message
  name, value, why = m.groups()
  if "invalid literal for int()" in why:
    why = "expected an integer"
  elif "could not convert string to float" in why:
    why = "expected a number"
  return f"{name}={value}: {why}"


def _parse_flags(argv):
  """absl flag parsing; a bad flag, config file or config value is one `error:` line, exit 2."""
  config_file = _command_line_flags(argv, ("config",)).get("config")
  try:
    return FLAGS(argv)
  except (KeyError, AttributeError) as e:   # an unknown override, a file without get_config
    _config_error(e, config_file or default_config_file(argv), explicit=config_file is not None)
  except SyntaxError as e:
    _fail(f"--config={config_file}: not a Python config file (line {e.lineno}: {e.msg})")
  except flags.Error as e:
    _fail(_flag_message(str(e), config_file))
  except (TypeError, ValueError) as e:   # a config file's get_config() raising
    _fail(f"--config={config_file}: {_PYTHON_ERROR.sub('', str(e).strip())}")


FLAGS = flags.FLAGS


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
