"""The fused round's tensor parts: concatenating runs' micro-batches, and LoRA layers that add each run's adapter
to that run's rows only.

`mixed_adapters(round_forwards(layers, segments, names))` patches every LoRA layer's forward for one round: the frozen
base runs once over the concatenated batch, and each run's LoRA update is added to its own rows. Per layer, the
round's segments give a `_LayerPlan`, with one of these paths: unequal segments go segment by segment
(`_looped_delta`); equal segments with LoRA dropout through stacked products recorded op by op
(`_stacked_dropout_delta`); equal segments without dropout through hand-written autograd nodes (ranks zero-padded to
the largest, a run without an adapter on that layer gets zeros; batch k of every `bmm` reads only adapter k, so a NaN
stays in its run). Over a plain frozen `nn.Linear` base, that node (`_FusedLinears`) also computes the base product,
for all sibling layers that read the same input at once (q/k/v, gate/up: one `mm` for their bases, one `bmm` for all
adapters' down-projections, one `baddbmm` per layer for the up-projections); otherwise `_StackedLoRA` computes the
adapters' update alone. At this size the products are cheap and the cost is per op and per autograd node, so fewer,
larger nodes are what makes a round fast. Training groups of runs with these is `fused.py`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear

_PAD = {"labels": -100}  # every other padded key (input_ids, attention_mask, position_ids) is masked out anyway


def concat_batches(batches: Sequence[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[slice], list[int]]:
    """Concatenate collated micro-batches along the batch dimension, right-padding sequences to the longest.

    Returns the batch, each input's rows, and each input's sequence length.
    """
    keys = set(batches[0])
    if any(set(batch) != keys for batch in batches):
        raise ValueError(f"micro-batches have different keys: {[sorted(batch) for batch in batches]}")
    lengths = [batch["input_ids"].shape[1] for batch in batches]
    longest = max(lengths)
    fused = {}
    for key in batches[0]:
        parts = []
        for batch, length in zip(batches, lengths):
            value = batch[key]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"micro-batch key {key!r} holds a {type(value).__name__}, not a tensor")
            if value.dim() >= 2 and value.shape[1] == length < longest:
                pad = value.new_full((value.shape[0], longest - length, *value.shape[2:]), _PAD.get(key, 0))
                value = torch.cat([value, pad], dim=1)
            parts.append(value)
        fused[key] = torch.cat(parts)
    rows, start = [], 0
    for batch in batches:
        rows.append(slice(start, start + batch["input_ids"].shape[0]))
        start = rows[-1].stop
    return fused, rows, lengths


class _LayerPlan:
    """What a LoRA layer does with a fused round's segments, read once per round (the adapters' `Parameter` objects
    stay the same while the optimizers update them in place) instead of at every forward call."""

    __slots__ = ("dtype", "path", "present", "rows", "scales", "segments", "sizes", "weights")

    def __init__(self, layer: LoraLinear, segments: Sequence[tuple[str, slice]]):
        self.segments = segments
        self.rows = segments[-1][1].stop
        self.sizes = [rows.stop - rows.start for _, rows in segments]
        adapters = [adapter for adapter, _ in segments]
        self.present = tuple(adapter in layer.lora_A for adapter in adapters)
        here = [adapter for adapter, present in zip(adapters, self.present) if present]
        dtypes = {layer.lora_A[adapter].weight.dtype for adapter in here}
        self.dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
        self.scales = tuple(
            layer.scaling[adapter] if present else 0.0 for adapter, present in zip(adapters, self.present)
        )
        self.weights = tuple(w for a in here for w in (layer.lora_A[a].weight, layer.lora_B[a].weight))
        if not here:
            self.path = "base"
        elif len(set(self.sizes)) > 1 or self.dtype is None or any(layer.lora_bias.get(a) for a in here):
            self.path = "looped"
        elif all(isinstance(layer.lora_dropout[a], torch.nn.Identity) for a in here):
            self.path = "stacked"
        else:
            self.path = "stacked_dropout"


def _mixed_forward(layer: LoraLinear, plan: _LayerPlan, x: torch.Tensor, *args, **kwargs):
    """`lora.Linear.forward` for a batch whose row segments belong to different adapters (vanilla LoRA: per row, the
    same operations as PEFT's forward with that row's adapter alone). Segments of equal size (and adapters of one
    dtype, without `lora_bias`) take the stacked path, the others the looped one."""
    if layer.disable_adapters:  # e.g. DPO's reference pass inside a fused round: the base alone
        return layer.base_layer(x, *args, **kwargs)
    if x.shape[0] != plan.rows:
        raise RuntimeError(f"fused LoRA forward: a layer got {x.shape[0]} rows, expected {plan.rows}")
    result = layer.base_layer(x, *args, **kwargs)
    if plan.path == "base":
        return result
    if plan.path == "stacked":
        delta = _StackedLoRA.apply(layer._cast_input_dtype(x, plan.dtype), plan.present, plan.scales, *plan.weights)
    elif plan.path == "stacked_dropout":
        delta = _stacked_dropout_delta(layer, [adapter for adapter, _ in plan.segments], x, plan.dtype)
    else:
        delta = _looped_delta(layer, plan.segments, plan.sizes, x, result)
    return (result + delta).to(result.dtype)  # added in the promoted dtype, then cast, as PEFT does


def _looped_delta(layer: LoraLinear, segments, sizes: list[int], x: torch.Tensor, result: torch.Tensor):
    """Each segment through its own adapter's `lora_A`/`lora_B` modules."""
    # One `split` and one `cat`: their backwards are one concatenation and views. Slicing rows instead makes every
    # segment's backward write a zero-filled gradient of the whole batch (quadratic in the group size).
    deltas = []
    for (adapter, _), sub, size in zip(segments, x.split(sizes), sizes):
        if adapter in layer.lora_A:
            lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
            sub = layer._cast_input_dtype(sub, lora_A.weight.dtype)
            deltas.append(lora_B(lora_A(layer.lora_dropout[adapter](sub))) * layer.scaling[adapter])
        else:
            deltas.append(result.new_zeros((size, *result.shape[1:])))
    return torch.cat(deltas)


def _stacked_dropout_delta(layer: LoraLinear, adapters: list[str], x: torch.Tensor, dtype: torch.dtype):
    """Equal segments with LoRA dropout: the stacked products of `_StackedLoRA`, recorded op by op by autograd (the
    dropout masks are drawn per segment, from the adapter's own dropout module, as PEFT draws them)."""
    x = layer._cast_input_dtype(x, dtype)
    rank = max(layer.r[adapter] for adapter in adapters if adapter in layer.lora_A)
    a_parts, b_parts, scales, dropouts = [], [], [], []
    for adapter in adapters:
        if adapter in layer.lora_A:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            pad = rank - a.shape[0]
            a_parts.append(torch.nn.functional.pad(a, (0, 0, 0, pad)) if pad else a)
            b_parts.append(torch.nn.functional.pad(b, (0, pad)) if pad else b)
            scales.append(layer.scaling[adapter])
            dropouts.append(layer.lora_dropout[adapter])
        else:
            a_parts.append(x.new_zeros((rank, layer.in_features)))
            b_parts.append(x.new_zeros((layer.out_features, rank)))
            scales.append(0.0)
            dropouts.append(torch.nn.Identity())
    segments = x.reshape(len(adapters), -1, x.shape[-1])
    segments = torch.stack([dropout(segment) for dropout, segment in zip(dropouts, segments)])
    delta = torch.bmm(torch.bmm(segments, torch.stack(a_parts).transpose(1, 2)), torch.stack(b_parts).transpose(1, 2))
    delta = delta * _scales(tuple(scales), delta.device, delta.dtype)
    return delta.reshape(*x.shape[:-1], layer.out_features)


class _StackedLoRA(torch.autograd.Function):
    """Equal segments without dropout: `delta_k = scale_k * x_k @ A_k^T @ B_k^T` for every segment `k` in two batched
    matmuls, `[K, rows, in] @ [K, in, r] @ [K, r, out]`, with a hand-written backward.

    The adapters' weights are copied into stacks `[K, r, in]` and `[K, r, out]` (ranks zero-padded to the largest,
    all zeros where a segment's adapter is not on the layer, the scale folded into the second: the same products in
    another order) outside autograd, so the graph holds one node per layer instead of a stack, a pad, a transpose and
    a scaling per adapter; the backward computes every adapter's gradients with four batched matmuls and hands each
    adapter its unpadded block. Batch `k` of a `bmm` reads only adapter `k`'s weights and rows, so a non-finite
    adapter still reaches only its own run's rows (no `0 * NaN` across runs).

    Inputs: `x` `[K * rows, ..., in]`, which segments have an adapter, the `K` scalings, then `A`, `B` of each present
    adapter in segment order.
    """

    @staticmethod
    def forward(ctx, x, present, scales, *weights):
        a_list, b_list = weights[0::2], weights[1::2]
        ranks = [a.shape[0] for a in a_list]
        if all(present) and len(set(ranks)) == 1:
            a_stack, bt_stack = torch.stack(a_list), torch.stack([b.t() for b in b_list])
        else:  # pad_sequence zero-pads along the rank dimension in one call; absent adapters are rank 0
            a_iter, b_iter = iter(a_list), iter(b_list)
            empty_a, empty_b = x.new_empty((0, a_list[0].shape[1])), x.new_empty((0, b_list[0].shape[0]))
            a_parts = [next(a_iter) if here else empty_a for here in present]
            b_parts = [next(b_iter).t() if here else empty_b for here in present]
            a_stack = torch.nn.utils.rnn.pad_sequence(a_parts, batch_first=True)
            bt_stack = torch.nn.utils.rnn.pad_sequence(b_parts, batch_first=True)
        bt_scaled = bt_stack * _scales(scales, x.device, bt_stack.dtype)
        segments = x.reshape(len(present), -1, x.shape[-1])
        hidden = torch.bmm(segments, a_stack.transpose(1, 2))  # [K, m, r]
        delta = torch.bmm(hidden, bt_scaled)  # [K, m, out]
        ctx.save_for_backward(segments, hidden, a_stack, bt_scaled)
        ctx.present, ctx.scales, ctx.ranks, ctx.shape = present, scales, ranks, x.shape
        ctx.autocast = _autocast_state(x.device.type)
        return delta.reshape(*x.shape[:-1], bt_scaled.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(*ctx.autocast):
            return _StackedLoRA._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        segments, hidden, a_stack, bt_scaled = ctx.saved_tensors
        grad = grad.reshape(len(ctx.present), -1, bt_scaled.shape[-1])
        grad_hidden = torch.bmm(grad, bt_scaled.transpose(1, 2))  # [K, m, r]
        grad_x = torch.bmm(grad_hidden, a_stack).reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        grad_a = torch.bmm(grad_hidden.transpose(1, 2), segments)  # [K, r, in]
        grad_b = torch.bmm(grad.transpose(1, 2), hidden) * _scales(ctx.scales, grad.device, grad.dtype)  # [K, out, r]
        weight_grads = []
        index = [k for k, here in enumerate(ctx.present) if here]
        for k, rank in zip(index, ctx.ranks):
            weight_grads += [grad_a[k, :rank], grad_b[k, :, :rank]]
        return (grad_x, None, None, *weight_grads)


def _autocast_state(device_type: str) -> tuple[str, torch.dtype, bool]:
    """The forward's autocast state, for a hand-written backward to run its products in the same dtypes as the
    forward's (autograd runs a backward outside autocast: `bf16=True` would meet bf16 gradients with fp32 weights)."""
    return device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)


@functools.lru_cache(maxsize=256)
def _scales(scales: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-segment LoRA scalings as a `[K, 1, 1]` tensor, made once per group (not copied to the device per layer)."""
    return torch.tensor(scales, dtype=dtype, device=device).view(-1, 1, 1)


class _Block:
    """Layers of one fused round that share an input (q/k/v, gate/up: siblings that read the same hidden states) and
    take the stacked path over a plain frozen `nn.Linear` base: on the first member's call, one `_FusedLinears` node
    computes every member's output (base and adapters); the other members' calls, with the same input tensor, get
    theirs from the stash. A member called with another input computes alone (the stash answers only its own input)."""

    def __init__(self, layers: Sequence[LoraLinear], plans: Sequence[_LayerPlan]):
        self.layers, self.plans = tuple(layers), tuple(plans)
        self.bases = tuple(layer.base_layer for layer in layers)
        self.outs = tuple(base.out_features for base in self.bases)
        self.present = plans[0].present
        self.ranks = tuple(max(a.shape[0] for a in plan.weights[0::2]) for plan in plans)  # padded rank per member
        self.weights = tuple(w for plan in plans for w in plan.weights)
        self.scales = plans[0].scales if all(plan.scales == plans[0].scales for plan in plans) else None
        self.versions: tuple = ()
        self.stash: tuple | None = None

    def base_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The members' frozen weights (and biases) as one matrix, concatenated again only if one was changed."""
        versions = tuple(base.weight._version for base in self.bases) + tuple(id(base.weight) for base in self.bases)
        if versions != self.versions:
            self.weight = (
                torch.cat([base.weight for base in self.bases]) if len(self.bases) > 1 else self.bases[0].weight
            )
            biases = [base.bias for base in self.bases]
            self.bias = None if biases[0] is None else torch.cat(biases)
            self.versions = versions
        return self.weight, self.bias

    def forward(self, member: int, x: torch.Tensor) -> torch.Tensor:
        stash = self.stash
        if stash is not None and stash[0] is x and stash[1] == x._version and stash[2][member] is not None:
            out = stash[2][member]
            stash[2][member] = None  # handed out once: a second call (a recomputation) computes again
            return out
        outs = list(_FusedLinears.apply(x, self, *self.base_weight(), *self.weights))
        out, outs[member] = outs[member], None
        self.stash = (x, x._version, outs) if len(outs) > 1 else None
        return out


def _block_forward(layer: LoraLinear, block: _Block, member: int, x: torch.Tensor, *args, **kwargs):
    plan = block.plans[member]
    if layer.disable_adapters or args or kwargs or torch.is_autocast_enabled(x.device.type):
        return _mixed_forward(layer, plan, x, *args, **kwargs)
    if x.dtype != plan.dtype or x.dtype != layer.base_layer.weight.dtype or x.shape[0] != plan.rows:
        return _mixed_forward(layer, plan, x)
    return block.forward(member, x)


def _mergeable(layer: LoraLinear, plan: _LayerPlan) -> bool:
    """The stacked path over a plain, frozen, hook-free `nn.Linear` (quantized or offloaded bases keep theirs)."""
    base = layer.base_layer
    return (
        plan.path == "stacked"
        and plan.scales is not None
        and type(base) is torch.nn.Linear
        and not (base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad))
        and not (base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__)
        and not hasattr(base, "_hf_hook")
    )


# Sibling projections that read the same input in the model families PEFT targets by these names.
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


class _FusedLinears(torch.autograd.Function):
    """`out_j = x @ W_j^T (+ b_j) + scale_k * x_k @ A_jk^T @ B_jk^T` for the members `j` of a `_Block` and the segments
    `k` of the round, as one autograd node: the members' base products are one `mm` (their weights concatenated), the
    adapters' down-projections one `bmm` over `[K, m, in] @ [K, in, sum_j r_j]`, and each member's up-projection one
    `baddbmm` that adds it to the member's base columns; the backward is as few batched products. Each segment `k`
    still reads only its own adapters' weights (batch `k` of every `bmm`), so a non-finite adapter stays in its rows.

    Inputs: `x` `[K * m, ..., in]`, the block, the concatenated base weight and bias, then `A`, `B` of each present
    adapter, member by member in segment order. Outputs: one tensor per member."""

    @staticmethod
    def forward(ctx, x, block, weight, bias, *lora):
        ctx.set_materialize_grads(False)
        count, scales = len(block.present), _scales(block.scales, x.device, x.dtype)
        a_stacks, bt_stacks, flat = [], [], iter(lora)
        empty_a = x.new_empty((0, x.shape[-1]))
        for out_features in block.outs:  # as in `_StackedLoRA`: one stack, or one pad_sequence (absent: rank 0)
            a_parts, b_parts = [], []
            for here in block.present:
                if here:
                    a_parts.append(next(flat))
                    b_parts.append(next(flat).t())
                else:
                    a_parts.append(empty_a)
                    b_parts.append(x.new_empty((0, out_features)))
            if len({a.shape[0] for a in a_parts}) == 1:
                a_stacks.append(torch.stack(a_parts))
                bt_stack = torch.stack(b_parts)
            else:
                a_stacks.append(torch.nn.utils.rnn.pad_sequence(a_parts, batch_first=True))
                bt_stack = torch.nn.utils.rnn.pad_sequence(b_parts, batch_first=True)
            bt_stacks.append(bt_stack * scales)
        a_all = torch.cat(a_stacks, dim=1) if len(a_stacks) > 1 else a_stacks[0]  # [K, sum r, in]
        flat_x = x.reshape(-1, x.shape[-1])
        base = flat_x @ weight.t() if bias is None else torch.addmm(bias, flat_x, weight.t())
        segments = flat_x.view(count, -1, x.shape[-1])
        hidden = torch.bmm(segments, a_all.transpose(1, 2))  # [K, m, sum r]
        base = base.view(count, -1, base.shape[-1])
        outs, col, off = [], 0, 0
        for rank, out_features, bt in zip(block.ranks, block.outs, bt_stacks):
            out = torch.baddbmm(base[:, :, col : col + out_features], hidden[:, :, off : off + rank], bt)
            outs.append(out.view(*x.shape[:-1], out_features))
            col, off = col + out_features, off + rank
        ctx.save_for_backward(segments, hidden, a_all, weight, *bt_stacks)
        ctx.block, ctx.shape = block, x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        segments, hidden, a_all, weight, *bt_stacks = ctx.saved_tensors
        block = ctx.block
        count = len(block.present)
        grads = [
            (g if g is not None else hidden.new_zeros((*ctx.shape[:-1], out))).reshape(count, -1, out)
            for g, out in zip(grads, block.outs)
        ]
        grad_hidden = [torch.bmm(g, bt.transpose(1, 2)) for g, bt in zip(grads, bt_stacks)]
        grad_hidden = torch.cat(grad_hidden, dim=-1) if len(grads) > 1 else grad_hidden[0]  # [K, m, sum r]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_out = torch.cat(grads, dim=-1) if len(grads) > 1 else grads[0]
            grad_x = torch.baddbmm(
                (grad_out.reshape(-1, grad_out.shape[-1]) @ weight).view(count, -1, weight.shape[1]),
                grad_hidden,
                a_all,
            )
            grad_x = grad_x.reshape(ctx.shape)
        grad_a = torch.bmm(grad_hidden.transpose(1, 2), segments)  # [K, sum r, in]
        scales = _scales(block.scales, grad_a.device, grad_a.dtype)
        weight_grads, off = [], 0
        for rank, g, plan in zip(block.ranks, grads, block.plans):
            grad_bt = torch.bmm(hidden[:, :, off : off + rank].transpose(1, 2), g) * scales  # [K, r, out]
            index = [k for k, here in enumerate(block.present) if here]
            for k, a in zip(index, plan.weights[0::2]):
                r = a.shape[0]
                weight_grads += [grad_a[k, off : off + r], grad_bt[k, :r].t()]
            off += rank
        return (grad_x, None, None, None, *weight_grads)


def round_forwards(
    layers: Sequence[LoraLinear], segments: Sequence[tuple[str, slice]], names: Sequence[str] | None = None
) -> list[tuple[LoraLinear, Any]]:
    """The forward each layer takes in a round over `segments`: sibling layers (by name, when `names` are given)
    that can share a `_FusedLinears` node get a `_Block` together, a lone mergeable layer its own, any other layer
    the `_mixed_forward` of its plan."""
    plans = {id(layer): _LayerPlan(layer, segments) for layer in layers}
    forwards, blocked = [], set()
    by_name = dict(zip(names, layers)) if names is not None else {}
    for name in by_name:
        parent, _, child = name.rpartition(".")
        for siblings in _SIBLINGS:
            if child != siblings[0]:
                continue
            members = [by_name.get(f"{parent}.{sibling}" if parent else sibling) for sibling in siblings]
            members = [m for m in members if m is not None and _mergeable(m, plans[id(m)])]
            members = [m for m in members if plans[id(m)].present == plans[id(members[0])].present] if members else []
            if len(members) > 1 and len({m.in_features for m in members}) == 1:
                block = _Block(members, [plans[id(m)] for m in members])
                if block.scales is not None:
                    for j, member in enumerate(members):
                        forwards.append((member, functools.partial(_block_forward, member, block, j)))
                        blocked.add(id(member))
    for layer in layers:
        if id(layer) in blocked:
            continue
        plan = plans[id(layer)]
        if _mergeable(layer, plan):
            forwards.append((layer, functools.partial(_block_forward, layer, _Block([layer], [plan]), 0)))
        else:
            forwards.append((layer, functools.partial(_mixed_forward, layer, plan)))
    return forwards


@contextlib.contextmanager
def mixed_adapters(forwards: Sequence[tuple[LoraLinear, Any]]):
    """Within the block, every layer takes its forward from `round_forwards` (each segment's adapter on its rows;
    kept through the backward, which re-runs forwards under gradient checkpointing)."""
    for layer, forward in forwards:
        layer.forward = forward
    try:
        yield
    finally:
        for layer, forward in forwards:
            del layer.forward
            if forward.func is _block_forward:
                forward.args[1].stash = None  # the round's input and outputs
