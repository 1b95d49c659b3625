"""A run whose workdir is a ``gs://`` URL, on a bucket that lives in a local folder.

``local_buckets`` serves ``gs://BUCKET/KEY`` from ``ROOT/BUCKET/KEY`` at both
places where a remote path leaves Python: fsspec's ``gs`` protocol (what
``etils.epath`` opens ``gs://`` paths with when TensorFlow is absent) and the
TensorStore kvstore that Orbax builds for arrays under ``gs://``. The tests
run from an empty working directory, so any code that treats the URL as a
local path (``os.path.abspath``, ``open``, ``os.makedirs``) either fails or
leaves a ``gs:`` folder there.
"""

import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from tensorboardX import record_writer

from configs import shapes
from vqdiffusion_jax import build, outputs
from vqdiffusion_jax.convert import converted
from vqdiffusion_jax.data import sources
from vqdiffusion_jax.main import train_and_evaluate
from vqdiffusion_jax.train import checkpoint as ckpt_lib
from vqdiffusion_jax.train import loop

URL_SCHEMES = ("gs", "gcs")


@pytest.fixture
def local_buckets(tmp_path, monkeypatch):
  """``gs://`` served from ``tmp_path/buckets``; the test runs in the empty ``tmp_path/cwd``."""
  root = tmp_path / "buckets"
  root.mkdir()

  class LocalBuckets(DirFileSystem):
    protocol = URL_SCHEMES
    cachable = False

    def __init__(self, **kwargs):
      del kwargs  # gcsfs options such as finalize_on_close
      super().__init__(path=str(root), fs=LocalFileSystem())

    @classmethod
    def _strip_protocol(cls, path):
      for scheme in URL_SCHEMES:
        path = path.removeprefix(f"{scheme}://")
      return path

  def file_kvstore(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": str(root / bucket / key)}

  registry = importlib.import_module("fsspec.registry")._registry
  for scheme in URL_SCHEMES:
    monkeypatch.setitem(registry, scheme, LocalBuckets)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", file_kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs",
                      record_writer.REGISTERED_FACTORIES["gs"])
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert list(cwd.iterdir()) == [], "something wrote a URL as a local relative path"


def test_absolute_path_keeps_urls_and_anchors_local_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(outputs.absolute_path("gs://bucket/runs/coco")) == "gs://bucket/runs/coco"
  assert os.fspath(outputs.absolute_path("runs/coco")) == str(tmp_path / "runs" / "coco")


def test_checkpoints_and_resolve_run_keep_a_gs_url(local_buckets):
  state = {"w": jnp.arange(6.0)}
  with ckpt_lib.Checkpointer.for_workdir("gs://bucket/run", keep=2) as ckpt:
    assert ckpt.directory == "gs://bucket/run/checkpoints"
    assert ckpt.config_path == "gs://bucket/run/config.json"
    for step in (1, 2, 3):
      ckpt.save(step, state, data_state={"i": step}, config={"seed": step}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  assert (local_buckets / "bucket" / "run" / "checkpoints" / "3" / "state").is_dir()
  assert json.loads(epath.Path("gs://bucket/run/config.json").read_text()) == {"seed": 3}

  assert ckpt_lib.resolve_run("gs://bucket/run") == ("gs://bucket/run/checkpoints", None)
  assert ckpt_lib.resolve_run("gs://bucket/run/checkpoints/2") == (
      "gs://bucket/run/checkpoints", 2)
  with pytest.raises(FileNotFoundError, match="gs://bucket/elsewhere"):
    ckpt_lib.resolve_run("gs://bucket/elsewhere")

  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  with ckpt_lib.Checkpointer("gs://bucket/run/checkpoints", read_only=True) as other:
    step, restored, data_state = other.restore(abstract)
  assert step == 3 and data_state == {"i": 3}
  assert jnp.array_equal(restored["w"], state["w"])


def test_main_job_on_a_gs_workdir_writes_everything_there(local_buckets, tmp_path):
  config = shapes.get_config("runlocal")
  with config.unlocked():
    config.train.sample_every = 2
    # The dataset's array_record files and the token cache stay local.
    config.data.data_dir = str(tmp_path / "data")
    config.data.cache_dir = str(tmp_path / "token_cache")
  workdir = epath.Path("gs://bucket/run")
  summary = train_and_evaluate(config, os.fspath(workdir))

  assert summary["denoiser_step"] == 2
  assert summary["report"] == "gs://bucket/run/report/report.md"
  for stage in ("vqvae", "denoiser"):
    directory = workdir / stage
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert json.loads((directory / "config.json").read_text())["seed"] == config.seed
    assert [p.stat().length > 0 for p in (directory / "tensorboard").iterdir()] == [True]
    with ckpt_lib.Checkpointer.for_workdir(directory, read_only=True) as ckpt:
      assert ckpt.latest_step() == 2
  assert (workdir / "vqvae" / "samples" / "reconstructions_00000002.png").exists()
  captions = (workdir / "denoiser" / "samples" / "samples_00000002.txt").read_text()
  assert len(captions.splitlines()) == 8
  assert build.read_vocabulary(workdir / "denoiser").vocab_size > 4
  report = json.loads((workdir / "report" / "report.json").read_text())
  assert sorted(report["samplers"]) == sorted(
      p.name.removesuffix(".png") for p in (workdir / "report").glob("*.png"))
  assert "## Config" in (workdir / "report" / "report.md").read_text()
  on_disk = local_buckets / "bucket" / "run"
  assert sorted(p.name for p in on_disk.iterdir()) == ["denoiser", "report", "vqvae"]


def test_shapes_data_under_a_url_workdir_asks_for_a_local_data_dir():
  config = shapes.get_config("runlocal")
  with pytest.raises(ValueError, match=r"data\.data_dir .* gs://bucket/run is a URL"):
    sources.split_source(config.data, "train", "gs://bucket/run")


def test_token_cache_under_a_url_workdir_asks_for_a_local_cache_dir():
  config = shapes.get_config("runlocal")
  with pytest.raises(ValueError, match=r"data\.cache_dir .* gs://bucket/run is a URL"):
    loop.train(config, "gs://bucket/run")


def test_a_converted_directory_reads_from_gs_and_local_writers_refuse_urls(local_buckets,
                                                                           tmp_path):
  params = {"w": jnp.arange(4.0), "b": {"c": jnp.ones((2, 3))}}
  converted.save(tmp_path / "converted", {"denoiser": ({"width": 4}, params)}, source="test")
  shutil.copytree(tmp_path / "converted", local_buckets / "bucket" / "converted")
  url = "gs://bucket/converted"
  assert converted.is_converted(url)
  assert converted.read_config(url)["components"] == {"denoiser": {"width": 4}}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  restored = converted.restore(url, "denoiser", abstract)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, restored, params))
  with pytest.raises(ValueError, match="converted checkpoint directory gs://bucket/out is a URL"):
    converted.save("gs://bucket/out", {"denoiser": ({}, params)}, source="test")
