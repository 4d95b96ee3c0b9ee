"""The model-agnostic training loop: sample -> score -> step rewards -> advantages -> train -> eval -> save.

One `Trainer` serves every model family: all model specifics go through the `ModelAdapter`.
Epoch layout (docs/algorithm.md): each process samples its share of the epoch's
`prompts_per_epoch x group_size` trajectories, rewards are gathered from all processes so groups
and turning-point balancing see the whole epoch batch, then each process trains on its own
trajectories with `train.updates_per_epoch` optimizer updates.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import ml_collections
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from flow_grpo.run import pictures, trackers
from flow_grpo.algorithm.advantages import informative_rows
from flow_grpo.training.memory import preflight
from flow_grpo.training.compile import compile_phases
from flow_grpo.run.config_checks import Layout, check_numbers, validate_config
from flow_grpo.data import GroupSampler, PromptDataset, dataset_paths
from flow_grpo.training.ema import ParameterEMA
from flow_grpo.training.distributed import check_supported_backend
from flow_grpo.training.heartbeat import collective_timeout
from flow_grpo.training.credit import epoch_credit
from flow_grpo.training.epoch import EpochSamples, sample_epoch
from flow_grpo.sampling.evaluation import EvalResult, evaluate
from flow_grpo.sampling.generation import plan_jobs
from flow_grpo.models import load_adapter
from flow_grpo.training.state import restore_state, save_state
from flow_grpo.training.step import UpdateStep, add_lora, loss_settings, training_step
from flow_grpo.precision import mixed_precision_dtype
from flow_grpo.rewards import build_reward
from flow_grpo.run.directory import append_metrics, default_run_name, plan_run, prepare, wandb_id
from flow_grpo.run.files import open_to_write, refuse_symlink
from flow_grpo.seeding import derived_seed
from flow_grpo.algorithm.turning_points import StepRewards

logger = get_logger(__name__)

TRAIN_STATS = ("loss", "policy_loss", "kl", "approx_kl", "clip_fraction", "ratio_mean")
"""`LossOutput` fields averaged into the `train/` metrics."""


def use_cpu() -> bool:
    """Run on the CPU: no CUDA/MPS device, or ACCELERATE_USE_CPU set (as `accelerate launch --cpu` does).

    accelerate only sets up a multi-process CPU job (gloo) when told it runs on the CPU.
    """
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or not (torch.cuda.is_available() or torch.backends.mps.is_available())


def process_state(config: ml_collections.ConfigDict) -> PartialState:
    """accelerate's process state; the first call of a process starts the process group.

    Its collectives time out after `heartbeat.collective_timeout(config.distributed_timeout_s)`
    (the config's numbers are checked first). accelerate applies a timeout only when it starts the
    group, so this must be the first `PartialState` of a training process.
    """
    check_numbers(config)
    return PartialState(cpu=use_cpu(), timeout=collective_timeout(config.distributed_timeout_s))


class NonFiniteError(FloatingPointError):
    """NaN or inf in a reward, an advantage or the loss, with `config.nonfinite = "stop"`."""


class Trainer:
    """Flow-GRPO / TP-GRPO training of LoRA adapters on a flow-matching model."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        """Validate the config, then set up accelerate, the model with LoRA, optimizer, data and rewards."""
        check_supported_backend()
        self.config = config
        state = process_state(config)
        world_size = state.num_processes
        self.layout: Layout = validate_config(config, world_size)
        preflight(config, world_size, state.device)  # CUDA only; before any weights are loaded
        self.plan = plan_run(config, config.run_name or default_run_name(config.logdir))
        self.run_dir = self.plan.run_dir
        PartialState().wait_for_everyone()  # every process has planned before the main one writes
        self.accelerator = self._setup_accelerator(self.plan.run_name)
        accelerator = self.accelerator
        logger.info(f"run directory {self.run_dir}; layout {self.layout}")

        self.train_dataset = PromptDataset.from_file(dataset_paths(config.dataset, "train"))
        self.test_dataset = PromptDataset.from_file(dataset_paths(config.dataset, "test")) if config.eval_freq else None
        self.sampler = GroupSampler(
            num_prompts=len(self.train_dataset),
            prompts_per_epoch=config.sample.prompts_per_epoch,
            group_size=config.sample.group_size,
            world_size=accelerator.num_processes,
            rank=accelerator.process_index,
            batch_size=config.sample.batch_size,
            seed=config.seed,
        )
        # One model per reward name, shared by the training and the evaluation reward. Built before the
        # generator, so a missing reward weights file fails in seconds; `add_lora` seeds its own draws.
        built = build_reward(
            {**dict(config.eval_reward_fn), **dict(config.reward_fn)}, accelerator.device, config.reward_options.to_dict()
        )
        self._setup_model()
        self.reward = built.select(dict(config.reward_fn))
        self.eval_reward = built.select(dict(config.eval_reward_fn))
        grid = self.adapter.sigmas(config.sample.num_steps, config.sample.resolution)
        self.loss_settings = loss_settings(config, sigma_max=float(grid[1]))
        self.start_epoch = 0
        self.sampling_seconds = 0.0
        self.last_curves: tuple[torch.Tensor, StepRewards] | None = None  # completed rewards (B, W+1), step rewards
        self.last_eval: tuple[int, dict[str, float]] | None = None  # (epoch, eval means) of the newest evaluation
        self.history: list[dict[str, float]] = []
        if self.plan.checkpoint is not None:
            restore_state(self, self.plan.checkpoint, self.plan.state)
            self.plan.state = None  # release the loaded copy

    def _setup_accelerator(self, run_name: str) -> Accelerator:
        """The accelerator (mixed precision, accumulation, tracker); the main process writes `config.json`."""
        config = self.config
        accelerator = Accelerator(
            cpu=use_cpu(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=self.layout.gradient_accumulation_steps,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(project_dir=self.run_dir, logging_dir=self.run_dir),
        )
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        if accelerator.is_main_process:
            prepare(self.plan, config)
        accelerator.wait_for_everyone()
        if config.report_to != "none":
            kwargs = trackers.init_kwargs(config, run_name, self.run_dir)
            if accelerator.is_main_process and config.report_to == "wandb":  # only the main process runs a tracker
                kwargs["wandb"] |= {"id": wandb_id(self.plan), "resume": "allow"}
            accelerator.init_trackers(config.project_name, config=trackers.tracker_config(config), init_kwargs=kwargs)
        return accelerator

    def _setup_model(self) -> None:
        """The adapter with the LoRA, the run-time options, the prepared model and optimizer, EMA and update step."""
        config, accelerator, train = self.config, self.accelerator, self.config.train
        self.adapter = load_adapter(config, accelerator.device, mixed_precision_dtype(config.mixed_precision))
        transformer = self.adapter.transformer
        self.trainable = add_lora(transformer, train.lora_rank, train.lora_alpha, self.adapter.lora_target_modules, config.seed)
        self.trainable_names = [name for name, p in transformer.named_parameters() if p.requires_grad]
        if train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if config.attention_backend:
            transformer.set_attention_backend(config.attention_backend)
        optimizer = torch.optim.AdamW(
            self.trainable,
            lr=train.learning_rate,
            betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.adam_weight_decay,
            eps=train.adam_epsilon,
        )
        self.model, self.optimizer = accelerator.prepare(transformer, optimizer)
        # One compiled callable per phase (rollout and evaluation, policy, reference), or none: eager throughout.
        self.compiled = compile_phases(config, self.adapter, self.model) if config.compile else None
        self.ema = ParameterEMA(self.trainable, decay=train.ema_decay, every=train.ema_every) if train.ema else None
        self.update_step = UpdateStep(accelerator, self.optimizer, self.trainable, max_grad_norm=train.max_grad_norm, ema=self.ema)

    @property
    def optimizer_updates(self) -> int:
        """Optimizer updates applied so far (restored on resume; the EMA schedule counts them)."""
        return self.update_step.updates

    @optimizer_updates.setter
    def optimizer_updates(self, value: int) -> None:
        self.update_step.updates = value

    # ------------------------------------------------------------------ sampling
    @property
    def is_tp(self) -> bool:
        return self.config.algorithm == "tp_grpo"

    def sample_epoch(self, epoch: int) -> EpochSamples:
        """Run this process's rollouts of `epoch` and score them (scoring overlaps the next batch)."""
        samples = sample_epoch(
            self.config, self.accelerator, self.adapter, self.reward, self.train_dataset, self.sampler.plan(epoch), epoch
        )
        self.sampling_seconds = samples.sampling_seconds
        return samples

    # ---------------------------------------------------------------- advantages
    def _nonfinite(self, epoch: int, quantity: str) -> None:
        """Apply `config.nonfinite` to a NaN/inf `quantity`: raise, or log that the batch is skipped."""
        message = f"epoch {epoch}: non-finite {quantity}"
        if self.config.nonfinite == "stop":
            raise NonFiniteError(message + " (config.nonfinite='stop'; no checkpoint is written for this epoch)")
        logger.warning(message + "; skipped (config.nonfinite='skip')")

    def advantages(self, epoch: int, samples: EpochSamples) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Advantages (Bp, W) of this process's trajectories, normalised over the gathered epoch batch.

        Returns None instead of advantages when the rewards or advantages are not finite and
        `config.nonfinite == "skip"` (every process decides alike: they see the same gathered data).
        """
        credit = epoch_credit(self.config, self.accelerator, samples, self.reward.detail_names)
        if credit.step_rewards is not None:
            self.last_curves = (credit.scored, credit.step_rewards)
        for quantity, value in (("rewards", credit.scored), ("advantages", credit.advantages)):
            if not torch.isfinite(value).all():
                self._nonfinite(epoch, quantity)
                return None, credit.metrics
        rows = samples.group_ids.shape[0]
        start = self.accelerator.process_index * rows
        return credit.advantages[start : start + rows], credit.metrics

    # ------------------------------------------------------------------ training
    def train_epoch(self, epoch: int, samples: EpochSamples, advantages: torch.Tensor) -> dict[str, float]:
        """`train.updates_per_epoch` optimizer updates over this process's trajectories and window steps.

        Trajectories with a zero advantage at every window step are dropped first
        (`advantages.informative_rows`): the configured number of micro-batches (Bp /
        `train.batch_size`) stays, so every process takes the same optimizer steps, and they shrink
        to equal parts of the kept, shuffled trajectories; the loss is a mean over the kept ones.
        Each micro-batch is trained on every window step (`policy.training_step`);
        `policy.UpdateStep` applies an update at each accumulation boundary.
        """
        config, accelerator = self.config, self.accelerator
        generator = torch.Generator().manual_seed(derived_seed(config.seed, epoch, accelerator.process_index, -1))
        order = torch.randperm(samples.group_ids.shape[0], generator=generator).to(accelerator.device)
        num_micro_batches = samples.group_ids.shape[0] // config.train.batch_size
        kept = torch.zeros_like(order, dtype=torch.bool)
        kept[informative_rows(advantages, num_micro_batches, generator)] = True
        order = order[kept[order]]  # the shuffled order, restricted to the kept rows
        unwrapped = accelerator.unwrap_model(self.model)
        stats: dict[str, list[torch.Tensor]] = {}
        first_ratio = None
        self.model.train()
        micro_batches = order.split(order.numel() // num_micro_batches)
        progress = tqdm(
            total=len(micro_batches) * config.sample.window_size,
            desc=f"epoch {epoch}: training",
            disable=not accelerator.is_local_main_process,
            leave=False,
        )
        for rows in micro_batches:
            for j, batch in enumerate(samples.window_batches(rows)):
                with accelerator.accumulate(self.model):
                    out = training_step(
                        self.adapter,
                        self.model,
                        unwrapped,
                        batch,
                        advantages[rows, j],
                        self.loss_settings,
                        accelerator.autocast,
                        compiled=self.compiled,
                    )
                    if first_ratio is None:
                        first_ratio = out.ratio_mean.detach()
                    self.update_step.backward(out.loss, on_nonfinite=lambda: self._nonfinite(epoch, "loss"))
                for key in TRAIN_STATS:
                    stats.setdefault(key, []).append(getattr(out, key).detach())
                progress.update()
        progress.close()
        self.model.eval()
        metrics = {f"train/{key}": accelerator.reduce(torch.stack(values).mean(), "mean").item() for key, values in stats.items()}
        metrics["train/ratio_first"] = accelerator.reduce(first_ratio, "mean").item()
        kept_fraction = torch.tensor(order.numel() / kept.numel(), device=accelerator.device)
        metrics["train/kept_fraction"] = accelerator.reduce(kept_fraction, "mean").item()
        metrics["train/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    # ------------------------------------------------------------ eval and save
    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        """ODE sampling on the test prompts (EMA weights if enabled), scored with every eval reward.

        The main process also writes a grid of its first `config.log_images` images with their
        prompts and scores to `images/` and to the tracker.
        """
        config, accelerator = self.config, self.accelerator
        with self.ema_weights():
            result = self.score_test_prompts(config.log_images)
        if accelerator.is_main_process and result.images:
            images, prompts, scores = torch.stack([kept[0] for kept in result.images]), *zip(*[kept[1:] for kept in result.images])
            captions = [f"{prompt} | {score:.4f}" for prompt, score in zip(prompts, scores)]
            self._log_image(epoch, "eval_images", pictures.image_grid(images, prompts=prompts, scores=scores), captions)
            trackers.log_eval_samples(accelerator, config.report_to, images, prompts, scores, max(epoch, 0))
        # Means over the finite scores; a reward with none left is reported only by its count.
        metrics = {f"eval/{name}": value for name, value in result.means.items() if math.isfinite(value)}
        self.last_eval = (epoch, dict(result.means))
        return metrics | {f"eval/{name}_nonfinite": float(n) for name, n in result.nonfinite.items() if n}

    @torch.no_grad()
    def score_test_prompts(self, keep_images: int) -> EvalResult:
        """ODE-sample every test prompt once with the current weights and score it with the eval rewards.

        Each batch's seed derives from `config.seed` and its first prompt; keeps the first `keep_images` images.
        """
        config = self.config
        return evaluate(
            self.adapter,
            self.eval_reward,
            plan_jobs(self.test_dataset.prompts, 1, config.seed),
            config.sample,
            batch_seed=lambda batch: derived_seed(config.seed, batch[0].prompt_index),
            autocast=self.accelerator.autocast,
            keep_images=keep_images,
        )

    def _log_image(self, epoch: int, name: str, image, captions: list[str] | None = None) -> None:
        """Save a PIL image to `<run>/images/<name>_epoch_XXXXX.png` and send it to the tracker.

        Epoch -1 (before training) is saved as `<name>_before_training.png`, sent at step 0.
        """
        directory = os.path.join(self.run_dir, "images")
        refuse_symlink(directory)
        os.makedirs(directory, exist_ok=True)
        stem = os.path.join(directory, f"{name}_before_training" if epoch < 0 else f"{name}_epoch_{epoch:05d}")
        with open_to_write(stem + ".png", "wb") as f:
            image.save(f, format="PNG")
        if captions is not None:
            with open_to_write(stem + ".txt", "w") as f:
                f.write("\n".join(captions) + "\n")
        caption = " || ".join(captions) if captions else None
        trackers.log_image(self.accelerator, self.config.report_to, name, image, max(epoch, 0), caption)

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """The EMA weights swapped into the model for the block (evaluation, export); no-op without EMA."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def save_checkpoint(self, epoch: int) -> str:
        """Write the checkpoint after `epoch` (`flow_grpo.training.state.save_state`); returns its directory."""
        return save_state(self, epoch)

    # ---------------------------------------------------------------------- loop
    def train(self) -> list[dict[str, float]]:
        """Run epochs `start_epoch ... config.num_epochs - 1`; returns their metrics.

        Each epoch's metrics are appended to `<run>/metrics.jsonl` as soon as the epoch ends, before
        its checkpoint is written (`time/epoch` does not include the checkpoint). With
        `config.eval_before_training`, a fresh run first evaluates the initial LoRA (the base model)
        and records it as epoch -1, sent to the tracker at step 0 before epoch 0's metrics.
        """
        config, accelerator = self.config, self.accelerator
        if config.eval_before_training and self.start_epoch == 0:
            metrics = {"epoch": -1, **self.evaluate(-1)}
            accelerator.log(metrics, step=0)
            if accelerator.is_main_process:
                append_metrics(self.run_dir, metrics)
            logger.info(f"before training | eval {metrics.get('eval/avg', float('nan')):.4f}", main_process_only=True)
        run_started = time.perf_counter()
        for epoch in range(self.start_epoch, config.num_epochs):
            started = time.perf_counter()
            samples = self.sample_epoch(epoch)
            sampled = time.perf_counter()
            advantages, metrics = self.advantages(epoch, samples)
            if advantages is not None:
                metrics.update(self.train_epoch(epoch, samples, advantages))
            trained = time.perf_counter()
            last = epoch == config.num_epochs - 1
            if config.eval_freq and ((epoch + 1) % config.eval_freq == 0 or last):
                metrics.update(self.evaluate(epoch))
                if self.is_tp and accelerator.is_main_process and config.log_images:
                    completed, steps = self.last_curves
                    self._log_image(epoch, "reward_curves", trackers.reward_curves_image(completed, steps, epoch, min(config.log_images, 6)))
                    trackers.log_histograms(accelerator, config.report_to, {"tp/d_j": steps.incremental, "tp/g_j": steps.aggregated}, epoch)
            metrics.update(
                {
                    "epoch": epoch,
                    "time/sampling": self.sampling_seconds,
                    "time/scoring_wait": sampled - started - self.sampling_seconds,
                    "time/training": trained - sampled,
                    "time/epoch": time.perf_counter() - started,
                }
            )
            if self.compiled is not None:  # graphs may appear in the first epoch and at the first evaluation
                first_eval = "eval/avg" in metrics and not any("eval/avg" in h for h in self.history)
                metrics.update(self.compiled.check(epoch, epoch == self.start_epoch or first_eval))
            self.history.append(metrics)
            # The line goes out before the checkpoint is published: a kill after publishing never
            # leaves a checkpoint without its line (a resume from an older one cuts the extra line).
            if accelerator.is_main_process:
                append_metrics(self.run_dir, metrics)
            if last or (config.save_freq and (epoch + 1) % config.save_freq == 0):
                self.save_checkpoint(epoch)
            accelerator.log(metrics, step=epoch)
            logger.info(trackers.epoch_line(metrics, self.is_tp), main_process_only=True)
            progress = trackers.progress_line(epoch, self.start_epoch, config.num_epochs, time.perf_counter() - run_started)
            logger.info(progress, main_process_only=True)
        accelerator.end_training()
        return self.history

