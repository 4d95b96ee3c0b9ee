"""Eager per-step costs: kernel ops, host synchronisations and bytes written per rollout step and training micro-step.

    python -m flow_grpo.bench.eager_costs                           # tiny SD3, bf16 autocast, CPU: seconds
    python -m flow_grpo.bench.eager_costs --size sd3 --device cuda  # SD3.5-Medium at the benchmark's size, on a GPU

Every aten op that reaches a backend is counted by a `TorchDispatchMode`. The mode sits below
autograd and autocast, so it sees what actually runs: a composite op as the ops it runs, autocast's
casts, each backward op. On a GPU every op that is not a view launches a kernel (a few launch more
than one); those are the "kernel ops". Host synchronisations are the ops that make the host wait for
the device on CUDA: reading a value on the host (`.item()`, `bool()`, `int()`, `float()` of a tensor:
`aten._local_scalar_dense`), ops whose output size depends on values (`nonzero`, boolean-mask
indexing, `masked_select`, `unique`, `repeat_interleave` by a tensor without `output_size`), and
copies from the host to the device. On the CPU, where host and device are one, every such op counts
and so does every tensor made from host data (`torch.tensor(...)`, `aten.lift_fresh`): an upper
bound. The same ops run on the CPU as on a GPU, so the kernel counts hold for a GPU run of the same
code, except the attention op (one op either way) and AdamW (per parameter on the CPU, `foreach` on
CUDA). Bytes written are the ops' outputs. The last table counts one
transformer forward of SD3.5-Medium's 24-layer block layout at a small width, without LoRA, with it,
and with peft's input casts (what `add_lora` turns off under autocast).

A rollout is cut into steps at its transformer calls (one per grid step; the counted rollouts do
not bound their calls): step k holds its transformer call and the sampler's work up to the next
call. A training micro-step is one `training_step` and its backward (`UpdateStep.backward`); the
optimizer update at the end of the accumulation is reported once per update.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from absl import flags
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flow_grpo.bench.compile_time import deep_narrow_sd3
from flow_grpo.bench.models import BenchmarkModels, build_models
from flow_grpo.bench.phases import benchmark_texts, rollout_phase
from flow_grpo.bench.settings import DTYPE_FLAGS, BenchmarkSettings, default_settings
from flow_grpo.command_flags import parse_flags
from flow_grpo.models.sd3 import SD3Adapter
from flow_grpo.testing.architectures import SIZES, model_spec
from flow_grpo.training.step import adapters_disabled, add_lora, training_step, window_batches

__all__ = ["OpCounter", "OpCounts", "count_rollout", "count_training", "format_costs", "is_host_sync", "lora_forward_costs"]

_SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "equal", "is_nonzero"})
_HOST_DATA_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})
_NO_KERNEL_OPS = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_", "resize_", "_unsafe_view"})


def _name(func: torch._ops.OpOverload) -> str:
    return func._schema.name.split("::")[-1]


def _on_device(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "cpu"


def is_host_sync(func: torch._ops.OpOverload, args: tuple, kwargs: dict[str, Any], device: torch.device) -> bool:
    """Whether the aten op `func(*args, **kwargs)` makes the host wait for the device (see the module doc).

    With `device` a CPU every tensor is on the host, so every value read, value-sized op and tensor made
    from host data counts (conservative); otherwise (a CUDA run) only those on
    device tensors, and copies from the host to the device.
    """
    name = _name(func)
    host_run = device.type == "cpu"
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    on_device = host_run or any(_on_device(t) for t in tensors)
    if name in _SYNC_OPS:
        return on_device
    if name in _HOST_DATA_OPS:
        return host_run
    if name == "repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None:
        return on_device
    if name in ("index", "index_put", "index_put_") and len(args) > 1:
        return on_device and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
    if name == "_to_copy" and isinstance(args[0], torch.Tensor) and kwargs.get("device") is not None:
        return not host_run and args[0].device.type == "cpu" and torch.device(kwargs["device"]).type != "cpu"
    if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return not host_run and args[1].device.type == "cpu" and _on_device(args[0])
    return False


def _is_view(func: torch._ops.OpOverload) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


@dataclass
class OpCounts:
    """Ops of one region: kernel ops (not views), views, host synchronisations, bytes written by kernel ops.

    `ops` counts the kernel ops by name (`aten.addmm`, ...); `syncs_by_op` the synchronising ones.
    """

    kernels: int = 0
    views: int = 0
    syncs: int = 0
    bytes_written: int = 0
    ops: Counter = field(default_factory=Counter)
    syncs_by_op: Counter = field(default_factory=Counter)

    def add(self, other: OpCounts) -> None:
        self.kernels += other.kernels
        self.views += other.views
        self.syncs += other.syncs
        self.bytes_written += other.bytes_written
        self.ops.update(other.ops)
        self.syncs_by_op.update(other.syncs_by_op)

    def per(self, count: int) -> dict[str, float]:
        """Kernel ops, views, host syncs and MB written, each divided by `count`."""
        return {
            "kernels": self.kernels / count,
            "views": self.views / count,
            "syncs": self.syncs / count,
            "mb_written": self.bytes_written / count / 2**20,
        }


class OpCounter(TorchDispatchMode):
    """Counts every aten op into the current (step, region): `next_step()` starts a step, `region(name)` names a span.

    `device`: the run's device, for `is_host_sync`.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.step = -1  # ops before the first `next_step()`: setup
        self.label = "other"
        self.counts: dict[tuple[int, str], OpCounts] = {}

    def next_step(self) -> None:
        self.step += 1

    @contextlib.contextmanager
    def region(self, label: str) -> Iterator[None]:
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        counts = self.counts.setdefault((self.step, self.label), OpCounts())
        sync = is_host_sync(func, args, kwargs, self.device)
        out = func(*args, **kwargs)
        if sync:
            counts.syncs += 1
            counts.syncs_by_op[f"aten.{_name(func)}"] += 1
        if _is_view(func) or _name(func) in _NO_KERNEL_OPS or _name(func) in _HOST_DATA_OPS:
            counts.views += 1
        else:
            counts.kernels += 1
            counts.ops[f"aten.{_name(func)}"] += 1
            counts.bytes_written += sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out

    def total(self, steps: range | list[int], label: str | None = None) -> OpCounts:
        """The counts of `steps`, of region `label` only or of all regions."""
        result = OpCounts()
        for (step, name), counts in self.counts.items():
            if step in steps and (label is None or name == label):
                result.add(counts)
        return result


def _marked(counter: OpCounter, label: str, fn: Callable[..., Any], new_step: bool) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if new_step:
            counter.next_step()
        with counter.region(label):
            return fn(*args, **kwargs)

    return call


def count_rollout(models: BenchmarkModels, settings: BenchmarkSettings, branches: bool) -> OpCounter:
    """Ops of one eager rollout of `settings` (TP-GRPO's lockstep one with `branches`), after an uncounted warm-up.

    Steps 0 ... N - 1 are the grid steps (regions "transformer" and "sampler"), step N the decodes
    and what follows them (region "decode", then "sampler"), step -1 the setup before the first call.
    """
    adapter = models.adapter
    prompts = adapter.encode_prompts(benchmark_texts(settings.prompts))
    rollout_phase(models, settings, prompts, branches=branches, bucketed=False)
    counter = OpCounter(models.device)
    forward, decode = adapter.inference_forward, adapter.decode

    def decode_marked(latents: torch.Tensor) -> torch.Tensor:
        if counter.step < settings.num_steps:  # the first decode ends the last grid step
            counter.next_step()
        with counter.region("decode"):
            return decode(latents)

    adapter.inference_forward = _marked(counter, "transformer", forward or adapter.transformer, new_step=True)
    adapter.decode = decode_marked  # an instance attribute over the class's method, removed below
    try:
        with counter, counter.region("sampler"):
            rollout_phase(models, settings, prompts, branches=branches, bucketed=False)
    finally:
        adapter.inference_forward = forward
        del adapter.decode
    return counter


def _update(models: BenchmarkModels, settings: BenchmarkSettings, prompts: Any, samples: Any, counter: OpCounter | None) -> None:
    """One GRPO update over the window as `flow_grpo.bench.phases.update_phase` runs it, in counted regions."""
    counter = counter or OpCounter(models.device)  # an uncounted run still needs the region markers
    accelerator, model = models.accelerator, models.model
    unwrapped = accelerator.unwrap_model(model)
    phases = _Phases(_marked(counter, "policy", model, new_step=False), _marked(counter, "reference", unwrapped, new_step=False))
    generator = torch.Generator().manual_seed(settings.seed + 2)
    advantages = torch.randn(settings.prompts, settings.window_size, generator=generator).to(models.device)
    model.train()
    for rows in torch.arange(settings.prompts, device=models.device).split(settings.micro_batch):
        for j, batch in enumerate(window_batches(samples, prompts, rows)):
            counter.next_step()
            with accelerator.accumulate(model):
                with counter.region("loss"):
                    out = training_step(
                        models.adapter, model, unwrapped, batch, advantages[rows, j], models.loss_settings, models.autocast,
                        compiled=phases,
                    )
                with counter.region("update" if accelerator.sync_gradients else "backward"):
                    models.update_step.backward(out.loss)
    model.eval()


@dataclass(frozen=True)
class _Phases:
    """Eager stand-ins for `CompiledPhases`' `policy` and `reference`, so the counter sees each forward."""

    policy: Callable[..., Any]
    reference: Callable[..., Any]


def count_training(models: BenchmarkModels, settings: BenchmarkSettings) -> OpCounter:
    """Ops of one eager GRPO update over the window (after an uncounted one that creates the optimizer state).

    Each micro-step is a step, with regions "policy" and "reference" (the transformer forwards), "loss"
    (the rest of `training_step`) and "backward"; the last micro-step's backward, which also applies
    the optimizer update, is region "update".
    """
    prompts = models.adapter.encode_prompts(benchmark_texts(settings.prompts))
    samples = rollout_phase(models, settings, prompts, branches=True, bucketed=False)
    _update(models, settings, prompts, samples, None)
    counter = OpCounter(models.device)
    with counter:
        _update(models, settings, prompts, samples, counter)
    return counter


def _lora_casts(transformer: torch.nn.Module, enabled: bool) -> None:
    for module in transformer.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = enabled


def lora_forward_costs(layers: int = 24) -> dict[str, OpCounts]:
    """Ops of one bf16 forward without gradients under CPU autocast of SD3.5-Medium's block layout at a small
    width (`flow_grpo.bench.compile_time.deep_narrow_sd3`, 2 rows): without LoRA, with the trainer's LoRA
    (r4 on every attention projection), and with peft's input casts to float32 on (before `add_lora`
    turned them off). Each is the second call in its autocast region (the first also casts the LoRA weights)."""
    transformer = deep_narrow_sd3(layers)
    torch.nn.Module.to(transformer, dtype=torch.bfloat16)  # torch's own `to`: diffusers' only adds a warning
    add_lora(transformer, 4, 4, SD3Adapter.lora_target_modules, seed=0)
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 16, 16, 16, generator=generator, dtype=torch.bfloat16),
        "timestep": torch.full((2,), 500.0),
        "encoder_hidden_states": torch.randn(2, 8, 64, generator=generator, dtype=torch.bfloat16),
        "pooled_projections": torch.randn(2, 32, generator=generator, dtype=torch.bfloat16),
    }

    def second_call() -> OpCounts:
        counter = OpCounter(torch.device("cpu"))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            transformer(**inputs, return_dict=False)
            with counter:
                transformer(**inputs, return_dict=False)
        return counter.total([-1])

    with adapters_disabled(transformer):
        results = {"no LoRA": second_call()}
    results["LoRA"] = second_call()
    _lora_casts(transformer, True)
    results["LoRA, peft's input casts"] = second_call()
    return results


Row = tuple[str, dict[str, float]]


def rollout_rows(title: str, counter: OpCounter, num_steps: int) -> list[Row]:
    """Per grid step: the transformer call and the sampler's work; once per rollout: setup, decodes and record."""
    steps = range(num_steps)
    return [
        (f"{title} step: transformer call", counter.total(steps, "transformer").per(num_steps)),
        (f"{title} step: sampler", counter.total(steps, "sampler").per(num_steps)),
        (f"{title}, once: setup", counter.total([-1]).per(1)),
        (f"{title}, once: decodes and record", counter.total([num_steps]).per(1)),
    ]


def training_rows(counter: OpCounter) -> list[Row]:
    """Per micro-step: the policy and reference forwards, the loss and the backward; once per update: the update."""
    steps = range(counter.step + 1)
    plain = [step for step in steps if (step, "update") not in counter.counts]
    rows = [(f"training micro-step: {label}", counter.total(steps, label).per(len(steps))) for label in ("policy", "reference", "loss")]
    backward = counter.total(plain, "backward").per(len(plain)) if plain else {}
    update = counter.total(steps, "update").per(1)
    if backward:
        rows.append(("training micro-step: backward", backward))
        update = {key: max(0.0, value - backward[key]) for key, value in update.items()}
        rows.append(("once per update: optimizer update (clip, AdamW, checks)", update))
    else:
        rows.append(("training micro-step: backward and optimizer update", update))
    return rows


def format_costs(rows: list[Row], heading: str) -> str:
    """A table of kernel ops, views, host syncs and MB written per row."""
    lines = [heading, f"{'':<58}{'kernel ops':>11}{'views':>8}{'host syncs':>11}{'MB written':>12}"]
    for title, values in rows:
        lines.append(
            f"{title:<58}{values['kernels']:>11.1f}{values['views']:>8.1f}{values['syncs']:>11.1f}{values['mb_written']:>12.1f}"
        )
    return "\n".join(lines)


def _top_ops(counter: OpCounter, steps: range, label: str, top: int) -> str:
    counts = counter.total(steps, label)
    listed = ", ".join(f"{name.removeprefix('aten.')} {n / len(steps):g}" for name, n in counts.ops.most_common(top))
    syncs = ", ".join(f"{name.removeprefix('aten.')} {n / len(steps):g}" for name, n in counts.syncs_by_op.items())
    return f"  {label}: {listed}" + (f"; host syncs: {syncs}" if syncs else "")


_FLAGS = flags.FlagValues()
flags.DEFINE_enum("size", "tiny", SIZES, "Model size (the benchmark's presets).", flag_values=_FLAGS)
flags.DEFINE_enum("dtype", "bf16", sorted(DTYPE_FLAGS), "Transformer and autocast dtype.", flag_values=_FLAGS)
flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "Device; on cuda host syncs count only ops on device tensors.", flag_values=_FLAGS)
flags.DEFINE_integer("top", 8, "Kernel ops listed per region (0 = none).", lower_bound=0, flag_values=_FLAGS)


def main(argv: list[str] | None = None) -> int:
    """Print the kernel ops, views, host syncs and MB written per rollout step and training micro-step."""
    parsed = parse_flags(_FLAGS, argv, __doc__ or "", "python -m flow_grpo.bench.eager_costs")
    settings = default_settings(parsed.size, dtype=parsed.dtype, device=parsed.device)
    device = torch.device(parsed.device)
    models = build_models(model_spec(parsed.size), settings, device, DTYPE_FLAGS[parsed.dtype], optimized=False)
    flow = count_rollout(models, settings, branches=False)
    tp = count_rollout(models, settings, branches=True)
    training = count_training(models, settings)
    rows = rollout_rows("Flow-GRPO rollout", flow, settings.num_steps) + rollout_rows("TP-GRPO rollout", tp, settings.num_steps)
    heading = (
        f"eager costs: --size {parsed.size} --dtype {parsed.dtype} --device {parsed.device}; {settings.prompts} prompts, "
        f"{settings.num_steps} steps, window {settings.window_size}, LoRA r{settings.lora_rank}, KL reference pass"
    )
    print(format_costs(rows + training_rows(training), heading))
    if parsed.top:
        steps, micro = range(settings.num_steps), range(training.step + 1)
        print("most frequent kernel ops (per step):")
        print("\n".join(_top_ops(flow, steps, label, parsed.top) for label in ("transformer", "sampler")))
        print("\n".join(_top_ops(training, micro, label, parsed.top) for label in ("policy", "loss", "backward")))
    forwards = [(f"transformer forward: {name}", counts.per(1)) for name, counts in lora_forward_costs().items()]
    print(format_costs(forwards, "SD3.5-Medium's 24-layer block layout at a small width, bf16 autocast, 2 rows, no gradients"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
