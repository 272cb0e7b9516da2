"""DynaFed (Pi et al., CVPR 2023, "DynaFed: Tackling Client Data Heterogeneity with Global Dynamics").

The protocol is FedAvg. On the server side, DynaFed also uses the *trajectory* of the global model: the server
records the global parameters θ_0 (initial), θ_1, θ_2, … after every applied round. When it holds
``trajectory_length`` checkpoints (L = 25: θ_0 … θ_24, so after round 24), it synthesises a small pseudo dataset
**once**, by MTT-style trajectory matching (Cazenavette et al., CVPR 2022) over that trajectory. From the next
round on, every round's average is fine-tuned on that dataset before it becomes the global model.

**Synthetic set.** S = (X, Y, α). X: C·``ipc`` images of the input shape, initialised ~ N(0, 1). Y: their
C-dim label *logits*, initialised to ``label_init``·one-hot(class), which is 0, i.e. softmax(Y) uniform. α: a
learnable step size, initialised to ``lr_teacher`` = 0.04. X, Y and α are each trained by their own Adam
(``lr_img`` 5e-2, ``lr_label`` 1e-2, ``lr_lr`` 1e-5).

**Matching.** Each of ``iterations`` (3000) steps draws a trajectory segment:

- start s ~ U{min_start, …, min(max_start, L−1−E)}, with E = ``expert_epochs`` = 3 and max_start = 50. If
  that upper bound is 0, then s = 0.
- target θ* = (1/k)·Σ_j θ_{s+i_j}, with k ~ U{min_average, …, min(max_average, E)} = U{2, 3} and
  i_1 … i_k ~ U{1, …, E} drawn with replacement (``--weight_averaging --least_ave_num 2``). Without
  ``weight_averaging``, θ* = θ_{s+E}.

It then unrolls ``syn_steps`` (20) differentiable SGD steps from θ̂_0 = θ_s on minibatches B_j of S. The
minibatches come from a fresh permutation, cut into chunks of ``batch_syn`` (default C·ipc, the whole set):

    θ̂_{j+1} = θ̂_j − α·∇_θ kd_loss(f(X_{B_j}; θ̂_j), Y_{B_j}),

and minimises the normalised distance

    ℒ(X, Y, α) = ‖θ̂_syn_steps − θ*‖² / ‖θ_s − θ*‖²

by back-propagating through the unrolled steps (``torch.func.functional_call`` on the flat parameter
vector), with one Adam step per iteration on each of X, Y and α. The loss

    kd_loss(z, y) = mean over batch *and classes* of −softmax(y)·log_softmax(z),

i.e. soft-label cross-entropy / C, is the reference's ``utils.kd_loss``.

**Server fine-tune** (``server.py:Server.datadistill``), in every round after the synthesis round:
x̄ = x + mean(Δ), the *unweighted* FedAvg mean (``weighted: false``, as ``reduce_average`` does). Then
``bn_passes`` (3) no-grad train-mode passes over S (they refresh BatchNorm statistics; a no-op for the
GroupNorm ConvNet). Then ``distill_iter`` (20) epochs of a **fresh** Adam (lr ``distill_lr`` 1e-4) on
kd_loss(f(X; x̄), Y), in shuffled minibatches of ``distill_batch_size`` (256). The result is the next global
model.

Defaults are the authors' CIFAR-10 scripts (``pipilurj/DynaFed``, ``experiments/cifar10/*.sh``:
``minimum_trajectory_length`` 25, ``maximum_distill_round`` 1, ``ipc`` 15, ``Iteration`` 3000,
``syn_steps`` 20, ``expert_epochs`` 3, ``max_start_epoch`` 50, ``min_start_epoch`` 0, ``lr_img`` 5e-2,
``lr_lr`` 1e-5, ``lr_teacher`` 0.04 (passed twice; the last value wins), ``label_init`` 0, ``distill_iter``
20, ``distill_lr`` 1e-4). ``lr_label`` 1e-2, ``max_ave_num`` 10 and ``batch_syn`` = C·ipc are
``run_end2end.py`` argparse defaults. The fine-tune batch of 256 and the 3 refresh passes are hard-coded in
``server.py``. The CIFAR-100 scripts use ``distill_iter`` 8.

Timing matches the reference. ``run_end2end.py`` appends θ after every round and synthesises at the start of
the round in which it holds L checkpoints, *before* that round's client training. Here the synthesis runs in
``server_update`` of the round that appends the L-th checkpoint (round L−1), and that round's average is
returned un-fine-tuned. Round L's clients therefore start from the same model as in the reference, and
fine-tuning begins in round L. Only the first L checkpoints are used; the trajectory is dropped after
synthesis (``maximum_distill_round`` 1).

The trajectory holds the **trainable part** of each global vector (``[:num_trainable]``), like the reference,
which stores ``.parameters()``. This is exact for the matching: the student runs in train mode, where
BatchNorm uses batch statistics. The float buffers (BatchNorm running statistics) are averaged as in FedAvg,
and updated by the refresh passes and the fine-tune.

Deviations from the reference code, stated:

- no DSA augmentation (``color_crop_cutout_flip_scale_rotate``) in the matching or the fine-tune;
- no ``Synthesizer.evaluate``: that diagnostic trains 3 nets × 500 epochs on S every 500 iterations and after
  synthesis, and tests them on the *test* set;
- all randomness comes from seeded generators of (run seed, round, salt) (``round_generator``). The reference
  mixes Python's ``random``, NumPy and the global torch RNG. Segment draws, permutations and the image
  initialisation come from one generator, and dropout (if the model has any) from a seeded ``fork_rng``;
- minibatch chunks are taken in order from each permutation (the reference pops them from the end, so with
  ``batch_syn`` < C·ipc its first chunk is the short one). With the default ``batch_syn`` = C·ipc this is
  the same;
- a skipped round (no aggregate) appends nothing to the trajectory (the reference has no skipped rounds);
- the denominator ‖θ_s − θ*‖² is clamped at the smallest normal float32 (the reference would divide by zero
  if the global model stood still over a segment);
- ``server_lr`` (FedAvg's η, default 1) is kept from the FedAvg family; the reference has none (η = 1).

Per-round facts (``round_info``): before synthesis, the number of recorded checkpoints. In the synthesis
round: the matching loss (mean over the first and over the last ≤10 iterations, since every iteration draws
a new segment), the iteration count, the seconds taken and the learned α. In every fine-tune round: kd_loss
on S (eval mode) before and after, the step count and the seconds. The runtime records the whole server step
as ``server_time_s``.

Communication equals FedAvg's: the trajectory, S and the fine-tune stay on the server. Secure aggregation:
compatible, since only the aggregate and the server's own history are used.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from gptfl_ray.fl.distill import predict_logits, round_generator
from gptfl_ray.fl.flat import FlatModel, VectorLayout
from gptfl_ray.fl.strategies.base import ServerContext
from gptfl_ray.fl.strategies.fedavg import FedAvg, ServerLrParams
from gptfl_ray.fl.strategies.registry import register

# Salts of the seeded generators (round_generator(seed, round, salt)).
SALT_MATCH, SALT_MATCH_DROPOUT, SALT_TUNE, SALT_TUNE_DROPOUT = 1, 2, 3, 4


class DynaFedParams(ServerLrParams):
    weighted: bool = False  # reference: reduce_average, an unweighted mean of the client models
    # trajectory and synthetic set
    trajectory_length: int = Field(25, ge=2)  # global checkpoints (θ_0 included) before synthesis
    ipc: int = Field(15, gt=0)  # synthetic images per class
    label_init: float = 0.0  # synthetic label logits = label_init · one-hot (0: uniform soft labels)
    lr_teacher: float = Field(0.04, gt=0)  # initial learnable inner step size α
    # trajectory matching
    iterations: int = Field(3000, gt=0)
    syn_steps: int = Field(20, gt=0)  # unrolled differentiable SGD steps per iteration
    batch_syn: int | None = Field(None, gt=0)  # inner minibatch (None: C·ipc, the whole set)
    expert_epochs: int = Field(3, gt=0)
    min_start: int = Field(0, ge=0)
    max_start: int = Field(50, ge=0)
    weight_averaging: bool = True  # target = mean of k checkpoints among the next expert_epochs
    min_average: int = Field(2, gt=0)
    max_average: int = Field(10, gt=0)
    lr_img: float = Field(5e-2, gt=0)
    lr_label: float = Field(1e-2, gt=0)
    lr_lr: float = Field(1e-5, gt=0)
    # server fine-tune (every round after the synthesis)
    distill_iter: int = Field(20, ge=0)  # epochs over the synthetic set
    distill_lr: float = Field(1e-4, gt=0)
    distill_batch_size: int = Field(256, gt=0)
    bn_passes: int = Field(3, ge=0)  # no-grad train-mode passes before fine-tuning (BatchNorm refresh)

    @model_validator(mode="after")
    def _segments_fit(self) -> DynaFedParams:
        last = self.trajectory_length - 1 - self.expert_epochs
        if last < 0:
            raise ValueError(
                f"trajectory_length ({self.trajectory_length}) must exceed expert_epochs ({self.expert_epochs})"
            )
        if 0 < min(self.max_start, last) < self.min_start:
            raise ValueError(
                f"min_start ({self.min_start}) exceeds min(max_start, trajectory_length-1-expert_epochs)"
            )
        if self.weight_averaging and self.min_average > min(self.max_average, self.expert_epochs):
            raise ValueError(
                f"min_average ({self.min_average}) exceeds min(max_average, expert_epochs) "
                f"({min(self.max_average, self.expert_epochs)})"
            )
        return self


def kd_loss(logits: torch.Tensor, label_logits: torch.Tensor) -> torch.Tensor:
    """The reference's ``utils.kd_loss``: mean over batch and classes of −softmax(y)·log_softmax(z)."""
    return torch.mean(-F.softmax(label_logits, dim=1) * F.log_softmax(logits, dim=1))


def sample_segment(length: int, p: DynaFedParams, gen: torch.Generator) -> tuple[int, list[int]]:
    """One draw of (start index s, target checkpoint indices), as ``Synthesizer.synthesize`` draws them."""

    def randint(lo: int, hi: int) -> int:  # uniform on {lo, ..., hi}
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    hi = min(p.max_start, length - 1 - p.expert_epochs)
    start = 0 if hi == 0 else randint(p.min_start, hi)
    if not p.weight_averaging:
        return start, [start + p.expert_epochs]
    k = randint(p.min_average, min(p.max_average, p.expert_epochs))
    return start, [start + randint(1, p.expert_epochs) for _ in range(k)]


def unflatten(layout: VectorLayout, vec: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of a flat trainable vector as ``{parameter name: tensor}`` (differentiable)."""
    out, off = {}, 0
    for e in layout.params:
        out[e.name] = vec[off : off + e.numel].view(e.shape)
        off += e.numel
    return out


def match_loss(
    net: nn.Module,
    layout: VectorLayout,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    syn_lr: torch.Tensor,
    syn_steps: int,
    batch_syn: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """‖θ̂_T − θ*‖² / ‖θ_s − θ*‖² after ``syn_steps`` unrolled SGD steps of kd_loss on the synthetic set.

    Differentiable in ``images``, ``labels`` and ``syn_lr``; ``start`` and ``target`` are trainable vectors.
    """
    theta = start.detach().clone().requires_grad_(True)
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(len(images), generator=gen).to(images.device).split(batch_syn))
        idx = chunks.pop(0)
        out = functional_call(net, unflatten(layout, theta), (images[idx],))
        (grad,) = torch.autograd.grad(kd_loss(out, labels[idx]), theta, create_graph=True)
        theta = theta - syn_lr * grad
    dist = (start - target).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
    return (theta - target).pow(2).sum() / dist


@dataclass
class SyntheticSet:
    images: torch.Tensor  # (C·ipc, *input_shape)
    labels: torch.Tensor  # (C·ipc, C) label logits
    lr: torch.Tensor  # learned step size α (scalar)
    losses: list[float] = field(default_factory=list)  # matching loss per iteration


def synthesize(
    net: nn.Module,
    layout: VectorLayout,
    trajectory: torch.Tensor,
    num_classes: int,
    input_shape: tuple[int, ...],
    p: DynaFedParams,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
) -> SyntheticSet:
    """Trajectory matching over ``trajectory`` ((L, num_trainable) global parameters): learns (X, Y, α)."""
    n = num_classes * p.ipc
    images = torch.randn((n, *input_shape), generator=gen).to(device).requires_grad_(True)
    classes = torch.arange(num_classes).repeat_interleave(p.ipc)
    labels = (F.one_hot(classes, num_classes).float() * p.label_init).to(device).requires_grad_(True)
    syn_lr = torch.tensor(p.lr_teacher, device=device).requires_grad_(True)
    opts = [
        torch.optim.Adam([images], lr=p.lr_img),
        torch.optim.Adam([labels], lr=p.lr_label),
        torch.optim.Adam([syn_lr], lr=p.lr_lr),
    ]
    traj = trajectory.to(device)
    net.train()
    losses = []
    for _ in range(p.iterations):
        s, idx = sample_segment(len(traj), p, gen)
        target = traj[idx].mean(0)
        loss = match_loss(
            net, layout, traj[s], target, images, labels, syn_lr, p.syn_steps, p.batch_syn or n, gen
        )
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
        losses.append(float(loss.detach()))
    return SyntheticSet(images.detach(), labels.detach(), syn_lr.detach(), losses)


def finetune(
    flat: FlatModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    p: DynaFedParams,
    gen: torch.Generator,
) -> int:
    """``bn_passes`` no-grad train-mode passes, then ``distill_iter`` epochs of a fresh Adam on kd_loss."""
    net, n, b = flat.model, len(images), p.distill_batch_size
    net.train()
    with torch.no_grad():
        for _ in range(p.bn_passes):
            for idx in torch.randperm(n, generator=gen).to(images.device).split(b):
                net(images[idx])
    opt = torch.optim.Adam([flat.param], lr=p.distill_lr)
    steps = 0
    for _ in range(p.distill_iter):
        for idx in torch.randperm(n, generator=gen).to(images.device).split(b):
            flat.zero_grad()  # never opt.zero_grad(): the gradient is a view FlatModel owns
            kd_loss(net(images[idx]), labels[idx]).backward()
            opt.step()
            steps += 1
    return steps


@contextlib.contextmanager
def seeded_torch(seed: int, rnd: int, salt: int):
    """The global torch RNG (dropout) seeded by (run seed, round, salt) inside; restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(round_generator(seed, rnd, salt).initial_seed())
        yield


@register
class DynaFed(FedAvg):
    """FedAvg; the server matches its own trajectory once, then fine-tunes every average on the result."""

    name = "dynafed"
    synthesizes_inputs = True  # its pseudo data are inputs learned by gradient: not for text (token ids)
    Params = DynaFedParams

    params: DynaFedParams

    def setup(
        self, layout: VectorLayout, num_clients: int, state_dir: Path, server: ServerContext | None = None
    ) -> None:
        super().setup(layout, num_clients, state_dir, server)
        if server is None or server.input_shape is None:
            raise ValueError(
                "dynafed: needs the server context with the input shape (ServerContext.input_shape)"
            )
        self.rnd = 0
        self.trajectory: list[torch.Tensor] = []  # trainable parts of θ_0, θ_1, ... (until synthesis)
        self.synthetic: SyntheticSet | None = None
        self.synthesized_round: int | None = None
        self.last_info: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ server half
    def begin_round(self, rnd: int) -> None:
        self.rnd = rnd

    def server_update(self, x: torch.Tensor, mean_delta: torch.Tensor | None) -> torch.Tensor:
        assert self.server is not None
        averaged = super().server_update(x, mean_delta)
        if self.synthetic is not None:
            return self.tune(averaged)
        n = self.server.server_layout.num_trainable
        if not self.trajectory:
            self.trajectory.append(x[:n].clone())  # θ_0: the model the first round started from
        self.trajectory.append(averaged[:n].clone())
        self.last_info = {"trajectory_checkpoints": len(self.trajectory)}
        if len(self.trajectory) >= self.params.trajectory_length:
            self.match()
        return averaged

    def match(self) -> None:
        """Synthesise (X, Y, α) from the recorded trajectory; the trajectory is dropped afterwards."""
        ctx, p = self.server, self.params
        assert ctx is not None and ctx.input_shape is not None
        t0 = time.perf_counter()
        net = ctx.build_model().to(ctx.device)
        traj = torch.stack(self.trajectory[: p.trajectory_length])
        with seeded_torch(ctx.seed, self.rnd, SALT_MATCH_DROPOUT):
            syn = synthesize(
                net,
                ctx.server_layout,
                traj,
                ctx.num_classes,
                tuple(ctx.input_shape),
                p,
                round_generator(ctx.seed, self.rnd, SALT_MATCH),
                ctx.device,
            )
        w = min(10, len(syn.losses))
        self.synthetic, self.synthesized_round, self.trajectory = syn, self.rnd, []
        self.last_info = {
            "match_loss_start": sum(syn.losses[:w]) / w,
            "match_loss_end": sum(syn.losses[-w:]) / w,
            "match_iterations": len(syn.losses),
            "match_s": time.perf_counter() - t0,
            "syn_lr": float(syn.lr),
            "trajectory_checkpoints": len(traj),
        }

    def tune(self, x: torch.Tensor) -> torch.Tensor:
        """Fine-tune the average ``x`` on the synthetic set; returns the next global vector."""
        ctx, p, syn = self.server, self.params, self.synthetic
        assert ctx is not None and syn is not None
        t0 = time.perf_counter()
        net = ctx.build_model().to(ctx.device)
        flat = FlatModel(net, ctx.server_layout)
        flat.load(x.to(ctx.device))
        images, labels = syn.images.to(ctx.device), syn.labels.to(ctx.device)
        before = float(kd_loss(predict_logits(net, images), labels))
        with seeded_torch(ctx.seed, self.rnd, SALT_TUNE_DROPOUT):
            steps = finetune(flat, images, labels, p, round_generator(ctx.seed, self.rnd, SALT_TUNE))
        self.last_info = {
            "finetune_loss_before": before,
            "finetune_loss": float(kd_loss(predict_logits(net, images), labels)),
            "finetune_steps": steps,
            "finetune_s": time.perf_counter() - t0,
        }
        return flat.vector().cpu()

    def round_info(self) -> dict[str, Any]:
        return dict(self.last_info)

    def end_round(self, applied: bool) -> None:
        if not applied:
            self.last_info = {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        if self.synthetic is not None:
            tensors = {
                "images": self.synthetic.images.cpu().clone(),
                "labels": self.synthetic.labels.cpu().clone(),
                "syn_lr": self.synthetic.lr.cpu().clone(),
            }
        elif self.trajectory:
            tensors = {"trajectory": torch.stack(self.trajectory)}
        return tensors, {"synthesized_round": self.synthesized_round}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.synthesized_round = meta.get("synthesized_round")
        self.trajectory = list(tensors["trajectory"].clone().unbind(0)) if "trajectory" in tensors else []
        self.synthetic = None
        if "images" in tensors:
            self.synthetic = SyntheticSet(
                tensors["images"].clone(), tensors["labels"].clone(), tensors["syn_lr"].clone()
            )
