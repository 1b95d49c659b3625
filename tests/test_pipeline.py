"""The notebook pipeline on a tiny trained workdir and a random Paella model."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vqdiffusion_jax import Pipeline, make_grid
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.models.paella import PaellaPredictor
from vqdiffusion_jax.models.vqgan import VQGAN, VQGANConfig
from vqdiffusion_jax.train.checkpoint import CheckpointError

PROMPT = "a big red circle in the center"


@pytest.fixture(scope="module")
def pipe(tiny_workdir):
  return Pipeline.from_pretrained(tiny_workdir)


def test_loads_ema_weights_of_a_workdir(pipe, tiny_workdir):
  raw = Pipeline.from_pretrained(tiny_workdir, use_ema=False)
  differs = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         pipe.params, raw.params)
  assert any(jax.tree.leaves(differs))
  assert pipe.image_size == 32 and pipe.latent_grid == (8, 8)


def test_loads_a_chosen_checkpoint_step(pipe, tiny_workdir):
  earlier = Pipeline.from_pretrained(tiny_workdir, step=3)
  differs = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         pipe.params, earlier.params)
  assert any(jax.tree.leaves(differs))
  with pytest.raises(CheckpointError, match="step 99"):
    Pipeline.from_pretrained(tiny_workdir, step=99)


@pytest.mark.parametrize(("sampler", "steps", "scale"), [
    ("vqdiffusion", None, 1.0), ("vqdiffusion", 3, 2.0), ("vqdiffusion_fast", 4, 2.0),
    ("fewer_tokens", 8, 2.0), ("purity", 16, 3.0), ("paella", 4, 2.0)])
def test_every_sampler_gives_pil_images_deterministic_per_seed(pipe, sampler, steps, scale):
  options = {"num_inference_steps": steps, "guidance_scale": scale, "sampler": sampler}
  images = pipe([PROMPT, "a small blue square on the left"], seed=1, **options)
  assert len(images) == 2 and all(isinstance(i, Image.Image) for i in images)
  assert images[0].size == (32, 32)
  again = pipe([PROMPT, "a small blue square on the left"], seed=1, output_type="np", **options)
  np.testing.assert_array_equal(np.asarray(images[0]),
                                np.asarray(again[0] * 255 + 0.5, np.uint8))
  other = pipe([PROMPT, "a small blue square on the left"], seed=2, output_type="tokens",
               **options)
  first = pipe([PROMPT, "a small blue square on the left"], seed=1, output_type="tokens",
               **options)
  assert any((a != b).any() for a, b in zip(first, other, strict=True))
  assert all(t.shape == (8, 8) and t.max() < 64 for t in first)


def test_batches_are_split_over_devices_and_padded(pipe):
  prompts = [PROMPT] * 11  # 11 images on 8 devices: padded to 16, cut back to 11
  tokens = pipe(prompts, num_inference_steps=2, seed=0, output_type="tokens")
  assert len(tokens) == 11
  assert len(pipe(PROMPT, num_images_per_prompt=3, num_inference_steps=2)) == 3


def _image(pipe, seed=0):
  return pipe(PROMPT, num_inference_steps=2, seed=seed, output_type="np")[0]


def test_inpaint_keeps_known_tokens(pipe):
  image = _image(pipe)
  mask = np.zeros((32, 32), bool)
  mask[8:20, 4:30] = True
  before = pipe.encode_image(image)
  after = pipe.inpaint(["a small green triangle at the top"] * 2, image, mask,
                       num_inference_steps=3, sampler="purity", output_type="tokens")
  known = ~mask.reshape(8, 4, 8, 4).any(axis=(1, 3))
  for tokens in after:
    np.testing.assert_array_equal(tokens[known], before[known])


def test_outpaint_on_a_transformer_shifts_the_image(pipe):
  image = _image(pipe)
  tokens = pipe.outpaint(PROMPT, image, (8, 0, 4, 0), num_inference_steps=2,
                         output_type="tokens")[0]
  np.testing.assert_array_equal(tokens[2:, 1:], pipe.encode_image(image)[:6, :7])
  with pytest.raises(ValueError, match="multiples of 4"):
    pipe.outpaint(PROMPT, image, (3, 0, 0, 0))


def test_edit_interpolate_and_regions(pipe):
  image = _image(pipe)
  edited = [pipe.edit([PROMPT], image, strength=0.3, num_inference_steps=2, seed=4,
                      output_type="tokens")[0] for _ in range(2)]
  np.testing.assert_array_equal(edited[0], edited[1])
  with pytest.raises(ValueError, match="out of range 1..4"):  # step round(0.3 * 9) = 3
    pipe.edit([PROMPT], image, strength=0.3, num_inference_steps=5)
  with pytest.raises(ValueError, match="strength"):
    pipe.edit([PROMPT], image, strength=1.5)
  series = pipe.interpolate(PROMPT, "a small blue square on the left", [0.0, 0.5, 1.0],
                            num_inference_steps=3, output_type="tokens")
  assert len(series) == 3
  left = np.zeros((32, 32), bool)
  left[:, :16] = True
  out = pipe.regions([PROMPT, "a small blue square on the left"], [left, ~left],
                     num_inference_steps=3, output_type="tokens")
  assert len(out) == 1 and out[0].shape == (8, 8)


def test_interpolation_uses_the_same_noise_for_every_weight(pipe):
  a = pipe.interpolate(PROMPT, PROMPT, [0.0, 0.3, 1.0], num_inference_steps=3,
                       output_type="tokens")
  np.testing.assert_array_equal(a[0], a[1])
  np.testing.assert_array_equal(a[0], a[2])


def test_bad_requests_are_clear_errors(pipe):
  with pytest.raises(ValueError, match="unknown sampler"):
    pipe(PROMPT, sampler="ddpm")
  with pytest.raises(ValueError, match="out of range"):
    pipe(PROMPT, num_inference_steps=1000)
  with pytest.raises(ValueError, match="image has shape"):
    pipe.inpaint(PROMPT, np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), bool))
  with pytest.raises(ValueError, match="mask has shape"):
    pipe.inpaint(PROMPT, np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16), bool))
  with pytest.raises(TypeError, match="unknown sampler options"):
    pipe.edit(PROMPT, np.zeros((32, 32, 3), np.uint8), guidance=2.0)
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    Pipeline.from_pretrained(pipe_dir_without_stages())


def pipe_dir_without_stages():
  import tempfile  # noqa: PLC0415
  return tempfile.mkdtemp()


def test_long_prompts_are_truncated_with_a_warning(pipe):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    images = pipe(" and ".join([PROMPT] * 10), num_inference_steps=2)
  assert len(images) == 1
  assert any("truncated" in str(w.message) for w in caught)


def test_make_grid_tiles_images(pipe):
  images = pipe([PROMPT] * 3, num_inference_steps=2)
  grid = make_grid(images, columns=3, pad=2)
  assert grid.size == (3 * 32 + 4 * 2, 32 + 2 * 2)
  cells = np.asarray(grid)[2:34]
  for i, image in enumerate(images):
    np.testing.assert_array_equal(cells[:, 2 + 34 * i:34 + 34 * i], np.asarray(image))


def _paella_pipeline():
  vq = VQGAN(VQGANConfig(block_out_channels=(8, 8), num_embeddings=16, embed_dim=4,
                         latent_channels=8, norm_num_groups=4, layers_per_block=1,
                         encoder_attention_levels=(), decoder_attention_levels=(),
                         mid_block_attention=False))
  vq_vars = vq.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  model = PaellaPredictor(codebook_size=16, num_timesteps=10, condition_dim=8,
                          condition_length=4, channels=(16, 16), blocks_per_level=1,
                          modulation_dim=16, timestep_dim=16)
  params = model.init(jax.random.key(1), jnp.zeros((1, 8, 8), jnp.int32),
                      jnp.zeros((1,), jnp.int32), jnp.zeros((1, 4, 8)))["params"]
  table = jax.random.normal(jax.random.key(2), (32, 8))
  return Pipeline(
      denoiser=Denoiser(model, frozen_text_encoder=lambda _, ids: table[ids]), params=params,
      schedule=schedules.uniform(10, 16), vqvae=vq, vqvae_variables=vq_vars, image_size=16,
      tokenize=lambda texts: np.array([[len(t) % 32] * 4 for t in texts], np.int32))


def test_paella_outpaint_grows_the_latent_grid():
  pipe = _paella_pipeline()
  image = pipe("x", num_inference_steps=3, sampler="paella", typical_mass=0.5,
               output_type="np")[0]
  assert image.shape == (16, 16, 3)
  tokens = pipe.outpaint("x", image, (4, 0, 0, 8), num_inference_steps=3, sampler="paella",
                         guidance_scale=2.0, output_type="tokens")[0]
  assert tokens.shape == (8 + 2, 8 + 4)
  np.testing.assert_array_equal(tokens[2:, :8], pipe.encode_image(image))
  wide = pipe.outpaint("x", image, (0, 0, 0, 8), sampler="paella", num_inference_steps=2)[0]
  assert wide.size == (16 + 8, 16)


def test_two_processes_sample_inpaint_and_encode_as_one(tmp_path):
  from tests.test_evaluate import tiny_pipeline  # noqa: PLC0415
  from tests.two_process_worker import pipeline_outputs, run_two_processes  # noqa: PLC0415
  from vqdiffusion_jax.convert import __main__ as convert_cli  # noqa: PLC0415
  tiny_pipeline().save_pretrained(tmp_path / "diffusers")
  converted = str(tmp_path / "converted")
  assert convert_cli.main([str(tmp_path / "diffusers"), "--out", converted]) == 0
  want = pipeline_outputs(Pipeline.from_pretrained(converted))
  run_two_processes("sample", tmp_path, checkpoint=converted)
  for process in range(2):
    with np.load(tmp_path / f"samples_{process}.npz") as got:
      assert sorted(got) == sorted(want)
      for name in ("tokens", "inpainted", "encoded"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
      # One process decodes the 5 images as a batch of 5, two as 8 (padded): last-bit changes.
      np.testing.assert_allclose(got["np"], want["np"], atol=1e-5)
