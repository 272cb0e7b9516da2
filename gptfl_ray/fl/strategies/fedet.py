"""Fed-ET (Cho et al., IJCAI 2022, "Heterogeneous Ensemble Knowledge Transfer for Training Large Models in
Federated Learning").

Clients train a *small* model (``fl.client_model``); the server trains a *larger* model (``model``, the one
evaluated) by weighted-consensus ensemble distillation with a diversity regulariser on unlabeled public data U
held by the server, and sends its knowledge back into the small model. The small model travels down and up
(communication is counted at its size); the large model and U never leave the server.

Round r, with K received small models θ_k (sampled order), the previous small global model s and the server
model w:

A. per-architecture average: s̄ = s + mean_k Δ_k (uniform weights, ``weighted: false``, as the
   re-implementation averages each group with ``w / len(group)``);
B. (paper step 1) if the server's head (last ``nn.Linear``, :mod:`gptfl_ray.models.heads`) has the clients'
   head shape, set it to the uniform mean of the K client heads;
C. (paper steps 2-3) on every u ∈ U, with z_k = f(θ_k; u) the logits of client model k (eval mode):
   confidence σ_k = Var_c(z_k) (unbiased variance over the classes of the raw logits), normalised
   α_k = σ_k / Σ_j σ_j; consensus label ŷ = argmax_c Σ_k α_k z_k; the diverse models D = {k : argmax z_k ≠ ŷ}
   give the diversity target z̃ = Σ_{k∈D} σ_k z_k / Σ_{k∈D} σ_k. The server minimises, by SGD (lr 5e-3,
   momentum 0.9, batch 64, ``steps`` = 128 minibatches in seeded epochs over U),
   ``CE(f(w; u), ŷ) + λ·KL(softmax(z̃) ‖ softmax(f(w; u)))`` with λ = 0.05, KL summed over the samples that
   have a diverse model and divided by the batch size (``batchmean`` over the batch);
D. (paper's transfer back) the next small global model is s̄ with its head replaced by the trained server
   model's head (same shapes), else s̄ distilled from the server model on U (below).

Defaults are those of the FedProphet re-implementation (``Yoruko-Tang/FedProphet``, ``src/server/kdserver.py``
``FedET_Server.aggregate``: SGD momentum 0.9, lr 5e-3, batch 64; ``src/utils/options.py``: ``dist_iters``
128, ``diver_lamb`` 0.05); the paper's code is not public. Choices the paper leaves open, as re-implemented:
the head is the "representation layer" that is averaged and shared; σ_k is the variance of raw logits (not
probabilities); the KL direction is KL(diversity ‖ server); the server trains in train mode from the round's
x (with the averaged head) and no learning-rate schedule.

Deviations, stated:

- one small client architecture (``fl.client_model``) rather than U architectures from a pre-designated set,
  so step A is a single average;
- samples where no model disagrees with the consensus get **no** diversity term: the re-implementation's
  target there is a zero logit vector (its normaliser has a 1e-6 epsilon), i.e. KL to the *uniform*
  distribution, a label-smoothing term the paper does not describe; likewise the normalisations here are
  exact (no epsilon), with uniform α when every model's logits are constant (Σσ = 0);
- when the server's and clients' heads differ in shape, steps B and D cannot copy weights: B is skipped and
  D distils the trained server into s̄ on U instead (KL(softmax(f(w; u)) ‖ softmax(f(s̄; u))), same optimizer
  and step budget), so the server's knowledge still reaches the clients;
- all minibatch orders are seeded from (run seed, round) (``distill.round_generator``), so resume is exact;
- the small model starts from the runner's seeded client init (``ServerContext.init_client_weights``); without
  ``fl.client_model`` (clients train the server's architecture) it starts from the server's initial x;
- ``diversity_weight: 0`` (consensus distillation only) and ``steps: 0`` (no server training) are allowed,
  for ablations and tests.

Needs each client's model on the server: refused under secure aggregation.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from gptfl_ray.fl.distill import kl_to_teacher, minibatches, predict_logits, round_generator
from gptfl_ray.fl.flat import FlatModel, VectorLayout
from gptfl_ray.fl.strategies.base import ClientResult, Strategy, StrategyParams
from gptfl_ray.fl.strategies.registry import register
from gptfl_ray.models.heads import classifier_head, head_slices


class FedETParams(StrategyParams):
    weighted: bool = False  # the re-implementation averages each architecture's models uniformly
    # Server SGD steps per round (``dist_iters``); also the transfer-back budget. 0: no server training.
    steps: int = Field(128, ge=0)
    batch_size: int = Field(64, gt=0)  # ``dist_batch_size``
    lr: float = Field(5e-3, gt=0)  # ``dist_lr``
    momentum: float = Field(0.9, ge=0, lt=1)
    diversity_weight: float = Field(0.05, ge=0)  # λ (``diver_lamb``)


def weighted_consensus(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fed-ET's consensus labels and diversity targets from the logits of K models on N samples.

    ``logits``: (K, N, C). Returns ``(labels (N,) int64, targets (N, C), mask (N,) bool)``: ``labels`` the
    argmax of the variance-weighted sum of logits; ``targets`` the variance-weighted mean logits of the models
    whose argmax differs from the label (zeros where ``mask`` is False: no such model with non-zero variance).
    """
    var = logits.var(dim=2)  # (K, N), unbiased, as torch.var in the re-implementation
    total = var.sum(dim=0, keepdim=True)
    alpha = torch.where(total > 0, var / total.clamp_min(torch.finfo(var.dtype).tiny), 1.0 / len(logits))
    labels = (alpha.unsqueeze(2) * logits).sum(dim=0).argmax(dim=1)
    diverse = logits.argmax(dim=2) != labels.unsqueeze(0)  # (K, N)
    dvar = var * diverse
    dtotal = dvar.sum(dim=0)
    mask = dtotal > 0
    beta = dvar / dtotal.clamp_min(torch.finfo(var.dtype).tiny)
    targets = (beta.unsqueeze(2) * logits).sum(dim=0) * mask.unsqueeze(1)
    return labels, targets, mask


def same_head_shape(a: nn.Module, b: nn.Module) -> bool:
    """Whether the two models' classifier heads have the same parameter shapes (so weights can be copied)."""
    ha, hb = classifier_head(a)[1], classifier_head(b)[1]
    return [q.shape for q in ha.parameters()] == [q.shape for q in hb.parameters()]


def diversity_kl(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_{i: mask} KL(softmax(targets_i) ‖ softmax(logits_i)) / batch size."""
    log_q = F.log_softmax(targets, dim=1)
    per_sample = (log_q.exp() * (log_q - F.log_softmax(logits, dim=1))).sum(dim=1)
    return (per_sample * mask).sum() / len(logits)


@register
class FedET(Strategy):
    """Small client models; the large server model learns from their weighted consensus and diversity."""

    name = "fedet"
    Params = FedETParams
    public_data = "server"
    heterogeneous_models = True

    def setup(self, layout, num_clients, state_dir, server=None) -> None:
        super().setup(layout, num_clients, state_dir, server)
        self.client_layout: VectorLayout = layout
        self.received: list[torch.Tensor] = []  # the round's client models, in sampled order
        self.rnd = 0
        self.info: dict[str, Any] = {}
        # The small global client model: the clients' initial model (``fl.client_model``), else (clients train
        # the server's architecture) the server's initial x, taken in the first round (so ``--init`` counts).
        self.small: torch.Tensor | None = None
        if server is not None and server.init_client_weights is not None:
            self.small = server.init_client_weights.clone()

    # ------------------------------------------------------------------------------ server half
    def client_weights(self, x: torch.Tensor) -> torch.Tensor:
        if self.small is None:  # no fl.client_model: the clients start from the server's initial model
            if x.numel() != self.client_layout.size:
                raise ValueError(f"fedet: the server's vector ({x.numel()}) is not a client model vector")
            self.small = x.clone()
        return self.small

    def client_result(self, result: ClientResult) -> None:
        assert result.weights is not None
        self.received.append(result.weights.clone())
        self.rnd = result.rnd

    def end_round(self, applied: bool) -> None:
        self.received.clear()
        if not applied:
            self.info = {}

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor | None) -> torch.Tensor:
        assert mean_delta is not None and self.small is not None
        ctx, p = self.server, self.params
        assert ctx is not None and ctx.public is not None, "fedet needs the server's public data"
        dev = ctx.device
        small_avg = self.small + mean_delta  # step A
        if not self.received:
            self.small, self.info = small_avg, {}
            return x
        server_net = ctx.build_model().to(dev)
        server = FlatModel(server_net, ctx.server_layout)
        client_net = ctx.build_client_model().to(dev)
        client = FlatModel(client_net, self.client_layout)
        s_heads = head_slices(server_net, ctx.server_layout)
        c_heads = head_slices(client_net, self.client_layout)
        same_head = same_head_shape(server_net, client_net)

        x = x.clone()
        if same_head:  # step B
            for s, c in zip(s_heads, c_heads, strict=True):
                x[s] = torch.stack([m[c] for m in self.received]).mean(dim=0)

        public = ctx.public.x.to(dev)
        logits = []
        for m in self.received:
            client.load(m.to(dev))
            logits.append(predict_logits(client_net, public))
        labels, targets, mask = weighted_consensus(torch.stack(logits))

        server.load(x.to(dev))  # step C
        server_net.train()
        opt = torch.optim.SGD([server.param], lr=p.lr, momentum=p.momentum)
        ce_sum = kl_sum = torch.zeros((), device=dev)
        batches = minibatches(len(public), p.batch_size, p.steps, round_generator(ctx.seed, self.rnd, salt=3))
        for idx in batches:
            server.zero_grad()
            out = server_net(public[idx])
            ce = F.cross_entropy(out, labels[idx])
            kl = diversity_kl(out, targets[idx], mask[idx])
            (ce + p.diversity_weight * kl).backward()
            opt.step()
            ce_sum, kl_sum = ce_sum + ce.detach(), kl_sum + kl.detach()
        x = server.vector().cpu()

        diverse = torch.stack(logits).argmax(dim=2) != labels.unsqueeze(0)
        self.info = {
            "steps": len(batches),
            "ce_loss": float(ce_sum) / max(len(batches), 1),
            "diversity_kl": float(kl_sum) / max(len(batches), 1),
            "disagreement_rate": float(diverse.float().mean()),  # over (model, sample) pairs
            "diverse_samples": float(mask.float().mean()),  # samples with a diversity target
            "head_transfer": "copy" if same_head else "distill",
        }
        if same_head:  # step D
            small_avg = small_avg.clone()
            for s, c in zip(s_heads, c_heads, strict=True):
                small_avg[c] = x[s]
        else:
            small_avg = self._transfer_back(server_net, client, small_avg, public)
        self.small = small_avg
        return x

    def _transfer_back(
        self, server_net: torch.nn.Module, client: FlatModel, student: torch.Tensor, public: torch.Tensor
    ) -> torch.Tensor:
        """Distil the trained server model into the averaged small model on U (heads of different shapes)."""
        ctx, p = self.server, self.params
        assert ctx is not None
        teacher = F.softmax(predict_logits(server_net, public), dim=1)
        client.load(student.to(ctx.device))
        client.model.train()
        opt = torch.optim.SGD([client.param], lr=p.lr, momentum=p.momentum)
        kl = torch.zeros((), device=ctx.device)
        for idx in minibatches(
            len(public), p.batch_size, p.steps, round_generator(ctx.seed, self.rnd, salt=4)
        ):
            client.zero_grad()
            kl = kl_to_teacher(client.model(public[idx]), teacher[idx])
            kl.backward()
            opt.step()
        self.info["transfer_kl"] = float(kl.detach())  # on the last minibatch
        return client.vector().cpu()

    def round_info(self) -> dict[str, Any]:
        return dict(self.info)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({} if self.small is None else {"small": self.small.clone()}), {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if "small" in tensors:
            self.small = tensors["small"].clone()
