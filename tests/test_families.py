"""The class-conditional, unconditional and Paella families trained end to end by `main`.

Each ``:runlocal`` config runs its whole path on data laid out as its dataset
ships (``tests/image_folders.py``) or on the embedded shapes data: VQ-VAE,
token cache, denoiser and the report.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ffhq, imagenet, paella_shapes
from tests import image_folders
from vqdiffusion_jax import build, plan
from vqdiffusion_jax import config_schema as schema
from vqdiffusion_jax.data import real, sources, token_cache
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.main import train_and_evaluate
from vqdiffusion_jax.train import denoiser_stage, denoiser_step
from vqdiffusion_jax.train import state as state_lib


def _metrics(stage_dir):
  lines = pathlib.Path(stage_dir, "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def _runlocal(module, sampler, **data):
  """The module's runlocal config, its report reduced to one of its ``sampler``s."""
  config = module.get_config("runlocal")
  assert sampler in config.eval.samplers, config.eval.samplers
  with config.unlocked():
    config.data.update(data)
    config.train.sample_every = 2
    config.eval.samplers = (sampler,)
  return config


def _report(workdir):
  report = json.loads((workdir / "report" / "report.json").read_text())
  markdown = (workdir / "report" / "report.md").read_text()
  for label in report["samplers"]:
    assert (workdir / "report" / f"{label}.png").exists(), label
    assert f"![{label}]({label}.png)" in markdown
  return report, markdown


def test_imagenet_runlocal_trains_on_class_labels_with_null_class_dropout(tmp_path):
  classes = image_folders.write_imagenet_folders(tmp_path / "imagenet")
  real.prepare("class_image_folders", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "imagenet")
  config = _runlocal(imagenet, "purity/3/3", data_dir=str(tmp_path / "tfds"), caption_dropout=0.5)
  workdir = tmp_path / "run"
  summary = train_and_evaluate(config, str(workdir))

  train = sources.split_source(config.data, "train", str(workdir))
  cache = token_cache.TokenCacheSource(summary["token_cache"])
  assert [cache[i]["label"] for i in range(len(cache))] == [
      int(train[i]["label"]) for i in range(len(train))]
  assert {cache[i]["label"] for i in range(len(cache))} == set(range(len(classes)))
  assert cache.metadata["label_range"] == [0, len(classes) - 1]
  metrics = _metrics(workdir / "denoiser")
  assert [m["step"] for m in metrics] == [1, 2]
  # Half the labels were replaced by the null class 1000 (a learned row).
  assert all(0 < m["null_class_fraction"] < 1 for m in metrics)
  written = (workdir / "denoiser" / "samples" / "samples_00000002.txt").read_text().split("\n")
  assert all(line.startswith("class ") for line in written if line)
  report, markdown = _report(workdir)
  guided = [r for r in report["samplers"].values() if r["spec"]["guidance"] != 1]
  assert guided and all(r["images_per_second"] > 0 for r in guided)
  # One sample per validation image, of its class.
  validation = sources.split_source(config.data, "validation", str(workdir))
  assert report["settings"]["num_samples"] == len(validation) == 6
  assert report["grid_captions"] == [int(validation[i]["label"]) for i in range(4)]
  assert "Classes of the grid cells" in markdown


def test_ffhq_runlocal_trains_and_samples_unconditionally(tmp_path):
  names = image_folders.write_ffhq_folder(tmp_path / "ffhq")
  real.prepare("plain_image_folder", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "ffhq")
  config = _runlocal(ffhq, "purity/3/1", data_dir=str(tmp_path / "tfds"))
  workdir = tmp_path / "run"
  summary = train_and_evaluate(config, str(workdir))

  cache = token_cache.TokenCacheSource(summary["token_cache"])
  test = sources.split_source(config.data, "test", str(workdir))
  assert len(cache) + len(test) == len(names)
  assert "label" not in cache[0] and cache[0]["captions"] == []
  metrics = _metrics(workdir / "denoiser")
  assert [m["step"] for m in metrics] == [1, 2]
  assert "null_class_fraction" not in metrics[0]
  assert (workdir / "denoiser" / "samples" / "samples_00000002.png").exists()
  assert not (workdir / "denoiser" / "samples" / "samples_00000002.txt").exists()
  report, markdown = _report(workdir)
  assert report["settings"]["num_samples"] == len(test)
  assert all(r["spec"]["guidance"] == 1 for r in report["samplers"].values())
  assert "of the grid cells" not in markdown


def test_paella_shapes_runlocal_trains_its_renoising_objective(tmp_path):
  config = _runlocal(paella_shapes, "paella/3/2")
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary["denoiser_step"] == 2

  metrics = _metrics(tmp_path / "denoiser")
  assert [m["step"] for m in metrics] == [1, 2]
  for m in metrics:
    # Paella's loss: cross-entropy of every token (no VQ-Diffusion bound, no [MASK]).
    assert "vb" not in m and m["loss"] > 0
    assert 0 < m["noise_fraction"] < 1
  captions = (tmp_path / "denoiser" / "samples" / "samples_00000002.txt").read_text()
  assert len(captions.splitlines()) == 8
  report, _ = _report(tmp_path)
  assert {r["spec"]["name"] for r in report["samplers"].values()} == {"paella"}
  # The shapes oracle scores Paella's samples as it does the transformer's.
  assert all("oracle" in r for r in report["samplers"].values())


@pytest.mark.parametrize("module", [imagenet, ffhq, paella_shapes])
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_family_configs_have_every_key_of_the_schema(module, arg):
  config = module.get_config(arg)
  assert _paths(schema.defaults().to_dict()) <= _paths(config.to_dict())
  with pytest.raises(AttributeError):
    config.train.no_such_key = 1


def _paths(tree, prefix=()):
  out = set()
  for key, value in tree.items():
    out |= _paths(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,)}
  return out


def test_token_cache_record_keeps_its_label():
  tokens = np.arange(4, dtype=np.int16)
  record = token_cache.decode_record(token_cache.encode_record(tokens, [], label=207))
  assert record["label"] == 207 and record["captions"] == []
  assert "label" not in token_cache.decode_record(token_cache.encode_record(tokens, ["a"]))


def test_paella_loss_is_label_smoothed_cross_entropy():
  logits = jnp.array([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
  x0 = jnp.array([[0, 2]])
  log_p = jax.nn.log_softmax(logits, axis=-1)
  smoothing = 0.1
  want = -np.mean([(1 - smoothing) * log_p[0, i, x0[0, i]] + smoothing * jnp.mean(log_p[0, i])
                   for i in range(2)])
  np.testing.assert_allclose(denoiser_step.paella_loss(logits, x0, smoothing), want, rtol=1e-6)


def test_paella_objective_refuses_a_masking_schedule():
  config = paella_shapes.get_config("runlocal")
  denoiser = build.denoiser(config, codebook_size=8, grid=(8, 8), vocab_size=16)
  masking = schedules.make("mask_and_replace", 10, 8)
  optimizer = state_lib.make_optimizer(config.optim, 2)
  with pytest.raises(ValueError, match="uniform"):
    denoiser_step.make_train_step(denoiser, masking, config, config.diffusion, optimizer,
                                  grid=(8, 8))


def test_plan_compiles_the_class_unconditional_and_paella_steps():
  figures = {module.__name__: plan.plan(module.get_config("runlocal"), 8)
             for module in (imagenet, ffhq, paella_shapes)}
  # The class model's extra parameters: AdaLN class tables of 1001 rows (one per block).
  assert figures["configs.imagenet"]["params"] > figures["configs.ffhq"]["params"] + 2 * 1001 * 32
  assert all(f["flops"] > 0 and f["peak"] > 0 for f in figures.values())
  # Paella's convolutional predictor: its largest parameters are convolution kernels.
  paella = paella_shapes.get_config("runlocal")
  denoiser, _ = plan._model(paella)
  init = functools.partial(denoiser.init, grid=build.latent_grid(paella))
  params = jax.eval_shape(init, jax.random.key(0))["params"]
  want = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  assert figures["configs.paella_shapes"]["params"] == want


def test_class_training_refuses_caches_without_labels_or_with_too_many_classes():
  denoiser_stage.check_labels({"label_range": [0, 999]}, 1000, "class_image_folders")
  with pytest.raises(ValueError, match="holds no labels"):
    denoiser_stage.check_labels({"label_range": None}, 1000, "plain_image_folder")
  with pytest.raises(ValueError, match="num_classes to at least 1001"):
    denoiser_stage.check_labels({"label_range": [0, 1000]}, 1000, "class_image_folders")
