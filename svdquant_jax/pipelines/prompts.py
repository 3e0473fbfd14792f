"""Prompt lists: a built-in set, file loading, seeded subsets and stable per-prompt seeds."""

from __future__ import annotations

import json
import os
import random
from typing import Any, Sequence

# 64 short, varied text-to-image prompts (objects, scenes, styles, lighting), COCO-caption-like.
BUILTIN_PROMPTS: list[str] = [
    "A red bicycle leaning against a brick wall on a quiet street.",
    "A bowl of ripe oranges on a wooden kitchen table.",
    "Two zebras grazing in a dry savanna at sunset.",
    "A man in a yellow raincoat walking a dog in the rain.",
    "A plate of spaghetti with tomato sauce and fresh basil.",
    "A lighthouse on a rocky cliff under a stormy sky.",
    "A cat sleeping on a stack of old books by a window.",
    "A city bus stopped at a crosswalk at night, wet pavement reflecting neon signs.",
    "A wooden rowboat tied to a dock on a misty lake at dawn.",
    "A close-up photo of a honeybee on a purple flower.",
    "A snowy mountain village with smoke rising from chimneys.",
    "A vintage typewriter on a desk beside a cup of coffee.",
    "A giraffe standing next to a tall acacia tree.",
    "An astronaut riding a horse on the surface of the moon, digital art.",
    "A watercolor painting of a harbor with sailboats.",
    "A child flying a kite on a windy beach.",
    "A bright green parrot perched on a branch in a rainforest.",
    "A steaming bowl of ramen with a soft-boiled egg, overhead shot.",
    "An old steam locomotive crossing a stone bridge.",
    "A modern living room with a gray sofa and large windows, soft morning light.",
    "A pair of running shoes on a gym floor.",
    "A fox in a snowy forest, wildlife photography.",
    "A tall glass of iced lemonade with mint leaves on a sunny patio.",
    "A busy farmers market with baskets of vegetables.",
    "A chess board mid-game with dramatic side lighting.",
    "A hot air balloon floating over green hills.",
    "A pixel art castle on a floating island.",
    "A teddy bear sitting on a park bench in autumn leaves.",
    "A surfer riding a large wave, spray in the air.",
    "A plate of sushi arranged on a black slate board.",
    "An oil painting of a field of sunflowers under a blue sky.",
    "A laptop, a notebook and a pen on a white desk, flat lay.",
    "A herd of sheep crossing a country road.",
    "A neon-lit alley in a futuristic city, cyberpunk style.",
    "A baseball player swinging a bat at home plate.",
    "A stack of pancakes with blueberries and maple syrup.",
    "A polar bear on an ice floe under the northern lights.",
    "A small white boat on turquoise water near a sandy island, aerial view.",
    "A kitchen with copper pots hanging above a stove.",
    "A portrait of an elderly fisherman with a weathered face, black and white.",
    "A red fire hydrant on a snowy sidewalk.",
    "A glass teapot with blooming tea on a windowsill, backlit.",
    "An elephant bathing in a muddy river.",
    "A pencil sketch of a cathedral facade.",
    "A paper origami crane on a wooden table, shallow depth of field.",
    "A skateboarder jumping over stairs in a city plaza.",
    "A slice of chocolate cake with a candle on a ceramic plate.",
    "A cozy cabin interior with a fireplace and a reading chair, warm light.",
    "A flock of flamingos standing in shallow pink water.",
    "A vintage car parked in front of a diner at dusk.",
    "A low-poly 3D render of a fox.",
    "Two people sharing an umbrella on a crowded street.",
    "A bunch of colorful balloons tied to a chair.",
    "A tennis player serving on a clay court.",
    "A macro photo of dew drops on a spider web.",
    "A desert road stretching to the horizon under a starry sky.",
    "A golden retriever catching a frisbee in a park.",
    "A traditional Japanese garden with a red bridge over a pond.",
    "A bicycle with a basket of flowers parked by a canal.",
    "A cartoon robot watering plants in a greenhouse.",
    "A bowl of fruit painted in the style of Cezanne.",
    "A train station platform with commuters waiting, motion blur.",
    "A wooden table with a loaf of bread, cheese and grapes, still life.",
    "A thunderstorm over a wheat field, lightning striking in the distance.",
]

PROMPT_HASH_MODULUS = 1_000_000_007
SEED_RANGE = 2**31


class PromptError(ValueError):
  """A prompt file is missing, empty, malformed or of an unknown kind."""


def _ordered_mapping_values(mapping: dict, path: str) -> list[Any]:
  keys = list(mapping)
  if all(isinstance(k, str) for k in keys) or all(isinstance(k, int) and not isinstance(k, bool)
                                                  for k in keys):
    return [mapping[k] for k in sorted(keys)]
  raise PromptError(f"{path}: the keys of the prompt mapping must be all strings or all integers")


def load_prompts(path: str | os.PathLike) -> list[str]:
  """Reads a prompt list.

  Formats, by extension:
    * ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
      surrounding whitespace is stripped.
    * ``.json``: a list of strings, or an object whose values are strings (ordered by key).
    * ``.yaml`` / ``.yml``: the same two shapes (e.g. deepcompressor's ``qdiff.yaml``, keyed
      ``'0000'``, ``'0001'``, ...; keys all strings or all integers).

  Returns:
    The non-empty list of prompts.

  Raises:
    PromptError: missing file, unknown extension, wrong structure, a non-string or empty
      prompt, or no prompts at all.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".txt", ".json", ".yaml", ".yml"):
    raise PromptError(f"{path}: unknown prompt file extension {ext!r} (use .txt, .json or .yaml)")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise PromptError(f"prompt file not found: {path}") from None

  if ext == ".txt":
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
  else:
    if ext == ".json":
      try:
        data = json.loads(text)
      except json.JSONDecodeError as e:
        raise PromptError(f"{path}: invalid JSON ({e})") from None
    else:
      import yaml  # a dependency of ml_collections; only needed for YAML prompt files
      try:
        data = yaml.safe_load(text)
      except yaml.YAMLError as e:
        raise PromptError(f"{path}: invalid YAML ({e})") from None
    if isinstance(data, dict):
      prompts = _ordered_mapping_values(data, path)
    elif isinstance(data, list):
      prompts = data
    else:
      raise PromptError(f"{path}: expected a list of strings or a mapping to strings, "
                        f"got {type(data).__name__}")
    for i, p in enumerate(prompts):
      if not isinstance(p, str) or not p.strip():
        raise PromptError(f"{path}: prompt {i} must be a non-empty string, got {p!r}")
  if not prompts:
    raise PromptError(f"{path}: no prompts")
  return list(prompts)


def select_prompts(prompts: Sequence[str], n: int, seed: int = 0,
                   keep_order: bool = False) -> list[str]:
  """A seeded random subset of ``n`` prompts.

  As deepcompressor: shuffle a copy with ``random.Random(seed).shuffle`` and take the first
  ``n`` (the permutation depends only on the seed and the list length).

  Args:
    prompts: the full list.
    n: subset size, 1 <= n <= len(prompts).
    seed: shuffle seed.
    keep_order: return the chosen prompts in their original order instead of shuffled order.
  """
  prompts = list(prompts)
  if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(prompts):
    raise ValueError(f"n must be an int in [1, {len(prompts)}], got {n!r}")
  order = list(range(len(prompts)))
  random.Random(seed).shuffle(order)
  chosen = order[:n]
  if keep_order:
    chosen.sort()
  return [prompts[i] for i in chosen]


def prompt_hash(text: str) -> int:
  """The 31-polynomial hash of the UTF-8 bytes of ``text``, mod 1_000_000_007.

  ``h = 0; for byte in text.encode("utf-8"): h = (31 * h + byte) % 1_000_000_007``. For ASCII
  text this equals deepcompressor's ``hash_str_to_int`` (which hashes code points).
  """
  if not isinstance(text, str):
    raise ValueError(f"text must be a string, got {type(text).__name__}")
  h = 0
  for byte in text.encode("utf-8"):
    h = (31 * h + byte) % PROMPT_HASH_MODULUS
  return h


def prompt_seed(text: str, base_seed: int = 0) -> int:
  """A stable seed for one prompt: ``(prompt_hash(text) + base_seed * 1_000_000_007) % 2**31``.

  Depends only on the prompt and ``base_seed`` (not on the batch it is generated in), so each
  prompt's image is reproducible. With ``base_seed = 0`` it is the plain hash (deepcompressor's
  per-image seed for ASCII text); other base seeds give other, equally stable, seeds. For a
  fixed base seed the map from hash to seed is one-to-one. The result is in [0, 2**31), safe
  for ``jax.random.key`` (which keeps only 32 bits without x64), numpy and torch.
  """
  if isinstance(base_seed, bool) or not isinstance(base_seed, int):
    raise ValueError(f"base_seed must be an int, got {base_seed!r}")
  return (prompt_hash(text) + base_seed * PROMPT_HASH_MODULUS) % SEED_RANGE
