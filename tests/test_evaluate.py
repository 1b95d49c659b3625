"""Evaluation, the run report, and the sample / evaluate command lines."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from vqdiffusion_jax import evaluate, loading, report, sample
from vqdiffusion_jax.data import oracle, shapes
from vqdiffusion_jax.evaluation import inception


def test_sampler_specs_parse_and_reject_bad_ones():
  spec = evaluate.SamplerSpec.parse("purity/16/3/0.9")
  assert spec == evaluate.SamplerSpec("purity", 16, 3.0, 0.9)
  assert evaluate.SamplerSpec.parse("vqdiffusion").steps is None
  assert evaluate.SamplerSpec.parse("vqdiffusion/all/2").guidance == 2.0
  assert spec.options() == {"sampler": "purity", "num_inference_steps": 16,
                            "guidance_scale": 3.0, "truncation_rate": 0.9}
  for bad in ("", "purity/x", "a/1/2/3/4"):
    with pytest.raises(ValueError, match="bad sampler spec"):
      evaluate.SamplerSpec.parse(bad)


def test_the_main_job_writes_its_report(tiny_workdir):
  out = pathlib.Path(tiny_workdir, loading.REPORT_DIR)
  figures = json.loads((out / "report.json").read_text())
  assert set(figures["samplers"]) == {"vqdiffusion_3steps_g1_r1", "purity_8steps_g2_r1"}
  for label, row in figures["samplers"].items():
    assert set(row["oracle"]) == {*shapes.ATTRIBUTES, "all"}
    assert all(0.0 <= v <= 1.0 for v in row["oracle"].values())
    assert row["images_per_second"] > 0
    assert set(row["oracle_by_objects"]) <= {"1", "2"}
    assert all(0.0 <= v <= 1.0 for v in row["oracle_by_objects"].values())
    with Image.open(out / f"{label}.png") as grid:
      assert grid.size == (2 * 32 + 3 * 2,) * 2  # 4 images, 2 x 2
  assert np.isfinite(figures["vqvae"]["psnr"]) and figures["vqvae"]["num_images"] == 8
  assert set(figures["vqvae"]["oracle"]) == {*shapes.ATTRIBUTES, "all"}
  text = (out / "report.md").read_text()
  assert "Oracle accuracy of the reconstructions" in text
  assert "by the number of objects in the caption" in text
  assert "| purity | 8 | 2 | 1 |" in text and "## VQ-VAE reconstruction" in text
  assert "target" not in text.lower() and "met" not in text.split()  # figures only
  assert f"- machine: {len(jax.devices())} x {jax.devices()[0].device_kind}" in text
  assert "matmuls: VQ-VAE float32, denoiser float32" in text  # runlocal: float32
  assert text.count("% of the loop's time") == 2  # the VQ-VAE's and the denoiser's pace
  config = json.loads(text.split("```json\n")[1].split("```")[0])  # the run's config
  assert config["train"]["num_steps"] == 4 and config["data"]["name"] == "shapes"


def test_accuracy_by_object_count_groups_captions():
  captions = ["a big red circle in the center",
              "a small blue square on the left and a big red circle at the top",
              "a small blue square on the left and a big red circle at the bottom"]
  results = [{"all": True}, {"all": False}, {"all": True}]
  assert evaluate.accuracy_by_object_count(results, captions) == {"1": 1.0, "2": 0.5}


def test_reconstruction_ceiling_is_the_oracle_on_round_trips(tiny_workdir):
  from configs import shapes as shapes_config  # noqa: PLC0415
  from vqdiffusion_jax import Pipeline  # noqa: PLC0415
  pipe = Pipeline.from_pretrained(tiny_workdir)
  captions, images = evaluate.evaluation_data(shapes_config.get_config("runlocal"),
                                              tiny_workdir, 6)
  tokens = np.stack([pipe.encode_image(image) for image in images])
  decoded = pipe.vqvae.apply(pipe.vqvae_variables, tokens, method="decode")
  expected = oracle.accuracy(np.clip(np.asarray(decoded), -1.0, 1.0), captions)
  metrics = evaluate.reconstruction_metrics(pipe, images, batch_size=4, captions=captions)
  assert metrics["oracle"] == pytest.approx(expected, abs=1e-6)
  assert "oracle" not in evaluate.reconstruction_metrics(pipe, images, captions=["a cat"] * 6)


def test_report_is_resumed_not_resampled(tiny_workdir, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("an already evaluated sampler was sampled again")
  monkeypatch.setattr(evaluate, "sample_all", refuse)
  from configs import shapes as shapes_config  # noqa: PLC0415
  config = shapes_config.get_config("runlocal")
  with config.unlocked():
    config.train.num_steps = 4
  summary = {"vqvae": os.path.join(tiny_workdir, "vqvae"),
             "denoiser": os.path.join(tiny_workdir, "denoiser"), "denoiser_step": 4}
  command = "python -m vqdiffusion_jax.main --config=configs/shapes.py:runlocal --workdir=W"
  path = report.write_report(config, tiny_workdir, summary, command)
  text = pathlib.Path(path).read_text()
  assert "purity" in text and f"- command: `{command}`" in text


def test_oracle_scores_true_renders_right_and_wrong_captions_wrong():
  rng = np.random.default_rng(0)
  scenes = [shapes.sample_scene(rng, max_objects=1) for _ in range(6)]
  images = np.stack([shapes.render(s, 32) for s in scenes]).astype(np.float32) / 255.0
  captions = [shapes.caption(s) for s in scenes]
  right = evaluate.score_samples(images, captions, oracle_ok=True)["oracle"]
  assert right["all"] == 1.0
  wrong = evaluate.score_samples(images, captions[1:] + captions[:1], oracle_ok=True)["oracle"]
  assert wrong["all"] < 0.5
  assert evaluate.is_shapes_captions(captions) and not evaluate.is_shapes_captions(["a dog"])


def test_inception_metrics_with_user_weights(tmp_path):
  template = inception.state_dict_template()
  generator = torch.Generator().manual_seed(0)

  def weight(key, shape):  # He-initialised convolutions, identity batch norms
    if key.endswith(("bn.weight", "running_var")):
      return torch.ones(shape)
    if key.endswith(("bn.bias", "running_mean")):
      return torch.zeros(shape)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return torch.randn(shape, generator=generator) * np.sqrt(2.0 / fan_in)
  state = {k: weight(k, shape) for k, shape in template.items()}
  torch.save(state, tmp_path / "inception.pth")
  rng = np.random.default_rng(1)
  reference = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  networks = evaluate.FeatureNetworks.load(str(tmp_path / "inception.pth"),
                                           reference_images=reference)
  assert networks.reference_features.shape == (4, 2048)
  same = evaluate.score_samples(reference.astype(np.float32) / 255.0, ["x"] * 4,
                                oracle_ok=False, networks=networks)
  assert abs(same["fid"]) < 1e-3  # the reference against itself
  other = evaluate.score_samples(rng.random((4, 32, 32, 3)).astype(np.float32) * 0.2, ["x"] * 4,
                                 oracle_ok=False, networks=networks)
  assert other["fid"] > same["fid"]
  assert 0 < other["quality_score"] <= 1 and 1 <= other["diversity_score"] <= 1008


def test_sample_cli_writes_a_grid(tiny_workdir, tmp_path):
  out = tmp_path / "grid.png"
  sample.main(["--workdir", tiny_workdir, "--prompt", "a big red circle in the center",
               "--prompt", "a small blue square on the left", "--num", "3", "--steps", "2",
               "--guidance", "2", "--sampler", "purity", "--out", str(out)])
  with Image.open(out) as grid:
    assert grid.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)
  assert (tmp_path / "grid.txt").read_text().count("\n") == 2
  with pytest.raises(SystemExit):
    sample.main(["--workdir", tiny_workdir, "--prompt", "x", "--sampler", "ddim"])


def test_evaluate_cli_reports_each_sampler(tiny_workdir, tmp_path):
  report = evaluate.main(["--workdir", tiny_workdir, "--sampler", "vqdiffusion/2/1",
                          "--sampler", "fewer_tokens/4/2", "--num_samples", "4",
                          "--batch_size", "4", "--out", str(tmp_path)])
  assert set(report["samplers"]) == {"vqdiffusion_2steps_g1_r1", "fewer_tokens_4steps_g2_r1"}
  assert (tmp_path / "report.md").exists() and (tmp_path / "fewer_tokens_4steps_g2_r1.png").exists()
