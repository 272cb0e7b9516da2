"""FedGen (Zhu, Hong & Zhou, ICML 2021, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning").

The server learns a light conditional generator G(z, y) whose output lives in the model's *feature space*: the
input of the classifier head h (the last ``nn.Linear``, :mod:`gptfl_ray.models.heads`). G is trained against
the ensemble of the round's client heads, weighted by the clients' label counts, and broadcast; clients add a
regulariser that makes their own head classify generated features as their label. No data leave the clients
(besides their label histograms, see below) and the server holds no data. With C classes, round t:

1. (t ≥ 2, once G has been trained) the server sends the global model x, G's weights (parameters and BatchNorm
   running statistics), the mask of labels G was last trained for (C values) and the round's regulariser
   weights (α_t, β_t) (2 values; the client half does not know the round number otherwise);
2. client k trains locally from x (the runtime's local training) with, on every minibatch (x_b, y_b),

       loss = CE(f(x_b), y_b)
              + α_t·(B_g / B)·CE(h(G(z_s, y_s)), y_s)              y_s ~ U(mask), B_g of them, z_s ~ U[0, 1)
              + β_t·KL(softmax(h(G(z, y_b))) ‖ softmax(f(x_b)))      target detached, batch mean,

   α_t = max(10⁻⁴, α·0.98^(t−1)), β_t likewise, G frozen in eval mode, gradients into the client's model only;
   it counts the labels of the samples it trains on, n_k(y), and uploads them (C values) with its model;
3. the server trains G on the heads h_k of the round's accepted client models (sampled order): for
   ``generator_steps`` steps, y ~ U(labels seen by some client), z ~ U[0, 1)^noise_dim, batch B_G,

       L_G = ensemble_alpha·Σ_k mean_i[w_k(y_i)·CE(h_k(G(z_i, y_i)), y_i)] + ensemble_eta·L_div,
       w_k(y) = c_k(y) / Σ_j c_j(y),   c_k(y) = n_k(y) + label_count_prior,
       L_div = exp(−mean_{i,j}[mean_d (z_i − z_j)²_d · mean_d |G_i − G_j|_d]),

   with Adam (lr ``generator_lr``, weight decay ``generator_weight_decay``) and one ExponentialLR step
   (γ ``generator_lr_decay``) per round; G in train mode (batch statistics);
4. the next global model is FedAvg's, x + Σ_k p_k·Δ_k / Σ_k p_k, p_k the client's sample count.

G = [z ⊕ one-hot(y)] → Linear(noise_dim + C → hidden) → BatchNorm1d → ReLU → Linear(hidden → feature dim); the
feature dim is the head's input size (not a parameter). Randomness: server draws from a generator seeded by
(run seed, round), client draws from the task's seeded generator, G's initial weights from the run seed, so a
resumed run is bit-identical (the checkpoint holds G, its Adam state, its lr schedule and the label mask).

Defaults are the reference's MNIST configuration (``zhuangdizhu/FedGen``, ``utils/model_config.py``:
``GENERATORCONFIGS['mnist']`` hidden 256, noise 32; ``RUNCONFIGS['mnist']``: ensemble_lr 3e-4,
weight_decay 1e-2, ensemble_alpha 1, ensemble_beta 0, ensemble_eta 1, generative_alpha 10,
generative_beta 10; ``serverpFedGen.py``: Adam betas (0.9, 0.999), ExponentialLR 0.98, ``train_generator``
runs ``ensemble_epochs // n_teacher_iters`` = 10 × ``n_teacher_iters`` 5 = 50 steps at ``batch_size`` 32;
``userpFedGen.py``: ``exp_lr_scheduler`` max(1e-4, w·0.98^round), ``gen_batch_size`` 32, gen_ratio
B_g / B; ``generator.py``: ``torch.rand`` noise (uniform, although its comment says Gaussian), DiversityLoss
with 'l1' outputs and 'l2' noise distances).

Deviations and choices, stated:

- the β term (distillation of the real batch towards G's prediction for its labels) is the reference code's;
  the paper's objective has only the α term;
- the reference's "epochs" are steps (local: 20 minibatch steps; G: 50 steps); local training here is the
  runtime's (``fl.local``: epochs over the client's data, its optimizer), and the regulariser applies on every
  local step (the reference stops it after ``early_stop`` = 20 steps, i.e. never within its 20 steps);
- label counts are the labels of the samples seen during local training (the reference counts the batches
  it draws, likewise), uploaded raw; the reference's start value of 1 per label is ``label_count_prior``
  added on the server (negative uploads are clamped to 0). G is trained for the labels some client saw
  (the reference: max count > ``MIN_SAMPLES_PER_LABEL`` = 1 with the start value 1, the same set);
- y_s is drawn from the labels G was last trained for (the broadcast mask); the reference draws from all
  labels of the dataset (``available_labels``), which the server does not know here;
- the reference's adversarial student term (``ensemble_beta``) is 0 in every configuration and omitted;
- the teachers are the round's accepted client models (the reference: the selected users' models); G is
  trained only in applied rounds, so in skipped rounds its lr schedule does not advance;
- there is no regulariser until G has been trained once (the reference: ``regularization = glob_iter > 0``);
  rounds are 1-based here, so the decay exponent is t − 1 (the reference's 0-based ``glob_iter``);
- evaluation is the runtime's (the global model on the test set; the reference averages per-user test
  splits, ``serverbase.py:test``) and all parameters and float buffers are averaged (the reference averages
  parameters only).

Communication: down (per dispatched task) the model plus, from the first round after G was trained, G's
parameters and float buffers, the C-value label mask and 2 regulariser weights; up the model update plus C
label counts. **Privacy**: the label counts are each client's label histogram (of the samples it trained on),
revealed to the server in the clear; the method needs them to weight the ensemble. Secure aggregation is
refused (the server reads each client's head and counts: ``Strategy.needs_individual_results``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from gptfl_ray.fl.distill import kl_to_teacher, round_generator
from gptfl_ray.fl.flat import VectorLayout
from gptfl_ray.fl.strategies.base import ClientContext, ClientResult, ServerContext
from gptfl_ray.fl.strategies.fedavg import FedAvg, ServerLrParams
from gptfl_ray.fl.strategies.registry import register
from gptfl_ray.models.heads import classifier_head, head_slices


class FedGenParams(ServerLrParams):
    generator_hidden_dim: int = Field(256, gt=0)
    noise_dim: int = Field(32, gt=0)
    generator_lr: float = Field(3e-4, gt=0)
    generator_weight_decay: float = Field(1e-2, ge=0)
    generator_lr_decay: float = Field(0.98, gt=0, le=1)  # ExponentialLR γ, stepped once per round
    generator_steps: int = Field(50, gt=0)  # server steps per round
    generator_batch_size: int = Field(32, gt=1)  # BatchNorm in train mode needs 2 or more
    ensemble_alpha: float = Field(1.0, ge=0)  # weight of the ensemble (teacher) loss
    ensemble_eta: float = Field(1.0, ge=0)  # weight of the diversity loss
    generative_alpha: float = Field(10.0, ge=0)  # client: CE of the head on generated features
    generative_beta: float = Field(10.0, ge=0)  # client: KL of the real batch to G's prediction
    generative_decay: float = Field(0.98, gt=0, le=1)  # weights decay as max(min, w·decay^(t−1))
    generative_min: float = Field(1e-4, ge=0)
    gen_batch_size: int = Field(32, gt=0)  # client: generated samples per local step
    label_count_prior: float = Field(1.0, ge=0)  # added to every client's count (the reference starts at 1)


class Generator(nn.Module):
    """G(z, y): [z ⊕ one-hot(y)] → Linear → BatchNorm1d → ReLU → Linear(→ feature dim)."""

    def __init__(self, noise_dim: int, num_classes: int, hidden_dim: int, feature_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(noise_dim + num_classes, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.out = nn.Linear(hidden_dim, feature_dim)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], dim=1)
        return self.out(F.relu(self.bn(self.fc(h))))


def build_generator(p: FedGenParams, num_classes: int, feature_dim: int, seed: int) -> Generator:
    """G with initial weights seeded by ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(p.noise_dim, num_classes, p.generator_hidden_dim, feature_dim)


def load_vector(module: nn.Module, vec: torch.Tensor) -> None:
    """Load a flat ``[parameters | float buffers]`` vector (:class:`VectorLayout`) into ``module``."""
    layout = VectorLayout.of(module)
    module.load_state_dict(layout.to_state_dict(vec.detach().cpu(), module.state_dict()))


def label_weights(counts: torch.Tensor, prior: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, labels): w[k, y] = c_k(y) / Σ_j c_j(y) with c = counts + prior ((K, C) float64, 0 where Σ = 0), and
    the labels some client saw (Σ_k counts[k, y] > 0), ascending."""
    c = counts.double() + prior
    total = c.sum(0, keepdim=True)
    w = torch.where(total > 0, c / total.clamp_min(1e-300), torch.zeros_like(c))
    return w, torch.nonzero(counts.sum(0) > 0).flatten()


def diversity_loss(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """exp(−mean_{i,j}[mean_d (z_i − z_j)² · mean_d |out_i − out_j|]) (the reference's ``DiversityLoss('l1')``)."""
    noise_dist = (z.unsqueeze(1) - z.unsqueeze(0)).pow(2).mean(2)
    out_dist = (out.unsqueeze(1) - out.unsqueeze(0)).abs().mean(2)
    return torch.exp(-(noise_dist * out_dist).mean())


def teacher_loss(
    features: torch.Tensor,
    y: torch.Tensor,
    heads: list[tuple[torch.Tensor, torch.Tensor | None]],
    weights: torch.Tensor,
) -> torch.Tensor:
    """Σ_k mean_i[w_k(y_i)·CE(h_k(features_i), y_i)] over the heads (W_k, b_k); ``weights`` is (K, C)."""
    total = features.new_zeros(())
    for k, (w, b) in enumerate(heads):
        ce = F.cross_entropy(F.linear(features, w, b), y, reduction="none")
        total = total + (ce * weights[k, y].to(ce.dtype)).mean()
    return total


@register
class FedGen(FedAvg):
    """FedAvg plus a server-trained feature generator whose samples regularise the clients' heads."""

    name = "fedgen"
    Params = FedGenParams

    params: FedGenParams

    def __init__(self, params: FedGenParams):
        super().__init__(params)
        self._gen: Generator | None = None  # client half: the task's frozen G (None: no regulariser)
        self._head: nn.Linear | None = None  # client half: the task's model head

    # ------------------------------------------------------------------------------ server half
    def setup(
        self, layout: VectorLayout, num_clients: int, state_dir: Path, server: ServerContext | None = None
    ) -> None:
        super().setup(layout, num_clients, state_dir, server)
        if server is None:
            raise ValueError("fedgen: needs the server context (model builder, seed)")
        p = self.params
        with torch.random.fork_rng(devices=[]):
            model = server.build_model()
        _, head = classifier_head(model)
        if head.out_features != server.num_classes:
            raise ValueError(
                f"fedgen: the head has {head.out_features} outputs, the data {server.num_classes} classes"
            )
        self.slices = head_slices(model, server.server_layout)
        self.head_shapes = [tuple(t.shape) for t in (head.weight, head.bias) if t is not None]
        seed = int(round_generator(server.seed, 0, salt=7).initial_seed())
        self.gen = build_generator(p, server.num_classes, head.in_features, seed).to(server.device)
        self.opt = torch.optim.Adam(
            self.gen.parameters(),
            lr=p.generator_lr,
            betas=(0.9, 0.999),
            weight_decay=p.generator_weight_decay,
        )
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=p.generator_lr_decay)
        self.labels: torch.Tensor | None = None  # mask (C,) of the labels G was last trained for
        self.heads: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # the round's client heads
        self.counts: list[torch.Tensor] = []  # and their label counts, in sampled order
        self.rnd = 1
        self.last_info: dict[str, Any] = {}

    def begin_round(self, rnd: int) -> None:
        self.rnd = rnd

    def reg_weights(self, rnd: int) -> tuple[float, float]:
        """(α_t, β_t) = max(min, w·decay^(t−1)) for round t (1-based)."""
        p = self.params
        f = p.generative_decay ** (rnd - 1)
        return max(p.generative_min, p.generative_alpha * f), max(p.generative_min, p.generative_beta * f)

    def broadcast(self) -> dict[str, torch.Tensor]:
        if self.labels is None:  # G not trained yet: no regulariser this round
            return {}
        return {
            "generator": VectorLayout.of(self.gen).to_vector(self.gen.state_dict()),
            "labels": self.labels.float(),
            "coef": torch.tensor(self.reg_weights(self.rnd), dtype=torch.float32),
        }

    def upload_sizes(self) -> dict[str, int]:
        assert self.server is not None
        return {"label_counts": self.server.num_classes}

    def client_result(self, result: ClientResult) -> None:
        assert result.weights is not None
        parts = [
            result.weights[s].view(shape).clone()
            for s, shape in zip(self.slices, self.head_shapes, strict=True)
        ]
        self.heads.append((parts[0], parts[1] if len(parts) > 1 else None))
        self.counts.append(result.uploads["label_counts"].double().clamp_min(0))

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor | None) -> torch.Tensor:
        out = super().server_update(x, mean_delta)
        if self.heads:
            self.train_generator(torch.stack(self.counts), self.heads, self.rnd)
        return out

    def train_generator(
        self, counts: torch.Tensor, heads: list[tuple[torch.Tensor, torch.Tensor | None]], rnd: int
    ) -> None:
        """``generator_steps`` Adam steps on L_G against ``heads`` weighted by ``counts`` (K, C); one lr step."""
        ctx, p = self.server, self.params
        assert ctx is not None
        weights, labels = label_weights(counts, p.label_count_prior)
        if len(labels) == 0:
            self.last_info = {"generator_steps": 0}
            return
        dev = ctx.device
        heads = [(w.to(dev), None if b is None else b.to(dev)) for w, b in heads]
        weights = weights.to(dev)
        gen = round_generator(ctx.seed, rnd, salt=1)
        self.gen.train()
        teach, div = [], []
        for _ in range(p.generator_steps):
            y = labels[torch.randint(len(labels), (p.generator_batch_size,), generator=gen)].to(dev)
            z = torch.rand(p.generator_batch_size, p.noise_dim, generator=gen).to(dev)
            self.opt.zero_grad()
            features = self.gen(z, y)
            t, d = teacher_loss(features, y, heads, weights), diversity_loss(z, features)
            (p.ensemble_alpha * t + p.ensemble_eta * d).backward()
            self.opt.step()
            teach.append(float(t.detach()))
            div.append(float(d.detach()))
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        mask = torch.zeros(self.gen.num_classes, dtype=torch.bool)
        mask[labels] = True
        self.labels = mask
        self.last_info = {
            "generator_steps": p.generator_steps,
            "generator_lr": lr,
            "teacher_loss_first": teach[0],
            "teacher_loss_last": teach[-1],
            "teacher_loss_mean": sum(teach) / len(teach),
            "diversity_loss_mean": sum(div) / len(div),
            "generator_labels": len(labels),
        }

    def round_info(self) -> dict[str, Any]:
        return dict(self.last_info)

    def end_round(self, applied: bool) -> None:
        self.heads, self.counts = [], []
        if not applied:
            self.last_info = {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"gen.{k}": v.detach().cpu().clone() for k, v in self.gen.state_dict().items()}
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().clone()
        if self.labels is not None:
            tensors["labels"] = self.labels.clone()
        meta = {"param_groups": opt["param_groups"], "sched": self.sched.state_dict()}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        assert self.server is not None
        dev = self.server.device
        self.gen.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("gen.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                state.setdefault(int(i), {})[k] = v if k == "step" else v.to(dev)
        groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.sched.load_state_dict(meta["sched"])
        self.labels = tensors["labels"].clone() if "labels" in tensors else None

    # ------------------------------------------------------------------------------ client half
    def client_begin(self, ctx: ClientContext) -> None:
        assert ctx.flat is not None
        _, head = classifier_head(ctx.flat.model)
        self._head, self._gen = head, None
        dev = ctx.flat.param.device
        ctx.scratch["label_counts"] = torch.zeros(head.out_features, dtype=torch.int64, device=dev)
        b = ctx.broadcast
        if "generator" not in b:
            return
        gen = build_generator(self.params, head.out_features, head.in_features, 0)
        load_vector(gen, b["generator"])
        self._gen = gen.to(dev).eval().requires_grad_(False)
        ctx.scratch["labels"] = torch.nonzero(b["labels"].cpu() > 0).flatten()
        ctx.scratch["coef"] = b["coef"].cpu()

    def local_loss(
        self, ctx: ClientContext, inputs: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor | None:
        counts = ctx.scratch["label_counts"]
        counts += torch.bincount(labels, minlength=len(counts))
        if self._gen is None:
            return None
        assert ctx.generator is not None and self._head is not None
        p, gen, dev = self.params, ctx.generator, logits.device
        alpha, beta = (float(c) for c in ctx.scratch["coef"])
        # β term: the real batch towards G's prediction for its labels (target detached)
        z = torch.rand(len(labels), p.noise_dim, generator=gen).to(dev)
        with torch.no_grad():
            target = F.softmax(self._head(self._gen(z, labels)), dim=1)
        latent = beta * kl_to_teacher(logits, target)
        # α term: the head classifies generated features of uniformly drawn labels as their label
        pool = ctx.scratch["labels"]
        y_s = pool[torch.randint(len(pool), (p.gen_batch_size,), generator=gen)].to(dev)
        z_s = torch.rand(p.gen_batch_size, p.noise_dim, generator=gen).to(dev)
        with torch.no_grad():
            features = self._gen(z_s, y_s)
        teacher = alpha * F.cross_entropy(self._head(features), y_s)
        return (p.gen_batch_size / ctx.batch_size) * teacher + latent

    def client_end(self, ctx: ClientContext, params: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
        return {"label_counts": ctx.scratch["label_counts"].float()}
