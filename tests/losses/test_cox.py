"""Cox partial likelihood: hand-computed ties, oracle fits against scikit-survival, and risk sets gathered across
two CPU ranks (gloo)."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv
from trainers import free_port

from neurojepa_pl.losses.cox import cox_ph_loss, gather_survival_batch


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def test_breslow_with_ties_matches_hand_computation():
    h = _t([0.5, -0.2, 1.0, 0.3])
    time = _t([2.0, 2.0, 3.0, 1.0])
    event = _t([1, 1, 0, 1])
    # Events: sample 3 at t=1 (risk set all 4), samples 0 and 1 at t=2 (both see {0, 1, 2}).
    lse_all = math.log(sum(math.exp(v) for v in (0.5, -0.2, 1.0, 0.3)))
    lse_t2 = math.log(sum(math.exp(v) for v in (0.5, -0.2, 1.0)))
    expected = -((0.3 - lse_all) + (0.5 - lse_t2) + (-0.2 - lse_t2)) / 3
    assert float(cox_ph_loss(h, time, event)) == pytest.approx(expected, rel=1e-12)
    # The order of the samples must not matter (the reference's argsort-order tie handling does depend on it).
    perm = torch.tensor([2, 1, 3, 0])
    assert float(cox_ph_loss(h[perm], time[perm], event[perm])) == pytest.approx(expected, rel=1e-12)


def test_efron_with_ties_matches_hand_computation():
    h = _t([0.5, -0.2, 1.0, 0.3])
    time = _t([2.0, 2.0, 3.0, 1.0])
    event = _t([1, 1, 0, 1])
    e = [math.exp(v) for v in (0.5, -0.2, 1.0, 0.3)]
    s_r2 = e[0] + e[1] + e[2]
    s_d2 = e[0] + e[1]
    ll = (0.3 - math.log(sum(e))) + (0.5 - 0.2) - math.log(s_r2) - math.log(s_r2 - 0.5 * s_d2)
    assert float(cox_ph_loss(h, time, event, ties="efron")) == pytest.approx(-ll / 3, rel=1e-12)


def test_no_events_gives_connected_zero_and_l2_penalty():
    h = _t([0.5, -1.0, 2.0]).requires_grad_()
    loss = cox_ph_loss(h, _t([1.0, 2.0, 3.0]), _t([0, 0, 0]))
    assert loss.item() == 0.0
    loss.backward()
    assert h.grad is not None and float(h.grad.abs().sum()) == 0.0
    penalised = cox_ph_loss(h, _t([1.0, 2.0, 3.0]), _t([0, 0, 0]), l2=0.1)
    assert penalised.item() == pytest.approx(0.1 * (0.25 + 1.0 + 4.0) / 3)


def test_rejects_bad_shapes_and_ties():
    with pytest.raises(ValueError, match=r"Squeeze"):
        cox_ph_loss(torch.zeros(4, 1), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="ties"):
        cox_ph_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4), ties="exact")


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_linear_cox_fit_matches_scikit_survival(ties):
    # Minimising our loss over a linear model must give sksurv's maximum partial likelihood estimate.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    time = rng.integers(1, 8, size=60).astype(float)  # many tied times
    event = rng.random(60) < 0.7
    oracle = CoxPHSurvivalAnalysis(alpha=0, ties=ties).fit(x, Surv.from_arrays(event, time)).coef_
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    xt, tt, et = torch.tensor(x), torch.tensor(time), torch.tensor(event)
    opt = torch.optim.LBFGS(
        [w], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = cox_ph_loss(xt @ w, tt, et, ties=ties)
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(w.detach().numpy(), oracle, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ distributed risk sets
def _rank_worker(rank, world, port, h_all, time_all, event_all, splits, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start, stop = splits[rank], splits[rank + 1]
        h = h_all[start:stop].clone().requires_grad_()
        gathered = gather_survival_batch(h, time_all[start:stop], event_all[start:stop])
        loss = cox_ph_loss(*gathered)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": h.grad, "time": gathered[1]}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_risk_sets_across_two_ranks_equal_single_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 11
    h = torch.randn(n, dtype=torch.float64, generator=g)
    time = torch.randint(1, 6, (n,), generator=g).double()
    event = (torch.rand(n, generator=g) < 0.6).long()
    splits = [0, 6, 11]  # unequal local batch sizes, as in the last batch of an epoch
    mp.spawn(_rank_worker, args=(2, free_port(), h, time, event, splits, str(tmp_path)), nprocs=2, join=True)

    ref_h = h.clone().requires_grad_()
    ref_loss = cox_ph_loss(ref_h, time, event)
    ref_loss.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(result["loss"], ref_loss.detach())
        torch.testing.assert_close(result["time"], time)
        # Every rank's loss is the global loss, so the gathered backward sums world_size identical contributions;
        # DDP's gradient averaging divides that back to the single-process gradient.
        torch.testing.assert_close(result["grad"], 2 * ref_h.grad[splits[rank] : splits[rank + 1]])
