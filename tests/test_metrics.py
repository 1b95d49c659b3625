"""Metric writing, image grids, the progress line and the NaN stop."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from vqdiffusion_jax import outputs
from vqdiffusion_jax.train import metrics


def test_scalars_go_to_json_lines_and_tensorboard(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write_scalars(3, {"loss": np.float32(1.5), "lr": 0.1})
  writer.write_scalars(4, {"loss": 1.25})
  writer.close()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 3, "loss": 1.5, "lr": 0.1}, {"step": 4, "loss": 1.25}]
  assert list((tmp_path / "tensorboard").iterdir())


def test_image_grid_layout_and_png(tmp_path):
  images = np.stack([np.full((4, 5, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])
  grid = outputs.tile(images, columns=2, pad=1)
  assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3) and grid.dtype == np.uint8
  assert grid[1, 1, 0] == 0 and grid[1, 7, 0] == 128 and grid[6, 1, 0] == 255
  writer = metrics.MetricWriter(str(tmp_path))
  path = writer.write_images(7, "samples", images)
  writer.close()
  assert np.array_equal(np.asarray(Image.open(path)), outputs.tile(images))
  with pytest.raises(ValueError, match="B, H, W, C"):
    outputs.tile(np.zeros((4, 4, 3)))


def test_progress_line_reports_rate_and_eta():
  stream = io.StringIO()
  clock = iter([0.0, 10.0])  # the update comes ten seconds after the start
  progress = outputs.Progress(100, 10, name="denoiser", stream=stream, clock=lambda: next(clock))
  line = progress.update(30, {"loss": 0.5})
  assert line.startswith("denoiser [")
  assert "30/100" in line and "2.00 steps/s" in line and "ETA 00:35" in line
  assert "loss=0.5" in stream.getvalue()


def test_non_finite_metrics_stop_naming_the_step():
  metrics.check_finite(5, {"loss": 1.0, "grad_norm": np.float32(2.0)})
  with pytest.raises(metrics.NonFiniteError, match=r"grad_norm, loss at step 12"):
    metrics.check_finite(12, {"loss": float("nan"), "grad_norm": np.inf, "lr": 1.0})


def test_progress_into_a_file_writes_a_line_per_interval_and_the_last():
  stream = io.StringIO()
  times = iter([0.0, 1.0, 2.0, 40.0, 41.0])
  progress = outputs.Progress(10, name="sampling", unit="images", stream=stream,
                              clock=lambda: next(times), interval=30.0)
  for done in (1, 2, 3, 4):
    progress.update(done)
  progress.close()
  lines = stream.getvalue().splitlines()
  assert [line.split()[2] for line in lines] == ["1/10", "3/10", "4/10"]
  assert all(line.startswith("sampling [") and "images/s" in line for line in lines)
