"""The outer optimizer: a stock ``torch.optim`` optimizer stepping the global weights.

DiLoCo (Douillard et al., 2023, arXiv 2311.08105) treats the averaged pseudo-gradient
``mean_i(theta - theta_i)`` as the gradient of the global weights ``theta`` and takes one
step of SGD with Nesterov momentum (lr 0.7, momentum 0.9). FedAvg is the special case lr 1.0,
momentum 0: the step lands exactly on the weighted mean of the sites' weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OuterConfig:
    """The coordinator's step on the averaged pseudo-gradient."""

    optimizer: str = "sgd"
    """``sgd`` (with optional Nesterov momentum) or ``adam``."""
    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def check(self) -> None:
        """Refuse an unknown optimizer, a learning rate or momentum it cannot use."""
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"outer.optimizer must be 'sgd' or 'adam', got '{self.optimizer}'")
        if self.lr <= 0:
            raise ValueError(f"outer.lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"outer.momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0 and self.optimizer == "sgd":
            raise ValueError("outer.nesterov needs outer.momentum > 0 (FedAvg: nesterov = false)")

    def build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The torch optimizer over the global weights ``params``: SGD (Nesterov by default)
        or Adam."""
        # foreach=False: one tensor at a time. The foreach kernels make temporaries for the
        # whole parameter list at once (a model's worth at the coordinator); per tensor they
        # are one tensor, and the step is the same arithmetic
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=(self.momentum, 0.999),
                                    foreach=False)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                               foreach=False)


class OuterOptimizer:
    """Owns the global weights and steps them with the averaged pseudo-gradient."""

    def __init__(self, weights: dict[str, torch.Tensor], cfg: OuterConfig) -> None:
        self.names = list(weights)
        self.weights = {n: w.detach().clone().float() for n, w in weights.items()}
        self.optimizer = cfg.build([self.weights[n] for n in self.names])

    @torch.no_grad()
    def step(self, pseudo_gradient: dict[str, torch.Tensor]) -> str | None:
        """theta <- outer_step(theta, mean pseudo-gradient), without copying it (a float32
        pseudo-gradient becomes the gradient as it is); or, when the step would make a
        weight or the optimizer's state NaN or infinite, no step at all: the reason is
        returned and weights and momentum stay exactly as they were.

        Tensors absent from ``pseudo_gradient`` (other fragments, in streaming sync) are left
        alone, momentum included: torch's optimizers skip parameters without a gradient."""
        bad = self.non_finite_after(pseudo_gradient)
        if bad is not None:
            return f"the outer step would make {bad} non-finite: step refused"
        for n, g in pseudo_gradient.items():
            self.weights[n].grad = g.to(self.weights[n].dtype)
        self.optimizer.step()
        for n in pseudo_gradient:
            self.weights[n].grad = None
        return None

    @torch.no_grad()
    def non_finite_after(self, pseudo_gradient: dict[str, torch.Tensor]) -> str | None:
        """What the step on ``pseudo_gradient`` would make non-finite (a tensor, or its
        optimizer state), or None. Each tensor's step is taken on a copy by an optimizer of
        the same kind, one tensor at a time (the parameters' steps are independent), so the
        check does the real step's arithmetic while holding one tensor's copy, not a model's."""
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        for n, g in pseudo_gradient.items():
            w = self.weights[n]
            copy = w.clone()
            copy.grad = g.to(w.dtype)
            scratch = type(self.optimizer)([copy], **group)
            state = self.optimizer.state.get(w)
            if state:
                scratch.state[copy] = {k: v.clone() if torch.is_tensor(v) else v
                                       for k, v in state.items()}
            scratch.step()
            if not bool(torch.isfinite(copy).all()):
                return f"tensor {n!r}"
            for k, v in scratch.state[copy].items():
                if torch.is_tensor(v) and not bool(torch.isfinite(v).all()):
                    return f"the optimizer's {k} of tensor {n!r}"
        return None

    def state_dict(self) -> dict:
        """The optimizer's state (momentum buffers), checkpointed with the weights."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self.optimizer.load_state_dict(state)
