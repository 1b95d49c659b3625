"""Sampling inputs are checked where they enter: the Pipeline, ``sample`` and ``evaluate``."""

import math
import re
import warnings

import numpy as np
import pytest

from vqdiffusion_jax import Pipeline, PromptWarning, evaluate, inputs, sample, values
from vqdiffusion_jax.models.text_encoder import WordTokenizer

PROMPT = "a big red circle in the center"


@pytest.fixture(scope="module")
def pipe(tiny_workdir):
  return Pipeline.from_pretrained(tiny_workdir)


@pytest.mark.parametrize(("check", "value", "message"), [
    (values.positive_int, 2.5, "n must be a positive integer, got 2.5"),
    (values.positive_int, True, "n must be a positive integer, got True"),
    (values.positive_int, 0, "n must be a positive integer, got 0"),
    (values.positive_int, np.float64(3.0), "n must be a positive integer, got 3.0"),
    (values.non_negative_int, -1, "n must be a non-negative integer, got -1"),
    (values.seed, 2**32, "n must be an integer in 0..4294967295, got 4294967296"),
    (values.seed, 1.0, "n must be an integer in 0..4294967295, got 1.0"),
    (values.finite_numbers, [0.5, math.nan],
     "n must be a non-empty list of finite numbers, got [0.5, nan]"),
    (inputs.prompt_list, [], "n is an empty list; give at least one prompt"),
    (inputs.prompt_list, ["a", None], "n[1] must be a str, got None"),
    (inputs.prompt_list, 3, "n must be a str or a list of str, got 3"),
])
def test_value_checks_name_the_value_and_what_is_allowed(check, value, message):
  with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
    check("n", value)


def test_value_checks_pass_good_values_through():
  assert values.positive_int("n", np.int64(3)) == 3
  assert values.seed("n", 2**32 - 1) == 2**32 - 1
  assert values.number("n", np.float32(0.5), low=0.0, high=1.0, low_open=True) == 0.5
  assert inputs.sampler_options(num_inference_steps=None, guidance_scale=3) == {
      "num_inference_steps": None, "guidance_scale": 3.0, "truncation_rate": 1.0,
      "purity_temperature": 1.0, "typical_mass": 1.0, "max_reveal_per_call": None}
  np.testing.assert_array_equal(inputs.image_pixels("i", np.full((2, 2, 3), 255, np.uint8), 2),
                                np.ones((2, 2, 3), np.float32))
  assert inputs.image_pixels("i", np.full((2, 2, 3), 1.001, np.float32), 2).max() == 1.0


@pytest.mark.parametrize(("image", "message"), [
    (np.full((4, 4, 3), 200.0), "image is a float image with values in 200..200; float pixels "
                                "must be in [0, 1] (divide 0..255 values by 255, or give uint8)"),
    (np.full((4, 4, 3), -1.0), "image is a float image with values in -1..-1;"),
    (np.full((4, 4, 3), math.nan), "image has nan or inf values; float pixels must be finite"),
    (np.full((4, 4, 3), 300), "image is an int64 image with values in 300..300; integer pixels "
                              "must be in 0..255"),
    (np.ones((4, 4, 3), bool), "image has dtype bool; give a PIL image, uint8 pixels in 0..255 "
                               "or floats in [0, 1]"),
    (np.ones((4, 4), np.uint8), "image has shape (4, 4); this pipeline works on (4, 4, 3) RGB "
                                "images"),
])
def test_images_outside_the_documented_range_are_refused(image, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    inputs.image_pixels("image", image, 4)


def test_prompt_problems_name_the_prompts_and_the_words():
  prompts = ["", "a purple hexagon", PROMPT, "!!", "purple zebra"]
  labels = [f"prompts[{i}]" for i in range(len(prompts))]
  known = {"a", "big", "red", "circle", "in", "the", "center"}
  assert inputs.prompt_problems(prompts, labels, known) == [
      "prompts[0] = '', prompts[3] = '!!' have no words: the image will follow no text",
      "prompts[1] = 'a purple hexagon', prompts[4] = 'purple zebra' have words the text encoder "
      "never saw in training: 'purple', 'hexagon', 'zebra' (read as [UNK]; the image will not "
      "follow them)"]
  # A byte-level BPE (CLIP) reads any word: only the empty prompt counts.
  assert inputs.prompt_problems(["a purple hexagon", " "], ["p", "q"], None) == [
      "q = ' ' has no words: the image will follow no text"]
  assert inputs.prompt_problems([PROMPT], ["p"], known) == []


def test_unknown_words_warn_or_raise_per_the_pipeline_setting(pipe):
  with pytest.warns(PromptWarning, match=re.escape(
      "prompts[1] = 'a purple hexagon' has words the text encoder never saw in training: "
      "'purple', 'hexagon' (read as [UNK]; the image will not follow them) "
      "(unknown_words=error refuses such prompts)")) as caught:
    tokens = pipe([PROMPT, "a purple hexagon"], num_inference_steps=2, output_type="tokens")
  assert len(tokens) == 2
  assert caught[0].filename == __file__  # points at the caller's line
  with pytest.warns(PromptWarning, match=re.escape(
      "prompts[0] = '' has no words: the image will follow no text")):
    pipe.check_prompts("")
  strict = Pipeline(**{**vars(pipe), "_cache": {}, "unknown_words": "error"})
  with pytest.raises(ValueError, match=re.escape(
      "prompts[0] = '' has no words: the image will follow no text; prompts[1] = 'a purple "
      "hexagon' has words the text encoder never saw in training: 'purple', 'hexagon' (read as "
      "[UNK]; the image will not follow them) (unknown_words=warn samples them anyway)")):
    strict(["", "a purple hexagon"])
  assert not strict._cache  # refused before anything was compiled
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    Pipeline(**{**vars(pipe), "unknown_words": "ignore"}).check_prompts("a purple hexagon")
    clip_like = Pipeline(**{**vars(pipe), "vocabulary": None})  # CLIP: no vocabulary
    assert clip_like.check_prompts(["a purple hexagon"]) == ["a purple hexagon"]
  with pytest.warns(PromptWarning, match="prompts.0. = '' has no words"):
    clip_like.check_prompts([""])
  with pytest.raises(ValueError, match="unknown_words must be one of 'warn', 'error', 'ignore', "
                                       "got 'loud'"):
    Pipeline(**{**vars(pipe), "unknown_words": "loud"})


IMAGE = np.zeros((32, 32, 3), np.uint8)
MASK = np.zeros((32, 32), bool)


@pytest.mark.parametrize(("call", "message"), [
    (lambda p: p(PROMPT, guidance_scale=math.nan), "guidance_scale must be a finite number >= 0, "
                                                   "got nan"),
    (lambda p: p(PROMPT, guidance_scale=math.inf), "guidance_scale must be a finite number >= 0, "
                                                   "got inf"),
    (lambda p: p(PROMPT, num_inference_steps=2.5), "num_inference_steps must be a positive "
                                                   "integer, got 2.5"),
    (lambda p: p(PROMPT, num_inference_steps=True), "num_inference_steps must be a positive "
                                                    "integer, got True"),
    (lambda p: p(PROMPT, truncation_rate=0.0), "truncation_rate must be a finite number in "
                                               "(0, 1], got 0.0"),
    (lambda p: p(PROMPT, purity_temperature=math.nan), "purity_temperature must be a finite "
                                                       "number >= 0, got nan"),
    (lambda p: p(PROMPT, typical_mass=2), "typical_mass must be a finite number in (0, 1], got 2"),
    (lambda p: p(PROMPT, max_reveal_per_call=0), "max_reveal_per_call must be a positive "
                                                 "integer, got 0"),
    (lambda p: p(PROMPT, seed=1.5), "seed must be an integer in 0..4294967295, got 1.5"),
    (lambda p: p(PROMPT, seed=-1), "seed must be an integer in 0..4294967295, got -1"),
    (lambda p: p(PROMPT, output_type="jpg"), "output_type must be one of 'pil', 'np', 'tokens', "
                                             "got 'jpg'"),
    (lambda p: p([]), "prompts is an empty list; give at least one prompt"),
    (lambda p: p(PROMPT, num_images_per_prompt=0), "num_images_per_prompt must be a positive "
                                                   "integer, got 0"),
    (lambda p: p(PROMPT, num_images_per_prompt=-2), "num_images_per_prompt must be a positive "
                                                    "integer, got -2"),
    (lambda p: p.inpaint(PROMPT, np.full((32, 32, 3), 255.0), MASK),
     "image is a float image with values in 255..255; float pixels must be in [0, 1]"),
    (lambda p: p.inpaint(PROMPT, IMAGE, MASK[:16]), "mask has shape (16, 32); expected (32, 32) "
                                                    "like the image"),
    (lambda p: p.inpaint(PROMPT, IMAGE, MASK, guidance_scale=math.nan),
     "guidance_scale must be a finite number >= 0, got nan"),
    (lambda p: p.outpaint(PROMPT, IMAGE, (4.0, 0, 0, 0)),
     "pad must be 4 non-negative multiples of 4 pixels (top, bottom, left, right), got "
     "(4.0, 0, 0, 0)"),
    (lambda p: p.edit(PROMPT, IMAGE, strength=math.nan), "strength must be a finite number in "
                                                         "[0, 1], got nan"),
    (lambda p: p.interpolate(PROMPT, "", [0.0, math.inf]), "weights must be a non-empty list of "
                                                           "finite numbers, got [0.0, inf]"),
    (lambda p: p.interpolate(PROMPT, None, [0.5]), "prompt_b must be a str, got None"),
    (lambda p: p.regions([PROMPT, PROMPT], [MASK, MASK[:8]]), "masks[1] has shape (8, 32); "
                                                              "expected (32, 32)"),
    (lambda p: Pipeline.from_pretrained("nowhere", step=1.5), "step must be a non-negative "
                                                              "integer, got 1.5"),
])
def test_bad_pipeline_arguments_fail_before_any_work(pipe, call, message):
  before = set(pipe._cache)
  with pytest.raises(ValueError, match=re.escape(message)):
    call(pipe)
  assert set(pipe._cache) == before  # nothing compiled, nothing encoded


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--guidance", "inf"], "--guidance must be a finite number >= 0, got inf"),
    (["--truncation", "1.5"], "--truncation must be a finite number in (0, 1], got 1.5"),
    (["--seed", "-3"], "--seed must be an integer in 0..4294967295, got -3"),
    (["--num", "0"], "--num must be a positive integer, got 0"),
    (["--batch_size", "0"], "--batch_size must be a positive integer, got 0"),
    (["--max_reveal_per_call", "0"], "--max_reveal_per_call must be a positive integer, got 0"),
    (["--out", "{tmp}/grid"], "--out {tmp}/grid needs an image file extension such as .png, got "
                              "none"),
    (["--out", "{tmp}"], "--out {tmp} is a directory; give an image file path such as "
                         "{tmp}/samples.png"),
    (["--out", "{tmp}/file.txt/grid.png"], "--out {tmp}/file.txt/grid.png: {tmp}/file.txt is a "
                                           "file, so the folder {tmp}/file.txt cannot be created"),
])
def test_sample_flags_are_checked_before_loading(flags, message, tmp_path, capsys):
  (tmp_path / "file.txt").write_text("")
  flags = [f.format(tmp=tmp_path) for f in flags]
  with pytest.raises(SystemExit):  # the workdir is never opened
    sample.main(["--workdir", str(tmp_path / "nowhere"), "--prompt", PROMPT, *flags])
  assert f"error: {message.format(tmp=tmp_path)}\n" in capsys.readouterr().err


def test_sample_refuses_unknown_words_before_sampling(tiny_workdir, tmp_path):
  out = tmp_path / "grid.png"
  with pytest.raises(ValueError, match=re.escape(
      "--prompt = 'a purple hexagon' has words the text encoder never saw in training: "
      "'purple', 'hexagon' (read as [UNK]; the image will not follow them) "
      "(--unknown_words=warn samples them anyway)")):
    sample.main(["--workdir", tiny_workdir, "--prompt", PROMPT, "--prompt", "a purple hexagon",
                 "--unknown_words", "error", "--out", str(out)])
  assert not out.exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--num_samples", "0"], "--num_samples must be a positive integer, got 0"),
    (["--batch_size", "0"], "--batch_size must be a positive integer, got 0"),
    (["--is_splits", "-1"], "--is_splits must be a positive integer, got -1"),
    (["--grid_size", "-1"], "--grid_size must be a non-negative integer, got -1"),
    (["--seed", "4294967296"], "--seed must be an integer in 0..4294967295, got 4294967296"),
])
def test_evaluate_flags_are_checked_first(flags, message, tmp_path):
  with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
    evaluate.main(["--checkpoint", str(tmp_path / "nowhere"), *flags])


@pytest.mark.parametrize(("spec", "message"), [
    ("vqdiffusion/all/nan", "guidance must be a finite number >= 0, got nan"),
    ("vqdiffusion/2.5", "steps must be a positive integer or 'all', got '2.5'"),
    ("vqdiffusion/0", "steps must be a positive integer, got 0"),
    ("vqdiffusion/all/x", "guidance must be a finite number >= 0, got 'x'"),
    ("vqdiffusion/all/2/0", "truncation must be a finite number in (0, 1], got 0.0"),
])
def test_evaluate_sampler_specs_name_the_bad_field(spec, message):
  with pytest.raises(ValueError, match=f"^{re.escape(f'bad sampler spec {spec!r}: {message}')}$"):
    evaluate.SamplerSpec.parse(spec)


def test_evaluate_reports_unknown_caption_words_once_before_sampling(tiny_workdir, tmp_path):
  (tmp_path / "captions.txt").write_text(f"{PROMPT}\na purple hexagon\n")
  flags = ["--checkpoint", tiny_workdir, "--captions", str(tmp_path / "captions.txt"),
           "--num_samples", "2", "--out", str(tmp_path / "eval")]
  with pytest.raises(ValueError, match=re.escape(
      "captions[1] = 'a purple hexagon' has words the text encoder never saw in training: "
      "'purple', 'hexagon' (read as [UNK]; the image will not follow them) "
      "(--unknown_words=warn samples them anyway)")):
    evaluate.main([*flags, "--unknown_words", "error"])
  assert not (tmp_path / "eval").exists()


def test_the_word_tokenizer_names_a_bad_text_or_length():
  words = WordTokenizer.fit(["a red circle"], max_vocab=10)
  with pytest.raises(ValueError, match=re.escape("texts[1] must be a str, got None")):
    words.encode(["a red circle", None])
  with pytest.raises(ValueError, match=re.escape(
      "max_length must be an integer >= 2 (room for [BOS] and [EOS]), got 2.5")):
    words.encode("a red circle", max_length=2.5)
