"""Regional `torch.compile`: one compiled graph per distinct transformer block kind and per phase shape.

Compiling the whole transformer traces and optimises 24 (SD3.5-M) to 57 (FLUX) copies of the same
block in one graph, per phase; at real size that took minutes per graph. Regional compilation
(the PyTorch recipe "Reducing torch.compile cold start compilation time with regional
compilation"; diffusers' `ModelMixin.compile_repeated_blocks` does the same for models that list
`_repeated_blocks`) compiles each repeated block once and calls the graph for every instance:
dynamo lifts a block's parameters to graph inputs, so all blocks of one kind share a graph. The
embeddings, the final norm and the output projection between the blocks run eagerly.

Block kinds: blocks of one class whose submodule structure differs compile to different graphs
(SD3.5-M: 13 dual-attention blocks, 10 plain ones and the last, context-pre-only block; FLUX:
double- and single-stream blocks). Each kind gets a code object of its own, so its dynamo cache
and its graph count are its own.

Three phases call the transformer, each through a callable that marks the phase (graphs are
counted per kind and per phase):

- `rollout`: sampling and evaluation, without gradients, eval mode, LoRA on. Calls are padded to
  `sample.state_buckets` by the sampler, so every kind compiles one graph per bucket it meets.
- `policy`: the training forward through the trainable (possibly DDP-wrapped) model, with
  gradients (each graph holds its forward and backward).
- `reference`: the LoRA-disabled forward of the KL term (`train.beta > 0`), without gradients.

A phase's graphs differ from another's by the guarded grad mode, module mode and LoRA flag. The
training phases pad their rows up to a full micro-batch (`train.batch_size` trajectories; the
padding rows repeat the last row and are dropped from the output, so the loss and its gradients
are unchanged), because the trainer's micro-batches shrink when uninformative trajectories are
dropped. All graphs are static (`dynamic=False`) and whole (`fullgraph=True`: a graph break is an
error). The recompile limit is raised to the graphs one kind needs over all phases, and reaching
it raises instead of falling back to eager (`fail_on_recompile_limit_hit`).

Numerics: the rollout's log-probs and the training recomputation must come from compiled code in
both or in neither, or the importance ratio drifts from 1 before any update; the trainer
therefore compiles all phases or none.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from itertools import combinations
from typing import Any

import ml_collections
import torch
from accelerate.logging import get_logger

from flow_grpo.models import call_rows

__all__ = [
    "PHASES",
    "CompiledPhases",
    "compile_phases",
    "default_state_buckets",
    "graph_budget",
    "phase_budget",
    "repeated_blocks",
    "rollout_call_sizes",
]

logger = get_logger(__name__)

PHASES: tuple[str, ...] = ("rollout", "policy", "reference")
_OUTSIDE = "outside"
"""The phase name of a block graph compiled by a transformer call outside the three phases."""


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


def repeated_blocks(transformer: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The transformer's repeated blocks grouped by kind, kinds in order of first appearance.

    Blocks are the modules whose class is in the model's `_repeated_blocks` (diffusers' list), or
    else the entries of its top-level `nn.ModuleList`s of more than one entry (SD3, FLUX). One kind
    is one class with one submodule structure in one `nn.ModuleList`: the lists of a model run at
    different sequence lengths (Z-Image refines the image and the text tokens alone, then runs the
    joint sequence through `layers`), so one kind sees one shape per call. A class with several
    structures or lists gives several kinds, named `Class`, `Class/2`, ...

    Raises:
        ValueError: the transformer has no repeated blocks to compile.
    """
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    if names:
        blocks = [(path.rpartition(".")[0], m) for path, m in transformer.named_modules() if type(m).__name__ in names]
    else:
        lists = [(name, child) for name, child in transformer.named_children()
                 if isinstance(child, torch.nn.ModuleList) and len(child) > 1]
        blocks = [(name, block) for name, blocks in lists for block in blocks]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no repeated blocks to compile regionally (set config.compile=False)")
    structures: dict[tuple, list[torch.nn.Module]] = {}
    for parent, block in blocks:
        structure = (type(block).__qualname__, parent, tuple((name, type(m).__name__) for name, m in block.named_modules()))
        structures.setdefault(structure, []).append(block)
    kinds: dict[str, list[torch.nn.Module]] = {}
    for (qualname, _, _), members in structures.items():
        base = qualname.rsplit(".", 1)[-1]
        same = sum(1 for name in kinds if name.split("/")[0] == base)
        kinds[base if not same else f"{base}/{same + 1}"] = members
    return kinds


class _PhaseMarker:
    """The phase a transformer call runs in, read by the graph counters when a graph compiles."""

    def __init__(self) -> None:
        self.current = _OUTSIDE

    @contextlib.contextmanager
    def active(self, phase: str) -> Iterator[None]:
        previous, self.current = self.current, phase
        try:
            yield
        finally:
            self.current = previous


class _GraphCounter:
    """A dynamo backend that counts the graphs of one block kind per phase, then compiles with `backend`."""

    def __init__(self, marker: _PhaseMarker, backend: str = "inductor") -> None:
        self.marker = marker
        self.backend = backend
        self.graphs: dict[str, int] = {}

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        phase = self.marker.current
        self.graphs[phase] = self.graphs.get(phase, 0) + 1
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(graph, example_inputs)
        return torch._dynamo.lookup_backend(self.backend)(graph, example_inputs)


STREAMS: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "x")
"""Block arguments that carry the image and text streams from block to block (Z-Image's blocks name theirs `x`)."""


def _uniform_streams(parameters: list[str], args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """A block's arguments (`parameters`: its forward's parameter names) with its `STREAMS` made alike for every block of a kind, so one graph serves them.

    Dynamo guards on strides and on `requires_grad`, and both differ between the first block of a
    kind and the later ones:

    - **Strides.** FLUX's later single-stream blocks get the image part of the previous block's
      joint output, a strided slice; the first gets a contiguous tensor. Streams are made contiguous
      (a no-op for the contiguous ones; one copy of the stream per such block otherwise).
    - **Gradients** (the policy phase). The model's first block gets the frozen embeddings' outputs,
      which need no gradient, and every later block outputs of LoRA blocks, which do. Streams that
      do not are made leaves that do: the price is the backward through the first block's frozen
      projections of its inputs (SD3.5-M: 9 of them, about 34 GFLOP per row, 1.5 % of the policy
      backward) and the few activations of that block it saves; the leaves are new, so their
      gradients are dropped and the LoRA gradients do not change.
    """
    grad = torch.is_grad_enabled()

    def convert(name: str, value: Any) -> Any:
        if name not in STREAMS or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        value = value.contiguous()
        return value.detach().requires_grad_() if grad and not value.requires_grad else value

    return tuple(convert(n, v) for n, v in zip(parameters, args)), {k: convert(k, v) for k, v in kwargs.items()}


def _compile_kind(kind: str, blocks: list[torch.nn.Module], counter: _GraphCounter) -> None:
    """Route every call of `blocks` through one compiled function of their kind (a code object of its own)."""

    def block_call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return module._call_impl(*args, **kwargs)

    # dynamo caches graphs and counts recompiles per code object: one per kind (and per
    # CompiledPhases), so kinds and trainers in one process never mix.
    block_call.__code__ = block_call.__code__.replace(co_name=f"{kind.replace('/', '_')}_block")
    compiled = torch.compile(block_call, backend=counter, dynamic=False, fullgraph=True)

    parameters = list(inspect.signature(blocks[0].forward).parameters)  # one class per kind: read once, not per call

    def entry(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _uniform_streams(parameters, args, kwargs)
        return compiled(block, *args, **kwargs)

    for block in blocks:
        # `nn.Module.__call__` runs `_compiled_call_impl` when set (what `Module.compile` sets).
        block._compiled_call_impl = functools.partial(entry, block)


def _phase_callable(phase: str, module: Callable[..., Any], marker: _PhaseMarker, rows: int) -> Callable[..., Any]:
    """`module(**inputs)` run as `phase`, with batched inputs padded up to `rows` (0 = none)."""

    def forward(**inputs: Any) -> Any:
        with marker.active(phase):
            return module(**inputs)

    if not rows:
        return forward

    def padded(**inputs: Any) -> Any:
        count = call_rows((), inputs)
        if count >= rows:
            return forward(**inputs)
        order = [min(row, count - 1) for row in range(rows)]  # padding repeats the last row
        index: dict[torch.device, torch.Tensor] = {}

        def pad(key: str, value: Any) -> Any:
            # Tensors and lists with a batch dimension; `*_ids` are per-token positions (FLUX), shared by every row.
            if key.endswith("_ids"):
                return value
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == count:
                if value.device not in index:
                    index[value.device] = torch.arange(rows, device=value.device).clamp(max=count - 1)
                return value.index_select(0, index[value.device])
            if isinstance(value, list) and len(value) == count:
                return [value[row] for row in order]
            return value

        output = forward(**{key: pad(key, value) for key, value in inputs.items()})
        return tuple(part[:count] for part in output) if isinstance(output, tuple) else output[:count]

    return padded


SCOPES: tuple[str, ...] = ("blocks", "model")
"""What `CompiledPhases` compiles: every repeated block kind once ("blocks", what the trainer runs),
or the whole transformer per phase ("model": the compile-time benchmark's comparison)."""


class CompiledPhases:
    """The phase callables of one transformer: `rollout`, `policy`, `reference`, and their graph counts.

    Args:
        transformer: the unwrapped transformer with its LoRA (rollout and reference call it).
        model: the trainable model the policy forward runs through (e.g. DDP-wrapped `transformer`).
        training_rows: transformer rows of a full training micro-batch (trajectories x CFG rows);
            the training phases pad to it.
        budget: phase -> the most graphs one kind needs in it (one per static shape); the recompile
            limit is raised to their sum, and exceeding it raises.
        backend: dynamo backend; "eager" only traces (CPU tests and dry runs).
        scope: one of `SCOPES`.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        model: Callable[..., Any],
        training_rows: int,
        budget: dict[str, int],
        backend: str = "inductor",
        scope: str = "blocks",
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"compile scope must be one of {SCOPES}, got {scope!r}")
        self.budget = dict(budget)
        self.scope = scope
        marker = _PhaseMarker()
        # Mode flags are guarded: LoRA modules are created in training mode; the rollout runs in eval mode.
        transformer.eval()
        if scope == "blocks":
            kinds = repeated_blocks(transformer)
            self.counters = {kind: _GraphCounter(marker, backend) for kind in kinds}
            for kind, blocks in kinds.items():
                _compile_kind(kind, blocks, self.counters[kind])
            logger.info(f"compile: {', '.join(f'{k} x{len(b)}' for k, b in kinds.items())} (one graph per kind and shape)")
            targets = {"rollout": transformer, "policy": model, "reference": transformer}
        else:
            counter = _GraphCounter(marker, backend)
            self.counters = {type(transformer).__name__: counter}
            targets = {phase: _whole_model(phase, target, counter) for phase, target in
                       (("rollout", transformer), ("policy", model), ("reference", transformer))}
        self.rollout = _phase_callable("rollout", targets["rollout"], marker, 0)
        self.policy = _phase_callable("policy", targets["policy"], marker, training_rows)
        self.reference = _phase_callable("reference", targets["reference"], marker, training_rows)
        limit = sum(self.budget.values())
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, limit)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, limit * len(self.counters))
        dynamo.fail_on_recompile_limit_hit = True
        self._seen: dict[str, int] = {}

    @classmethod
    def for_config(
        cls, config: ml_collections.ConfigDict, transformer: torch.nn.Module, model: Callable[..., Any], cfg_rows: int
    ) -> CompiledPhases:
        """The phases of a training config (`sample.state_buckets` already set); `cfg_rows`: transformer rows per state."""
        micro_batch = config.train.batch_size
        return cls(transformer, model, micro_batch * cfg_rows, graph_budget(config))

    def graphs_by_kind(self) -> dict[str, dict[str, int]]:
        """Block kind (or the transformer's class, scope "model") -> phase -> graphs compiled so far."""
        return {kind: dict(counter.graphs) for kind, counter in self.counters.items()}

    def graphs(self) -> dict[str, int]:
        """Phase -> graphs per kind compiled so far (every kind sees the same shapes: the largest count).

        A phase `outside` appears only when a transformer call outside the phases compiled a graph.
        """
        by_kind = self.graphs_by_kind().values()
        counts = {phase: max((kind.get(phase, 0) for kind in by_kind), default=0) for phase in PHASES}
        outside = max((kind.get(_OUTSIDE, 0) for kind in by_kind), default=0)
        return counts | ({_OUTSIDE: outside} if outside else {})

    @property
    def total(self) -> int:
        """Graphs compiled so far over every kind and phase."""
        return sum(sum(phases.values()) for phases in self.graphs_by_kind().values())

    def check(self, epoch: int, new_phase_expected: bool) -> dict[str, float]:
        """Log the graph counts after `epoch`; warn on a recompile of a phase that had already run an epoch.

        Args:
            new_phase_expected: graphs may legitimately appear this epoch (the first epoch, or the
                first evaluation: new bucket sizes).

        Returns:
            Metrics: `compile/graphs` (over all kinds) and per phase `compile/graphs_<phase>` (per kind).
        """
        counts = self.graphs()
        grown = {p: n - self._seen.get(p, 0) for p, n in counts.items() if n > self._seen.get(p, 0)}
        logger.info(
            f"epoch {epoch}: compiled graphs per kind {self.graphs_by_kind()} (budget per kind {self.budget})",
            main_process_only=True,
        )
        unexpected = {p: n for p, n in grown.items() if p in self._seen and self._seen[p] > 0 and not new_phase_expected}
        if unexpected:
            logger.warning(
                f"epoch {epoch}: torch.compile recompiled {unexpected} after the first epoch: a shape or mode changed "
                "(see TORCH_LOGS=recompiles); each recompile costs a compilation"
            )
        if _OUTSIDE in counts:
            logger.warning(f"epoch {epoch}: {counts[_OUTSIDE]} block graphs compiled by transformer calls outside the phases")
        self._seen = counts
        return {"compile/graphs": float(self.total)} | {f"compile/graphs_{p}": float(n) for p, n in counts.items()}


def _whole_model(phase: str, module: Callable[..., Any], counter: _GraphCounter) -> Callable[..., Any]:
    """`module(**inputs)` compiled whole, as a code object of its own per phase (scope "model")."""

    def forward(**inputs: Any) -> Any:
        return module(**inputs)

    forward.__code__ = forward.__code__.replace(co_name=f"{phase}_model_forward")
    return torch.compile(forward, backend=counter, dynamic=False, fullgraph=True)


POLICY_GRAPHS = 1
"""Graphs per kind of the policy phase: the training micro-batch shape, forward and backward (every
block's streams require a gradient, the first block's too: `_uniform_streams`)."""


def phase_budget(rollout_shapes: int, reference: bool) -> dict[str, int]:
    """The most graphs one block kind compiles per phase: one per rollout shape, `POLICY_GRAPHS`, and one
    reference graph when the KL term runs (the training phases pad to one micro-batch shape)."""
    return {"rollout": rollout_shapes, "policy": POLICY_GRAPHS, "reference": 1 if reference else 0}


def graph_budget(config: ml_collections.ConfigDict) -> dict[str, int]:
    """`phase_budget` under `config`: rollout and evaluation calls are padded to `sample.state_buckets`."""
    buckets = tuple(config.sample.state_buckets)
    if not buckets:
        raise ValueError("compiling needs sample.state_buckets (set them, or let the trainer derive the defaults)")
    return phase_budget(len(buckets), config.train.beta > 0)


def compile_phases(config: ml_collections.ConfigDict, adapter: Any, model: Callable[..., Any]) -> CompiledPhases:
    """Compile the transformer's block kinds for the trainer's phases; the adapter's velocity then calls the rollout phase.

    Without `sample.state_buckets`, `default_state_buckets` of the per-process sampling batch are
    set into `config` first (sampling and evaluation pad their calls to them).

    Args:
        adapter: the `ModelAdapter`; its `inference_forward` becomes the rollout phase's callable.
        model: the trainable model as `accelerate.prepare` returned it (the policy forward's target).
    """
    sample = config.sample
    if not tuple(sample.state_buckets):
        sample.state_buckets = default_state_buckets(sample.batch_size, sample.window_size, config.algorithm == "tp_grpo")
        logger.info(f"compile: sample.state_buckets={tuple(sample.state_buckets)} (derived from sample.batch_size)")
    compiled = CompiledPhases.for_config(config, adapter.transformer, model, 2 if adapter.uses_cfg else 1)
    adapter.inference_forward = compiled.rollout
    return compiled
