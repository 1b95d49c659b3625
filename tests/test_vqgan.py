"""VQGAN / VQ-VAE: parity with diffusers' VQModel, taming-layout loading, errors, training."""

import dataclasses
import json
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
from diffusers import VQModel

from tests.helpers import assert_logically_partitioned
from vqdiffusion_jax import config_schema as schema
from vqdiffusion_jax.convert import vqvae as vqvae_convert
from vqdiffusion_jax.convert.common import ConversionError
from vqdiffusion_jax.models import quantizer
from vqdiffusion_jax.models.vqgan import VQGAN, VQGANConfig
from vqdiffusion_jax.train import state as state_lib
from vqdiffusion_jax.train import vqvae_step

TINY = {"block_out_channels": (32, 64), "layers_per_block": 1, "latent_channels": 4,
        "num_vq_embeddings": 64, "vq_embed_dim": 4, "norm_num_groups": 8,
        "down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        "up_block_types": ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A tiny random diffusers VQModel, saved; its outputs on a fixed batch; our conversion."""
  torch.manual_seed(0)
  model = VQModel(**TINY).eval()
  with torch.no_grad():
    model.quantize.embedding.weight.normal_()  # spread codes: no near-ties in the argmin
  path = tmp_path_factory.mktemp("vqmodel")
  model.save_pretrained(path)
  images = torch.rand(2, 3, 16, 16) * 2 - 1
  with torch.no_grad():
    latents = model.encode(images).latents
    _, loss, (_, _, indices) = model.quantize(latents)
    tokens = indices.reshape(2, 8, 8)
    codes = model.quantize.get_codebook_entry(indices, (2, 8, 8, 4))
    decoded = model.decode(codes, force_not_quantize=True).sample
    reconstruction = model(images).sample
  module, params = vqvae_convert.load_diffusers_vqvae(path)
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  return {"model": model, "path": path, "images": nhwc(images), "tokens": tokens.numpy(),
          "decoded": nhwc(decoded), "reconstruction": nhwc(reconstruction),
          "loss": loss.item(), "module": module, "params": params,
          "encode": jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode")),
          "decode": jax.jit(lambda p, t: module.apply({"params": p}, t, method="decode"))}


def _taming_state_dict(model: VQModel) -> dict[str, np.ndarray]:
  """The diffusers model's weights under taming-transformers names."""
  levels = len(model.config.block_out_channels)
  renames = [
      (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
      (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
      (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
      (r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1."),
      (r"\.downsamplers\.0\.", ".downsample."),
      (r"\.upsamplers\.0\.", ".upsample."),
      (r"\.resnets\.(\d+)\.", r".block.\1."),
      (r"\.attentions\.(\d+)\.", r".attn.\1."),
      (r"\.conv_shortcut\.", ".nin_shortcut."),
      (r"\.group_norm\.", ".norm."),
      (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."),
      (r"\.to_out\.0\.", ".proj_out."),
      (r"\.conv_norm_out\.", ".norm_out."),
  ]
  out = {}
  for key, value in model.state_dict().items():
    value = value.numpy()
    up = re.match(r"decoder\.up_blocks\.(\d+)\.", key)
    if up:
      key = f"decoder.up.{levels - 1 - int(up.group(1))}." + key[up.end():]
    for pattern, replacement in renames:
      key = re.sub(pattern, replacement, key)
    if re.search(r"\.(q|k|v|proj_out)\.weight$", key):
      value = value[:, :, None, None]
    out[key] = value
  return out


def test_encode_tokens_equal_diffusers(reference):
  tokens = reference["encode"](reference["params"], reference["images"])
  assert tokens.dtype == jnp.int32 and tokens.shape == (2, 8, 8)
  np.testing.assert_array_equal(np.asarray(tokens), reference["tokens"])


def test_decode_matches_diffusers(reference):
  images = reference["decode"](reference["params"], jnp.asarray(reference["tokens"]))
  assert images.dtype == jnp.float32 and images.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(images), reference["decoded"], atol=1e-4, rtol=0)


def test_forward_matches_diffusers(reference):
  module = reference["module"]
  reconstruction, aux = jax.jit(lambda p, x: module.apply({"params": p}, x))(
      reference["params"], reference["images"])
  np.testing.assert_allclose(np.asarray(reconstruction), reference["reconstruction"], atol=1e-4)
  np.testing.assert_allclose(float(aux["loss"]), reference["loss"], rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(aux["tokens"]), reference["tokens"])
  assert 0 < float(aux["usage"]) <= 1 and 1 <= float(aux["perplexity"]) <= 64


def test_taming_layout_gives_the_same_model(reference):
  state_dict = _taming_state_dict(reference["model"])
  assert "decoder.up.1.attn.1.proj_out.weight" in state_dict  # lowest level runs first
  state_dict["loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)
  ddconfig = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
              "resolution": 16, "z_channels": 4, "in_channels": 3, "out_ch": 3,
              "double_z": False, "dropout": 0.0}
  config = vqvae_convert.config_from_taming(ddconfig, n_embed=64, embed_dim=4, norm_num_groups=8)
  module, params = vqvae_convert.from_taming({"state_dict": state_dict}, config)
  assert module.config == reference["module"].config
  tokens = reference["encode"](params, reference["images"])
  np.testing.assert_array_equal(np.asarray(tokens), reference["tokens"])
  images = reference["decode"](params, tokens)
  np.testing.assert_allclose(np.asarray(images), reference["decoded"], atol=1e-4, rtol=0)


def test_taming_extra_and_missing_keys_are_named(reference):
  state_dict = _taming_state_dict(reference["model"])
  del state_dict["encoder.mid.attn_1.q.bias"]
  state_dict["encoder.down.0.block.0.unexpected.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError, match=r"(?s)encoder\.mid\.attn_1\.q\.bias.*"
                     r"encoder\.down\.0\.block\.0\.unexpected\.weight"):
    vqvae_convert.from_taming(state_dict, reference["module"].config)


def test_deprecated_attention_names_in_a_bin_file(reference, tmp_path):
  shutil.copy(reference["path"] / "config.json", tmp_path / "config.json")
  old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
               ".to_out.0.": ".proj_attn."}
  state_dict = {}
  for key, value in reference["model"].state_dict().items():
    for new, old in old_names.items():
      key = key.replace(new, old)
    state_dict[key] = value
  torch.save(state_dict, tmp_path / "diffusion_pytorch_model.bin")
  _, params = vqvae_convert.load_diffusers_vqvae(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, reference["params"])


def test_diffusers_extra_and_missing_keys_are_named(reference, tmp_path):
  shutil.copy(reference["path"] / "config.json", tmp_path / "config.json")
  weights = safetensors.numpy.load_file(
      reference["path"] / "diffusion_pytorch_model.safetensors")
  del weights["decoder.conv_out.bias"]
  weights["decoder.extra.weight"] = np.zeros(2, np.float32)
  safetensors.numpy.save_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
  with pytest.raises(ConversionError, match=r"(?s)decoder\.conv_out\.bias.*decoder\.extra"):
    vqvae_convert.load_diffusers_vqvae(tmp_path)


def test_missing_directory_config_and_weights(reference, tmp_path):
  with pytest.raises(FileNotFoundError, match="directory not found"):
    vqvae_convert.load_diffusers_vqvae(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="config.json"):
    vqvae_convert.load_diffusers_vqvae(tmp_path)
  shutil.copy(reference["path"] / "config.json", tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    vqvae_convert.load_diffusers_vqvae(tmp_path)


def test_unsupported_config_is_named(reference):
  config = json.loads((reference["path"] / "config.json").read_text())
  config.update({"norm_type": "spatial", "new_field": 1,
                 "up_block_types": ["AttnUpDecoderBlock2D", "UpBlock2D"]})
  with pytest.raises(ConversionError, match=r"(?s)new_field.*norm_type.*UpBlock2D"):
    vqvae_convert.config_from_diffusers(config)


def test_wrong_inputs_raise(reference):
  module, params = reference["module"], reference["params"]
  encode = lambda x: jax.eval_shape(
      lambda x: module.apply({"params": params}, x, method="encode"), x)
  assert encode(jnp.zeros((1, 16, 16, 3))).shape == (1, 8, 8)
  with pytest.raises(ValueError, match="divisible by the downsampling factor 2"):
    encode(jnp.zeros((1, 15, 16, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    encode(jnp.zeros((1, 16, 16, 4)))
  with pytest.raises(ValueError, match="integer tokens"):
    jax.eval_shape(lambda t: module.apply({"params": params}, t, method="decode"),
                   jnp.zeros((1, 64), jnp.int32))
  with pytest.raises(ValueError, match="norm_num_groups"):
    VQGANConfig(block_out_channels=(32, 48), norm_num_groups=32)


def test_logical_axes_and_bf16_keeps_float32_params(reference):
  config = dataclasses.replace(reference["module"].config, ema=True)
  module = VQGAN(config, dtype=jnp.bfloat16)
  images = jnp.zeros((2, 16, 16, 3))
  variables = jax.eval_shape(module.init, jax.random.key(0), images)
  assert set(variables) == {"params", "vq_stats"}
  assert_logically_partitioned(variables["params"])
  assert_logically_partitioned(variables["vq_stats"])
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  reconstruction, aux = jax.eval_shape(module.apply, variables, images)
  assert reconstruction.dtype == jnp.float32 and reconstruction.shape == images.shape
  assert aux["loss"].dtype == jnp.float32 and aux["tokens"].dtype == jnp.int32
  latents = jax.eval_shape(lambda v, x: module.apply(v, x, method="encode_latents"),
                           variables, images)
  assert latents.dtype == jnp.float32


def test_ema_training_step_updates_codebook_and_reaches_encoder():
  config = VQGANConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                       num_embeddings=16, embed_dim=4, norm_num_groups=4, ema=True)
  module = VQGAN(config)
  images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
  # Random values on the eval_shape tree: a jitted init spends its time compiling the RNG.
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), images))
  assert "quantize" not in abstract["params"], "the EMA codebook is not a parameter"
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype),
                        abstract["params"])
  codebook = rng.normal(size=abstract["vq_stats"]["quantize"]["codebook"].shape)
  variables = {"params": params,
               "vq_stats": {"quantize": quantizer.ema_stats_from_codebook(codebook)}}

  def loss_fn(params, stats):
    (reconstruction, aux), updates = module.apply(
        {"params": params, "vq_stats": stats}, images, train=True, mutable=["vq_stats"],
        rngs={"vq_restart": jax.random.key(2)})
    return jnp.mean((reconstruction - images) ** 2) + aux["loss"], updates

  grads, updates = jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"],
                                                            variables["vq_stats"])
  encoder_grad = jax.tree.leaves(grads["encoder"]["conv_in"])
  assert all(float(jnp.abs(g).max()) > 0 for g in encoder_grad)
  before, after = variables["vq_stats"]["quantize"], updates["vq_stats"]["quantize"]
  assert not np.allclose(np.asarray(after["embed_avg"]), np.asarray(before["embed_avg"]))
  assert not np.allclose(np.asarray(after["codebook"]), np.asarray(before["codebook"]))


PATCH = VQGANConfig(block_out_channels=(16,), layers_per_block=2, latent_channels=8,
                    num_embeddings=32, embed_dim=4, patch_size=4)


def test_patch_vqvae_shapes_and_locality():
  model = VQGAN(PATCH)
  images = jax.random.uniform(jax.random.key(0), (2, 16, 24, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.key(1), images)
  assert PATCH.downsampling_factor == 4
  assert_logically_partitioned(variables["params"])
  latents = model.apply(variables, images, method="encode_latents")
  assert latents.shape == (2, 4, 6, 4)
  tokens = model.apply(variables, images, method="encode")
  assert tokens.shape == (2, 4, 6) and model.apply(variables, tokens, method="decode").shape == (
      2, 16, 24, 3)
  # The encoder sees one patch per token: changing patch (1, 2) moves only that latent.
  changed = images.at[:, 4:8, 8:12].set(0.3)
  moved = np.abs(np.asarray(model.apply(variables, changed, method="encode_latents")
                            - latents)).sum(-1) > 1e-6
  expected = np.zeros((2, 4, 6), bool)
  expected[:, 1, 2] = True
  np.testing.assert_array_equal(moved, expected)
  # The decoder's two 3x3 blocks reach two tokens around a changed one, pixel patch for patch.
  quantized = model.apply(variables, tokens, method=lambda m, t: m.quantize.lookup(t))
  decoded = model.apply(variables, quantized, method="decode_latents")
  bumped = model.apply(variables, quantized.at[:, 0, 0].add(1.0), method="decode_latents")
  reach = np.abs(np.asarray(bumped - decoded)).sum((0, -1)) > 1e-6
  assert reach[:12, :12].all() and not reach[12:].any() and not reach[:, 12:].any()


def test_patch_vqvae_trains_in_its_train_step():
  model = VQGAN(PATCH)
  images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1, maxval=1)
  optimizer = optax.adam(1e-2)
  loss = schema.vqvae().loss
  loss.perceptual_weight = 0.0
  loss.disc_weight = 0.0
  step = jax.jit(vqvae_step.make_train_step(model, None, loss, optimizer))
  generator, _ = state_lib.create_state(
      jax.random.key(0), lambda r: model.init(r, images), optimizer,
      jax.make_mesh((1,), ("data",)), ())
  state = vqvae_step.VQVAEState(generator)
  losses = []
  for i in range(30):
    state, metrics = step(state, {"image": images}, jax.random.key(i))
    losses.append(float(metrics["nll"]))
  assert losses[-1] < 0.7 * losses[0]
