"""MovieLens-100K and MovieLens-1M readers (GroupLens files, downloaded on demand).

Label = rating >= 4 (DESIGN §1).  User fields: user_id, gender, age, occupation,
zip (first digit, as in the CVAR/MeLU preprocessing); item fields: item_id, year,
title words (padded sequence) and genres (padded multi-hot sequence).
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

from emerflow_jax.data import dataset, paths

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"
ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
ML1M_MD5 = "c4d9eecfca2ab87c1945afe126590906"

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's",
                 "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
                 "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
                 "Sci-Fi", "Thriller", "War", "Western")
TITLE_LEN = 8
GENRE_LEN = 6
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def split_title(title: str) -> tuple[str, str]:
  """'Toy Story (1995)' -> ('Toy Story', '1995'); no year -> (title, '')."""
  m = _YEAR.search(title)
  if not m:
    return title.strip(), ""
  return title[:m.start()].strip(), m.group(1)


def _read_lines(path: pathlib.Path, encoding: str = "latin-1") -> list[str]:
  with open(path, encoding=encoding) as f:
    return [line.rstrip("\r\n") for line in f]


def _fields(path: pathlib.Path, lineno: int, line: str, sep: str,
            n: int) -> list[str]:
  parts = line.split(sep)
  if len(parts) != n:
    raise dataset.DataError(f"{path}:{lineno}: expected {n} '{sep}'-separated "
                            f"fields, got {len(parts)}: {line[:80]!r}")
  return parts


def _int(path: pathlib.Path, lineno: int, text: str, what: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise dataset.DataError(f"{path}:{lineno}: {what} {text!r} is not an "
                            "integer") from None


def _ensure(folder: pathlib.Path, names: list[str], url: str, md5: str,
            download: bool) -> None:
  missing = [n for n in names if not (folder / n).is_file()]
  if missing and download:
    paths.download_zip(url, md5, folder, names)
  paths.require_files(folder, names, hint=f"Download {url} (md5 {md5}) and "
                      f"unzip it into {folder}.")


def _assemble(name: str, ratings: list[tuple[int, int, int, int]],
              users: dict[int, dict[str, str]],
              movies: dict[int, dict[str, str]],
              rating_file: pathlib.Path) -> dataset.Dataset:
  """Builds the Dataset from parsed ratings/users/movies (raw ids)."""
  user_ids = sorted(users)
  movie_ids = sorted(movies)
  uidx = {u: i for i, u in enumerate(user_ids)}
  midx = {m: i for i, m in enumerate(movie_ids)}
  rows = np.asarray(ratings, np.int64).reshape(-1, 5)
  for u, m, r, _, lineno in rows:
    if u not in uidx:
      raise dataset.DataError(f"{rating_file}:{lineno}: unknown user id {u}")
    if m not in midx:
      raise dataset.DataError(f"{rating_file}:{lineno}: unknown item id {m}")
    if not 1 <= r <= 5:
      raise dataset.DataError(f"{rating_file}:{lineno}: rating {r} not in 1..5")
  u_arr = np.asarray([uidx[u] for u in rows[:, 0]], np.int32)
  i_arr = np.asarray([midx[m] for m in rows[:, 1]], np.int32)

  uf, vocab = {}, {}
  uf["user_id"] = np.arange(1, len(user_ids) + 1, dtype=np.int32)
  for f in ("gender", "age", "occupation", "zip"):
    uf[f], v = dataset.encode_categorical([users[u][f] for u in user_ids])
    vocab[f"user/{f}"] = len(v) + 1
  vocab["user/user_id"] = len(user_ids) + 1

  itf = {"item_id": np.arange(1, len(movie_ids) + 1, dtype=np.int32)}
  vocab["item/item_id"] = len(movie_ids) + 1
  itf["year"], v = dataset.encode_categorical([movies[m]["year"] for m in movie_ids])
  vocab["item/year"] = len(v) + 1
  itf["title"], v = dataset.encode_sequences(
      [dataset.tokenize(movies[m]["title"]) for m in movie_ids], TITLE_LEN)
  vocab["item/title"] = len(v) + 1
  itf["genres"], v = dataset.encode_sequences(
      [movies[m]["genres"].split("|") if movies[m]["genres"] else []
       for m in movie_ids], GENRE_LEN)
  vocab["item/genres"] = len(v) + 1

  raw = [{"title": movies[m]["title"], "year": movies[m]["year"],
          "genres": movies[m]["genres"].replace("|", ", ")} for m in movie_ids]
  return dataset.Dataset(
      name=name, item_type="movie", users=u_arr, items=i_arr,
      labels=(rows[:, 2] >= 4).astype(np.float32),
      times=rows[:, 3].astype(np.float64), user_fields=uf, item_fields=itf,
      vocab_sizes=vocab, item_keys=np.asarray([str(m) for m in movie_ids]),
      item_raw=raw, info={"ratings": int(len(rows))}).validate()


def load_movielens100k(folder: pathlib.Path, download: bool = True) -> dataset.Dataset:
  """Reads u.data / u.item / u.user from ``folder``.

  Args:
    folder: directory holding the ml-100k files (downloaded there if missing
      and ``download``).
    download: whether to try GroupLens when files are missing.

  Returns:
    The validated Dataset (943 users, 1,682 items, 100,000 rows).
  """
  folder = pathlib.Path(folder)
  _ensure(folder, ["u.data", "u.item", "u.user"], ML100K_URL, ML100K_MD5, download)
  users = {}
  path = folder / "u.user"
  for n, line in enumerate(_read_lines(path), 1):
    if not line:
      continue
    uid, age, gender, occ, zipc = _fields(path, n, line, "|", 5)
    users[_int(path, n, uid, "user id")] = {
        "age": age, "gender": gender, "occupation": occ, "zip": zipc[:1]}
  movies = {}
  path = folder / "u.item"
  for n, line in enumerate(_read_lines(path), 1):
    if not line:
      continue
    parts = _fields(path, n, line, "|", 24)
    flags = parts[5:]
    if any(f not in ("0", "1") for f in flags):
      raise dataset.DataError(f"{path}:{n}: genre flags must be 0/1")
    title, year = split_title(parts[1])
    genres = [g for g, f in zip(ML100K_GENRES, flags) if f == "1"]
    movies[_int(path, n, parts[0], "item id")] = {
        "title": title, "year": year or parts[2][-4:],
        "genres": "|".join(genres)}
  ratings = []
  path = folder / "u.data"
  for n, line in enumerate(_read_lines(path), 1):
    if not line:
      continue
    u, m, r, t = _fields(path, n, line, "\t", 4)
    ratings.append((_int(path, n, u, "user id"), _int(path, n, m, "item id"),
                    _int(path, n, r, "rating"), _int(path, n, t, "timestamp"), n))
  return _assemble("movielens100k", ratings, users, movies, path)


def load_movielens1m(folder: pathlib.Path, download: bool = True) -> dataset.Dataset:
  """Reads ratings.dat / movies.dat / users.dat ('::'-separated, latin-1).

  Args:
    folder: directory holding the ml-1m files (downloaded there if missing
      and ``download``).
    download: whether to try GroupLens when files are missing.

  Returns:
    The validated Dataset (6,040 users, 3,883 items of which 3,706 are rated,
    1,000,209 rows).
  """
  folder = pathlib.Path(folder)
  _ensure(folder, ["ratings.dat", "movies.dat", "users.dat"], ML1M_URL, ML1M_MD5,
          download)
  users = {}
  path = folder / "users.dat"
  for n, line in enumerate(_read_lines(path), 1):
    if not line:
      continue
    uid, gender, age, occ, zipc = _fields(path, n, line, "::", 5)
    users[_int(path, n, uid, "user id")] = {
        "gender": gender, "age": age, "occupation": occ, "zip": zipc[:1]}
  movies = {}
  path = folder / "movies.dat"
  for n, line in enumerate(_read_lines(path), 1):
    if not line:
      continue
    mid, title, genres = _fields(path, n, line, "::", 3)
    t, year = split_title(title)
    movies[_int(path, n, mid, "item id")] = {"title": t, "year": year,
                                             "genres": genres}
  ratings = []
  path = folder / "ratings.dat"
  for n, line in enumerate(_read_lines(path), 1):
    if not line:
      continue
    u, m, r, t = _fields(path, n, line, "::", 4)
    ratings.append((_int(path, n, u, "user id"), _int(path, n, m, "item id"),
                    _int(path, n, r, "rating"), _int(path, n, t, "timestamp"), n))
  return _assemble("movielens1m", ratings, users, movies, path)
