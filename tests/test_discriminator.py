"""PatchGAN discriminator against a PyTorch statement of taming's, and the GAN losses.

The reference is taming's ``NLayerDiscriminator`` written with ``torch.nn``
(conv 4x4 stride 2 + LeakyReLU; n - 1 strided conv + norm + LeakyReLU blocks;
a stride-1 conv + norm + LeakyReLU; a stride-1 conv to one channel; no bias
before a norm) with taming's ``weights_init``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from tests.helpers import assert_logically_partitioned
from vqdiffusion_jax.convert import common
from vqdiffusion_jax.convert import discriminator as disc_convert
from vqdiffusion_jax.models import discriminator as disc

BASE, LAYERS, GROUPS = 8, 3, 4


def _torch_norm(norm, channels):
  if norm == "batch":
    return [tnn.BatchNorm2d(channels)]
  if norm == "group":
    return [tnn.GroupNorm(GROUPS, channels, eps=1e-5)]
  return []


class _Sequential(tnn.Module):

  def forward(self, x):
    return self.main(x)


def _torch_discriminator(norm, in_channels=3, base=BASE, num_layers=LAYERS):
  """taming's NLayerDiscriminator, with the norm swappable as in ours."""
  use_bias = norm == "none"
  layers = [tnn.Conv2d(in_channels, base, 4, 2, 1), tnn.LeakyReLU(0.2)]
  mult = 1
  for n in range(1, num_layers + 1):
    prev, mult = mult, min(2 ** n, 8)
    stride = 2 if n < num_layers else 1
    layers += [tnn.Conv2d(base * prev, base * mult, 4, stride, 1, bias=use_bias),
               *_torch_norm(norm, base * mult), tnn.LeakyReLU(0.2)]
  layers.append(tnn.Conv2d(base * mult, 1, 4, 1, 1))
  model = _Sequential()
  model.main = tnn.Sequential(*layers)
  for module in model.modules():
    if isinstance(module, tnn.Conv2d):
      tnn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (tnn.BatchNorm2d, tnn.GroupNorm)):
      tnn.init.normal_(module.weight, 1.0, 0.02)
      tnn.init.normal_(module.bias, 0.0, 0.1)  # taming uses 0; random checks the mapping
    if isinstance(module, tnn.BatchNorm2d):
      module.running_mean.normal_(0.0, 0.1)
      module.running_var.uniform_(0.5, 2.0)
  return model


def _ours(norm):
  return disc.NLayerDiscriminator(base_channels=BASE, num_layers=LAYERS, norm=norm,
                                  norm_groups=GROUPS)


def _to_nhwc(t):
  return jnp.asarray(t.detach().permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("size, patches, dtype", [(32, 2, jnp.float32), (64, 6, jnp.bfloat16)])
def test_patch_shape(size, patches, dtype):
  module = disc.NLayerDiscriminator(base_channels=BASE, num_layers=LAYERS, dtype=dtype)
  out = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x)[0],
                       jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
  assert out.shape == (2, patches, patches, 1) and out.dtype == jnp.float32


@pytest.mark.parametrize("norm", disc.NORMS)
def test_params_axes_and_bias_only_without_norm(norm):
  variables = jax.eval_shape(_ours(norm).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert_logically_partitioned(variables["params"])
  params = variables["params"]
  assert set(params["conv0"]) == set(params[f"conv{LAYERS + 1}"]) == {"kernel", "bias"}
  for layer in range(1, LAYERS + 1):
    assert ("bias" in params[f"conv{layer}"]) == (norm == "none")
    assert (f"norm{layer}" in params) == (norm != "none")
  assert params["conv3"]["kernel"].value.shape == (4, 4, 4 * BASE, 8 * BASE)
  assert ("batch_stats" in variables) == (norm == "batch")


@pytest.mark.parametrize("norm", disc.NORMS)
def test_eval_forward_matches_torch(norm):
  torch.manual_seed(0)
  model = _torch_discriminator(norm).eval()
  images = torch.randn(2, 3, 32, 32)
  with torch.no_grad():
    expected = model(images).permute(0, 2, 3, 1).numpy()
  module = _ours(norm)
  variables = disc_convert.variables_from_torch(module, common.to_numpy(model.state_dict()))
  logits = jax.jit(module.apply)(variables, _to_nhwc(images))
  # weights_init makes small logits: the tolerance is relative to their scale.
  np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


def test_train_forward_and_running_stats_match_torch():
  torch.manual_seed(1)
  model = _torch_discriminator("batch")
  # to_numpy shares memory with the tensors, which the train step updates in place.
  state = {k: v.copy() for k, v in common.to_numpy(model.state_dict()).items()}
  images = torch.randn(2, 3, 32, 32)
  with torch.no_grad():
    expected = model.train()(images).permute(0, 2, 3, 1).numpy()
  module = _ours("batch")
  variables = disc_convert.variables_from_torch(module, state)
  apply = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
  logits, updates = apply(variables, _to_nhwc(images))
  np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
  for layer, index in ((1, 3), (2, 6), (3, 9)):
    stats = updates["batch_stats"][f"norm{layer}"]
    np.testing.assert_allclose(stats["mean"], model.main[index].running_mean.numpy(),
                               atol=1e-5)
    # torch averages the unbiased batch variance, Flax the biased one.
    n = 2 * {1: 8, 2: 4, 3: 3}[layer] ** 2
    old = state[f"main.{index}.running_var"]
    torch_var = model.main[index].running_var.numpy()
    np.testing.assert_allclose(stats["var"], 0.9 * old + (torch_var - 0.9 * old) * (n - 1) / n,
                               rtol=1e-4)


def test_batch_stats_change_only_in_train_mode():
  module = _ours("batch")
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3)) * 2 + 0.5
  variables = jax.jit(module.init)(jax.random.key(1), images)
  run = jax.jit(lambda v, x, train: module.apply(v, x, train=train, mutable=["batch_stats"]),
                static_argnums=2)
  train_logits, train_updates = run(variables, images, True)
  eval_logits, eval_updates = run(variables, images, False)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         variables["batch_stats"], train_updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"],
               eval_updates["batch_stats"])
  np.testing.assert_array_equal(eval_logits, jax.jit(module.apply)(variables, images))
  assert np.abs(np.asarray(train_logits) - np.asarray(eval_logits)).max() > 1e-3


def test_init_follows_taming_weights_init():
  module = disc.NLayerDiscriminator(base_channels=64)
  params = nn.unbox(jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  params = params["params"]
  for layer in range(LAYERS + 2):
    kernel = np.asarray(params[f"conv{layer}"]["kernel"])
    assert abs(kernel.mean()) < 2e-3 and 0.018 < kernel.std() < 0.022, layer
  for name, bound in (("conv0", 1 / np.sqrt(3 * 16)), ("conv4", 1 / np.sqrt(512 * 16))):
    bias = np.asarray(params[name]["bias"])
    assert np.all(np.abs(bias) <= bound) and np.abs(bias).max() > bound / 2
  scale = np.concatenate([np.asarray(params[f"norm{i}"]["scale"]) for i in (1, 2, 3)])
  assert abs(scale.mean() - 1) < 5e-3 and 0.015 < scale.std() < 0.025
  for i in (1, 2, 3):
    np.testing.assert_array_equal(params[f"norm{i}"]["bias"], 0.0)


def test_conversion_rejects_extra_and_missing_keys():
  module = _ours("batch")
  state = common.to_numpy(_torch_discriminator("batch").state_dict())
  with pytest.raises(common.ConversionError, match=r"main\.12\.weight"):
    disc_convert.variables_from_torch(module, {**state, "main.12.weight": np.zeros(3)})
  del state["main.6.running_var"]
  with pytest.raises(common.ConversionError, match=r"main\.6\.running_var"):
    disc_convert.variables_from_torch(module, state)


def test_conversion_with_prefix():
  model = _torch_discriminator("batch")
  state = common.to_numpy(model.state_dict())
  prefixed = {f"loss.discriminator.{k}": v for k, v in state.items()}
  prefixed["encoder.conv_in.weight"] = np.zeros(1)
  plain = disc_convert.variables_from_torch(_ours("batch"), state)
  converted = disc_convert.variables_from_torch(_ours("batch"), prefixed,
                                                prefix="loss.discriminator.")
  jax.tree.map(np.testing.assert_array_equal, plain, converted)


def _logits(seed, shape=(3, 6, 6, 1)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2


def test_d_losses_match_numpy():
  real, fake = _logits(0), _logits(1)
  hinge = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
  softplus = lambda x: np.log1p(np.exp(x))
  vanilla = 0.5 * (softplus(-real).mean() + softplus(fake).mean())
  np.testing.assert_allclose(jax.jit(disc.hinge_d_loss)(real, fake), hinge, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(disc.vanilla_d_loss)(real, fake), vanilla, rtol=1e-6)
  np.testing.assert_allclose(disc.discriminator_loss(real, fake, "vanilla"), vanilla, rtol=1e-6)
  np.testing.assert_allclose(disc.discriminator_loss(real, fake), hinge, rtol=1e-6)
  np.testing.assert_allclose(disc.generator_loss(jnp.asarray(fake, jnp.bfloat16)),
                             -fake.mean(), rtol=1e-2)
  with pytest.raises(ValueError, match="wgan"):
    disc.discriminator_loss(real, fake, "wgan")


def test_adaptive_weight_by_hand():
  rng = np.random.default_rng(2)
  rec = {"kernel": rng.normal(size=(3, 3, 4, 3)), "bias": rng.normal(size=(3,))}
  gan = {"kernel": rng.normal(size=(3, 3, 4, 3)) * 5, "bias": rng.normal(size=(3,))}
  norm = lambda tree: np.sqrt(sum(np.sum(leaf ** 2) for leaf in tree.values()))
  expected = norm(rec) / (norm(gan) + 1e-4) * 0.8
  weight = jax.jit(disc.adaptive_weight)(rec, gan, 0.8)
  np.testing.assert_allclose(weight, expected, rtol=1e-5)
  zero_gan = jax.tree.map(np.zeros_like, gan)
  np.testing.assert_allclose(disc.adaptive_weight(rec, zero_gan, 0.5), 0.5e4, rtol=1e-6)
  grad = jax.grad(lambda scale: disc.adaptive_weight(
      jax.tree.map(lambda g: g * scale, rec), gan))(1.0)
  assert grad == 0.0


def test_adopt_weight():
  np.testing.assert_array_equal(disc.adopt_weight(0.7, 9, 10), 0.0)
  np.testing.assert_allclose(disc.adopt_weight(0.7, 10, 10), 0.7)
  np.testing.assert_allclose(disc.adopt_weight(0.7, 3, 10, value=0.1), 0.1)
  traced = jax.jit(disc.adopt_weight)(0.7, jnp.arange(8, 12), 10)
  np.testing.assert_allclose(traced, [0.0, 0.0, 0.7, 0.7])
