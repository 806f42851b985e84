"""Risk: a small PyTorch classifier of P(bad | features, anomaly), calibrated by temperature scaling.

Why temperature scaling: the policy, the rules (``risk > 0.9``) and analysts read the risk as a
probability, so it has to be one. One scalar fitted on held-out rows fixes over-confidence without
changing the ranking (ROC-AUC is unchanged).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from decision_platform.models.preprocessing import Standardizer, signed_log

WEIGHTS = "risk.pt"
MIN_STEPS = 600
META = "risk.json"


class RiskNet(nn.Module):
    def __init__(self, n_inputs: int, hidden: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = n_inputs
        for width in hidden:
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


@dataclass
class RiskPrediction:
    risk: float
    #: Contribution of each input (features..., anomaly) to the logit, relative to the training mean.
    attributions: np.ndarray


class RiskModel:
    """Inputs are the feature vector plus the anomaly score."""

    def __init__(
        self, net: RiskNet, scaler: Standardizer, temperature: float, input_names: list[str]
    ) -> None:
        self.net = net.eval()
        self.scaler = scaler
        self.temperature = temperature
        self.input_names = input_names
        # The per-request path runs on numpy copies of the weights: one row through a 3-layer MLP plus its
        # gradient costs ~15 us this way, against ~100-250 us through torch autograd.
        linear = [m for m in net.net if isinstance(m, nn.Linear)]
        self._weights = [m.weight.detach().numpy().T.astype(np.float64) for m in linear]
        self._biases = [m.bias.detach().numpy().astype(np.float64) for m in linear]

    @staticmethod
    def inputs(features: np.ndarray, anomaly: np.ndarray) -> np.ndarray:
        return np.column_stack([np.atleast_2d(features), np.atleast_1d(anomaly)])

    @staticmethod
    def effective_epochs(n_rows: int, epochs: int) -> int:
        """At least MIN_STEPS gradient steps: a retraining on a few thousand labelled outcomes is only a
        handful of batches per epoch, and a dozen epochs of those leaves the net barely fitted."""
        batches = max(1, -(-int(n_rows * 0.8) // 512))
        return max(epochs, -(-MIN_STEPS // batches))

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        input_names: list[str],
        epochs: int = 12,
        seed: int = 0,
        on_epoch: Callable[[int, float], None] | None = None,
    ) -> RiskModel:
        """Fit on time-ordered rows: the last 20% calibrates the temperature and never trains the net."""
        torch.manual_seed(seed)
        cut = int(len(x) * 0.8)
        scaler = Standardizer.fit(x[:cut])
        z = torch.from_numpy(scaler.transform(x))
        t = torch.from_numpy(np.asarray(y, dtype=np.float32))
        net = RiskNet(z.shape[1])
        optimiser = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-5)
        loss_fn = nn.BCEWithLogitsLoss()
        generator = torch.Generator().manual_seed(seed)
        epochs = cls.effective_epochs(len(x), epochs)
        for epoch in range(epochs):
            net.train()
            order = torch.randperm(cut, generator=generator)
            total = 0.0
            for start in range(0, cut, 512):
                idx = order[start : start + 512]
                optimiser.zero_grad()
                loss = loss_fn(net(z[idx]), t[idx])
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
            if on_epoch:
                on_epoch(epoch, total / cut)
        net.eval()
        with torch.no_grad():
            logits = net(z[cut:])
        temperature = _fit_temperature(logits, t[cut:])
        return cls(net, scaler, temperature, list(input_names))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(bad) for rows of inputs (features + anomaly)."""
        with torch.no_grad():
            logits = self.net(torch.from_numpy(self.scaler.transform(np.atleast_2d(x))))
        return torch.sigmoid(logits / self.temperature).numpy().astype(np.float64)

    def predict_explained(self, x: np.ndarray) -> RiskPrediction:
        """P(bad) of one row with gradient x input attributions against the training mean.

        In standardised space the training mean is the origin, so ``z * dlogit/dz`` says how much each
        input moved the logit away from an average event (first-order; exact for a linear model).
        Forward and backward pass in numpy (same weights as ``predict``; a test checks they agree).
        """
        z = (signed_log(np.asarray(x, dtype=np.float64).reshape(-1)) - self.scaler.mean) / self.scaler.std
        h, active = z, []
        for w, b in zip(self._weights[:-1], self._biases[:-1], strict=True):
            pre = h @ w + b
            active.append(pre > 0)
            h = np.where(active[-1], pre, 0.0)
        logit = float(h @ self._weights[-1][:, 0] + self._biases[-1][0]) / self.temperature
        grad = self._weights[-1][:, 0] / self.temperature
        for w, mask in zip(reversed(self._weights[:-1]), reversed(active), strict=True):
            grad = (grad * mask) @ w.T
        return RiskPrediction(float(1.0 / (1.0 + np.exp(-logit))), grad * z)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        torch.save(self.net.state_dict(), directory / WEIGHTS)
        hidden = [m.out_features for m in self.net.net if isinstance(m, nn.Linear)][:-1]
        meta = {
            "input_names": self.input_names,
            "temperature": self.temperature,
            "hidden": hidden,
            "scaler_mean": self.scaler.mean.tolist(),
            "scaler_std": self.scaler.std.tolist(),
        }
        (directory / META).write_text(json.dumps(meta, indent=2), "utf-8")

    @classmethod
    def load(cls, directory: Path) -> RiskModel:
        directory = Path(directory)
        meta = json.loads((directory / META).read_text("utf-8"))
        net = RiskNet(len(meta["input_names"]), tuple(meta["hidden"]))
        # weights_only: a model file is data, never code.
        net.load_state_dict(torch.load(directory / WEIGHTS, weights_only=True))
        scaler = Standardizer(np.asarray(meta["scaler_mean"]), np.asarray(meta["scaler_std"]))
        return cls(net, scaler, float(meta["temperature"]), meta["input_names"])


def _fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature minimising the log loss on held-out rows (1-D search, robust and fast)."""
    grid = torch.exp(torch.linspace(np.log(0.25), np.log(8.0), 121))
    losses = [float(nn.functional.binary_cross_entropy_with_logits(logits / g, targets)) for g in grid]
    return float(grid[int(np.argmin(losses))])
