r"""MLLM4WTAL (mllm4wtal.txt, CVPR 2025) on DELU (Tables 1-3) or CO2-Net (Table 4).

Built-in benchmark (synthetic descriptions and word vectors, generated on first use):

  python -m wstal_jax.main --config=configs/mllm4wtal.py
  python -m wstal_jax.main --config=configs/mllm4wtal.py:base=co2net        # Table 4

THUMOS14: I3D shards (python -m wstal_jax.data.convert) plus the LLM's descriptions and GloVe
vectors (python -m wstal_jax.data.descriptions --data_dir=... --descriptions=desc.json
--word_vectors=glove.6B.300d.txt --out=DIR):

  python -m wstal_jax.main --config=configs/mllm4wtal.py:dataset=thumos14 \
      --config.data.dir=DIR

The base's protocol and blocks (configs/delu.py or configs/co2net.py), with the paper's
settings (Sec. 4): THUMOS14 Adam lr 5e-4, weight decay 1e-3, 5000 steps; ActivityNet1.2 lr
3e-5, 50,000 steps; lambda1 = lambda2 = 1.5, mu1 = 1. On the built-in benchmark the base's
built-in protocol (lr 1e-3, 1500 steps) so that the rows compare with configs/delu.py.
Ablations: --config.mllm4wtal.use_ksm=false / use_csr=false (Table 3),
ksm_text=class_name / csr_text=template (Table 5), inference=base.
"""
import importlib.util
import os

from wstal_jax import config_common as common


def _recipe(name):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_mllm4wtal_base_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  from wstal_jax.methods import mllm4wtal   # pylint: disable=import-outside-toplevel
  arg = common.parse_arg(arg, dataset="builtin", base="delu")
  if arg.base not in mllm4wtal.BASES:
    raise ValueError(f"configs/mllm4wtal.py: base={arg.base!r}; choose one of "
                     f"{mllm4wtal.BASES}")
  config = _recipe(arg.base).get_config(f"dataset={arg.dataset}")
  with config.unlocked():
    config.name = "mllm4wtal" if arg.base == "delu" else f"mllm4wtal_{arg.base}"
    config.method = "mllm4wtal"
    config.data.descriptions = True
    if arg.dataset == "thumos14":
      config.optim.lr = 5e-4
      config.optim.weight_decay = 1e-3
      config.train.num_steps = 5000
    elif arg.dataset == "activitynet":
      config.optim.lr = 3e-5
      config.train.num_steps = 50000
    config.mllm4wtal = mllm4wtal.default_config()
    config.mllm4wtal.base = arg.base
  return config

