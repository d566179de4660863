"""Loss values derived by hand (beta = 0.1) and the direction of the gradient."""

import math

import pytest
import torch

from training.losses import preference_loss

PC = torch.tensor([-0.5, -10.0, -1.0])
PR = torch.tensor([-0.1, -30.0, -21.0])
RC = torch.tensor([-0.5, -10.1, -0.1])
RR = torch.tensor([-0.1, -20.1, -0.1])
# h = (pc - pr) - (rc - rr) = [0, 10, 20]; beta*h = [0, 1, 2]


def test_dpo_sigmoid_values():
    out = preference_loss(PC, PR, RC, RR, name="dpo", beta=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([0.6931, 0.3133, 0.1269]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        out.chosen_rewards - out.rejected_rewards, torch.tensor([0.0, 1.0, 2.0]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.0, 0.01, -0.09]), atol=1e-5, rtol=0)


def test_conservative_dpo_values():
    out = preference_loss(PC, PR, RC, RR, name="dpo", beta=0.1, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([0.6931, 0.4133, 0.3269]), atol=1e-4, rtol=0)


def test_ipo_hinge_reference_free_values():
    ipo = preference_loss(PC, PR, RC, RR, name="ipo", beta=0.1)
    torch.testing.assert_close(ipo.losses, torch.tensor([25.0, 25.0, 225.0]))  # (h - 5)^2
    hinge = preference_loss(PC, PR, RC, RR, name="hinge", beta=0.1)
    torch.testing.assert_close(hinge.losses, torch.tensor([1.0, 0.0, 0.0]))  # relu(1 - beta*h)
    free = preference_loss(PC, PR, RC, RR, name="dpo", beta=0.1, reference_free=True)
    # h = pc - pr = [-0.4, 20, 20]
    expected = -torch.nn.functional.logsigmoid(0.1 * torch.tensor([-0.4, 20.0, 20.0]))
    torch.testing.assert_close(free.losses, expected)


def test_sft_and_dpo_plus_sft():
    counts = torch.tensor([1.0, 10.0, 2.0])
    sft = preference_loss(PC, PR, None, None, name="sft", chosen_token_counts=counts)
    torch.testing.assert_close(sft.losses, torch.tensor([0.5, 1.0, 0.5]))
    dpo = preference_loss(PC, PR, RC, RR, name="dpo", beta=0.1)
    mix = preference_loss(PC, PR, RC, RR, name="dpo_sft", beta=0.1, sft_weight=0.5, chosen_token_counts=counts)
    torch.testing.assert_close(mix.losses, dpo.losses + 0.5 * torch.tensor([0.5, 1.0, 0.5]))


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_policy_equal_to_reference_gives_ln2(beta):
    x = torch.randn(5) - 5
    y = torch.randn(5) - 5
    out = preference_loss(x, y, x.clone(), y.clone(), name="dpo", beta=beta)
    torch.testing.assert_close(out.losses, torch.full((5,), math.log(2)))


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "dpo_sft"])
def test_gradient_raises_chosen_and_lowers_rejected(name):
    pc = torch.tensor([-5.0, -7.0], requires_grad=True)
    pr = torch.tensor([-5.0, -6.0], requires_grad=True)
    out = preference_loss(
        pc, pr, torch.tensor([-5.0, -7.0]), torch.tensor([-5.0, -6.0]), name=name, beta=0.1, sft_weight=1.0
    )
    out.losses.sum().backward()
    # gradient descent moves against the gradient: chosen up (grad < 0), rejected down (grad > 0)
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_rewards_are_detached():
    pc = PC.clone().requires_grad_()
    out = preference_loss(pc, PR, RC, RR)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="loss name: expected one of"):
        preference_loss(PC, PR, RC, RR, name="kto")
