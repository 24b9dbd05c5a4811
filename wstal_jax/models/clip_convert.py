"""Convert a local CLIP checkpoint's text tower into `ClipTextEncoder` params (.npz, CLI).

  python -m wstal_jax.models.clip_convert --checkpoint=ViT-B-16.pt --out=clip_text_vitb16.npz

Reads (text tower only; visual keys are ignored):
  * OpenAI `.pt`: the TorchScript archive `clip.load` downloads, or a plain state dict. Keys
    token_embedding.weight, positional_embedding, transformer.resblocks.N.{ln_1, attn.in_proj_
    {weight,bias}, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final, text_projection.
  * open_clip state dicts with the same layout, bare or under 'state_dict', with 'module.'
    (DDP) and/or 'text.' (CustomTextCLIP with the standard text transformer) prefixes; a
    directory with open_clip_config.json next to the weights is read for activation / heads.
  * HuggingFace transformers CLIPModel / CLIPTextModelWithProjection: a save_pretrained
    directory (config.json + model.safetensors / pytorch_model.bin, sharded or not) or a bare
    state dict: text_model.embeddings.{token,position}_embedding.weight, text_model.encoder.
    layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2},
    text_model.final_layer_norm, text_projection.weight.
Transposes: torch Linear weights are [out, in] and become Flax kernels [in, out]; OpenAI's
text_projection is already [D, E]; HF's text_projection.weight is [E, D] and is transposed.
OpenAI's fused in_proj_weight [3D, D] splits into q, k, v rows in that order. Weights are
stored float32 (OpenAI's archives are float16).

What the weights do not say is taken from the checkpoint's config or must be given:
  activation: OpenAI archives (marked by their input_resolution / context_length / vocab_size
    entries) use QuickGELU; HF and open_clip directories say it in their config; otherwise
    pass --activation (open_clip's LAION models use gelu, its '-quickgelu' / OpenAI ones
    quick_gelu).
  heads: from the config, else width // 64 (the rule of every OpenAI and open_clip tower).
  pooling: HF configs with eos_token_id != 2 pool at the first eos_token_id; all else at the
    argmax id (the same position for CLIP-tokenized text).

.pt files need torch (imported lazily); .safetensors and our .npz do not. The .npz holds one
array per parameter under its '/'-joined path (e.g. 'resblocks_0/attn/q_proj/kernel') and
the ClipTextConfig as JSON under '__config__'; `load_npz` returns (params, config) for
training without torch.
"""
import argparse
import json
import os
import re
import sys
import warnings
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from wstal_jax import results_io
from wstal_jax.errors import WstalError, cli_main
from wstal_jax.models.clip_text import ACTIVATIONS, ClipTextConfig, ClipTextEncoder

CONFIG_KEY = "__config__"
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "open_clip_model.safetensors",
                 "open_clip_pytorch_model.bin")
_SKIP_PREFIXES = ("visual.", "vision_model.", "visual_projection.", "module.visual.",
                  "model.vision_model.")


# ------------------------------------------------------------------------------- reading ---
def _import_torch(path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise WstalError(f"{path}: reading a PyTorch checkpoint needs torch: install the "
                     "'benchmark' extra / torch==2.13.0 to convert .pt checkpoints") from None
  return torch


def _tensor_to_numpy(value):
  if hasattr(value, "detach"):  # a torch tensor: float16 / bfloat16 become float32
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _is_torchscript(path):
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _read_torch(path):
  torch = _import_torch(path)
  if _is_torchscript(path):
    try:
      with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; OpenAI ships it
        warnings.simplefilter("ignore", DeprecationWarning)
        obj = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # pylint: disable=broad-except
      raise WstalError(f"{path}: cannot load the TorchScript archive ({e})") from e
    return dict(obj), "torchscript"
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise WstalError(f"{path}: not a PyTorch checkpoint that loads with weights_only=True "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
  if hasattr(obj, "state_dict") and not isinstance(obj, dict):
    obj = obj.state_dict()
  if not isinstance(obj, dict):
    raise WstalError(f"{path}: unknown checkpoint format: holds a {type(obj).__name__}, "
                     "not a state dict")
  for key in ("state_dict", "model", "module"):  # training checkpoints wrap the weights
    if isinstance(obj.get(key), dict) and not any(hasattr(v, "shape") for v in obj.values()):
      obj = obj[key]
      break
  return obj, "torch"


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(path):
  """Reads a .safetensors file with numpy (u64 header size, JSON header, raw data).

  The data is memory-mapped, so the skipped visual tower is never read.
  """
  try:
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if not 2 <= n <= 100_000_000:
        raise ValueError(f"header size {n}")
      header = json.loads(f.read(n))
    if not isinstance(header, dict):
      raise ValueError("the header is not a JSON object")
    size = os.path.getsize(path) - 8 - n
    data = np.memmap(path, np.uint8, "r", offset=8 + n) if size > 0 else np.zeros(0, np.uint8)
  except (OSError, ValueError) as e:
    raise WstalError(f"{path}: not a readable .safetensors file ({e})") from e
  out = {}
  for name, info in header.items():
    if name == "__metadata__" or name.startswith(_SKIP_PREFIXES):
      continue
    try:
      if info["dtype"] == "BF16":
        import ml_dtypes  # pylint: disable=import-outside-toplevel  (a jax dependency)
        dtype = ml_dtypes.bfloat16
      elif info["dtype"] in _SAFETENSORS_DTYPES:
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
      else:
        raise WstalError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
      start, end = info["data_offsets"]
      if not 0 <= start <= end <= data.size:
        raise ValueError(f"data offsets {start}..{end} outside the {data.size}-byte data")
      arr = np.asarray(data[start:end]).view(dtype).reshape(info["shape"])
    except (KeyError, TypeError, ValueError) as e:
      raise WstalError(f"{path}: malformed header entry for tensor {name} ({e})") from e
    is_float = info["dtype"] in ("F64", "F32", "F16", "BF16")
    out[name] = arr.astype(np.float32) if is_float else arr.copy()
  return out


def _read_weights_file(path):
  if path.endswith(".safetensors"):
    return _read_safetensors(path), "safetensors"
  if path.endswith(".index.json"):  # sharded HF checkpoint
    try:
      with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
      raise WstalError(f"{path}: not a checkpoint index with a 'weight_map' ({e})") from e
    merged = {}
    for shard in shards:
      merged.update(_read_weights_file(os.path.join(os.path.dirname(path), shard))[0])
    return merged, "sharded"
  return _read_torch(path)


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WstalError(f"{path}: cannot read JSON ({e})") from e


def read_checkpoint(path):
  """path (file or directory) -> (state dict of numpy arrays, kind, config dict or None).

  kind: "torchscript" | "torch" | "safetensors" | "sharded"; the config is the directory's
  config.json (HF) or open_clip_config.json, if any.
  """
  if not os.path.exists(path):
    raise WstalError(f"{path}: checkpoint not found")
  config = None
  if os.path.isdir(path):
    found = [n for n in _WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
    if not found:
      raise WstalError(f"{path}: directory holds none of the weight files {_WEIGHT_FILES}")
    for name in ("config.json", "open_clip_config.json"):
      if os.path.isfile(os.path.join(path, name)):
        config = _read_json(os.path.join(path, name))
        break
    path = os.path.join(path, found[0])
  state, kind = _read_weights_file(path)
  arrays = {}
  for k, v in state.items():
    if not isinstance(k, str) or k.startswith(_SKIP_PREFIXES) or not hasattr(v, "shape"):
      continue
    arrays[k] = _tensor_to_numpy(v)
  return arrays, kind, config


# ---------------------------------------------------------------------------- converting ---
def _strip_prefix(sd, prefix):
  return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _detect_layout(sd, source):
  """-> ("openai" | "hf", state dict with the layout's prefixes removed, hf projection key)."""
  if sd and all(k.startswith("module.") for k in sd):
    sd = _strip_prefix(sd, "module.")
  for prefix in ("", "text.", "model.", "clip.", "module."):
    if prefix + "token_embedding.weight" in sd:
      return "openai", _strip_prefix(sd, prefix)
  for prefix in ("text_model.", "", "model.text_model.", "clip.text_model."):
    if prefix + "embeddings.token_embedding.weight" in sd:
      text = _strip_prefix(sd, prefix)
      outer = prefix[:-len("text_model.")] if prefix.endswith("text_model.") else prefix
      if outer + "text_projection.weight" in sd:
        text["text_projection.weight"] = sd[outer + "text_projection.weight"]
      return "hf", text
  shown = ", ".join(sorted(sd)[:8]) or "(no tensors)"
  raise WstalError(
      f"{source}: unknown checkpoint format: no text token embedding (expected "
      "'token_embedding.weight' (OpenAI / open_clip) or 'text_model.embeddings."
      f"token_embedding.weight' (HF transformers)); its first keys: {shown}")


def _count_layers(sd, pattern):
  return len({int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m})


def _require(sd, keys, source):
  missing = [k for k in keys if k not in sd]
  if missing:
    more = f" (and {len(missing) - 12} more)" if len(missing) > 12 else ""
    raise WstalError(f"{source}: checkpoint lacks the keys {', '.join(missing[:12])}{more}")


def _shape_error(source, key, got, want):
  raise WstalError(f"{source}: {key} has shape {tuple(got)}, expected {tuple(want)}")


def _openai_params(sd, config, source):
  d, layers = config.width, config.layers
  keys = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
          "text_projection"]
  for i in range(layers):
    b = f"transformer.resblocks.{i}."
    keys += [b + s for s in (
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
        "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
  _require(sd, keys, source)
  f32 = lambda k: np.asarray(sd[k], np.float32)  # noqa: E731
  params = {"token_embedding": {"embedding": f32("token_embedding.weight")},
            "positional_embedding": f32("positional_embedding"),
            "ln_final": {"scale": f32("ln_final.weight"), "bias": f32("ln_final.bias")},
            "text_projection": f32("text_projection")}
  for i in range(layers):
    b = f"transformer.resblocks.{i}."
    w_3DxD, b_3D = f32(b + "attn.in_proj_weight"), f32(b + "attn.in_proj_bias")
    if w_3DxD.shape != (3 * d, d):
      _shape_error(source, b + "attn.in_proj_weight", w_3DxD.shape, (3 * d, d))
    attn = {name: {"kernel": w_3DxD[j * d:(j + 1) * d].T, "bias": b_3D[j * d:(j + 1) * d]}
            for j, name in enumerate(("q_proj", "k_proj", "v_proj"))}
    attn["out_proj"] = {"kernel": f32(b + "attn.out_proj.weight").T,
                        "bias": f32(b + "attn.out_proj.bias")}
    params[f"resblocks_{i}"] = {
        "ln_1": {"scale": f32(b + "ln_1.weight"), "bias": f32(b + "ln_1.bias")},
        "attn": attn,
        "ln_2": {"scale": f32(b + "ln_2.weight"), "bias": f32(b + "ln_2.bias")},
        "mlp": {"c_fc": {"kernel": f32(b + "mlp.c_fc.weight").T, "bias": f32(b + "mlp.c_fc.bias")},
                "c_proj": {"kernel": f32(b + "mlp.c_proj.weight").T,
                           "bias": f32(b + "mlp.c_proj.bias")}}}
  return params


def _hf_params(sd, config, source):
  keys = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
          "final_layer_norm.weight", "final_layer_norm.bias", "text_projection.weight"]
  for i in range(config.layers):
    b = f"encoder.layers.{i}."
    keys += [b + f"{m}.{p}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
        "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")]
  _require(sd, keys, source)
  f32 = lambda k: np.asarray(sd[k], np.float32)  # noqa: E731
  dense = lambda k: {"kernel": f32(k + ".weight").T, "bias": f32(k + ".bias")}  # noqa: E731
  norm = lambda k: {"scale": f32(k + ".weight"), "bias": f32(k + ".bias")}  # noqa: E731
  params = {"token_embedding": {"embedding": f32("embeddings.token_embedding.weight")},
            "positional_embedding": f32("embeddings.position_embedding.weight"),
            "ln_final": norm("final_layer_norm"),
            "text_projection": f32("text_projection.weight").T}
  for i in range(config.layers):
    b = f"encoder.layers.{i}."
    params[f"resblocks_{i}"] = {
        "ln_1": norm(b + "layer_norm1"),
        "attn": {n: dense(b + f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj",
                                                          "out_proj")},
        "ln_2": norm(b + "layer_norm2"),
        "mlp": {"c_fc": dense(b + "mlp.fc1"), "c_proj": dense(b + "mlp.fc2")}}
  return params


def _hf_text_config(config):
  if not config:
    return {}
  if "text_config" in config:  # CLIPModel's config.json
    return config["text_config"] or {}
  return config if "hidden_act" in config or "num_attention_heads" in config else {}


def _open_clip_text_config(config):
  model_cfg = (config or {}).get("model_cfg")
  return model_cfg if isinstance(model_cfg, dict) else {}


def _check_shape(source, key, arr, want):
  if tuple(np.shape(arr)) != tuple(want):
    _shape_error(source, key, np.shape(arr), want)


def convert_state_dict(sd, *, source: str = "checkpoint", kind: str = "torch",
                       checkpoint_config: dict | None = None, activation: str | None = None,
                       heads: int | None = None):
  """CLIP state dict (name -> array) -> (ClipTextEncoder params, ClipTextConfig).

  Args:
    sd: the checkpoint's tensors (numpy or torch); visual keys are ignored.
    source: file name for error messages.
    kind: "torchscript" marks an OpenAI archive (QuickGELU).
    checkpoint_config: the HF config.json or open_clip_config.json dict, if any.
    activation: one of clip_text.ACTIVATIONS; overrides what the checkpoint implies.
    heads: attention heads; default from the config, else width // 64.
  Raises:
    WstalError: unknown format, missing keys (named), inconsistent shapes, or an activation
      the checkpoint does not determine and that was not given.
  """
  sd = {k: _tensor_to_numpy(v) for k, v in sd.items()
        if isinstance(k, str) and not k.startswith(_SKIP_PREFIXES)}
  layout, text = _detect_layout(sd, source)
  if activation is not None and activation not in ACTIVATIONS:
    raise WstalError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  pooling, sot_id, eot_id, eps = "argmax", 49406, 49407, 1e-5
  if layout == "openai":
    vocab, width = np.shape(text["token_embedding.weight"])
    _require(text, ["positional_embedding", "text_projection", "transformer.resblocks.0.mlp."
                    "c_fc.weight"], source)
    layers = _count_layers(text, r"transformer\.resblocks\.(\d+)\.")
    context, output_dim = np.shape(text["positional_embedding"])[0], np.shape(
        text["text_projection"])[-1]
    mlp_dim = np.shape(text["transformer.resblocks.0.mlp.c_fc.weight"])[0]
    oc_cfg = _open_clip_text_config(checkpoint_config)
    oc_text = oc_cfg.get("text_cfg") or {}
    heads = heads or oc_text.get("heads")
    if activation is None:
      if kind == "torchscript" or any(m in sd for m in _OPENAI_MARKERS):
        activation = "quick_gelu"
      elif oc_cfg:
        activation = "quick_gelu" if oc_cfg.get("quick_gelu") else "gelu"
  else:
    vocab, width = np.shape(text["embeddings.token_embedding.weight"])
    _require(text, ["embeddings.position_embedding.weight", "text_projection.weight",
                    "encoder.layers.0.mlp.fc1.weight"], source)
    layers = _count_layers(text, r"encoder\.layers\.(\d+)\.")
    context = np.shape(text["embeddings.position_embedding.weight"])[0]
    output_dim = np.shape(text["text_projection.weight"])[0]
    mlp_dim = np.shape(text["encoder.layers.0.mlp.fc1.weight"])[0]
    hf = _hf_text_config(checkpoint_config)
    heads = heads or hf.get("num_attention_heads")
    eps = float(hf.get("layer_norm_eps") or eps)
    eos = hf.get("eos_token_id")
    if isinstance(eos, int) and eos != 2:  # legacy configs say bos 0, eos 2: both wrong
      pooling, eot_id = "eot_id", eos
      if isinstance(hf.get("bos_token_id"), int):
        sot_id = hf["bos_token_id"]
    if activation is None and hf.get("hidden_act") is not None:
      activation = _HF_ACTIVATIONS.get(hf["hidden_act"])
      if activation is None:
        raise WstalError(f"{source}: config hidden_act {hf['hidden_act']!r} is not supported "
                         f"(known: {sorted(_HF_ACTIVATIONS)})")
  if activation is None:
    raise WstalError(
        f"{source}: the checkpoint does not record its MLP activation: pass --activation="
        "quick_gelu (OpenAI weights, open_clip '-quickgelu' models) or --activation=gelu "
        "(open_clip LAION-trained models)")
  if heads is None:
    heads = max(width // 64, 1)
  try:
    config = ClipTextConfig(
        width=int(width), layers=int(layers), heads=int(heads), output_dim=int(output_dim),
        vocab_size=int(vocab), context_length=int(context),
        mlp_dim=None if mlp_dim == 4 * width else int(mlp_dim), activation=activation,
        pooling=pooling, sot_token_id=min(sot_id, int(vocab) - 2),
        eot_token_id=int(eot_id) if pooling == "eot_id" else min(eot_id, int(vocab) - 1),
        layer_norm_eps=eps)
  except WstalError as e:
    raise WstalError(f"{source}: {e}") from None
  params = (_openai_params if layout == "openai" else _hf_params)(text, config, source)
  validate_params(params, config, source)
  return params, config


def expected_shapes(config: ClipTextConfig) -> dict:
  """'/'-joined param path -> shape of a ClipTextEncoder with this config (no compute)."""
  tree = jax.eval_shape(lambda: ClipTextEncoder(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, config.context_length), jnp.int32)))["params"]
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def validate_params(params, config: ClipTextConfig, source: str = "params"):
  """Raises WstalError naming missing / unexpected / mis-shaped params (or non-finite ones)."""
  want = expected_shapes(config)
  got = flatten(params)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing or extra:
    raise WstalError(f"{source}: params do not match the CLIP text config: missing "
                     f"{missing[:12]}, unexpected {extra[:12]}")
  for k, shape in want.items():
    _check_shape(source, k, got[k], shape)
    if not np.all(np.isfinite(got[k])):
      raise WstalError(f"{source}: {k} holds NaN or inf")


def flatten(tree, prefix=""):
  """Nested dict -> {'a/b/c': leaf}."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def unflatten(flat):
  """{'a/b/c': leaf} -> nested dict."""
  tree = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def load_clip_text(path: str, *, activation: str | None = None, heads: int | None = None):
  """Our .npz (no torch needed) or any supported checkpoint -> (params, ClipTextConfig).

  What training calls. `activation` / `heads` apply to checkpoints only (an .npz records its
  config). Raises WstalError for a missing file, an unknown format or missing keys.
  """
  if path.endswith(".npz") and os.path.isfile(path):
    return load_npz(path)
  sd, kind, cfg = read_checkpoint(path)
  return convert_state_dict(sd, source=path, kind=kind, checkpoint_config=cfg,
                            activation=activation, heads=heads)


# ----------------------------------------------------------------------------------- npz ---
def save_npz(path: str, params, config: ClipTextConfig, overwrite: bool = False):
  """Writes params + config to `path` atomically (temporary name, fsync, rename)."""
  validate_params(params, config, path)
  if os.path.exists(path) and not overwrite:
    raise WstalError(f"{path}: already exists (pass --overwrite to replace it)")
  out_dir = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(out_dir):
    raise WstalError(f"{path}: output directory {out_dir} does not exist")
  arrays = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  arrays[CONFIG_KEY] = np.array(json.dumps(config.to_dict(), sort_keys=True))
  tmp = os.path.join(out_dir, f".{os.path.basename(path)}.tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(results_io.npz_bytes(arrays, compress=False))   # np.savez, minus its timestamps
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_npz(path: str):
  """.npz written by `save_npz` -> (params, ClipTextConfig), shapes validated."""
  if not os.path.isfile(path):
    raise WstalError(f"{path}: converted CLIP text params not found")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise WstalError(f"{path}: not a readable .npz ({e})") from e
  if CONFIG_KEY not in arrays:
    raise WstalError(f"{path}: no '{CONFIG_KEY}' entry; not written by "
                     "wstal_jax.models.clip_convert")
  try:
    config = ClipTextConfig.from_dict(json.loads(str(arrays.pop(CONFIG_KEY))), source=path)
  except (ValueError, TypeError) as e:
    raise WstalError(f"{path}: bad '{CONFIG_KEY}' entry ({e})") from e
  params = unflatten(arrays)
  validate_params(params, config, path)
  return params, config


# ----------------------------------------------------------------------------------- CLI ---
def build_parser():
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.models.clip_convert",
      description="Convert a CLIP checkpoint's text tower to a wstal_jax .npz.")
  p.add_argument("--checkpoint", required=True,
                 help="OpenAI .pt, open_clip .pt/.bin/.safetensors, or HF file / directory")
  p.add_argument("--out", required=True, help="output .npz")
  p.add_argument("--activation", choices=ACTIVATIONS, default=None,
                 help="MLP activation when the checkpoint does not imply it")
  p.add_argument("--heads", type=int, default=None,
                 help="attention heads (default: the checkpoint's config, else width // 64)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return p


@cli_main
def main(argv=None):
  args = build_parser().parse_args(argv)
  if args.heads is not None and args.heads < 1:
    raise WstalError(f"--heads must be >= 1, got {args.heads}")
  params, config = load_clip_text(args.checkpoint, activation=args.activation,
                                   heads=args.heads)
  save_npz(args.out, params, config, overwrite=args.overwrite)
  n = sum(int(np.size(v)) for v in flatten(params).values())
  print(f"wrote {args.out}: {n:,} params, {config}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
