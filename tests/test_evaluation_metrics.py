"""Evaluation metrics: FID math, the FID Inception, CLIP score, PSNR / SSIM, IS halves."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import transformers
from torch import nn
from torch.nn import functional

from vqdiffusion_jax.convert.common import ConversionError
from vqdiffusion_jax.evaluation import fid, image_metrics, inception

# ``evaluation.clip_score`` is the re-exported function: import from the module by its path.
from vqdiffusion_jax.evaluation.clip_score import (
  CLIP_MEAN,
  CLIP_STD,
  CLIPTextEncoder,
  clip_score,
  convert_text,
  convert_vision,
  load_clip,
  preprocess_images,
)

# ----------------------------------------------------------------------------- FID


def _reference_fid(mu1, sigma1, mu2, sigma2):
  """The classic formula (pytorch-fid / TTUR) with scipy's sqrtm of the product."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def _random_covariance(rng, dim):
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_matches_sqrtm_reference():
  rng = np.random.default_rng(0)
  for dim in (1, 8, 32):
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert isinstance(ours, float)
    np.testing.assert_allclose(ours, _reference_fid(mu1, sigma1, mu2, sigma2), rtol=1e-6)


def test_rank_deficient_covariances():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.3
  ours = fid.fid_from_features(a, b)
  expected = _reference_fid(*fid.feature_statistics(a), *fid.feature_statistics(b))
  assert ours >= 0 and np.isfinite(ours)
  np.testing.assert_allclose(ours, expected, rtol=1e-5)
  same = fid.fid_from_features(a, a)
  assert 0 <= same < 1e-8


def test_identical_sets_and_mean_shift():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
  assert abs(fid.fid_from_features(features, features)) < 1e-8
  mu, sigma = fid.feature_statistics(features)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (16, 16)
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False))
  shift = rng.normal(size=16)
  np.testing.assert_allclose(fid.frechet_distance(mu, sigma, mu + shift, sigma), shift @ shift,
                             rtol=1e-9)
  np.testing.assert_allclose(fid.fid_from_features(features, features + shift), shift @ shift,
                             rtol=1e-7)


def test_fid_input_errors():
  mu, sigma = np.zeros(4), np.eye(4)
  with pytest.raises(ValueError, match="different feature sizes"):
    fid.frechet_distance(mu, sigma, np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match=r"\(D, D\)"):
    fid.frechet_distance(mu, np.eye(3), mu, sigma)
  with pytest.raises(ValueError, match="NaN or Inf"):
    fid.frechet_distance(mu, sigma, np.full(4, np.nan), sigma)
  with pytest.raises(ValueError, match="at least 2"):
    fid.feature_statistics(np.zeros((1, 4)))
  with pytest.raises(ValueError, match="NaN or Inf"):
    fid.feature_statistics(np.array([[0.0, np.inf], [1.0, 2.0]]))


# ----------------------------------------------------------------------- Inception


class _TorchConvBN(nn.Module):
  """torchvision's BasicConv2d, written out: Conv2d (no bias) + BatchNorm2d(eps=1e-3) + ReLU."""

  def __init__(self, cin, cout, kernel=1, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return functional.relu(self.bn(self.conv(x)))


def _fid_pool(x, kind):
  if kind == "max":
    return functional.max_pool2d(x, kernel_size=3, stride=1, padding=1)
  return functional.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _TorchA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = _TorchConvBN(cin, 64)
    self.branch5x5_1 = _TorchConvBN(cin, 48)
    self.branch5x5_2 = _TorchConvBN(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = _TorchConvBN(cin, 64)
    self.branch3x3dbl_2 = _TorchConvBN(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = _TorchConvBN(96, 96, 3, padding=1)
    self.branch_pool = _TorchConvBN(cin, pool_features)

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_fid_pool(x, "avg"))
    return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class _TorchC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
    self.branch1x1 = _TorchConvBN(cin, 192)
    self.branch7x7_1 = _TorchConvBN(cin, c7)
    self.branch7x7_2 = _TorchConvBN(c7, c7, **row)
    self.branch7x7_3 = _TorchConvBN(c7, 192, **col)
    self.branch7x7dbl_1 = _TorchConvBN(cin, c7)
    self.branch7x7dbl_2 = _TorchConvBN(c7, c7, **col)
    self.branch7x7dbl_3 = _TorchConvBN(c7, c7, **row)
    self.branch7x7dbl_4 = _TorchConvBN(c7, c7, **col)
    self.branch7x7dbl_5 = _TorchConvBN(c7, 192, **row)
    self.branch_pool = _TorchConvBN(cin, 192)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    bp = self.branch_pool(_fid_pool(x, "avg"))
    return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class _TorchE(nn.Module):
  def __init__(self, cin, pool):
    super().__init__()
    row, col = {"kernel": (1, 3), "padding": (0, 1)}, {"kernel": (3, 1), "padding": (1, 0)}
    self.pool = pool
    self.branch1x1 = _TorchConvBN(cin, 320)
    self.branch3x3_1 = _TorchConvBN(cin, 384)
    self.branch3x3_2a = _TorchConvBN(384, 384, **row)
    self.branch3x3_2b = _TorchConvBN(384, 384, **col)
    self.branch3x3dbl_1 = _TorchConvBN(cin, 448)
    self.branch3x3dbl_2 = _TorchConvBN(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = _TorchConvBN(384, 384, **row)
    self.branch3x3dbl_3b = _TorchConvBN(384, 384, **col)
    self.branch_pool = _TorchConvBN(cin, 192)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                      self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                      self.branch_pool(_fid_pool(x, self.pool))], 1)


class _TorchB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = _TorchConvBN(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = _TorchConvBN(cin, 64)
    self.branch3x3dbl_2 = _TorchConvBN(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = _TorchConvBN(96, 96, 3, stride=2)

  def forward(self, x):
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), bd, functional.max_pool2d(x, 3, stride=2)], 1)


class _TorchD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = _TorchConvBN(cin, 192)
    self.branch3x3_2 = _TorchConvBN(192, 320, 3, stride=2)
    self.branch7x7x3_1 = _TorchConvBN(cin, 192)
    self.branch7x7x3_2 = _TorchConvBN(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = _TorchConvBN(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = _TorchConvBN(192, 192, 3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    return torch.cat([b3, b7, functional.max_pool2d(x, 3, stride=2)], 1)


class _TorchFIDInception(nn.Module):
  """pytorch-fid's network, written out from torchvision's layout and the FID patches."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = _TorchConvBN(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = _TorchConvBN(32, 32, 3)
    self.Conv2d_2b_3x3 = _TorchConvBN(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = _TorchConvBN(64, 80)
    self.Conv2d_4a_3x3 = _TorchConvBN(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
        _TorchA(192, 32), _TorchA(256, 64), _TorchA(288, 64))
    self.Mixed_6a = _TorchB(288)
    self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (
        _TorchC(768, c7) for c7 in (128, 160, 160, 192))
    self.Mixed_7a = _TorchD(768)
    self.Mixed_7b, self.Mixed_7c = _TorchE(1280, "avg"), _TorchE(2048, "max")
    self.fc = nn.Linear(2048, 1008)

  def forward(self, images):
    x = 2 * images - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(functional.max_pool2d(x, 3, stride=2)))
    x = functional.max_pool2d(x, 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool = x.mean(dim=(2, 3))
    return pool, self.fc(pool)


def _randomize_batch_norms(model, seed):
  gen = torch.Generator().manual_seed(seed)
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      size = module.num_features
      module.weight.data = torch.rand(size, generator=gen) + 0.5
      module.bias.data = torch.randn(size, generator=gen) * 0.1
      module.running_mean.data = torch.randn(size, generator=gen) * 0.1
      module.running_var.data = torch.rand(size, generator=gen) + 0.5
  return model.eval()


@pytest.mark.parametrize("ours, theirs, cin, size", [
    (inception.InceptionA(8), lambda cin: _TorchA(cin, 8), 16, 9),
    (inception.InceptionC(8), lambda cin: _TorchC(cin, 8), 16, 9),
    (inception.InceptionE("avg"), lambda cin: _TorchE(cin, "avg"), 16, 5),
    (inception.InceptionE("max"), lambda cin: _TorchE(cin, "max"), 16, 5),
], ids=["A", "C", "E_1", "E_2"])
def test_block_parity_with_torch(ours, theirs, cin, size):
  torch.manual_seed(0)
  model = _randomize_batch_norms(theirs(cin), seed=1)
  abstract = inception.abstract_params(ours, image_size=size, in_channels=cin)
  state_dict = {k: v for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}
  assert {k: tuple(v.shape) for k, v in state_dict.items()} == \
      inception.state_dict_template(abstract)
  params = inception.params_from_state_dict(model.state_dict(), abstract)
  x = np.random.default_rng(0).normal(size=(2, size, size, cin)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  got = np.asarray(jax.jit(ours.apply)({"params": params}, x))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _random_state_dict(template, seed=0):
  """Random weights of the template's shapes that keep activations O(1) through the net."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in template.items():
    if key.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith(("bn.weight", "running_var")):
      value = rng.uniform(0.5, 1.5, size=shape)
    elif key == "fc.weight":
      value = rng.normal(size=shape) / np.sqrt(shape[1])
    else:
      value = rng.normal(size=shape) * 0.1
    state[key] = torch.from_numpy(value.astype(np.float32))
  return state


@pytest.fixture(scope="module")
def torch_inception():
  """The written-out torch network with random weights that keep activations O(1)."""
  model = _TorchFIDInception().eval()
  model.load_state_dict(_random_state_dict(inception.state_dict_template()), strict=True)
  return model


def test_inception_parity_through_pth(tmp_path, torch_inception):
  template = inception.state_dict_template()
  assert template["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert template["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert template["fc.weight"] == (1008, 2048) and template["fc.bias"] == (1008,)
  state = torch_inception.state_dict()  # with num_batches_tracked buffers, which are ignored
  assert any(k.endswith("num_batches_tracked") for k in state)
  assert {k: tuple(v.shape) for k, v in state.items()
          if not k.endswith("num_batches_tracked")} == template
  torch.save(state, tmp_path / "pt_inception.pth")
  module, params = inception.load_inception(tmp_path / "pt_inception.pth")
  scale, shift = inception.fold_batch_norm(
      *(state[f"Mixed_5b.branch_pool.bn.{k}"].numpy() for k in inception.BN_KEYS))
  np.testing.assert_allclose(params["Mixed_5b"]["branch_pool"]["scale"], scale, rtol=1e-6)
  np.testing.assert_allclose(params["Mixed_5b"]["branch_pool"]["shift"], shift, rtol=1e-6)

  images = np.random.default_rng(0).uniform(size=(2, 75, 75, 3)).astype(np.float32)
  pool, logits = jax.jit(functools.partial(module.apply, resize=False))({"params": params}, images)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.all(np.isfinite(pool)) and np.all(np.isfinite(logits))
  with torch.no_grad():
    pool_ref, logits_ref = torch_inception(torch.from_numpy(images).permute(0, 3, 1, 2))
  assert pool_ref.std() > 0.1 * pool_ref.abs().max()  # the weights do not wash out the input
  for ours, ref in ((pool, pool_ref.numpy()), (logits, logits_ref.numpy())):
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  with pytest.raises(ValueError, match="at least 75"):
    module.apply({"params": params}, images[:, :74, :74], resize=False)

  # The default path resizes to 299 x 299 as pytorch-fid's resize_input does.
  small = images[:1, :64, :48]
  pool, logits = jax.jit(module.apply)({"params": params}, small)
  with torch.no_grad():
    resized = functional.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2), size=(299, 299),
                                     mode="bilinear", align_corners=False)
    pool_ref, logits_ref = torch_inception(resized)
  for ours, ref in ((pool, pool_ref.numpy()), (logits, logits_ref.numpy())):
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_inception_preprocess_resizes_bilinearly():
  images = jnp.full((1, 40, 30, 3), 0.25)
  out = inception.preprocess(images)
  assert out.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(out, -0.5, atol=1e-6)
  ramp = jnp.broadcast_to(jnp.linspace(0.0, 1.0, 598)[None, None, :, None], (1, 4, 598, 3))
  halved = jax.image.resize(ramp, (1, 4, 299, 3), "bilinear", antialias=False)
  torch_halved = functional.interpolate(torch.from_numpy(np.asarray(ramp)).permute(0, 3, 1, 2),
                               size=(4, 299), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(halved, torch_halved.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_inception_state_dict_errors_name_keys(torch_inception):
  state = torch_inception.state_dict()
  del state["Mixed_6c.branch7x7dbl_3.bn.running_var"]
  state["Mixed_6c.extra.weight"] = torch.zeros(3)
  state["fc.bias"] = torch.zeros(1000)
  with pytest.raises(ConversionError) as error:
    inception.params_from_state_dict(state)
  message = str(error.value)
  assert "missing" in message and "Mixed_6c.branch7x7dbl_3.bn.running_var" in message
  assert "unexpected" in message and "Mixed_6c.extra.weight" in message
  assert "fc.bias: (1000,), expected (1008,)" in message


def test_load_inception_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="pt_inception"):
    inception.load_inception(tmp_path / "pt_inception.pth")


# ---------------------------------------------------------------------------- CLIP

def _tiny_tokenizer():
  chars = list("abcdefghijklmnopqrstuvwxyz")
  merges = [("c", "a"), ("ca", "t</w>")]
  tokens = ["!", *chars, *(c + "</w>" for c in chars), "ca", "cat</w>"]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


TOKENIZER = _tiny_tokenizer()
VOCAB = len(TOKENIZER)
EOS = TOKENIZER.eos_token_id
CONTEXT = 16


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  torch.manual_seed(0)
  common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 37}
  config = transformers.CLIPConfig(
      text_config={**common, "vocab_size": VOCAB, "max_position_embeddings": CONTEXT,
                   "eos_token_id": EOS, "bos_token_id": TOKENIZER.bos_token_id,
                   "pad_token_id": 0},
      vision_config={**common, "image_size": 32, "patch_size": 8, "hidden_act": "gelu"},
      projection_dim=16)
  model = transformers.CLIPModel(config).eval()
  path = tmp_path_factory.mktemp("clip")
  model.save_pretrained(str(path))
  without_tokenizer = load_clip(path)
  TOKENIZER.save_pretrained(str(path))
  return model, without_tokenizer, load_clip(path)


def _text_ids(rng, batch=3):
  ids = rng.integers(1, EOS - 1, size=(batch, CONTEXT))
  for row, end in enumerate((5, CONTEXT - 1, 9)[:batch]):
    ids[row, end] = EOS
    ids[row, end + 1:] = 0
  return ids


def test_clip_embeddings_match_transformers(tiny_clip):
  model, embedder, _ = tiny_clip
  assert embedder.tokenizer is None and embedder.vision.activation == "gelu"
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  ids = _text_ids(rng)
  with torch.no_grad():
    image_ref = model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
    text_ref = model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output
  image_ours = embedder.embed_images(pixels.transpose(0, 2, 3, 1), preprocess=False)
  text_ours = embedder.embed_texts(ids)
  assert image_ours.shape == (2, 16) and text_ours.shape == (3, 16)
  np.testing.assert_allclose(image_ours, image_ref.numpy(), rtol=0, atol=1e-4)
  np.testing.assert_allclose(text_ours, text_ref.numpy(), rtol=0, atol=1e-4)

  # Legacy configs (eos_token_id == 2) pool at the largest id instead.
  model.text_model.eos_token_id = 2
  legacy = CLIPTextEncoder(embedder.text.text_model, 16, eos_token_id=2)
  try:
    with torch.no_grad():
      legacy_ref = model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output
  finally:
    model.text_model.eos_token_id = EOS
  np.testing.assert_allclose(legacy.apply({"params": embedder.text_params}, ids),
                             legacy_ref.numpy(), rtol=0, atol=1e-4)


def test_clip_prompts_are_tokenized(tiny_clip):
  model, without_tokenizer, embedder = tiny_clip
  assert embedder.tokenizer.get_vocab() == TOKENIZER.get_vocab()
  prompts = ["a cat", "the big dog"]
  ids = TOKENIZER(prompts, padding="max_length", max_length=CONTEXT, return_tensors="pt")
  with torch.no_grad():
    expected = model.get_text_features(input_ids=ids["input_ids"]).pooler_output.numpy()
  np.testing.assert_allclose(embedder.embed_texts(prompts), expected, rtol=0, atol=1e-4)
  with pytest.raises(ValueError, match="no tokenizer"):
    without_tokenizer.embed_texts(prompts)


def test_clip_preprocess_and_score(tiny_clip):
  _, embedder, _ = tiny_clip
  images = np.full((2, 48, 40, 3), 0.6, np.float32)
  pixels = preprocess_images(images, 32)
  assert pixels.shape == (2, 32, 32, 3)
  expected = (0.6 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  np.testing.assert_allclose(pixels, np.broadcast_to(expected, pixels.shape), atol=1e-5)
  np.testing.assert_allclose(embedder.embed_images(images),
                             embedder.embed_images(pixels, preprocess=False), atol=1e-6)

  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
  b[0] = -a[0]  # a negative cosine scores 0
  cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  scores = clip_score(a, b)
  assert scores.shape == (5,) and scores[0] == 0
  np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), rtol=1e-5, atol=1e-5)


def test_clip_conversion_names_missing_keys(tiny_clip):
  model, embedder, _ = tiny_clip
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  del state["visual_projection.weight"]
  with pytest.raises(ConversionError, match="visual_projection.weight"):
    convert_vision(embedder.vision, state)
  state["text_model.extra"] = np.zeros(2)
  with pytest.raises(ConversionError, match="text_model.extra"):
    convert_text(embedder.text, state)


# ------------------------------------------------------------------- image metrics


def test_psnr_of_known_mse():
  a = jnp.zeros((2, 8, 8, 3))
  b = jnp.stack([jnp.full((8, 8, 3), 0.1), jnp.full((8, 8, 3), 0.01)])
  np.testing.assert_allclose(image_metrics.psnr(a, b), [20.0, 40.0], rtol=1e-5)
  np.testing.assert_allclose(image_metrics.psnr(a, b, max_value=2.0),
                             10 * np.log10(4 / np.array([0.01, 1e-4])), rtol=1e-5)


def _reference_ssim(a, b, max_value=1.0):
  """Wang et al. with an explicit 11 x 11 Gaussian (sigma 1.5), valid region, per channel."""
  offsets = np.arange(11) - 5.0
  g = np.exp(-offsets**2 / (2 * 1.5**2))
  kernel = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
  scores = []
  for x, y in zip(a.astype(np.float64), b.astype(np.float64), strict=True):
    maps = []
    for ch in range(x.shape[-1]):
      filt = lambda z: scipy.ndimage.correlate(z, kernel, mode="constant")[5:-5, 5:-5]
      xc, yc = x[..., ch], y[..., ch]
      mx, my = filt(xc), filt(yc)
      vx, vy, cxy = filt(xc * xc) - mx**2, filt(yc * yc) - my**2, filt(xc * yc) - mx * my
      maps.append((2 * mx * my + c1) * (2 * cxy + c2)
                  / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    scores.append(np.mean(maps))
  return np.array(scores)


def test_ssim_against_numpy_reference():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(3, 24, 20, 3)).astype(np.float32)
  smooth = scipy.ndimage.uniform_filter(a, size=(1, 5, 5, 1))
  b = np.clip(smooth + rng.normal(scale=0.05, size=a.shape), 0, 1).astype(np.float32)
  ssim = jax.jit(image_metrics.ssim)
  np.testing.assert_allclose(ssim(a, b), _reference_ssim(a, b), atol=1e-5)
  np.testing.assert_allclose(image_metrics.ssim(2 * a, 2 * b, max_value=2.0),
                             _reference_ssim(2 * a, 2 * b, 2.0), atol=1e-5)
  np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-6)
  noisy = [np.clip(smooth + s * rng.normal(size=a.shape), 0, 1) for s in (0.02, 0.1, 0.3)]
  scores = np.stack([np.asarray(ssim(smooth, n)) for n in noisy])
  assert np.all(np.diff(scores, axis=0) < 0)
  with pytest.raises(ValueError, match="at least 11"):
    image_metrics.ssim(a[:, :10], b[:, :10])


def test_inception_quality_diversity():
  one_hot = np.eye(4, dtype=np.float32)
  quality, diversity = image_metrics.inception_quality_diversity(one_hot)
  np.testing.assert_allclose([quality, diversity], [1.0, 4.0], rtol=1e-6)
  uniform = np.full((5, 10), 0.1, np.float32)
  quality, diversity = image_metrics.inception_quality_diversity(uniform)
  np.testing.assert_allclose([quality, diversity], [0.1, 10.0], rtol=1e-5)

  probs = np.random.default_rng(0).dirichlet(np.full(7, 0.3), size=20)
  marginal = probs.mean(0)
  kl = np.sum(probs * (np.log(probs) - np.log(marginal)), axis=1)
  inception_score = np.exp(kl.mean())
  quality, diversity = jax.jit(image_metrics.inception_quality_diversity)(probs)
  np.testing.assert_allclose(quality * diversity, inception_score, rtol=1e-5)
  assert 0 < quality <= 1 and 1 <= diversity <= 7


# ---------------------------------------------------- streamed FID statistics, stats files


def test_running_statistics_equal_all_at_once():
  rng = np.random.default_rng(4)
  features = rng.normal(size=(53, 12)) @ rng.normal(size=(12, 12)) + 100.0  # a large mean
  running = fid.RunningStatistics(12)
  for start, stop in ((0, 1), (1, 8), (8, 8), (8, 30), (30, 53)):  # uneven, one empty
    running.update(features[start:stop])
  mu, sigma = running.statistics()
  expected_mu, expected_sigma = fid.feature_statistics(features)
  assert running.count == 53 and mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-14)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-11,
                             atol=1e-12 * np.abs(expected_sigma).max())
  with pytest.raises(ValueError, match=r"\(B, 12\)"):
    running.update(features[:, :5])
  with pytest.raises(ValueError, match="at least 2"):
    one = fid.RunningStatistics(12)
    one.update(features[:1])
    one.statistics()


def test_statistics_files_as_pytorch_fid_writes_them(tmp_path):
  rng = np.random.default_rng(5)
  mu, sigma = rng.normal(size=2048), _random_covariance(rng, 2048)
  np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)  # pytorch-fid's save_fid_stats
  loaded_mu, loaded_sigma = fid.load_statistics(tmp_path / "ref.npz", 2048)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)

  np.savez_compressed(tmp_path / "compressed.npz", mu=mu, sigma=sigma)  # its fid_score --save-stats
  np.testing.assert_array_equal(fid.load_statistics(tmp_path / "compressed.npz")[1], sigma)

  fid.save_statistics(tmp_path / "out" / "ours.npz", mu, sigma)
  with np.load(tmp_path / "out" / "ours.npz") as data:  # as pytorch-fid reads them
    assert sorted(data.files) == ["mu", "sigma"]
    np.testing.assert_array_equal(data["mu"], mu)
    np.testing.assert_array_equal(data["sigma"], sigma)


def test_bad_statistics_files_are_named(tmp_path):
  np.savez(tmp_path / "keys.npz", m=np.zeros(4), s=np.eye(4))
  with pytest.raises(ValueError, match=r"keys\.npz lacks \['mu', 'sigma'\]; it holds \['m', 's'\]"):
    fid.load_statistics(tmp_path / "keys.npz")
  np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(3))
  with pytest.raises(ValueError, match=r"shape\.npz.*\(4,\) and \(3, 3\)"):
    fid.load_statistics(tmp_path / "shape.npz")
  np.savez(tmp_path / "small.npz", mu=np.zeros(4), sigma=np.eye(4))
  assert fid.load_statistics(tmp_path / "small.npz")[0].shape == (4,)
  with pytest.raises(ValueError, match=r"small\.npz has 4-d features; expected 2048"):
    fid.load_statistics(tmp_path / "small.npz", 2048)
  np.save(tmp_path / "single.npy", np.zeros(4))
  with pytest.raises(ValueError, match=r"single\.npy is a single \.npy array"):
    fid.load_statistics(tmp_path / "single.npy")
  (tmp_path / "junk.npz").write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match=r"junk\.npz is not a readable \.npz"):
    fid.load_statistics(tmp_path / "junk.npz")
  with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
    fid.load_statistics(tmp_path / "missing.npz")


# ------------------------------------------------------------------- Inception Score


def _numpy_inception_score(probs, splits, seed):
  """The Inception Score written out: shuffle, cut at i * N // splits, exp(mean KL), mean / std."""
  n = len(probs)
  if seed is not None:
    probs = probs[np.random.RandomState(seed).permutation(n)]
  scores = []
  for i in range(splits):
    chunk = probs[i * n // splits:(i + 1) * n // splits]
    marginal = chunk.mean(axis=0)
    kl = [np.sum([p * np.log(p / q) for p, q in zip(row, marginal, strict=True) if p > 0])
          for row in chunk]
    scores.append(np.exp(np.mean(kl)))
  return np.mean(scores), np.std(scores)


def _torch_inception_score(logits, splits, seed):
  """torch: float64 softmax and log-softmax, shuffled, chunked, exp(mean KL) per chunk."""
  features = torch.from_numpy(logits).double()
  n = features.shape[0]
  if seed is not None:
    features = features[np.random.RandomState(seed).permutation(n)]
  probs, log_probs = features.softmax(dim=1), features.log_softmax(dim=1)
  scores = []
  for i in range(splits):
    chunk = slice(i * n // splits, (i + 1) * n // splits)
    p, log_p = probs[chunk], log_probs[chunk]
    q = p.mean(dim=0, keepdim=True)
    scores.append((p * (log_p - q.log())).sum(dim=1).mean().exp().item())
  return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("seed", [2020, None], ids=["shuffled", "in_order"])
def test_inception_score_against_numpy_and_torch(seed):
  rng = np.random.default_rng(6)
  probs = rng.dirichlet(np.full(13, 0.2), size=47)  # 47 images: splits of 4 and 5
  probs = np.maximum(probs, 1e-300)
  probs /= probs.sum(axis=1, keepdims=True)
  logits = np.log(probs) + rng.normal(size=(47, 1))  # softmax ignores a per-row shift
  expected = _numpy_inception_score(probs, 10, seed)
  np.testing.assert_allclose(image_metrics.inception_score(logits, 10, seed), expected,
                             rtol=1e-10)
  np.testing.assert_allclose(_torch_inception_score(logits, 10, seed), expected, rtol=1e-10)

  streamed = image_metrics.InceptionScoreAccumulator(47, 10, seed)
  for start in range(0, 47, 6):
    streamed.update(logits[start:start + 6], start)
  result = streamed.result()
  np.testing.assert_allclose([result["inception_score"], result["inception_score_std"]],
                             expected, rtol=1e-10)
  quality, diversity = image_metrics.inception_quality_diversity(probs)
  np.testing.assert_allclose([result["quality_score"], result["diversity_score"]],
                             [quality, diversity], rtol=1e-5)
  one_split = image_metrics.inception_score(logits, 1, seed)
  np.testing.assert_allclose(result["quality_score"] * result["diversity_score"], one_split[0],
                             rtol=1e-10)


def test_inception_score_of_certain_distinct_classes():
  logits = np.where(np.eye(20, 30, dtype=bool), 0.0, -1e4)  # image i is surely class i
  assert image_metrics.inception_score(logits, 10, None) == (2.0, 0.0)
  np.testing.assert_allclose(image_metrics.inception_score(logits, 1, None), (20.0, 0.0))
  streamed = image_metrics.InceptionScoreAccumulator(20, 10, 2020)
  streamed.update(logits, 0)
  assert streamed.result()["inception_score"] == pytest.approx(2.0, rel=1e-12)
  with pytest.raises(ValueError, match="expects 20 images, got 0"):
    image_metrics.InceptionScoreAccumulator(20, 10).result()
  with pytest.raises(ValueError, match="do not fit 20 images"):
    image_metrics.InceptionScoreAccumulator(20, 10).update(logits, 5)
  with pytest.raises(ValueError, match="at least as many images as splits"):
    image_metrics.split_assignment(5, 10)


def test_split_assignment_follows_the_shuffle():
  order = np.random.RandomState(2020).permutation(23)
  assignment = image_metrics.split_assignment(23, 10, 2020)
  for position, image in enumerate(order):
    assert assignment[image] == next(i for i in range(10) if position < (i + 1) * 23 // 10)
  assert np.array_equal(image_metrics.split_assignment(23, 10, None),
                        np.repeat(np.arange(10), np.diff([i * 23 // 10 for i in range(11)])))


def test_unbiased_logits_leave_out_the_fc_bias(torch_inception):
  params = inception.params_from_state_dict(torch_inception.state_dict())
  pool = np.random.default_rng(7).uniform(size=(3, 2048)).astype(np.float32)
  with torch.no_grad():
    expected = torch.from_numpy(pool) @ torch_inception.fc.weight.T
  np.testing.assert_allclose(inception.unbiased_logits(params, pool), expected.numpy(),
                             rtol=1e-5, atol=1e-5)
