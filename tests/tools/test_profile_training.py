"""tools/profile_training: op time is attributed to the model part whose forward ran it, and
backward ops to the part whose forward created their autograd node."""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from masklab_d2.tools.profile_training import attribute, labelled_parts, train_step


class TwoParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.heavy = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.Conv2d(32, 32, 5, padding=2))
        self.light = nn.Linear(32, 4)

    def forward(self, x):
        features = self.heavy(x).mean(dim=(2, 3))
        return {"loss": self.light(features).square().mean()}


def test_forward_and_backward_time_goes_to_the_part_that_ran_it():
    torch.manual_seed(0)
    model = TwoParts()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = {"model (other)": model, "heavy": model.heavy, "light": model.light}
    batch = torch.randn(2, 3, 48, 48)
    with labelled_parts(parts), profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, optimizer, batch)
    by_part, by_kind = attribute(prof.events())
    for key in ("heavy forward", "heavy backward", "light forward", "light backward", "optimizer"):
        assert by_part.get(key, 0) > 0, by_part
    # The convolutions, forward and backward, are the heavy part's, not the light one's.
    assert by_part["heavy backward"] > by_part["light backward"]
    assert by_kind["conv backward"] <= by_part["heavy backward"]
    assert sum(by_part.values()) == pytest.approx(sum(by_kind.values()))
    # The hooks are gone afterwards.
    assert not model.heavy._forward_pre_hooks and not model.heavy._forward_hooks
