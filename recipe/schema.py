"""The typed argument schema of a rayft recipe: one dataclass per concern, flat keys as in LLaMA-Factory.

Field names and defaults follow LLaMA-Factory's argument reference; rayft's own additions are marked.
"""

import copy
import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from rayft.recipe.refused import NOT_BUILT


def arg(default: Any, help: str) -> Any:
    """A recipe key: its default and the one line `rayft keys` prints for it."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = arg(None, "Local folder or hub id of the base model (required).")
    adapter_name_or_path: Optional[str] = arg(
        None, "Comma list of adapter folders: earlier ones are merged, the last is trained further.")
    adapter_folder: Optional[str] = arg(None, "LLaMA-Factory's folder of adapters to load.")
    cache_dir: Optional[str] = arg(None, "Where hub downloads of the model and tokenizer are cached.")
    use_fast_tokenizer: bool = arg(True, "Load the fast (Rust) tokenizer.")
    resize_vocab: bool = arg(False, "Grow the embeddings to the tokenizer's vocabulary (on by itself when tokens are "
                                    "added).")
    split_special_tokens: bool = arg(False, "Tokenise special tokens as text (their pieces, not their ids).")
    new_special_tokens: Optional[str] = arg(None, "The older name of add_special_tokens (a comma list of special "
                                                  "tokens to add).")
    model_revision: str = arg(
        "main", "Branch, tag or commit of the model on the hub; the tokenizer and the token cache follow it.")
    low_cpu_mem_usage: bool = arg(True, "Load weights without a second full copy in memory.")
    rope_scaling: Optional[Literal["linear", "dynamic", "yarn", "llama3"]] = arg(
        None, "RoPE scaling for longer contexts.")
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = arg(
        "auto", "Attention kernel: auto, disabled (eager), sdpa or fa2 (FlashAttention-2, GPUs only).")
    shift_attn: bool = arg(False, "LongLoRA's shifted sparse attention (S2-Attn) in training: groups of a quarter "
                                  "of the sequence, half the heads shifted by half a group.")
    mixture_of_depths: Optional[Literal["convert", "load"]] = arg(None, "Mixture-of-depths conversion.")
    use_unsloth: bool = arg(False, "Unsloth's patched kernels.")
    use_unsloth_gc: bool = arg(False, "Unsloth's gradient checkpointing.")
    enable_liger_kernel: bool = arg(False, "Liger's fused kernels.")
    moe_aux_loss_coef: Optional[float] = arg(
        None, "Weight of a mixture-of-experts router's auxiliary loss.")
    disable_gradient_checkpointing: bool = arg(
        False, "Keep every activation instead of recomputing them in the backward pass.")
    use_reentrant_gc: bool = arg(True, "Use the re-entrant variant of gradient checkpointing.")
    upcast_layernorm: bool = arg(False, "Keep layer norms in fp32.")
    upcast_lmhead_output: bool = arg(False, "Compute the output head's logits in fp32.")
    train_from_scratch: bool = arg(False, "Initialise the weights randomly instead of loading them.")
    infer_backend: Literal["huggingface", "vllm"] = arg(
        "huggingface", "Generation engine: huggingface.")
    offload_folder: str = arg("offload", "Where quantization_device_map: auto puts the weights that do not fit the "
                                         "devices at generation.")
    use_cache: bool = arg(
        True, "Keep the KV cache at generation (training turns it off; rayft's prediction and chat turn it on).")
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = arg(
        "auto", "Weight dtype of chat, serve and prediction (auto: the training dtype, fp32 on a CPU).")
    hf_hub_token: Optional[str] = arg(
        None, "Hugging Face token for gated or private models (masked in logs and saved configs).")
    ms_hub_token: Optional[str] = arg(None, "ModelScope token.")
    om_hub_token: Optional[str] = arg(None, "Modelers token.")
    print_param_status: bool = arg(
        False, "Print every parameter's trainable status.")
    trust_remote_code: bool = arg(
        False, "Run the model repository's own Python code (only for repositories you trust).")
    use_kv_cache: bool = arg(True, "LLaMA-Factory's name for use_cache at generation (false turns the cache off).")
    use_v1_kernels: Optional[bool] = arg(False, "LLaMA-Factory's v1 fused kernels.")
    add_tokens: Optional[str] = arg(None, "Comma list of plain tokens to add to the vocabulary.")
    add_special_tokens: Optional[str] = arg(None, "Comma list of special tokens to add.")
    new_special_tokens_config: Optional[Union[str, dict]] = arg(
        None, "YAML file (or mapping) of new special tokens -> their descriptions, for desc_init.")
    init_special_tokens: Literal["noise_init", "desc_init", "desc_init_w_noise"] = arg(
        "noise_init", "How new tokens' embeddings start: the old rows' mean plus noise, or their description's mean.")
    # engines this machine cannot run
    sglang_maxlen: int = arg(4096, "SGLang's longest sequence.")
    sglang_mem_fraction: float = arg(0.7, "SGLang's memory share.")
    sglang_tp_size: int = arg(-1, "SGLang's tensor parallelism.")
    sglang_config: Optional[Union[dict, str]] = arg(None, "SGLang's engine settings.")
    sglang_lora_backend: Literal["triton", "flashinfer"] = arg("triton", "SGLang's LoRA kernels.")
    use_kt: bool = arg(False, "KTransformers' CPU-GPU hybrid MoE.")
    kt_weight_path: Optional[str] = arg(None, "KTransformers' weights.")
    kt_expert_checkpoint_path: Optional[str] = arg(None, "KTransformers' expert checkpoint.")
    kt_use_lora_experts: Optional[bool] = arg(None, "KTransformers' LoRA experts.")
    kt_lora_expert_num: Optional[int] = arg(None, "KTransformers' LoRA expert count.")
    kt_lora_expert_intermediate_size: Optional[int] = arg(None, "KTransformers' LoRA expert size.")
    # quantisation
    quantization_method: Literal["bnb", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4", "fp8"] = arg(
        "bnb", "Quantisation library: bnb (bitsandbytes, QLoRA on GPU and CPU); the others are refused by name.")
    quantization_bit: Optional[int] = arg(None, "Load the base model in 4 or 8 bits with bitsandbytes (QLoRA).")
    quantization_type: Literal["fp4", "nf4"] = arg("nf4", "4-bit data type, nf4 or fp4.")
    double_quantization: bool = arg(True, "Quantise the quantisation constants too.")
    quantization_device_map: Optional[Literal["auto"]] = arg(
        None, "auto: a 4-bit model at generation (chat, predict, serve) spread by accelerate over the process's "
              "devices, what does not fit going to offload_folder.")
    # multimodal processor
    crop_to_patches: bool = arg(False, "Crop images to patches.")
    image_do_pan_and_scan: bool = arg(False, "Pan-and-scan images.")
    use_audio_in_video: bool = arg(False, "Read a video's audio.")
    audio_sampling_rate: int = arg(16000, "Audio sampling rate.")
    image_max_pixels: int = arg(768 * 768, "Largest image size in pixels.")
    image_min_pixels: int = arg(32 * 32, "Smallest image size in pixels.")
    video_max_pixels: int = arg(256 * 256, "Largest video frame size in pixels.")
    video_min_pixels: int = arg(16 * 16, "Smallest video frame size in pixels.")
    video_fps: float = arg(2.0, "Frames per second sampled from a video.")
    video_maxlen: int = arg(128, "Most frames sampled from a video.")
    # vLLM
    vllm_maxlen: int = arg(4096, "vLLM's longest sequence.")
    vllm_gpu_util: float = arg(0.7, "Share of GPU memory vLLM may use.")
    vllm_enforce_eager: bool = arg(False, "Disable vLLM's CUDA graphs.")
    vllm_max_lora_rank: int = arg(32, "Largest LoRA rank vLLM serves.")
    vllm_config: Optional[Union[dict, str]] = arg(None, "Further vLLM engine settings.")
    # export
    export_dir: Optional[str] = arg(None, "Folder `rayft export` writes the merged model to.")
    export_size: int = arg(5, "Largest safetensors shard of an export, in GB.")
    export_device: Literal["cpu", "auto"] = arg("cpu", "Device that merges adapters at export: cpu or auto.")
    export_quantization_bit: Optional[int] = arg(None, "Quantise the export.")
    export_quantization_dataset: Optional[str] = arg(None, "Calibration data of a quantised export.")
    export_quantization_nsamples: int = arg(128, "Calibration examples of a quantised export.")
    export_quantization_maxlen: int = arg(1024, "Calibration length of a quantised export.")
    export_legacy_format: bool = arg(
        False, "Save .bin weights instead of safetensors (refused: Transformers 5 writes safetensors).")
    export_hub_model_id: Optional[str] = arg(None, "Push the export to this hub repository.")


@dataclass
class DataArguments:
    template: Optional[str] = arg(
        None, "Chat template that turns conversations into tokens (qwen, llama3, chatml, default, ...).")
    dataset: Optional[str] = arg(None, "Comma list of training datasets named in dataset_info.json.")
    eval_dataset: Optional[str] = arg(None, "Comma list of evaluation datasets named in dataset_info.json.")
    eval_on_each_dataset: bool = arg(False, "Evaluate every dataset of eval_dataset separately.")
    dataset_dir: str = arg("data", "Folder (or s3:// / gs:// URI) holding dataset_info.json and the data files.")
    media_dir: Optional[str] = arg(None, "Folder the datasets' image paths are relative to (default: dataset_dir); "
                                         "a path not found there is read as it is.")
    data_shared_file_system: bool = arg(
        False, "Every node sees this run's local paths (ray_storage_path, dataset_dir, media_dir) at the same place: "
               "the token cache, the data files and the images are then used from any node of a cluster.")
    cutoff_len: int = arg(2048, "Longest sequence in tokens; longer examples are truncated.")
    train_on_prompt: bool = arg(False, "Learn the prompt tokens too, not only the responses.")
    mask_history: bool = arg(False, "Learn only the last response of a conversation.")
    streaming: bool = arg(False, "Tokenise while training instead of before (needs max_steps).")
    buffer_size: int = arg(16384, "Each worker's shuffle buffer, in examples; training data larger than it is "
                                  "also shuffled once across the cluster.")
    max_bad_row_ratio: float = arg(0.01, "Largest share of malformed rows a dataset may have (they are skipped); "
                                         "0 refuses any.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = arg(
        "concat", "How several datasets are mixed: concat, interleave_under or interleave_over.")
    interleave_probs: Optional[str] = arg(
        None, "Comma list of sampling probabilities for interleaving, one per dataset.")
    overwrite_cache: bool = arg(False, "Tokenise again even when a cache of the same inputs exists.")
    preprocessing_batch_size: int = arg(1000, "Examples per Ray Data tokenisation batch (and per packing group).")
    preprocessing_num_workers: Optional[int] = arg(
        None, "Most Ray Data tokenisation tasks at once (default: as many as the cluster's CPUs allow).")
    max_samples: Optional[int] = arg(None, "Use at most this many examples of each dataset.")
    eval_num_beams: Optional[int] = arg(None, "Beams at evaluation generation (prediction reads num_beams).")
    ignore_pad_token_for_loss: bool = arg(
        True, "Leave padding out of the loss (false learns it; stages pt and sft only).")
    val_size: float = arg(0.0, "Hold out this fraction (or count) of the training data for evaluation.")
    packing: Optional[bool] = arg(
        None, "Pack several examples into each sequence (default on for stage pt and neat_packing).")
    neat_packing: bool = arg(False, "Pack without attention across example boundaries.")
    tool_format: Optional[str] = arg(
        None, "Tool format instead of the template's own: default, qwen, glm4, llama3 or mistral.")
    default_system: Optional[str] = arg(
        None, "System prompt for examples that have none, instead of the template's (training, prediction, chat).")
    enable_thinking: Optional[bool] = arg(
        True, "Reasoning templates: learn an empty thought where a response has none (false: the thought is "
              "given in the prompt and existing thoughts are removed).")
    preserve_thinking: bool = arg(False, "Reasoning templates: keep the thoughts of earlier turns.")
    tokenized_path: Optional[str] = arg(
        None, "Folder (or s3:// / gs:// URI) that keeps the tokenised data; reused when its inputs match.")


@dataclass
class FinetuningArguments:
    # a name of recipe/stages.py's STAGE_SPECS (checked by the rules, so that a stage is one spec and one entry)
    stage: str = arg("sft", "What to train: pt, sft, rm, dpo, kto, ppo or grpo (the critic-free GRPO family).")
    finetuning_type: Literal["lora", "oft", "freeze", "full"] = arg("lora", "How: lora, oft, freeze or full.")
    pure_bf16: bool = arg(False, "Train with bf16 weights throughout, without fp32 master weights.")
    use_llama_pro: bool = arg(False, "LLaMA Pro: train only the freeze_trainable_layers blocks `rayft expand` "
                                     "inserted (freeze or lora).")
    use_adam_mini: bool = arg(False, "The Adam-mini optimizer.")
    freeze_vision_tower: bool = arg(True, "Freeze a vision-language model's vision tower (LoRA never targets a "
                                          "frozen one).")
    freeze_multi_modal_projector: bool = arg(True, "Freeze a vision-language model's projector (LoRA never targets "
                                                   "it; freeze and full training train it when false).")
    train_mm_proj_only: bool = arg(False, "Removed in LLaMA-Factory 0.9.5 and refused: freeze_vision_tower, "
                                          "freeze_language_model and freeze_multi_modal_projector say it.")
    compute_accuracy: bool = arg(False, "Report token accuracy on the evaluation data (stage sft).")
    disable_shuffling: bool = arg(False, "Keep the dataset's order instead of reshuffling every epoch.")
    plot_loss: bool = arg(False, "Draw the loss (and the stage's statistics) to PNG files after training.")
    include_effective_tokens_per_second: bool = arg(False, "Report effective tokens per second.")
    # rayft addition: where `report_to: mlflow` writes; unset means a local file store in output_dir/mlruns
    mlflow_tracking_uri: Optional[str] = arg(
        None, "rayft: where report_to mlflow writes (default: a file store in output_dir/mlruns).")
    # freeze
    freeze_trainable_layers: int = arg(2, "Blocks freeze training trains: the last n (n > 0) or the first n (n < 0).")
    freeze_trainable_modules: str = arg(
        "all", "Modules inside those blocks: all, or a comma list such as mlp,self_attn.")
    freeze_extra_modules: Optional[str] = arg(
        None, "Modules outside the blocks that freeze training also trains (e.g. embed_tokens,norm).")
    # LoRA
    additional_target: Optional[str] = arg(None, "Comma list of modules trained whole and saved beside the adapter.")
    lora_alpha: Optional[int] = arg(None, "LoRA scaling numerator (default 2 x lora_rank).")
    lora_dropout: float = arg(0.0, "Dropout on the LoRA path.")
    lora_rank: int = arg(8, "Rank of the LoRA matrices.")
    lora_target: str = arg("all", "Modules that get LoRA: all (every linear layer but the head) or a comma list.")
    loraplus_lr_ratio: Optional[float] = arg(None, "LoRA+: the B matrices learn this many times faster than A.")
    loraplus_lr_embedding: float = arg(1e-6, "LoRA+: learning rate of adapters on embeddings.")
    use_rslora: bool = arg(False, "Rank-stabilised LoRA scaling (alpha / sqrt(rank)).")
    use_dora: bool = arg(False, "Weight-decomposed LoRA (DoRA).")
    pissa_init: bool = arg(False, "Initialise LoRA from the principal singular vectors (PiSSA).")
    pissa_iter: int = arg(16, "Iterations of PiSSA's fast SVD (-1: exact SVD).")
    pissa_convert: bool = arg(
        False, "Also save the trained PiSSA adapter as a plain LoRA adapter for the original model.")
    create_new_adapter: bool = arg(False, "Merge every adapter_name_or_path and train a new adapter on top.")
    # OFT (orthogonal fine-tuning, through PEFT)
    oft_rank: int = arg(0, "OFT: number of orthogonal blocks (0: set by oft_block_size).")
    oft_block_size: int = arg(32, "OFT: size of each orthogonal block.")
    oft_target: str = arg("all", "Modules that get OFT: all or a comma list.")
    module_dropout: float = arg(0.0, "OFT: probability of dropping a whole block rotation.")
    # RLHF
    pref_beta: float = arg(0.1, "Preference losses' beta (DPO temperature, ORPO/SimPO weight, KTO beta).")
    pref_ftx: float = arg(0.0, "Weight of an added SFT loss on the chosen responses.")
    pref_loss: Literal["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"] = arg(
        "sigmoid", "DPO's loss: sigmoid, hinge, ipo, kto_pair, orpo or simpo.")
    dpo_label_smoothing: float = arg(0.0, "Share of preferences assumed flipped (sigmoid loss).")
    kto_chosen_weight: float = arg(1.0, "KTO's weight of desirable examples.")
    kto_rejected_weight: float = arg(1.0, "KTO's weight of undesirable examples.")
    simpo_gamma: float = arg(0.5, "SimPO's target reward margin.")
    ppo_buffer_size: int = arg(1, "PPO: batches of rollouts collected per optimizer step.")
    ppo_epochs: int = arg(4, "PPO: passes over each rollout batch.")
    ppo_score_norm: bool = arg(False, "PPO: normalise reward scores with running moments.")
    ppo_target: float = arg(6.0, "PPO: target KL of the adaptive KL controller.")
    ppo_whiten_rewards: bool = arg(False, "PPO: whiten the rewards before computing advantages.")
    ref_model: Optional[str] = arg(
        None, "Reference model folder (default: the base model, or the policy without its adapter).")
    ref_model_adapters: Optional[str] = arg(None, "Adapters merged into the reference model.")
    ref_model_quantization_bit: Optional[int] = arg(
        None, "Load a separate reference model in 4 or 8 bits (bitsandbytes).")
    reward_model: Optional[str] = arg(
        None, "PPO's reward model: an rm run's output_dir (lora), a model folder (full) or a URL (api).")
    reward_model_adapters: Optional[str] = arg(None, "Adapters merged into a full reward model.")
    reward_model_quantization_bit: Optional[int] = arg(
        None, "Load a full reward model in 4 or 8 bits (bitsandbytes).")
    reward_model_type: Literal["lora", "full", "api"] = arg("lora", "PPO's reward model kind: lora, full or api.")
    # rayft addition: the critic-free, group-baseline stage (grpo) and its verifiable rewards
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = arg(
        "grpo", "rayft, stage grpo: grpo (group mean and std), dr_grpo (group mean only), rloo (leave-one-out "
                "mean) or reinforce_pp (KL-penalised return, normalised over the global batch).")
    num_generations: int = arg(8, "rayft, stage grpo: completions sampled per prompt (the group).")
    epsilon: float = arg(0.2, "rayft, stage grpo: lower clip range of the importance ratio.")
    epsilon_high: Optional[float] = arg(None, "rayft, stage grpo: upper clip range (default: epsilon; DAPO: 0.28).")
    beta: float = arg(0.0, "rayft, stage grpo: weight of the KL term to the reference (0: no reference is loaded).")
    loss_type: Optional[Literal["grpo", "bnpo", "dr_grpo", "dapo"]] = arg(
        None, "rayft, stage grpo: how token losses are averaged, as TRL names it (default: dr_grpo for "
              "advantage_estimator dr_grpo, else dapo).")
    reward_funcs: Optional[Union[list, str]] = arg(
        None, "rayft, stage grpo: rewards, a list or comma list of accuracy, format, length, reward_model or "
              "package.module:function.")
    reward_weights: Optional[Union[list, str]] = arg(
        None, "rayft, stage grpo: one weight per reward (default: 1 each).")
    accuracy_extraction: Literal["last_number", "boxed", "last_word", "exact"] = arg(
        "last_number", "rayft, reward accuracy: what of a completion is compared with the answer column.")
    format_pattern: Optional[str] = arg(None, "rayft, reward format: regular expression a completion must match.")
    log_completions_steps: int = arg(
        10, "rayft, stage grpo: every n steps, one prompt's completions and rewards go to completions.jsonl "
            "(0: never).")
    async_rollouts: bool = arg(
        False, "rayft, stage grpo: the rollout actors answer the next batch while the workers learn (one step "
               "off-policy, corrected by the importance ratio); needs rollout_workers.")
    # GaLore
    use_galore: bool = arg(False, "The GaLore optimizer.")
    galore_target: str = arg("all", "GaLore's target modules.")
    galore_rank: int = arg(16, "GaLore's rank.")
    galore_update_interval: int = arg(200, "GaLore's projection update interval.")
    galore_scale: float = arg(2.0, "GaLore's scale.")
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = arg(
        "std", "GaLore's projection type.")
    galore_layerwise: bool = arg(False, "GaLore layer by layer.")
    # APOLLO
    use_apollo: bool = arg(False, "The APOLLO optimizer.")
    apollo_target: str = arg("all", "APOLLO's target modules.")
    apollo_rank: int = arg(16, "APOLLO's rank.")
    apollo_update_interval: int = arg(200, "APOLLO's projection update interval.")
    apollo_scale: float = arg(32.0, "APOLLO's scale.")
    apollo_proj: Literal["svd", "random"] = arg("random", "APOLLO's projection.")
    apollo_proj_type: Literal["std", "right", "left"] = arg("std", "APOLLO's projection type.")
    apollo_scale_type: Literal["channel", "tensor"] = arg("channel", "APOLLO's scale type.")
    apollo_layerwise: bool = arg(False, "APOLLO layer by layer.")
    apollo_scale_front: bool = arg(False, "APOLLO's scale in front.")
    # BAdam
    use_badam: bool = arg(False, "The BAdam optimizer.")
    badam_mode: Literal["layer", "ratio"] = arg("layer", "BAdam's mode.")
    badam_start_block: Optional[int] = arg(None, "BAdam's first block.")
    badam_switch_mode: Optional[Literal["ascending", "descending", "random", "fixed"]] = arg(
        "ascending", "BAdam's block switching.")
    badam_switch_interval: Optional[int] = arg(50, "BAdam's switch interval.")
    badam_update_ratio: float = arg(0.05, "BAdam's update ratio.")
    badam_mask_mode: Literal["adjacent", "scatter"] = arg("adjacent", "BAdam's mask mode.")
    badam_verbose: int = arg(0, "BAdam's verbosity.")
    early_stopping_steps: Optional[int] = arg(
        None, "Stop when the evaluation metric has not improved for this many evaluations.")
    pref_bco_weight: float = arg(0.0, "Weight of BCO's pair loss beside DPO's (the two re-weighted to sum to 1).")
    ld_alpha: Optional[float] = arg(None, "LD-DPO: weight in [0, 1] of the longer response's tokens beyond the "
                                          "shorter one's length.")
    use_dft_loss: bool = arg(False, "Dynamic fine-tuning: weigh each token's loss by its probability (sft).")
    use_asft_loss: bool = arg(False, "ASFT's anchored loss.")
    asft_alpha: float = arg(0.1, "ASFT's anchor weight.")
    use_eaft_loss: bool = arg(False, "EAFT's entropy-aware loss.")
    eaft_alpha: float = arg(1.0, "EAFT's weight.")
    use_muon: bool = arg(False, "The Muon optimizer for matrix parameters.")
    use_mca: bool = arg(False, "Megatron-Core adapter training.")
    use_hyper_parallel: bool = arg(False, "LLaMA-Factory's hyper-parallel training.")
    hyper_parallel_args: Optional[str] = arg(None, "Settings of hyper-parallel training.")
    freeze_language_model: bool = arg(False, "Freeze a vision-language model's language model (and LoRA leaves it "
                                             "out).")
    # SwanLab (rank 0 logs; report_to: swanlab means the same)
    use_swanlab: bool = arg(False, "Track the run in SwanLab, from rank 0.")
    swanlab_project: str = arg("llamafactory", "SwanLab project.")
    swanlab_workspace: Optional[str] = arg(None, "SwanLab workspace (cloud mode).")
    swanlab_run_name: Optional[str] = arg(None, "SwanLab experiment name (default: ray_run_name).")
    swanlab_mode: Literal["cloud", "local", "offline"] = arg(
        "cloud", "cloud: log to SwanLab's server; local: a folder for `swanlab watch`; offline: a folder that "
                 "`swanlab sync` uploads later (no network during the run).")
    swanlab_api_key: Optional[str] = arg(None, "SwanLab API key for cloud mode (a secret: masked everywhere).")
    swanlab_logdir: Optional[str] = arg(None, "SwanLab's folder (default: output_dir/swanlog).")
    swanlab_lark_webhook_url: Optional[str] = arg(None, "A Lark webhook SwanLab notifies when the run ends "
                                                        "(a secret: masked everywhere).")
    swanlab_lark_secret: Optional[str] = arg(None, "The Lark webhook's signing secret (masked everywhere).")
    # derived in recipe.derive.resolve(), never set by the user
    use_ref_model: bool = field(default=False, init=False,
                                metadata={"help": "Derived: whether the stage compares with a reference model."})


@dataclass
class GeneratingArguments:
    do_sample: bool = arg(True, "Sample (true) or decode greedily (false).")
    temperature: float = arg(0.95, "Sampling temperature.")
    top_p: float = arg(0.7, "Nucleus sampling: keep the smallest set of tokens with this probability.")
    top_k: int = arg(50, "Sample among the k most likely tokens.")
    num_beams: int = arg(1, "Beams of beam search (1: none).")
    max_length: int = arg(1024, "Longest prompt plus answer, in tokens (max_new_tokens wins when set).")
    max_new_tokens: int = arg(1024, "Most tokens generated per answer.")
    repetition_penalty: float = arg(1.0, "Penalty on tokens already generated (1: none).")
    length_penalty: float = arg(1.0, "Beam search's preference for longer answers.")
    skip_special_tokens: bool = arg(True, "Leave special tokens out of decoded answers.")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RayArguments:
    ray_run_name: Optional[str] = arg(
        None, "Name of the Ray Train run; a rerun with the same name resumes from its checkpoints.")
    ray_storage_path: str = arg(
        "./saves", "Where Ray keeps checkpoints and results: a folder, or an s3:// / gs:// URI.")
    ray_num_workers: Union[int, str, list] = arg(
        1, "Training workers (one process each), or an elastic range [min, max] (\"2-8\" on the command line): the "
           "group shrinks when nodes leave and grows when they return, keeping the global batch.")
    resources_per_worker: Optional[Union[dict, str]] = arg(
        None, "Resources of each worker, e.g. {CPU: 2} or {GPU: 1} (default: sized to the cluster, see the plan).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = arg(
        "PACK", "How workers are placed on nodes: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD.")
    ray_address: Optional[str] = arg(
        None, "Address of a running Ray cluster (default: start a local one; RAY_ADDRESS inside a job).")
    ray_storage_filesystem: Optional[Literal["s3", "gs", "gcs"]] = arg(
        None, "pyarrow file system for a ray_storage_path without a scheme: s3, gs or gcs.")
    ray_init_kwargs: Optional[dict] = arg(None, "Further keyword arguments of ray.init.")
    ray_max_failures: int = arg(
        0, "rayft: restarts after a worker or node failure, each from the latest checkpoint (-1: no limit).")
    ray_resize_interval_s: float = arg(
        60.0, "rayft, elastic runs: seconds between Ray Train's checks whether the group can grow (nodes returned).")
    ray_preemption_grace_s: float = arg(
        30.0, "rayft: seconds a worker may still run after a SIGTERM (a spot or preemption notice) to save a "
              "checkpoint at its next step; 0 leaves at once.")
    ray_runtime_env: Optional[dict] = arg(
        None, "rayft: runtime_env of the job `rayft submit` starts (pip, env_vars, ...).")
    # rayft addition (stage ppo, reward_model_type full): how many Ray actors serve the reward model (and, for
    # freeze or full fine-tuning, the reference model) apart from the training workers; 0 keeps them inside
    # every worker. Each actor holds reward_model_resources (default: what a worker holds).
    reward_model_workers: int = arg(
        0, "rayft, stage ppo: Ray actors that serve a full reward model (0: inside every worker).")
    reward_model_resources: Optional[Union[dict, str]] = arg(
        None, "rayft, stage ppo: resources of each reward actor (default: a worker's).")
    # rayft addition (stage grpo): a group of Ray actors that generate the rollouts with a copy of the policy,
    # apart from the training workers, which send them the new weights after every step
    rollout_workers: int = arg(
        0, "rayft, stage grpo: Ray actors that generate the rollouts (0: every worker generates its own).")
    rollout_resources: Optional[Union[dict, str]] = arg(
        None, "rayft, stage grpo: resources of each rollout actor (default: a worker's).")
    # derived in recipe.derive.resolve(), never set by the user: the range of ray_num_workers
    min_workers: int = field(default=1, init=False, metadata={"help": "Derived: the fewest workers of the run."})
    max_workers: int = field(default=1, init=False, metadata={"help": "Derived: the most workers of the run."})
    # derived in recipe.derive.resolve(), never set by the user: the recipe named a relative path
    storage_was_relative: bool = field(default=False, init=False,
                                       metadata={"help": "Derived: the recipe named a relative ray_storage_path."})



LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServingArguments:
    """rayft additions, read by `rayft serve` only. Where LLaMA-Factory's `llamafactory-cli api` reads an environment
    variable for the same thing (named in the help), that variable is the default when the recipe leaves the key out."""

    serve_host: str = arg("127.0.0.1", "Address the API listens on (API_HOST); anything but loopback needs "
                                       "serve_api_key.")
    serve_port: int = arg(8000, "Port of the API (API_PORT).")
    serve_api_key: Optional[str] = arg(
        None, "Bearer token every request must carry (API_KEY); required off loopback. Masked in logs.")
    served_model_name: Optional[str] = arg(
        None, "Name of the base model (plus adapter_name_or_path) in the API (API_MODEL_NAME; default: the model "
              "folder's name).")
    serve_adapters: Optional[Union[dict, str]] = arg(
        None, "Adapters served on the same base, name -> folder or URI (an output_dir, a trial's or a checkpoint's "
              "folder); a request's `model` picks one.")
    serve_replicas: Union[int, str] = arg(
        1, "Replicas of the model, or an autoscaling range such as \"1-4\".")
    serve_resources: Optional[Union[dict, str]] = arg(
        None, "Resources of each replica, e.g. {CPU: 2} or {GPU: 1} (default: {CPU: 1}, or {GPU: 1} with CUDA).")
    serve_max_concurrent: int = arg(
        8, "Requests one replica holds at once, running and waiting (MAX_CONCURRENT).")
    serve_max_batch_size: Optional[int] = arg(
        None, "Answers a replica generates together: waiting requests with the same model and settings share one "
              "generate call (1: one at a time; default: 8, or serve_max_concurrent when lower).")
    serve_max_tokens: Optional[int] = arg(
        None, "Most tokens one answer may generate; a request asking for more is refused (default: "
              "max_new_tokens).")
    serve_max_prompt_tokens: Optional[int] = arg(
        None, "Longest prompt in tokens; a longer one is refused (default: cutoff_len).")
    serve_max_body_bytes: int = arg(1_048_576, "Largest request body in bytes; a larger one gets 413.")
    serve_route_prefix: str = arg(
        "/", "Path the API answers under (\"/math\": /math/v1/...); applications on one cluster share its port and "
             "differ by it.")
    serve_verbose: bool = arg(False, "Log one line per request: route, model, prompt tokens, settings; never its "
                                     "text or key (API_VERBOSE).")
    serve_name: str = arg("rayft", "Name of the Ray Serve application (to find or stop it on the cluster).")


# Transformers' Seq2SeqTrainingArguments, recorded as data by tools/hf_training_keys.py: the schema, `rayft keys` and
# every check read it without importing Transformers (and with it torch); the workers build Transformers' own class.
TRAINING_KEYS_FILE = Path(__file__).with_name("training_keys.json")
_TYPE_WORDS = {"__builtins__": {}, "Union": Union, "Literal": Literal, "Any": Any, "None": None, "bool": bool,
               "int": int, "float": float, "str": str, "dict": dict, "list": list}


def annotation(text: str) -> Any:
    """The annotation a recorded type names ("Union[int, None]", "Literal['no', 'steps']", ...)."""
    tp = eval(text, _TYPE_WORDS)  # the recorded file's own words only: no builtins reach it
    return type(None) if tp is None else tp


def transformers_fields() -> list[tuple[str, Any, Any]]:
    """(name, annotation, field) of every key of Transformers' Seq2SeqTrainingArguments, from the recorded file."""
    made = []
    for key in json.loads(TRAINING_KEYS_FILE.read_text())["keys"]:
        meta = {"help": key["help"]}
        if key.get("factory"):
            made.append((key["name"], annotation(key["type"]),
                         field(default_factory=functools.partial(copy.deepcopy, key["default"]), metadata=meta)))
        else:
            made.append((key["name"], annotation(key["type"]), field(default=key["default"], metadata=meta)))
    return made


TransformersTrainingArguments = dataclasses.make_dataclass("TransformersTrainingArguments", transformers_fields())


@dataclass
class TrainingArguments(TransformersTrainingArguments):
    """Hugging Face's Seq2SeqTrainingArguments plus the keys rayft adds (and rayft's default for do_train)."""

    # a recipe trains unless it says do_train: false (Transformers' own default is for scripts that check it)
    do_train: bool = field(default=True, metadata={"help": "Train; false with predict_with_generate generates."})

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into an existing, non-empty output_dir."}
    )
    # keys of LLaMA-Factory's TrainingArguments on Transformers 5.6 that Transformers 5.23 dropped or never had
    warmup_ratio: Optional[float] = field(default=None, metadata={
        "help": "Warm-up as a fraction of the steps; becomes Transformers 5's warmup_steps (a float below 1)."})
    logging_dir: Optional[str] = field(default=None, metadata={
        "help": "Folder of the TensorBoard logs (default: output_dir/runs)."})
    master_addr: Optional[str] = field(default=None, metadata={
        "help": "torchrun's rendezvous address (refused: Ray Train sets up the process group)."})
    master_port: Optional[str] = field(default=None, metadata={
        "help": "torchrun's rendezvous port (refused: Ray Train sets up the process group)."})
    fp8: bool = field(default=False, metadata={"help": "FP8 training."})
    fp8_backend: str = field(default="auto", metadata={"help": "FP8 backend."})
    fp8_enable_fsdp_float8_all_gather: bool = field(default=False, metadata={"help": "FP8 all-gather."})
    enable_torch_profiler: bool = field(default=False, metadata={"help": "Torch profiler traces."})
    profiler_output_dir: Optional[str] = field(default=None, metadata={"help": "Profiler traces' folder."})
    profile_modules: Optional[str] = field(default=None, metadata={
        "help": "Comma list of fnmatch patterns of module names (*.layers.0.self_attn) whose forward and backward "
                "times rank 0 logs at each logging step (output_dir/module_times.jsonl)."})
    profiler_wait_steps: int = field(default=1, metadata={"help": "Profiler schedule."})
    profiler_warmup_steps: int = field(default=1, metadata={"help": "Profiler schedule."})
    profiler_active_steps: int = field(default=1, metadata={"help": "Profiler schedule."})
    profiler_repeat: int = field(default=1, metadata={"help": "Profiler schedule."})
    profiler_record_shapes: bool = field(default=True, metadata={"help": "Profiler option."})
    profiler_profile_memory: bool = field(default=True, metadata={"help": "Profiler option."})
    profiler_with_stack: bool = field(default=True, metadata={"help": "Profiler option."})


# Sections in the order their keys are looked up; a key belongs to exactly one of them.
SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "finetuning": FinetuningArguments,
    "generating": GeneratingArguments,
    "ray": RayArguments,
    "serving": ServingArguments,
    "training": TrainingArguments,
}


def field_names(cls: type) -> set[str]:
    """The names of a section's fields."""
    return {f.name for f in dataclasses.fields(cls)}


def default_of(cls: type, key: str) -> Any:
    """The schema's default of `key` in section `cls`."""
    for f in dataclasses.fields(cls):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


_HINTS: dict[type, dict] = {}


def type_hints(cls: type) -> dict:
    """The resolved annotations of a section's fields (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def key_sections() -> dict[str, str]:
    """Every settable key -> the section it belongs to (first section wins on a shared name)."""
    keys: dict[str, str] = {}
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                keys.setdefault(f.name, name)
    return keys



def describe_keys(which: str | None = None) -> str | None:
    """`rayft keys`: every settable key of a section (or one key, or all) with its type, default and help text.
    None when `which` is neither a section nor a key."""
    if which in SECTIONS:
        chosen = {which: SECTIONS[which]}
    elif which is None:
        chosen = SECTIONS
    else:
        section = key_sections().get(which)
        if section is None:
            return None
        chosen = {section: SECTIONS[section]}
    lines = []
    for name, cls in chosen.items():
        hints = type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if f.init and (which in (None, name) or f.name == which)]
        lines.append(f"[{name}]")
        for f in fields:
            default = default_of(cls, f.name)
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            if f.name in NOT_BUILT:  # the list that refuses the key says so here too
                help_text += f" Not built ({NOT_BUILT[f.name]}): refused when set to anything but its default."
            lines.append(f"  {f.name}  ({_type_name(hints[f.name])}, default {default!r})")
            if help_text:
                lines.append(f"      {help_text}")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    """A short name for an annotation: `int`, `str | None`, `one of 'a', 'b'`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def rayft_training_defaults() -> dict:
    """The training keys whose default rayft changes from Transformers' (do_train), for building Transformers' own
    arguments in the worker with rayft's defaults."""
    recorded = {name: f.default for name, _, f in transformers_fields() if f.default is not dataclasses.MISSING}
    return {name: default_of(TrainingArguments, name) for name in recorded
            if default_of(TrainingArguments, name) != recorded[name]}
