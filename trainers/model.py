"""Model and tokenizer loading through `from_pretrained`, and the PEFT adapters put on top."""

import torch

from rayft.orchestrator.args import FinetuningArguments, ModelArguments, comma_list


def load_tokenizer(model_args: ModelArguments):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        use_fast=model_args.use_fast_tokenizer,
        revision=model_args.model_revision,
        cache_dir=model_args.cache_dir,
        token=model_args.hf_hub_token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: ModelArguments, use_gpu: bool):
    """The causal LM in fp32 on CPU workers (bf16 matmuls are far slower there), auto dtype on GPU."""
    from transformers import AutoModelForCausalLM

    attn = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}[model_args.flash_attn]
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype="auto" if use_gpu else torch.float32,
        attn_implementation=attn,
        revision=model_args.model_revision,
        cache_dir=model_args.cache_dir,
        token=model_args.hf_hub_token,
        trust_remote_code=model_args.trust_remote_code,
        low_cpu_mem_usage=model_args.low_cpu_mem_usage,
    )
    # The KV cache only costs memory in training, and with one Transformers ignores packed position_ids
    # (neat_packing's block-diagonal mask).
    model.config.use_cache = False
    if not model_args.disable_gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": model_args.use_reentrant_gc})
        model.enable_input_require_grads()
    return model


def lora_target_modules(model, lora_target: str) -> list[str]:
    """`all` means every linear layer but the output head; otherwise the comma list as given."""
    if lora_target.strip() != "all":
        return comma_list(lora_target)
    output_head = model.get_output_embeddings()
    names = {
        name.split(".")[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output_head
    }
    return sorted(names)


def apply_lora(model, finetuning_args: FinetuningArguments):
    """Wraps `model` with a fresh, trainable LoRA adapter."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=finetuning_args.lora_rank,
        lora_alpha=finetuning_args.lora_alpha,
        lora_dropout=finetuning_args.lora_dropout,
        target_modules=lora_target_modules(model, finetuning_args.lora_target),
        modules_to_save=comma_list(finetuning_args.additional_target) or None,
    )
    return get_peft_model(model, config)


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"
