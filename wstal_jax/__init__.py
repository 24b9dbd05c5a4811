"""wstal_jax: weakly-supervised temporal action localization in JAX/Flax."""
import os
import sys

__version__ = "0.1.0"


def quiet_native_logs():
  """Keeps TensorFlow's C++ start-up lines (the oneDNN notice, "All log messages before
  absl::InitializeLog()", the CPU feature guard) off stderr, so the first line a user sees is
  ours. Call it before tensorflow is imported. A TF_CPP_MIN_LOG_LEVEL the user set is kept
  (unset: 2, warnings and info hidden). TF 2.21 prints the oneDNN notice, an info line,
  whatever TF_CPP_MIN_LOG_LEVEL says, so while info lines are hidden the notice's own switch
  is set too (unless the user set it): TF_ENABLE_ONEDNN_OPTS=0 only changes TensorFlow's own
  float kernels (matmul, conv), which the project never uses (TF reads and decodes records;
  every model computation is jax)."""
  level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if level.strip() not in ("", "0"):
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _running_a_command() -> bool:
  """True under `python -m wstal_jax.<command>`: the package is imported before the command's
  module, and sys.orig_argv still holds the interpreter's own arguments."""
  argv = list(getattr(sys, "orig_argv", ()))
  for i, arg in enumerate(argv[1:], start=1):
    module = arg[2:] if arg.startswith("-m") and len(arg) > 2 else (
        argv[i + 1] if arg == "-m" and i + 1 < len(argv) else None)
    if module is not None:
      return module == "wstal_jax" or module.startswith("wstal_jax.")
    if not arg.startswith("-"):   # a script path: not one of our commands
      return False
  return False


def cpu_unless_tpu_present():
  """With libtpu installed (the [tpu] extra, e.g. for --mode=compile) but no TPU here, jax
  would try to start a TPU runtime on every command and print warnings: keep it to the CPU
  (and a GPU when jax's CUDA plugin is installed). A JAX_PLATFORMS the user set is kept."""
  import glob
  import importlib.util
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return   # a TPU VM
  cuda = any(importlib.util.find_spec(m) is not None
             for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"


if _running_a_command():   # a library import (a notebook, a test) keeps its settings
  quiet_native_logs()
  cpu_unless_tpu_present()
