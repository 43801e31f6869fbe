"""A generated children's-story corpus for the induction experiment (Gloeckle et al. 2024, section 4.1).

Every character name is two bytes, an upper-case letter and a lower-case one ("Kv", "Ru"), drawn at
random per story, so a name cannot be memorised: the second byte of a name is predictable only by
copying it from the name's earlier mention in the same story (induction). Sentences start with a
few fixed words whose capitals (O, T, A, W) are never a name's first letter, and within one story
the characters' first letters differ, so the first byte of a mention picks out exactly one earlier name.

    stories = generate(count=1000, seed=0)     # deterministic for a seed
    mentions(story)                            # [(byte offset, name, earlier mentions of that name)]
"""
import random
import re

NAME_CAPITALS = "BCDEFGHJKLMNPQRSUVXYZ"     # not O, T, A, W (sentence starts) nor I (the pronoun)
NAME = re.compile(r"\b([" + NAME_CAPITALS + r"][a-z])\b")

ANIMALS = ["cat", "dog", "fox", "bird", "rabbit", "bear", "duck", "mouse", "frog", "owl", "pig", "goat"]
ADJECTIVES = ["little", "happy", "brave", "shy", "small", "kind", "curious", "sleepy", "clever", "quiet"]
PLACES = ["forest", "garden", "village", "meadow", "house by the river", "farm", "park", "hill", "pond", "barn"]
THINGS = ["red ball", "shiny stone", "big apple", "blue hat", "old map", "tiny boat", "kite", "cake", "flower"]
FEELINGS = ["happy", "sad", "excited", "tired", "surprised", "scared", "glad", "proud"]


def _names(rng: random.Random, k: int) -> list[str]:
  capitals = rng.sample(NAME_CAPITALS, k)
  return [c + rng.choice("abcdefghijklmnopqrstuvwxyz") for c in capitals]


def story(rng: random.Random) -> str:
  """One story of 3 characters; each character is introduced once and mentioned again later."""
  a, b, c = _names(rng, 3)
  pick = rng.choice
  place, other, thing = pick(PLACES), pick(PLACES), pick(THINGS)
  opening = [f"Once upon a time there was a {pick(ADJECTIVES)} {pick(ANIMALS)} named {a}.",
             f"{a} lived in a {place} with a {pick(ANIMALS)} named {b}.",
             f"They had a friend, a {pick(ADJECTIVES)} {pick(ANIMALS)} named {c}."]
  middle = [f"One day {a} said to {b}, \"We should go to the {other}.\"",
            f"{b} was {pick(FEELINGS)} and asked {c} to come too.",
            f"At the {other} {c} found a {thing}.",
            f"{c} gave the {thing} to {a}.",
            f"Then {a} and {b} played with the {thing} all afternoon.",
            f"{b} said, \"Thank you, {c}!\"",
            f"After a while {c} felt {pick(FEELINGS)}.",
            f"{a} looked at {b} and laughed."]
  rng.shuffle(middle)
  ending = [f"When the sun went down, {a}, {b} and {c} walked home to the {place}.",
            f"That night {a} dreamed of the {thing}."]
  return " ".join(opening + middle[:rng.randint(4, len(middle))] + ending)


def generate(count: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [story(rng) for _ in range(count)]


def mentions(text: str) -> list[tuple[int, str, int]]:
  """(byte offset of the name's first byte, name, how many times it was mentioned before) per mention."""
  seen: dict[str, int] = {}
  out = []
  for m in NAME.finditer(text):
    name = m.group(1)
    out.append((len(text[:m.start()].encode()), name, seen.get(name, 0)))
    seen[name] = seen.get(name, 0) + 1
  return out
