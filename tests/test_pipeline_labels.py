"""Class-conditional and unconditional models through the pipeline, from converted directories.

Tiny random denoisers and a tiny VQGAN are written with ``converted.save`` as
``python -m vqdiffusion_jax.convert`` writes them, loaded with
``Pipeline.from_pretrained`` (no text encoder) and sampled.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vqdiffusion_jax import Pipeline, sample
from vqdiffusion_jax.convert import checkpoints, converted
from vqdiffusion_jax.diffusion import samplers
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.models.transformer import TransformerConfig, VQDiffusionTransformer
from vqdiffusion_jax.models.vqgan import VQGAN, VQGANConfig

NUM_CLASSES = 5
SIZE = 8  # pixels; a 4 x 4 token grid through the factor-2 VQGAN


def _random(tree, seed, scale=0.5):
  """Every leaf redrawn from N(0, scale^2), so the condition visibly moves the logits."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape)
                                      for k, x in zip(keys, leaves, strict=True)])


def _denoiser(conditioning, seed, grid=(4, 4), num_timesteps=6):
  config = TransformerConfig(codebook_size=16, spatial_size=grid, num_layers=1, embed_dim=16,
                             num_heads=2, condition_dim=8, condition_length=3,
                             num_timesteps=num_timesteps,
                             conditioning=conditioning, num_classes=NUM_CLASSES,
                             learnable_null_class=conditioning == "class")
  params = Denoiser(VQDiffusionTransformer(config)).init(jax.random.key(seed))["params"]
  return config, _random(nn.meta.unbox(params), seed)


def _vqgan():
  config = VQGANConfig(block_out_channels=(8, 8), num_embeddings=16, embed_dim=4,
                       latent_channels=8, norm_num_groups=4, layers_per_block=1,
                       encoder_attention_levels=(), decoder_attention_levels=(),
                       mid_block_attention=False, ema=False)
  params = VQGAN(config).init(jax.random.key(9), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  return config, nn.meta.unbox(params)


def _save(path, conditioning, seed, **sizes):
  config, params = _denoiser(conditioning, seed, **sizes)
  vq_config, vq_params = _vqgan()
  converted.save(path, {"denoiser": (checkpoints._config_dict(config), params),
                        "vqvae": (checkpoints._config_dict(vq_config), vq_params)},
                 source="random")
  return str(path)


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
  return _save(tmp_path_factory.mktemp("ckpt") / "imagenet_like", "class", 1)


@pytest.fixture(scope="module")
def uncond_dir(tmp_path_factory):
  return _save(tmp_path_factory.mktemp("ckpt") / "ffhq_like", "none", 2)


@pytest.fixture(scope="module")
def class_pipe(class_dir):
  return Pipeline.from_pretrained(class_dir)


@pytest.fixture(scope="module")
def uncond_pipe(uncond_dir):
  return Pipeline.from_pretrained(uncond_dir)


def _tokens(pipe, **kwargs):
  return np.stack(pipe(output_type="tokens", num_inference_steps=2, **kwargs))


def test_a_class_directory_loads_without_a_text_encoder(class_pipe, uncond_pipe):
  assert class_pipe.denoiser.conditioning == "class" and class_pipe.tokenize is None
  assert class_pipe.denoiser.num_classes == NUM_CLASSES and class_pipe.text_params is None
  # The null class is a learned row after the labels' rows.
  assert class_pipe.params["block_0"]["mlp_norm"]["embedding"].shape[0] == NUM_CLASSES + 1
  assert uncond_pipe.denoiser.conditioning == "none" and not uncond_pipe.denoiser.has_null_condition
  assert class_pipe.image_size == SIZE and class_pipe.latent_grid == (4, 4)


def test_class_labels_are_deterministic_per_seed_and_change_the_output(class_pipe):
  images = class_pipe(class_labels=[1, 3], num_images_per_prompt=2, num_inference_steps=2,
                      seed=0)
  assert len(images) == 4 and all(isinstance(i, Image.Image) for i in images)
  assert images[0].size == (SIZE, SIZE)
  first = _tokens(class_pipe, class_labels=[1, 3], num_images_per_prompt=2, seed=0)
  np.testing.assert_array_equal(first, _tokens(class_pipe, class_labels=[1, 3],
                                               num_images_per_prompt=2, seed=0))
  assert (first != _tokens(class_pipe, class_labels=[1, 3], num_images_per_prompt=2,
                           seed=1)).any()
  # Same key and batch shape, other labels: only the condition differs.
  assert (first != _tokens(class_pipe, class_labels=[4, 0], num_images_per_prompt=2,
                           seed=0)).any()
  assert first.shape == (4, 4, 4) and first.max() < 16


def _hand_log_x0(pipe, labels, scale):
  """x0 log-probs from the network itself: log p_null + s (log p_c - log p_null), renormalised."""
  network, params = pipe.denoiser.network, pipe.params
  null = jnp.full_like(labels, NUM_CLASSES)

  def log_probs(x, t, condition):
    return jax.nn.log_softmax(network.apply({"params": params}, x, t, condition), axis=-1)

  def log_x0(x, t):
    cond = log_probs(x, t, labels)
    guided = cond if scale == 1.0 else log_probs(x, t, null) + scale * (
        cond - log_probs(x, t, null))
    guided = jnp.clip(guided - jax.nn.logsumexp(guided, axis=-1, keepdims=True), -70.0, 0.0)
    return jnp.concatenate([guided, jnp.full_like(guided[..., :1], -70.0)], axis=-1)

  return log_x0


def _hand_sample(pipe, labels, scale, seed, steps):
  labels = jnp.asarray(labels, jnp.int32)
  config = samplers.SamplerConfig("vqdiffusion", num_inference_steps=steps,
                                  guidance_scale=scale)
  run = jax.jit(lambda key: samplers.sample(_hand_log_x0(pipe, labels, scale), pipe.schedule,
                                            key, (labels.shape[0], 16), config))
  return np.asarray(run(jax.random.key(seed))).reshape(-1, 4, 4)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_guidance_goes_through_the_null_class(class_pipe, scale):
  labels, seed = [2, 4, 0], 5
  tokens = _tokens(class_pipe, class_labels=labels, guidance_scale=scale, seed=seed)
  np.testing.assert_array_equal(tokens, _hand_sample(class_pipe, labels, scale, seed, 2))
  if scale != 1.0:  # the check could fail: guidance moves these samples
    assert (tokens != _hand_sample(class_pipe, labels, 1.0, seed, 2)).any()


def test_unconditional_images_have_the_model_size(uncond_pipe):
  images = uncond_pipe(num_images=9, num_inference_steps=2, seed=3, output_type="np")
  assert len(images) == 9 and all(i.shape == (SIZE, SIZE, 3) for i in images)
  again = uncond_pipe(num_images=9, num_inference_steps=2, seed=3, output_type="np")
  np.testing.assert_array_equal(np.stack(images), np.stack(again))
  other = _tokens(uncond_pipe, num_images=9, seed=4)
  assert (other != _tokens(uncond_pipe, num_images=9, seed=3)).any()
  single = uncond_pipe(num_inference_steps=2)
  assert len(single) == 1 and single[0].size == (SIZE, SIZE)


def test_inpainting_takes_labels_and_unconditional_counts(class_pipe, uncond_pipe):
  image = class_pipe(class_labels=2, num_inference_steps=2, output_type="np")[0]
  mask = np.zeros((SIZE, SIZE), bool)
  mask[:4, :] = True
  known = ~mask.reshape(4, 2, 4, 2).any(axis=(1, 3))
  for pipe, condition in ((class_pipe, {"class_labels": [1, 3]}),
                          (uncond_pipe, {"num_images": 2})):
    before = pipe.encode_image(image)
    after = pipe.inpaint(None, image, mask, num_inference_steps=2, output_type="tokens",
                         **condition)
    assert len(after) == 2
    for tokens in after:
      np.testing.assert_array_equal(tokens[known], before[known])


def test_wrong_inputs_are_clear_errors(class_pipe, uncond_pipe):
  with pytest.raises(ValueError, match="class-conditional .5 classes.: give class_labels, not "
                                       "prompts"):
    class_pipe("a red circle")
  with pytest.raises(ValueError, match="give class_labels$"):
    class_pipe()
  with pytest.raises(ValueError, match="give class_labels, not num_images"):
    class_pipe(class_labels=[1], num_images=2)
  with pytest.raises(ValueError, match=r"class_labels\[1\] = 5, class_labels\[2\] = -1 out of "
                                       r"range 0..4 \(5 classes\)"):
    class_pipe(class_labels=[0, 5, -1])
  with pytest.raises(ValueError, match="non-empty list of ints"):
    class_pipe(class_labels=[1.5])
  with pytest.raises(ValueError, match="non-empty list of ints"):
    class_pipe(class_labels=[])
  with pytest.raises(ValueError, match="it takes no prompts"):
    class_pipe.interpolate("a", "b", [0.5])
  with pytest.raises(ValueError, match="unconditional: give num_images, not class_labels"):
    uncond_pipe(class_labels=[1])
  with pytest.raises(ValueError, match="unconditional: give num_images, not prompts"):
    uncond_pipe(["a face"])
  with pytest.raises(ValueError, match="num_images must be a positive int"):
    uncond_pipe(num_images=0)
  with pytest.raises(ValueError, match="not num_images_per_prompt"):
    uncond_pipe(num_images=2, num_images_per_prompt=2)
  with pytest.raises(ValueError, match="unconditional: use guidance_scale=1"):
    uncond_pipe(num_images=1, guidance_scale=3.0)


def test_text_models_reject_labels_and_need_their_text_encoder(tmp_path):
  config, params = _denoiser("text", 3)
  table = jax.random.normal(jax.random.key(0), (10, 8))
  pipe = Pipeline(denoiser=Denoiser(VQDiffusionTransformer(config),
                                    frozen_text_encoder=lambda _, ids: table[ids]),
                  params=params, schedule=None, vqvae=VQGAN(_vqgan()[0]), vqvae_variables=None,
                  tokenize=lambda texts: np.zeros((len(texts), 3), np.int32), image_size=SIZE)
  with pytest.raises(ValueError, match="text-conditioned: give prompts, not class_labels"):
    pipe(class_labels=[1])
  with pytest.raises(ValueError, match="text-conditioned: give prompts, not num_images"):
    pipe("x", num_images=2)
  with pytest.raises(KeyError, match="no text_encoder"):
    Pipeline.from_pretrained(_save(tmp_path / "text_without_clip", "text", 3))


def test_sample_cli_takes_labels_and_image_counts(class_dir, uncond_dir, tmp_path):
  out = tmp_path / "labels.png"
  sample.main(["--workdir", class_dir, "--class_labels", "1", "4", "--num", "3", "--steps", "1",
               "--guidance", "2", "--out", str(out)])
  with Image.open(out) as grid:
    assert grid.size == (3 * SIZE + 4 * 2, 2 * SIZE + 3 * 2)
  assert (tmp_path / "labels.txt").read_text() == "1\n4\n"
  out = tmp_path / "faces.png"
  sample.main(["--workdir", uncond_dir, "--num_images", "5", "--num", "3", "--steps", "1",
               "--batch_size", "4", "--out", str(out)])
  with Image.open(out) as grid:
    assert grid.size == (3 * SIZE + 4 * 2, 2 * SIZE + 3 * 2)
  with pytest.raises(SystemExit):
    sample.main(["--workdir", class_dir, "--class_labels", "1", "--prompt", "x"])
  with pytest.raises(ValueError, match="give class_labels, not prompts"):
    sample.main(["--workdir", class_dir, "--prompt", "x", "--steps", "1"])


def test_the_official_purity_run_samples_a_model_of_1024_tokens(uncond_pipe, tmp_path_factory):
  path = _save(tmp_path_factory.mktemp("ckpt") / "tokens_1024", "none", 3, grid=(32, 32),
               num_timesteps=10)
  pipe = Pipeline.from_pretrained(path)
  options = {"num_images": 2, "sampler": "purity_official", "output_type": "tokens", "seed": 0}
  tokens = np.stack(pipe(**options))
  assert tokens.shape == (2, 32, 32) and tokens.max() < 16
  np.testing.assert_array_equal(tokens, np.stack(pipe(**options)))
  with pytest.raises(ValueError, match="1024"):
    uncond_pipe(num_images=1, sampler="purity_official")
