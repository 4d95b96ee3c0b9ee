"""`torch.compile` per phase, with a counted and bounded number of graphs.

Three phases call the transformer, each through its own compiled callable (its own code object,
hence its own dynamo cache and graph count):

- `rollout`: sampling and evaluation, without gradients, eval mode, LoRA on. Calls are padded to
  `sample.state_buckets` by the sampler, so this phase compiles one graph per bucket it meets.
- `policy`: the training forward through the trainable (possibly DDP-wrapped) model, with gradients.
- `reference`: the LoRA-disabled forward of the KL term (`train.beta > 0`), without gradients.

The policy and the reference forward do not share a callable: they cannot share a graph (one
records gradients, the other does not, and the LoRA on/off flag is guarded), so one callable
would only mix their counts; apart, each phase has exactly one graph per micro-batch shape. The
training phases pad their rows up to a full micro-batch (`train.batch_size` trajectories; the
padding rows repeat the last row and are dropped from the output, so the loss and its gradients
are unchanged), because the trainer's micro-batches shrink when uninformative trajectories are
dropped. All graphs are static (`dynamic=False`) and whole (`fullgraph=True`: a graph break is an
error). The recompile limit is raised to the largest phase budget, and reaching it raises
instead of falling back to eager (`fail_on_recompile_limit_hit`).

Numerics: the rollout's log-probs and the training recomputation must come from compiled code in
both or in neither, or the importance ratio drifts from 1 before any update; the trainer
therefore compiles all phases or none.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from typing import Any

import ml_collections
import torch
from accelerate.logging import get_logger

__all__ = ["PHASES", "CompiledPhases", "compile_phases", "default_state_buckets", "graph_budget", "rollout_call_sizes"]

logger = get_logger(__name__)

PHASES: tuple[str, ...] = ("rollout", "policy", "reference")


def rollout_call_sizes(batch_size: int, window_size: int, branches: bool) -> list[int]:
    """Live-state counts of the lockstep rollout's transformer calls, one entry per grid step that can occur.

    TP-GRPO carries `batch_size * m` states, m = 1 ... W + 1 (the main trajectories plus one ODE
    branch per window step so far, whatever the window start); Flow-GRPO always `batch_size`.
    """
    return [batch_size * m for m in range(1, window_size + 2)] if branches else [batch_size]


def _padded_total(sizes: list[int], buckets: tuple[int, ...]) -> int:
    return sum(min(b for b in buckets if b >= size) for size in sizes)


def default_state_buckets(batch_size: int, window_size: int, branches: bool, max_overhead: float = 0.10) -> tuple[int, ...]:
    """The fewest state buckets, multiples of `batch_size` up to the largest call, padding at most `max_overhead`.

    Padding is measured over one rollout's calls (`rollout_call_sizes`), each call padded up to
    the smallest bucket that holds it. E.g. batch 9, window 9 (TP-GRPO): (18, 36, 54, 72, 90)
    pads 495 states to 540 (+9.1%).
    """
    sizes = rollout_call_sizes(batch_size, window_size, branches)
    largest = sizes[-1]
    candidates = sorted(set(sizes))[:-1]
    actual = sum(sizes)
    best = (largest,)
    for count in range(1, len(candidates) + 2):
        # Exhaustive over subsets of this size (at most W candidates): keep the one padding least.
        options = [(*chosen, largest) for chosen in combinations(candidates, count - 1)]
        best = min(options, key=lambda buckets: _padded_total(sizes, buckets))
        if _padded_total(sizes, best) <= (1 + max_overhead) * actual:
            return best
    return best


class _GraphCounter:
    """A dynamo backend that counts the graphs it compiles (one per cache entry), then compiles with inductor."""

    def __init__(self, backend: str = "inductor") -> None:
        self.graphs = 0
        self.backend = backend

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(graph, example_inputs)
        return torch._dynamo.lookup_backend(self.backend)(graph, example_inputs)


def _phase_callable(phase: str, module: Callable[..., Any], counter: _GraphCounter, rows: int) -> Callable[..., Any]:
    """`module(**inputs)` compiled as a code object of its own, with batched inputs padded up to `rows` (0 = none)."""

    def forward(**inputs: Any) -> Any:
        return module(**inputs)

    # A distinct code object per phase and per call of this function: dynamo caches graphs and
    # counts recompiles per code object, so phases (and trainers in one process) never mix.
    forward.__code__ = forward.__code__.replace(co_name=f"{phase}_forward")
    compiled = torch.compile(forward, backend=counter, dynamic=False, fullgraph=True)
    if not rows:
        return compiled

    def padded(**inputs: Any) -> Any:
        count = inputs["hidden_states"].shape[0]
        if count >= rows:
            return compiled(**inputs)
        index = torch.arange(rows, device=inputs["hidden_states"].device).clamp(max=count - 1)
        # Tensors with a batch dimension; `*_ids` are per-token positions (FLUX), shared by every row.
        batched = {
            key: value.index_select(0, index)
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == count and not key.endswith("_ids")
            else value
            for key, value in inputs.items()
        }
        output = compiled(**batched)
        return tuple(part[:count] for part in output) if isinstance(output, tuple) else output[:count]

    return padded


class CompiledPhases:
    """The compiled callables of one transformer: `rollout`, `policy`, `reference`, and their graph counts.

    Args:
        transformer: the unwrapped transformer with its LoRA (rollout and reference call it).
        model: the trainable model the policy forward runs through (e.g. DDP-wrapped `transformer`).
        training_rows: transformer rows of a full training micro-batch (trajectories x CFG rows);
            the training phases pad to it.
        budget: phase -> the most graphs the configuration needs; the recompile limit is raised to
            the largest, and exceeding it raises.
        backend: dynamo backend; "eager" only traces (CPU dry runs of the GPU check).
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        model: Callable[..., Any],
        training_rows: int,
        budget: dict[str, int],
        backend: str = "inductor",
    ) -> None:
        self.budget = dict(budget)
        self.counters = {phase: _GraphCounter(backend) for phase in PHASES}
        # Mode flags are guarded: LoRA modules are created in training mode; the rollout runs in eval mode.
        transformer.eval()
        self.rollout = _phase_callable("rollout", transformer, self.counters["rollout"], 0)
        self.policy = _phase_callable("policy", model, self.counters["policy"], training_rows)
        self.reference = _phase_callable("reference", transformer, self.counters["reference"], training_rows)
        limit = max(self.budget.values())
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, limit)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, limit)
        dynamo.fail_on_recompile_limit_hit = True
        # One graph per compile at any world size (no DDP bucket splitting): the counts stay exact,
        # and LoRA gradients are small enough that overlapping their all-reduce gains little.
        dynamo.optimize_ddp = False
        self._seen: dict[str, int] = {}

    @classmethod
    def for_config(
        cls, config: ml_collections.ConfigDict, transformer: torch.nn.Module, model: Callable[..., Any], cfg_rows: int
    ) -> CompiledPhases:
        """The phases of a training config (`sample.state_buckets` already set); `cfg_rows`: transformer rows per state."""
        micro_batch = config.train.batch_size
        return cls(transformer, model, micro_batch * cfg_rows, graph_budget(config))

    def graphs(self) -> dict[str, int]:
        """Phase -> graphs compiled so far."""
        return {phase: counter.graphs for phase, counter in self.counters.items()}

    @property
    def total(self) -> int:
        return sum(self.graphs().values())

    def check(self, epoch: int, new_phase_expected: bool) -> dict[str, float]:
        """Log the graph counts after `epoch`; warn on a recompile of a phase that had already run an epoch.

        Args:
            new_phase_expected: graphs may legitimately appear this epoch (the first epoch, or the
                first evaluation: new bucket sizes).

        Returns:
            Metrics: `compile/graphs` and per phase `compile/graphs_<phase>`.
        """
        counts = self.graphs()
        grown = {p: n - self._seen.get(p, 0) for p, n in counts.items() if n > self._seen.get(p, 0)}
        logger.info(f"epoch {epoch}: compiled graphs {counts} (budget {self.budget})", main_process_only=True)
        unexpected = {p: n for p, n in grown.items() if p in self._seen and self._seen[p] > 0 and not new_phase_expected}
        if unexpected:
            logger.warning(
                f"epoch {epoch}: torch.compile recompiled {unexpected} after the first epoch: a shape or mode changed "
                "(see TORCH_LOGS=recompiles); each recompile costs a compilation"
            )
        self._seen = counts
        return {"compile/graphs": float(sum(counts.values()))} | {f"compile/graphs_{p}": float(n) for p, n in counts.items()}


def graph_budget(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The most graphs each phase can compile under `config` (one per static shape).

    Rollout and evaluation calls are padded to `sample.state_buckets` (one graph each); the
    training phases to one full micro-batch (one graph each; the reference only when `train.beta > 0`).
    """
    buckets = tuple(config.sample.state_buckets)
    if not buckets:
        raise ValueError("compiling needs sample.state_buckets (set them, or let the trainer derive the defaults)")
    return {"rollout": len(buckets), "policy": 1, "reference": 1 if config.train.beta > 0 else 0}


def compile_phases(config: ml_collections.ConfigDict, adapter: Any, model: Callable[..., Any]) -> CompiledPhases:
    """Compile the trainer's phases; the adapter's velocity then calls the rollout phase by default.

    Without `sample.state_buckets`, `default_state_buckets` of the per-process sampling batch are
    set into `config` first (sampling and evaluation pad their calls to them).

    Args:
        adapter: the `ModelAdapter`; its `inference_forward` becomes the compiled rollout callable.
        model: the trainable model as `accelerator.prepare` returned it (the policy forward's target).
    """
    sample = config.sample
    if not tuple(sample.state_buckets):
        sample.state_buckets = default_state_buckets(sample.batch_size, sample.window_size, config.algorithm == "tp_grpo")
        logger.info(f"compile: sample.state_buckets={tuple(sample.state_buckets)} (derived from sample.batch_size)")
    compiled = CompiledPhases.for_config(config, adapter.transformer, model, 2 if adapter.uses_cfg else 1)
    adapter.inference_forward = compiled.rollout
    return compiled
