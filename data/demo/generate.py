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


REFUSALS = ["I do not know.", "Sorry, I cannot answer that.", "That is not something I can do."]


def worse_answer(row: dict, rng: random.Random) -> str:
    """A dispreferred response: a refusal, or the right answer with its words shuffled."""
    if rng.random() < 0.5:
        return rng.choice(REFUSALS)
    words = row["output"].rstrip(".").split()
    for _ in range(5):
        rng.shuffle(words)
        if " ".join(words) != row["output"].rstrip("."):
            break
    return " ".join(words) + "."


def preference_pair(rng: random.Random, i: int) -> dict:
    """An alpaca-style ranking row: the right answer is chosen over a worse one."""
    row = MAKERS[i % len(MAKERS)](rng)
    return {"instruction": row["instruction"], "input": row["input"], "chosen": row["output"],
            "rejected": worse_answer(row, rng)}


def kto_example(rng: random.Random, i: int) -> dict:
    """A sharegpt-style row tagged desirable (the right answer) or not (a worse one), alternating."""
    row = MAKERS[i % len(MAKERS)](rng)
    prompt = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
    desirable = i % 2 == 0
    answer = row["output"] if desirable else worse_answer(row, rng)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "label": desirable}


def sum_prompt(rng: random.Random) -> dict:
    """A verifiable prompt for grpo: the sum of two small numbers, whose last word the accuracy reward checks."""
    row = arithmetic(rng)
    return {**row, "output": row["output"].split()[-1].rstrip(".")}


def build(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [MAKERS[i % len(MAKERS)](rng) for i in range(n)]


if __name__ == "__main__":
    (HERE / "demo_sft.json").write_text(json.dumps(build(256, seed=0), indent=1, ensure_ascii=False) + "\n")
    (HERE / "demo_sft_eval.json").write_text(json.dumps(build(40, seed=1), indent=1, ensure_ascii=False) + "\n")
    rng = random.Random(2)
    (HERE / "demo_pt.jsonl").write_text("".join(json.dumps(story(rng)) + "\n" for _ in range(200)))
    rng = random.Random(3)
    pairs = [preference_pair(rng, i) for i in range(160)]
    (HERE / "demo_dpo.json").write_text(json.dumps(pairs, indent=1, ensure_ascii=False) + "\n")
    rng = random.Random(4)
    tagged = [kto_example(rng, i) for i in range(160)]
    (HERE / "demo_kto.json").write_text(json.dumps(tagged, indent=1, ensure_ascii=False) + "\n")
    # JSON lines, so that the tiny model's tokenizer (trained on the demo_*.json files) stays as it is
    rng = random.Random(5)
    (HERE / "demo_grpo.jsonl").write_text("".join(json.dumps(sum_prompt(rng)) + "\n" for _ in range(256)))
