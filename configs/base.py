r"""VLPO's baseline (vlpo.txt Sec. 3.1, Eq. 2; Table 3 row 1): MIL top-k classification plus
GCE actionness on I3D features alone, the ASL-style model VLPO builds on. It reads neither
the VLM features nor the text embeddings.

Built-in benchmark:

  python -m wstal_jax.main --config=configs/base.py

  Expected (small, seed 0, 2 CPU cores): average mAP@0.1:0.7 32.4, ACC 84.4 (seeds 0-2: 34.9 ± 2.2,
  ACC 87.1 ± 2.4; benchmarks/builtin_table.py, README).

THUMOS14:

  python -m wstal_jax.main --config=configs/base.py:dataset=thumos14 \
      --config.data.dir=/path/to/thumos14_shards

  Paper (Table 3 row 1): average mAP@0.1:0.7 42.4, ACC 90.0. Ours: not measured yet (no real
  features on the development machines).

Same protocol and model sizes as configs/vlpo.py (it shares `config.vlpo` for the widths, q
and k; the method 'base' switches every VLPO component off).
"""
from wstal_jax import config_common as common


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="builtin")
  config = common.base_config(name="base", method="base", dataset=arg.dataset)
  config.vlpo = common.vlpo_block(arg.dataset)
  config.eval.postprocess = common.postprocess_block("vlpo")
  # The baseline: every VLPO component off (Table 3 row 1).
  for switch in ("use_vl", "use_kl", "use_snip", "use_dsp", "use_apr"):
    config.vlpo[switch] = False
  return config
