"""Methods: one file per method (model wiring, losses, scores for evaluation).

`get_method(config, num_classes, dims)` builds the method object named by `config.method`;
its API is fixed in docs/ARCHITECTURE.md ("Methods").
"""
from wstal_jax.errors import WstalError

METHODS = ("base", "vlpo", "co2net", "pvlr")


def get_method(config, num_classes: int, dims: dict[str, int], class_names=None):
  """The method object for `config.method`.

  Args:
    config: the full experiment config; methods read their own block (`config.vlpo`).
    num_classes: C.
    dims: feature widths {'feat': D, 'vlm': E, 'text': E} ('vlm' / 'text' absent or None
      when the dataset / config provides no VLM features / text embeddings).
    class_names: the dataset's C class names (PVLR's CLIP text encoder reads them).

  'base' is the paper's baseline (vlpo.txt Eq. 2: L_mil + L_act on I3D features): it uses
  config.vlpo's model sizes, q and top-k divisor, treats the five use_* switches and
  `finetune` as off, and never reads VLM features or text embeddings. 'vlpo' is VLPO as
  configured by config.vlpo. 'co2net' is CO2-Net (config.co2net), PVLR's base; 'pvlr' is
  PVLR (config.co2net for the base, config.pvlr for the rest).
  """
  name = config.get("method") if hasattr(config, "get") else getattr(config, "method", None)
  if name in ("base", "vlpo"):
    from wstal_jax.methods import vlpo  # pylint: disable=import-outside-toplevel
    return vlpo.VLPO(config, num_classes, dims, baseline=name == "base")
  if name == "co2net":
    from wstal_jax.methods import co2net  # pylint: disable=import-outside-toplevel
    return co2net.CO2Net(config, num_classes, dims)
  if name == "pvlr":
    from wstal_jax.methods import pvlr  # pylint: disable=import-outside-toplevel
    return pvlr.PVLR(config, num_classes, dims, class_names=class_names)
  raise WstalError(f"config.method={name!r}: unknown method; choose one of {METHODS}")
