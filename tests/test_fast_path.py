"""Sampling precision: "fast" per machine, "float32" exact, and the gap between them.

The model is a tiny diffusers ``VQDiffusionPipeline`` written by ``save_pretrained`` and read
by ``Pipeline.from_pretrained``; bfloat16 matmuls are forced, so the gap is measured on any
machine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_convert_denoiser import SIZE, K, T
from tests.test_diffusers_pipeline import PROMPTS, tiny_pipeline
from vqdiffusion_jax import Pipeline, evaluate, sample
from vqdiffusion_jax.models import precision

# Max abs gap of conditional log p(x_0) between bfloat16 and float32 matmuls on the tiny model
# (float32 accumulation: the operands' rounding, 2^-9 relative, is all that differs; measured
# 1.9e-2).
LOG_PROB_GAP = 0.05
# Share of tokens the two paths sample alike from the same seed (a token drawn differently
# changes what later steps see; measured 0.93 on 4 steps; chance is about 1 / K).
TOKEN_AGREEMENT = 0.8


@pytest.mark.parametrize("name, platform, flags, expected", [
    ("fast", "cpu", frozenset(), "float32"),
    ("fast", "cpu", frozenset({"avx2", "avx512f", "fma"}), "float32"),
    ("fast", "cpu", frozenset({"avx2", "avx512_bf16"}), "bfloat16"),
    ("fast", "cpu", frozenset({"amx_bf16"}), "bfloat16"),
    ("fast", "gpu", frozenset(), "bfloat16"),
    ("fast", "tpu", frozenset(), "bfloat16"),
    ("float32", "gpu", frozenset({"amx_bf16"}), "float32"),
    ("bfloat16", "cpu", frozenset(), "bfloat16"),
])
def test_precision_resolves_per_machine(name, platform, flags, expected):
  assert precision.sampling_matmul_dtype(name, platform, flags) == expected


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  """A tiny diffusers ``VQDiffusionPipeline`` directory written by ``save_pretrained``."""
  root = str(tmp_path_factory.mktemp("fast_path") / "pipeline")
  tiny_pipeline().save_pretrained(root)
  return root


@pytest.fixture(scope="module")
def pipelines(pipeline_dir):
  """The directory read with float32, forced bfloat16 and default matmuls."""
  return {name: Pipeline.from_pretrained(pipeline_dir, **({} if name == "default" else
                                                          {"precision": name}))
          for name in ("float32", "bfloat16", "default")}


def _flags(cli, checkpoint, tmp_path) -> list[str]:
  """Each command's flags short of --precision."""
  if cli is sample:
    return ["--workdir", checkpoint, "--prompt", "a", "--out", str(tmp_path / "grid.png")]
  (tmp_path / "captions.txt").write_text("a cat\n")
  return ["--checkpoint", checkpoint, "--captions", str(tmp_path / "captions.txt"),
          "--out", str(tmp_path / "eval")]


def test_unknown_precision_is_named_before_loading(tmp_path, capsys):
  with pytest.raises(ValueError, match="precision must be one of 'fast', 'float32', "
                                       "'bfloat16', got 'half'"):
    Pipeline.from_pretrained("nowhere", precision="half")
  for cli in (sample, evaluate):
    with pytest.raises(SystemExit):
      cli.parse_args([*_flags(cli, "nowhere", tmp_path), "--precision", "half"])
    assert "--precision: invalid choice: 'half'" in capsys.readouterr().err


@pytest.mark.parametrize("cli", [sample, evaluate], ids=["sample", "evaluate"])
def test_precision_flag_reaches_the_loader(cli, pipeline_dir, tmp_path, monkeypatch):
  seen = []

  def loader(path, **kwargs):
    seen.append(kwargs.get("precision"))
    raise FileNotFoundError(path)

  monkeypatch.setattr(cli.Pipeline, "from_pretrained", loader)
  for argv in ([], ["--precision", "float32"]):
    with pytest.raises(FileNotFoundError):
      cli.main([*_flags(cli, pipeline_dir, tmp_path), *argv])
  assert seen == ["fast", "float32"]


def _log_x0(pipe, x_t, t):
  features = pipe.denoiser.encode_text(pipe.params, pipe.text_params, pipe.tokenize(PROMPTS[:2]))
  logits = pipe.denoiser.logits(pipe.params, jnp.asarray(x_t), jnp.full((2,), t), features)
  return np.asarray(jax.nn.log_softmax(logits, -1))


def test_the_fast_path_stays_near_the_exact_one(pipelines):
  exact, fast = pipelines["float32"], pipelines["bfloat16"]
  assert exact.denoiser.network.config.matmul_dtype == "float32"
  assert fast.denoiser.network.config.matmul_dtype == "bfloat16"
  assert (pipelines["default"].denoiser.network.config.matmul_dtype
          == precision.sampling_matmul_dtype("fast"))
  rng = np.random.default_rng(0)
  gaps = []
  for t in (0, T // 2, T - 1):
    x_t = rng.integers(0, K + 1, size=(2, SIZE * SIZE))
    gaps.append(np.max(np.abs(_log_x0(fast, x_t, t) - _log_x0(exact, x_t, t))))
  print(f"max |log p(x_0)| gap, bfloat16 vs float32 matmuls: {max(gaps):.2e}")
  assert 0 < max(gaps) < LOG_PROB_GAP  # nonzero: the bfloat16 products did run
  options = {"num_inference_steps": 4, "guidance_scale": 3.0, "seed": 1,
             "num_images_per_prompt": 4, "output_type": "tokens"}
  agreement = np.mean(np.stack(fast(PROMPTS[:2], **options))
                      == np.stack(exact(PROMPTS[:2], **options)))
  print(f"sampled tokens alike: {agreement:.3f}")
  assert agreement >= TOKEN_AGREEMENT


def test_a_workdir_samples_with_the_precision_asked_for(tiny_workdir):
  """The run trained with float32 matmuls; sampling follows ``precision``, text encoder too."""
  for name in ("bfloat16", "float32"):
    network = Pipeline.from_pretrained(tiny_workdir, precision=name).denoiser.network
    assert (network.config.matmul_dtype, network.text_encoder.matmul_dtype) == (name, name)
