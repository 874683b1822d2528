"""Where data files live, and the checksum-verified MovieLens download.

Resolution order (DESIGN §1): the config field ``data.dir``, then
``$EMERFLOW_DATA_DIR``, then a user cache (``$XDG_CACHE_HOME/emerflow_jax`` or
``~/.cache/emerflow_jax``).  Every dataset reads one sub-folder of it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import shutil
import urllib.error
import urllib.request
import zipfile

from emerflow_jax.data import dataset

ENV_VAR = "EMERFLOW_DATA_DIR"


def resolve_data_dir(config_dir: str | None = None) -> pathlib.Path:
  """Returns the data directory by the DESIGN §1 rule (it may not exist yet)."""
  if config_dir:
    return pathlib.Path(config_dir).expanduser().resolve()
  if os.environ.get(ENV_VAR):
    return pathlib.Path(os.environ[ENV_VAR]).expanduser().resolve()
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return pathlib.Path(cache, "emerflow_jax").resolve()


def require_files(folder: pathlib.Path, names: list[str], hint: str = "") -> None:
  """Raises DataError listing every missing file in ``folder``.

  Args:
    folder: the folder the files must be in.
    names: the file names expected there.
    hint: appended to the error message (how to get the files).
  """
  missing = [n for n in names if not (folder / n).is_file()]
  if missing:
    raise dataset.DataError(
        f"missing data files in {folder}: {', '.join(missing)}. {hint}".strip())


def md5sum(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()


def download_zip(url: str, md5: str, folder: pathlib.Path, members: list[str],
                 timeout_s: float = 20.0) -> None:
  """Downloads a zip, checks its md5, and extracts ``members`` flat into ``folder``.

  Fails fast (never hangs): a connection error or a wrong checksum raises
  DataError naming the folder and the files that are expected there.

  Args:
    url: the zip's URL.
    md5: its expected md5 hex digest.
    folder: where the members go (created if missing).
    members: file names to extract, matched by base name anywhere in the zip.
    timeout_s: connection and read timeout, in seconds.
  """
  hint = (f"Put {', '.join(members)} into {folder} (from {url}), or set "
          f"--config.data.dir / ${ENV_VAR}.")
  try:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
      blob = response.read()
  except (urllib.error.URLError, OSError, TimeoutError) as e:
    raise dataset.DataError(f"could not download {url} ({e}). {hint}") from e
  got = md5sum(blob)
  if got != md5:
    raise dataset.DataError(f"checksum mismatch for {url}: md5 {got}, want {md5}. "
                            f"{hint}")
  folder.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(io.BytesIO(blob)) as zf:
    names = {pathlib.PurePosixPath(n).name: n for n in zf.namelist()}
    for m in members:
      if m not in names:
        raise dataset.DataError(f"{url} has no member {m}")
      tmp = folder / (m + ".part")
      with zf.open(names[m]) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
      tmp.replace(folder / m)  # atomic: a killed download leaves no half file
