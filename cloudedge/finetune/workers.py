"""The fine-tuning worker: one per device (its shard of data), and one at the cloud (the test set).

A worker holds its model and data and nothing of the fleet. Each task brings the full adapter
state it starts from and a seed, so a worker keeps no state between tasks that matters for the
result: a rebuilt worker (resume, another engine) gives the same answer.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from cloudedge.device import autocast, resolve_device
from cloudedge.finetune.lora import sent_keys
from cloudedge.finetune.model import AdapterSlot, adapter_state, build_lora_classifier

# One built model per spec (and device) per process, shared by the workers built from that spec.
# A device worker is built each time its device is sampled and dropped after, so a round of 1,000
# devices would otherwise build the same model 1,000 times. Sharing is sound because no task depends
# on what an earlier task left in the model: every task loads the full adapter state it starts from
# (train, evaluate), the frozen base never changes (merge-mode deltas are applied to the weights kept
# at build time, by the shared slot), `initial_state` returns the state as built, and tasks run one at
# a time in a process (LocalEngine; a Ray host runs one task at a time).
_SHARED: OrderedDict[str, tuple[torch.nn.Module, AdapterSlot, dict[str, torch.Tensor]]] = OrderedDict()
_MAX_SHARED = 2


def _spec_key(spec: Mapping[str, Any], device: torch.device) -> str:
    """The spec as text, each tensor by its content digest (a copied spec gives the same key)."""
    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest = hashlib.blake2b(t.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
            return f"tensor{tuple(t.shape)}{t.dtype}:{digest}"
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return json.dumps({"spec": plain(spec), "device": str(device)}, sort_keys=True, default=str)


def shared_model(spec: Mapping[str, Any], device: torch.device) -> tuple[torch.nn.Module, AdapterSlot, dict[str, torch.Tensor]]:
    """The process's model for ``spec`` on ``device``: (model, its slot, its adapter state as built)."""
    key = _spec_key(spec, device)
    if key not in _SHARED:
        model = build_lora_classifier(spec).to(device)
        _SHARED[key] = (model, AdapterSlot(model), adapter_state(model))
        while len(_SHARED) > _MAX_SHARED:
            _SHARED.popitem(last=False)
    _SHARED.move_to_end(key)
    return _SHARED[key]


class FinetuneWorker:
    """Trains LoRA adapters + head on its data (``train``) or evaluates a state (``evaluate``).

    ``data`` maps input names (``pixel_values`` or ``input_ids``/``attention_mask``) and
    ``labels`` to tensors with one row per sample.
    """

    def __init__(self, spec: dict[str, Any], data: dict[str, torch.Tensor], batch_size: int,
                 optimizer: str = "adamw", lr: float = 3e-3, device: str = "cpu", precision: str = "fp32"):
        self.spec, self.data = spec, data
        self.precision = precision
        # The data stays in host memory; each batch moves to the device. What a task returns
        # crosses the engine in host memory. The device name is resolved on this worker's host.
        self.device = torch.device(resolve_device(device, "finetune.device"))
        self.batch_size, self.optimizer, self.lr = int(batch_size), optimizer, float(lr)
        self.n = int(data["labels"].shape[0])
        self._model = None
        self._slot: AdapterSlot | None = None
        self._trainable_list: list[tuple[str, torch.nn.Parameter]] | None = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model, self._slot, self._initial = shared_model(self.spec, self.device)
        return self._model

    def _inputs(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx].to(self.device) for k, v in self.data.items() if k != "labels"}

    def _labels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data["labels"][idx].to(self.device)

    def _logits(self, idx: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """The model's logits on samples ``idx`` in ``precision`` (default: the worker's; bf16 runs
        under autocast), returned in float32."""
        with autocast(self.device, precision or self.precision):
            return self.model(self._inputs(idx)).float()

    def _loss(self, idx: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        return F.cross_entropy(self._logits(idx, precision), self._labels(idx))

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        # Walked once per worker: a round calls it several times and a module walk is not free.
        if self._trainable_list is None:
            self._trainable_list = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return self._trainable_list

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                          for _, p in self._trainable()])

    def train(self, state: dict[str, torch.Tensor], steps: int, seed: int, stats: bool = False,
              dp: dict[str, Any] | None = None, attack: dict[str, Any] | None = None) -> dict[str, Any]:
        """``steps`` optimizer steps from ``state``; returns the update of the keys a device sends.

        With ``stats``, also Wang et al.'s estimates on the first batch: the gradient at the
        start, and the change of loss and gradient at the end (one extra forward/backward).
        ``dp`` (``clip_norm``, ``noise_multiplier``, ``mode``): the device's side of DP-FedAvg
        (central: clip; local: clip and add noise). ``attack`` (``kind`` and the attack's options):
        a simulated hostile device sends ``apply_attack(kind, update)`` instead (and skips DP).
        """
        model = self.model
        assert self._slot is not None
        self._slot.load(state)
        model.train()
        gen = torch.Generator().manual_seed(int(seed))
        params = [p for _, p in self._trainable()]
        opt = (torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0) if self.optimizer == "adamw"
               else torch.optim.SGD(params, lr=self.lr))
        start = {n: p.detach().clone() for n, p in self._trainable()}
        first_idx, loss0, grad0, losses = None, 0.0, None, []
        for step in range(int(steps)):
            idx = torch.randint(0, self.n, (min(self.batch_size, self.n),), generator=gen)
            opt.zero_grad(set_to_none=True)
            loss = self._loss(idx)
            loss.backward()
            if step == 0:
                first_idx, loss0 = idx, loss.item()
                grad0 = self._flat_grad() if stats else None
            opt.step()
            losses.append(loss.item())
        new = adapter_state(model)
        keys = sent_keys(list(new), self.spec["mode"])
        # On the host from here: DP noise and attacks draw from CPU generators, as on every device.
        update = {k: new[k].cpu() - state[k].cpu() for k in keys}
        if attack is not None:
            from cloudedge.attacks import apply_attack

            opts = {k: v for k, v in attack.items() if k != "kind"}
            update = apply_attack(attack["kind"], update, seed=int(seed) + 2, **opts)
        elif dp is not None:
            from cloudedge.privacy import DPFedAvg

            mech = DPFedAvg(dp["clip_norm"], dp["noise_multiplier"], dp["mode"])
            update = mech.client(update, torch.Generator().manual_seed(int(seed) + 1))
        out: dict[str, Any] = {
            "update": update,
            "steps": int(steps),
            "n": self.n,
            "loss": sum(losses) / max(1, len(losses)),
        }
        if stats and first_idx is not None and grad0 is not None:
            opt.zero_grad(set_to_none=True)
            loss1 = self._loss(first_idx)
            loss1.backward()
            grad1 = self._flat_grad()
            step_norm = sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in self._trainable()) ** 0.5
            out["stats"] = {"grad_start": grad0, "grad_end_diff": float((grad1 - grad0).norm()),
                            "loss_diff": abs(loss1.item() - loss0), "step_norm": step_norm}
        return out

    @torch.no_grad()
    def evaluate(self, state: Mapping[str, torch.Tensor], max_samples: int | None = None) -> dict[str, float]:
        """Accuracy and mean loss of ``state`` on this worker's data (in order, batches of 256)."""
        model = self.model
        assert self._slot is not None
        self._slot.load(state)
        model.eval()
        n = self.n if max_samples is None else min(self.n, int(max_samples))
        correct, total_loss = 0, 0.0
        for lo in range(0, n, 256):
            idx = torch.arange(lo, min(n, lo + 256))
            logits = self._logits(idx)
            y = self._labels(idx)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
        return {"acc": correct / max(1, n), "loss": total_loss / max(1, n), "n": n}

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The adapter state every node starts from (deterministic from the spec's seed)."""
        self.model  # noqa: B018 - builds (or finds) the model
        return {k: v.detach().clone() for k, v in self._initial.items()}

    def model_info(self) -> dict[str, Any]:
        """Parameter counts and the FLOPs of one training step (forward + backward, counted by
        ``FlopCounterMode`` on a real batch: the frozen base's weight gradients are not computed,
        so they are not counted; its input gradients are)."""
        idx = torch.arange(min(self.batch_size, self.n))
        # Measured in float32 whatever the precision: the memory check applies the precision's rule
        # (reliability.memory_need) to these bytes and to a charged model's alike.
        return step_info(self.model, lambda: self._loss(idx, "fp32"), self.batch_size, len(idx))


def step_info(model: torch.nn.Module, loss_fn: Any, batch_size: int, measured: int) -> dict[str, Any]:
    """What one training step of ``model`` costs: FLOPs (forward + backward of ``loss_fn()``, a batch
    of ``measured`` samples, scaled to ``batch_size``), parameters and bytes, activation bytes.

    The model may live on the meta device (a charged architecture: shapes only, no weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cloudedge.models.flops import _EXTRA_FORMULAS

    model.train()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    saved = _SavedTensorBytes(model)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            loss = loss_fn()
        loss.backward()
    model.zero_grad(set_to_none=True)
    scale = batch_size / max(1, measured)
    flops = int(counter.get_total_flops()) * batch_size // max(1, measured)
    total = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"train_step_flops": flops, "params": total, "trainable_params": sum(p.numel() for p in trainable),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "activation_bytes": int(saved.nbytes * scale)}


def _storage_key(tensor: torch.Tensor) -> int:
    """Identifies a tensor's storage: its address, or (meta tensors have none) the storage object's."""
    storage = tensor.untyped_storage()
    return storage._cdata if tensor.is_meta else storage.data_ptr()


class _SavedTensorBytes:
    """Counts the bytes autograd keeps for the backward pass of one forward (the activations).

    Each storage is counted once, and the model's own parameters are left out (they are counted as
    weights). A measurement, not a formula: it is what this model really keeps on this batch."""

    def __init__(self, model: torch.nn.Module):
        self._params = {_storage_key(p) for p in model.parameters()}
        self._seen: set[int] = set()
        self.nbytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        ptr = _storage_key(tensor)
        if ptr not in self._params and ptr not in self._seen:
            self._seen.add(ptr)
            self.nbytes += tensor.untyped_storage().nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor
