"""The quickstart notebook, run headless on the tiny workdir: every cell runs, results are real.

No Jupyter: the notebook's JSON is read and its code cells are executed in order in one
namespace, with ``VQDIFFUSION_CHECKPOINT`` pointing at the ``tiny_workdir`` fixture and
``VQDIFFUSION_NOTEBOOK_FAST=1`` shrinking every count.
"""

import json
import pathlib

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
PAD = 2  # make_grid's default padding


def _notebook() -> dict:
  return json.loads(NOTEBOOK.read_text())


def _code_cells(notebook: dict) -> list[str]:
  return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


@pytest.fixture(scope="module")
def run(tiny_workdir):
  """The namespace after every code cell ran, and the number of cells that ran."""
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  namespace = {"__name__": "__quickstart__"}
  ran = 0
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("VQDIFFUSION_CHECKPOINT", tiny_workdir)
    patch.setenv("VQDIFFUSION_NOTEBOOK_FAST", "1")
    for index, source in enumerate(_code_cells(_notebook())):
      exec(compile(source, f"{NOTEBOOK.name}, code cell {index}", "exec"), namespace)
      ran += 1
  yield namespace, ran
  plt.close("all")


def _grid_size(rows: int, columns: int, side: int) -> tuple[int, int]:
  return columns * side + (columns + 1) * PAD, rows * side + (rows + 1) * PAD


def test_notebook_is_nbformat_4_without_stored_outputs():
  notebook = _notebook()
  assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
  kinds = [c["cell_type"] for c in notebook["cells"]]
  assert set(kinds) == {"markdown", "code"} and kinds[0] == "markdown"
  assert kinds.count("markdown") >= kinds.count("code") - 2
  for cell in notebook["cells"]:
    assert isinstance(cell["source"], list)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None


def test_every_code_cell_runs_in_fast_mode(run, tiny_workdir):
  namespace, ran = run
  assert ran == len(_code_cells(_notebook())) >= 8
  assert namespace["CHECKPOINT"] == tiny_workdir and namespace["FAST"]
  assert namespace["IS_SHAPES"]
  assert namespace["pipe"].image_size == 32


def test_grids_have_one_row_per_sampler_and_scale(run):
  ns, _ = run
  side, prompts = ns["pipe"].image_size, len(ns["PROMPTS"])
  assert prompts == ns["NUM_PROMPTS"] == 4
  assert ns["sample_grid"].size == _grid_size(1, prompts, side)
  assert list(ns["sampler_rows"]) == list(ns["SAMPLERS"]) and len(ns["SAMPLERS"]) == 4
  assert ns["sampler_grid"].size == _grid_size(4, prompts, side)
  assert list(ns["guidance_rows"]) == [1.0, 2.0, 3.0, 5.0]
  assert ns["guidance_grid"].size == _grid_size(4, prompts, side)
  variants = ns["NUM_VARIANTS"]
  assert ns["inpaint_grid"].size == _grid_size(1, 1 + variants, side)
  assert ns["outpaint_grid"].size == _grid_size(1, 1 + variants, side)
  for grid in ("sample_grid", "sampler_grid", "guidance_grid", "inpaint_grid", "outpaint_grid"):
    assert isinstance(ns[grid], Image.Image) and ns[grid].mode == "RGB"


def test_same_settings_and_seed_give_the_same_images_across_cells(run):
  ns, _ = run
  pixels = lambda row: np.stack([np.asarray(image) for image in row])  # noqa: E731
  default = pixels(ns["images"])
  np.testing.assert_array_equal(pixels(ns["sampler_rows"][f"vqdiffusion, {ns['NUM_STEPS']} steps"]),
                                default)
  np.testing.assert_array_equal(pixels(ns["guidance_rows"][3.0]), default)
  rows = [pixels(row) for row in ns["sampler_rows"].values()]
  assert all(not np.array_equal(rows[0], other) for other in rows[1:])


def test_inpainting_keeps_the_right_half_tokens(run):
  ns, _ = run
  pipe, mask = ns["pipe"], ns["mask"]
  assert mask[:, :16].all() and not mask[:, 16:].any()
  before = pipe.encode_image(ns["source"])
  known = np.zeros(pipe.latent_grid, bool)
  known[:, pipe.latent_grid[1] // 2:] = True
  np.testing.assert_array_equal(ns["known"], known)
  assert ns["kept"] and len(ns["inpainted_tokens"]) == ns["NUM_VARIANTS"]
  for tokens in ns["inpainted_tokens"]:
    np.testing.assert_array_equal(tokens[known], before[known])
  assert any(not np.array_equal(t[~known], before[~known]) for t in ns["inpainted_tokens"])


def test_oracle_accuracy_per_guidance_scale_is_plotted(run):
  ns, _ = run
  accuracy, scales = ns["oracle_accuracy"], ns["GUIDANCE_SCALES"]
  assert len(accuracy) == len(scales) == 4 == len(ns["oracle_scores"])
  assert all(0.0 <= a <= 1.0 for a in accuracy)
  assert len(ns["ORACLE_PROMPTS"]) == ns["NUM_ORACLE_PROMPTS"]
  figure = ns["fig"]
  assert isinstance(figure, Figure)
  lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
  assert set(lines) == {"all attributes", "shape", "colour", "size", "position"}
  np.testing.assert_allclose(lines["all attributes"].get_xdata(), scales)
  np.testing.assert_allclose(lines["all attributes"].get_ydata(), accuracy)
