"""Personalised ("local") evaluation: each client's personalised model on a test set with its own class mix.

FedROD, FedBABU, FedETF and FedLoGe report, beside the global model's accuracy on the balanced test set, a
*local* accuracy: client k's personalised model on a local test set drawn from the balanced test set in
proportion to k's training counts. The local test set follows FedLoGe's ``util/dataset.py``
(``get_imbalanced_dataset``, ZackZikaiXiao/FedLoGe): with n_{k,c} the training samples of class c on client
k, N the training set's size and M the test set's,

    t_{k,c} = ⌊ n_{k,c} · M / N ⌋      test samples of class c for client k,

drawn without replacement from the test samples of class c (each client draws on its own, so two clients'
sets may overlap; FedLoGe's too). FedLoGe draws from numpy's global state and fails where t_{k,c} exceeds the
class's test samples (a client holding most of a head class); fedlt draws client k's set from the seeded
stream ``(seed, Stream.LOCAL_TEST, k)`` and caps t_{k,c} at the class's test samples. The counts and the
indices are recorded in ``partition.json``.

The server asks every client with the query ``local-eval`` (:func:`local_eval`) at the final evaluation
(``eval.local=final``) or at every evaluation (``eval.local=every``): the client builds its personalised model
with :meth:`fedlt.client_method.ClientMethod.personalise` from the received global model and its training
data, and answers its correct predictions and test samples per class. :func:`local_metrics` turns them into
summary.json's ``local_accuracy`` (the mean of the clients' accuracies, FedLoGe's ``acc_list`` mean),
``local_accuracy_weighted`` (every local test sample counted once: Σ correct / Σ samples) and
``local_many`` / ``local_medium`` / ``local_few`` (per client, the accuracy on its local test samples of the
classes of that group of the global training counts, :func:`fedlt.metrics.class_groups`; mean over the
clients that hold a sample of the group).

Persistent per-client state (FedROD's personal head): a strategy keeps it on the server, in its
``state_dict`` (so it is checkpointed and resumed), and sends client k its own part in k's messages through
:meth:`fedlt.federation.strategy.FedLTStrategy.client_records`; the client returns the updated part in its
reply's extra records (:attr:`fedlt.client_method.FitResult.extra_arrays`). The ``local-eval`` message
carries it too, so ``personalise`` reads it from ``config``'s records exactly as ``fit`` does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedlt.client_method import ClientMethod, FitResult
from fedlt.config import Config
from fedlt.experiment import experiment_for
from fedlt.federation.queries import QUERIES
from fedlt.metrics import GROUPS, class_groups
from fedlt.registry import CLIENTS
from fedlt.streams import Stream, seeded_rng
from fedlt.train import Augment, TensorData, predict_logits

LOCAL_EVAL = "local-eval"


def local_test_counts(client_counts: np.ndarray, test_class_counts: np.ndarray) -> np.ndarray:
    """t_{k,c} = min(⌊n_{k,c}·M/N⌋, m_c): client × class counts of the local test sets, from the client ×
    class training counts n (N = Σ n) and the test set's class counts m (M = Σ m)."""
    n = np.asarray(client_counts, dtype=np.int64)
    m = np.asarray(test_class_counts, dtype=np.int64)
    t = (n * int(m.sum())) // max(int(n.sum()), 1)  # integer floor: no float rounding at exact multiples
    return np.minimum(t, m[None, :])


def draw_local_tests(test_labels: np.ndarray, counts: np.ndarray, seed: int) -> list[np.ndarray]:
    """Client k's local test set: ``counts[k, c]`` indices of test class c drawn without replacement from the
    stream ``(seed, Stream.LOCAL_TEST, k)``, classes in order; sorted."""
    labels = np.asarray(test_labels)
    pools = [np.flatnonzero(labels == c) for c in range(counts.shape[1])]
    out = []
    for k in range(counts.shape[0]):
        rng = seeded_rng(seed, Stream.LOCAL_TEST, k)
        picks = [rng.choice(pools[c], size=int(counts[k, c]), replace=False) for c in range(counts.shape[1])]
        out.append(np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.zeros(0, np.int64))
    return out


def local_tests(cfg: Config) -> tuple[np.ndarray, list[np.ndarray]]:
    """(client × class counts, per-client test indices) of the local test sets of ``cfg``'s experiment."""
    exp = experiment_for(cfg)
    counts = local_test_counts(exp.partition_counts(), exp.test.class_counts)
    return counts, draw_local_tests(exp.test.labels, counts, cfg.seed)


@QUERIES.register(LOCAL_EVAL)
def local_eval(cfg: Config, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
               augment: Augment) -> FitResult:
    """The client's personalised model (:meth:`ClientMethod.personalise` of its method) on its local test set:
    per-class correct predictions and samples (``local-correct``, ``local-total``)."""
    pid = int(config["partition-id"])
    method: ClientMethod = CLIENTS.get(cfg.client.name)(cfg)
    personal = method.personalise(model, data, config)
    _, indices = local_tests(cfg)
    test = experiment_for(cfg).tensor_data("test", indices[pid], device=data.images.device)
    labels = test.labels.cpu().numpy()
    pred = predict_logits(personal, test, cfg.eval.batch_size).argmax(1).numpy()
    c = data.num_classes
    total = np.bincount(labels, minlength=c)
    correct = np.bincount(labels[pred == labels], minlength=c)
    return FitResult(state={}, metrics={"local-correct": correct.tolist(), "local-total": total.tolist(),
                                        "num-examples": int(total.sum())})


def local_metrics(correct: np.ndarray, total: np.ndarray, train_counts: np.ndarray) -> dict:
    """summary.json's local metrics from client × class correct predictions and local test samples (clients
    without a local test sample are left out): ``local_accuracy`` = mean_k acc_k, ``local_accuracy_weighted``
    = Σ correct / Σ total, ``local_many|medium|few`` = mean over clients holding a sample of the group of the
    client's accuracy on those samples, ``local_clients`` = clients counted, ``local_per_client`` = acc_k."""
    correct, total = np.asarray(correct, np.int64), np.asarray(total, np.int64)
    held = total.sum(1) > 0
    acc = correct[held].sum(1) / total[held].sum(1)
    out = {"local_accuracy": float(acc.mean()) if len(acc) else None,
           "local_accuracy_weighted": float(correct.sum() / total.sum()) if total.sum() else None,
           "local_clients": int(held.sum()),
           "local_per_client": [float(a) if h else None for a, h in
                                zip(correct.sum(1) / np.maximum(total.sum(1), 1), held)]}
    groups, _ = class_groups(train_counts)
    for g, name in enumerate(GROUPS):
        tg, cg = total[:, groups == g].sum(1), correct[:, groups == g].sum(1)
        out[f"local_{name}"] = float(np.mean(cg[tg > 0] / tg[tg > 0])) if (tg > 0).any() else None
    return out
