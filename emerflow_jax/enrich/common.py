"""What every stage-1 module shares: the record text format and the local-model runtime.

The enrichment package flows one way: ``sources`` (texts imported from the
data directory) -> ``prompts`` (what is asked and how answers are parsed) ->
``generate`` (a local causal LM) -> ``encode`` (a sentence encoder) -> ``store``
(vectors on disk); ``pipeline`` and ``loader`` drive them, and none of them
reaches back up.  The pieces more than one stage needs live here and import
nothing of the package:

- the text record s_i: ``serialize`` / ``parse_serialized`` (``name: value``
  pairs; raw features first), with ``normalize_name`` and ``clean_value``;
- the local-model runtime: offline mode, quiet loading, package lookup,
  weight fingerprints and file hashing, torch thread setup.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pathlib
import re
from typing import Mapping

from emerflow_jax.data import dataset

MAX_VALUE_CHARS = 200  # a runaway generation must not dominate s_i
PAIR_SEP = "; "
_BULLET = re.compile(r"^\s*(?:[-*•]+|\d+\s*[.)]|[a-z]\))\s*", re.IGNORECASE)


def normalize_name(name: str) -> str:
  """Lower-cases a feature name and strips markup, bullets and ':' suffixes."""
  name = _BULLET.sub("", name)
  name = name.replace("*", "").replace("_", " ").replace("`", "")
  name = name.split(":", 1)[0]
  return " ".join(name.lower().split()).strip(" .,;-")


def clean_value(value: str) -> str:
  """One line, no pair separators or markup, no repeated comma parts, capped.

  Repeated parts are the typical runaway of greedy decoding ("liver, kidneys,
  liver, kidneys, ..."); keeping each part once keeps the information.
  """
  value = value.replace("*", "").replace(";", ",")
  parts, seen = [], set()
  for part in value.split(","):
    part = " ".join(part.split())
    if part and part.lower() not in seen:
      seen.add(part.lower())
      parts.append(part)
  value = ", ".join(parts).strip(" ,.")
  if len(value) > MAX_VALUE_CHARS:
    value = value[:MAX_VALUE_CHARS].rsplit(" ", 1)[0].rstrip(" ,")
  return value


def serialize(raw: Mapping[str, str], generated: Mapping[str, str]) -> str:
  """s_i: the raw then the generated features as ``name: content`` pairs.

  Empty values are skipped; a generated feature never overrides a raw one of the
  same name (the raw fact wins over the model's guess).

  Example: ``title: Toy Story; year: 1995; genres: Comedy; mood: playful``.

  Args:
    raw: the item's raw features F_i, name -> value.
    generated: the LLM's features, name -> value; a name that normalizes like
      a raw one is skipped.

  Returns:
    The pairs joined by ``PAIR_SEP``, values cleaned by ``clean_value`` and
    "_" in names shown as spaces.
  """
  pairs: list[str] = []
  seen: set[str] = set()
  for source in (raw, generated):
    for name, value in source.items():
      key = normalize_name(str(name)) or str(name)
      value = clean_value(str(value))
      if key in seen or not value:
        continue
      seen.add(key)
      pairs.append(f"{str(name).replace('_', ' ')}: {value}")
  return PAIR_SEP.join(pairs)


def parse_serialized(text: str) -> dict[str, str]:
  """Inverse of ``serialize`` for texts in the same format (importers use it)."""
  out: dict[str, str] = {}
  for part in text.split(";"):
    if ":" not in part:
      continue
    name, value = part.split(":", 1)
    name, value = name.strip(), value.strip()
    if name and value and name not in out:
      out[name] = value
  return out


class ModelNotFoundError(dataset.DataError):
  """A model path or package is missing (the message says what to install)."""


def set_offline() -> None:
  """Switches the Hugging Face libraries to offline mode before their import."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@contextlib.contextmanager
def quiet_loading():
  """Silences progress bars and info logs of the Hugging Face loaders.

  The GGUF converter uses tqdm directly, so only tqdm's environment switch
  reaches it; it is restored afterwards.
  """
  set_offline()
  old = os.environ.get("TQDM_DISABLE")
  os.environ["TQDM_DISABLE"] = "1"
  import transformers  # pylint: disable=g-import-not-at-top
  verbosity = transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_error()
  try:
    yield transformers
  finally:
    transformers.logging.set_verbosity(verbosity)
    if old is None:
      os.environ.pop("TQDM_DISABLE", None)
    else:
      os.environ["TQDM_DISABLE"] = old


def package_dir(package: str) -> pathlib.Path:
  """The installed folder of ``package``, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ModelNotFoundError(
        f"python package {package!r} is not installed; install the optional "
        "LLM extras (requirements-llm.txt, requirements-llm-nodeps.txt)")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def file_sha256(path: str | os.PathLike[str]) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def model_fingerprint(folder: pathlib.Path, gguf_file: str | None) -> str:
  """sha256 of a model's weights, comparable to published checksums.

  Args:
    folder: the model's folder.
    gguf_file: the GGUF file name inside it, or None for a Hugging Face
      directory.

  Returns:
    The hex sha256 of the GGUF or single weights file; for sharded weights,
    the sha256 of the sorted per-file sha256s of the directory's
    safetensors (else bin) shards.
  """
  if gguf_file:
    return file_sha256(folder / gguf_file)
  weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
  if len(weights) == 1:  # the file's own sha256, comparable to published ones
    return file_sha256(weights[0])
  h = hashlib.sha256()
  for w in weights:
    h.update(file_sha256(w).encode())
  return h.hexdigest()


def set_threads(threads: int | None) -> None:
  """Caps torch's intra-op threads (None keeps torch's default)."""
  if threads:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(int(threads))


def local_model_path(spec: str) -> tuple[pathlib.Path, str | None]:
  """Maps a local model path to (directory, gguf file name or None).

  Args:
    spec: a ``.gguf`` file or a Hugging Face model directory (config.json).

  Returns:
    (the folder, the GGUF file name inside it or None).

  Raises:
    ModelNotFoundError: it is neither.
  """
  path = pathlib.Path(spec).expanduser()
  if path.is_file() and path.suffix == ".gguf":
    return path.parent.resolve(), path.name
  if path.is_dir() and (path / "config.json").is_file():
    return path.resolve(), None
  raise ModelNotFoundError(
      f"model {spec!r}: {path} is neither a .gguf file nor a Hugging Face model "
      "directory with config.json")
