"""FedLoGe at two optimizers: per local step, the three CEs (SSE-C on the backbone, g_aux and l_k on detached
features) and the mean feature norm, on client 0 of the default Fashion-MNIST-LT partition (small_cnn,
batch 64, 60 steps). Shows why FedLoGe's heads diverge at the federated table's lr 0.05 / momentum 0.9 and
not at FedLoGe's own lr 0.03 / momentum 0.5 (docs/results.md, "FedETF, FedLoGe"). Run by hand:
    PYTHONPATH=$PWD python benchmarks/fedloge_feature_growth.py
"""

import torch
import torch.nn.functional as F

from fedlt.config import load_config
from fedlt.experiment import experiment_for, model_for

torch.set_num_threads(1)
for lr, momentum, wd in ((0.05, 0.9, 5e-4), (0.03, 0.5, 0.0)):
    cfg = load_config(None, ["strategy.name=fedloge", "mode=federated", "partition.balance=true"])
    exp = experiment_for(cfg)
    model = model_for(cfg, exp)
    data = exp.client_data(0, torch.device("cpu"))
    head = model.classifier
    head.local = torch.nn.Linear(model.feature_dim, exp.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    g = torch.Generator().manual_seed(0)
    print(f"lr {lr} momentum {momentum} wd {wd}: step, CE(SSE-C), CE(g_aux), CE(l_k), mean |h|")
    for step in range(60):
        idx = torch.randint(len(data), (64,), generator=g)
        x = (data.images[idx].float() / 255 - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
        y = data.labels[idx]
        h = model.features(x)
        losses = [F.cross_entropy(head(h), y), F.cross_entropy(head.aux(h.detach()), y),
                  F.cross_entropy(head.local(h.detach()), y)]
        opt.zero_grad()
        sum(losses).backward()
        opt.step()
        if step % 10 == 0:
            print(step, *(f"{v.item():.3f}" for v in losses), f"{h.norm(dim=1).mean().item():.2f}")
