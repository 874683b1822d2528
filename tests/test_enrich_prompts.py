"""Tests for emerflow_jax.enrich.prompts: prompts, answer parser, serialization."""

from emerflow_jax.enrich import common, prompts

FEATURES = ["plot", "mood", "themes", "setting", "target audience",
            "visual style"]


def test_type_prompt_is_one_shot_chat():
  messages = prompts.type_prompt("disease")
  assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
  assert "disease" in messages[-1]["content"]
  assert "disease" not in messages[1]["content"]  # the example is another type


def test_item_prompt_shows_raw_features_and_asked_features():
  raw = {"title": "Toy Story", "year": "1995", "genres": "Animation, Comedy"}
  messages = prompts.item_prompt("movie", raw, FEATURES)
  question = messages[-1]["content"]
  assert "title: Toy Story; year: 1995; genres: Animation, Comedy" in question
  assert "Features: plot, mood, themes" in question
  # The worked example answers in the requested format for the same features.
  assert messages[-2]["role"] == "assistant"
  assert messages[-2]["content"].splitlines()[0].startswith("plot: ")


def test_item_prompt_drops_example_that_covers_too_few_features():
  messages = prompts.item_prompt("movie", {"title": "X"}, ["a", "b", "plot"])
  assert [m["role"] for m in messages] == ["system", "user"]
  messages = prompts.item_prompt("gadget", {"name": "X"}, FEATURES)
  assert [m["role"] for m in messages] == ["system", "user"]


def test_parse_feature_names_handles_lists_markup_and_repeats():
  answer = ("1. **Movie plot**: what happens\n2. movie plot style\n- Mood\n"
            "* title\n\nsoundtrack\nsoundtracks and more words here\n"
            "mood\n3) Target Audience")
  names = prompts.parse_feature_names(answer, "movie", reserved=["title"])
  assert names == ["plot", "mood", "soundtrack", "target audience"]


def test_parse_feature_names_comma_line():
  assert prompts.parse_feature_names("cuisine, price range, atmosphere") == [
      "cuisine", "price range", "atmosphere"]


def test_choose_features_tops_up_with_defaults():
  features, n_model = prompts.choose_features(
      "movie plot\nmovie plot style\nmovie plot theme", "movie")
  assert features == FEATURES
  assert n_model == 1
  features, n_model = prompts.choose_features("", "drug")
  assert features == prompts.DEFAULT_FEATURES["drug"] and n_model == 0
  features, _ = prompts.choose_features("a\nb\nc\nd\ne\nf\ng", "gadget")
  assert len(features) == prompts.N_FEATURES


def test_parse_feature_values_lines():
  answer = ("plot: a toy cowboy feels replaced\n**Mood**: playful, warm\n"
            "- theme: friendship\nspecial effects: lots\nsetting: n/a\n"
            "mood: ignored second value")
  values = prompts.parse_feature_values(answer, FEATURES)
  assert values == {"plot": "a toy cowboy feels replaced",
                    "mood": "playful, warm", "themes": "friendship"}


def test_parse_feature_values_single_line_and_long_names():
  answer = "plot: heist; target audience: adults; visual style: neon; mood:"
  values = prompts.parse_feature_values(answer, FEATURES)
  assert values == {"plot": "heist", "target audience": "adults",
                    "visual style": "neon"}
  assert prompts.parse_feature_values("no format at all", FEATURES) == {}
  assert prompts.parse_feature_values("plot: x", []) == {}


def test_parse_feature_values_truncates_runaway_values():
  values = prompts.parse_feature_values("plot: " + "very " * 200, ["plot"])
  assert len(values["plot"]) <= common.MAX_VALUE_CHARS


def test_serialize_raw_first_and_raw_wins():
  text = common.serialize(
      {"title": "Heat", "year": "1995", "genres": ""},
      {"Title": "Wrong", "mood": "tense;\ndark", "plot": "  "})
  assert text == "title: Heat; year: 1995; mood: tense, dark"
  assert common.parse_serialized(text) == {"title": "Heat", "year": "1995",
                                            "mood": "tense, dark"}
