"""Fused multi-adapter training: several runs' micro-batches in one forward and one backward over the shared base.

With `fused=True`, runs at the same chunk form a group (at most `max_fused`). Each round, every member's step
generator (`MultiConfigMixin._train_steps`, the same code rotation runs) yields its next micro-batch; the batches
are concatenated along the batch dimension (padded to the longest sequence), the frozen base runs once, and every
LoRA layer adds each run's adapter to that run's rows only (`_mixed_forward`: PEFT's `adapter_names=` mixed batch
refuses training mode, and it indexes rows where contiguous slices suffice). With equal micro-batch sizes a layer
computes all adapters' updates in two batched matmuls; otherwise it applies them segment by segment. Each run's
loss comes from TRL's own `compute_loss` on its rows of the fused LM head's per-token outputs, the losses are summed
and backpropagated once (rows never mix in a causal LM, so each adapter's gradient is exactly its own run's), and
each generator then does its own gradient clipping, optimizer and scheduler steps, logging and callbacks.

Equal to rotation up to floating-point summation order: the same sums are computed over differently shaped matrices
(more rows, a longer padded sequence, batched matmuls), which a BLAS may reduce in another order (on the test CPU the
adapters differ by at most 4e-7; the promise is max abs diff <= 1e-4). With LoRA dropout, the group's
random masks come from its first run's generator, so runs see different (equally valid) masks than in rotation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Generator, Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from trl.trainer.utils import FusedCausalLMOutput

from .parking import capture_rng, reload_optimizer, restore_rng
from .run import Run

logger = logging.getLogger(__name__)

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
        return delta.reshape(*x.shape[:-1], bt_scaled.shape[-1])

    @staticmethod
    def backward(ctx, grad):
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


@functools.lru_cache(maxsize=256)
def _scales(scales: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-segment LoRA scalings as a `[K, 1, 1]` tensor, made once per group (not copied to the device per layer)."""
    return torch.tensor(scales, dtype=dtype, device=device).view(-1, 1, 1)


@contextlib.contextmanager
def mixed_adapters(layers: Sequence[LoraLinear], segments: Sequence[tuple[str, slice]]):
    """Within the block, `layers` apply each segment's adapter to its rows (kept through the backward, which
    re-runs forwards under gradient checkpointing)."""
    for layer in layers:
        layer.forward = functools.partial(_mixed_forward, layer, _LayerPlan(layer, segments))
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the tensors autograd saves for the backward (each storage once, parameters excluded): the
    activation memory of a forward, measured where no allocator reports a peak (CPU)."""

    def __init__(self, parameter_storages: frozenset[int]):
        self.bytes = 0
        counted = set()

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameter_storages and storage.data_ptr() not in counted:
                counted.add(storage.data_ptr())
                self.bytes += storage.nbytes()
            return tensor

        super().__init__(pack, lambda tensor: tensor)


def _free_memory(device: torch.device) -> int | None:
    """Bytes free for a fused round: the CUDA device's free memory, or the host's available memory (Linux; None where
    it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


class _Rows:
    """Stands in for the model in TRL's `compute_loss`: one run's rows of the group's fused-LM-head outputs."""

    def __init__(self, outputs: FusedCausalLMOutput, rows: slice, length: int):
        self.outputs, self.rows, self.length = outputs, rows, length

    def _cut(self, value: torch.Tensor | None) -> torch.Tensor | None:
        return None if value is None else value[self.rows, : self.length - 1]

    def __call__(self, *args, fused_lm_head: bool = False, num_items_in_batch=None, **kwargs) -> FusedCausalLMOutput:
        if not fused_lm_head:
            raise RuntimeError("fused training computes losses through TRL's fused LM head only")
        out = self.outputs
        log_probs, mask = self._cut(out.log_probs), self._cut(out.label_mask)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=self._cut(out.entropy),
            log_sum_sq_probs=self._cut(out.log_sum_sq_probs),
            mean_logits=self._cut(out.mean_logits),
            is_top1=self._cut(out.is_top1),
            label_mask=mask,
        )


Request = tuple[dict[str, Any], Any, Any]  # (inputs, num_items_in_batch, sync_context) from `_train_steps`


class FusedMixin:
    """Trains groups of runs with one forward and one backward per micro-batch round (see the module docstring)."""

    def _init_fused(self, fused: bool, max_fused: int | str) -> None:
        self._rf_fused = fused
        self._rf_max_fused = max_fused
        self._rf_group: list[Run] = []
        self._rf_fusable: dict[str, bool] = {}  # by adapter name
        self._rf_model_index: tuple = (None, [], frozenset())
        self._rf_row_bytes = 0.0  # peak device memory per batch row of a fused round (CUDA), for max_fused="auto"
        self._rf_counted_length = 0  # CPU: the longest padded round whose saved bytes were counted

    def _check_fused(self, max_fused: int | str) -> None:
        """Refuse, before training, what the fused forward cannot serve (it relies on TRL's fused LM head and on
        each micro-batch's rows being separate sequences)."""
        if max_fused != "auto" and (isinstance(max_fused, bool) or not isinstance(max_fused, int) or max_fused < 1):
            raise ValueError(f"max_fused={max_fused!r} is invalid; use an int >= 1 or 'auto'")
        refused = {
            "compute_loss_func": self.compute_loss_func is not None,
            "label_smoothing_factor": self.label_smoother is not None,
            "padding_free": self.args.padding_free,
            "use_liger_kernel": self.args.use_liger_kernel,
            "router aux loss (output_router_logits)": self.aux_loss_enabled,
            "several processes": self.args.world_size > 1,
            "a vision data set": self._is_vision_dataset,
        }
        for name, used in refused.items():
            if used:
                raise ValueError(f"fused=True cannot be combined with {name}; use fused=False (rotation)")

    # --------------------------------------------------------------------------------------------- grouping
    def _fused_group(self, run: Run) -> list[Run]:
        """`run` and the next active runs at its slice that can share its forward, up to the group limit."""
        if not self._rf_fused or not self._fusable(run):
            return [run]
        peers = [r for r in self.coordinator.active() if r.next_slice == run.next_slice and self._fusable(r)]
        return peers[: self._group_limit(peers)]

    def _fusable(self, run: Run) -> bool:
        """Vanilla LoRA on linear layers only (no DoRA or other variant, no embedding or saved modules)."""
        adapter = run.spec.adapter_name
        if adapter not in self._rf_fusable:
            config = run.spec.peft_config
            fusable = isinstance(self.model, PeftModel) and isinstance(config, LoraConfig)
            fusable = fusable and not (config.modules_to_save or config.trainable_token_indices or config.use_dora)
            layers = (m for m in self.model.modules() if isinstance(m, BaseTunerLayer))
            self._rf_fusable[adapter] = fusable and all(
                isinstance(m, LoraLinear) and adapter not in m.lora_variant
                for m in layers
                if adapter in m._get_available_adapters()
            )
        return self._rf_fusable[adapter]

    def _group_limit(self, peers: list[Run]) -> int:
        """`max_fused`, or with "auto": as many runs as the free memory holds, from the memory per batch row measured
        in earlier rounds (4 until measured; 8 where the free memory is unknown)."""
        if self._rf_max_fused != "auto":
            return self._rf_max_fused
        if not self._rf_row_bytes:
            return 4
        free = _free_memory(self.args.device)
        if free is None:
            return 8
        rows = max(run.plan.batch_size for run in peers)
        return max(1, int(0.8 * free / (self._rf_row_bytes * rows)))

    def _model_index(self) -> tuple[list[LoraLinear], frozenset[int]]:
        """The LoRA layers and the parameters' storage addresses, re-read only when adapters are added or deleted."""
        key = tuple(self.model.peft_config)
        if self._rf_model_index[0] != key:
            layers = [m for m in self.model.modules() if isinstance(m, LoraLinear)]
            storages = frozenset(param.untyped_storage().data_ptr() for param in self.model.parameters())
            self._rf_model_index = (key, layers, storages)
        return self._rf_model_index[1:]

    def _fused_model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the group's one forward, from the concatenated micro-batches (SFT: as they are)."""
        return inputs

    # ---------------------------------------------------------------------------------------------- training
    def _train_group(self, group: list[Run], trial, ignore_keys_for_eval) -> None:
        """Train one slice of every run in `group` together, then close each slice as rotation would."""
        steps: dict[str, Generator] = {}  # by run name (runs are dataclasses, not hashable)
        for run in group:
            _, steps[run.name] = self._begin_slice(run, trial, ignore_keys_for_eval)
        for run in group:
            if run.offloaded:  # parked while the next member was activated
                reload_optimizer(run.attributes["optimizer"], self.args.device)
                run.offloaded = False
            for param in run.trainable:
                param.requires_grad_(True)
        self._sync_attributes(self._rf_active)
        self._rf_active.rng = capture_rng()
        self._rf_group = group
        began = time.time()
        requests: dict[str, Request] = {}
        outcomes: dict[str, tuple[bool, bool] | Exception] = {}
        losses: dict[str, torch.Tensor | Exception] = {}
        try:
            while steps:
                for run in group:
                    if run.name not in steps:
                        continue
                    self._enter(run)
                    try:
                        loss = losses.pop(run.name, None)
                        if loss is None:
                            requests[run.name] = next(steps[run.name])
                        elif isinstance(loss, Exception):
                            requests[run.name] = steps[run.name].throw(loss)
                        else:
                            requests[run.name] = steps[run.name].send(loss)
                    except StopIteration as stop:
                        outcomes[run.name] = stop.value
                    except Exception as error:
                        outcomes[run.name] = error
                    finally:
                        self._leave(run)
                    if run.name in outcomes:
                        del steps[run.name]
                if requests:
                    losses = self._fused_round(
                        [(run, requests.pop(run.name)) for run in group if run.name in requests]
                    )
        finally:
            self._rf_group = []
        elapsed = time.time() - began
        self._rf_active = None  # every member is parked; `_end_slice` activates each in turn
        for run in group:
            outcome = outcomes[run.name]
            if isinstance(outcome, Exception):
                self._activate(run)
                self._slice_failed(run, outcome)
            else:
                self._end_slice(run, *outcome, time.time() - elapsed, ignore_keys_for_eval)

    def _enter(self, run: Run, rng: bool = True) -> None:
        """Swap `run`'s attributes (and with `rng`, its generators) in, keeping the group's adapters as they are."""
        for name in self.run_attributes:
            setattr(self, name, run.attributes[name])
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler
        self._rf_active = run
        if rng:
            restore_rng(run.rng)

    def _leave(self, run: Run) -> None:
        self._sync_attributes(run)
        run.rng = capture_rng()

    def _fused_round(self, requests: list[tuple[Run, Request]]) -> dict[str, torch.Tensor | Exception]:
        """One forward and one backward for every run's micro-batch; if it raises, each run's micro-batch is retried
        alone so that only a run whose own batch fails gets the error."""
        try:
            return self._forward_backward(requests)
        except Exception as error:
            if len(requests) == 1:
                return {requests[0][0].name: error}
            logger.warning("fused step of %d runs failed (%s); retrying run by run", len(requests), error)
            results = {}
            for run, request in requests:
                try:
                    results.update(self._forward_backward([(run, request)]))
                except Exception as own_error:
                    results[run.name] = own_error
            return results

    def _forward_backward(self, requests: list[tuple[Run, Request]]) -> dict[str, torch.Tensor]:
        batches = []
        for run, (inputs, _, _) in requests:
            self._enter(run, rng=False)  # moving tensors draws no random numbers (and the forward's come from `first`)
            batches.append(self._prepare_inputs(inputs))
        inputs, rows, lengths = concat_batches(batches)
        segments = [(run.spec.adapter_name, r) for (run, _), r in zip(requests, rows)]
        model = self.model_wrapped
        first = requests[0][0]
        restore_rng(first.rng)  # dropout masks come from the group's first run's generator
        cuda = inputs["input_ids"].is_cuda
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        # Without a device allocator's peak, count the bytes autograd keeps for the backward: only for "auto" and only
        # in a round longer than any counted so far (the bytes per row grow with the padded length; a hook call per
        # saved tensor in every round cost ~4% of a small model's round).
        layers, parameter_storages = self._model_index()
        longest = inputs["input_ids"].shape[1]
        saved = None
        if not cuda and len(requests) > 1 and self._rf_max_fused == "auto" and longest > self._rf_counted_length:
            saved = _SavedBytes(parameter_storages)
        with mixed_adapters(layers, segments), self.maybe_activation_offload_context:
            model.train()
            with self.compute_loss_context_manager(), saved or contextlib.nullcontext():
                outputs = model(**self._fused_model_inputs(inputs), use_cache=False, fused_lm_head=True)
            first.rng = capture_rng()
            losses, total = {}, None
            for (run, (_, num_items_in_batch, _)), batch, r, length in zip(requests, batches, rows, lengths):
                self._enter(run)
                if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                    self.optimizer.train()
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(_Rows(outputs, r, length), batch, num_items_in_batch=num_items_in_batch)
                if self.args.n_gpu > 1:
                    loss = loss.mean()
                scaled = self.loss_is_scaled_for_ga
                if scaled is None:
                    scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
                if not scaled:
                    loss = loss / self.current_gradient_accumulation_steps
                self._leave(run)
                losses[run.name] = loss
                if math.isfinite(loss.item()):  # a non-finite loss stays out of the backward; its run fails
                    total = loss if total is None else total + loss
            for run, _ in requests:  # a loss that disabled the adapters (DPO's reference pass) re-set `requires_grad`
                for param in run.trainable:
                    param.requires_grad_(True)
            restore_rng(first.rng)
            if total is not None:
                self.accelerator.backward(total)
            first.rng = capture_rng()
        rows_total = inputs["input_ids"].shape[0]
        if cuda:
            self._rf_row_bytes = max(self._rf_row_bytes, (torch.cuda.max_memory_allocated() - before) / rows_total)
        elif saved is not None:  # doubled: the backward holds activations' gradients next to what is left of them
            self._rf_row_bytes = max(self._rf_row_bytes, 2 * saved.bytes / rows_total)
            self._rf_counted_length = longest
        return {name: loss.detach() for name, loss in losses.items()}

    def evaluate(self, *args, **kwargs):
        """`Trainer.evaluate` with the current run's adapter alone, also when called mid-group (`eval_steps`)."""
        if not self._rf_group:
            return super().evaluate(*args, **kwargs)
        self.model.set_adapter(self._rf_active.spec.adapter_name)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            for run in self._rf_group:
                for param in run.trainable:
                    param.requires_grad_(True)
