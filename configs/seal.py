r"""SEAL (seal.txt, AAAI 2025) on P-MIL's fused proposal network (base: configs/pmil.py).

Built-in benchmark (its synthetic weak-localizer proposals, data/synthetic_proposals.py):

  python -m wstal_jax.main --config=configs/seal.py

  3 seeds (README "P-MIL and SEAL"): SEAL 39.2 +- 3.1 average mAP, its base 36.2 +- 1.8, P-MIL
  37.1 +- 1.2.

THUMOS14 (I3D shards with candidate proposals; P_w of Table 6 are CO2-Net's:
python -m wstal_jax.data.proposals --data_dir=SHARDS --train=detection_result_base_train.json
--test=detection_result_base_test.json --out=DIR):

  python -m wstal_jax.main --config=configs/seal.py:dataset=thumos14 --config.data.dir=DIR

  Paper: 52.8 average mAP@0.1:0.7 with LAC's proposals (P_pw), 47.1 with CO2-Net's (P_w,
  Table 6); base 43.1 / 39.7. Ours: not measured on THUMOS14 (no I3D features here).

Ablations (Tables 3-5) are config overrides:
  --config.seal.sme=false / pc=false / sc=false      Table 3 (all three false: the base row)
  --config.seal.aggregation=segment                   Table 4 (with pc=false, sc=false)
  --config.seal.moderate=false                        Table 5 (Base + l_H)

Protocol: P-MIL's (configs/pmil.py: whole videos, every proposal at test, batch 10, Adam
5e-5 with L2 weight decay 1e-3, 200 epochs on THUMOS14), post-processing preset 'seal'
(class threshold 0.25, soft-NMS sigma 0.1). Epoch-based schedules (lambda1 over 30 epochs,
lambda3 and alpha over 50) count epochs from the training split's size.
"""
import importlib.util
import os

from wstal_jax import config_common as common


def _pmil_recipe():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pmil.py")
  spec = importlib.util.spec_from_file_location("_seal_base_pmil", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  from wstal_jax.methods import seal   # pylint: disable=import-outside-toplevel
  arg = common.parse_arg(arg, dataset="builtin")
  config = common.base_config(name="seal", method="seal", dataset=arg.dataset)
  _pmil_recipe().pmil_protocol(config, arg.dataset)
  config.seal = seal.default_config()
  if arg.dataset == "builtin":          # 64-d RGB / flow halves: P-MIL's built-in widths
    config.seal.hidden, config.seal.head_hidden = 256, 128
  config.eval.postprocess = common.postprocess_block("seal")
  return config
