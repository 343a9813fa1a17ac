"""TLC (Li et al., CVPR 2022) against a transcription of lblaoke/TLC's arithmetic, and its uncertainty metrics.

The ``official_*`` functions transcribe (do not import or copy) ``model/ResnetCifar.py`` ``ResNet_s.forward``
(after the experts' logits), ``model/loss.py`` ``TLCLoss`` and the first release's ``model/metric.py``
(``AUC``: scikit-learn's ``roc_auc_score``, written here as its pairwise definition; ``ece_score``).
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_official_centralized import FixedExperts

import fedlt.centralized as C
import fedlt.centralized.run as R
from fedlt.centralized.tlc import TLC
from fedlt.config import load_config
from fedlt.evaluation import metrics_row, progress_line
from fedlt.losses import engaged, tlc_combine
from fedlt.metrics import rank_auc, uncertainty_metrics
from fedlt.models.experts import resnet32_experts
from fedlt.registry import CENTRALIZED
from fedlt.rundir import RunDir
from fedlt.sweep import expand
from fedlt.train import TensorData

sys.path.insert(0, str(Path(__file__).parent))
from test_centralized_methods import tiny_cfg, tiny_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_LT_100 = np.array([int(5000 * 0.01 ** (c / 9)) for c in range(10)])
UNCERTAINTY_KEYS = ("uncertainty_mean", "uncertainty_correct", "uncertainty_wrong", "failure_auc", "uncertainty_ece",
                    "experts_engaged")


def method(counts, *overrides: str) -> TLC:
    cfg = load_config(None, ["mode=centralized", "centralized.method=tlc", *overrides])
    return CENTRALIZED.get("tlc")(cfg, np.asarray(counts))




def official_forward(outs: list[torch.Tensor], num_classes: int, eta: float = 0.2):
    """ResNet_s.forward after ``xi = xi*30``: the evidential update of w and the dynamic reweighting."""
    b0 = None
    w = [torch.ones(len(outs[0]), dtype=torch.bool)]
    for xi in outs:
        alpha = torch.exp(xi) + 1
        S = alpha.sum(dim=1, keepdim=True)
        b = (alpha - 1) / S
        u = num_classes / S.squeeze(-1)
        if b0 is None:
            Cc = 0
        else:
            bb = b0.view(-1, b0.shape[1], 1) @ b.view(-1, 1, b.shape[1])
            Cc = bb.sum(dim=[1, 2]) - bb.diagonal(dim1=1, dim2=2).sum(dim=1)
        b0 = b
        w.append(w[-1] * u / (1 - Cc))
    exp_w = [torch.exp(wi / eta) for wi in w]
    exp_w = [wi / wi.sum() for wi in exp_w]
    exp_w = [wi.unsqueeze(-1) for wi in exp_w]
    return sum(outs[i] * exp_w[i] for i in range(len(outs))), w


def official_tlc_loss(x, y, epoch, logits, w, cls_num_list, max_m=0.5, reweight_epoch=160, reweight_factor=0.05,
                      annealing=500, tau=0.54):
    """TLCLoss.__init__, _hook_before_epoch(epoch) and forward (the diversity weights on the CPU, not cuda:0;
    lgamma of the class count as a float tensor; the class statistics in the dtype of the logits)."""
    dtype = logits[0].dtype
    m_list = 1.0 / np.sqrt(np.sqrt(cls_num_list))
    m_list = torch.tensor(m_list * (max_m / np.max(m_list)), dtype=dtype)
    effective_num = 1.0 - np.power(0.9999, cls_num_list)
    per_cls_weights = (1.0 - 0.9999) / np.array(effective_num)
    per_cls_weights = per_cls_weights / np.sum(per_cls_weights) * len(cls_num_list)
    enabled = torch.tensor(per_cls_weights, dtype=dtype)
    p = np.array(cls_num_list) / np.sum(cls_num_list)
    div_w = len(p) * p * reweight_factor + 1 - reweight_factor
    enabled_diversity = torch.tensor(div_w / np.max(div_w), dtype=dtype)
    T = (reweight_epoch + annealing) / reweight_factor
    base, diversity_w = (enabled, enabled_diversity) if epoch > reweight_epoch else (None, None)

    def final_output(xx, yy):
        index = torch.zeros_like(xx, dtype=torch.bool)
        index.scatter_(1, yy.view(-1, 1), 1)
        batch_m = torch.matmul(m_list[None, :], index.to(dtype).transpose(0, 1)).view((-1, 1))
        return torch.exp(torch.where(index, xx - 30 * batch_m, xx))

    loss = 0
    for i in range(len(logits)):
        alpha = final_output(logits[i], y)
        S = alpha.sum(dim=1, keepdim=True)
        l = F.nll_loss(torch.log(alpha) - torch.log(S), y, weight=base, reduction="none")  # noqa: E741
        yi = F.one_hot(y, num_classes=alpha.shape[1])
        alpha_tilde = yi + (1 - yi) * (alpha + 1)
        S_tilde = alpha_tilde.sum(dim=1, keepdim=True)
        kl = torch.lgamma(S_tilde) - torch.lgamma(torch.tensor(float(alpha_tilde.shape[1]), dtype=dtype)) \
            - torch.lgamma(alpha_tilde).sum(dim=1, keepdim=True) \
            + ((alpha_tilde - 1) * (torch.digamma(alpha_tilde) - torch.digamma(S_tilde))).sum(dim=1, keepdim=True)
        l += epoch / T * kl.squeeze(-1)  # noqa: E741
        if diversity_w is not None:
            temperature, t_mean = diversity_w.view((1, -1)), diversity_w.mean().item()
        else:
            temperature, t_mean = 1, 1
        output_dist = F.log_softmax(logits[i] / temperature, dim=1)
        with torch.no_grad():
            mean_output_dist = F.softmax(x / temperature, dim=1)
        l -= 0.01 * t_mean * t_mean * F.kl_div(output_dist, mean_output_dist, reduction="none").sum(dim=1)  # noqa: E741
        ww = w[i] / w[i].max()
        ww = torch.where(ww > tau, True, False)
        l = (ww * l).sum() / ww.sum()  # noqa: E741
        loss += l.mean()
    return loss


def official_ece_score(y_true, y_pred, bins=10):
    ece = 0.0
    for i in range(bins):
        c_start, c_end = i / bins, (i + 1) / bins
        mask = (c_start <= y_pred) & (y_pred < c_end)
        ni = mask.count_nonzero().item()
        if ni == 0:
            continue
        acc, conf = y_true[mask].sum() / ni, y_pred[mask].mean()
        ece += ni * (acc - conf).abs()
    return ece.item() / len(y_pred)


def cosine_logits(seed: int, m: int = 3, b: int = 24, c: int = 10) -> torch.Tensor:
    """Logits of cosine heads ×30, spread so that the samples' uncertainties differ by orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return 30 * torch.tanh(torch.randn(m, b, c, generator=g) * 0.6)


# ------------------------------------------------------------------------------------------ combination


def test_two_expert_combination_by_hand():
    # C = 2. Expert 0: evidence (2, 1), α = (3, 2), S = 5, b = (0.4, 0.2), u = 0.4.
    # Expert 1: evidence (1, 3), S = 6, b = (1/6, 1/2), u = 1/3. Conflict κ = 0.4·0.5 + 0.2·(1/6) = 7/30.
    # Dempster-Shafer: u = u0·u1/(1 − κ) = (2/15)/(23/30) = 4/23.
    z = torch.log(torch.tensor([[[2.0, 1.0]], [[1.0, 3.0]]]))
    output, w = tlc_combine(z, eta=0.2)
    assert w[:, 0].tolist() == pytest.approx([1.0, 0.4, 4 / 23], rel=1e-6)
    # one sample: softmax over the batch is 1 for every expert, so the output is z_0 + z_1
    assert output[0].tolist() == pytest.approx((z[0, 0] + z[1, 0]).tolist(), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_combination_equals_the_official_forward(seed):
    z = cosine_logits(seed)
    output, w = tlc_combine(z, eta=0.2)
    ref_out, ref_w = official_forward(list(z.double()), 10)  # float64: the official 1 − κ cancels in float32
    assert torch.allclose(output.double(), ref_out, rtol=1e-5, atol=1e-7)
    assert torch.allclose(w.double(), torch.stack([wi.double() for wi in ref_w]), rtol=1e-4, atol=0)
    assert float(official_forward(list(z), 10)[1][-1].min()) < 0 or not torch.isfinite(official_forward(list(z), 10)[0]).all()
    assert float(w[1:].max()) > 100 * float(w[-1].min())  # uncertainties that differ: the reweighting matters


def test_combination_of_two_sure_experts_that_disagree():
    z = torch.tensor([[[30.0, -30.0], [1.0, 0.0]], [[-30.0, 30.0], [0.0, 1.0]]])
    _, w = tlc_combine(z)
    _, ref32 = official_forward(list(z), 2)
    _, ref64 = official_forward(list(z.double()), 2)
    assert not torch.isfinite(ref32[-1][0])  # float32: 1 − κ rounds to 0
    assert torch.allclose(w[-1].double(), ref64[-1], rtol=1e-5) and float(w[-1, 0]) > 0


def test_engagement_rule_by_hand():
    w = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.2, 1.0], [0.06, 0.01, 0.1], [0.0, 0.0, 0.0]])
    # w_i/max_batch(w_i) > 0.54: expert 0 always; expert 1 (0.5, 0.2, 1); expert 2 (0.6, 0.1, 1)
    assert engaged(w, 0.54).tolist() == [[True, True, True], [False, False, True], [True, False, True]]


# ------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("epoch", [1, 100, 161, 200])
def test_objective_equals_the_official_loss(epoch):
    counts = CIFAR10_LT_100
    z = cosine_logits(epoch, b=32)
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(epoch))
    m = method(counts, "centralized.epochs=200", "model.name=resnet32")
    assert m.reweight_epoch() == 160 and m.kl_period == pytest.approx(13200.0)
    ours = m.objective(epoch - 1)(FixedExperts(z), torch.zeros(32, 3, 4, 4), y)  # fedlt's epochs count from 0
    x, w = official_forward(list(z.double()), 10)  # float64: the official 1 − κ cancels in float32
    official = official_tlc_loss(x, y, epoch, list(z.double()), w, counts.tolist())
    assert ours.item() == pytest.approx(official.item(), rel=1e-5)
    mask = engaged(tlc_combine(z)[1])
    assert not mask[1:].all() and mask[0].all()  # some samples are left out of the later experts' losses


def test_diversity_and_kl_terms_move_the_loss():
    counts, z = CIFAR10_LT_100, cosine_logits(5, b=16)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(5))
    run = lambda *o: method(counts, "centralized.epochs=200", *o).objective(170)(FixedExperts(z), None, y).item()  # noqa: E731
    base = run()
    assert run("centralized.diversity=0") != pytest.approx(base, rel=1e-6)
    assert run("centralized.annealing=1e9") != pytest.approx(base, rel=1e-6)


# ------------------------------------------------------------------------------------ model and recipe


def test_official_resnet32_experts_have_their_own_layer1():
    model = resnet32_experts(10, num_experts=3, widths=(16, 32, 64), shared_layer1=False)
    assert len(model.stem) == 3  # conv1, bn1, relu only
    n_shared = sum(p.numel() for p in resnet32_experts(10, widths=(16, 32, 64)).parameters())
    assert sum(p.numel() for p in model.parameters()) > n_shared
    assert model.expert_logits(torch.zeros(2, 3, 32, 32)).shape == (3, 2, 10)
    m = method(CIFAR10_LT_100, "model.name=resnet32")
    exp = tiny_experiment()
    built = m.build_model(exp)
    assert len(built.stem) == 3 and built.num_experts == 3 and built.feature_dim == 64


def test_cifar_config_is_the_official_recipe():
    combos = expand(ROOT / "configs/centralized/cifar_lt_tlc.yaml")
    c100 = expand(ROOT / "configs/centralized/cifar100_lt_tlc.yaml")
    assert len(combos) == len(c100) == 3
    # lblaoke/TLC configs/cifar10_lt.json "weight_decay": 2e-4, configs/cifar100_lt.json 5e-4 (the only difference)
    assert {(c.data.name, c.centralized.weight_decay) for c, _ in combos + c100} == {("cifar10", 2e-4),
                                                                                   ("cifar100", 5e-4)}
    assert {unnamed_without_wd(c) for c, _ in combos} == {unnamed_without_wd(c) for c, _ in c100}
    cfg = combos[0][0]
    c = cfg.centralized
    assert (c.method, c.epochs, c.batch_size, c.weight_decay, c.nesterov, c.lr) == ("tlc", 200, 128, 2e-4, True, 0.1)
    opt = R.centralized_optim(cfg)

    def official_lr(epoch):  # main.py lr_lambda (CustomLR, step1 160, step2 180, γ 0.01, warm-up 5), epoch from 0
        lr = 0.01 * 0.01 if epoch >= 180 else 0.01 if epoch >= 160 else 1
        return 0.1 * (lr * float(1 + epoch) / 5 if epoch < 5 else lr)

    assert [opt.lr_at(e, 200) for e in range(200)] == pytest.approx([official_lr(e) for e in range(200)])
    m = CENTRALIZED.get("tlc")(cfg, CIFAR10_LT_100)
    assert m.reweight_epoch() == 160 and m.opts.rotation == 15 and m.opts.test_batch == 4096


def unnamed_without_wd(cfg):
    """``cfg`` as text without its name, data set and weight decay (the keys the two CIFAR configs may differ in)."""
    from fedlt.config import dump_config

    return dump_config(cfg.replace(name="run", data=cfg.data.model_copy(update={"name": "cifar10"}),
                                   centralized=cfg.centralized.model_copy(update={"weight_decay": 0.0})))


# ------------------------------------------------------------------------------------ uncertainty metrics


def test_uncertainty_metrics_by_hand():
    u = np.array([0.1, 0.2, 0.4, 0.8])
    correct = np.array([True, True, False, True])
    out = uncertainty_metrics(u, correct)
    # c = 1 − u/0.8 = (0.875, 0.75, 0.5, 0): correct c > wrong c in 2 of 3 pairs
    assert out["failure_auc"] == pytest.approx(2 / 3)
    # bins [0.8, 0.9), [0.7, 0.8), [0.5, 0.6), [0, 0.1): |1 − .875| + |1 − .75| + |0 − .5| + |1 − 0| over 4
    assert out["uncertainty_ece"] == pytest.approx(1.875 / 4)
    assert (out["uncertainty_mean"], out["uncertainty_correct"], out["uncertainty_wrong"]) == pytest.approx(
        (0.375, 1.1 / 3, 0.4))
    assert uncertainty_metrics(u, np.ones(4, bool))["failure_auc"] is None


def test_uncertainty_metrics_equal_the_official_on_random_input():
    g = np.random.default_rng(0)
    u = np.round(g.random(200), 2)  # ties
    correct = g.random(200) < 1 - u  # lower uncertainty, more often right
    out = uncertainty_metrics(u, correct)
    c = 1 - u / u.max()
    pos, neg = c[correct], c[~correct]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert out["failure_auc"] == pytest.approx(pairwise) and out["failure_auc"] > 0.6
    assert out["uncertainty_ece"] == pytest.approx(official_ece_score(torch.tensor(correct).float(), torch.tensor(c)))
    assert rank_auc(np.array([1.0, 2.0, 3.0]), np.array([False, True, True])) == 1.0


def test_evaluate_gives_the_official_prediction_and_uncertainty():
    z = cosine_logits(3, b=20)
    labels = torch.randint(0, 10, (20,), generator=torch.Generator().manual_seed(3))
    test = TensorData(torch.zeros(20, 1, 2, 2, dtype=torch.uint8), labels, torch.tensor([0.5]), torch.tensor([0.25]), 10)
    m = method(np.arange(10) + 5, "model.name=small_cnn")
    out = m.evaluate(FixedExperts(z), test, np.arange(10) + 5, 1024, False)
    ref_out, ref_w = official_forward(list(z.double()), 10)
    correct = (ref_out.argmax(1) == labels).numpy()
    assert out["accuracy"] == pytest.approx(correct.mean())
    expected = uncertainty_metrics(ref_w[-1].numpy(), correct)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-5), key
    assert out["experts_engaged"] == pytest.approx(float(engaged(tlc_combine(z)[1]).sum(0).float().mean()))
    assert 1 <= out["experts_engaged"] < 3
    row = metrics_row(out)
    assert all(k in row for k in UNCERTAINTY_KEYS)
    line = progress_line("[x] epoch 1/1", out, 1.0)
    assert f"auc={out['failure_auc'] * 100:.1f}" in line and f"experts={out['experts_engaged']:.2f}" in line
    assert "auc=" not in progress_line("[x] epoch 1/1", {k: out[k] for k in out if k not in UNCERTAINTY_KEYS}, 1.0)


def test_a_tlc_run_writes_its_uncertainty_metrics(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg("tlc")
    summary = C.run_centralized(cfg, RunDir(tmp_path))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in UNCERTAINTY_KEYS:
        assert on_disk[key] == summary[key] == rows[-1][key], key
        assert all(key in r for r in rows), key
    assert math.isfinite(summary["accuracy"]) and 1 <= summary["experts_engaged"] <= 3
    last = [line for line in capsys.readouterr().out.splitlines() if "epoch 1/1" in line][-1]
    assert f"auc={summary['failure_auc'] * 100:.1f}" in last and f"experts={summary['experts_engaged']:.2f}" in last
    # the numbers are those of the final model: rebuild it from the checkpoint and evaluate again
    exp = tiny_experiment()
    m = CENTRALIZED.get("tlc")(cfg, exp.train_counts)
    model = m.build_model(exp)
    model.load_state_dict(RunDir(tmp_path).load_checkpoint()["state"]["model"])
    again = m.evaluate(model, exp.tensor_data("test"), exp.train_counts, 1024, False)
    for key in UNCERTAINTY_KEYS:
        assert again[key] == pytest.approx(summary[key], rel=1e-5, abs=1e-12), key
