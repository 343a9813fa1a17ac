"""The fused engine (``federation.engine=fused``): a round's train messages trained as ONE stacked model.

Design: a node's cohort (:func:`answer_cohort`) — messages, each with its partition's ``Context`` — is answered
by handing every TRAIN message whose client method trains by :meth:`fedlt.client_method.ClientMethod.fit` (the
shared loop of :func:`fedlt.train.train` with the method's own
:meth:`~fedlt.client_method.ClientMethod.objective`, between its
:meth:`~fedlt.client_method.ClientMethod.attach_local` and
:meth:`~fedlt.client_method.ClientMethod.detach_local`, e.g. FedLoGe's local head) to :func:`fused_train`,
and answering each with one reply
Message holding the same arrays and metrics the ClientApp would have sent
(:func:`fedlt.federation.apps._reply`). Everything else — query messages (prior estimation, CReFF's gradients,
CCVR's statistics), a method that overrides ``fit``, a client that draws an injected failure this round
(``federation.failure_rate``: the ClientApp raises it), an objective that reads more of the model than the view
below offers — goes to the ClientApp one message at a time, as in the in-process engine. A fused reply passes
through what the ClientApp's mod would do to it: a DP clipping norm's clip (:func:`clipped`). Two callers:
:class:`FusedGrid` (``federation.engine=fused``), a Flower ``Grid`` in the ServerApp's process that answers the
round's messages for every partition, and a host node (``federation.hosts``, :mod:`fedlt.federation.hosts`),
a Flower node holding a share of the partitions that answers its share — the same trainer on several GPUs or
machines under one SuperLink.

Stacking: per-client parameters, BatchNorm buffers and SGD momentum buffers are stacked along a leading
client dimension; one step runs ``torch.func.vmap`` over ``torch.func.functional_call`` of the model. vmap's
batching rule for a convolution with a batched weight is itself a grouped convolution
(``aten/src/ATen/functorch/BatchRulesConvolution.cpp``), so this *is* the grouped-convolution layout without
rewriting any model; BatchNorm's running statistics, stacked, are updated in place under vmap per client.

Objectives unchanged: each client's objective is built by its method from the model holding that client's
global weights and its own attached modules (FedProx clones them, GBME freezes the other experts, FedLoGe
attaches l_k); it is then called with a :class:`_ClientView` of client j: ``view(x)``,
``view.expert_logits(x)``, ``view.expert_forward(x, m)`` and a top-level submodule on the batch
(``view.features(x)``) return client j's slice of ONE vmapped forward pass of the whole group (computed on
first use in the step, shared by every client; each once per step, on the client's own batch); a submodule
called on anything else (a head on the features, ``m.classifier(m.features(x))``) runs on client j's own
slices of its parameters (:class:`_ClientModule`; not one whose buffers train); ``view.parameters()`` and
``view.get_parameter(name)`` yield client j's slices of the stacked parameters (the proximal term, FedLoGe's
heads). The group's loss is Σ_j L_j, so the gradient
reaching client j's slice is ∇L_j exactly. Where every client's objective has one structure
(:mod:`fedlt.objectives`: plain cross-entropy, or a :class:`~fedlt.objectives.LossObjective` of one function;
either with FedProx's :class:`~fedlt.objectives.ProximalObjective` term) the L_j of a step come from one call
for the group (:class:`_GroupLoss`: :func:`cross_entropy_per_client`, or the loss vmapped over the clients'
outputs and their own tensors, and the proximal term once per stacked parameter) instead of each client's
objective's ops once per client (at 50 clients, FedProx's term alone was ~43,000 ops a step). Otherwise each
client's objective is called on its view. An objective that asks the view for anything else (another
attribute, a forward of a changed batch such as mixup's, a second forward in one step, which would update
BatchNorm twice) raises :class:`NotFusable` and the group falls back to the ClientApp (the reason printed once
a process). fedavg, fedprox, fedlc, local_loss, fedetf, fedloge, fedrod, tde, ncl, shike, tlc, area and gbme
(joint and expert phases) all fuse, each with its group loss; fedgrab fuses with its objective per client
(its balancer's few ops on the host each step); glmc, lfme and sbcl train their own loops (``fit``) and go per
client (the line before the first round and ``--dry-run`` say so: :func:`not_fused_note`).

Work before training: a method's :meth:`~fedlt.client_method.ClientMethod.prepare` (AREA's feature pass over
the client's data with the received model, Fed-GraB's release seed) runs per client, as in ``fit``, on the
client's own generator before any batch is drawn from it, then its objective is built; the reply's metrics
include :meth:`~fedlt.client_method.ClientMethod.round_metrics` of that objective (Fed-GraB's balancer state).
Each client has its own :class:`~fedlt.client_method.ClientMethod` instance, as the ClientApp builds one per
message: every client is set up before any trains, so state a method keeps on ``self`` between ``prepare`` /
``objective`` and ``round_metrics`` would otherwise be the last client's in every reply.

Same random streams: client j's steps are drawn by :func:`client_draws` — :func:`fedlt.train.batch_indices`, the
loop of :func:`fedlt.train.train` step for step (epoch order from the sampler, batch of one dropped, lr at the
same fractional epoch), then each batch's crop offsets and flips (:meth:`fedlt.train.Augment.draw`) — on the
client's own generator ``torch_generator(seed, Stream.CLIENT, round, pid)``, the one the ClientApp would use,
in the order :func:`fedlt.train.batch_schedule` draws them. The numbers are applied to the whole group's batch
at once (:func:`group_batch`: one gather per client into one buffer, then one crop, flip and normalisation),
so the batches equal the ClientApp's without a kernel per client per augmentation op.

Uneven clients (different sizes, hence different step counts and last-batch sizes): at each step the clients
that still have a batch are grouped by batch size and each group runs one vmapped step on the gathered
slices of its clients, written back afterwards. A client without a batch this step (finished) is not in any
group: its parameters, momentum and BatchNorm statistics are not read or written, so it cannot move (no
weight decay, no momentum step, no statistics update). In the common step (every client at full batch) the
group is the whole cohort and nothing is gathered.

SGD by hand, PyTorch's ``torch.optim.SGD`` single-tensor formula with dampening 0 (``torch/optim/sgd.py``),
per stacked tensor: g ← ∇ + λ·w; b ← g on the first step, else μ·b + g; g ← g + μ·b (Nesterov) or b;
w ← w − η_j·g, with η_j the client's own lr this step; a parameter without gradient (frozen, or not reached)
is skipped as SGD skips it. Once every client of a whole-group step has its momentum buffers and one lr,
the step runs as PyTorch's multi-tensor SGD (:func:`_sgd_foreach`: one ``torch._foreach_*`` call per op for
all parameters, instead of ~7 ops per parameter). On CUDA the forward runs under bf16 autocast, as
:func:`fedlt.train.train`.

Equivalence with the per-client engines is tested (tests/test_fused.py): the same weights, BatchNorm buffers
and momentum after one round in float64 to 1e-9, in float32 within float tolerance, and the same accuracy.
``fit_seconds`` of each reply is the fused group's wall time divided by its size (their sum is the time).
A client whose loss or trained weights became NaN or infinite gets no fused reply: the ClientApp trains it
again from the same message and stream, and its :class:`~fedlt.train.NonFiniteLoss` ("partition p, round t:
the training loss became non-finite …") stops the run as on the other engines — never NaN weights aggregated.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from torch import nn
from torch.func import functional_call, vmap

from fedlt.client_method import ClientMethod, FitResult
from fedlt.config import Config
from fedlt.data.augment import Draws, apply_crop_flip, apply_cutout, normalize
from fedlt.device import host_to_device, resolve_device
from fedlt.experiment import augment_for, experiment_for, model_for
from fedlt.federation.apps import _reply, injected_failure, make_client_app, message_config
from fedlt.federation.dp import client_clipping_mod
from fedlt.federation.inprocess import InProcessGrid, _ServerProcessState, call_client_app, run_on_grid
from fedlt.federation.records import load_state, to_state
from fedlt.objectives import LossObjective, LossParts, ProximalObjective, loss_parts
from fedlt.registry import CLIENTS
from fedlt.streams import Stream, torch_generator
from fedlt.train import (
    Augment,
    Objective,
    OptimConfig,
    TensorData,
    at_least_float32,
    batch_indices,
    cross_entropy_objective,
)


class NotFusable(Exception):
    """A client's objective needs more of the model than :class:`_ClientView` offers: train it per client."""


_SAID: set[str] = set()  # the reasons for training one by one already said in this process


def say_once(line: str) -> None:
    """Print ``line`` the first time this process is to say it (a fallback of every round is said once)."""
    if line not in _SAID:
        _SAID.add(line)
        print(line, flush=True)


def own_loop(method: type[ClientMethod]) -> bool:
    """Whether a client method trains with its own loop (overrides ``fit``): its clients never fuse."""
    return method.fit is not ClientMethod.fit


def not_fused_note(cfg: Config) -> str:
    """`` (not fused: …)`` for the plan of a run whose engine fuses (``fused``, host nodes) but whose client
    method has its :func:`own_loop`, so :func:`answer_cohort` trains its clients one by one; else ``""``."""
    fuses_here = cfg.federation.engine == "fused" or cfg.federation.hosts
    if not fuses_here or not own_loop(CLIENTS.get(cfg.client.name)):
        return ""
    return f" (not fused: client method {cfg.client.name} trains with its own loop (fit), so its clients train " \
           f"one by one)"


# ------------------------------------------------------------------------------------------ the client view

class _MethodCall(nn.Module):
    """``model.<name>(x, *args)`` as a module's forward, so that ``functional_call`` can run any method."""

    def __init__(self, model: nn.Module, name: str, args: tuple) -> None:
        super().__init__()
        self.model, self.name, self.args = model, name, args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.name)(x, *self.args)


class _GroupForward:
    """One step of a group: the vmapped outputs of the model's methods, each computed once on first use."""

    def __init__(self, model: nn.Module, params: dict, buffers: dict, x: torch.Tensor, autocast) -> None:
        self.model, self.params, self.buffers, self.x, self.autocast = model, params, buffers, x, autocast
        self.outputs: dict[tuple, torch.Tensor] = {}

    def output(self, name: str, args: tuple = ()) -> torch.Tensor:
        key = (name, args)
        if key not in self.outputs:
            call = _MethodCall(self.model, name, args)
            state = {f"model.{k}": v for k, v in {**self.params, **self.buffers}.items()}
            with self.autocast:
                self.outputs[key] = vmap(lambda s, x: functional_call(call, s, (x,)))(state, self.x)
        return self.outputs[key]


class _ClientView:
    """Client ``j`` of a fused group as the model its objective sees (see the module docstring). Each of the
    model's methods may be called once per step and on the client's own batch only: the group's forward pass is
    of that batch, once (a changed batch — mixup, a flip — or a second pass raises :class:`NotFusable`)."""

    def __init__(self, group: _GroupForward, j: int, names: list[str], batch: torch.Tensor) -> None:
        self._group, self._j, self._names, self._batch = group, j, names, batch
        self._called: set[tuple] = set()

    def _output(self, x: torch.Tensor, name: str, args: tuple = ()) -> torch.Tensor:
        if not self._is_own_batch(x):
            raise NotFusable(f"a client objective calls model.{name} on another batch than its own")
        if (name, args) in self._called:
            raise NotFusable(f"a client objective calls model.{name} twice in one step")
        self._called.add((name, args))
        return self._group.output(name, args)[self._j]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(x, "forward")

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(x, "expert_logits")

    def expert_forward(self, x: torch.Tensor, m: int, run_others: bool = False) -> torch.Tensor:
        return self._output(x, "expert_forward", (int(m), bool(run_others)))

    def parameters(self) -> Iterator[torch.Tensor]:
        return (self._group.params[n][self._j] for n in self._names)

    def get_parameter(self, name: str) -> torch.Tensor:
        if name not in self._group.params:
            raise NotFusable(f"a client objective reads model.{name}, which is not a parameter")
        return self._group.params[name][self._j]

    def _is_own_batch(self, x: torch.Tensor) -> bool:
        """``x`` is this client's batch (a cast copy, ``x.to(dtype)``, is too; anything else is not)."""
        own = self._group.x[self._j]
        return x is self._batch or (x.shape == own.shape and torch.equal(x.to(own.dtype), own))

    def __getattr__(self, name: str):
        module = getattr(self._group.model, name, None)
        if isinstance(module, nn.Module):
            return _ClientModule(self, name, module)
        raise NotFusable(f"a client objective reads model.{name}, which the fused engine does not offer")


class _ClientModule:
    """Submodule ``prefix`` of client ``j``'s model (``model.features``, ``model.classifier.aux``): called on
    the client's own batch, a top-level submodule gives client j's slice of the group's one vmapped pass
    (as :class:`_ClientView` does for the model's methods); called on anything else (a head on the
    features), it runs on client j's slices of its parameters alone (``functional_call``), which a submodule
    whose buffers train (BatchNorm statistics) cannot: :class:`NotFusable`. Its child modules are
    ``_ClientModule`` too, its parameters client j's slices, any other attribute the template's own."""

    def __init__(self, view: _ClientView, prefix: str, module: nn.Module) -> None:
        self._view, self._prefix, self._module = view, prefix, module

    def __call__(self, x: torch.Tensor, *args) -> torch.Tensor:
        view = self._view
        if "." not in self._prefix and not args and view._is_own_batch(x):
            return view._output(x, self._prefix)
        group, j, dot = view._group, view._j, self._prefix + "."
        if any(n.startswith(dot) for n in group.buffers):
            raise NotFusable(f"a client objective calls model.{self._prefix}, whose buffers train, on another "
                             "input than its own batch")
        own = {n[len(dot):]: p[j] for n, p in group.params.items() if n.startswith(dot)}
        return functional_call(self._module, own, (x, *args))

    def __getattr__(self, name: str):
        attr = getattr(self._module, name)
        full = f"{self._prefix}.{name}"
        if isinstance(attr, nn.Module):
            return _ClientModule(self._view, full, attr)
        if full in self._view._group.params:
            return self._view._group.params[full][self._view._j]
        if full in self._view._group.buffers:
            raise NotFusable(f"a client objective reads the buffer model.{full}, which trains per client")
        return attr


# ------------------------------------------------------------------------------------------ the trainer

@dataclass
class FusedResult:
    """Per client: its final state dict (parameters and buffers), momentum buffers, mean loss, steps and images
    trained on, and whether its loss and trained weights stayed finite (:func:`fedlt.train.train` raises
    :class:`~fedlt.train.NonFiniteLoss` where they did not)."""

    states: list[dict[str, torch.Tensor]]
    momentum: list[dict[str, torch.Tensor]]
    losses: list[float]
    steps: list[int]
    images: list[int]
    finite: list[bool]
    seconds: float = 0.0


def _sgd(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, first: torch.Tensor, lr: torch.Tensor | float,
         opt: OptimConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch SGD (dampening 0) on a stack of clients: new (w, momentum buffer). ``first`` marks the clients
    whose buffer does not exist yet (SGD's ``buf = clone(g)``)."""
    if opt.weight_decay != 0:
        g = g.add(p, alpha=opt.weight_decay)
    if opt.momentum != 0:
        shape = (-1,) + (1,) * (g.dim() - 1)
        buf = torch.where(first.view(shape), g, buf.mul(opt.momentum).add(g))
        g = g.add(buf, alpha=opt.momentum) if opt.nesterov else buf
    if isinstance(lr, float):
        return p.add(g, alpha=-lr), buf
    return p - lr.view((-1,) + (1,) * (g.dim() - 1)).to(p.dtype) * g, buf


def _sgd_foreach(ps: list[torch.Tensor], gs: list[torch.Tensor], bufs: list[torch.Tensor], lr: float,
                 opt: OptimConfig) -> None:
    """:func:`_sgd` in place on stacks of clients whose momentum buffers all exist and whose lr is one number,
    as PyTorch's multi-tensor SGD (``_multi_tensor_sgd``): one ``torch._foreach_*`` call per op for all
    parameters (on a GPU a few fused kernels instead of ~5 launches per parameter). ``gs`` is overwritten."""
    if opt.weight_decay != 0:
        torch._foreach_add_(gs, ps, alpha=opt.weight_decay)
    if opt.momentum != 0:
        torch._foreach_mul_(bufs, opt.momentum)
        torch._foreach_add_(bufs, gs)
        if opt.nesterov:
            torch._foreach_add_(gs, bufs, alpha=opt.momentum)
        else:
            gs = bufs
    torch._foreach_add_(ps, gs, alpha=-lr)


def client_draws(data: TensorData, opt: OptimConfig, generator: torch.Generator, augment: Augment | None, *,
                 epochs: float | None, steps: int | None) -> Iterator[tuple[torch.Tensor, Draws | None, float]]:
    """(indices, augmentation draws, lr) of each of a client's steps: the random numbers
    :func:`fedlt.train.batch_schedule` draws from ``generator`` — the epoch's order, then each batch's crop
    offsets, flips and Cutout centres — in its order, without touching the images (:func:`group_batch` applies
    them)."""
    for idx, lr in batch_indices(data, opt, epochs=epochs, steps=steps, generator=generator):
        yield idx, (None if augment is None else augment.draw(len(idx), generator, tuple(data.images.shape[2:]))), lr


def group_batch(datas: list[TensorData], picks: list[tuple[torch.Tensor, Draws | None]], augment: Augment | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches of a group's clients as (m, B, C, H, W) images and (m, B) labels: client i's ``picks[i]``
    indices taken from its own shard into one uint8 buffer, cropped and flipped there with the clients' draws
    concatenated, then normalised — one kernel per op for the group instead of one per client, and one copy of
    the step's numbers (indices, crop offsets, flips) to the device, which on a GPU does not wait for the
    queued steps (:func:`fedlt.device.host_to_device`).

    Each client's slice equals :func:`fedlt.train.prepare_batch` of its batch, which normalises first and pads
    the crop with black's normalised value (0 − mean)/std: every op is per image, and a padded pixel 0
    normalises to exactly that value. Cropping the uint8 images moves a quarter of the bytes."""
    first, (m, b) = datas[0], (len(picks), len(picks[0][0]))
    device = first.images.device
    n = m * b
    draws = [d for _, d in picks] if augment is not None else [(None, None, None)]
    has_offsets, has_flips, has_holes = (draws[0][k] is not None for k in range(3))
    host = [idx for idx, _ in picks]  # the step's numbers in one int64 tensor: one copy to the device
    if has_offsets:
        host.append(torch.cat([d[0] for d in draws], dim=1).flatten())
    if has_flips:
        host.append(torch.cat([d[1] for d in draws]).long())
    if has_holes:
        host.append(torch.cat([d[2] for d in draws], dim=1).flatten())
    numbers = host_to_device(torch.cat(host), device)
    rows = numbers[:n].split(b)
    at = n
    offsets, at = (numbers[at:at + 2 * n].view(2, n), at + 2 * n) if has_offsets else (None, at)
    flips, at = (numbers[at:at + n].bool(), at + n) if has_flips else (None, at)
    holes = numbers[at:at + 2 * n].view(2, n) if has_holes else None
    images = torch.empty((n, *first.images.shape[1:]), dtype=first.images.dtype, device=device)
    labels = torch.empty(n, dtype=first.labels.dtype, device=device)
    for i, (data, r) in enumerate(zip(datas, rows)):
        torch.index_select(data.images, 0, r, out=images[i * b:(i + 1) * b])
        torch.index_select(data.labels, 0, r, out=labels[i * b:(i + 1) * b])
    if has_offsets or has_flips:
        images = apply_crop_flip(images, augment.crop_padding, offsets, flips)  # pads with pixel 0
    x = normalize(images, first.mean, first.std)  # one experiment: every shard has its mean and std
    if has_holes:
        x = apply_cutout(x, augment.cutout, holes)  # after normalising: fill 0, as Augment.apply
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.view(m, b, *x.shape[1:]), labels.view(m, b)


def cross_entropy_per_client(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each client's :func:`fedlt.train.cross_entropy_objective` of a group's (m, B, C) logits and (m, B) labels,
    as (m,) in one call: −log softmax(z)_y averaged over each client's B samples, in float32 at least."""
    m, b = y.shape
    z = at_least_float32(logits)
    return F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="none").view(m, b).mean(1)


class _GroupLoss:
    """A group step's losses L_j, shape (m,), in one call where every client's objective has one structure
    (:mod:`fedlt.objectives`): plain cross-entropy (:func:`cross_entropy_per_client`), or a
    :class:`~fedlt.objectives.LossObjective` of one function (:func:`~fedlt.objectives.loss_parts`) vmapped
    over the group's outputs, labels, each client's own tensors and the weights it names (its ``params``: the
    group's rows of the stacked parameters); either plus ½μ·Σ_l ‖w_l − w⁰_l‖² of a
    :class:`~fedlt.objectives.ProximalObjective`, one subtraction and sum per stacked parameter. The clients'
    tensors and anchors are stacked once per round, on the device.

    A loss that ``vmap`` cannot run (a random op: the per-client path draws from the global generator in
    client order; data-dependent control flow) disables it for the round: the step's losses come from the
    per-client path, on the same forward pass (a one-line note, once per loss and process)."""

    noted: set[str] = set()  # the losses whose fallback this process has printed

    def __init__(self, function: Callable | None, output: str, args: tuple, tensors: list[torch.Tensor],
                 weights: tuple[str, ...], mu: float, anchor: dict[str, torch.Tensor], name: str = "") -> None:
        self.function, self.output, self.args, self.tensors = function, output, args, tensors
        self.weights, self.mu, self.anchor, self.name = weights, mu, anchor, name
        self.failed: str | None = None

    @staticmethod
    def _structure(objective: Objective) -> tuple[tuple, LossParts | None, float, tuple] | None:
        """(key, loss parts, μ, anchor) of ``objective``, or None where it has no structure to group."""
        mu, anchor = 0.0, ()
        if isinstance(objective, ProximalObjective):
            mu, anchor, objective = objective.mu, objective.anchor, objective.base
        if objective is cross_entropy_objective:
            return ("cross_entropy", "forward", (), (), mu), None, mu, anchor
        if isinstance(objective, LossObjective):
            parts = loss_parts(objective.loss)
            if parts is not None:
                return (parts.key, objective.output, objective.args, objective.params, mu), parts, mu, anchor
        return None

    @classmethod
    def of(cls, objectives: list[Objective], trainable: list[str], stacked: dict[str, torch.Tensor],
           device: torch.device) -> "_GroupLoss | None":
        """The group loss of ``objectives`` (one per client) with ``trainable`` the names of the trainable
        parameters in ``model.parameters()`` order and ``stacked`` the stacked parameters, or None."""
        structures = [cls._structure(o) for o in objectives]
        if any(s is None for s in structures) or any(s[0] != structures[0][0] for s in structures):
            return None
        (_, output, args, weights, mu), parts, _, _ = structures[0]
        if any(n not in stacked for n in weights):
            return None
        anchor = {}
        if mu != 0:
            if any(len(s[3]) != len(trainable) for s in structures):
                return None
            anchor = {n: torch.stack([s[3][i] for s in structures]).to(device) for i, n in enumerate(trainable)}
            if any(a.shape != stacked[n].shape for n, a in anchor.items()):
                return None
        if parts is None:
            return cls(None, output, args, [], (), mu, anchor)
        tensors = [torch.stack([s[1].tensors[i] for s in structures]).to(device) for i in range(len(parts.names))]
        name = getattr(parts.function, "__qualname__", repr(parts.function))
        return cls(vmap(parts.per_sample_call()), output, args, tensors, weights, mu, anchor, name)

    def __call__(self, step: "_GroupForward", ys: torch.Tensor, params: dict[str, torch.Tensor],
                 idx: torch.Tensor | None) -> torch.Tensor | None:
        """The losses of the group ``idx`` (None: every client), or None once the vmapped loss failed."""
        if self.failed is not None:
            return None
        z = step.output(self.output, self.args)
        if self.function is None:
            losses = cross_entropy_per_client(z, ys)
        else:
            try:
                with step.autocast:
                    losses = self.function(z, ys, *(t if idx is None else t[idx] for t in self.tensors),
                                           *(params[n] for n in self.weights))  # params: the group's rows
            except Exception as exc:  # noqa: BLE001 -- any op vmap cannot batch: the per-client path answers
                self.failed = f"{type(exc).__name__}: {exc}"
                if self.name not in _GroupLoss.noted:
                    _GroupLoss.noted.add(self.name)
                    print(f"note: fused engine: loss {self.name} runs once per client (vmap cannot batch it: "
                          f"{type(exc).__name__}); the same result, more kernel launches", flush=True)
                return None
        if self.mu != 0:
            m = len(ys)
            prox = sum((params[n] - (a if idx is None else a[idx])).pow(2).reshape(m, -1).sum(1)
                       for n, a in self.anchor.items())
            losses = losses + 0.5 * self.mu * prox
        return losses


def fused_train(model: nn.Module, states: list[dict[str, torch.Tensor]], datas: list[TensorData],
                objectives: list[Objective], opts: list[OptimConfig], generators: list[torch.Generator],
                augment: Augment | None, *, epochs: float | None, steps: int | None) -> FusedResult:
    """Train client j from ``states[j]`` on ``datas[j]`` with ``objectives[j]`` (built on ``model``), SGD of
    ``opts[j]`` and batches of ``generators[j]``, all clients as one stacked model (see the module docstring).

    ``model`` is the template: its trainable parameters (``requires_grad``) are the ones trained; every
    client's SGD must agree on momentum, weight decay and Nesterov (their lr may differ)."""
    t0 = time.perf_counter()
    k = len(states)
    device = next(iter(model.parameters())).device
    model.train()
    if any((o.momentum, o.weight_decay, o.nesterov) != (opts[0].momentum, opts[0].weight_decay, opts[0].nesterov)
           for o in opts):
        raise NotFusable("clients with different SGD momentum / weight decay in one round")
    if any(o.sam != "none" for o in opts):  # train() wraps the objective sharpness-aware; not written here
        raise NotFusable("a sharpness-aware client optimizer")
    opt = OptimConfig(lr=opts[0].lr, momentum=opts[0].momentum, weight_decay=opts[0].weight_decay,
                      nesterov=opts[0].nesterov and opts[0].momentum > 0)
    param_names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # the states' buffers; a non-persistent one (FedETF's fixed ETF) is not sent and stays the model's own
    buffer_names = [n for n, _ in model.named_buffers() if n in states[0]]
    P = {n: torch.stack([s[n] for s in states]).to(device) for n in param_names}
    B = {n: torch.stack([s[n] for s in states]).to(device) for n in buffer_names}
    M = {n: torch.zeros_like(P[n]) for n in trainable}
    has_momentum = {n: torch.zeros(k, dtype=torch.bool, device=device) for n in trainable}
    everyone_has_momentum: set[str] = set()  # the names whose has_momentum is all True (known without a sync)
    trainable_order = [n for n in param_names if n in trainable]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    dtype = next(iter(P.values())).dtype

    if augment is not None and type(augment) is not Augment:
        raise NotFusable("an augmentation other than fedlt.train.Augment's crop and flip")
    streams = [client_draws(d, o, g, augment, epochs=epochs, steps=steps) for d, o, g in zip(datas, opts, generators)]
    group_loss = _GroupLoss.of(objectives, trainable_order, P, device)
    active = list(range(k))
    loss_sum = torch.zeros(k, device=device)
    seen, done_steps = [0] * k, [0] * k
    while active:
        batches = {}
        for j in active:
            b = next(streams[j], None)
            if b is not None:
                batches[j] = b
        active = list(batches)
        groups: dict[int, list[int]] = {}
        for j in active:
            groups.setdefault(len(batches[j][0]), []).append(j)
        for size, members in groups.items():
            whole = members == list(range(k))
            idx = None if whole else host_to_device(torch.tensor(members), device)  # none when whole
            params = {n: (P[n] if whole else P[n][idx]).detach().requires_grad_(n in trainable) for n in param_names}
            buffers = B if whole else {n: B[n][idx] for n in buffer_names}
            xs, ys = group_batch([datas[j] for j in members], [batches[j][:2] for j in members], augment)
            step = _GroupForward(model, params, buffers, xs.to(dtype), autocast)
            losses = None if group_loss is None else group_loss(step, ys, params, None if whole else idx)
            if losses is None:
                per_client = []
                for i, j in enumerate(members):
                    xi = xs[i]  # one object: the view knows its own batch by identity
                    with autocast:
                        per_client.append(objectives[j](_ClientView(step, i, param_names, xi), xi, ys[i]))
                losses = torch.stack(per_client)
            losses.sum().backward()  # Σ_j L_j: client j's slice gets ∇L_j
            if whole:
                loss_sum += losses.detach() * size
            else:
                loss_sum[idx] += losses.detach() * size
            for j in members:
                seen[j] += size
                done_steps[j] += 1
            lrs = [batches[j][2] for j in members]
            lr = lrs[0] if all(v == lrs[0] for v in lrs) else host_to_device(torch.tensor(lrs, dtype=torch.float64),
                                                                             device)
            with torch.no_grad():
                reached = [n for n in trainable_order if params[n].grad is not None]  # SGD skips the others
                if whole and isinstance(lr, float) and all(n in everyone_has_momentum for n in reached):
                    _sgd_foreach([P[n] for n in reached], [params[n].grad for n in reached],
                                 [M[n] for n in reached], lr, opt)  # the common step: a few kernels in all
                    reached = []
                for n in reached:
                    grad = params[n].grad
                    p_old = P[n] if whole else P[n][idx]
                    buf = M[n] if whole else M[n][idx]
                    first = ~(has_momentum[n] if whole else has_momentum[n][idx])
                    new_p, new_buf = _sgd(p_old, grad, buf, first, lr, opt)
                    if whole:
                        P[n], M[n] = new_p, new_buf
                        has_momentum[n][:] = True
                        everyone_has_momentum.add(n)
                    else:
                        P[n][idx], M[n][idx] = new_p, new_buf
                        has_momentum[n][idx] = True
                if not whole:
                    for n in buffer_names:
                        B[n][idx] = buffers[n]
    order = list(model.state_dict())
    out_states = per_client_on_host({n: (P[n] if n in P else B[n]).detach() for n in order}, k)
    momentum = [{n: M[n][j] for n in trainable if has_momentum[n][j]} for j in range(k)]
    # one wait for the device: each client's mean loss, and whether its loss and trained weights stayed finite
    finite = loss_sum.isfinite()
    for n in trainable:
        finite &= P[n].detach().isfinite().reshape(k, -1).all(1)  # a 0-d parameter too
    means = loss_sum / torch.tensor([max(n, 1) for n in seen], device=device)
    losses, finite_list = means.tolist(), finite.tolist()
    return FusedResult(out_states, momentum, losses, done_steps, seen, finite_list, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ the boundary

def _by_dtype(state: dict[str, torch.Tensor]) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for n, v in state.items():
        groups.setdefault((v.dtype, v.device), []).append(n)
    return groups


def _through_flat(state: dict[str, torch.Tensor],
                  move: Callable[[torch.Tensor], torch.Tensor] = lambda flat: flat) -> dict[str, torch.Tensor]:
    """``state``'s tensors of each dtype and device concatenated into one new flat buffer, ``move``d (e.g. to
    another device) in one call, and viewed per entry: a few copies in all instead of one per tensor."""
    out: dict[str, torch.Tensor] = {}
    for names in _by_dtype(state).values():
        flat = move(torch.cat([state[n].detach().reshape(-1) for n in names]))
        for n, piece in zip(names, flat.split([state[n].numel() for n in names])):
            out[n] = piece.view(state[n].shape)
    return {n: out[n] for n in state}


def snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` (a state dict), detached: one flat buffer per dtype and device, viewed per entry — a
    kernel or two on a GPU instead of one clone per tensor (a ResNet-32 state has ~200)."""
    return _through_flat(state)


Marks = list[tuple[str, torch.Tensor, int, int]]


def _marks(state: dict[str, torch.Tensor]) -> Marks:
    """Each entry of a model's ``state_dict(keep_vars=True)`` (its own tensors, not detached copies) as (name,
    the tensor, its ``_version``, its ``data_ptr``): torch counts each in-place write in ``_version``, and a
    tensor swapped in under a parameter (``.data =``) moves its storage."""
    return [(n, t, t._version, t.data_ptr()) for n, t in state.items()]


def _unchanged(before: Marks | None, now: Marks) -> bool:
    """Whether the model is as it was at ``before``: the same entries, each the same tensor over the same
    storage, not written since."""
    return before is not None and len(before) == len(now) and all(
        a[0] == b[0] and a[1] is b[1] and a[2:] == b[2:] for a, b in zip(before, now))


class _Starts:
    """Each client's start, :func:`snapshot` of the model's state after its set-up — shared with the previous
    client's where the model is :func:`_unchanged` since. A cohort's clients usually start from the same global
    weights (one load, :class:`_ReceivedWeights`), so 20 clients cost one snapshot, not 20; a client whose
    set-up wrote to the model or attached its own modules gets its own."""

    def __init__(self) -> None:
        self.last: tuple[dict[str, torch.Tensor], Marks] | None = None

    def __call__(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict(keep_vars=True)
        marks = _marks(state)
        if self.last is not None and _unchanged(self.last[1], marks):
            return self.last[0]
        start = snapshot(state)
        self.last = (start, marks)
        return start


def per_client_on_host(stacked: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """Client j's state ``{n: stacked[n][j]}`` for each j < ``k``, on the host. From a GPU all clients' states
    come in one copy per dtype (each client's tensors sent one by one were ~200 copies a client, each waiting
    for the device); on the CPU they are the slices themselves."""
    if all(v.device.type == "cpu" for v in stacked.values()):
        return [{n: v[j] for n, v in stacked.items()} for j in range(k)]
    return _per_client_in_one_copy(stacked, k)


def _per_client_in_one_copy(stacked: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """:func:`per_client_on_host` from a device: each dtype's stacked tensors as one (k, Σ numel) copy."""
    rows: dict[str, torch.Tensor] = {}
    for names in _by_dtype(stacked).values():
        flat = torch.cat([stacked[n].reshape(k, -1) for n in names], dim=1).cpu()
        for n, piece in zip(names, flat.split([stacked[n][0].numel() for n in names], dim=1)):
            rows[n] = piece
    return [{n: rows[n][j].view(stacked[n].shape[1:]) for n in stacked} for j in range(k)]


class _ReceivedWeights:
    """The weights of a cohort's messages decoded and on the device once per distinct ArrayRecord: a round's
    messages usually carry the same global weights — in this process the very same bytes objects (a deep copy
    keeps bytes) — so 20 clients cost one decode and one copy to the device, not 20 (each ~200 copies from
    pageable memory, each waiting for the device), and one load into the model where nothing wrote to it
    since (:meth:`load`). A message whose arrays are other bytes is decoded anew."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last: tuple[tuple, tuple, dict[str, torch.Tensor]] | None = None
        self.loaded: tuple[dict[str, torch.Tensor], Marks] | None = None

    def load(self, model: nn.Module, arrays) -> None:
        """Load ``arrays`` into ``model``, unless it still holds exactly them: the same state as the last load,
        and the model :func:`_unchanged` since. A method whose set-up wrote to the model (a plug-in's
        ``prepare``) gets a fresh load."""
        state = self.state(arrays)
        if self.loaded is not None and self.loaded[0] is state and _unchanged(
                self.loaded[1], _marks(model.state_dict(keep_vars=True))):
            return
        load_state(model, state)
        self.loaded = (state, _marks(model.state_dict(keep_vars=True)))

    def state(self, arrays) -> dict[str, torch.Tensor]:
        """``arrays``' state dict on the device (shared: read, do not write)."""
        keys, datas = tuple(arrays.keys()), tuple(a.data for a in arrays.values())
        if self.last is not None and self.last[0] == keys and all(a is b for a, b in zip(self.last[1], datas)):
            return self.last[2]
        state = to_state(arrays)
        if self.device.type != "cpu":
            state = _through_flat(state, lambda flat: host_to_device(flat, self.device))
        self.last = (keys, datas, state)
        return state


# ------------------------------------------------------------------------------------------ a node's cohort

def answer_cohort(cfg: Config, app: ClientApp, device: torch.device, items: list[tuple[Message, Context]],
                  fresh: set[int] | None = None,
                  deliver: Callable[[Message], Message] = lambda msg: msg) -> list[Message]:
    """The replies to ``items`` (messages, each with the ``Context`` of the partition it is for), in order: the
    train messages that fuse (:func:`fuses`) trained together by :func:`fused_train` where there are two or
    more, every other message answered by ``app`` one at a time (:func:`~fedlt.federation.inprocess.call_client_app`).
    Used by :class:`FusedGrid` (every partition in this process) and by a host node
    (:mod:`fedlt.federation.hosts`: its share of the partitions). ``fresh``, where given, receives the ``id()``
    of each fused reply: built from new objects that nothing else holds, the in-process grid keeps it without
    the deep copy it makes of a ClientApp's reply. The fused training only reads a message (its weights and
    config); ``deliver`` gives the message a ClientApp, or the DP clipping of a fused reply (:func:`clipped`),
    receives (the in-process grid's copy, as the wire's)."""
    method_class = CLIENTS.get(cfg.client.name)
    group = [(m, c) for m, c in items if not own_loop(method_class) and fuses(cfg, m, c)]
    replies = fused_replies(cfg, device, method_class, group) if len(group) > 1 else {}
    if fresh is not None:  # the fused replies: built here from new objects, held by nothing else
        fresh.update(id(r) for r in replies.values())
    return [call_client_app(app, deliver(m), c) if m.metadata.message_id not in replies
            else clipped(m, c, replies[m.metadata.message_id], deliver) for m, c in items]


def clipped(msg: Message, context: Context, reply: Message, deliver: Callable[[Message], Message]) -> Message:
    """A fused ``reply`` to ``msg`` as the ClientApp's mod leaves a reply: where ``msg`` carries a DP clipping
    norm (``dp_client_fixed``), its update clipped by :func:`~fedlt.federation.dp.client_clipping_mod` with the
    fused training in place of the ClientApp (the mod sets records aside on the message it is given: a
    delivered one, not the strategy's); else ``reply`` as it is."""
    if KEY_CLIPPING_NORM not in msg.content["config"]:
        return reply
    return client_clipping_mod(deliver(msg), context, lambda _msg, _context: reply)


def fuses(cfg: Config, msg: Message, context: Context) -> bool:
    """Whether ``msg`` can join a fused group: a train message whose client does not draw an injected failure
    this round (the ClientApp raises it)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return False
    config = msg.content["config"]
    pid = int(context.node_config[PARTITION_ID_KEY])
    return not injected_failure(cfg, int(config.get("server-round", 0)), pid)


def fused_replies(cfg: Config, device: torch.device, method_class: type[ClientMethod],
                  items: list[tuple[Message, Context]]) -> dict[str, Message]:
    """Replies (by message id) to the train messages ``items`` from one fused training, or {} (the ClientApp
    answers them) when they do not fuse. Each client gets its own instance of ``method_class``, as the ClientApp
    builds one per message, so that state it keeps on ``self`` (for :meth:`ClientMethod.round_metrics`) is its own."""
    try:
        with _ServerProcessState():
            model = model_for(cfg, experiment_for(cfg)).to(device)
            pids, states, datas, objectives, opts, gens = [], [], [], [], [], []
            methods: list[ClientMethod] = []
            received, start_of = _ReceivedWeights(device), _Starts()
            trainable = None
            for msg, context in items:
                pid = int(context.node_config[PARTITION_ID_KEY])
                config = message_config(msg)
                client = method_class(cfg)  # this client's own instance
                # the previous client's own modules off the model (the last one's stay: the template's)
                (methods[-1] if methods else client).detach_local(model, {})
                if "arrays" in msg.content:
                    received.load(model, msg.content["arrays"])
                data = experiment_for(cfg).client_data(pid, device)  # resident on the device where it fits
                gen = torch_generator(cfg.seed, Stream.CLIENT, int(config.get("server-round", 0)), pid)
                client.prepare(model, data, config, gen, augment_for(cfg, data))  # before the batches' draws
                client.attach_local(model, data, config)
                objectives.append(client.objective(model, data, config))
                now = {n for n, p in model.named_parameters() if p.requires_grad}
                if trainable is not None and now != trainable:
                    raise NotFusable("clients of one round train different parameters")
                trainable = now
                states.append(start_of(model))
                pids.append(pid)
                datas.append(data)
                opts.append(client.optim(config))
                gens.append(gen)
                methods.append(client)
            t = cfg.train
            result = fused_train(model, states, datas, objectives, opts, gens, augment_for(cfg, datas[0]),
                                 epochs=None if t.local_steps else t.local_epochs, steps=t.local_steps)
    except NotFusable as exc:
        say_once(f"note: a fused round's clients train one by one (the ClientApp's loop), as fused training "
                 f"cannot: {exc}")
        return {}
    except Exception as exc:  # the ClientApp, one client at a time, answers (a client's own error included)
        print(f"warning: fused training failed ({type(exc).__name__}: {exc}); the round's clients train one "
              f"by one\n{traceback.format_exc()}", flush=True)
        return {}
    replies = {}
    for j, (msg, _) in enumerate(items):
        if not result.finite[j]:  # diverged: the ClientApp trains it again and replies with its NonFiniteLoss
            continue
        state = dict(result.states[j])
        extra = methods[j].detach_local(model, state)
        fit = FitResult(state=state, extra_arrays=extra,
                        metrics={"train_loss": result.losses[j], "num-examples": len(datas[j]),
                                 "steps": result.steps[j], "train-images": result.images[j],
                                 "fit_seconds": result.seconds / len(items),
                                 **methods[j].round_metrics(objectives[j])})
        replies[msg.metadata.message_id] = _reply(msg, fit, pids[j])
    return replies


# ------------------------------------------------------------------------------------------ the grid

class FusedGrid(InProcessGrid):
    """The in-process Grid whose fusable train messages of one push are trained together (module docstring)."""

    def __init__(self, cfg: Config, num_nodes: int) -> None:
        super().__init__(make_client_app(cfg), num_nodes)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)

    def accept(self, msg: Message) -> Message:
        """The message itself, checked: the fused training only reads it, and one that a ClientApp answers is
        copied then (:meth:`answer`), so the cohort's ~400-array messages are not all copied."""
        return self.check(msg)

    def answer(self, msgs: list[Message]) -> list[Message]:
        items = [(msg, self.contexts[msg.metadata.dst_node_id]) for msg in msgs]
        return answer_cohort(self.cfg, self.client_app, self.device, items, self.fresh, copy.deepcopy)


def run_fused(cfg: Config, run_path: str, verbose: bool = False) -> dict:
    """Run ``cfg`` as :func:`fedlt.federation.inprocess.run_inprocess` does, with the round's clients trained
    fused (:class:`FusedGrid`); return the summary."""
    return run_on_grid(cfg, run_path, FusedGrid(cfg, cfg.partition.num_clients), verbose,
                       "the fused run ended without a result")
