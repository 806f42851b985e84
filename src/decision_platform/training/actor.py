"""The residual actor: PPO's logits are the Bayes step values plus what its network adds.

Why: the actor is cloned from the fitted-Q teacher (training/improvement.py), whose action values are
the Bayes policy's step values plus continuation values, ``Q(s, a) = Q_bayes(s, a) + C(s, a)``. A plain
MLP has to learn both, and the step values are the hard part: they are linear in the amount over four
orders of magnitude, and where two of them cross decides the action. The cloned MLP lost most of the
teacher's lead over the Bayes policy there (bench/POLICIES.md). Here the logits are
``net(x) + scale * Q_bayes(s)``: with the network at zero the actor *is* the Bayes policy (softened by
``scale``), the cloning and PPO only learn the correction, and the correction the teacher makes -- a good
customer's future, a fraudster's next attempts -- is a small, smooth function of the state.

``Q_bayes`` is read back from the three squashed step values the network already observes
(``PolicyModel.inputs``: ``sign(v) log(1 + |v|)``, inverted here), so the observation is unchanged and
``PolicyModel`` computes the same logits at serving from its ``residual_scale``.
"""

from __future__ import annotations

from typing import Any

import torch
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import MlpExtractor
from torch import nn

#: The last columns of the observation are the squashed Bayes step values of allow, throttle, block.
STEP_VALUE_COLUMNS = 3


def unsquash(squashed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``sign(v) log(1 + |v|)``: the step values in reward units."""
    return torch.sign(squashed) * torch.expm1(torch.abs(squashed))


class ResidualExtractor(MlpExtractor):
    """SB3's MLP extractor whose actor latent also carries the step values (in reward units), for the
    :class:`ResidualHead` to add to its logits."""

    def __init__(self, feature_dim: int, **kwargs: Any) -> None:
        super().__init__(feature_dim, **kwargs)
        self.latent_dim_pi += STEP_VALUE_COLUMNS

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.policy_net(features)
        return torch.cat([hidden, unsquash(features[:, -STEP_VALUE_COLUMNS:])], dim=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)


class ResidualHead(nn.Module):
    """Logits ``linear(hidden) + scale * step_values``; ``scale`` is fixed (a buffer): PPO and the
    cloning move the correction, never how much the step values weigh (sharpening multiplies both)."""

    def __init__(self, hidden: int, actions: int = 3, scale: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, actions)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        hidden, values = latent[:, :-STEP_VALUE_COLUMNS], latent[:, -STEP_VALUE_COLUMNS:]
        return self.linear(hidden) + self.scale * values


class ResidualActorPolicy(ActorCriticPolicy):
    """SB3's actor-critic with the residual actor (the critic is SB3's own)."""

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = ResidualExtractor(
            self.features_dim, net_arch=self.net_arch, activation_fn=self.activation_fn, device=self.device
        )

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)
        head = ResidualHead(self.mlp_extractor.latent_dim_pi - STEP_VALUE_COLUMNS)
        nn.init.orthogonal_(head.linear.weight, gain=0.01)  # SB3's init of an action head: near zero
        nn.init.zeros_(head.linear.bias)
        self.action_net = head.to(self.device)
        # The optimiser was made over the replaced head's parameters: make it again over these.
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)
