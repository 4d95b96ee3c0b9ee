"""Every configuration key, with its default and meaning. Presets live in `config/grpo.py`.

The config is locked: a preset or a command-line override that names a key not defined here fails.
Quantities marked "global" are for the whole job; the per-process split is derived at run time
from the world size (`flow_grpo.run.config_checks.derive_layout`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # ---- run ----
    config.run_name = ""  # name of the run directory and tracker run; empty = "run-YYYYmmdd-HHMMSS" (start time, unused in logdir)
    config.logdir = "logs"  # parent directory of run directories (checkpoints, config.json, tracker files)
    config.seed = 42  # seed of prompt order, initial noise, SDE noise and window positions
    config.algorithm = "tp_grpo"  # "flow_grpo" (final-image reward at every step) or "tp_grpo" (step-wise rewards)
    config.mixed_precision = "fp16"  # accelerate mixed precision: "no", "fp16" or "bf16"; frozen weights use this dtype
    config.allow_tf32 = True  # allow TF32 matrix products on Ampere and newer GPUs
    config.compile = False  # torch.compile the transformer in place (sampling and training use the same numerics)
    config.memory_check = True  # on CUDA, stop at start-up with advice when the predicted peak memory exceeds the device
    config.offload_text_encoders = False  # keep the text encoders on the CPU between prompt encodings (moved back for each encoding)
    config.attention_backend = ""  # diffusers attention backend ("flash", "_native_cudnn", ...); empty = default
    config.num_epochs = 300  # number of sample -> train epochs
    config.save_freq = 30  # write a checkpoint every this many epochs (and after the last one); 0 = only at the end
    config.keep_checkpoints = 3  # keep the newest this many checkpoints of the run; 0 = keep all
    config.resume_from = ""  # run directory (newest checkpoint), checkpoint directory or "latest" to continue from
    config.resume_overwrite = False  # resuming from an older checkpoint continues its run in place (later checkpoints set aside) instead of branching
    config.nonfinite = "stop"  # NaN/inf in rewards, advantages or loss: "stop" the run or "skip" the batch
    config.distributed_timeout_s = 1800  # s, at most 604800: a process with no heartbeat this long (stopped, machine gone) ends the job; collectives time out T + 2*min(T/10, 10) + 10 s
    config.log_images = 8  # eval images in the logged grid and reward curves plotted per eval (main process)
    config.eval_freq = 30  # evaluate every this many epochs (and after the last one); 0 = never
    config.eval_before_training = False  # also evaluate the base model before the first epoch of a fresh run (not on resume)
    config.report_to = "wandb"  # accelerate tracker, installed: "wandb" (WANDB_MODE=offline works), "tensorboard", ... or "none"
    config.project_name = "flow_grpo"  # tracker project name (wandb project)
    config.wandb = wandb = ml_collections.ConfigDict()
    wandb.entity = ""  # wandb entity (user or team); empty = wandb's default
    wandb.group = ""  # wandb run group (e.g. one sweep or ablation); empty = none
    wandb.tags = ()  # wandb run tags, e.g. ("sd3", "pickscore")
    wandb.notes = ""  # wandb run notes
    config.dataset = "dataset/demo"  # directory with train.txt/test.txt or train_metadata.jsonl/test_metadata.jsonl

    # ---- pretrained model ----
    config.pretrained = pretrained = ml_collections.ConfigDict()
    pretrained.model = "stabilityai/stable-diffusion-3.5-medium"  # hub id or local directory of the diffusers pipeline
    pretrained.revision = ""  # hub revision; empty = default branch
    pretrained.family = "sd3"  # model adapter: "sd3" (train_sd3.py) or "flux" (train_flux.py)
    pretrained.max_sequence_length = 128  # T5 prompt length in tokens

    # ---- sampling (rollouts) ----
    config.sample = sample = ml_collections.ConfigDict()
    sample.resolution = 512  # image height and width in pixels
    sample.num_steps = 10  # denoising steps of a training rollout
    sample.eval_num_steps = 40  # denoising steps of evaluation (plain ODE sampling)
    sample.guidance_scale = 4.5  # SD3: classifier-free guidance weight w; FLUX: guidance-embedding value; train and eval
    sample.step_kind = "cps"  # stochastic step of the window: "sde" (Flow-GRPO) or "cps" (coefficients-preserving)
    sample.noise_level = 0.7  # noise level a in [0, 1] of the window steps
    sample.window_size = 9  # number W of stochastic (trained) steps per rollout
    sample.window_range = (0, 9)  # window start s is drawn from U{r0, ..., r1 - W} per sampling batch
    sample.group_size = 24  # global: images per prompt in an epoch (G)
    sample.prompts_per_epoch = 48  # global: distinct prompt groups per epoch
    sample.batch_size = 9  # per process: trajectories per sampling batch
    sample.eval_batch_size = 8  # per process: prompts per evaluation batch
    sample.max_states_per_call = 0  # bound on states in one transformer call (chunks bigger ones); 0 = no bound
    sample.decode_chunk = 9  # images per VAE decode call in training rollouts (all completions of a batch are decoded in chunks); 0 = one call
    sample.state_buckets = ()  # pad each transformer call's states up to one of these sizes (few shapes for compile); () = off

    # ---- TP-GRPO step rewards ----
    config.tp = tp = ml_collections.ConfigDict()
    tp.consistent = True  # require the consistency condition K_j for turning points (paper's stricter definition)
    tp.first_step = True  # apply the initial-step rule to window step 0
    tp.balance = True  # balance positive and negative turning points over the epoch batch
    tp.completion_steps = 0  # Euler steps completing each window state to sigma 0: 0 = exact (the paper), k >= 1 = at most k on evenly spaced indices of the remaining grid (docs/algorithm.md, Completion modes)

    # ---- training ----
    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 9  # per process: trajectories per training micro-batch
    train.updates_per_epoch = 2  # optimizer updates per epoch (gradient accumulation is derived)
    train.learning_rate = 3e-4  # AdamW learning rate
    train.adam_beta1 = 0.9  # AdamW beta1
    train.adam_beta2 = 0.999  # AdamW beta2
    train.adam_weight_decay = 1e-4  # AdamW weight decay
    train.adam_epsilon = 1e-8  # AdamW epsilon
    train.max_grad_norm = 1.0  # gradient-norm clip; 0 = no clipping
    train.clip_range = 1e-5  # PPO ratio clip epsilon
    train.adv_clip_max = 5.0  # advantages are clipped to +-this
    train.global_std = False  # normalise advantages by the batch std instead of the group std
    train.beta = 1e-4  # weight of the KL to the LoRA-disabled reference; 0 skips the reference pass
    train.lora_rank = 32  # LoRA rank r
    train.lora_alpha = 64  # LoRA alpha
    train.ema = True  # keep an EMA of the LoRA weights, used for evaluation and saving
    train.ema_decay = 0.9  # EMA decay; at optimizer step k the decay is min(ema_decay, (1 + k) / (10 + k))
    train.ema_every = 8  # update the EMA after optimizer step k when (k + 1) % ema_every == 0
    train.gradient_checkpointing = False  # recompute activations in the backward pass to save memory

    # ---- rewards ----
    config.reward_fn = ml_collections.ConfigDict({"jpeg_compressibility": 1.0})  # training reward {name: weight}
    config.eval_reward_fn = ml_collections.ConfigDict({"jpeg_compressibility": 1.0})  # eval rewards {name: weight}
    config.allow_negative_reward_weights = False  # permit negative training reward weights (trains against that reward)
    # Per-reward settings (model paths, dtypes, server URLs), one sub-dict per reward name.
    config.reward_options = reward_options = ml_collections.ConfigDict()
    reward_options.pickscore = ml_collections.ConfigDict()
    reward_options.pickscore.model = "yuvalkirstain/PickScore_v1"  # hub id or local directory of the PickScore CLIPModel
    reward_options.pickscore.processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # hub id or directory of its CLIP processor
    reward_options.pickscore.dtype = "auto"  # model dtype: "auto" (float16 on CUDA, else float32), "float32", "float16", "bfloat16"
    reward_options.pickscore.batch_size = 64  # images per model call (bigger batches are scored in chunks)
    reward_options.clipscore = ml_collections.ConfigDict()
    reward_options.clipscore.model = "openai/clip-vit-large-patch14"  # hub id or local directory of the CLIPModel
    reward_options.clipscore.processor = ""  # hub id or directory of the CLIP processor; empty = same as model
    reward_options.clipscore.dtype = "auto"  # model dtype: "auto", "float32", "float16", "bfloat16"
    reward_options.clipscore.batch_size = 64  # images per model call
    # clipscore_hessel: CLIPScore as Hessel et al. define it (clipscore is the public code's logit / 30).
    reward_options.clipscore_hessel = ml_collections.ConfigDict()
    reward_options.clipscore_hessel.model = "openai/clip-vit-large-patch14"  # hub id or local directory of the CLIPModel
    reward_options.clipscore_hessel.processor = ""  # hub id or directory of the CLIP processor; empty = same as model
    reward_options.clipscore_hessel.dtype = "auto"  # model dtype: "auto", "float32", "float16", "bfloat16"
    reward_options.clipscore_hessel.batch_size = 64  # images per model call
    reward_options.clipscore_hessel.scale = 2.5  # w in CLIPScore = w * max(cos(image, prompt), 0)
    reward_options.aesthetic = ml_collections.ConfigDict()
    reward_options.aesthetic.model = "openai/clip-vit-large-patch14"  # hub id or directory of the CLIP ViT-L/14 backbone
    reward_options.aesthetic.processor = ""  # hub id or directory of the CLIP processor; empty = same as model
    reward_options.aesthetic.head = "assets/sac+logos+ava1-l14-linearMSE.pth"  # LAION aesthetic MLP weights: file or "<org>/<repo>:<file>"
    reward_options.aesthetic.dtype = "auto"  # backbone dtype: "auto", "float32", "float16", "bfloat16" (the head runs in float32)
    reward_options.aesthetic.batch_size = 64  # images per model call
    reward_options.hpsv2 = ml_collections.ConfigDict()
    reward_options.hpsv2.architecture = "ViT-H-14"  # open_clip architecture of the checkpoint
    reward_options.hpsv2.checkpoint = "xswu/HPSv2:HPS_v2.1_compressed.pt"  # HPS v2.1 weights: file or "<org>/<repo>:<file>"
    reward_options.hpsv2.dtype = "auto"  # model dtype: "auto", "float32", "float16", "bfloat16"
    reward_options.hpsv2.batch_size = 64  # images per model call
    reward_options.imagereward = ml_collections.ConfigDict()
    reward_options.imagereward.checkpoint = "THUDM/ImageReward:ImageReward.pt"  # ImageReward weights: file or "<org>/<repo>:<file>"
    reward_options.imagereward.med_config = "THUDM/ImageReward:med_config.json"  # its BERT config: file or "<org>/<repo>:<file>"
    reward_options.imagereward.tokenizer = "bert-base-uncased"  # hub id or directory of the BERT tokenizer
    reward_options.imagereward.dtype = "float32"  # model dtype (the authors score in float32); the head runs in float32
    reward_options.imagereward.batch_size = 32  # images per model call
    reward_options.hpsv3 = ml_collections.ConfigDict()
    reward_options.hpsv3.checkpoint = "MizzenAI/HPSv3:HPSv3.safetensors"  # HPSv3 weights: file or "<org>/<repo>:<file>"
    reward_options.hpsv3.base_model = "Qwen/Qwen2-VL-7B-Instruct"  # hub id or directory: config and processor only
    reward_options.hpsv3.dtype = "auto"  # "auto" (bfloat16 on CUDA as the authors, else float32), "float32", "float16", "bfloat16"
    reward_options.hpsv3.batch_size = 8  # images per model call
    # Remote rewards: "remote" asks the server for `scorer`; the named ones ask for a fixed scorer
    # (geneval, geneval_strict, geneval_correct: "geneval"; ocr, ocr_exact, unifiedreward, deqa: their own name).
    for remote_name in ("remote", "geneval", "geneval_strict", "geneval_correct", "ocr", "ocr_exact", "unifiedreward", "deqa"):
        remote = reward_options[remote_name] = ml_collections.ConfigDict()
        remote.url = "http://127.0.0.1:18085"  # base URL of the reward server (scripts/reward_server.py)
        remote.scorer = ""  # scorer name asked of the server; empty = the reward's own name (required for "remote")
        remote.timeout = 120.0  # seconds to wait for one HTTP request
        remote.max_retries = 2  # retries after a connection failure, timeout or HTTP 429/5xx
        remote.backoff = 1.0  # seconds before the first retry, doubled at each further retry
        remote.batch_size = 64  # images per HTTP request
        remote.image_format = "auto"  # image encoding: "auto" (raw for a loopback server, png otherwise), "png" or "raw"
        remote.check_health = True  # ask the server's /health when the reward is built, to fail before training

    config.lock()
    return config
