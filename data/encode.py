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
