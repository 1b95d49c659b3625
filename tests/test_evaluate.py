"""Evaluation, the run report, and the sample / evaluate command lines."""

import json
import os
import pathlib
import types
import weakref

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from tests import user_files
from tests.test_diffusers_pipeline import tiny_pipeline
from vqdiffusion_jax import evaluate, loading, report, sample
from vqdiffusion_jax.convert import __main__ as convert_cli
from vqdiffusion_jax.data import loader, oracle, shapes
from vqdiffusion_jax.evaluation import clip_score, fid, image_metrics, inception


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
  assert set(figures["samplers"]) == {  # shapes' samplers, 3 steps each in runlocal
      "vqdiffusion_3steps_g1_r1", "vqdiffusion_3steps_g2_r1", "fewer_tokens_3steps_g2_r1",
      "purity_3steps_g1.5_r1", "purity_3steps_g2_r1"}
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
  assert "| purity | 3 | 2 | 1 |" in text and "## VQ-VAE reconstruction" in text
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
  monkeypatch.setattr(evaluate, "evaluate_sampler", refuse)
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


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
  """pytorch-fid's state dict layout with random weights, saved by torch.save."""
  template = inception.state_dict_template()
  generator = torch.Generator().manual_seed(0)

  def weight(key, shape):  # He-initialised convolutions, identity batch norms
    if key.endswith(("bn.weight", "running_var")):
      return torch.ones(shape)
    if key.endswith(("bn.bias", "running_mean")):
      return torch.zeros(shape)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return torch.randn(shape, generator=generator) * np.sqrt(2.0 / fan_in)
  path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
  torch.save({k: weight(k, shape) for k, shape in template.items()}, path)
  return str(path)


def test_inception_metrics_with_user_weights(inception_file):
  rng = np.random.default_rng(1)
  reference = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  networks = evaluate.FeatureNetworks.load(inception_file, reference_images=reference)
  mu, sigma = networks.reference_stats
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
  same = evaluate.score_samples(reference.astype(np.float32) / 255.0, ["x"] * 4,
                                oracle_ok=False, networks=networks)
  assert abs(same["fid"]) < 1e-3  # the reference against itself
  other = evaluate.score_samples(rng.random((4, 32, 32, 3)).astype(np.float32) * 0.2, ["x"] * 4,
                                 oracle_ok=False, networks=networks)
  assert other["fid"] > same["fid"]
  assert 0 < other["quality_score"] <= 1 and 1 <= other["diversity_score"] <= 1008
  assert other["inception_score_splits"] == 4 and other["inception_score"] >= 1.0


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


# ------------------------------------------------------------------------- streaming


def _fake_inception(side, seed=0):
  """A deterministic per-image stand-in for the Inception: float64 (pool, logits)."""
  rng = np.random.default_rng(seed)
  projection = rng.normal(size=(side * side * 3, 2048)) / side
  classes = rng.normal(size=(2048, 1008)) / 8

  def features(images):
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    pool = np.maximum(flat @ projection - 0.5, 0.0)
    return pool, pool @ classes
  return features


class _FakeClip:
  """Per-item embeddings: an image's channel means, a caption's letter counts."""

  def embed_images(self, images):
    images = np.asarray(images, np.float64)
    return np.concatenate([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=-1)

  def embed_texts(self, texts):
    return np.array([[t.count(c) + 0.5 for c in "aeiouc"] for t in texts], np.float64)


def test_streamed_scores_equal_all_at_once():
  rng = np.random.default_rng(8)
  images = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
  captions = [f"a {'cat' * (i % 4)} and {'dog' * (i % 3)}" for i in range(23)]
  networks = evaluate.FeatureNetworks(inception=_fake_inception(8), clip=_FakeClip())
  scorer = evaluate.SampleScorer(23, networks, grid_size=6)
  for start in range(0, 23, 5):
    scorer.update(start, captions[start:start + 5], images[start:start + 5])
  streamed = scorer.result()

  pool, logits = networks.inception_outputs(images)  # every image at once
  streamed_mu, streamed_sigma = scorer.running.statistics()
  mu, sigma = fid.feature_statistics(pool)
  np.testing.assert_allclose(streamed_mu, mu, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(streamed_sigma, sigma, rtol=1e-11, atol=1e-13 * np.abs(sigma).max())
  assert "fid" not in streamed  # no reference statistics (FID is these against them)
  mean, std = image_metrics.inception_score(logits, 10, 2020)
  np.testing.assert_allclose([streamed["inception_score"], streamed["inception_score_std"]],
                             [mean, std], rtol=1e-11)
  probs = np.exp(image_metrics.log_softmax(logits))
  marginal = probs.mean(0)
  np.testing.assert_allclose(streamed["quality_score"],
                             np.exp(np.mean(np.sum(probs * np.log(probs), axis=1))), rtol=1e-11)
  np.testing.assert_allclose(streamed["diversity_score"],
                             np.exp(-np.sum(marginal * np.log(marginal))), rtol=1e-11)
  clip = _FakeClip()
  expected_clip = np.mean(np.asarray(clip_score(clip.embed_images(images / 255.0),
                                                clip.embed_texts(captions))))
  np.testing.assert_allclose(streamed["clip_score"], expected_clip, rtol=1e-6)
  assert len(scorer.preview) == 6
  assert all(np.array_equal(a, b) for a, b in zip(scorer.preview, images[:6], strict=True))
  with pytest.raises(ValueError, match="expected the images from 23"):
    scorer.update(0, captions[:2], images[:2])


def test_scoring_holds_one_batch_at_a_time():
  made, alive_when_making = [], []

  def make(start, count):
    alive_when_making.append(sum(ref() is not None for ref in made))
    images = np.full((count, 8, 8, 3), start, np.uint8)
    made.append(weakref.ref(images))
    return images

  def batches():  # holds nothing across its yields
    for start in range(0, 22, 4):
      yield start, ["x"] * min(4, 22 - start), make(start, min(4, 22 - start))

  networks = evaluate.FeatureNetworks(inception=_fake_inception(8))
  scorer = evaluate.SampleScorer(22, networks, grid_size=6)
  evaluate.score_stream(batches(), scorer)
  assert scorer.count == 22 and len(made) == 6
  assert alive_when_making == [0] * 6  # no earlier batch outlives its scoring
  assert all(ref() is None for ref in made)
  assert [int(p[0, 0, 0]) for p in scorer.preview] == [0] * 4 + [4] * 2
  assert all(p.base is None for p in scorer.preview)  # copies, not views pinning a batch


class _CountingPipe:
  """Stands in for ``Pipeline``: records each call and how many earlier outputs live on."""

  denoiser = types.SimpleNamespace(conditioning="text")

  def __init__(self):
    self.calls, self.outputs = [], []

  def __call__(self, prompts, *, seed, output_type, **options):
    assert output_type == "np"
    self.calls.append((len(prompts), seed, sum(ref() is not None for ref in self.outputs)))
    batch = np.random.default_rng(seed).uniform(size=(len(prompts), 8, 8, 3)).astype(np.float32)
    self.outputs.append(weakref.ref(batch))
    return list(batch)


def test_sample_batches_pad_the_last_batch_and_keep_nothing():
  pipe = _CountingPipe()
  captions = [f"prompt {i}" for i in range(10)]
  spec = evaluate.SamplerSpec("vqdiffusion", 2)
  scorer = evaluate.SampleScorer(10, grid_size=3)
  evaluate.score_stream(evaluate.sample_batches(pipe, captions, spec, seed=3, batch_size=4),
                        scorer)
  assert pipe.calls == [(4, 3, 0), (4, 7, 0), (4, 11, 0)]  # one shape; nothing kept alive
  assert scorer.count == 10 and len(scorer.preview) == 3
  first = np.random.default_rng(3).uniform(size=(4, 8, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(scorer.preview[0], evaluate.to_uint8(first[0]))


# ----------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
  """A tiny random diffusers VQDiffusionPipeline directory (save_pretrained) and its conversion."""
  root = tmp_path_factory.mktemp("diffusers_pipeline")
  tiny_pipeline().save_pretrained(root)
  ours = str(tmp_path_factory.mktemp("converted") / "ckpt")
  assert convert_cli.main([str(root), "--out", ours]) == 0
  return str(root), ours


def test_evaluate_reads_converted_and_diffusers_directories(tiny_checkpoints, tmp_path):
  captions = tmp_path / "captions.txt"
  captions.write_text("a cat\n\na dog\nthe cat\n")
  clip = user_files.clip_dir(tmp_path / "clip", vision=True, seed=3)
  for kind, path in zip(("diffusers", "converted"), tiny_checkpoints, strict=True):
    assert evaluate.checkpoint_kind(path) == kind
    out = tmp_path / kind
    figures = evaluate.main(["--checkpoint", path, "--captions", str(captions), "--sampler",
                             "vqdiffusion/2/2", "--batch_size", "2", "--out", str(out),
                             *(["--clip", clip] if kind == "converted" else [])])
    row = figures["samplers"]["vqdiffusion_2steps_g2_r1"]
    assert figures["settings"]["num_samples"] == 3 and row["images_per_second"] > 0
    assert "vqvae" not in figures and "fid" not in row  # no real images were given
    if kind == "converted":
      assert 0 <= row["clip_score"] <= 100 and "CLIP score" in (out / "report.md").read_text()
    with Image.open(out / "vqdiffusion_2steps_g2_r1.png") as grid:
      assert grid.size == (2 * 8 + 3 * 2,) * 2  # 3 images of 8 px, 2 x 2
    assert "## VQ-VAE reconstruction" not in (out / "report.md").read_text()


def test_checkpoint_and_data_errors_are_clear(tiny_checkpoints, tmp_path):
  with pytest.raises(FileNotFoundError, match="--checkpoint .*nowhere: no such file"):
    evaluate.main(["--checkpoint", str(tmp_path / "nowhere")])
  (tmp_path / "model.pth").write_bytes(b"")
  for path in (tmp_path, tmp_path / "model.pth"):
    with pytest.raises(ValueError, match=f"--checkpoint {path} is not a checkpoint.*workdir.*"
                                         "converted.*diffusers"):
      evaluate.main(["--checkpoint", str(path)])
  converted = tiny_checkpoints[1]
  with pytest.raises(ValueError, match="--out is required for a converted checkpoint"):
    evaluate.main(["--checkpoint", converted, "--captions", "c.txt"])
  with pytest.raises(ValueError, match="carries no evaluation data: pass --captions"):
    evaluate.main(["--checkpoint", converted, "--out", str(tmp_path / "o")])
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(ValueError, match="empty.txt holds no captions"):
    evaluate.main(["--checkpoint", converted, "--out", str(tmp_path / "o"), "--captions",
                   str(tmp_path / "empty.txt")])
  (tmp_path / "captions.txt").write_text("a cat\n")
  np.savez(tmp_path / "stats.npz", mean=np.zeros(2048), cov=np.eye(2048))
  with pytest.raises(ValueError, match=r"stats\.npz lacks \['mu', 'sigma'\]"):
    evaluate.main(["--checkpoint", converted, "--out", str(tmp_path / "o"), "--captions",
                   str(tmp_path / "captions.txt"), "--reference_stats",
                   str(tmp_path / "stats.npz"), "--inception", "pt_inception.pth"])
  with pytest.raises(ValueError, match="--save_reference_stats s.npz needs --inception"):
    evaluate.main(["--checkpoint", converted, "--out", str(tmp_path / "o"), "--captions",
                   str(tmp_path / "captions.txt"), "--save_reference_stats", "s.npz"])


def test_reference_statistics_are_saved_and_reused(tiny_workdir, inception_file, tmp_path):
  common = ["--checkpoint", tiny_workdir, "--sampler", "vqdiffusion/2/1", "--num_samples", "4",
            "--batch_size", "4", "--inception", inception_file, "--is_splits", "2"]
  saved = tmp_path / "stats" / "eval4.npz"
  first = evaluate.main([*common, "--out", str(tmp_path / "a"),
                         "--save_reference_stats", str(saved)])
  with np.load(saved) as data:  # as pytorch-fid's calculate_frechet_distance reads it
    assert sorted(data.files) == ["mu", "sigma"]
    mu, sigma = data["mu"], data["sigma"]
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.all(np.isfinite(sigma))
  row = first["samplers"]["vqdiffusion_2steps_g1_r1"]
  assert row["fid"] >= 0 and row["inception_score"] >= 1 and row["inception_score_splits"] == 2

  np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
  second = evaluate.main([*common, "--out", str(tmp_path / "b"), "--reference_stats",
                          str(tmp_path / "pytorch_fid.npz")])
  again = second["samplers"]["vqdiffusion_2steps_g1_r1"]
  assert second["settings"]["metrics"]["reference"].endswith("pytorch_fid.npz")
  np.testing.assert_allclose(again["fid"], row["fid"], rtol=1e-9)
  assert again["inception_score"] == pytest.approx(row["inception_score"], rel=1e-9)
  text = (tmp_path / "b" / "report.md").read_text()
  assert "| FID | IS | QS | DS |" in text and " ± " in text
  assert "FID against " in text and "pytorch_fid.npz" in text


def test_dataset_flags_stream_a_split(monkeypatch, tmp_path):
  rng = np.random.default_rng(9)
  records = [{"image": rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8),
              "captions": np.array([f"caption {i}".encode(), b"another"], dtype=object)}
             for i in range(7)]
  asked = []

  def split_source(data, split, home):
    asked.append((data.name, data.data_dir, int(data.image_size), split, home))
    return records
  monkeypatch.setattr(evaluate.sources, "split_source", split_source)
  args = evaluate.parse_args(["--checkpoint", "ckpt", "--dataset", "mscoco_captions",
                              "--data_dir", "/tfds", "--num_samples", "5", "--out", "o"])
  captions, reference = evaluate.evaluation_inputs(args, "converted", 8)
  assert asked == [("mscoco_captions", "/tfds", 8, "validation", "/tfds")]
  assert captions == [f"caption {i}" for i in range(5)] and len(reference) == 5
  assert reference.captions == captions and "mscoco_captions validation: 5 images" in reference.name
  batches = list(reference.batches(2))
  assert [len(images) for images, _ in batches] == [2, 2, 1]
  np.testing.assert_array_equal(batches[1][0][1], loader.resize_and_crop(records[3]["image"], 8))
  assert batches[2][1] == ["caption 4"]

  (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\n")
  args = evaluate.parse_args(["--checkpoint", "ckpt", "--dataset", "shapes", "--captions",
                              str(tmp_path / "prompts.txt"), "--num_samples", "2", "--out", "o"])
  captions, reference = evaluate.evaluation_inputs(args, "diffusers", 8)
  assert asked[-1] == ("shapes", "", 8, "test", "o") and captions == ["one", "two"]
  assert reference.captions == ["caption 0", "caption 1"]  # the real images' own captions


def test_two_processes_evaluate_as_one_and_only_the_first_writes(tiny_checkpoints, tmp_path):
  from tests.two_process_worker import run_two_processes  # noqa: PLC0415
  converted = tiny_checkpoints[1]
  clip = user_files.clip_dir(tmp_path / "clip", vision=True, seed=3)
  (tmp_path / "captions.txt").write_text("a cat\na dog\nthe cat\nthe dog sat\na cat at\n")
  # float32: bfloat16 products round differently for one process's 4 images on one device.
  one = evaluate.main(["--checkpoint", converted, "--captions", str(tmp_path / "captions.txt"),
                       "--sampler", "vqdiffusion/2/2", "--batch_size", "4", "--clip", clip,
                       "--precision", "float32", "--out", str(tmp_path / "one")])
  expected = one["samplers"]["vqdiffusion_2steps_g2_r1"]["clip_score"]
  outputs = run_two_processes("evaluate", tmp_path, checkpoint=converted, clip=clip)
  scores = [json.loads(next(line for line in out.splitlines()
                            if line.startswith('{"clip_score"')))["clip_score"]
            for out in outputs]
  assert scores[0] == scores[1] and scores[0] == pytest.approx(expected, rel=1e-4)
  report = json.loads((tmp_path / "out_0" / "report.json").read_text())
  assert report["samplers"]["vqdiffusion_2steps_g2_r1"]["clip_score"] == scores[0]
  assert not (tmp_path / "out_1").exists()
