"""The keys rayft refuses by name, with the feature each belongs to: one list, read by the recipe checks
(recipe/parse.py) and by the key help (`rayft keys`)."""

# Fields from the seeds whose feature rayft has not built yet, with what they belong to.
# Setting one to a non-default value is refused by name; it is never silently ignored.
NOT_BUILT: dict[str, str] = {
    **{k: "video input (it needs torchvision and PyAV; torchvision has no build beside the CPU-only torch)" for k in (
        "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen")},
    **{k: "vLLM inference" for k in (
        "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config")},
    "infer_backend": "vLLM inference",
    **{k: "quantised export" for k in (
        "export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
        "export_quantization_maxlen")},
    "export_hub_model_id": "pushing an export to the hub",
    "mixture_of_depths": "mixture of depths (its package, mixture-of-depth 1.2, does not import on Transformers 5)",
    **{k: "GPU kernels (Unsloth, Liger)" for k in ("use_unsloth", "use_unsloth_gc", "enable_liger_kernel")},
    "crop_to_patches": "InternVL's image crops (LLaMA-Factory's intern_vl plugin)",
    "image_do_pan_and_scan": "Gemma 3's pan and scan (LLaMA-Factory's gemma3 plugin)",
    **{k: "audio input (it needs torchaudio)" for k in ("use_audio_in_video", "audio_sampling_rate")},
    **{k: "SGLang inference (not installable here)" for k in (
        "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size", "sglang_config", "sglang_lora_backend")},
    **{k: "KTransformers (needs its CUDA kernels)" for k in (
        "use_kt", "kt_weight_path", "kt_expert_checkpoint_path", "kt_use_lora_experts", "kt_lora_expert_num",
        "kt_lora_expert_intermediate_size")},
    **{k: "FP8 training (needs Hopper or newer GPUs)" for k in ("fp8", "fp8_backend",
                                                                "fp8_enable_fsdp_float8_all_gather")},
    **{k: "a torchrun rendezvous (Ray Train makes the process group; its address is Ray's)" for k in (
        "master_addr", "master_port")},
    "use_v1_kernels": "LLaMA-Factory's v1 kernel plugins (fused NPU operators)",
    "use_mca": "Megatron-Core training",
    **{k: "HyperParallel training (its hyper_parallel package is not on the package index)" for k in (
        "use_hyper_parallel", "hyper_parallel_args")},
    "ms_hub_token": "ModelScope's hub (models load from a folder or the Hugging Face hub)",
    "om_hub_token": "Modelers' hub (models load from a folder or the Hugging Face hub)",
}
