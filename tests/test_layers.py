"""The package's layers point one way: each imports only what is below it.

From the bottom: ``outputs`` (atomic JSON, grids, the console), ``values``
(checks of single values) and the
libraries of math, networks and data (``diffusion``, ``models``, ``data``);
``convert`` (PyTorch checkpoints) above the networks; ``evaluation`` above
that; ``build`` (networks from a config), ``sampling``, ``loading`` and
``pipeline`` for inference; ``train`` for the trainers; ``evaluate``,
``report`` and the entry points on top. Each layer is imported in a fresh
interpreter and must not have pulled in what lies above it.
"""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vqdiffusion_jax"
TRAINERS = ("vqdiffusion_jax.train.",)
# The train package's infrastructure that inference reads checkpoints with.
INFERENCE_INFRASTRUCTURE = ("vqdiffusion_jax.train.checkpoint", "vqdiffusion_jax.train.mesh")
ABOVE_MODELS = ("vqdiffusion_jax.convert", "vqdiffusion_jax.train", "vqdiffusion_jax.data",
                "vqdiffusion_jax.evaluation", "vqdiffusion_jax.build",
                "vqdiffusion_jax.sampling", "vqdiffusion_jax.loading",
                "vqdiffusion_jax.pipeline", "vqdiffusion_jax.evaluate",
                "vqdiffusion_jax.report", "vqdiffusion_jax.main")


def _modules(package: str) -> list[str]:
  """Every module of a subpackage of ours, by its file."""
  folder = PACKAGE / package
  return sorted(f"vqdiffusion_jax.{package}.{path.stem}" for path in folder.glob("*.py")
                if path.stem not in ("__init__", "__main__"))


def _loaded_after(*modules: str) -> set[str]:
  """The modules a fresh interpreter has loaded after importing ``modules``."""
  code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
          + "print(json.dumps(sorted(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  return set(json.loads(out.stdout.splitlines()[-1]))


def _ours(loaded: set[str], prefixes) -> list[str]:
  return sorted(m for m in loaded if m.startswith(tuple(prefixes)))


def test_the_pipeline_loads_no_trainer_optimizer_or_input_pipeline():
  loaded = _loaded_after("vqdiffusion_jax.pipeline")
  assert not {"optax", "grain", "torch", "diffusers"} & loaded
  trainers = [m for m in _ours(loaded, TRAINERS) if m not in INFERENCE_INFRASTRUCTURE]
  assert not trainers, trainers
  assert not _ours(loaded, ("vqdiffusion_jax.data", "vqdiffusion_jax.evaluation",
                            "vqdiffusion_jax.models.lpips",
                            "vqdiffusion_jax.models.discriminator",
                            "vqdiffusion_jax.convert.lpips",
                            "vqdiffusion_jax.convert.discriminator"))


def test_models_and_diffusion_sit_at_the_bottom():
  loaded = _loaded_after(*_modules("models"), *_modules("diffusion"))
  assert not _ours(loaded, ABOVE_MODELS)
  diffusion_only = _loaded_after(*_modules("diffusion"))
  assert not _ours(diffusion_only, ("vqdiffusion_jax.models", *ABOVE_MODELS))


def test_data_needs_neither_networks_nor_trainers():
  loaded = _loaded_after(*_modules("data"))
  assert not _ours(loaded, ("vqdiffusion_jax.models", "vqdiffusion_jax.diffusion",
                            "vqdiffusion_jax.convert", "vqdiffusion_jax.train",
                            "vqdiffusion_jax.pipeline"))


def test_conversion_sits_above_the_networks_only():
  loaded = _loaded_after(*_modules("convert"))
  assert not _ours(loaded, [p for p in ABOVE_MODELS if p != "vqdiffusion_jax.convert"])


@pytest.mark.parametrize("module", ["outputs", "values"])
def test_outputs_and_value_checks_are_neutral_ground(module):
  loaded = _loaded_after(f"vqdiffusion_jax.{module}")
  assert _ours(loaded, ("vqdiffusion_jax.",)) == [f"vqdiffusion_jax.{module}"]


def test_the_training_loop_does_not_evaluate():
  loaded = _loaded_after("vqdiffusion_jax.train.loop")
  assert not _ours(loaded, ("vqdiffusion_jax.report", "vqdiffusion_jax.evaluate",
                            "vqdiffusion_jax.pipeline", "vqdiffusion_jax.evaluation"))


def _function_level_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every import inside a function or class body of ``path``."""
  tree = ast.parse(path.read_text())
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      for inner in ast.walk(node):
        if isinstance(inner, ast.Import):
          found += [(inner.lineno, alias.name) for alias in inner.names]
        elif isinstance(inner, ast.ImportFrom):
          found.append((inner.lineno, inner.module or ""))
  return found


# Optional dependencies (the [torch] extra), imported where they are used.
OPTIONAL = ("torch", "safetensors", "transformers")


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_level_import_hides_a_cycle(path):
  imports = _function_level_imports(path)
  if path == PACKAGE / "__init__.py":  # the lazy ``vqdiffusion_jax.Pipeline`` attribute
    imports = [(line, name) for line, name in imports if name != "vqdiffusion_jax"]
  unexpected = [(line, name) for line, name in imports
                if not name.startswith(OPTIONAL)]
  assert not unexpected, unexpected
