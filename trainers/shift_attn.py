"""LongLoRA's shifted sparse attention (S²-Attn, `shift_attn`), registered as an attention function of Transformers.

In training, the sequence is cut into groups of a quarter of its length and each token attends within its group; half
the heads use groups shifted by half a group, so that information crosses the groups' borders. Evaluation and
generation (the model in eval mode, or a KV cache) attend to the whole sequence, as in LongLoRA and LLaMA-Factory.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "rayft_shift_attn"
GROUP_SIZE_RATIO = 0.25  # LongLoRA's and LLaMA-Factory's group: a quarter of the sequence
PAD_TO = 8  # sequences are padded to a multiple of 8, as LLaMA-Factory's collator pads them when training


def shifted_sparse_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Transformers' attention signature: query (batch, heads, q, dim), key and value (batch, kv heads, k, dim);
    returns (batch, q, heads, dim) and no weights."""
    q_len = query.shape[2]
    if not module.training or key.shape[2] != q_len or q_len < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    allowed = _allowed(attention_mask, query.shape[0], q_len, query.device)
    padded = -(-q_len // PAD_TO) * PAD_TO
    if padded != q_len:  # pad keys nothing attends to (and queries whose outputs are cut off below)
        query, key, value = (F.pad(t, (0, 0, 0, padded - q_len)) for t in (query, key, value))
        allowed = F.pad(allowed, (0, padded - q_len, 0, padded - q_len), value=False)
    group = int(padded * GROUP_SIZE_RATIO)
    half = query.shape[1] // 2
    output = torch.cat([_grouped(query[:, :half], key[:, :half], value[:, :half], allowed, group, 0, dropout, scaling),
                        _grouped(query[:, half:], key[:, half:], value[:, half:], allowed, group, group // 2,
                                 dropout, scaling)], dim=1)
    return output[:, :, :q_len].transpose(1, 2).contiguous(), None


def _allowed(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """Which key each query may see, (batch, 1, q, k) booleans: the model's mask (causal, padding, packed
    sequences), or the causal one where the model passes none."""
    if attention_mask is None:
        return torch.ones(length, length, dtype=torch.bool, device=device).tril().expand(batch, 1, length, length)
    mask = attention_mask[:, :, :, :length]
    return mask if mask.dtype == torch.bool else mask == 0


def _grouped(query, key, value, allowed, group: int, shift: int, dropout: float, scaling):
    """Attention within groups of `group` tokens, the groups starting `shift` tokens into the sequence (the last
    group wraps around to its start). The mask moves with the tokens, so no token sees a later one: LongLoRA's
    reference code lets the wrapped group's first tokens see the sequence's end."""
    if shift:
        query, key, value = (t.roll(-shift, dims=2) for t in (query, key, value))
        allowed = allowed.roll((-shift, -shift), dims=(2, 3))
    batch, heads, length, dim = query.shape
    n = length // group

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, length, dim) -> (batch * n, heads, group, dim)
        return t.reshape(batch, heads, n, group, dim).transpose(1, 2).reshape(batch * n, heads, group, dim)

    diagonal = torch.diagonal(allowed.reshape(batch, 1, n, group, n, group), dim1=2, dim2=4)  # (b, 1, g, g, n)
    mask = diagonal.permute(0, 4, 1, 2, 3).reshape(batch * n, 1, group, group)
    mask = mask | torch.eye(group, dtype=torch.bool, device=mask.device)  # a padded row attends to itself, not NaN
    out = F.scaled_dot_product_attention(blocks(query), blocks(key), blocks(value), attn_mask=mask,
                                         dropout_p=dropout, scale=scaling)
    out = out.reshape(batch, n, heads, group, dim).transpose(1, 2).reshape(batch, heads, length, dim)
    return out.roll(shift, dims=2) if shift else out


AttentionInterface.register(NAME, shifted_sparse_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
