"""Stage-1 prompts, the parser of the LLM's answers, and the serialization s_i.

DESIGN §2: ``A = LLM(prompt(type))`` asks which extra features matter for an
item type; ``A_i = LLM(prompt(F_i, A))`` fills them in for item i; ``s_i`` joins
the raw features F_i and A_i into one text of ``name: content`` pairs.

Both prompts are one-shot: small offline models (SmolLM2-135M) ignore a
"feature: value" format request when asked zero-shot, but copy the format of a
worked example reliably. The example item is always a different item than the
one asked about, and its values are never copied into the parsed answer unless
the model repeats them.

Any change to a prompt text must bump ``PROMPT_VERSION``: stores and committed
precomputed texts record it, and a store made with another version is refused.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from emerflow_jax.enrich import common

PROMPT_VERSION = "emerflow-prompts-v1"
# Answers are stored verbatim, so a parser change re-derives features and
# texts from them without generating again; it bumps this instead.
PARSER_VERSION = "emerflow-parser-v1"

N_FEATURES = 6  # extra features asked for per item type

SYSTEM = ("You are a domain expert. Answer in the exact format asked, without "
          "explanations.")

# The type-level worked example uses a type that is none of ours, so the model
# shows the format without being handed an answer.
_TYPE_EXAMPLE = ("video game", ["gameplay style", "story themes", "art style",
                                "difficulty", "multiplayer modes",
                                "target age group"])

# Used to top up the type-level answer when the model proposes fewer than
# N_FEATURES usable names (a 135M model often repeats itself or names the type).
DEFAULT_FEATURES = {
    "movie": ["plot", "mood", "themes", "setting", "target audience",
              "visual style"],
    "disease": ["affected organs", "main symptoms", "causes", "inheritance",
                "typical onset age", "treatments"],
    "drug": ["drug class", "mechanism of action", "main indications",
             "administration route", "side effects", "molecular target"],
}
_GENERIC_FEATURES = ["category", "description", "main properties", "uses",
                     "audience", "related items"]

# One worked item per type; values for the default features, raw fields named
# as the dataset readers name them.
_ITEM_EXAMPLES = {
    "movie": ({"title": "Lion King, The", "year": "1994",
               "genres": "Animation, Children's, Musical"},
              {"plot": "a young lion prince flees his kingdom after his "
                       "father's death and returns to reclaim it",
               "mood": "epic, emotional",
               "themes": "responsibility, family, growing up",
               "setting": "the African savanna",
               "target audience": "families and children",
               "visual style": "hand-drawn animation"}),
    "disease": ({"name": "Cystic Fibrosis", "type": "disease",
                 "classes": "C08 Respiratory Tract Diseases, C16 Congenital, "
                            "Hereditary, and Neonatal Diseases and "
                            "Abnormalities",
                 "semantic type": "Disease or Syndrome"},
                {"affected organs": "lungs, pancreas, digestive tract",
                 "main symptoms": "thick mucus, chronic cough, lung infections",
                 "causes": "mutations in the CFTR gene",
                 "inheritance": "autosomal recessive",
                 "typical onset age": "infancy",
                 "treatments": "airway clearance, CFTR modulators, "
                               "enzyme supplements"}),
    "drug": ({"name": "Metformin", "drugbank id": "DB00331"},
             {"drug class": "biguanide antidiabetic",
              "mechanism of action": "lowers hepatic glucose production",
              "main indications": "type 2 diabetes",
              "administration route": "oral",
              "side effects": "nausea, diarrhea, lactic acidosis (rare)",
              "molecular target": "mitochondrial glycerophosphate "
                                  "dehydrogenase"}),
}


def type_prompt(item_type: str, n: int = N_FEATURES) -> list[dict[str, str]]:
  """Chat messages asking which extra features matter for ``item_type``.

  Args:
    item_type: "movie", "disease", "drug", ...
    n: how many feature names to ask for.

  Returns:
    Chat messages: system, one worked example (question and answer), then the
    question for ``item_type``.
  """
  def ask(t: str) -> str:
    return (f"Which extra features, beyond the basic ones, matter most when "
            f"recommending a {t}? Answer with {n} short feature names, one per "
            "line.")
  ex_type, ex_names = _TYPE_EXAMPLE
  return [{"role": "system", "content": SYSTEM},
          {"role": "user", "content": ask(ex_type)},
          {"role": "assistant", "content": "\n".join(ex_names[:n])},
          {"role": "user", "content": ask(item_type)}]


def item_prompt(item_type: str, raw: Mapping[str, str],
                features: Sequence[str]) -> list[dict[str, str]]:
  """Chat messages asking the model to fill ``features`` in for one item.

  Args:
    item_type: "movie", "disease", "drug", ...
    raw: the item's raw features F_i, ``{name: text}``.
    features: the feature names A to fill in.

  Returns:
    Chat messages (system, one worked example when the type has one, question).
  """
  def ask(r: Mapping[str, str]) -> str:
    return (f"{item_type.capitalize()}: {common.serialize(r, {})}\n"
            "Fill in each feature with a short value, one line per feature as "
            "'feature: value'.\nFeatures: " + ", ".join(features))
  messages = [{"role": "system", "content": SYSTEM}]
  example = _ITEM_EXAMPLES.get(item_type)
  if example is not None:
    ex_raw, ex_values = example
    shown = [f for f in features if f in ex_values]
    # The example only shows features it has values for; it must show at least
    # half of them or it teaches the model to skip features.
    if 2 * len(shown) >= len(features):
      messages += [{"role": "user", "content": ask(ex_raw)},
                   {"role": "assistant",
                    "content": "\n".join(f"{f}: {ex_values[f]}" for f in shown)}]
  messages.append({"role": "user", "content": ask(raw)})
  return messages


def default_features(item_type: str) -> list[str]:
  return list(DEFAULT_FEATURES.get(item_type, _GENERIC_FEATURES))


_NAME_OK = re.compile(r"^[a-z][a-z0-9 '&/-]*$")


def parse_feature_names(answer: str, item_type: str = "",
                        reserved: Sequence[str] = (),
                        max_words: int = 3) -> list[str]:
  """Parses a type-level answer into distinct feature names.

  Accepts one name per line, numbered or bulleted lists, markdown bold,
  "name: explanation" lines, or a single comma-separated line. The item type
  word is removed from a name ("movie plot" -> "plot"). Drops names that are
  empty afterwards, a ``reserved`` (raw) field name, too long, not word-like,
  or a near-repeat of an earlier name (a shared word or a common prefix: small
  models answer "plot, plot style, plot theme").

  Args:
    answer: the model's answer to ``type_prompt``.
    item_type: the item type, whose word (and plural) is removed from names.
    reserved: raw field names the model may not propose.
    max_words: longest name kept, in words.

  Returns:
    Names in the order the model gave them, lower-case.
  """
  lines = [l for l in answer.splitlines() if l.strip()]
  if len(lines) == 1 and "," in lines[0]:
    lines = lines[0].split(",")
  type_words = {item_type.lower(), item_type.lower() + "s"} - {""}
  banned = {common.normalize_name(r) for r in reserved}
  names: list[str] = []
  for line in lines:
    words = [w for w in common.normalize_name(line).split() if w not in type_words]
    name = " ".join(words)
    if (not name or name in banned or len(words) > max_words
        or not _NAME_OK.match(name)
        or any(_near_repeat(name, n) for n in names)):
      continue
    names.append(name)
  return names


def _near_repeat(a: str, b: str) -> bool:
  wa, wb = set(a.split()), set(b.split())
  return bool(wa & wb) or a[:5] == b[:5]


def choose_features(answer: str, item_type: str, reserved: Sequence[str] = (),
                    n: int = N_FEATURES) -> tuple[list[str], int]:
  """The feature list A: up to n // 2 of the model's names, then defaults.

  The model proposes and the type's default list anchors: a 135M model's list
  is mostly repetition, and the defaults are what the worked item example
  shows values for, which keeps the item-level answers in format.

  Args:
    answer: the model's answer to ``type_prompt``.
    item_type: the item type (its default list fills up the rest).
    reserved: raw field names the model may not propose.
    n: the list's target length.

  Returns:
    (features, at most n and fewer only when the defaults run out, how many of
    them came from the model).
  """
  names = parse_feature_names(answer, item_type, reserved)[:n // 2]
  from_model = len(names)
  for d in default_features(item_type):
    if len(names) >= n:
      break
    if d not in names and not any(_near_repeat(d, m) for m in names):
      names.append(d)
  return names, from_model


_EMPTY_VALUES = {"", "n/a", "na", "none", "unknown", "-", "not applicable",
                 "not available"}


def _name_pattern(name: str) -> str:
  words = [re.escape(w) for w in name.split()]
  # Tolerate plural/singular drift ("theme" for "themes") and '_' for ' '.
  last = name.split()[-1]
  words[-1] = re.escape(last[:-1] if last.endswith("s") else last) + "s?"
  return r"[\s_]+".join(words)


def _tokens(text: str) -> set[str]:
  return set(re.findall(r"[a-z0-9]+", text.lower()))


def is_near_copy(value: str, example: str) -> bool:
  """Whether ``value`` mostly repeats ``example`` (token Jaccard >= 0.5).

  Args:
    value: a parsed feature value.
    example: the worked example's value for the same feature.

  Returns:
    True when the two share at least half of their lower-case word tokens;
    False when either has none.
  """
  a, b = _tokens(value), _tokens(example)
  return bool(a and b) and len(a & b) >= 0.5 * len(a | b)


def parse_feature_values(answer: str, features: Sequence[str],
                         item_type: str | None = None) -> dict[str, str]:
  """Parses an item-level answer into ``{feature: value}`` for asked features.

  Finds every ``feature:`` heading at a line start or after ';' (bullets,
  numbering and markdown bold allowed), takes the text up to the end of the
  line or the next heading, and keeps the first non-empty value per feature.
  Names the model invents are ignored, so the output never holds more than
  ``features``. With ``item_type``, a value that nearly repeats the worked
  example's value for the same feature is dropped: a small model copies the
  example, and a copy says nothing about this item.

  Args:
    answer: the model's answer to ``item_prompt``.
    features: the feature names asked for.
    item_type: the item type, to drop copies of its worked example (None:
      keep them).

  Returns:
    feature -> cleaned value, in the order of ``features``; features without
    a usable value are absent.
  """
  if not features:
    return {}
  example = _ITEM_EXAMPLES.get(item_type or "", ({}, {}))[1]
  alts = sorted(features, key=len, reverse=True)  # longest name wins a tie
  head = re.compile(
      r"(?:^|[\n;])[ \t]*(?:[-*•]+|\d+[.)])?[ \t]*\**[ \t]*(" +
      "|".join(f"(?P<f{i}>{_name_pattern(f)})" for i, f in enumerate(alts)) +
      r")[ \t]*\**[ \t]*:[ \t]*\**", re.IGNORECASE)
  matches = list(head.finditer(answer))
  values: dict[str, str] = {}
  for j, m in enumerate(matches):
    name = next(alts[i] for i in range(len(alts)) if m.group(f"f{i}"))
    end = matches[j + 1].start() if j + 1 < len(matches) else len(answer)
    value = common.clean_value(answer[m.end():end].split("\n", 1)[0])
    if (name in values or value.lower() in _EMPTY_VALUES
        or (name in example and is_near_copy(value, example[name]))):
      continue
    values[name] = value
  return {f: values[f] for f in features if f in values}
