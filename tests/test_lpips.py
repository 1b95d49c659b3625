"""LPIPS against a PyTorch statement of taming's LPIPS, with checkpoint loading.

The reference builds torchvision's ``vgg16().features`` layer by layer with
``torch.nn`` (torchvision is not a dependency) and LPIPS's scaling, unit
normalisation, 1x1 heads, spatial mean and sum over layers, with random
weights saved in the torchvision and LPIPS key layouts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn as tnn

from tests import user_files
from tests.helpers import assert_logically_partitioned
from vqdiffusion_jax.convert import lpips as lpips_convert
from vqdiffusion_jax.convert.common import ConversionError
from vqdiffusion_jax.models import lpips

SHIFT = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
SCALE = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
FEATURE_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class _TorchLPIPS(tnn.Module):

  def __init__(self):
    super().__init__()
    self.features = user_files.vgg16_features()
    for i, width in enumerate(user_files.LPIPS_WIDTHS):
      setattr(self, f"lin{i}", user_files.LpipsHead(width))

  def forward(self, x, y):
    x, y = (x - SHIFT) / SCALE, (y - SHIFT) / SCALE
    total = 0.0
    for level, tap in enumerate(FEATURE_TAPS):
      fx, fy = self.features[:tap + 1](x), self.features[:tap + 1](y)
      fx = fx / (torch.sqrt(torch.sum(fx ** 2, dim=1, keepdim=True)) + 1e-10)
      fy = fy / (torch.sqrt(torch.sum(fy ** 2, dim=1, keepdim=True)) + 1e-10)
      head = getattr(self, f"lin{level}").model
      total = total + head((fx - fy) ** 2).mean([2, 3], keepdim=True)
    return total


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The torch model, its checkpoint files and its distances on random images."""
  torch.manual_seed(0)
  model = _TorchLPIPS().eval()
  vgg = {f"features.{k}": v for k, v in model.features.state_dict().items()}
  vgg.update({"classifier.0.weight": torch.randn(8, 16), "classifier.0.bias": torch.randn(8)})
  heads = {k: v for k, v in model.state_dict().items() if k.startswith("lin")}
  folder = tmp_path_factory.mktemp("lpips")
  files = {"vgg.pth": vgg, "heads.pth": heads, "vgg.safetensors": vgg,
           "heads.safetensors": heads}
  for name, state in files.items():
    path = folder / name
    if name.endswith(".pth"):
      torch.save(state, path)
    else:
      safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
  x, y = (torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(2))
  with torch.no_grad():
    distances = model(x, y).reshape(-1).numpy()
  to_nhwc = lambda t: jnp.asarray(t.permute(0, 2, 3, 1).numpy())
  return {"folder": folder, "x": to_nhwc(x), "y": to_nhwc(y), "distances": distances,
          "vgg": {k: v.numpy() for k, v in vgg.items()},
          "heads": {k: v.numpy() for k, v in heads.items()}}


@pytest.fixture(scope="module")
def distance_fn():
  return jax.jit(lambda params, x, y: lpips.LPIPS().apply({"params": params}, x, y))


def test_matches_torch_from_pth_and_safetensors(reference, distance_fn):
  folder = reference["folder"]
  params = lpips_convert.load_lpips(folder / "vgg.pth", folder / "heads.safetensors")
  ours = np.asarray(distance_fn(params, reference["x"], reference["y"]))
  assert ours.shape == (2,)
  np.testing.assert_allclose(ours, reference["distances"], rtol=1e-4, atol=0)
  other = lpips_convert.load_lpips(folder / "vgg.safetensors", folder / "heads.pth")
  jax.tree.map(np.testing.assert_array_equal, params, other)


def test_is_a_distance(reference, distance_fn):
  params = lpips_convert.params_from_state_dicts(reference["vgg"], reference["heads"])
  x, y = reference["x"], reference["y"]
  d_yx = np.asarray(distance_fn(params, y, x))
  np.testing.assert_allclose(d_yx, reference["distances"], rtol=1e-4, atol=0)
  np.testing.assert_allclose(d_yx, np.asarray(distance_fn(params, x, y)), rtol=1e-6)
  assert np.all(d_yx > 0)
  # x and its copy sit at different batch positions, so equal only up to rounding.
  d_xx = np.asarray(distance_fn(params, x, x))
  assert np.all(d_xx >= 0) and np.all(d_xx < 1e-7 * d_yx)


def test_gradient_is_finite_and_zero_at_equal_images():
  params = lpips.init_random(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1, maxval=1)
  y = jax.random.uniform(jax.random.key(2), (1, 16, 16, 3), minval=-1, maxval=1)
  total = lambda images, targets: jnp.sum(
      lpips.LPIPS().apply({"params": params}, images, targets))
  # Row 0 compares x with y, row 1 compares y with itself.
  grads = np.asarray(jax.jit(jax.grad(total))(jnp.concatenate([x, y]),
                                               jnp.concatenate([y, y])))
  assert np.all(np.isfinite(grads))
  assert np.abs(grads[0]).max() > 0
  assert np.abs(grads[1]).max() < 1e-6 * np.abs(grads[0]).max()


def test_unit_normalize_matches_lpips_and_has_a_finite_gradient_at_zero():
  features = jnp.asarray([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 3.0, 4.0]])
  np.testing.assert_allclose(lpips._unit_normalize(features)[1],
                             features[1] / (np.sqrt(30.0) + 1e-10), rtol=1e-6)
  grad = jax.grad(lambda f: jnp.sum(lpips._unit_normalize(f) * jnp.arange(4.0)))(features)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_bfloat16_compute_stays_close(reference):
  params = lpips_convert.params_from_state_dicts(reference["vgg"], reference["heads"])
  run = jax.jit(lambda p, x, y: lpips.LPIPS(dtype=jnp.bfloat16).apply({"params": p}, x, y))
  distances = run(params, reference["x"], reference["y"])
  assert distances.dtype == jnp.float32
  np.testing.assert_allclose(distances, reference["distances"], rtol=2e-2)


def test_params_are_logically_partitioned_and_match_the_loader(reference):
  variables = jax.eval_shape(lpips.LPIPS().init, jax.random.key(0),
                             jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))
  assert_logically_partitioned(variables["params"])
  loaded = lpips_convert.params_from_state_dicts(reference["vgg"], reference["heads"])
  random = lpips.init_random(jax.random.key(0))
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, str(a.dtype)), tree)
  assert shapes(loaded) == shapes(random)
  assert all(np.all(np.asarray(random[f"lin{i}"]["kernel"]) >= 0) for i in range(5))


@pytest.mark.parametrize("missing", ["vgg", "heads"])
def test_missing_file_is_named(reference, missing):
  folder = reference["folder"]
  paths = {"vgg": folder / "vgg.pth", "heads": folder / "heads.pth"}
  paths[missing] = folder / f"no_{missing}.pth"
  with pytest.raises(FileNotFoundError, match=f"no_{missing}.pth") as error:
    lpips_convert.load_lpips(paths["vgg"], paths["heads"])
  assert ("VGG16" if missing == "vgg" else "heads") in str(error.value)


def test_extra_key_is_an_error(reference):
  heads = dict(reference["heads"], **{"lin5.model.1.weight": np.zeros((1, 8, 1, 1))})
  with pytest.raises(ConversionError, match="lin5.model.1.weight"):
    lpips_convert.params_from_state_dicts(reference["vgg"], heads)


def test_missing_key_is_an_error(reference):
  vgg = dict(reference["vgg"])
  vgg["features.99.weight"] = vgg.pop("features.28.weight")
  with pytest.raises(ConversionError, match=r"features\.28\.weight") as error:
    lpips_convert.params_from_state_dicts(vgg, reference["heads"])
  assert "features.99.weight" in str(error.value)


def test_wrong_shape_is_an_error(reference, tmp_path):
  heads = dict(reference["heads"])
  heads["lin2.model.1.weight"] = np.zeros((1, 128, 1, 1), np.float32)
  torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, tmp_path / "heads.pth")
  with pytest.raises(ConversionError, match="lin2.model.1.weight"):
    lpips_convert.load_lpips(reference["folder"] / "vgg.pth", tmp_path / "heads.pth")
