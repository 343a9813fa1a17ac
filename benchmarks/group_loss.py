"""The fused engine's loss: each client's objective on its own slice against the group's losses in one call.

Run by hand (not in CI):

    PYTHONPATH=. python benchmarks/group_loss.py [--device cpu|cuda] [--clients 10,50] [--batch 64] [--steps 3]

For each client method whose objective has a structure (fedlt/objectives.py) — fedavg (cross-entropy), fedprox
(cross-entropy + ½μ‖w − w⁰‖²), fedlc (a ``functools.partial`` with each client's counts), gbme (joint phase,
Σ over 3 experts of a Balanced Softmax with the global prior), local_loss (logit adjustment on each client's
counts), fedloge (three heads on the features, one of them each client's own l_k), fedrod (Balanced Softmax
on the generic head and CE on each client's personal head), ncl (NIL + NBOD over 3 experts), shike (SHIKE's
DKT over the depth-fused experts), tlc (TLC's evidential loss, re-weighted round), area (CE weighted by each
client's AREA class weights, from its feature pass in ``prepare``) — the same cohort is
trained by :func:`fedlt.federation.fused.fused_train` two ways in one run:
``per client``, the objectives wrapped in a plain function (the fused trainer then calls each on its own slice
of the group's forward pass, as it does for an objective without structure), and ``group``, the objectives as
the method builds them (one call for the group: ``cross_entropy_per_client``, or the loss vmapped over the
clients, and the proximal term once per stacked parameter). Both give the same weights (checked here after
one step, and in tests/test_fused.py). On CUDA it also counts the host-device synchronisations of one group
step (``torch.cuda.set_sync_debug_mode``) and says where they are: the common step should have none.

Printed per method and cohort size: the number of ATen operator calls of one step that are not views (forward,
loss, backward and SGD; counted with a ``TorchDispatchMode`` as the difference between 2 steps and 1, so the
one-off stacking is not in it) — on a GPU each is a kernel launch, so this is what the group loss saves there
whatever the card — and milliseconds per step (median of ``--repeats`` runs of ``--steps`` steps after a warm-up,
stacking included), with the ratios per client / group. ResNet-32 (resnet32_experts for gbme), CIFAR-sized
shards of 250 random images per client, batch ``--batch``, crop and flip.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from group_batch import timed  # noqa: E402  (this folder: the same median-of-repeats timing)

from fedlt.config import load_config  # noqa: E402
from fedlt.federation.fused import fused_train  # noqa: E402
from fedlt.models import build_model  # noqa: E402
from fedlt.registry import CLIENTS  # noqa: E402
from fedlt.streams import Stream, torch_generator  # noqa: E402
from fedlt.train import Augment, TensorData  # noqa: E402

METHODS = {  # name -> (client method, model, extra config keys, the server's config for the round)
    "fedavg": ("fedavg", "resnet32", [], {}),
    "fedprox": ("fedprox", "resnet32", [], {"proximal-mu": 0.01}),
    "fedlc": ("fedlc", "resnet32", [], {"fedlc-tau": 1.0}),
    "gbme_joint": ("gbme", "resnet32_experts", ["strategy.name=gbme"], {"expert": -1}),
    "local_loss_la": ("local_loss", "resnet32", ["client.loss=la"], {}),
    "fedloge": ("fedloge", "resnet32", ["strategy.name=fedloge", "client.sse_steps=100"], {}),
    "fedrod": ("fedrod", "resnet32", ["strategy.name=fedrod"], {}),
    "ncl": ("ncl", "resnet32_experts", [], {}),
    "shike": ("shike", "resnet32_shike", [], {}),
    "tlc": ("tlc", "resnet32_experts", ["federation.rounds=2", "client.drw_fraction=0.5"], {"server-round": 2}),
    "area": ("area", "resnet32", [], {"server-round": 1}),
}


class OpCount(TorchDispatchMode):
    """Counts ATen operator calls that are not views (forward and backward) while active: on a GPU each is a
    kernel launch (a view launches none), bar the few on CPU tensors (the clients' random draws)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += not func.is_view
        return func(*args, **(kwargs or {}))


def shards(k: int, device: torch.device, n: int = 250) -> list[TensorData]:
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([0.49, 0.48, 0.45], device=device), torch.tensor([0.25, 0.24, 0.26], device=device)
    return [TensorData(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device),
                       (torch.randint(0, 10, (n,), generator=g) ** 2 // 10).to(device), mean, std, 10)
            for _ in range(k)]  # labels skewed toward class 0, some classes absent: counts differ per client


def cohort(key: str, k: int, batch: int, device: torch.device):
    """(model, states, datas, structured objectives, optimizer configs, augmentation) of ``k`` clients."""
    name, model_name, extra, server = METHODS[key]
    cfg = load_config(None, [f"client.name={name}", f"model.name={model_name}", f"train.batch_size={batch}",
                             *extra])
    method = CLIENTS.get(name)(cfg)
    torch.manual_seed(0)
    model = type(method).adapt_model(build_model(model_name, 10, 3), cfg, 10).to(device)
    datas = shards(k, device)
    config = {"lr": 0.05, **server, "log-prior": [-2.3] * 10}
    state = {n: v.detach().clone() for n, v in model.state_dict().items()}
    augment = Augment(4, True, datas[0].mean, datas[0].std)
    states, objectives = [], []
    for j, d in enumerate(datas):  # as fused_replies: each client prepared, its own modules attached (l_k)
        method.detach_local(model, {})
        model.load_state_dict(state)
        method.prepare(model, d, config, torch_generator(0, Stream.CLIENT, 1, j), augment)
        method.attach_local(model, d, {**config, "partition-id": j})
        states.append({n: v.detach().clone() for n, v in model.state_dict().items()})
        objectives.append(method.objective(model, d, config))
    opts = [method.optim(config) for _ in datas]
    return model, states, datas, objectives, opts, augment


def run(setup, objectives, steps: int):
    model, states, datas, _, opts, augment = setup
    model.load_state_dict(states[0])
    gens = [torch_generator(0, Stream.CLIENT, 1, j) for j in range(len(datas))]
    return fused_train(model, states, datas, objectives, opts, gens, augment, epochs=None, steps=steps)


def ops_per_step(setup, objectives) -> int:
    counts = []
    for steps in (1, 2):
        with OpCount() as c:
            run(setup, objectives, steps)
        counts.append(c.calls)
    return counts[1] - counts[0]


def syncs_per_step(setup, objectives) -> tuple[int, list[str]]:
    """On CUDA: the host-device synchronisations of one fused step (each one a warning under
    ``torch.cuda.set_sync_debug_mode``; a sync stops the host from queuing the next step while the device runs
    this one), the difference between a 2-step and a 1-step run, and the five commonest places (file:line)."""
    counts = []
    for steps in (1, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(setup, objectives, steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                              if "synchroniz" in str(w.message)))
    diff = counts[1] - counts[0]
    return sum(diff.values()), [f"{where} x{n}" for where, n in diff.most_common(5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", default="10,50", help="comma-separated cohort sizes")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-time", action="store_true", help="count operator calls only")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device {device}, batch {args.batch}, {args.steps} steps, torch threads {torch.get_num_threads()}")
    for key in args.methods.split(","):
        if key not in METHODS:
            raise SystemExit(f"unknown method {key!r}: one of {', '.join(METHODS)}")
        for k in (int(c) for c in args.clients.split(",")):
            setup = cohort(key, k, args.batch, device)
            group = setup[3]
            one_by_one = [lambda m, x, y, o=o: o(m, x, y) for o in group]  # no structure: one call per client
            a, b = run(setup, one_by_one, 1), run(setup, group, 1)
            for sa, sb in zip(a.states, b.states):
                if not all(torch.allclose(sa[n].float(), sb[n].float(), rtol=1e-4, atol=1e-5) for n in sa):
                    raise SystemExit(f"{key}, {k} clients: the group loss trained other weights than per client")
            ops_one, ops_grp = ops_per_step(setup, one_by_one), ops_per_step(setup, group)
            line = (f"{key:13s} {k:3d} clients: ops/step per client {ops_one:6d}, group {ops_grp:6d} "
                    f"({ops_one / ops_grp:4.2f}x)")
            if device.type == "cuda":
                try:
                    n, where = syncs_per_step(setup, group)
                    line += f"; syncs/step {n}" + (f" ({', '.join(where)})" if where else "")
                except Exception as exc:  # noqa: BLE001 -- a diagnostic: the other numbers still count
                    line += f"; syncs not counted ({type(exc).__name__}: {exc})"
            if not args.no_time:
                one = timed(lambda: run(setup, one_by_one, args.steps), sync, args.repeats) / args.steps
                grp = timed(lambda: run(setup, group, args.steps), sync, args.repeats) / args.steps
                line += f"; ms/step per client {1e3 * one:8.1f}, group {1e3 * grp:8.1f} ({one / grp:4.2f}x)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
