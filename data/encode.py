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
                      mask_history: bool = False, efficient_eos: int | None = None) -> dict:
    """Concatenates the turns up to `cutoff_len` tokens; labels are IGNORE_INDEX on prompt tokens.

    With `mask_history` only the last response is learned, and the budget is spent from the last turn
    backwards so that the turn being learned survives truncation. `efficient_eos` (the EOS id of templates
    whose responses do not end with it) closes the sequence, and each later prompt's first label learns it.
    Returns input_ids, labels and `truncated` (how many tokens the cutoff dropped).
    """
    input_ids, labels, dropped = [], [], 0
    used = 1 if efficient_eos is not None else 0
    turns = list(reversed(pairs)) if mask_history else pairs
    for index, (source, target) in enumerate(turns):
        if used >= cutoff_len:
            dropped += len(source) + len(target)
            continue
        keep_source, keep_target = split_budget(len(source), len(target), cutoff_len - used)
        dropped += len(source) - keep_source + len(target) - keep_target
        source, target = source[:keep_source], target[:keep_target]
        used += keep_source + keep_target
        if train_on_prompt:
            source_labels = list(source)
        elif efficient_eos is not None and index != 0:
            source_labels = [efficient_eos] + [IGNORE_INDEX] * (len(source) - 1)
        else:
            source_labels = [IGNORE_INDEX] * len(source)
        learned = target if not mask_history or index == 0 else [IGNORE_INDEX] * len(target)
        if mask_history:
            input_ids, labels = source + target + input_ids, source_labels + learned + labels
        else:
            input_ids, labels = input_ids + source + target, labels + source_labels + learned
    if efficient_eos is not None:
        input_ids, labels = input_ids + [efficient_eos], labels + [efficient_eos]
    return {"input_ids": input_ids, "labels": labels, "truncated": dropped}


def encode_response(prompt: list[int], response: list[int], cutoff_len: int, efficient_eos: int | None = None
                    ) -> dict:
    """One prompt (all earlier turns) and one learned response, truncated together to `cutoff_len` (KTO)."""
    response = response + [efficient_eos] if efficient_eos is not None else response
    keep_prompt, keep_response = split_budget(len(prompt), len(response), cutoff_len)
    return {"input_ids": prompt[:keep_prompt] + response[:keep_response],
            "labels": [IGNORE_INDEX] * keep_prompt + response[:keep_response],
            "truncated": len(prompt) - keep_prompt + len(response) - keep_response}


def encode_pairwise(prompt: list[int], chosen: list[int], rejected: list[int], cutoff_len: int,
                    efficient_eos: int | None = None) -> dict:
    """Chosen and rejected sequences over one shared, equally truncated prompt; only responses are learned.

    `prompt` holds every earlier turn; the budget is split between it and the longer response.
    """
    if efficient_eos is not None:
        chosen, rejected = chosen + [efficient_eos], rejected + [efficient_eos]
    keep_prompt, keep_response = split_budget(len(prompt), max(len(chosen), len(rejected)), cutoff_len)
    out = {"truncated": (len(prompt) - keep_prompt) + max(len(chosen) - keep_response, 0)
           + max(len(rejected) - keep_response, 0)}
    context = prompt[:keep_prompt]
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        out[f"{name}_input_ids"] = context + response[:keep_response]
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(context) + response[:keep_response]
    return out


def encode_prompt(prompt: list[int], cutoff_len: int) -> tuple[list[int], int]:
    """The ids a model generates the last response from (every earlier turn, then the last prompt).

    A prompt longer than `cutoff_len` keeps its last `cutoff_len` tokens, which hold the question being
    answered and the assistant's header that generation continues from (LLaMA-Factory keeps the first ones,
    which cuts that header off). Returns the ids and how many tokens were cut.
    """
    return prompt[-cutoff_len:], max(len(prompt) - cutoff_len, 0)
