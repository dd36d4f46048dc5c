"""Training parts: SGD and AdamW (as torch.optim), a learning-rate schedule, gradient clipping.

An optimizer updates each parameter's array *in place* from its ``.grad``::

    opt = SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    for i in range(iters):
        opt.set_lr(schedule(i))
        loss = model(x)["total"]
        opt.zero_grad(); loss.backward()
        clip_grad_norm(model.parameters(), 10.0)
        opt.step()

Parameters can also come in groups with their own settings (say, no weight decay on norm layers)::

    SGD([{"params": conv_weights}, {"params": norm_params, "weight_decay": 0.0}], lr=0.02)

``state_dict()`` holds everything needed to resume exactly (momentum buffers, Adam moments, step
counts, every group's settings); ``save(path)`` / ``load(path)`` write it as ``.npz``.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass

import numpy as np

from minimask.backend import device_of, get_array_module, to_device, to_host
from minimask.engine import Tensor, no_grad
from minimask.nn.module import save_npz


class Optimizer:
    """The shared part of every optimizer: parameter groups, state, and its (de)serialisation.

    Attributes:
        param_groups: a list of dicts, each with ``"params"`` (a list of Tensors) and the
            settings (``lr``, ``weight_decay``, ...) that apply to them.
        state: per-parameter state (``{id(param): {name: array or number}}``).
    """

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        params = list(params)
        if not params:
            raise ValueError("the optimizer got an empty list of parameters")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        seen: set[int] = set()
        for group in groups:
            group = {**self.defaults, **group, "params": list(group["params"])}
            unknown = set(group) - set(self.defaults) - {"params"}
            if unknown:
                raise ValueError(f"unknown settings {sorted(unknown)} in a parameter group")
            for p in group["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(f"the optimizer takes Tensors, got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("a parameter appears twice in the optimizer's groups")
                seen.add(id(p))
            self.param_groups.append(group)

    # ------------------------------------------------------------------ the training-loop API
    def zero_grad(self) -> None:
        for p in self._params():
            p.grad = None

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every group (what a schedule does each iteration)."""
        for group in self.param_groups:
            group["lr"] = float(lr)

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    def step(self) -> None:
        with no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._update(p, p.grad, group, self.state.setdefault(id(p), {}))

    def _update(self, p: Tensor, grad, group: dict, state: dict) -> None:
        raise NotImplementedError

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``{"state": {index: {name: value}}, "param_groups": [{settings, "params": [index]}]}``.

        Parameters are named by their position across the groups (as torch). Arrays are host
        copies, so the dict is a snapshot that later steps do not change.
        """
        index = {id(p): i for i, p in enumerate(self._params())}
        state = {}
        for p in self._params():
            if self.state.get(id(p)):
                state[index[id(p)]] = {
                    k: to_host(v).copy() if hasattr(v, "shape") else v
                    for k, v in self.state[id(p)].items()
                }
        groups = []
        for g in self.param_groups:
            settings = {k: v for k, v in g.items() if k != "params"}
            groups.append({**settings, "params": [index[id(p)] for p in g["params"]]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore settings and state from :meth:`state_dict`, to resume training exactly.

        The optimizer must have been built on the same parameters, in the same groups and order.
        """
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the state has {len(groups)} parameter groups, "
                f"the optimizer {len(self.param_groups)}"
            )
        for i, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"group {i}: the state has {len(saved['params'])} parameters, "
                    f"the optimizer {len(own['params'])}"
                )
        params = self._params()
        for index, entries in state_dict["state"].items():
            p = params[int(index)]
            for k, v in entries.items():
                if hasattr(v, "shape") and v.shape and v.shape != p.shape:
                    message = f"state {k!r} of parameter {index} has shape {v.shape}"
                    raise ValueError(f"{message}, the parameter {p.shape}")
        for saved, own in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    own[k] = tuple(v) if isinstance(v, list) else v
        self.state = {}
        for index, entries in state_dict["state"].items():
            p = params[int(index)]
            self.state[id(p)] = {k: _restore(v, p.data) for k, v in entries.items()}

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to ``path`` as ``.npz`` (atomically)."""
        sd = self.state_dict()
        arrays = {"param_groups": np.array(json.dumps(sd["param_groups"], default=float))}
        for index, entries in sd["state"].items():
            for k, v in entries.items():
                arrays[f"state.{index}.{k}"] = np.asarray(v)
        save_npz(path, arrays)

    def load(self, path: str) -> None:
        """Read a file written by :meth:`save` (see :meth:`load_state_dict`)."""
        state: dict[int, dict] = {}
        with np.load(path, allow_pickle=False) as archive:
            groups = json.loads(str(archive["param_groups"]))
            for key in archive.files:
                if key.startswith("state."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = archive[key]
        self.load_state_dict({"state": state, "param_groups": groups})


def _restore(value, like):
    """A state entry as it was: 0-d arrays back to Python numbers, arrays copied to ``like``'s
    device and dtype."""
    if not hasattr(value, "shape"):
        return value
    if value.shape == ():
        return int(value) if np.asarray(value).dtype.kind in "iu" else float(value)
    xp = get_array_module(like)
    return xp.array(to_device(to_host(value), device_of(like)), dtype=like.dtype, copy=True)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and (L2) weight decay, as ``torch.optim.SGD``.

    Per parameter p with gradient g, each step::

        d = g + weight_decay * p
        buf = d                                   (first step)
        buf = momentum * buf + (1 - dampening) * d (later steps)
        d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
    ):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, {**defaults, "dampening": dampening, "nesterov": nesterov})

    def _update(self, p, grad, group, state):
        d = grad
        if group["weight_decay"]:
            d = d + group["weight_decay"] * p.data
        momentum = group["momentum"]
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.copy()
            else:
                buf *= momentum
                buf += (1 - group["dampening"]) * d
            d = d + momentum * buf if group["nesterov"] else buf
        p.data -= group["lr"] * d


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as ``torch.optim.AdamW``.

    Per parameter p with gradient g, step t = 1, 2, ...::

        p = p * (1 - lr * weight_decay)            # decay p directly, not through g
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        )

    def _update(self, p, grad, group, state):
        xp = get_array_module(p.data)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if group["weight_decay"]:
            p.data *= 1 - lr * group["weight_decay"]
        m *= beta1
        m += (1 - beta1) * grad
        v *= beta2
        v += (1 - beta2) * grad * grad
        step_size = lr / (1 - beta1**t)
        denom = xp.sqrt(v) / math.sqrt(1 - beta2**t) + group["eps"]
        p.data -= step_size * m / denom


@dataclass(frozen=True)
class WarmupMultiStepSchedule:
    """Learning rate at iteration i: a linear warm-up, then a step decay (as detectron2's
    WarmupMultiStepLR, and torch's LinearLR chained with MultiStepLR)::

        lr(i) = base_lr * warmup(i) * gamma ** (number of milestones <= i)
        warmup(i) = warmup_factor + (1 - warmup_factor) * i / warmup_iters   for i < warmup_iters,
                    1 afterwards

    Mask R-CNN's 1x schedule: base_lr 0.02, warm-up 1000 iterations from 0.001, decays x0.1 at
    60k and 80k of 90k.
    """

    base_lr: float
    milestones: tuple[int, ...] = ()  # iterations at which the rate is multiplied by gamma
    gamma: float = 0.1  # the decay factor at each milestone
    warmup_iters: int = 0  # the length of the linear warm-up (0: none)
    warmup_factor: float = 0.001  # the fraction of base_lr at iteration 0

    def factor(self, i: int) -> float:
        """``lr(i) / base_lr``."""
        warmup = 1.0
        if i < self.warmup_iters:
            alpha = i / self.warmup_iters
            warmup = self.warmup_factor * (1 - alpha) + alpha
        return warmup * self.gamma ** bisect.bisect_right(sorted(self.milestones), i)

    def __call__(self, i: int) -> float:
        return self.base_lr * self.factor(i)


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))``, where ``norm`` is the L2 norm
    of all gradients together (as ``torch.nn.utils.clip_grad_norm_``). Returns ``norm``, measured
    before clipping; parameters without a gradient are skipped.

    Unlike torch, a non-finite norm (NaN or inf) leaves the gradients as they are: the caller sees
    the returned norm and can skip the step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = 0.0
    for g in grads:
        total = total + (g * g).sum()  # stays on the device until the one float() below
    norm = math.sqrt(float(total))
    if not math.isfinite(norm):
        return norm
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for g in grads:
            g *= coef
    return norm
