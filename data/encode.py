"""Supervised encoding: prompt/response pairs become input_ids and labels with the prompt masked out."""

IGNORE_INDEX = -100


def split_budget(source_len: int, target_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and response tokens to keep within `budget`, keeping some of both where possible.

    A short response is kept whole; otherwise the budget is shared in proportion to the two lengths.
    """
    if target_len * 2 < budget:
        max_target = target_len
    elif source_len * 2 < budget:
        max_target = budget - source_len
    else:
        max_target = int(budget * target_len / (source_len + target_len))
    new_target = min(max_target, target_len)
    new_source = min(max(budget - new_target, 0), source_len)
    return new_source, new_target


def encode_supervised(pairs: list[tuple[list[int], list[int]]], cutoff_len: int, train_on_prompt: bool,
                      mask_history: bool = False) -> dict:
    """Concatenates the turns up to `cutoff_len` tokens; labels are IGNORE_INDEX on prompt tokens.

    With `mask_history` only the last response is learned, and the budget is spent from the last turn
    backwards so that the turn being learned survives truncation.
    Returns input_ids, labels and `truncated` (how many tokens the cutoff dropped).
    """
    input_ids, labels, remaining, dropped = [], [], cutoff_len, 0
    turns = list(reversed(pairs)) if mask_history else pairs
    for index, (source, target) in enumerate(turns):
        if remaining <= 0:
            dropped += len(source) + len(target)
            continue
        keep_source, keep_target = split_budget(len(source), len(target), remaining)
        dropped += len(source) - keep_source + len(target) - keep_target
        source, target = source[:keep_source], target[:keep_target]
        remaining -= keep_source + keep_target
        learned = target if not mask_history or index == 0 else [IGNORE_INDEX] * len(target)
        turn_labels = (source if train_on_prompt else [IGNORE_INDEX] * len(source)) + learned
        if mask_history:
            input_ids, labels = source + target + input_ids, turn_labels + labels
        else:
            input_ids, labels = input_ids + source + target, labels + turn_labels
    return {"input_ids": input_ids, "labels": labels, "truncated": dropped}


def encode_pairwise(prompt_pairs: list[tuple[list[int], list[int]]], prompt: list[int], chosen: list[int],
                    rejected: list[int], cutoff_len: int) -> dict:
    """Chosen and rejected sequences over one shared, equally truncated prompt; only responses are learned.

    `prompt_pairs` are the earlier turns, `prompt` the last prompt, `chosen`/`rejected` the two responses.
    """
    context = [token for source, target in prompt_pairs for token in source + target] + prompt
    keep_prompt, keep_response = split_budget(len(context), max(len(chosen), len(rejected)), cutoff_len)
    out = {"truncated": (len(context) - keep_prompt) + max(len(chosen) - keep_response, 0)
           + max(len(rejected) - keep_response, 0)}
    context = context[:keep_prompt]
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        out[f"{name}_input_ids"] = context + response[:keep_response]
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(context) + response[:keep_response]
    return out


def encode_prompt(pairs: list[tuple[list[int], list[int]]], cutoff_len: int) -> tuple[list[int], int]:
    """The ids a model generates the last response from: every earlier turn whole, then the last prompt.

    A prompt longer than `cutoff_len` keeps its last `cutoff_len` tokens, which hold the question being
    answered and the assistant's header that generation continues from. Returns the ids and how many
    tokens were cut.
    """
    ids = [token for source, target in pairs[:-1] for token in source + target] + pairs[-1][0]
    return ids[-cutoff_len:], max(len(ids) - cutoff_len, 0)
