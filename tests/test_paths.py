"""Tests for data-dir resolution and the checksum-verified download.

Downloads never touch the network: a closed local port stands in for being
offline and a local ``http.server`` thread serves a small zip.
"""

import functools
import hashlib
import http.server
import io
import threading
import zipfile

import pytest

from emerflow_jax.data import dataset, paths

# Port 9 ("discard") has no listener here: connecting fails at once.
CLOSED_URL = "http://127.0.0.1:9/x.zip"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
  """Requests to 127.0.0.1 must not go through a proxy from the environment."""
  for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
              "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("no_proxy", "*")


def test_resolution_order_config_then_env_then_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "env"))
  assert paths.resolve_data_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
  assert paths.resolve_data_dir("") == tmp_path / "env"
  assert paths.resolve_data_dir(None) == tmp_path / "env"
  monkeypatch.delenv(paths.ENV_VAR)
  assert paths.resolve_data_dir(None) == tmp_path / "cache" / "emerflow_jax"


def test_resolution_makes_relative_paths_absolute(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv(paths.ENV_VAR, "rel")
  assert paths.resolve_data_dir(None) == tmp_path / "rel"
  assert paths.resolve_data_dir("other") == tmp_path / "other"


def test_require_files_names_folder_and_every_missing_file(tmp_path):
  (tmp_path / "present.txt").write_text("x")
  paths.require_files(tmp_path, ["present.txt"])
  with pytest.raises(dataset.DataError) as e:
    paths.require_files(tmp_path, ["present.txt", "a.dat", "b.dat"], hint="Get them.")
  msg = str(e.value)
  assert str(tmp_path) in msg and "a.dat" in msg and "b.dat" in msg
  assert "present.txt" not in msg and "Get them." in msg


def test_offline_download_fails_with_where_to_put_files(tmp_path):
  folder = tmp_path / "ml"
  with pytest.raises(dataset.DataError) as e:
    paths.download_zip(CLOSED_URL, "0" * 32, folder, ["u.data", "u.item"],
                       timeout_s=5.0)
  msg = str(e.value)
  assert "could not download" in msg and CLOSED_URL in msg
  assert str(folder) in msg and "u.data" in msg and "u.item" in msg
  assert not folder.exists()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):
    del args


@pytest.fixture
def zip_server(tmp_path):
  """Serves ``tmp_path/www/data.zip`` (members a.txt, sub/b.txt); yields (url, md5)."""
  www = tmp_path / "www"
  www.mkdir()
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("pkg/a.txt", "alpha\n")
    zf.writestr("pkg/sub/b.txt", "beta\n")
  (www / "data.zip").write_bytes(buf.getvalue())
  handler = functools.partial(_QuietHandler, directory=str(www))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
    yield url, hashlib.md5(buf.getvalue()).hexdigest()
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_with_right_md5_extracts_members_flat(zip_server, tmp_path):
  url, md5 = zip_server
  folder = tmp_path / "out"
  paths.download_zip(url, md5, folder, ["a.txt", "b.txt"])
  assert (folder / "a.txt").read_text() == "alpha\n"
  assert (folder / "b.txt").read_text() == "beta\n"
  assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"]


def test_download_with_wrong_md5_is_rejected_and_writes_nothing(zip_server, tmp_path):
  url, md5 = zip_server
  folder = tmp_path / "out"
  wrong = "f" * 32
  assert wrong != md5
  with pytest.raises(dataset.DataError, match="checksum mismatch") as e:
    paths.download_zip(url, wrong, folder, ["a.txt"])
  assert md5 in str(e.value) and wrong in str(e.value)
  assert not (folder / "a.txt").exists()


def test_download_of_zip_without_a_member_fails(zip_server, tmp_path):
  url, md5 = zip_server
  with pytest.raises(dataset.DataError, match="no member c.txt"):
    paths.download_zip(url, md5, tmp_path / "out", ["a.txt", "c.txt"])


def test_missing_url_path_is_a_clear_error(zip_server, tmp_path):
  url, md5 = zip_server
  missing = url.replace("data.zip", "nothing.zip")
  with pytest.raises(dataset.DataError, match="could not download"):
    paths.download_zip(missing, md5, tmp_path / "out", ["a.txt"])


def test_md5sum_matches_hashlib():
  assert paths.md5sum(b"abc") == "900150983cd24fb0d6963f7d28e17f72"
