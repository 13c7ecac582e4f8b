"""A call's profile rows are matched by each routed layer to the batch it sees (its input's leading dimension), not
guessed from the base model's argument names: a model called as ``model(X=...)`` gets its profile like a decoder."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import cuma


class MLP(nn.Module):
    """A model whose input is not called input_ids (as in PEFT's custom-model tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, X):
        return self.lin1(torch.relu(self.lin0(X)))


def model(**options):
    torch.manual_seed(0)
    opts = dict(target_modules=["lin0", "lin1"], r=2, num_experts=4, top_k=2, profile_dim=6, router_hidden=8,
                init_weights=False)
    opts.update(options)
    return peft.get_peft_model(MLP(), cuma.CuMAConfig(**opts)).eval()


@pytest.mark.parametrize("grad", [True, False])  # the reference route and the inference route
def test_profile_reaches_a_model_called_with_another_input_name(grad):
    m = model()
    x = torch.randn(5, 10)
    e = torch.nn.functional.normalize(torch.randn(5, 6), dim=-1)
    with torch.set_grad_enabled(grad):
        together = m(X=x, profile_embeds=e)
        alone = torch.cat([m(X=x[i : i + 1], profile_embeds=e[i : i + 1]) for i in range(5)])
        other = m(X=x, profile_embeds=e.flip(0))
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(together, other)  # the profile changes the routing


def test_rows_that_do_not_match_the_layer_input_are_refused():
    m = model()
    with pytest.raises(ValueError, match="2 rows but the batch has 5"):
        m(X=torch.randn(5, 10), profile_embeds=torch.randn(2, 6))


def test_direct_base_model_call_with_positional_input():
    m = model()
    x, e = torch.randn(3, 10), torch.randn(3, 6)
    torch.testing.assert_close(m.get_base_model()(x, profile_embeds=e), m(X=x, profile_embeds=e))
