"""CLIP text tower (models/clip_text.py), tokenizer (clip_tokenizer.py), converter
(clip_convert.py).

Expected token ids below were produced by OpenAI's reference SimpleTokenizer (clip/simple_
tokenizer.py with ftfy 6.3.1, from clip-anytorch 2.6.0) and are hard-coded, so a tokenizer
that is wrong fails even where no reference is installed.
"""
import gzip
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wstal_jax.errors import WstalError
from wstal_jax.models import clip_convert
from wstal_jax.models import clip_text
from wstal_jax.models import clip_tokenizer

# (class id, ids, words, ids) for the 20 THUMOS14 classes.
THUMOS_IDS = [
    ("BaseballPitch", [23479, 5872], "baseball pitch", [3470, 5872]),
    ("BasketballDunk", [40023, 17222], "basketball dunk", [3835, 17222]),
    ("Billiards", [7693, 1654], "billiards", [7693, 1654]),
    ("CleanAndJerk", [3572, 672, 23917], "clean and jerk", [3772, 537, 23917]),
    ("CliffDiving", [23827, 9886], "cliff diving", [10625, 9886]),
    ("CricketBowling", [21859, 10390], "cricket bowling", [5373, 10390]),
    ("CricketShot", [21859, 2000], "cricket shot", [5373, 2000]),
    ("Diving", [9886], "diving", [9886]),
    ("FrisbeeCatch", [37252, 571, 747, 15938], "frisbee catch", [45768, 3042]),
    ("GolfSwing", [9096, 7429], "golf swing", [3096, 7429]),
    ("HammerThrow", [15331, 6293], "hammer throw", [9401, 6293]),
    ("HighJump", [1487, 6423], "high jump", [1400, 6423]),
    ("JavelinThrow", [6234, 25353, 6293], "javelin throw", [41701, 6293]),
    ("LongJump", [4792, 6423], "long jump", [1538, 6423]),
    ("PoleVault", [26682, 15240], "pole vault", [8170, 15240]),
    ("Shotput", [9805, 1983], "shotput", [9805, 1983]),
    ("SoccerPenalty", [16268, 11491], "soccer penalty", [4233, 11491]),
    ("TennisSwing", [31504, 7429], "tennis swing", [5298, 7429]),
    ("ThrowDiscus", [3315, 41828], "throw discus", [6293, 41828]),
    ("VolleyballSpiking", [7130, 3807, 3174, 674], "volleyball spiking", [7458, 3174, 674]),
]
OTHER_IDS = [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("A video of a person doing high jump.", [320, 1455, 539, 320, 2533, 1960, 1400, 6423, 269]),
    ("Hello, world!!", [3306, 267, 1002, 748]),
    ("I'll we've they're", [328, 1342, 649, 1200, 889, 982]),
    ("don't", [847, 713]),
    ("caf\u00e9 na\u00efve r\u00e9sum\u00e9", [15304, 1097, 35689, 563, 29106, 7054, 4166]),
    ("\u201ccurly quotes\u201d \u2018single\u2019", [257, 20795, 5808, 257, 568, 17005, 262]),
    ("\ufb01ne \ufb02ow", [3797, 5608]),
    ("\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48\u3000\uff54\uff45\uff58\uff54",
     [9407, 23571, 4160]),
    ("&amp; html &lt;b&gt;", [261, 18231, 283, 321, 285]),
    ("&amp;amp;amp;", [261]),
    ("<b>&amp;amp;</b>", [283, 321, 29, 5, 34308, 321, 285]),
    ("emoji \U0001f600\U0001f389", [16327, 12832, 3986]),
    ("\u4e2d\u6587\u5b57\u7b26", [19759, 255, 29032, 229, 35751, 245, 163, 105, 355]),
    ("\u00c4\u00d6\u00dc stra\u00dfe", [10896, 7255, 47177, 1894, 127, 253, 324]),
    ("x\u00b2+y\u00b3 3.14", [343, 41175, 266, 344, 126, 367, 274, 269, 272, 275]),
    ("a<|endoftext|>b", [320, 49407, 321]),
    ("!<|endoftext|>", [0, 27, 347, 40786, 4160, 91, 285]),
    ("tab\tand\nnewline   spaces", [14724, 537, 1218, 1148, 9006]),
    ("\x1b[31mred\x1b[0m ctrl\x07bell", [736, 35602, 75, 3718]),
    ("\ufeffbom \x85", [19469, 959]),
    ("e\u0301 \u0130stanbul", [4166, 328, 16384, 11231]),
    ("\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
     [26302, 16370, 29503, 110, 22176, 141, 480, 38018, 16701, 141, 478]),
]
ALL_IDS = ([(a, ia) for a, ia, _, _ in THUMOS_IDS] + [(b, ib) for _, _, b, ib in THUMOS_IDS]
           + OTHER_IDS)
PREFIX_IDS = [320, 1455, 539, 320]  # "a video of a"
SUFFIX_IDS = [530, 320, 3390, 269]  # "in a stadium ."


def _instant_tokenizer():
  pytest.importorskip("instant_clip_tokenizer",
                      reason="instant-clip-tokenizer (the default CLIP vocabulary) not installed")
  return clip_tokenizer.ClipTokenizer()


# ------------------------------------------------------------------------------ tokenizer ---
def test_tokenizer_matches_reference_ids():
  tok = _instant_tokenizer()
  assert tok.backend == "instant-clip-tokenizer"
  wrong = [(text, tok.encode(text), ids) for text, ids in ALL_IDS if tok.encode(text) != ids]
  assert not wrong
  row = tok.tokenize("a photo of a cat")
  assert row.shape == (1, 77) and row.dtype == np.int32
  assert row[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert not row[0, 7:].any()


def test_tokenizer_vocab_file_matches_reference_ids():
  path = os.environ.get("WSTAL_CLIP_BPE_VOCAB") or clip_tokenizer.find_packaged_vocab()
  if not path:
    pytest.skip("no bpe_simple_vocab_16e6.txt.gz (set WSTAL_CLIP_BPE_VOCAB to test it)")
  tok = clip_tokenizer.ClipTokenizer(path)
  assert (tok.sot_id, tok.eot_id) == (49406, 49407)
  wrong = [(text, tok.encode(text), ids) for text, ids in ALL_IDS if tok.encode(text) != ids]
  assert not wrong


def _toy_vocab(tmp_path, merges, name="toy_vocab.txt.gz"):
  path = str(tmp_path / name)
  text = "#version: toy\n" + "".join(f"{a} {b}\n" for a, b in merges)
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write(text)
  return path


def test_file_bpe_on_a_toy_vocabulary(tmp_path):
  path = _toy_vocab(tmp_path, [("t", "h"), ("th", "e</w>"), ("a", "t</w>")])
  with pytest.raises(WstalError, match="3 BPE merges"):
    clip_tokenizer.ClipTokenizer(path)
  tok = clip_tokenizer.ClipTokenizer(path, require_full_vocab=False)
  assert (tok.sot_id, tok.eot_id) == (515, 516)
  # ids 0..255 bytes, 256..511 bytes + </w>, then one id per merge; 'x' is byte symbol 87.
  assert tok.encode("The") == [513]
  assert tok.encode("that x") == [512, 514, 256 + 87]
  assert tok.encode("<|startoftext|>the") == [515, 513]
  assert tok.tokenize(["the", "that"], context_length=5).tolist() == [
      [515, 513, 516, 0, 0], [515, 512, 514, 516, 0]]


def test_tokenizer_errors(tmp_path):
  with pytest.raises(WstalError, match="nope.txt.gz: CLIP BPE vocabulary file not found"):
    clip_tokenizer.ClipTokenizer(str(tmp_path / "nope.txt.gz"))
  bad = tmp_path / "bad.txt"
  bad.write_text("#version\na b\nthree parts here\n")
  with pytest.raises(WstalError, match="bad.txt: line 3"):
    clip_tokenizer.ClipTokenizer(str(bad))
  tok = clip_tokenizer.ClipTokenizer(_toy_vocab(tmp_path, [("t", "h")]),
                                     require_full_vocab=False)
  with pytest.raises(WstalError, match="longer than the CLIP context length 4"):
    tok.tokenize("a b c", context_length=4)
  assert tok.tokenize("a b c", context_length=4, truncate=True)[0, -1] == tok.eot_id


def test_tokenizer_without_any_vocabulary(monkeypatch):
  monkeypatch.setitem(sys.modules, "instant_clip_tokenizer", None)  # package not installed
  monkeypatch.setattr(clip_tokenizer, "find_packaged_vocab", lambda: None)
  with pytest.raises(WstalError, match="install instant-clip-tokenizer==0.1.1 or pass "
                                       "--clip_bpe_vocab="):
    clip_tokenizer.ClipTokenizer()


def test_split_camel_case():
  for cls, _, words, _ in THUMOS_IDS:
    assert clip_text.split_camel_case(cls) == words
  assert clip_text.split_camel_case("Clean_and_Jerk") == "clean and jerk"


# ------------------------------------------------------------------ OpenAI layout parity ---
def _random_openai_state_dict(rng, *, width=128, layers=2, vocab=1000, context=16, out=48,
                              dtype=np.float32):
  """Exact OpenAI CLIP key names and shapes (text tower + a visual key to be ignored)."""
  def n(*shape, std=0.05):
    return (rng.standard_normal(shape) * std).astype(dtype)
  sd = {"token_embedding.weight": n(vocab, width, std=0.5),
        "positional_embedding": n(context, width, std=0.1),
        "ln_final.weight": 1 + n(width, std=0.1), "ln_final.bias": n(width),
        "text_projection": n(width, out, std=width ** -0.5),
        "visual.conv1.weight": n(8, 3, 2, 2), "logit_scale": np.array(4.6, dtype)}
  for i in range(layers):
    p = f"transformer.resblocks.{i}."
    sd.update({
        p + "ln_1.weight": 1 + n(width, std=0.1), p + "ln_1.bias": n(width),
        p + "attn.in_proj_weight": n(3 * width, width, std=0.15),
        p + "attn.in_proj_bias": n(3 * width),
        p + "attn.out_proj.weight": n(width, width, std=0.1), p + "attn.out_proj.bias": n(width),
        p + "ln_2.weight": 1 + n(width, std=0.1), p + "ln_2.bias": n(width),
        p + "mlp.c_fc.weight": n(4 * width, width, std=0.1), p + "mlp.c_fc.bias": n(4 * width),
        p + "mlp.c_proj.weight": n(width, 4 * width, std=0.05),
        p + "mlp.c_proj.bias": n(width)})
  return sd


def _layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _openai_forward_numpy(sd, ids_NxL, heads):
  """OpenAI CLIP encode_text, written directly in float64 numpy (independent of our code)."""
  f = lambda k: np.asarray(sd[k], np.float64)  # noqa: E731
  n, l = ids_NxL.shape
  x = f("token_embedding.weight")[ids_NxL] + f("positional_embedding")[:l]
  d = x.shape[-1]
  dh = d // heads
  mask = np.triu(np.full((l, l), -np.inf), 1)  # CLIP's build_attention_mask
  i = 0
  while f"transformer.resblocks.{i}.ln_1.weight" in sd:
    p = f"transformer.resblocks.{i}."
    h = _layer_norm(x, f(p + "ln_1.weight"), f(p + "ln_1.bias"))
    qkv = h @ f(p + "attn.in_proj_weight").T + f(p + "attn.in_proj_bias")
    q, k, v = (t.reshape(n, l, heads, dh).transpose(0, 2, 1, 3)
               for t in np.split(qkv, 3, axis=-1))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + mask
    s = np.exp(s - s.max(-1, keepdims=True))
    a = s / s.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(n, l, d)
    x = x + o @ f(p + "attn.out_proj.weight").T + f(p + "attn.out_proj.bias")
    h = _layer_norm(x, f(p + "ln_2.weight"), f(p + "ln_2.bias"))
    m = h @ f(p + "mlp.c_fc.weight").T + f(p + "mlp.c_fc.bias")
    m = m / (1 + np.exp(-1.702 * m))
    x = x + m @ f(p + "mlp.c_proj.weight").T + f(p + "mlp.c_proj.bias")
    i += 1
  x = _layer_norm(x, f("ln_final.weight"), f("ln_final.bias"))
  pooled = x[np.arange(n), ids_NxL.argmax(-1)]
  return pooled @ f("text_projection"), x


def _random_ids(rng, n, l, vocab, eot, eot_pos):
  ids = rng.integers(1, eot, size=(n, l)).astype(np.int32)
  ids[:, 0] = vocab - 2
  for r, pos in enumerate(eot_pos):
    ids[r, pos] = eot
    ids[r, pos + 1:] = 0
  return ids


def _save_torchscript(sd, path):
  """A TorchScript archive holding `sd` under its dotted names, like OpenAI's ViT-B-16.pt."""
  torch = pytest.importorskip("torch", reason="torch is needed for .pt checkpoints")

  class Node(torch.nn.Module):
    pass

  class Root(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return x

  root = Root()
  for key, value in sd.items():
    *parents, leaf = key.split(".")
    mod = root
    for p in parents:
      if not hasattr(mod, p):
        mod.add_module(p, Node())
      mod = getattr(mod, p)
    t = torch.as_tensor(value)
    if t.is_floating_point() and t.ndim:
      mod.register_parameter(leaf, torch.nn.Parameter(t))
    else:
      mod.register_buffer(leaf, t)
  with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; OpenAI ships it
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.jit.script(root).save(path)


@pytest.mark.parametrize("via", ["torchscript", "safetensors"])
def test_openai_layout_parity(tmp_path, via):
  """Against a direct float64 re-implementation of OpenAI's forward; safetensors needs no
  torch, so this runs everywhere."""
  rng = np.random.default_rng(0)
  sd = _random_openai_state_dict(rng, dtype=np.float16)  # OpenAI's archives are float16
  if via == "torchscript":
    sd.update(input_resolution=np.array(224), context_length=np.array(16),
              vocab_size=np.array(1000))
    path = str(tmp_path / "ViT-B-16.pt")
    _save_torchscript(sd, path)
    params, config = clip_convert.load_clip_text(path)  # OpenAI archive: QuickGELU implied
  else:
    path = str(tmp_path / "open_clip_model.safetensors")
    _write_safetensors(path, {"text." + k: v for k, v in sd.items()})  # CustomTextCLIP keys
    params, config = clip_convert.load_clip_text(path, activation="quick_gelu")
  assert config == clip_text.ClipTextConfig(
      width=128, layers=2, heads=2, output_dim=48, vocab_size=1000, context_length=16,
      activation="quick_gelu", sot_token_id=998, eot_token_id=999)
  ids = _random_ids(rng, 4, 16, 1000, 999, eot_pos=[2, 7, 11, 15])
  text, hidden = clip_text.ClipTextEncoder(config).apply({"params": params}, ids,
                                                          return_hidden=True)
  ref_text, ref_hidden = _openai_forward_numpy(sd, ids, heads=2)
  np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(text), ref_text, atol=1e-5, rtol=0)


def test_open_clip_state_dict_prefixes_and_activation(tmp_path):
  torch = pytest.importorskip("torch", reason="torch is needed for .pt checkpoints")
  rng = np.random.default_rng(1)
  sd = _random_openai_state_dict(rng, width=64, layers=1)
  wrapped = {"epoch": 3, "state_dict": {"module." + k: torch.from_numpy(v) for k, v in
                                        sd.items()}}
  path = str(tmp_path / "epoch_3.pt")
  torch.save(wrapped, path)
  with pytest.raises(WstalError, match="epoch_3.pt: .*--activation=quick_gelu"):
    clip_convert.load_clip_text(path)
  params, config = clip_convert.load_clip_text(path, activation="quick_gelu", heads=4)
  assert (config.heads, config.layers, config.activation) == (4, 1, "quick_gelu")
  ids = _random_ids(rng, 2, 16, 1000, 999, eot_pos=[5, 15])
  text = clip_text.ClipTextEncoder(config).apply({"params": params}, ids)
  np.testing.assert_allclose(np.asarray(text), _openai_forward_numpy(sd, ids, heads=4)[0],
                             atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ HF parity -----
@pytest.mark.parametrize("eos,act,via", [(500, "gelu", "save_pretrained"),
                                         (2, "quick_gelu", "state_dict")])
def test_hf_transformers_parity(tmp_path, eos, act, via):
  torch = pytest.importorskip("torch", reason="torch is needed for the HF reference")
  transformers = pytest.importorskip("transformers", reason="HF parity needs transformers")
  torch.manual_seed(0)
  hf_config = transformers.CLIPTextConfig(
      vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, projection_dim=32, hidden_act=act,
      eos_token_id=eos, bos_token_id=998 if eos != 2 else 0, pad_token_id=1)
  model = transformers.CLIPTextModelWithProjection(hf_config).eval()
  with torch.no_grad():  # non-trivial LayerNorm affine parameters
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  if via == "save_pretrained":
    model.save_pretrained(str(tmp_path / "hf"))
    params, config = clip_convert.load_clip_text(str(tmp_path / "hf"))
    assert (config.pooling, config.eot_token_id, config.sot_token_id) == ("eot_id", 500, 998)
  else:
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(model.state_dict(), path)
    params, config = clip_convert.load_clip_text(path, activation=act, heads=4)
    assert config.pooling == "argmax"  # HF's legacy eos_token_id == 2 pools at the argmax
  assert (config.width, config.layers, config.heads, config.output_dim, config.activation) == (
      64, 2, 4, 32, act)
  rng = np.random.default_rng(2)
  # EOT at different positions, with larger ids before it (argmax and eos pooling differ).
  ids = rng.integers(501, 998, size=(4, 16)).astype(np.int32)
  for r, pos in enumerate([1, 6, 10, 15]):
    ids[r, pos] = 500
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long())
  text, hidden = clip_text.ClipTextEncoder(config).apply({"params": params}, ids,
                                                          return_hidden=True)
  np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-5,
                             rtol=0)
  np.testing.assert_allclose(np.asarray(text), out.text_embeds.numpy(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------- prompt hook ----
def _prompted_setup():
  """A small prompted encoder (full CLIP vocabulary) with numpy-drawn params (fast)."""
  config = clip_text.ClipTextConfig(width=64, layers=2, heads=4, output_dim=32)
  model = clip_text.PromptedClassEncoder(config, n_pre=4, n_post=4)
  name_ids = np.array([[1400, 6423, 0], [7458, 3174, 674], [9886, 0, 0]], np.int32)
  name_len = np.array([2, 3, 1], np.int32)  # high jump / volleyball spiking / diving
  rng = np.random.default_rng(6)
  shapes = jax.eval_shape(clip_text.ClipTextEncoder(config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 77), jnp.int32))["params"]
  clip_params = jax.tree_util.tree_map_with_path(
      lambda path, x: (1.0 if path[-1].key == "scale" else 0.0)
      + 0.1 * rng.standard_normal(x.shape).astype(np.float32), shapes)
  params = clip_text.init_prompt_params(jax.random.PRNGKey(0), model, clip_params)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), name_ids, name_len)["params"]
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(params)
  assert jax.tree_util.tree_map(jnp.shape, abstract) == jax.tree_util.tree_map(jnp.shape,
                                                                              params)
  return config, model, params, name_ids, name_len


def test_prompted_encoder_equals_plain_encoder_on_the_full_sentence():
  config, model, params, name_ids, name_len = _prompted_setup()
  assert params["ctx_pre"].shape == (4, 64) and params["ctx_post"].shape == (4, 64)
  assert 0.005 < float(jnp.std(params["ctx_pre"])) < 0.02  # N(0, 0.01^2)
  table = params["clip"]["token_embedding"]["embedding"]
  params = {**params, "ctx_pre": table[np.array(PREFIX_IDS)],
            "ctx_post": table[np.array(SUFFIX_IDS)]}
  text, hidden = jax.jit(model.apply, static_argnames="return_hidden")(
      {"params": params}, name_ids, name_len, return_hidden=True)
  full = np.zeros((3, 77), np.int32)
  for c in range(3):
    seq = [49406, *PREFIX_IDS, *name_ids[c, :name_len[c]], *SUFFIX_IDS, 49407]
    full[c, :len(seq)] = seq
  assert full[0, :12].tolist() == [49406, 320, 1455, 539, 320, 1400, 6423, 530, 320, 3390,
                                   269, 49407]  # "a video of a high jump in a stadium ."
  ref_text, ref_hidden = jax.jit(clip_text.ClipTextEncoder(config).apply,
                                 static_argnames="return_hidden")(
      {"params": params["clip"]}, full, return_hidden=True)
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(text), np.asarray(ref_text), atol=1e-5, rtol=0)
  assert text.shape == (3, 32)


def test_prompt_gradients_reach_ctx_and_frozen_clip_stays():
  _, model, params, name_ids, name_len = _prompted_setup()
  target = jnp.ones((3, 32))

  def loss_fn(p):
    return jnp.sum((model.apply({"params": p}, name_ids, name_len) - target) ** 2)

  grads = jax.jit(jax.grad(loss_fn))(params)
  assert np.all(np.abs(np.asarray(grads["ctx_pre"])).sum(1) > 0)
  assert np.all(np.abs(np.asarray(grads["ctx_post"])).sum(1) > 0)
  labels = clip_text.prompt_param_labels(params)
  assert labels["ctx_pre"] == "trainable" and labels["clip"]["text_projection"] == "frozen"
  assert clip_text.prompt_param_labels({"params": params})["params"]["clip"][
      "resblocks_0"]["attn"]["q_proj"]["kernel"] == "frozen"
  tx = optax.multi_transform({"trainable": optax.adam(1e-2), "frozen": optax.set_to_zero()},
                             labels)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), new["clip"],
                                params["clip"])
  assert all(jax.tree_util.tree_leaves(same))
  assert not jnp.array_equal(new["ctx_pre"], params["ctx_pre"])
  assert not jnp.array_equal(new["ctx_post"], params["ctx_post"])


def test_tokenize_class_names():
  class FakeTokenizer:
    vocab = {"high": [1400], "jump": [6423], "diving": [9886]}

    def encode(self, text):
      return [i for w in text.split() for i in self.vocab.get(w, [])]

  ids, lens = clip_text.tokenize_class_names(["high jump", "diving"], FakeTokenizer())
  assert ids.tolist() == [[1400, 6423], [9886, 0]] and lens.tolist() == [2, 1]
  assert ids.dtype == np.int32 and lens.dtype == np.int32
  with pytest.raises(WstalError, match="'unknown' has no tokens"):
    clip_text.tokenize_class_names(["unknown"], FakeTokenizer())
  with pytest.raises(WstalError, match="only 1 fit in 11"):
    clip_text.tokenize_class_names(["high jump"], FakeTokenizer(), context_length=11)


def test_tokenize_class_names_thumos():
  tok = _instant_tokenizer()
  ids, lens = clip_text.tokenize_class_names([w for _, _, w, _ in THUMOS_IDS], tok)
  assert ids.shape == (20, 3)
  for row, n, (_, _, _, want) in zip(ids, lens, THUMOS_IDS):
    assert row[:n].tolist() == want and not row[n:].any()


def test_presets_and_config_errors():
  assert clip_text.clip_text_config("RN50") == clip_text.ClipTextConfig(
      width=512, layers=12, heads=8, output_dim=1024)
  vitb16 = clip_text.clip_text_config("ViT-B-16")
  assert (vitb16.width, vitb16.layers, vitb16.heads, vitb16.output_dim) == (512, 12, 8, 512)
  assert vitb16.context_length == 77 and vitb16.vocab_size == 49408
  with pytest.raises(WstalError, match="unknown CLIP text preset"):
    clip_text.clip_text_config("ViT-X/99")
  with pytest.raises(WstalError, match="not a multiple of heads"):
    clip_text.ClipTextConfig(width=100, heads=8)
  with pytest.raises(WstalError, match="activation"):
    clip_text.ClipTextConfig(activation="relu")


# ------------------------------------------------------------------- converter errors ----
def _write_safetensors(path, arrays):
  """Minimal .safetensors writer (the format: u64 header size, JSON header, raw bytes)."""
  header, blobs, offset = {}, [], 0
  for name, arr in arrays.items():
    arr = np.ascontiguousarray(arr, np.float32)
    header[name] = {"dtype": "F32", "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    blobs.append(arr.tobytes())
    offset += arr.nbytes
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def test_converter_errors(tmp_path, monkeypatch):
  with pytest.raises(WstalError, match="missing.pt: checkpoint not found"):
    clip_convert.load_clip_text(str(tmp_path / "missing.pt"))
  unknown = str(tmp_path / "resnet.safetensors")
  _write_safetensors(unknown, {"fc.weight": np.zeros((2, 2))})
  with pytest.raises(WstalError, match="resnet.safetensors: unknown checkpoint format.*fc.weight"):
    clip_convert.load_clip_text(unknown)
  sd = _random_openai_state_dict(np.random.default_rng(3), width=64, layers=2)
  del sd["transformer.resblocks.1.mlp.c_proj.bias"], sd["ln_final.bias"]
  broken = str(tmp_path / "broken.safetensors")
  _write_safetensors(broken, sd)
  with pytest.raises(WstalError, match="broken.safetensors: checkpoint lacks the keys "
                                       "ln_final.bias, transformer.resblocks.1.mlp.c_proj.bias"):
    clip_convert.load_clip_text(broken, activation="gelu")
  monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
  plain = tmp_path / "model.pt"
  plain.write_bytes(b"not really")
  with pytest.raises(WstalError, match=r"model.pt: .*torch==2.13.0 to convert .pt"):
    clip_convert.load_clip_text(str(plain))


def test_npz_round_trip_and_cli(tmp_path, capsys):
  sd = _random_openai_state_dict(np.random.default_rng(4), width=64, layers=2)
  src = str(tmp_path / "open_clip_model.safetensors")
  _write_safetensors(src, sd)
  params, config = clip_convert.load_clip_text(src, activation="gelu")
  out = str(tmp_path / "clip_text.npz")
  assert clip_convert.main([f"--checkpoint={src}", f"--out={out}", "--activation=gelu"]) == 0
  assert "wrote" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path)) == ["clip_text.npz", "open_clip_model.safetensors"]
  loaded, loaded_config = clip_convert.load_npz(out)
  assert loaded_config == config and loaded_config.activation == "gelu"
  flat, loaded_flat = clip_convert.flatten(params), clip_convert.flatten(loaded)
  assert flat.keys() == loaded_flat.keys()
  assert all(np.array_equal(flat[k], loaded_flat[k]) and loaded_flat[k].dtype == np.float32
             for k in flat)
  ids = _random_ids(np.random.default_rng(5), 2, 16, 1000, 999, eot_pos=[3, 9])
  model = clip_text.ClipTextEncoder(loaded_config)
  np.testing.assert_array_equal(np.asarray(model.apply({"params": loaded}, ids)),
                                np.asarray(model.apply({"params": params}, ids)))
  # Refuses to overwrite; CLI errors exit 2 with a one-line message.
  with pytest.raises(SystemExit) as e:
    clip_convert.main([f"--checkpoint={src}", f"--out={out}", "--activation=gelu"])
  assert e.value.code == 2 and "clip_text.npz: already exists" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    clip_convert.main([f"--checkpoint={tmp_path / 'nope.pt'}", f"--out={out}x"])
  assert e.value.code == 2 and "nope.pt: checkpoint not found" in capsys.readouterr().err
  # A tampered file names what is missing.
  with np.load(out) as z:
    arrays = {k: z[k] for k in z.files if k != "resblocks_1/mlp/c_fc/bias"}
  tampered = str(tmp_path / "tampered.npz")
  np.savez(tampered, **arrays)
  with pytest.raises(WstalError, match=r"tampered.npz: .*missing \['resblocks_1/mlp/c_fc/bias'\]"):
    clip_convert.load_npz(tampered)
  with pytest.raises(WstalError, match="nothere.npz: converted CLIP text params not found"):
    clip_convert.load_npz(str(tmp_path / "nothere.npz"))
