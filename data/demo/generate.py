"""Writes rayft's own demo datasets (alpaca format) from fixed templates and a fixed seed.

Run `python data/demo/generate.py` to regenerate; the output is deterministic and committed.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "horse", "owl", "fox", "whale", "bee", "crow"]


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    return {
        "instruction": f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?",
        "input": "",
        "output": f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.",
    }


def reverse_words(rng: random.Random) -> dict:
    words = rng.sample(ANIMALS, 3)
    return {
        "instruction": "Reverse the order of these words.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def describe(rng: random.Random) -> dict:
    colour, animal = rng.choice(COLOURS), rng.choice(ANIMALS)
    return {
        "instruction": f"Describe a {colour} {animal} in one sentence.",
        "input": "",
        "output": f"The {animal} is {colour}, and it is a very {colour} {animal} indeed.",
    }


def count_letters(rng: random.Random) -> dict:
    animal = rng.choice(ANIMALS)
    return {
        "instruction": "How many letters does this word have?",
        "input": animal,
        "output": f"The word {animal} has {NUMBER_WORDS[len(animal)]} letters.",
    }


def with_system(rng: random.Random) -> dict:
    row = arithmetic(rng)
    row["system"] = "You are a careful calculator."
    return row


MAKERS = [arithmetic, reverse_words, describe, count_letters, with_system]


def story(rng: random.Random) -> dict:
    """A few sentences of plain text, for pre-training."""
    animal, colour, friend = rng.choice(ANIMALS), rng.choice(COLOURS), rng.choice(ANIMALS)
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    return {"text": f"Once there was a {colour} {animal}. Every morning the {animal} met a {friend}. "
                    f"The {animal} had {NUMBER_WORDS[a]} apples and the {friend} had {NUMBER_WORDS[b]}. "
                    f"Together they had {NUMBER_WORDS[a + b]} apples, and they shared them all."}


def build(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [MAKERS[i % len(MAKERS)](rng) for i in range(n)]


if __name__ == "__main__":
    (HERE / "demo_sft.json").write_text(json.dumps(build(256, seed=0), indent=1, ensure_ascii=False) + "\n")
    (HERE / "demo_sft_eval.json").write_text(json.dumps(build(40, seed=1), indent=1, ensure_ascii=False) + "\n")
    rng = random.Random(2)
    (HERE / "demo_pt.jsonl").write_text("".join(json.dumps(story(rng)) + "\n" for _ in range(200)))
