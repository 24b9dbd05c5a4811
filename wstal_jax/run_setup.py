"""Run set-up: what training and evaluation build from a config before any step runs.

  validate_config(config)        choices and ranges of the method-independent fields
  setup(config) -> Setup         data directory (the built-in benchmark when none is given),
                                 manifest, method (methods.get_method), constants, mesh
  Setup.put_batch(batch)         per-process numpy batch -> global arrays sharded over the mesh
  Setup.init_params(rng, batch)  the method's parameters, replicated
  check_batch_size / per_process_batch_size   global batch sizes against the layout
  selection(config, setup)       which training videos train, which split selects the
                                 checkpoint (the test split, or held-out training videos)

Both `train.py` and `evaluate.py` import this module; neither imports the other's set-up.

The mesh is 1-D data parallel (axis 'data') over all devices, or the first
`config.mesh.num_devices`, ordered by process: process p's devices hold rows [p B, (p + 1) B)
of every global batch, the rows `input_pipeline` gives process p.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from wstal_jax import checkpointing
from wstal_jax import config_common
from wstal_jax import methods
from wstal_jax.data import format as data_format
from wstal_jax.errors import WstalError

DATA_AXIS = "data"


def validate_config(config):
  """Checks choices and ranges; raises WstalError naming the field."""
  def need(ok, field, msg):
    if not ok:
      raise WstalError(f"config.{field}: {msg}")
  need(config.optim.weight_decay_style in ("l2", "decoupled"), "optim.weight_decay_style",
       f"must be 'l2' or 'decoupled', got {config.optim.weight_decay_style!r}")
  need(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
  need(config.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
  need(config.optim.grad_clip_norm >= 0, "optim.grad_clip_norm", "must be >= 0 (0: off)")
  need(int(config.data.get("max_proposals", 1)) >= 1, "data.max_proposals",
       f"must be >= 1, got {config.data.get('max_proposals')}")
  need(config.eval.get("export_proposals", "none") in ("none", "raw"), "eval.export_proposals",
       f"must be 'none' or 'raw', got {config.eval.get('export_proposals')!r}")
  need(config.eval.select_on in ("test", "heldout"), "eval.select_on",
       f"must be 'test' or 'heldout', got {config.eval.select_on!r}")
  if config.eval.select_on == "heldout":
    need(0 < config.eval.heldout_fraction < 1, "eval.heldout_fraction", "must be in (0, 1)")
  need(config.eval.get("sampling", "uniform") in ("uniform", "floor"), "eval.sampling",
       f"must be 'uniform' or 'floor', got {config.eval.get('sampling')!r}")
  need(config.eval.get("protocol", "official") in ("official", "wtalc"), "eval.protocol",
       f"must be 'official' or 'wtalc', got {config.eval.get('protocol')!r}")
  need(config.eval.split in ("train", "test"), "eval.split",
       f"must be 'train' or 'test', got {config.eval.split!r}")
  tiou = config.eval.tiou
  need(isinstance(tiou, (tuple, list)) and len(tiou) > 0
       and all(isinstance(t, (int, float)) and 0 < t <= 1 for t in tiou), "eval.tiou",
       f"needs a tuple of thresholds in (0, 1], e.g. '(0.1,0.3,0.5)', got {tiou!r}")
  from wstal_jax import input_pipeline   # pylint: disable=import-outside-toplevel
  need(config.data.sampling in input_pipeline.SAMPLINGS, "data.sampling",
       f"must be one of {', '.join(input_pipeline.SAMPLINGS)}, got {config.data.sampling!r}")
  if not config.data.dir:
    from wstal_jax.data import synthetic   # pylint: disable=import-outside-toplevel
    need(config.data.builtin_size in synthetic.SIZES, "data.builtin_size",
         f"must be one of {', '.join(synthetic.SIZES)}, got {config.data.builtin_size!r}")
  need(config.data.dataset in config_common.DATASETS, "data.dataset",
       f"must be one of {', '.join(config_common.DATASETS)}, got {config.data.dataset!r} (the "
       "preset is chosen with --config=configs/<method>.py:dataset=NAME)")
  for field in ("num_steps", "log_every", "eval_every", "sync_every", "batch_size"):
    need(config.train[field] > 0, f"train.{field}", f"must be > 0, got {config.train[field]}")
  need(config.train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: off)")
  need(config.data.num_snippets > 0, "data.num_snippets", "must be > 0")
  from wstal_jax import eval_forward   # pylint: disable=import-outside-toplevel
  need(config.eval.get("forward", "auto") in eval_forward.FORWARDS, "eval.forward",
       f"must be one of {', '.join(eval_forward.FORWARDS)}, got {config.eval.get('forward')!r}")
  need(config.eval.get("chunk_snippets", 1024) > 0, "eval.chunk_snippets",
       f"must be > 0, got {config.eval.get('chunk_snippets')}")
  need(config.checkpoint.keep_latest >= 1, "checkpoint.keep_latest", "must be >= 1")
  need(config.checkpoint.keep_best >= 1, "checkpoint.keep_best", "must be >= 1")


@dataclasses.dataclass
class Setup:
  """What both training and evaluation build from a config."""
  config: ml_collections.ConfigDict
  data_dir: str
  manifest: dict
  method: Any           # a methods.Method
  consts: dict          # replicated jax arrays (text_CxE, the method's extra_consts())
  mesh: jax.sharding.Mesh

  @property
  def classes(self) -> list[str]:
    return list(self.manifest["classes"])

  @property
  def sps(self) -> float:
    """Seconds per (original) snippet."""
    return data_format.seconds_per_snippet(self.manifest)

  @property
  def replicated(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @property
  def data_sharding(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(DATA_AXIS))

  def put_batch(self, batch: dict) -> dict:
    """Per-process numpy batch -> global jax arrays sharded over the batch axis."""
    sharding = self.data_sharding
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}

  def abstract_params(self, example_batch: dict):
    """ShapeDtypeStructs (replicated) of the parameters, without running init."""
    shapes = jax.eval_shape(self._init_params, jax.random.key(0), example_batch, self.consts)
    return checkpointing.abstract_like(shapes, self.replicated)

  def init_params(self, rng, example_batch: dict):
    init = jax.jit(self._init_params, out_shardings=self.replicated)
    return init(rng, example_batch, self.consts)

  def _init_params(self, rng, batch, consts):
    variables = self.method.init(rng, batch, consts)
    return variables["params"]


def resolve_data_dir(config) -> str:
  """config.data.dir, or (built-in preset without a dir) the cached built-in benchmark."""
  if config.data.dir:
    return str(config.data.dir)
  if config.data.dataset != "builtin":
    raise WstalError(f"dataset {config.data.dataset!r} needs --config.data.dir=DIR (shards "
                     "written by python -m wstal_jax.data.convert)")
  from wstal_jax.data import builtin_cache  # only the built-in preset needs the generator
  logging.info("no --config.data.dir: using the built-in %r benchmark (seed %d)",
               config.data.builtin_size, config.data.builtin_seed)
  if config.data.get("proposals"):
    if config.data.get("descriptions"):
      raise WstalError("the built-in benchmark comes with descriptions or with proposals, not "
                       "both (config.data.descriptions and config.data.proposals)")
    from wstal_jax.data import synthetic_proposals
    return synthetic_proposals.ensure_builtin(
        config.data.builtin_size, seed=config.data.builtin_seed,
        cache_dir=config.data.cache_dir)
  if config.data.get("descriptions"):
    from wstal_jax.data import synthetic_descriptions
    return synthetic_descriptions.ensure_builtin(
        config.data.builtin_size, seed=config.data.builtin_seed,
        cache_dir=config.data.cache_dir)
  return builtin_cache.ensure_builtin(config.data.builtin_size, seed=config.data.builtin_seed,
                                  cache_dir=config.data.cache_dir)


def make_mesh(config) -> jax.sharding.Mesh:
  """1-D data-parallel mesh over all devices, or the first config.mesh.num_devices.

  Devices are ordered by process, so process p's devices hold rows [p B, (p + 1) B) of every
  global batch: the rows input_pipeline gives process p."""
  total = jax.device_count()
  n = int(config.mesh.num_devices) or total
  if n < 0 or n > total:
    raise WstalError(f"config.mesh.num_devices={n}: this job has {total} device(s)")
  if jax.process_count() > 1:
    if n != total:
      raise WstalError("config.mesh.num_devices must be 0 (all devices) in a multi-process job")
    per_process = dict(collections.Counter(d.process_index for d in jax.devices()))
    if len(set(per_process.values())) != 1:
      raise WstalError(f"every process needs the same number of devices, got {per_process} "
                       "(process: devices); check CUDA_VISIBLE_DEVICES / JAX_LOCAL_DEVICE_IDS")
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))[:n]
  # Auto axes: the methods are written as single-device code and XLA partitions them (data
  # parallel: only the batch axis is sharded), so they need no sharding annotations. The mesh
  # is built directly: jax.make_mesh may reorder devices by physical topology, which would
  # interleave processes along the batch axis.
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(global_batch: int, mesh, what: str):
  """WstalError unless `global_batch` splits evenly over the processes and the devices."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch <= 0 or global_batch % n_dev or global_batch % n_proc:
    layout = f" = {n_proc} processes x {n_dev // n_proc} devices" if n_proc > 1 else ""
    raise WstalError(f"{what}={global_batch} must be a positive multiple of the number of "
                     f"devices ({n_dev}{layout}): the global batch is split evenly over the "
                     "processes and their devices")


def per_process_batch_size(global_batch: int, mesh, what: str) -> int:
  check_batch_size(global_batch, mesh, what)
  return global_batch // jax.process_count()


def setup(config, *, method=None) -> Setup:
  """Data directory, manifest, method, constants and mesh for `config`.

  `method` replaces `methods.get_method(...)` (tests use small stand-in methods)."""
  data_dir = resolve_data_dir(config)
  manifest = data_format.read_manifest(data_dir)
  mesh = make_mesh(config)
  features = manifest["features"]
  vlm = config.data.vlm_feature
  if vlm and vlm not in features:
    raise WstalError(f"config.data.vlm_feature={vlm!r}: the dataset at {data_dir} has "
                     f"features {sorted(features)}")
  text = data_format.load_text_embeddings(data_dir, manifest, feature=vlm)
  dims = {"feat": features[manifest["primary_feature"]]["dim"],
          "vlm": features[vlm]["dim"] if vlm else None,
          "text": None if text is None else int(text.shape[1]),
          "train_videos": _num_training_videos(config, manifest)}
  words = description_consts(config, data_dir, manifest)
  if words:
    dims["words"], dims["vocab"] = (int(words["word_vectors_VxD"].shape[1]),
                                    int(words["word_vectors_VxD"].shape[0]))
  if method is None:
    method = methods.get_method(config, len(manifest["classes"]), dims,
                                class_names=list(manifest["classes"]))
  consts = {} if text is None else {"text_CxE": text}
  consts.update(words)
  consts.update(method.extra_consts())
  dataset_consts = getattr(method, "dataset_consts", None)
  if dataset_consts is not None:
    consts.update(dataset_consts(data_dir, training_indices(config, manifest)))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  consts = jax.device_put(consts, replicated)
  return Setup(config=config, data_dir=data_dir, manifest=manifest, method=method,
               consts=consts, mesh=mesh)


def max_proposals(config) -> int | None:
  """M of the proposals training batches carry (None without config.data.proposals)."""
  return int(config.data.max_proposals) if config.data.get("proposals") else None


def token_fields(config) -> dict:
  """{field: L} of the description tokens training batches carry ({} without descriptions)."""
  if not config.data.get("descriptions"):
    return {}
  return {"key_tokens": int(config.data.max_key_tokens),
          "complete_tokens": int(config.data.max_complete_tokens)}


def description_consts(config, data_dir, manifest) -> dict:
  """With config.data.descriptions: the dataset's description constants
  (`data.descriptions.load`; class token lists padded to the batch lengths), else {}."""
  if not config.data.get("descriptions"):
    return {}
  from wstal_jax.data import descriptions
  for field, length in token_fields(config).items():
    if length < 1:
      raise WstalError(f"config.data.max_{field}={length} must be >= 1")
  loaded = descriptions.load(data_dir, manifest)
  if loaded is None or not set(descriptions.FIELDS) <= set(manifest["optional_fields"]):
    raise WstalError(f"{data_dir}: config.data.descriptions needs a dataset with video "
                     "descriptions; add them with python -m wstal_jax.data.descriptions "
                     "--data_dir=... --descriptions=FILE.json --word_vectors=glove.txt --out=DIR")
  lengths = {"class_name_tokens_CxL": config.data.max_key_tokens,
             "class_key_tokens_CxL": config.data.max_key_tokens,
             "template_tokens_CxL": config.data.max_complete_tokens}
  out = {"word_vectors_VxD": loaded["word_vectors_VxD"]}
  for name, length in lengths.items():
    out[name] = descriptions.pad_tokens(loaded[name].tolist(), int(length))
  return out


# ----------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class Selection:
  """Where the checkpoint is selected.

  name: 'test' (the field's practice: the evaluation split itself) or 'heldout' (training
    videos excluded from training); it is the TensorBoard prefix of the selection
    evaluations and `selected_on` in metrics.json.
  split: the data split those videos are read from; video_indices: None = the whole split.
  """
  name: str
  split: str
  video_indices: np.ndarray | None = None

  @property
  def is_heldout(self) -> bool:
    return self.name == "heldout"


def heldout_split(num_videos: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic split of the TRAIN videos: (train indices, held-out indices), sorted."""
  if not 0.0 < fraction < 1.0:
    raise WstalError(f"config.eval.heldout_fraction must be in (0, 1), got {fraction}")
  num_held = int(round(fraction * num_videos))
  if num_held < 1 or num_held >= num_videos:
    raise WstalError(f"config.eval.heldout_fraction={fraction} of {num_videos} training videos "
                     "leaves no held-out or no training video")
  perm = np.random.default_rng([seed, 0x4E1D]).permutation(num_videos)
  return np.sort(perm[num_held:]), np.sort(perm[:num_held])


def _num_training_videos(config, manifest) -> int:
  """Videos that train (epoch-based schedules count epochs from it)."""
  idx = training_indices(config, manifest)
  return (int(manifest["splits"].get("train", {}).get("num_videos", 0)) if idx is None
          else len(idx))


def training_indices(config, manifest) -> np.ndarray | None:
  """The positions in the train split of the videos that train (None = all of them)."""
  if config.eval.select_on != "heldout":
    return None
  return heldout_split(manifest["splits"]["train"]["num_videos"],
                       config.eval.heldout_fraction, config.seed)[0]


def selection(config, run: Setup) -> tuple[np.ndarray | None, Selection]:
  """(training video indices or None = all, where the checkpoint is selected)."""
  if config.eval.select_on == "heldout":
    num_train = run.manifest["splits"]["train"]["num_videos"]
    train_idx, heldout_idx = heldout_split(num_train, config.eval.heldout_fraction,
                                           config.seed)
    logging.info("model selection on %d held-out TRAIN videos (excluded from training); the "
                 "selected checkpoint is evaluated on %r at the end", len(heldout_idx),
                 config.eval.split)
    return train_idx, Selection("heldout", "train", heldout_idx)
  logging.info("model selection on the %r split (the field's practice)", config.eval.split)
  return None, Selection(config.eval.split, config.eval.split)
