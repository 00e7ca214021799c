"""Training objectives for federated classification pre-training: ERM and shortcut-averse ones.

Each objective is a small class behind one interface (``docs/invariant-learning.md`` has every
rule, default and derivation; ``/work/helper/pretrain_interface.md`` the call order). Per client
per round the loop calls ``init_client`` once, then per local step ``local_loss`` (its gradient
trains the shared model) and ``local_private_step`` (private models), then ``client_report``; the
coordinator calls ``server_update`` on the reports and broadcasts the result next round.
Each client is one environment.

Names: ``erm``, ``irm`` (IRMv1), ``vrex`` (V-REx, federated form), ``fedsr``, ``fediir`` and
``pin`` (ours: global invariant model + local ERM model + personalized model anchored on the
global invariant features by an InfoNCE mutual-information bound).
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cloudedge.errors import InputError
from cloudedge.pretrain.mi import info_nce
from cloudedge.registry import Params, Registry

OBJECTIVES: Registry[type[Objective]] = Registry("objective")

Logs = dict[str, float]


class Objective:
    """The interface, with ERM-like defaults for every hook.

    Subclasses register in :data:`OBJECTIVES` with their parameter model (a subclass of
    :class:`ObjectiveParams`: knobs, defaults, ranges); ``__init__`` validates ``params`` with it
    (an :class:`InputError` naming ``objective.<knob>``) and keeps them as ``self.params`` (floats).
    """

    name: ClassVar[str] = "objective"
    personalized: ClassVar[bool] = False  # True: private models, evaluated on their own client
    # Training FLOPs of one sample on a client, in units of one forward + backward of the shared
    # model; the loop's virtual clock charges it. Penalties' extra backward passes are not counted.
    train_flops_factor: ClassVar[float] = 1.0
    # True: in ``sync`` the server forms the step's gradient itself (:meth:`combine_gradients`)
    # from every client's plain risk gradient and risk of this very step (V-REx needs the current
    # mean risk, which only the server has). The loop then marks the message with
    # ``combine_at_server`` so :meth:`local_loss` returns the plain risk.
    combines_in_sync: ClassVar[bool] = False

    def __init__(self, total_steps: int | None = None, **params: float):
        try:
            validated = OBJECTIVES.validate_params(self.name, params)
        except ValueError as err:
            raise InputError(f"objective.{err}") from None
        merged = {k: float(v) for k, v in validated.model_dump().items()}
        self.params = merged
        self.total_steps = total_steps
        self._resolve_anneal_fraction()

    def _resolve_anneal_fraction(self) -> None:
        """``anneal_fraction`` > 0 sets ``anneal_steps`` to that fraction of the run's objective
        steps (rounds x local steps), so a quick and a full run switch the penalty on at the same
        point of training (IRM's reference: step 190 of 501, 0.38)."""
        fraction = self.params.get("anneal_fraction", 0.0)
        if fraction <= 0:
            return
        if fraction >= 1:
            raise InputError(f"objective.anneal_fraction: must be < 1 (got {fraction})")
        if self.total_steps is None:
            raise InputError("objective.anneal_fraction: needs the run's length (pretrain passes it)")
        self.params["anneal_steps"] = float(round(fraction * self.total_steps))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, client_state: dict[str, Any],
             server_msg: dict[str, Any], step: int) -> tuple[torch.Tensor, Logs]:
        """What the shared model's gradient comes from: :meth:`local_loss` plus, with ``l2`` > 0,
        ``l2 * sum |w|^2`` over the shared model's parameters, scaled by :meth:`penalty_scale` as
        IRM's reference code scales it (its whole loss, L2 included, is divided by the penalty
        weight). Unscaled under ``combine_at_server``: the server's combination scales it there."""
        loss, logs = self.local_loss(model, x, y, client_state, server_msg, step)
        l2 = self.params["l2"]
        if l2 > 0:
            scale = 1.0 if server_msg.get("combine_at_server") else self.penalty_scale(step)
            norm = sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)
            loss = loss + l2 * scale * norm
        return loss, logs

    def penalty_scale(self, step: int) -> float:
        """The factor this step's loss is divided by (1; ``1 / max(1, weight)`` for annealed penalties)."""
        return 1.0

    # -- hooks -------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Add shared modules to ``model`` (idempotent and deterministic, so keys match everywhere)."""
        return model

    def init_client(self, model: nn.Module, client_id: str, seed: int) -> dict[str, Any]:
        """Client-private state; may hold modules and optimizers (it never leaves the worker)."""
        return {}

    def local_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, client_state: dict[str, Any],
                   server_msg: dict[str, Any], step: int) -> tuple[torch.Tensor, Logs]:
        """Loss whose gradient trains the shared model on this client, and scalar logs."""
        raise NotImplementedError

    def local_private_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           client_state: dict[str, Any], step: int) -> Logs | None:
        """Train the client's private models on this batch (default: none to train)."""
        return None

    def client_report(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      client_state: dict[str, Any]) -> dict[str, Any]:
        """Plain data sent to the server with the update (default: nothing)."""
        return {}

    def server_update(self, server_msg: dict[str, Any], reports: list[dict[str, Any]],
                      weights: list[float]) -> dict[str, Any]:
        """Next round's broadcast from this round's reports and sample weights."""
        return server_msg

    def combine_gradients(self, grads: list[dict[str, torch.Tensor]], weights: list[float],
                          risks: list[float], step: int) -> dict[str, torch.Tensor]:
        """``sync`` with :attr:`combines_in_sync`: the step's gradient from each client's plain risk
        gradient, its risk and its sample weight (all of this step)."""
        raise NotImplementedError(f"objective {self.name!r} does not combine gradients at the server")

    def predict(self, model: nn.Module, x: torch.Tensor, client_state: dict[str, Any]) -> torch.Tensor:
        """Logits used to evaluate on this client."""
        return model(x)

    def eval_logits(self, model: nn.Module, x: torch.Tensor, client_state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Logits of extra models worth reporting next to ``predict`` on this client (default: none)."""
        return {}

    def eval_stats(self, model: nn.Module, x: torch.Tensor, client_state: dict[str, Any]) -> Logs:
        """Diagnostics (means over the samples of ``x``) worth logging at evaluation (default: none)."""
        return {}

    def client_state_dict(self, client_state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Flat tensors of the client's private state (for safetensors checkpoints)."""
        return {}

    def load_client_state_dict(self, client_state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`client_state_dict` saved into a fresh ``init_client`` state."""


class ObjectiveParams(Params):
    """Knobs every objective takes; each objective's model extends this one."""

    # Coupled L2 regularization of the shared model (IRM's Colored-MNIST recipe adds
    # 1.1e-3 * sum |w|^2 to every method's loss).
    l2: float = Field(default=0.0, ge=0, description="coupled L2 weight on the shared model")


class PenaltyParams(ObjectiveParams):
    """IRM and V-REx: a penalty switched on after a warm-up (IRM's annealing)."""

    penalty_weight: float = Field(default=1e3, ge=0, description="penalty weight after the warm-up")
    anneal_steps: float = Field(default=100.0, ge=0, description="warm-up steps at penalty weight 1")
    anneal_fraction: float = Field(
        default=0.0, ge=0, description="> 0: anneal_steps = this share of the run's objective steps")


def _normalized(weights: list[float], n: int) -> list[float]:
    if len(weights) != n or n == 0:
        raise ValueError(f"need one weight per report (got {len(weights)} weights, {n} reports)")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("report weights must sum to a positive number")
    return [float(w) / total for w in weights]


def annealed_weight(step: int, anneal_steps: float, penalty_weight: float) -> float:
    """IRM/V-REx schedule: weight 1 for the first ``anneal_steps`` steps, then ``penalty_weight``."""
    return 1.0 if step < anneal_steps else penalty_weight


def combine_penalty(risk: torch.Tensor, penalty: torch.Tensor, weight: float) -> torch.Tensor:
    """``risk + weight * penalty``, divided by ``weight`` when it exceeds 1 (Arjovsky et al.'s code:
    keeps the gradient scale comparable once the penalty dominates)."""
    loss = risk + weight * penalty
    return loss / weight if weight > 1.0 else loss


# -- ERM ---------------------------------------------------------------------------------------
@OBJECTIVES.register("erm", ObjectiveParams)
class ERM(Objective):
    """Cross-entropy (FedAvg)."""

    name = "erm"

    def local_loss(self, model, x, y, client_state, server_msg, step):
        ce = F.cross_entropy(model(x), y)
        return ce, {"ce": float(ce.detach())}


# -- IRMv1 -------------------------------------------------------------------------------------
def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """IRMv1 penalty ``(d/ds CE(s * logits, y) |_{s=1})^2``, differentiable (double backward)."""
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    risk = F.cross_entropy(logits * scale, y)
    (grad,) = torch.autograd.grad(risk, [scale], create_graph=True)
    return grad.pow(2)


@OBJECTIVES.register("irm", PenaltyParams)
class IRM(Objective):
    """IRMv1, one environment per client: ``CE + lambda(step) * penalty`` (divided by lambda > 1)."""

    name = "irm"

    def penalty_scale(self, step):
        return 1.0 / max(1.0, annealed_weight(step, self.params["anneal_steps"], self.params["penalty_weight"]))

    def local_loss(self, model, x, y, client_state, server_msg, step):
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        penalty = irm_penalty(logits, y)
        weight = annealed_weight(step, self.params["anneal_steps"], self.params["penalty_weight"])
        loss = combine_penalty(ce, penalty, weight)
        return loss, {"ce": float(ce.detach()), "irm_penalty": float(penalty.detach()), "penalty_weight": weight}


# -- V-REx -------------------------------------------------------------------------------------
@OBJECTIVES.register("vrex", PenaltyParams)
class VREx(Objective):
    """V-REx, federated: client loss ``sg[1 + 2 beta (R_e - R_bar)] * R_e`` (divided by beta > 1).

    With sample weights ``w_e`` (sum 1) the centralized objective is
    ``L = sum_e w_e R_e + beta * sum_e w_e (R_e - R_bar)^2``, ``R_bar = sum_e w_e R_e``, and
    ``grad L = sum_e w_e (1 + 2 beta (R_e - R_bar)) grad R_e`` (the ``grad R_bar`` term carries the
    factor ``sum_e w_e (R_e - R_bar) = 0``). So a sample-weighted FedAvg of these client
    gradients is exactly the V-REx gradient when ``R_bar`` is current.

    - ``sync``: the server has every client's risk of this step, so it combines the plain risk
      gradients itself with the current ``R_bar`` (:meth:`combine_gradients`): exact.
    - ``local``: clients take several steps between broadcasts, so ``R_bar`` is the previous
      round's (the mean of the clients' end-of-round risks); each step logs ``vrex_mean_age_rounds``
      (1 when that stale mean was used, 0 before the first broadcast, when the loss is plain ERM).
    """

    name = "vrex"
    combines_in_sync = True

    def penalty_scale(self, step):
        return 1.0 / max(1.0, annealed_weight(step, self.params["anneal_steps"], self.params["penalty_weight"]))

    def local_loss(self, model, x, y, client_state, server_msg, step):
        risk = F.cross_entropy(model(x), y)
        if server_msg.get("combine_at_server"):
            return risk, {"ce": float(risk.detach())}
        beta = annealed_weight(step, self.params["anneal_steps"], self.params["penalty_weight"])
        mean_risk = server_msg.get("mean_risk")
        coef = 1.0 if mean_risk is None else 1.0 + 2.0 * beta * (float(risk.detach()) - float(mean_risk))
        loss = coef * risk
        if beta > 1.0:
            loss = loss / beta
        return loss, {"ce": float(risk.detach()), "vrex_coef": coef, "penalty_weight": beta,
                      "vrex_mean_age_rounds": 0.0 if mean_risk is None else 1.0}

    def client_report(self, model, x, y, client_state):
        with torch.no_grad():
            return {"risk": float(F.cross_entropy(model(x), y))}

    def server_update(self, server_msg, reports, weights):
        w = _normalized(weights, len(reports))
        risks = [float(r["risk"]) for r in reports]
        mean = sum(wi * ri for wi, ri in zip(w, risks, strict=True))
        var = sum(wi * (ri - mean) ** 2 for wi, ri in zip(w, risks, strict=True))
        return {**server_msg, "mean_risk": mean, "risk_var": var}

    def combine_gradients(self, grads, weights, risks, step):
        w = _normalized(weights, len(grads))
        beta = annealed_weight(step, self.params["anneal_steps"], self.params["penalty_weight"])
        mean = sum(wi * ri for wi, ri in zip(w, risks, strict=True))
        coefs = [wi * (1.0 + 2.0 * beta * (ri - mean)) / max(1.0, beta) for wi, ri in zip(w, risks, strict=True)]
        return {k: sum(c * g[k] for c, g in zip(coefs, grads, strict=True)) for k in grads[0]}


# -- FedSR -------------------------------------------------------------------------------------
_SOFTPLUS_INV_1 = math.log(math.e - 1.0)  # softplus(x) = 1 at this x


class FedSRHead(nn.Module):
    """FedSR's shared additions: a variance head for ``z ~ N(mu, sigma^2)`` and the conditional
    prior ``r(z|y) = N(r_mu[y], r_sigma[y]^2)`` (learnable, aggregated like every shared weight).

    Deterministic initialization (no RNG): sigma starts at ``softplus(-2.25) ~ 0.1`` for every
    input (zero weight), ``r`` at ``N(0, 1)`` per class.
    """

    def __init__(self, dim: int, n_classes: int, min_sigma: float = 1e-4):
        super().__init__()
        self.min_sigma = min_sigma
        self.sigma_layer = nn.Linear(dim, dim)
        nn.init.zeros_(self.sigma_layer.weight)
        nn.init.constant_(self.sigma_layer.bias, math.log(math.expm1(0.1)))
        self.r_mu = nn.Parameter(torch.zeros(n_classes, dim))
        self.r_rho = nn.Parameter(torch.full((n_classes, dim), _SOFTPLUS_INV_1))

    def sigma(self, mu: torch.Tensor) -> torch.Tensor:
        """Standard deviation [B, D] of the representation with mean ``mu``."""
        return F.softplus(self.sigma_layer(mu)) + self.min_sigma

    def r_sigma(self) -> torch.Tensor:
        return F.softplus(self.r_rho) + self.min_sigma

    def kl_to_prior(self, mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``mean_i KL(N(mu_i, sigma_i^2) || r(.|y_i))``, summed over dimensions (closed form)."""
        r_mu, r_sigma = self.r_mu[y], self.r_sigma()[y]
        kl = (torch.log(r_sigma) - torch.log(sigma)
              + (sigma.pow(2) + (mu - r_mu).pow(2)) / (2 * r_sigma.pow(2)) - 0.5)
        return kl.sum(dim=1).mean()


class FedSRParams(ObjectiveParams):
    l2r: float = Field(default=1e-2, ge=0, description="L2 weight on the representation")
    cmi: float = Field(default=5e-4, ge=0, description="weight of the conditional mutual information bound")


@OBJECTIVES.register("fedsr", FedSRParams)
class FedSR(Objective):
    """FedSR: ``CE(head(z)) + a_l2r * E|z|^2 + a_cmi * KL(N(mu, sigma^2) || r(z|y))``, z sampled.

    Evaluation (``predict``) uses the mean ``mu`` (the plain ``model(x)``).
    """

    name = "fedsr"

    def prepare_model(self, model):
        if not hasattr(model, "fedsr"):
            model.fedsr = FedSRHead(model.feature_dim, model.n_classes)
        return model

    def init_client(self, model, client_id, seed):
        return {"rng": torch.Generator().manual_seed(int(seed))}

    def local_loss(self, model, x, y, client_state, server_msg, step):
        mu = model.features(x)
        sigma = model.fedsr.sigma(mu)
        rng = client_state.get("rng")
        noise = torch.randn(mu.shape, generator=rng).to(mu)
        z = mu + sigma * noise
        ce = F.cross_entropy(model.head(z), y)
        l2 = z.pow(2).sum(dim=1).mean()
        kl = model.fedsr.kl_to_prior(mu, sigma, y)
        loss = ce + self.params["l2r"] * l2 + self.params["cmi"] * kl
        return loss, {"ce": float(ce.detach()), "l2r": float(l2.detach()), "cmi": float(kl.detach())}

    def client_state_dict(self, client_state):
        return {"rng": client_state["rng"].get_state()}

    def load_client_state_dict(self, client_state, tensors):
        client_state["rng"].set_state(tensors["rng"].to(torch.uint8))


# -- FedIIR ------------------------------------------------------------------------------------
def head_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The classifier (head) parameters FedIIR aligns, by name."""
    return dict(model.head.named_parameters())


class FedIIRParams(ObjectiveParams):
    gamma: float = Field(default=1e-2, ge=0, description="weight of the gradient-alignment penalty")
    ema: float = Field(default=0.95, ge=0, description="EMA weight of the old mean classifier gradient")


@OBJECTIVES.register("fediir", FedIIRParams)
class FedIIR(Objective):
    """FedIIR: ``CE + gamma * |grad_head CE - g_bar|^2``, g_bar = EMA of the mean head gradient.

    As its authors define it (Guo et al., ICML 2023, and their code): ``g_bar`` starts at zero and
    every round ``g_bar <- ema * g_bar + (1 - ema) * mean_e grad_head CE_e(w_global)``, the mean over
    clients of the head gradient *at the received global model* (not at the locally trained one).
    Here each client measures that gradient on its round's first batch before its first update and
    reports it, so the mean enters the EMA one round later than in the authors' centralized
    simulation (which computes it before the round); round 0 uses the zero start, so the penalty
    is on from the first step, as theirs is.
    """

    name = "fediir"

    def init_client(self, model, client_id, seed):
        return {"start_grad": None}

    def local_loss(self, model, x, y, client_state, server_msg, step):
        ce = F.cross_entropy(model(x), y)
        params = head_params(model)
        grads = torch.autograd.grad(ce, list(params.values()), create_graph=True)
        if client_state.get("start_grad", True) is None:  # first batch of this task: the global model
            client_state["start_grad"] = {name: g.detach().clone() for name, g in zip(params, grads, strict=True)}
        g_bar = server_msg.get("g_bar")
        if g_bar is None:
            g_bar = {name: torch.zeros_like(p) for name, p in params.items()}
        penalty = sum((g - g_bar[name].to(g)).pow(2).sum() for name, g in zip(params, grads, strict=True))
        loss = ce + self.params["gamma"] * penalty
        return loss, {"ce": float(ce.detach()), "iir_penalty": float(penalty.detach())}

    def client_report(self, model, x, y, client_state):
        start = client_state.get("start_grad")
        if start is None:  # not trained through local_loss (e.g. called directly): measure now
            params = head_params(model)
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
            start = {name: g.detach() for name, g in zip(params, grads, strict=True)}
        return {"head_grad": start}

    def server_update(self, server_msg, reports, weights):
        w = _normalized(weights, len(reports))
        names = reports[0]["head_grad"].keys()
        mean = {n: sum(wi * r["head_grad"][n] for wi, r in zip(w, reports, strict=True)) for n in names}
        prev = server_msg.get("g_bar") or {n: torch.zeros_like(mean[n]) for n in names}
        ema = self.params["ema"]
        return {**server_msg, "g_bar": {n: ema * prev[n] + (1.0 - ema) * mean[n] for n in names}}


# -- PIN (ours) --------------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for index, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}{index}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            index, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    saved = opt.state_dict()
    opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


class PINParams(PenaltyParams):
    lam: float = Field(default=1.0, ge=0, description="weight of the InfoNCE anchor")
    tau: float = Field(default=0.5, gt=0, description="InfoNCE temperature")
    local_neg_weight: float = Field(default=1.0, ge=0, description="weight of the local model's negatives")
    private_lr: float = Field(default=1e-3, ge=0, description="Adam lr of the private (local, personal) models")
    personal_reset: float = Field(default=0.0, ge=0, description="1: reset the personal model when the penalty starts")
    personal_start_fraction: float = Field(default=0.0, ge=0, description="share of the run before the personal "
                                                                          "model trains")
    nce_samples: float = Field(default=512.0, ge=0, description="samples per InfoNCE estimate")


@OBJECTIVES.register("pin", PINParams)
class PIN(IRM):
    """Personalized invariant learning with a shortcut-averse MI term (after FedPIN / Per-InvFL).

    - global invariant model = the shared model: ``CE + IRMv1`` (annealed), the only one aggregated;
    - local model (private): plain ERM, never shared;
    - personalized model (private, evaluated on its client):
      ``CE + lam * L_pin(z_p; sg[z_g], sg[z_loc])`` where ``L_pin`` is the InfoNCE loss of
      :func:`cloudedge.pretrain.mi.info_nce` (positive: the global invariant feature of the same
      sample; negatives: other samples' global features and the local ERM feature of the sample).
      It starts from the global weights at ``init_client`` and is kept across rounds
      (``personal_reset: 1`` re-copies the received global weights at every round's first step).
      ``personal_start_fraction`` f > 0 warm-starts it instead: the personalized model is first
      copied from the global invariant model at objective step ``round(f * total_steps)`` and
      trained only from then on; until then the client predicts with the global model.
    """

    name = "pin"
    personalized = True
    # Per sample: the shared model's forward + backward (3 forward units), the local model's (3),
    # the personalized model's (3) and the forward features of the global and local models (2):
    # 11 forward units = 11/3 of the shared model's training cost.
    train_flops_factor = 11.0 / 3.0

    def __init__(self, **params: float):
        super().__init__(**params)
        start = self.params["personal_start_fraction"]
        if start >= 1 or (start > 0 and self.total_steps is None):
            raise InputError("objective.personal_start_fraction: must be < 1 and needs the run's length "
                             f"(got {start})")
        self.personal_start_step = round(start * self.total_steps) if start > 0 else 0  # type: ignore[operator]

    def init_client(self, model, client_id, seed):
        local, personal = copy.deepcopy(model), copy.deepcopy(model)
        lr = self.params["private_lr"]
        return {
            "local": local, "personal": personal,
            "opt_local": torch.optim.Adam(local.parameters(), lr=lr),
            "opt_personal": torch.optim.Adam(personal.parameters(), lr=lr),
            "reset_pending": False, "started": self.personal_start_step == 0,
        }

    def local_loss(self, model, x, y, client_state, server_msg, step):
        if not client_state.get("started", True) and step >= self.personal_start_step:
            client_state["started"] = True  # warm start from the global invariant model, as received
            client_state["reset_pending"] = True
        if client_state.get("reset_pending"):
            # First step of a new round: the shared model still holds the received global weights.
            client_state["personal"].load_state_dict(model.state_dict())
            client_state["opt_personal"] = torch.optim.Adam(client_state["personal"].parameters(),
                                                            lr=self.params["private_lr"])
            client_state["reset_pending"] = False
        return super().local_loss(model, x, y, client_state, server_msg, step)

    def personal_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      client_state: dict[str, Any]) -> tuple[torch.Tensor, Logs]:
        """The personalized model's loss; gradients reach only ``client_state['personal']``."""
        with torch.no_grad():
            z_global = model.features(x)
            z_local = client_state["local"].features(x)
        personal = client_state["personal"]
        z_personal = personal.features(x)
        ce = F.cross_entropy(personal.head(z_personal), y)
        if self.params["lam"] == 0:  # the ablation: no anchor, nothing to compute for it
            return ce, {"personal_ce": float(ce.detach())}
        # In-batch negatives cost O(B^2): the bound uses the batch's first `nce_samples` rows (a
        # random subset: batches are drawn in random order), so full-batch training stays linear.
        n = min(len(x), int(self.params["nce_samples"]))
        nce, bound = info_nce(z_personal[:n], z_global[:n], z_local[:n], tau=self.params["tau"],
                              extra_weight=self.params["local_neg_weight"])
        loss = ce + self.params["lam"] * nce
        return loss, {"personal_ce": float(ce.detach()), "infonce": float(nce.detach()), "mi_bound": float(bound)}

    def local_private_step(self, model, x, y, client_state, step):
        local, opt_local = client_state["local"], client_state["opt_local"]
        opt_local.zero_grad(set_to_none=True)
        local_ce = F.cross_entropy(local(x), y)
        local_ce.backward()
        opt_local.step()

        if not client_state.get("started", True):
            return {"local_ce": float(local_ce.detach())}
        opt_personal = client_state["opt_personal"]
        opt_personal.zero_grad(set_to_none=True)
        loss, logs = self.personal_loss(model, x, y, client_state)
        loss.backward()
        opt_personal.step()
        return {"local_ce": float(local_ce.detach()), **logs}

    def client_report(self, model, x, y, client_state):
        if self.params["personal_reset"] > 0:
            client_state["reset_pending"] = True
        return {}

    def predict(self, model, x, client_state):
        personal = client_state.get("personal")
        return model(x) if personal is None or not client_state.get("started", True) else personal(x)

    def eval_logits(self, model, x, client_state):
        out = {"global": model(x)}
        if "local" in client_state:
            out["local"] = client_state["local"](x)
        return out

    def eval_stats(self, model, x, client_state):
        """Does the anchor do its job? On the features of ``x`` of the personalized (p), global (g)
        and local (l) models: InfoNCE lower bounds (nats, ``tau``, in-batch negatives only) on
        ``I(Z_p; Z_g)`` (``mi_pg``: the anchor raises it) and ``I(Z_p; Z_l)`` (``mi_pl``), and
        mean cosines ``cos_pg`` / ``cos_pl`` / ``cos_lg`` (``cos_lg``: neither term touches it)."""
        if "personal" not in client_state:
            return {}
        z_p = client_state["personal"].features(x)
        z_g = model.features(x)
        z_l = client_state["local"].features(x)
        tau = self.params["tau"]
        return {"mi_pg": float(info_nce(z_p, z_g, tau=tau)[1]), "mi_pl": float(info_nce(z_p, z_l, tau=tau)[1]),
                "cos_pg": float(F.cosine_similarity(z_p, z_g, dim=1).mean()),
                "cos_pl": float(F.cosine_similarity(z_p, z_l, dim=1).mean()),
                "cos_lg": float(F.cosine_similarity(z_l, z_g, dim=1).mean())}

    def client_state_dict(self, client_state):
        out: dict[str, torch.Tensor] = {}
        for part in ("local", "personal"):
            out.update({f"{part}.{k}": v.detach().clone() for k, v in client_state[part].state_dict().items()})
            out.update(_optimizer_tensors(client_state[f"opt_{part}"], f"opt_{part}."))
        out["reset_pending"] = torch.tensor(int(bool(client_state["reset_pending"])))
        out["started"] = torch.tensor(int(bool(client_state["started"])))
        return out

    def load_client_state_dict(self, client_state, tensors):
        for part in ("local", "personal"):
            prefix = f"{part}."
            client_state[part].load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            _load_optimizer_tensors(client_state[f"opt_{part}"], tensors, f"opt_{part}.")
        client_state["reset_pending"] = bool(int(tensors["reset_pending"]))
        client_state["started"] = bool(int(tensors["started"])) if "started" in tensors else True


def get_objective(name: str, total_steps: int | None = None, **params: float) -> Objective:
    """The objective called ``name`` with its knobs ``params``; ``total_steps`` (the run's objective
    steps) resolves ``anneal_fraction``.

    Raises:
        InputError: unknown name (the message lists the known ones) or a bad parameter.
    """
    if name not in OBJECTIVES:
        raise InputError(f"objective: unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES.get(name)(total_steps=total_steps, **params)
