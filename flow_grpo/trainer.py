"""The model-agnostic training loop: sample -> score -> step rewards -> advantages -> train -> eval -> save.

One `Trainer` serves every model family: all model specifics go through the `ModelAdapter`.
Epoch layout (ALGORITHM.md sections 3-6): each process samples its share of the epoch's
`prompts_per_epoch x group_size` trajectories, rewards are gathered from all processes so groups
and turning-point balancing see the whole epoch batch, then each process trains on its own
trajectories with `train.updates_per_epoch` optimizer updates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass

import ml_collections
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from flow_grpo.advantages import broadcast_to_steps, group_advantages
from flow_grpo.config_checks import Layout, validate_config
from flow_grpo.data import GroupSampler, PromptDataset, dataset_paths
from flow_grpo.ema import ParameterEMA
from flow_grpo.losses import grpo_loss
from flow_grpo.models import PromptBatch, load_adapter
from flow_grpo.rewards import AsyncScorer, build_reward
from flow_grpo.sampling import draw_window_start, rollout, sample_ode
from flow_grpo.sde import stochastic_step
from flow_grpo.turning_points import step_rewards, summarize

logger = get_logger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def derived_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, epoch, rank, batch ...), stable across runs."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class EpochSamples:
    """Everything one process keeps from an epoch's rollouts (Bp trajectories, W window steps).

    Attributes:
        prompts: encoded prompts, Bp rows.
        latents, next_latents: (Bp, W, ...) window states.
        log_probs, sigmas, next_sigmas: (Bp, W).
        group_ids: (Bp,) int64 prompt group of each trajectory.
        rewards: name -> (Bp,) final-image reward (and "avg", the weighted sum).
        completed_rewards: (Bp, W+1) weighted rewards R_0 ... R_W (TP-GRPO only).
    """

    prompts: PromptBatch
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    next_sigmas: torch.Tensor
    group_ids: torch.Tensor
    rewards: dict[str, torch.Tensor]
    completed_rewards: torch.Tensor | None


class Trainer:
    """Flow-GRPO / TP-GRPO training of LoRA adapters on a flow-matching model."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        """Validate the config, then set up accelerate, the model with LoRA, optimizer, data and rewards."""
        self.config = config
        world_size = PartialState().num_processes
        self.layout: Layout = validate_config(config, world_size)
        run_name = config.run_name or time.strftime("run-%Y%m%d-%H%M%S")
        self.run_dir = os.path.join(config.logdir, run_name)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=self.layout.gradient_accumulation_steps,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(project_dir=self.run_dir),
        )
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        accelerator = self.accelerator
        if accelerator.is_main_process:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                f.write(config.to_json(indent=2))
        if config.report_to != "none":
            accelerator.init_trackers(config.project_name, config=config.to_dict(), init_kwargs={"wandb": {"name": run_name}})
        logger.info(f"run directory {self.run_dir}; layout {self.layout}")

        self.train_dataset = PromptDataset.from_file(dataset_paths(config.dataset, "train"))
        self.test_dataset = PromptDataset.from_file(dataset_paths(config.dataset, "test"))
        self.sampler = GroupSampler(
            num_prompts=len(self.train_dataset),
            prompts_per_epoch=config.sample.prompts_per_epoch,
            group_size=config.sample.group_size,
            world_size=accelerator.num_processes,
            rank=accelerator.process_index,
            batch_size=config.sample.batch_size,
            seed=config.seed,
        )

        dtype = DTYPES[config.mixed_precision]
        self.adapter = load_adapter(config, accelerator.device, dtype)
        transformer = self.adapter.transformer
        transformer.requires_grad_(False)
        transformer.add_adapter(
            LoraConfig(
                r=config.train.lora_rank,
                lora_alpha=config.train.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=self.adapter.lora_target_modules,
            )
        )
        self.trainable = [p for p in transformer.parameters() if p.requires_grad]
        for param in self.trainable:
            param.data = param.data.float()  # LoRA in float32, frozen base in the compute dtype
        if config.train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(
            self.trainable,
            lr=config.train.learning_rate,
            betas=(config.train.adam_beta1, config.train.adam_beta2),
            weight_decay=config.train.adam_weight_decay,
            eps=config.train.adam_epsilon,
        )
        self.model, self.optimizer = accelerator.prepare(transformer, optimizer)
        self.ema = (
            ParameterEMA(self.trainable, decay=config.train.ema_decay, every=config.train.ema_every)
            if config.train.ema
            else None
        )
        # One model per reward name, shared by the training and the evaluation reward.
        built = build_reward(
            {**dict(config.eval_reward_fn), **dict(config.reward_fn)}, accelerator.device, config.reward_options.to_dict()
        )
        self.reward = built.select(dict(config.reward_fn))
        self.eval_reward = built.select(dict(config.eval_reward_fn))
        self.sigma_max = float(self.adapter.sigmas(config.sample.num_steps, config.sample.resolution)[1])
        self.optimizer_updates = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ sampling
    @property
    def is_tp(self) -> bool:
        return self.config.algorithm == "tp_grpo"

    def _texts(self, dataset: PromptDataset, indices: list[int]) -> tuple[list[str], list[dict]]:
        prompts = [dataset[i] for i in indices]
        return [p.text for p in prompts], [dict(p.metadata) for p in prompts]

    @torch.no_grad()
    def sample_epoch(self, epoch: int) -> EpochSamples:
        """Run this process's rollouts of `epoch` and score them (scoring overlaps the next batch)."""
        config, accelerator, adapter = self.config, self.accelerator, self.adapter
        sample = config.sample
        plan = self.sampler.plan(epoch)
        pending = []
        batches = []
        with AsyncScorer(self.reward) as scorer:
            for i in tqdm(range(plan.num_batches), desc=f"epoch {epoch}: sampling", disable=not accelerator.is_local_main_process, leave=False):
                texts, metadata = self._texts(self.train_dataset, plan.dataset_indices[i].tolist())
                embeds = adapter.encode_prompts(texts)
                generator = torch.Generator(accelerator.device).manual_seed(
                    derived_seed(config.seed, epoch, accelerator.process_index, i)
                )
                window_start = draw_window_start(generator, tuple(sample.window_range), sample.window_size)
                with accelerator.autocast():
                    result = rollout(
                        adapter,
                        embeds,
                        num_steps=sample.num_steps,
                        resolution=sample.resolution,
                        window_start=window_start,
                        window_size=sample.window_size,
                        noise_level=sample.noise_level,
                        step_kind=sample.step_kind,
                        branches=self.is_tp,
                        generator=generator,
                        max_states_per_call=sample.max_states_per_call,
                    )
                if self.is_tp:
                    per_image = sample.window_size + 1
                    images = result.completed_images.flatten(0, 1)
                    texts = [t for t in texts for _ in range(per_image)]
                    metadata = [m for m in metadata for _ in range(per_image)]
                else:
                    images = result.images
                pending.append(scorer.submit(images.detach(), texts, metadata))  # rewards move images where they run
                batches.append((embeds, result, plan.group_ids[i]))
            scores = [future.result() for future in pending]
        device = accelerator.device
        rewards: dict[str, list[torch.Tensor]] = {}
        completed = []
        for score in scores:
            for name, value in score.items():
                value = value.to(device)
                if self.is_tp:
                    value = value.view(-1, sample.window_size + 1)
                    if name == "avg":
                        completed.append(value)
                    value = value[:, -1]  # R_W: the final image
                rewards.setdefault(name, []).append(value)
        return EpochSamples(
            prompts=PromptBatch.cat([b[0] for b in batches]),
            latents=torch.cat([b[1].latents for b in batches]),
            next_latents=torch.cat([b[1].next_latents for b in batches]),
            log_probs=torch.cat([b[1].log_probs for b in batches]),
            sigmas=torch.cat([b[1].sigmas for b in batches]),
            next_sigmas=torch.cat([b[1].next_sigmas for b in batches]),
            group_ids=torch.cat([b[2] for b in batches]).to(device),
            rewards={name: torch.cat(values) for name, values in rewards.items()},
            completed_rewards=torch.cat(completed) if self.is_tp else None,
        )

    # ---------------------------------------------------------------- advantages
    def advantages(self, samples: EpochSamples) -> tuple[torch.Tensor, dict[str, float]]:
        """Advantages (Bp, W) of this process's trajectories, normalised over the gathered epoch batch."""
        config, accelerator = self.config, self.accelerator
        group_ids = accelerator.gather(samples.group_ids)
        metrics: dict[str, float] = {}
        for name, value in samples.rewards.items():
            metrics[f"reward/{name}"] = accelerator.gather(value).float().mean().item()
        if self.is_tp:
            completed = accelerator.gather(samples.completed_rewards)
            result = step_rewards(
                completed, consistent=config.tp.consistent, first_step=config.tp.first_step, balance=config.tp.balance
            )
            advantages = group_advantages(
                result.rewards, group_ids, adv_clip_max=config.train.adv_clip_max, global_std=config.train.global_std
            )
            metrics.update({f"tp/{key}": value for key, value in summarize(result).items()})
            metrics["reward/baseline_R0"] = completed[:, 0].mean().item()
        else:
            final = accelerator.gather(samples.rewards["avg"])
            advantages = broadcast_to_steps(
                group_advantages(final, group_ids, adv_clip_max=config.train.adv_clip_max, global_std=config.train.global_std),
                config.sample.window_size,
            )
        rows = samples.group_ids.shape[0]
        start = accelerator.process_index * rows
        return advantages[start : start + rows], metrics

    # ------------------------------------------------------------------ training
    def _policy_step(self, samples: EpochSamples, rows: torch.Tensor, j: int, transformer: torch.nn.Module):
        sample = self.config.sample
        latents, sigmas = samples.latents[rows, j], samples.sigmas[rows, j]
        velocity = self.adapter.velocity(latents, sigmas, samples.prompts.select(rows), transformer)
        return stochastic_step(
            sample.step_kind,
            velocity,
            latents,
            sigmas,
            samples.next_sigmas[rows, j],
            sample.noise_level,
            sigma_max=self.sigma_max,
            next_latents=samples.next_latents[rows, j],
        )

    def train_epoch(self, epoch: int, samples: EpochSamples, advantages: torch.Tensor) -> dict[str, float]:
        """`train.updates_per_epoch` optimizer updates over this process's trajectories and window steps."""
        config, accelerator = self.config, self.accelerator
        train = config.train
        generator = torch.Generator().manual_seed(derived_seed(config.seed, epoch, accelerator.process_index, -1))
        order = torch.randperm(samples.group_ids.shape[0], generator=generator).to(accelerator.device)
        unwrapped = accelerator.unwrap_model(self.model)
        stats: dict[str, list[torch.Tensor]] = {}
        first_ratio = None
        self.model.train()
        micro_batches = order.split(train.batch_size)
        progress = tqdm(
            total=len(micro_batches) * config.sample.window_size,
            desc=f"epoch {epoch}: training",
            disable=not accelerator.is_local_main_process,
            leave=False,
        )
        for rows in micro_batches:
            for j in range(config.sample.window_size):
                with accelerator.accumulate(self.model):
                    with accelerator.autocast():
                        step = self._policy_step(samples, rows, j, self.model)
                        reference_mean = None
                        if train.beta > 0:
                            with torch.no_grad():
                                unwrapped.disable_adapters()
                                reference_mean = self._policy_step(samples, rows, j, unwrapped).mean
                                unwrapped.enable_adapters()
                    out = grpo_loss(
                        step.log_prob,
                        samples.log_probs[rows, j],
                        advantages[rows, j],
                        clip_range=train.clip_range,
                        beta=train.beta,
                        mean=step.mean,
                        reference_mean=reference_mean,
                        std=step.std,
                    )
                    if first_ratio is None:
                        first_ratio = out.ratio_mean.detach()
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and train.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(self.trainable, train.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                    if accelerator.sync_gradients:
                        self.optimizer_updates += 1
                        if self.ema is not None:
                            self.ema.step(self.optimizer_updates)
                for key in ("loss", "policy_loss", "kl", "approx_kl", "clip_fraction", "ratio_mean"):
                    stats.setdefault(key, []).append(getattr(out, key).detach())
                progress.update()
        progress.close()
        self.model.eval()
        metrics = {f"train/{key}": accelerator.reduce(torch.stack(values).mean(), "mean").item() for key, values in stats.items()}
        metrics["train/ratio_first"] = accelerator.reduce(first_ratio, "mean").item()
        metrics["train/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    # ------------------------------------------------------------ eval and save
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """ODE sampling on the test prompts (EMA weights if enabled), scored with every eval reward."""
        config, accelerator = self.config, self.accelerator
        indices = list(range(accelerator.process_index, len(self.test_dataset), accelerator.num_processes))
        scores: dict[str, list[torch.Tensor]] = {}
        with self._ema_weights():
            for start in range(0, len(indices), config.sample.eval_batch_size):
                chunk = indices[start : start + config.sample.eval_batch_size]
                texts, metadata = self._texts(self.test_dataset, chunk)
                generator = torch.Generator(accelerator.device).manual_seed(derived_seed(config.seed, chunk[0]))
                with accelerator.autocast():
                    images = sample_ode(
                        self.adapter,
                        self.adapter.encode_prompts(texts),
                        num_steps=config.sample.eval_num_steps,
                        resolution=config.sample.resolution,
                        generator=generator,
                        max_states_per_call=config.sample.max_states_per_call,
                    )
                for name, value in self.eval_reward(images, texts, metadata).items():
                    scores.setdefault(name, []).append(value.to(accelerator.device))
        metrics = {}
        for name, values in scores.items():
            gathered = accelerator.gather_for_metrics(torch.cat(values))
            metrics[f"eval/{name}"] = gathered.float().mean().item()
        return metrics

    def _ema_weights(self) -> contextlib.AbstractContextManager:
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def save_lora(self, epoch: int) -> str:
        """Save the LoRA (EMA weights if enabled) in the diffusers format; returns the directory.

        Written to a temporary directory and renamed, so a crash never leaves a half-written one.
        """
        accelerator = self.accelerator
        target = os.path.join(self.run_dir, "checkpoints", f"epoch_{epoch:05d}", "lora")
        if accelerator.is_main_process:
            temporary = target + ".tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            with self._ema_weights():
                layers = get_peft_model_state_dict(accelerator.unwrap_model(self.model))
                self.adapter.pipeline_class.save_lora_weights(temporary, transformer_lora_layers=layers)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(temporary, target)
        accelerator.wait_for_everyone()
        return target

    # ---------------------------------------------------------------------- loop
    def train(self) -> list[dict[str, float]]:
        """Run `config.num_epochs` epochs; returns the per-epoch metrics."""
        config, accelerator = self.config, self.accelerator
        for epoch in range(config.num_epochs):
            started = time.perf_counter()
            samples = self.sample_epoch(epoch)
            sampled = time.perf_counter()
            advantages, metrics = self.advantages(samples)
            metrics.update(self.train_epoch(epoch, samples, advantages))
            trained = time.perf_counter()
            last = epoch == config.num_epochs - 1
            if config.eval_freq and ((epoch + 1) % config.eval_freq == 0 or last):
                metrics.update(self.evaluate())
            if last or (config.save_freq and (epoch + 1) % config.save_freq == 0):
                self.save_lora(epoch)
            metrics.update(
                {
                    "epoch": epoch,
                    "time/sampling_and_scoring": sampled - started,
                    "time/training": trained - sampled,
                    "time/epoch": time.perf_counter() - started,
                }
            )
            accelerator.log(metrics, step=epoch)
            self.history.append(metrics)
            logger.info(_epoch_line(metrics, self.is_tp), main_process_only=True)
        accelerator.end_training()
        if accelerator.is_main_process:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "w") as f:
                for row in self.history:
                    f.write(json.dumps(row) + "\n")
        return self.history


def _epoch_line(metrics: dict[str, float], tp: bool) -> str:
    parts = [f"epoch {int(metrics['epoch'])}", f"reward {metrics['reward/avg']:.4f}"]
    if tp:
        parts.append(f"R0 {metrics['reward/baseline_R0']:.4f}")
        parts.append(
            f"turning points {metrics['tp/tp_rate']:.3f} "
            f"(+{int(metrics['tp/tp_pos_after'])}/-{int(metrics['tp/tp_neg_after'])} kept of "
            f"+{int(metrics['tp/tp_pos_before'])}/-{int(metrics['tp/tp_neg_before'])})"
        )
        parts.append(f"mean d_j {metrics['tp/mean_incremental']:+.4f}")
    parts.append(f"kl {metrics['train/kl']:.2e}")
    parts.append(f"clip {metrics['train/clip_fraction']:.2f}")
    if "eval/avg" in metrics:
        parts.append(f"eval {metrics['eval/avg']:.4f}")
    parts.append(f"{metrics['time/epoch']:.1f}s")
    return " | ".join(parts)
