"""The memory planner: what one worker holds for a planned run, and the DeepSpeed setup `deepspeed: auto` picks.

Pure arithmetic over the model's shape (counted on an empty, meta-device copy) and the plan's settings; for
mixed-precision full fine-tuning under ZeRO-2 and ZeRO-3 the model states come from DeepSpeed's own
estimators. Figures are bytes; every estimate names its parts so that a refusal can show them.
"""

from dataclasses import dataclass, field, replace
from typing import Any

from rayft.recipe.optimizers import state_bytes
from rayft.recipe.values import GB

# Resident memory of a CPU worker before its model loads: Python, PyTorch, Transformers, PEFT, DeepSpeed and
# the Ray Train worker (measured on the development machine: benchmarks/zero_memory.py prints it).
CPU_RUNTIME_BYTES = int(0.75 * GB)
# Device memory a CUDA worker loses to its context and allocator before the model (an assumption, not
# measured here: this machine has no GPU).
CUDA_RUNTIME_BYTES = int(0.5 * GB)
# What `deepspeed: auto` tries, in order: the lowest ZeRO stage that fits, then offloading.
AUTO_ORDER = ("z0", "z1", "z2", "z3", "z2_offload", "z3_offload")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the model, counted once on the driver."""

    total_params: int
    trainable_params: int
    largest_layer_params: int  # the most parameters one module holds directly (ZeRO-3 gathers one at a time)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int


@dataclass(frozen=True)
class MemorySettings:
    """The plan's settings that change memory."""

    num_workers: int
    zero_stage: int | None  # None: no DeepSpeed
    offload: tuple[str, ...]  # "optimizer" and/or "param"
    use_gpu: bool
    mixed_precision: bool  # bf16 / fp16 training on GPUs: 16-bit weights with fp32 master weights
    per_device_batch_size: int
    cutoff_len: int
    gradient_checkpointing: bool
    reference_copy: bool  # a frozen copy of the model (dpo / kto with freeze or full fine-tuning)
    eager_attention: bool = False  # attention probabilities kept for the backward pass
    quantization_bit: int | None = None  # QLoRA: the frozen base's linear layers in 4 or 8 bits
    optimizer: str = "default"  # recipe/optimizers.py's kind: GaLore, APOLLO, BAdam, Adam-mini and Muon keep less
    finetuning: Any = None  # the recipe's finetuning section, for the optimizer's own settings (ranks, ratios)


@dataclass
class MemoryEstimate:
    """Bytes one worker needs, by part; `device` on the accelerator (or host for CPU workers), `host` what
    offloading moves to the host."""

    parts: dict[str, int] = field(default_factory=dict)
    host_parts: dict[str, int] = field(default_factory=dict)

    @property
    def device(self) -> int:
        return sum(self.parts.values())

    @property
    def host(self) -> int:
        return sum(self.host_parts.values())

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v)
        offloaded = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.host_parts.items() if v)
        host = f" + host {self.host / GB:.2f} GB ({offloaded})" if offloaded else ""
        return f"{self.device / GB:.2f} GB ({shown})" + host


def estimate(shape: ModelShape, s: MemorySettings) -> MemoryEstimate:
    """Per-worker memory: weights, gradients, optimizer states, activations, a reference copy, the runtime."""
    n, stage = s.num_workers, s.zero_stage if s.zero_stage is not None else 0
    p, t = shape.total_params, shape.trainable_params
    weight_bytes = 2 if s.mixed_precision else 4
    parts, host = {}, {}
    if s.mixed_precision and t == p and stage in (2, 3):
        parts.update(_deepspeed_states(shape, s))
    else:
        # Gradients in the weights' precision; AdamW's two fp32 moments; under ZeRO 1-3 DeepSpeed keeps its own
        # fp32 copy of the trained parameters as the optimizer's partition (a copy also when training in fp32).
        grads = t * weight_bytes
        optimizer = optimizer_state(shape, s) + (t * 4 if stage >= 1 or s.mixed_precision else 0)
        weights = p * weight_bytes
        if s.quantization_bit:
            # bitsandbytes quantises the decoder's linear layers; embeddings, norms, the output head and the
            # adapters stay in the training precision. NF4 adds about half a bit per weight of block constants.
            embeddings = shape.vocab_size * shape.hidden_size * 2
            quantized = max(p - t - embeddings, 0)
            bits = s.quantization_bit + (0.5 if s.quantization_bit == 4 else 0.25)
            weights = int(quantized * bits / 8) + (p - quantized) * weight_bytes
        if stage >= 1:
            optimizer //= n
        if stage >= 2:
            grads //= n
        if stage == 3:
            weights = weights // n + 2 * shape.largest_layer_params * weight_bytes  # one layer gathered, one prefetched
        parts.update(weights=weights, gradients=grads, optimizer=optimizer)
        if "optimizer" in s.offload:
            host["optimizer"] = parts.pop("optimizer")
        if "param" in s.offload and stage == 3:
            host["weights"] = parts["weights"] - 2 * shape.largest_layer_params * weight_bytes
            parts["weights"] -= host["weights"]
    if s.reference_copy:
        parts["reference"] = p * weight_bytes // (n if stage == 3 else 1)
    parts["activations"] = activation_bytes(shape, s, weight_bytes)
    if stage == 3:
        # Saving gathers the whole model into host memory on rank 0 (stage3_gather_16bit_weights_on_model_save)
        # while its partitions stay; on a CPU worker the activations are gone by then.
        if s.use_gpu:
            host["gathered for saving"] = p * weight_bytes
        else:
            parts["gathered for saving"] = max(0, p * weight_bytes - parts["activations"])
    parts["runtime"] = CUDA_RUNTIME_BYTES if s.use_gpu else CPU_RUNTIME_BYTES
    if not s.use_gpu:  # a CPU worker's "device" is its host memory: offloading moves nothing off it
        parts.update({f"{k} (offloaded)": v for k, v in host.items()})
        host = {}
    return MemoryEstimate(parts, host)


def optimizer_state(shape: ModelShape, s: MemorySettings) -> int:
    """fp32 bytes of the optimizer's state. The decoder's linear weights, as the low-rank methods and Muon see them,
    are counted from the shape (q, k, v, o as hidden x hidden; gate, up, down) in the share of layers trained."""
    t = shape.trainable_params
    if s.optimizer == "default":
        return 8 * t
    h, i = shape.hidden_size, shape.intermediate_size
    trained_layers = round(shape.num_layers * min(1.0, t / max(shape.total_params, 1)))
    matrices = [(h, h)] * 4 * trained_layers + [(i, h)] * 3 * trained_layers
    return state_bytes(s.optimizer, s.finetuning, t, matrices, shape.num_layers)


def activation_bytes(shape: ModelShape, s: MemorySettings, weight_bytes: int) -> int:
    """Activations kept for the backward pass of one micro-batch of cutoff_len tokens, plus the logits.

    Per token and layer a decoder block keeps about 10 hidden-sized and 4 intermediate-sized tensors (norms,
    q/k/v, attention output, residuals; gate, up, activation and product of the MLP), and the attention
    probabilities when attention is eager. Gradient checkpointing keeps only each layer's input and
    recomputes one layer at a time. The logits and their gradient are fp32, vocabulary-sized per token.
    """
    tokens = s.per_device_batch_size * s.cutoff_len
    per_layer = 10 * shape.hidden_size + 4 * shape.intermediate_size
    if s.eager_attention:
        per_layer += 2 * shape.num_heads * s.cutoff_len
    if s.gradient_checkpointing:
        kept = shape.num_layers * shape.hidden_size + per_layer
    else:
        kept = shape.num_layers * per_layer
    logits = 3 * shape.vocab_size * 4
    return tokens * (kept * weight_bytes + logits)


def _deepspeed_states(shape: ModelShape, s: MemorySettings) -> dict[str, int]:
    """Mixed-precision full fine-tuning under ZeRO-2 / ZeRO-3: DeepSpeed's own estimators, one worker per GPU."""
    offload_optimizer, offload_param = "optimizer" in s.offload, "param" in s.offload
    if s.zero_stage == 2:
        # heavy; only mixed-precision ZeRO-2/3 estimates use DeepSpeed's estimators
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(shape.total_params, num_gpus_per_node=s.num_workers,
                                                        num_nodes=1, cpu_offload=offload_optimizer)
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.total_params, shape.largest_layer_params, num_gpus_per_node=s.num_workers, num_nodes=1,
            cpu_offload=offload_optimizer, cpu_offload_params=offload_param, zero_init=True)
    return {"model states (DeepSpeed's estimate)": int(gpu)}


def pick_deepspeed(shape: ModelShape, base: MemorySettings, budget: int) -> tuple[str | None, list[str]]:
    """The first of AUTO_ORDER whose estimate fits `budget` bytes per worker, and one line per candidate
    tried saying why (None when nothing fits)."""
    tried = []
    for name in AUTO_ORDER:
        stage, _, offload = name.partition("_")
        settings = replace(base, zero_stage=int(stage[1]), offload=("optimizer", "param") if offload and stage == "z3"
                           else ("optimizer",) if offload else ())
        if offload and not base.use_gpu:
            continue  # offloading to the host frees nothing on a CPU worker
        if base.quantization_bit and stage == "z3":
            continue  # ZeRO-3 cannot partition bitsandbytes' quantised layers
        found = estimate(shape, settings)
        fits = found.device <= budget
        tried.append(f"{name}: {found.describe()} {'fits' if fits else 'exceeds'} {budget / GB:.2f} GB")
        if fits:
            return name, tried
    return None, tried

