"""A workdir loses nothing and keeps nothing stale: atomic small files, named corrupt files,
the leftovers of killed cache builds removed, metrics truncated on resume, clear step errors
and no routine notice when a run is loaded."""

import importlib
import json
import logging
import os
import pathlib
import shutil

import numpy as np
import pytest
from absl import logging as absl_logging
from etils.epath import backend as epath_backend

from tests.test_remote_workdir import local_buckets  # noqa: F401  (a fixture)
from vqdiffusion_jax import outputs, report
from vqdiffusion_jax.convert import converted
from vqdiffusion_jax.data import token_cache
from vqdiffusion_jax.models.text_encoder import WordTokenizer
from vqdiffusion_jax.pipeline import Pipeline
from vqdiffusion_jax.train import budget, metrics
from vqdiffusion_jax.train import checkpoint as ckpt_lib

# ----------------------------------------------------------------------------- atomic writes


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "run" / "plan.json"
  outputs.write_json_atomically(path, {"num_steps": 4})
  assert json.loads(path.read_text()) == {"num_steps": 4}
  with pytest.raises(TypeError):
    outputs.write_bytes(path, "not bytes")  # fails halfway: after the temporary file opened
  assert json.loads(path.read_text()) == {"num_steps": 4}
  assert os.listdir(path.parent) == ["plan.json"]


@pytest.mark.parametrize("renames", [True, False])
def test_a_url_is_written_whole_whether_or_not_its_file_system_renames(
    local_buckets, monkeypatch, renames):  # noqa: F811
  if not renames:
    def no_rename(*args, **kwargs):
      raise NotImplementedError("this store cannot rename")
    buckets = importlib.import_module("fsspec.registry")._registry["gs"]
    monkeypatch.setattr(buckets, "mv", no_rename)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
  outputs.write_text("gs://bucket/run/denoiser/text_tokenizer.json", '{"vocab": []}')
  directory = local_buckets / "bucket" / "run" / "denoiser"
  assert os.listdir(directory) == ["text_tokenizer.json"]
  assert (directory / "text_tokenizer.json").read_text() == '{"vocab": []}'


def test_the_vocabulary_is_written_atomically(tmp_path, monkeypatch):
  path = tmp_path / "text_tokenizer.json"
  written = []
  real_write_text = outputs.write_text
  monkeypatch.setattr(outputs, "write_text",
                      lambda p, text: (written.append(p), real_write_text(p, text)))
  WordTokenizer.fit(["a red circle", "a blue square"], 16).save(path)
  assert written == [path]
  assert WordTokenizer.load(path).vocab[-2:] == ("red", "square")


def _truncated(path: pathlib.Path, text: str) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text[:len(text) // 2])
  return str(path)


def test_corrupt_json_files_are_named_in_one_line(tmp_path):
  def config_json(directory):
    (directory / "checkpoints").mkdir(parents=True)
    with ckpt_lib.Checkpointer.for_workdir(directory, read_only=True) as checkpointer:
      return checkpointer.read_config()

  vocabulary = _truncated(tmp_path / "d" / "text_tokenizer.json",
                          json.dumps({"format": "x", "vocab": ["[PAD]", "a", "b"]}))
  plan = _truncated(tmp_path / "p" / budget.PLAN_NAME, json.dumps({"num_steps": 40}))
  config = _truncated(tmp_path / "r" / ckpt_lib.CONFIG_NAME, json.dumps({"seed": 0}))
  converted_config = _truncated(tmp_path / "c" / converted.CONFIG_NAME,
                                json.dumps({"format": converted.FORMAT}))
  probes = [(vocabulary, lambda: WordTokenizer.load(vocabulary)),
            (plan, lambda: budget.read_plan(tmp_path / "p")),
            (config, lambda: config_json(tmp_path / "r")),
            (converted_config, lambda: converted.read_config(tmp_path / "c"))]
  for path, load in probes:
    with pytest.raises(ValueError) as error:
      load()
    message = str(error.value)
    assert message.startswith(f"{path} is corrupt or truncated (not valid JSON"), message
    assert "\n" not in message


def test_a_truncated_vocabulary_in_a_workdir_is_named(tiny_workdir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_workdir, workdir)
  vocabulary = workdir / "denoiser" / "text_tokenizer.json"
  vocabulary.write_text(vocabulary.read_text()[:20])
  with pytest.raises(ValueError, match=f"^{vocabulary} is corrupt or truncated .*fit the "
                                       "vocabulary again"):
    Pipeline.from_pretrained(str(workdir))


# ----------------------------------------------------------------------------- token cache


def _leftovers(parent: pathlib.Path) -> dict[str, bool]:
  """Siblings of ``parent/cache``: name -> whether a dead build's (to be removed)."""
  names = {".cache.building": True, ".cache.old-1a2b3c4d": True, ".cache.tmp-5e6f7a8b": True,
           ".cache_other.tmp-1": False, "cache.tmp-2": False, ".cache.json": False}
  for name in names:
    (parent / name).mkdir(parents=True)
    (parent / name / "records.array_record").write_bytes(b"partial")
  return names


def test_the_leftovers_of_killed_cache_builds_are_removed_with_a_warning(tmp_path, caplog):
  names = _leftovers(tmp_path)
  with caplog.at_level(logging.WARNING):
    removed = token_cache.remove_leftover_builds(tmp_path / "cache")
  dead = sorted(n for n, is_dead in names.items() if is_dead)
  assert [p.name for p in removed] == dead
  assert sorted(os.listdir(tmp_path)) == sorted(n for n, is_dead in names.items() if not is_dead)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and all(str(tmp_path / n) in warnings[0] for n in dead), warnings


def test_a_build_starts_by_removing_leftovers_on_process_zero_only(tmp_path):
  source = [{"image": np.zeros((8, 8, 3), np.uint8), "captions": [b"a"]} for _ in range(3)]

  def encode(images):
    return np.zeros((images.shape[0], 2, 2), np.int64)

  class StopAtBarrierError(Exception):
    pass

  def stop(name):
    raise StopAtBarrierError(name)

  names = _leftovers(tmp_path)
  with pytest.raises(StopAtBarrierError):  # process 1 of 2 waits at the first barrier
    token_cache.build_token_cache(source, encode, tmp_path / "cache", codebook_size=4,
                                  image_size=8, batch_size=2, process_index=1, process_count=2,
                                  barrier=stop)
  assert sorted(os.listdir(tmp_path)) == sorted(names)
  token_cache.build_token_cache(source, encode, tmp_path / "cache", codebook_size=4,
                                image_size=8, batch_size=2, process_index=0, process_count=1)
  kept = [n for n, is_dead in names.items() if not is_dead]
  assert sorted(os.listdir(tmp_path)) == sorted(["cache", *kept])
  assert len(token_cache.TokenCacheSource(tmp_path / "cache")) == 3


# ----------------------------------------------------------------------------- metrics


def _jsonl(records) -> str:
  return "".join(json.dumps(r) + "\n" for r in records)


def test_resuming_drops_the_records_of_the_steps_after_the_checkpoint(tmp_path, caplog):
  path = tmp_path / metrics.METRICS_FILE
  logged = [{"step": s, "loss": float(s)} for s in range(1, 7)]
  path.write_text(_jsonl(logged) + '{"step": 7, "lo')  # the kill cut the last write short
  writer = metrics.MetricWriter(tmp_path)
  with caplog.at_level(logging.WARNING):
    writer.resume_at(4)
  writer.write_scalars(5, {"loss": 50.0})
  writer.close()
  assert metrics.read_records(path) == [*logged[:4], {"step": 5, "loss": 50.0}]
  assert [r.getMessage() for r in caplog.records] == [
      f"{path}: dropped 3 record(s) after step 4, where training resumes (those steps run "
      "again)"]
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_resuming_at_the_last_logged_step_leaves_the_file_as_it_is(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  assert metrics.drop_records_after(path, 3) == 0 and not path.exists()
  path.write_text(_jsonl([{"step": 1}, {"step": 2}]))
  before = path.stat()
  assert metrics.drop_records_after(path, 2) == 0
  assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_ino == before.st_ino


def test_a_corrupt_metrics_line_is_named(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  path.write_text(_jsonl([{"step": 1}]) + "{oops\n" + _jsonl([{"step": 2}]))
  with pytest.raises(ValueError, match=f"^{path} line 2 is corrupt or truncated"):
    metrics.read_records(path)


def test_the_report_reads_the_last_record_of_a_step_logged_twice(tmp_path):
  records = [{"step": 1, "loss": 3.0, "steps_per_second": 1.0, "input_fraction": 0.1},
             {"step": 2, "loss": 2.0, "steps_per_second": 2.0, "input_fraction": 0.2},
             {"step": 3, "loss": 1.5, "steps_per_second": 3.0, "input_fraction": 0.3},
             {"step": 2, "loss": 2.5, "steps_per_second": 10.0, "input_fraction": 0.5},
             {"step": 3, "loss": 1.0, "steps_per_second": 10.0, "input_fraction": 0.5}]
  assert metrics.latest_per_step(records) == [records[0], records[3], records[4]]
  (tmp_path / "denoiser").mkdir()
  (tmp_path / "denoiser" / metrics.METRICS_FILE).write_text(_jsonl(records))
  summary = report.run_summary({"vqvae": str(tmp_path / "vqvae"),
                                "denoiser": str(tmp_path / "denoiser")})
  assert summary == {"denoiser": "3 steps, final loss 1.0000, 10.00 steps/s, input batches "
                                 "50.0% of the loop's time"}


# ----------------------------------------------------------------------------- loading


def test_a_step_that_never_existed_is_told_apart_from_an_uncommitted_one(tiny_workdir, tmp_path):
  checkpoints = pathlib.Path(tiny_workdir) / "denoiser" / "checkpoints"
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  with pytest.raises(ckpt_lib.CheckpointError) as error:
    Pipeline.from_pretrained(tiny_workdir, step=99)
  assert str(error.value) == f"step 99 does not exist in {checkpoints}; available steps: {steps}"

  copy = tmp_path / "checkpoints"
  (copy / "7").mkdir(parents=True)  # a step directory whose save never committed
  (copy / f"8{ckpt_lib.TMP_SUFFIX}").mkdir()  # a save killed before its rename
  with ckpt_lib.Checkpointer(copy, read_only=True) as checkpointer:
    for step in (7, 8):
      with pytest.raises(ckpt_lib.CheckpointError, match=f"step {step}: .*never committed"):
        checkpointer.restore_arrays(step)


def test_loading_hides_orbax_read_only_notice_and_no_other_warning(tmp_path, caplog,
                                                                   monkeypatch):
  monkeypatch.setattr(absl_logging.get_absl_logger(), "filters", [])
  (tmp_path / "checkpoints").mkdir()
  with caplog.at_level(logging.WARNING):
    ckpt_lib.Checkpointer.for_workdir(tmp_path, read_only=True).close()
    absl_logging.warning("Given directory is read only=%s, says another library", "x")
    absl_logging.warning("a warning of another kind")
  assert [r.getMessage() for r in caplog.records] == [
      "Given directory is read only=x, says another library", "a warning of another kind"]
