"""Named presets, one per published setting (docs/algorithm.md, Published settings), plus tiny CPU presets.

Use: `python train_sd3.py --config=config/grpo.py:pickscore_sd3 --config.sample.noise_level=0.5`.
Each preset calls its parent and changes only what differs. Presets without a `_flow_grpo`
suffix train TP-GRPO; the `_flow_grpo` twins keep every setting and switch the algorithm, which
is how the TP-GRPO paper compares the two, except that the FLUX baselines keep the reference baseline
script's noise level 0.8.
"""

import importlib.util
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("flow_grpo_config_base", os.path.join(_HERE, "base.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

# Where `make tiny-model` saves the tiny offline pipelines used by the CPU presets.
TINY_MODEL_DIR = os.path.join(".cache", "tiny-sd3")
TINY_FLUX_DIR = os.path.join(".cache", "tiny-flux")
TINY_FLUX2_KLEIN_DIR = os.path.join(".cache", "tiny-flux2-klein")
TINY_Z_IMAGE_DIR = os.path.join(".cache", "tiny-z-image")
TINY_QWEN_IMAGE_DIR = os.path.join(".cache", "tiny-qwen-image")
# The tiny CLIP (`flow_grpo.testing.rewards.save_tiny_clip`) standing in for PickScore under `,tiny`.
TINY_CLIP_DIR = os.path.join(".cache", "tiny-clip")


def _rewards(**weights: float) -> ml_collections.ConfigDict:
    rewards = ml_collections.ConfigDict(weights)
    rewards.lock()  # replacing a field of a locked config does not lock the replacement
    return rewards


def _finish(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.lock()
    return config


def _task(config: ml_collections.ConfigDict, dataset: str, **rewards: float) -> ml_collections.ConfigDict:
    """A published task: its prompt set `dataset/<dataset>` and its reward for training and evaluation."""
    config.dataset = f"dataset/{dataset}"
    config.reward_fn = _rewards(**rewards)
    config.eval_reward_fn = _rewards(**rewards)
    return _finish(config)


def sd3_tp_grpo() -> ml_collections.ConfigDict:
    """SD3.5-Medium TP-GRPO defaults shared by every SD3 preset (docs/algorithm.md, Published settings)."""
    config = base.get_config()
    config.pretrained.model = "stabilityai/stable-diffusion-3.5-medium"
    config.pretrained.family = "sd3"
    config.mixed_precision = "fp16"
    # Evaluate and checkpoint every 20 epochs; the base model's score (before epoch 0) is the
    # curve's first point.
    config.eval_freq = 20
    config.save_freq = 20
    config.eval_before_training = True
    config.sample.eval_batch_size = 16
    return _finish(config)


def pickscore_sd3() -> ml_collections.ConfigDict:
    return _task(sd3_tp_grpo(), "pickscore_sfw", pickscore=1.0)


def _geneval(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The GenEval task; its test set is evaluated 14 prompts per process at a time."""
    config.sample.eval_batch_size = 14
    return _task(config, "geneval", geneval=1.0)


def geneval_sd3() -> ml_collections.ConfigDict:
    return _geneval(sd3_tp_grpo())


def ocr_sd3() -> ml_collections.ConfigDict:
    return _task(sd3_tp_grpo(), "ocr", ocr=1.0)


def ocr_sd3_basic() -> ml_collections.ConfigDict:
    """OCR with the basic turning-point definition (no consistency condition)."""
    config = ocr_sd3()
    config.tp.consistent = False
    return config


def _flow_grpo(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.algorithm = "flow_grpo"
    return config


def _family_preset(model: str, family: str) -> ml_collections.ConfigDict:
    """SD3.5-Medium's defaults on another bf16 model `model` of the adapter `family`.

    3 images per process per sampling batch and per micro-batch (the global batch per update is
    unchanged; gradient accumulation grows), LoRA r64/alpha128, and the text encoders waiting on
    the CPU while the epoch samples and trains.
    """
    config = sd3_tp_grpo()
    config.pretrained.model = model
    config.pretrained.family = family
    config.mixed_precision = "bf16"
    config.sample.batch_size = 3
    config.train.batch_size = 3
    config.train.lora_rank = 64
    config.train.lora_alpha = 128
    config.offload_text_encoders = True
    return config


def _checkpointed(
    config: ml_collections.ConfigDict, *, max_states_per_call: int, decode_chunk: int
) -> ml_collections.ConfigDict:
    """Gradient checkpointing, with the sampling bounds chosen by the memory preflight at 8 processes
    (benchmarks/RESULTS.md) so that sampling stays below the checkpointed update."""
    config.train.gradient_checkpointing = True
    config.sample.max_states_per_call = max_states_per_call
    config.sample.decode_chunk = decode_chunk
    return config


def pickscore_sd3_flow_grpo() -> ml_collections.ConfigDict:
    return _flow_grpo(pickscore_sd3())


def geneval_sd3_flow_grpo() -> ml_collections.ConfigDict:
    return _flow_grpo(geneval_sd3())


def ocr_sd3_flow_grpo() -> ml_collections.ConfigDict:
    return _flow_grpo(ocr_sd3())


def sd3_large_tp_grpo() -> ml_collections.ConfigDict:
    """SD3.5-Large (8.1 B) TP-GRPO defaults: the SD3.5-Medium settings on the larger transformer.

    No peer publishes a Flow-GRPO-style SD3.5-Large recipe (Flow-Factory's and Flow-GRPO's SD3
    configs train Medium), so every algorithm setting is Medium's (our choice); LoRA targets are the
    SD3 adapter's. bf16, the published checkpoint's dtype. The memory preflight decides the rest
    (benchmarks/RESULTS.md): at 8 processes the update of micro-batch 9 with CFG (18 transformer
    rows) needs 127 GB per process without gradient checkpointing and 45.8 GB peak with it, so it is
    on; the text encoders stay on the device (offloading would take 10.4 GB more off). With the
    update checkpointed, the rollout's unbounded transformer call (90 states, 180 rows) became the
    peak; `sample.max_states_per_call = 27` and `sample.decode_chunk = 6` keep sampling below the update.
    """
    config = sd3_tp_grpo()
    config.pretrained.model = "stabilityai/stable-diffusion-3.5-large"
    config.mixed_precision = "bf16"
    return _checkpointed(config, max_states_per_call=27, decode_chunk=6)


def pickscore_sd3_large() -> ml_collections.ConfigDict:
    return _task(sd3_large_tp_grpo(), "pickscore_sfw", pickscore=1.0)


def pickscore_sd3_large_flow_grpo() -> ml_collections.ConfigDict:
    return _flow_grpo(pickscore_sd3_large())


def tiny_tp_grpo() -> ml_collections.ConfigDict:
    """TP-GRPO on the tiny offline SD3 model with the JPEG-compressibility reward; runs on CPU."""
    config = base.get_config()
    config.pretrained.model = TINY_MODEL_DIR
    config.pretrained.max_sequence_length = 64
    config.mixed_precision = "no"
    config.report_to = "none"
    config.dataset = "dataset/demo"
    config.num_epochs = 10
    config.save_freq = 0
    config.eval_freq = 0
    config.sample.resolution = 32
    config.sample.num_steps = 6
    config.sample.eval_num_steps = 6
    config.sample.window_size = 4
    config.sample.window_range = (0, 5)
    config.sample.group_size = 4
    config.sample.prompts_per_epoch = 4
    config.sample.batch_size = 8
    config.sample.eval_batch_size = 4
    config.train.batch_size = 8
    config.train.updates_per_epoch = 1
    config.train.learning_rate = 3e-2
    config.train.clip_range = 1e-3
    config.train.beta = 0.0
    config.train.lora_rank = 8
    config.train.lora_alpha = 8
    config.train.ema = False
    config.reward_fn = _rewards(jpeg_compressibility=1.0)
    config.eval_reward_fn = _rewards(jpeg_compressibility=1.0)
    return _finish(config)


def tiny_flow_grpo() -> ml_collections.ConfigDict:
    """Flow-GRPO twin of `tiny_tp_grpo`."""
    return _flow_grpo(tiny_tp_grpo())


def flux_tp_grpo() -> ml_collections.ConfigDict:
    """FLUX.1-dev TP-GRPO defaults shared by every FLUX preset (docs/algorithm.md, Published settings)."""
    # The text encoders `_family_preset` offloads are T5-XXL and CLIP-L here (about 9.5 GB in bf16).
    config = _family_preset("black-forest-labs/FLUX.1-dev", "flux")
    config.pretrained.max_sequence_length = 128
    config.sample.num_steps = 6
    config.sample.eval_num_steps = 28
    config.sample.guidance_scale = 3.5
    config.sample.window_size = 5
    config.sample.window_range = (0, 5)
    return config


def pickscore_flux() -> ml_collections.ConfigDict:
    return _task(flux_tp_grpo(), "pickscore_sfw", pickscore=1.0)


def geneval_flux() -> ml_collections.ConfigDict:
    """GenEval on FLUX; the window stays off the last step (the reference lets it reach it: NaN KL)."""
    return _geneval(flux_tp_grpo())


def ocr_flux() -> ml_collections.ConfigDict:
    return _task(flux_tp_grpo(), "ocr", ocr=1.0)


def _flux_flow_grpo(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """FLUX Flow-GRPO baseline: the reference baseline script's noise level 0.8 (TP-GRPO uses 0.7)."""
    config.sample.noise_level = 0.8
    return _flow_grpo(config)


def pickscore_flux_flow_grpo() -> ml_collections.ConfigDict:
    return _flux_flow_grpo(pickscore_flux())


def geneval_flux_flow_grpo() -> ml_collections.ConfigDict:
    return _flux_flow_grpo(geneval_flux())


def ocr_flux_flow_grpo() -> ml_collections.ConfigDict:
    return _flux_flow_grpo(ocr_flux())


def tiny_flux() -> ml_collections.ConfigDict:
    """TP-GRPO on the tiny offline FLUX model (guidance embedding, packed latents); runs on CPU."""
    config = tiny_tp_grpo()
    config.pretrained.model = TINY_FLUX_DIR
    config.pretrained.family = "flux"
    config.num_epochs = 12
    config.sample.guidance_scale = 3.5
    config.sample.prompts_per_epoch = 8
    config.train.learning_rate = 7e-2
    return config


def tiny_flux_flow_grpo() -> ml_collections.ConfigDict:
    return _flow_grpo(tiny_flux())


def flux2_klein_tp_grpo() -> ml_collections.ConfigDict:
    """FLUX.2-klein-4B (step-distilled, no CFG) TP-GRPO defaults.

    From Flow-Factory's GRPO LoRA recipe for FLUX.2-klein (examples/grpo/lora/flux2_klein/default.yaml):
    4 sampling steps (the model is distilled to 4), guidance 1.0, noise level 0.5, LoRA r64/alpha128,
    bf16. Our choices: the 4 B checkpoint (the recipe names 4 B or 9 B; the 9 B one is
    `--config.pretrained.model=black-forest-labs/FLUX.2-klein-9B`), 512 x 512 training and 10
    evaluation steps at 512 (the recipe trains at 384 and evaluates at 1024), the window over steps
    0-2 (3 of 4; the last step stays deterministic), and the paper's group, batch and optimiser
    settings; 3 images per process per batch and gradient checkpointing, as for the 12 B FLUX.1. The
    memory preflight predicts a 19.0 GB peak per process at 8 processes (benchmarks/RESULTS.md), so
    both are far from the limit.
    """
    config = _family_preset("black-forest-labs/FLUX.2-klein-4B", "flux2_klein")
    config.sample.num_steps = 4
    config.sample.eval_num_steps = 10
    config.sample.guidance_scale = 1.0
    config.sample.noise_level = 0.5
    config.sample.window_size = 3
    config.sample.window_range = (0, 3)
    return _checkpointed(config, max_states_per_call=4, decode_chunk=1)


def pickscore_flux2_klein() -> ml_collections.ConfigDict:
    return _task(flux2_klein_tp_grpo(), "pickscore_sfw", pickscore=1.0)


def pickscore_flux2_klein_flow_grpo() -> ml_collections.ConfigDict:
    return _flow_grpo(pickscore_flux2_klein())


def z_image_tp_grpo() -> ml_collections.ConfigDict:
    """Z-Image (6 B, base model with CFG) TP-GRPO defaults.

    From Flow-Factory's GRPO LoRA recipe for Z-Image (examples/grpo/lora/z_image/default.yaml): 512 x 512,
    10 sampling and 40 evaluation steps, guidance 4.0, noise level 0.7, LoRA r64/alpha128, bf16. Our
    choices: the TP-GRPO window of SD3 (9 of 10 in (0, 9)) and the paper's group, batch and optimiser
    settings; 3 images per process per batch and gradient checkpointing (CFG doubles the rows; the
    memory preflight predicts a 30.0 GB peak per process at 8 processes). Z-Image-Turbo (distilled, 8
    steps, no CFG) is `--config.pretrained.model=Tongyi-MAI/Z-Image-Turbo --config.sample.guidance_scale=0`.
    """
    config = _family_preset("Tongyi-MAI/Z-Image", "z_image")
    config.sample.guidance_scale = 4.0
    return _checkpointed(config, max_states_per_call=6, decode_chunk=3)


def pickscore_z_image() -> ml_collections.ConfigDict:
    return _task(z_image_tp_grpo(), "pickscore_sfw", pickscore=1.0)


def pickscore_z_image_flow_grpo() -> ml_collections.ConfigDict:
    return _flow_grpo(pickscore_z_image())


def qwen_image_tp_grpo() -> ml_collections.ConfigDict:
    """Qwen-Image (20 B, true CFG) TP-GRPO defaults.

    From Flow-GRPO's Qwen-Image PickScore recipe (config/grpo.py `pickscore_qwenimage_8gpu` of
    yifan123/flow_grpo): 512 x 512, 10 sampling steps, guidance 4 (true CFG), LoRA, activation
    checkpointing, no EMA, bf16. Its 50 evaluation steps are cut to the
    project's 40; LoRA r64/alpha128 and the target list are verl's Qwen-Image Flow-GRPO run's. Our
    choices: noise level 0.7 (the recipe's 1.2 lies outside this codebase's [0, 1] range), the TP-GRPO
    window of SD3 (9 of 10 in (0, 9); the recipe's window of 2 belongs to its fast variant), the
    paper's group and optimiser settings, and 3 trajectories per process per batch (the recipe's 4 do
    not split the paper's 36 per process on 32 GPUs into 2 updates). The recipe shards
    with FSDP; here the memory preflight decides (benchmarks/RESULTS.md): with the transformer replicated
    (38.1 GB in bf16), gradient checkpointing and the Qwen2.5-VL encoder offloaded between encodings the
    peak at 8 processes is 67.8 GB (the rollout's VAE decode and the PickScore call, sampling phase).
    """
    config = _family_preset("Qwen/Qwen-Image", "qwen_image")
    config.sample.guidance_scale = 4.0
    config.train.ema = False
    return _checkpointed(config, max_states_per_call=9, decode_chunk=2)


def pickscore_qwen_image() -> ml_collections.ConfigDict:
    return _task(qwen_image_tp_grpo(), "pickscore_sfw", pickscore=1.0)


def pickscore_qwen_image_flow_grpo() -> ml_collections.ConfigDict:
    return _flow_grpo(pickscore_qwen_image())


_TINY_MODELS = {
    "sd3": TINY_MODEL_DIR, "flux": TINY_FLUX_DIR, "flux2_klein": TINY_FLUX2_KLEIN_DIR, "z_image": TINY_Z_IMAGE_DIR,
    "qwen_image": TINY_QWEN_IMAGE_DIR,
}
_TINY_DATASETS = {"pickscore": "dataset/demo", "geneval": "dataset/demo_geneval", "ocr": "dataset/demo"}
_TINY_STEPS = 4
_TINY_GROUP_SIZE = 3


def _shrink_for_cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `,tiny` modifier: one short CPU epoch of a preset, same switches and batch arithmetic.

    Kept: algorithm and turning-point switches, step kind and noise level, the window relative to
    the step count (steps - window and the distance of the range's end from the last step), the
    per-process sampling and training batch sizes and updates per epoch, the LoRA alpha/rank ratio,
    eval_before_training. Shrunk: the tiny model of the preset's family, 32x32 images, 4 steps,
    groups of 3 and the fewest prompts per epoch that fill the batches on one process, one epoch
    evaluated and saved, few prompts (dataset/demo, dataset/demo_geneval for GenEval). PickScore
    reads a tiny CLIP from `.cache/tiny-clip`; GenEval and OCR stay remote rewards (README, Presets).
    """
    sample, train = config.sample, config.train
    config.pretrained.model = _TINY_MODELS[config.pretrained.family]
    config.pretrained.max_sequence_length = 64
    config.mixed_precision = "no"
    config.report_to = "none"
    for reward in config.reward_fn:
        config.dataset = _TINY_DATASETS.get(reward, config.dataset)
    config.reward_options.pickscore.model = TINY_CLIP_DIR
    config.reward_options.pickscore.processor = TINY_CLIP_DIR
    config.num_epochs = 1
    config.eval_freq = 1
    config.save_freq = 1
    shift = sample.num_steps - _TINY_STEPS
    sample.num_steps = sample.eval_num_steps = _TINY_STEPS
    sample.window_size -= shift
    low, high = sample.window_range
    sample.window_range = (max(0, min(low, high - shift - sample.window_size)), high - shift)
    sample.resolution = 32
    sample.group_size = min(sample.group_size, _TINY_GROUP_SIZE)
    prompts = 1
    while (prompts * sample.group_size) % sample.batch_size or (prompts * sample.group_size) % (
        train.batch_size * train.updates_per_epoch
    ):
        prompts += 1
    sample.prompts_per_epoch = prompts
    train.lora_alpha = train.lora_alpha * 8 // train.lora_rank
    train.lora_rank = 8
    return config


def get_config(name: str) -> ml_collections.ConfigDict:
    """Entry point for `config_flags`: `--config=config/grpo.py:<preset>` or `<preset>,tiny` (`_shrink_for_cpu`)."""
    presets = {
        key: value
        for key, value in globals().items()
        if callable(value) and not key.startswith("_") and key not in ("get_config",)
        and getattr(value, "__module__", None) == __name__
    }
    name, _, modifier = name.partition(",")
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(sorted(presets))}")
    if modifier not in ("", "tiny"):
        raise ValueError(f"unknown preset modifier {modifier!r} in {name},{modifier}; the one modifier is 'tiny'")
    return _shrink_for_cpu(presets[name]()) if modifier else presets[name]()
