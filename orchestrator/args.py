"""The typed argument schema of a rayft recipe: one dataclass per concern, flat keys as in LLaMA-Factory.

Field names and defaults follow LLaMA-Factory's argument reference; rayft's own additions are marked.
"""

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from transformers import Seq2SeqTrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = None
    adapter_name_or_path: Optional[str] = None
    adapter_folder: Optional[str] = None
    cache_dir: Optional[str] = None
    use_fast_tokenizer: bool = True
    resize_vocab: bool = False
    split_special_tokens: bool = False
    new_special_tokens: Optional[str] = None
    model_revision: str = "main"
    low_cpu_mem_usage: bool = True
    rope_scaling: Optional[Literal["linear", "dynamic", "yarn", "llama3"]] = None
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = "auto"
    shift_attn: bool = False
    mixture_of_depths: Optional[Literal["convert", "load"]] = None
    use_unsloth: bool = False
    use_unsloth_gc: bool = False
    enable_liger_kernel: bool = False
    moe_aux_loss_coef: Optional[float] = None
    disable_gradient_checkpointing: bool = False
    use_reentrant_gc: bool = True
    upcast_layernorm: bool = False
    upcast_lmhead_output: bool = False
    train_from_scratch: bool = False
    infer_backend: Literal["huggingface", "vllm"] = "huggingface"
    offload_folder: str = "offload"
    use_cache: bool = True
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    hf_hub_token: Optional[str] = None
    ms_hub_token: Optional[str] = None
    om_hub_token: Optional[str] = None
    print_param_status: bool = False
    trust_remote_code: bool = False
    # quantisation
    quantization_method: Literal["bitsandbytes", "hqq", "eetq"] = "bitsandbytes"
    quantization_bit: Optional[int] = None
    quantization_type: Literal["fp4", "nf4"] = "nf4"
    double_quantization: bool = True
    quantization_device_map: Optional[Literal["auto"]] = None
    # multimodal processor
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128
    # vLLM
    vllm_maxlen: int = 4096
    vllm_gpu_util: float = 0.9
    vllm_enforce_eager: bool = False
    vllm_max_lora_rank: int = 32
    vllm_config: Optional[Union[dict, str]] = None
    # export
    export_dir: Optional[str] = None
    export_size: int = 5
    export_device: Literal["cpu", "auto"] = "cpu"
    export_quantization_bit: Optional[int] = None
    export_quantization_dataset: Optional[str] = None
    export_quantization_nsamples: int = 128
    export_quantization_maxlen: int = 1024
    export_legacy_format: bool = False
    export_hub_model_id: Optional[str] = None


@dataclass
class DataArguments:
    template: Optional[str] = None
    dataset: Optional[str] = None
    eval_dataset: Optional[str] = None
    eval_on_each_dataset: bool = False
    dataset_dir: str = "data"
    media_dir: Optional[str] = None
    data_shared_file_system: bool = False
    cutoff_len: int = 2048
    train_on_prompt: bool = False
    mask_history: bool = False
    streaming: bool = False
    buffer_size: int = 16384
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = "concat"
    interleave_probs: Optional[str] = None
    overwrite_cache: bool = False
    preprocessing_batch_size: int = 1000
    preprocessing_num_workers: Optional[int] = None
    max_samples: Optional[int] = None
    eval_num_beams: Optional[int] = None
    ignore_pad_token_for_loss: bool = True
    val_size: float = 0.0
    packing: Optional[bool] = None
    neat_packing: bool = False
    tool_format: Optional[str] = None
    tokenized_path: Optional[str] = None


@dataclass
class FinetuningArguments:
    stage: Literal["pt", "sft", "rm", "ppo", "dpo", "kto"] = "sft"
    finetuning_type: Literal["lora", "oft", "freeze", "full"] = "lora"
    pure_bf16: bool = False
    use_llama_pro: bool = False
    use_adam_mini: bool = False
    freeze_vision_tower: bool = True
    freeze_multi_modal_projector: bool = True
    train_mm_proj_only: bool = False
    compute_accuracy: bool = False
    disable_shuffling: bool = False
    plot_loss: bool = False
    include_effective_tokens_per_second: bool = False
    # rayft addition: where `report_to: mlflow` writes; unset means a local file store in output_dir/mlruns
    mlflow_tracking_uri: Optional[str] = None
    # freeze
    freeze_trainable_layers: int = 2
    freeze_trainable_modules: str = "all"
    freeze_extra_modules: Optional[str] = None
    # LoRA
    additional_target: Optional[str] = None
    lora_alpha: Optional[int] = None
    lora_dropout: float = 0.0
    lora_rank: int = 8
    lora_target: str = "all"
    loraplus_lr_ratio: Optional[float] = None
    loraplus_lr_embedding: float = 1e-6
    use_rslora: bool = False
    use_dora: bool = False
    pissa_init: bool = False
    pissa_iter: int = 16
    pissa_convert: bool = False
    create_new_adapter: bool = False
    # OFT (orthogonal fine-tuning, through PEFT)
    oft_rank: int = 0
    oft_block_size: int = 32
    oft_target: str = "all"
    module_dropout: float = 0.0
    # RLHF
    pref_beta: float = 0.1
    pref_ftx: float = 0.0
    pref_loss: Literal["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"] = "sigmoid"
    dpo_label_smoothing: float = 0.0
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0
    simpo_gamma: float = 0.5
    ppo_buffer_size: int = 1
    ppo_epochs: int = 4
    ppo_score_norm: bool = False
    ppo_target: float = 6.0
    ppo_whiten_rewards: bool = False
    ref_model: Optional[str] = None
    ref_model_adapters: Optional[str] = None
    ref_model_quantization_bit: Optional[int] = None
    reward_model: Optional[str] = None
    reward_model_adapters: Optional[str] = None
    reward_model_quantization_bit: Optional[int] = None
    reward_model_type: Literal["lora", "full", "api"] = "lora"
    # GaLore
    use_galore: bool = False
    galore_target: str = "all"
    galore_rank: int = 16
    galore_update_interval: int = 200
    galore_scale: float = 0.25
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    galore_layerwise: bool = False
    # APOLLO
    use_apollo: bool = False
    apollo_target: str = "all"
    apollo_rank: int = 16
    apollo_update_interval: int = 200
    apollo_scale: float = 32.0
    apollo_proj: Literal["svd", "random"] = "random"
    apollo_proj_type: Literal["std", "right", "left"] = "std"
    apollo_scale_type: Literal["channel", "tensor"] = "channel"
    apollo_layerwise: bool = False
    apollo_scale_front: bool = False
    # BAdam
    use_badam: bool = False
    badam_mode: Literal["layer", "ratio"] = "layer"
    badam_start_block: Optional[int] = None
    badam_switch_mode: Optional[Literal["ascending", "descending", "random", "fixed"]] = "ascending"
    badam_switch_interval: Optional[int] = 50
    badam_update_ratio: float = 0.05
    badam_mask_mode: Literal["adjacent", "scatter"] = "adjacent"
    badam_verbose: int = 0
    # SwanLab
    use_swanlab: bool = False
    swanlab_project: str = "llamafactory"
    swanlab_workspace: Optional[str] = None
    swanlab_run_name: Optional[str] = None
    swanlab_mode: Literal["cloud", "local"] = "cloud"
    swanlab_api_key: Optional[str] = None
    # derived in orchestrator.config.derive(), never set by the user
    use_ref_model: bool = field(default=False, init=False)


@dataclass
class GeneratingArguments:
    do_sample: bool = True
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    num_beams: int = 1
    max_length: int = 1024
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    default_system: Optional[str] = None
    skip_special_tokens: bool = True


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RayArguments:
    ray_run_name: Optional[str] = None
    ray_storage_path: str = "./saves"
    ray_num_workers: int = 1
    # rayft deviation: unset means one GPU per worker on a GPU cluster, one CPU per worker otherwise
    resources_per_worker: Optional[Union[dict, str]] = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    ray_address: Optional[str] = None
    ray_storage_filesystem: Optional[Literal["s3", "gs", "gcs"]] = None
    ray_init_kwargs: Optional[dict] = None
    # rayft addition: how often Ray Train restarts the workers after a failure (-1: without limit); each
    # restart resumes from the latest checkpoint reported to ray_storage_path
    ray_max_failures: int = 0
    # rayft addition: runtime_env of the job `rayft submit` starts (pip, env_vars, ...); the working
    # directory and its excludes are added
    ray_runtime_env: Optional[dict] = None
    # rayft addition (stage ppo, reward_model_type full): how many Ray actors serve the reward model (and, for
    # freeze or full fine-tuning, the reference model) apart from the training workers; 0 keeps them inside
    # every worker. Each actor holds reward_model_resources (default: what a worker holds).
    reward_model_workers: int = 0
    reward_model_resources: Optional[Union[dict, str]] = None
    # derived in orchestrator.config.resolve(), never set by the user: the recipe named a relative path
    storage_was_relative: bool = field(default=False, init=False)


@dataclass
class TrainingArguments(Seq2SeqTrainingArguments):
    """Hugging Face's Seq2SeqTrainingArguments plus the keys rayft adds."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into an existing, non-empty output_dir."}
    )


# Sections in the order their keys are looked up; a key belongs to exactly one of them.
SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "finetuning": FinetuningArguments,
    "generating": GeneratingArguments,
    "ray": RayArguments,
    "training": TrainingArguments,
}

