"""Fused multi-adapter training: several runs' micro-batches in one forward and one backward over the shared base.

With `fused=True`, runs at the same chunk form a group (at most `max_fused`). Each round, every member's step
generator (`RotationLoop._train_steps` in `loop.py`, the code rotation runs) yields its next micro-batch; the batches
are concatenated along the batch dimension (padded to the longest sequence), the frozen base runs once, and every
LoRA layer adds each run's adapter to that run's rows only (`fused_lora.py`: PEFT's `adapter_names=` mixed batch
refuses training mode, and it indexes rows where contiguous slices suffice). With equal micro-batch sizes a layer
computes all adapters' updates in two batched matmuls (sibling q/k/v and gate/up layers, with their frozen base, in
one autograd node); otherwise it applies them segment by segment. Each run's loss comes from TRL's own `compute_loss`
on its rows of the fused LM head's per-token outputs, the losses are summed and backpropagated once (rows never mix in
a causal LM, so each adapter's gradient is exactly its own run's), and each generator then does its own gradient
clipping, optimizer and scheduler steps, logging and callbacks.

Equal to rotation up to floating-point summation order: the same sums are computed over differently shaped matrices
(more rows, a longer padded sequence, batched matmuls), which a BLAS may reduce in another order (on the test CPU the
adapters differ by at most 4e-7; the promise is max abs diff <= 1e-4). With LoRA dropout, the group's
random masks come from its first run's generator, so runs see different (equally valid) masks than in rotation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Generator
from typing import Any

import torch
import trl.trainer.utils as trl_utils
from peft import LoraConfig, PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from trl.trainer.utils import FusedCausalLMOutput

from .fused_lora import concat_batches, mixed_adapters, round_forwards
from .parking import capture_rng, reload_optimizer, restore_rng
from .run import Run

logger = logging.getLogger(__name__)


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


@contextlib.contextmanager
def _labelled_positions_only():
    """TRL's fused LM head scores only the positions with a label where Triton runs, and every position elsewhere
    (fixed tile shapes for compiled backends such as Neuron). On a CPU nothing is compiled, and a fused round's batch
    is padded to its longest run and carries every prompt token, so score only the labelled positions there too: the
    same per-position values (the unlabelled ones are zeros either way), without the head's work on the rest."""
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


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


class FusedRounds:
    """Trains groups of runs with one forward and one backward per micro-batch round (see the module docstring).

    It uses the trainer only through the interface `docs/maintainers.md` lists (a test holds it to the code).

    Args:
        trainer (`MultiConfigMixin`): the trainer whose runs it groups.
        fused (`bool`): `fused=` as given; when `False`, every group is one run.
        max_fused (`int` or `"auto"`): the most runs in one group; `"auto"`: as many as the free memory holds.
    """

    def __init__(self, trainer: Any, fused: bool, max_fused: int | str):
        self.trainer, self.fused, self.max_fused = trainer, fused, max_fused
        self.members: list[Run] = []  # the group training now (`evaluate` reads it)
        self._fusable: dict[str, bool] = {}  # by adapter name
        self._model_index: tuple = (None, [], [], frozenset())
        # The slice's `round_forwards` by segments: the plans read the adapters' modules, which change only between
        # slices (ops, clones, deletions), so they are read once per slice rather than every round (~3 % of a round).
        self._forwards: dict[tuple, list] = {}
        self.row_bytes = 0.0  # peak device memory per batch row of a fused round (CUDA), for max_fused="auto"
        self._counted_length = 0  # CPU: the longest padded round whose saved bytes were counted
        if fused:
            self._check()

    def _check(self) -> None:
        """Refuse, before training, what the fused forward cannot serve (it relies on TRL's fused LM head and on
        each micro-batch's rows being separate sequences)."""
        max_fused, trainer = self.max_fused, self.trainer
        if max_fused != "auto" and (isinstance(max_fused, bool) or not isinstance(max_fused, int) or max_fused < 1):
            raise ValueError(f"max_fused={max_fused!r} is invalid; use an int >= 1 or 'auto'")
        refused = {
            "compute_loss_func": trainer.compute_loss_func is not None,
            "label_smoothing_factor": trainer.label_smoother is not None,
            "padding_free": trainer.args.padding_free,
            "use_liger_kernel": trainer.args.use_liger_kernel,
            "router aux loss (output_router_logits)": trainer.aux_loss_enabled,
            "several processes": trainer.args.world_size > 1,
            "a vision data set": trainer._is_vision_dataset,
        }
        for name, used in refused.items():
            if used:
                raise ValueError(f"fused=True cannot be combined with {name}; use fused=False (rotation)")

    # --------------------------------------------------------------------------------------------- grouping
    def group_of(self, run: Run) -> list[Run]:
        """`run` and the next active runs at its slice that can share its forward, up to the group limit."""
        if not self.fused or not self._can_fuse(run):
            return [run]
        peers = [r for r in self.trainer.coordinator.active() if r.next_slice == run.next_slice and self._can_fuse(r)]
        return peers[: self._group_limit(peers)]

    def _can_fuse(self, run: Run) -> bool:
        """Vanilla LoRA on linear layers only (no DoRA or other variant, no embedding or saved modules)."""
        adapter, model = run.spec.adapter_name, self.trainer.model
        if adapter not in self._fusable:
            config = run.spec.peft_config
            fusable = isinstance(model, PeftModel) and isinstance(config, LoraConfig)
            fusable = fusable and not (config.modules_to_save or config.trainable_token_indices or config.use_dora)
            layers = (m for m in model.modules() if isinstance(m, BaseTunerLayer))
            self._fusable[adapter] = fusable and all(
                isinstance(m, LoraLinear) and adapter not in m.lora_variant
                for m in layers
                if adapter in m._get_available_adapters()
            )
        return self._fusable[adapter]

    def _group_limit(self, peers: list[Run]) -> int:
        """`max_fused`, or with "auto": as many runs as the free memory holds, from the memory per batch row measured
        in earlier rounds (4 until measured; 8 where the free memory is unknown)."""
        if self.max_fused != "auto":
            return self.max_fused
        if not self.row_bytes:
            return 4
        free = _free_memory(self.trainer.args.device)
        if free is None:
            return 8
        rows = max(run.plan.batch_size for run in peers)
        return max(1, int(0.8 * free / (self.row_bytes * rows)))

    def _layers(self) -> tuple[list[LoraLinear], list[str], frozenset[int]]:
        """The LoRA layers, their names and the parameters' storage addresses, re-read only when adapters are added or
        deleted."""
        model = self.trainer.model
        key = tuple(model.peft_config)
        if self._model_index[0] != key:
            named = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]
            storages = frozenset(param.untyped_storage().data_ptr() for param in model.parameters())
            self._model_index = (key, [m for _, m in named], [name for name, _ in named], storages)
        return self._model_index[1:]

    # ---------------------------------------------------------------------------------------------- training
    def train(self, group: list[Run], trial, ignore_keys_for_eval) -> None:
        """Train one slice of every run in `group` together, then close each slice as rotation would."""
        trainer = self.trainer
        steps: dict[str, Generator] = {}  # by run name (runs are dataclasses, not hashable)
        for run in group:
            _, steps[run.name] = trainer._begin_slice(run, trial, ignore_keys_for_eval)
        for run in group:
            if run.offloaded:  # parked while the next member was activated
                reload_optimizer(run.attributes["optimizer"], trainer.args.device)
                run.offloaded = False
            for param in run.trainable:
                param.requires_grad_(True)
        trainer._sync_attributes(trainer.active_run)
        trainer.active_run.rng = capture_rng()
        self.members = group
        began = time.time()
        requests: dict[str, Request] = {}
        outcomes: dict[str, tuple[bool, bool] | Exception] = {}
        losses: dict[str, torch.Tensor | Exception] = {}
        try:
            while steps:
                for run in group:
                    if run.name not in steps:
                        continue
                    trainer._enter(run)
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
                        trainer._leave(run)
                    if run.name in outcomes:
                        del steps[run.name]
                if requests:
                    losses = self._round([(run, requests.pop(run.name)) for run in group if run.name in requests])
        finally:
            self.members, self._forwards = [], {}
        elapsed = time.time() - began
        trainer._park(trainer.active_run)  # every member's state is in its run; `_end_slice` activates each in turn
        for run in group:
            outcome = outcomes[run.name]
            if isinstance(outcome, Exception):
                trainer._activate(run)
                trainer._slice_failed(run, outcome)
            else:
                trainer._end_slice(run, *outcome, time.time() - elapsed, ignore_keys_for_eval)

    def _round(self, requests: list[tuple[Run, Request]]) -> dict[str, torch.Tensor | Exception]:
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
        trainer = self.trainer
        batches = []
        for run, (inputs, _, _) in requests:
            trainer._enter(
                run, rng=False
            )  # moving tensors draws no random numbers (and the forward's come from `first`)
            batches.append(trainer._prepare_inputs(inputs))
        inputs, rows, lengths = concat_batches(batches)
        segments = [(run.spec.adapter_name, r) for (run, _), r in zip(requests, rows)]
        model = trainer.model_wrapped
        first = requests[0][0]
        restore_rng(first.rng)  # dropout masks come from the group's first run's generator
        cuda = inputs["input_ids"].is_cuda
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        # Without a device allocator's peak, count the bytes autograd keeps for the backward: only for "auto" and only
        # in a round longer than any counted so far (the bytes per row grow with the padded length; a hook call per
        # saved tensor in every round cost ~4% of a small model's round).
        layers, names, parameter_storages = self._layers()
        longest = inputs["input_ids"].shape[1]
        saved = None
        if not cuda and len(requests) > 1 and self.max_fused == "auto" and longest > self._counted_length:
            saved = _SavedBytes(parameter_storages)
        key = (self._model_index[0], *((adapter, r.start, r.stop) for adapter, r in segments))
        if key not in self._forwards:
            self._forwards[key] = round_forwards(layers, segments, names)
        with mixed_adapters(self._forwards[key]), trainer.maybe_activation_offload_context:
            model.train()
            with trainer.compute_loss_context_manager(), saved or contextlib.nullcontext(), _labelled_positions_only():
                outputs = model(**trainer._fused_model_inputs(inputs), use_cache=False, fused_lm_head=True)
            first.rng = capture_rng()
            losses, total = {}, None
            for (run, (_, num_items_in_batch, _)), batch, r, length in zip(requests, batches, rows, lengths):
                trainer._enter(run)
                if hasattr(trainer.optimizer, "train") and callable(trainer.optimizer.train):
                    trainer.optimizer.train()
                with trainer.compute_loss_context_manager():
                    loss = trainer.compute_loss(
                        _Rows(outputs, r, length), batch, num_items_in_batch=num_items_in_batch
                    )
                if trainer.args.n_gpu > 1:
                    loss = loss.mean()
                scaled = trainer.loss_is_scaled_for_ga
                if scaled is None:
                    scaled = trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
                if not scaled:
                    loss = loss / trainer.current_gradient_accumulation_steps
                trainer._leave(run)
                losses[run.name] = loss
                if math.isfinite(loss.item()):  # a non-finite loss stays out of the backward; its run fails
                    total = loss if total is None else total + loss
            for run, _ in requests:  # a loss that disabled the adapters (DPO's reference pass) re-set `requires_grad`
                for param in run.trainable:
                    param.requires_grad_(True)
            restore_rng(first.rng)
            if total is not None:
                trainer.accelerator.backward(total)
            first.rng = capture_rng()
        rows_total = inputs["input_ids"].shape[0]
        if cuda:
            self.row_bytes = max(self.row_bytes, (torch.cuda.max_memory_allocated() - before) / rows_total)
        elif saved is not None:  # doubled: the backward holds activations' gradients next to what is left of them
            self.row_bytes = max(self.row_bytes, 2 * saved.bytes / rows_total)
            self._counted_length = longest
        return {name: loss.detach() for name, loss in losses.items()}
