"""Risk: a PyTorch classifier of P(bad | features, anomaly), calibrated by temperature scaling.

What it takes to match gradient boosting on tabular data (Gorishniy et al., 2021 and 2022), each
measured on a real card data set (bench/RISK.md):

- **Robust per-input transforms** fitted on the training rows: every input is mapped to its quantile
  (0..1) among the training rows, so heavy tails, odd units and codes all land on the same scale.
- **Piecewise-linear encoding** of each quantile into ``bins`` pieces (PLE): the net can give each
  range of an input its own slope, as a tree gives each range its own leaf, which a plain MLP on one
  scalar per input learns slowly.
- **Embeddings of categorical inputs** (codes of attributes such as a device or an email domain, see
  ``FeatureSpec.categorical_names``): a vocabulary of the values seen often enough in the training part,
  one "rare or unseen" bucket, one "missing" bucket.
- A wider net with **dropout**, **early stopping** on a time-ordered validation slice (the latest rows
  of the training part, as the future is), and optionally **distillation** from a gradient-boosting
  teacher (soft targets mixed with the labels). The teacher never serves: serving is this net.

Why temperature scaling: the policy, the rules (``risk > 0.9``) and analysts read the risk as a
probability, so it has to be one. One scalar fitted on the validation slice fixes over-confidence
without changing the ranking.

Serving runs a numpy copy of the net (encoder, embedding lookups, MLP), ~10x faster than torch for one
row. Its attributions (``explain``) are DeepLIFT's Rescale rule against a reference event, computed in the
encoded space and summed per input: they add up to the change in log-odds from the reference exactly
(completeness, to float rounding), and a categorical's attribution goes to its input.

Why DeepLIFT and not integrated gradients (IG, which the platform used until s27): for a ReLU net both
split the same log-odds change, but IG's path integral is a sum of a few gradients (8 points: 2x the
CPU, and on the synthetic models the sum missed the change by p99 0.26 log-odds, max 0.54), while the
Rescale rule's one backward pass of each ReLU's "output move / input move" is exact. Measured on 3,000
synthetic rows against IG with 256 points (the integral itself): the same top reason on 99.7% of rows
(IG-8: 99.6%), the same top-5 in the same order on 94.0% (IG-8: 90.1%). (Shrikumar et al., 2017; the
Rescale rule is what Captum's ``DeepLift`` and SHAP's ``DeepExplainer`` compute for ReLU nets.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit  # a sigmoid that does not overflow on large logits
from torch import nn

from decision_platform.models.preprocessing import signed_log
from decision_platform.models.threads import one_torch_thread

WEIGHTS = "risk.pt"
META = "risk.json"
ENCODER = "risk_encoder.npz"
#: Rows of one gradient step; at least MIN_STEPS of them whatever the data size, before early stopping.
BATCH = 512
MIN_STEPS = 600
#: Quantile knots per input (the resolution of the transform) and pieces of its linear encoding.
KNOTS = 128
#: A categorical value is in the vocabulary when seen at least this often in the training part.
MIN_CATEGORY_COUNT = 20
MAX_EMBEDDING = 16
#: Rows scored at once (by ``logits``, and by the torch nets while training): a chunk's encoded rows
#: and activations are ~1 KB a row each, so this bounds the memory of scoring a whole data set.
PREDICT_CHUNK = 4096
#: Bound of an input's standardised magnitude (in std): far beyond training, no input dominates alone.
MAX_MAGNITUDE = 8.0


@dataclass(frozen=True)
class RiskConfig:
    """How the net is shaped and trained (defaults chosen on the card data set, bench/RISK.md)."""

    hidden: tuple[int, ...] = (256, 128)
    bins: int = 8
    dropout: float = 0.2
    epochs: int = 30
    patience: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    #: Weight of the labels against the teacher's probabilities when a teacher is given (1 = labels only).
    label_weight: float = 0.3
    #: The latest part of the training rows: chooses the epoch count and the temperature.
    validation_fraction: float = 0.2
    #: Then train again on all rows (validation slice included) for the chosen number of epochs.
    refit: bool = True
    #: Nets from different seeds whose logits are averaged (each trained as above).
    members: int = 2


class InputEncoder:
    """Numeric inputs -> piecewise-linear encoding of their training quantile; codes -> vocabulary index.

    ``knots`` (d, KNOTS) are each numeric input's quantiles among the training rows (padded by repeating
    the last one), ``levels`` the quantile of each knot. An embedded input's ``vocabularies`` entry maps
    its exact value to an index (0 missing (value 0), 1 rare or unseen, 2.. the vocabulary). ``numeric``
    and ``categorical`` may share inputs: an integer attribute (a card range, an address code, a counter)
    is read both as a magnitude and as a value.
    """

    def __init__(
        self,
        knots: np.ndarray,
        levels: np.ndarray,
        bins: int,
        categorical: Sequence[int],
        vocabularies: Sequence[np.ndarray],
        numeric: Sequence[int],
        log_mean: np.ndarray,
        log_std: np.ndarray,
        float32_codes: bool = True,
    ) -> None:
        self.knots, self.levels, self.bins = knots, levels, bins
        #: Values are matched to vocabularies rounded to float32 (`_as_code`); encoders saved before
        #: training kept float32 features matched exact float64 values.
        self.float32_codes = float32_codes
        self.categorical = list(categorical)
        self.vocabularies = [np.asarray(v, dtype=np.float64) for v in vocabularies]
        self.numeric = list(numeric)
        #: Signed-log mean and std of each numeric input: its magnitude beside the pieces.
        self.log_mean, self.log_std = np.asarray(log_mean), np.asarray(log_std)
        self._edges = np.arange(bins, dtype=np.float64)

    @classmethod
    def fit(
        cls, x: np.ndarray, bins: int, categorical: Sequence[int] = (), values: Sequence[int] = ()
    ) -> InputEncoder:
        """``categorical``: codes, embedded only; ``values``: numeric inputs embedded by value as well."""
        # Column by column in float64: a copy of one input at a time, not of the whole training set.
        x = np.asarray(x)
        quantiles = np.linspace(0.0, 1.0, KNOTS)
        knots = np.empty((x.shape[1], KNOTS))
        levels = np.empty((x.shape[1], KNOTS))
        for j in range(x.shape[1]):
            column = x[:, j].astype(np.float64)
            points, first = np.unique(np.quantile(column, quantiles), return_index=True)
            # A knot repeated by many tied rows (a count of 0 in half the rows) takes the tie's top level.
            level = np.append(quantiles[first[1:] - 1], 1.0) if len(points) > 1 else np.array([0.5])
            knots[j] = np.pad(points, (0, KNOTS - len(points)), mode="edge")
            levels[j] = np.pad(level, (0, KNOTS - len(level)), mode="edge")
        vocabularies = []
        embedded = [*categorical, *(j for j in values if j not in set(categorical))]
        for j in embedded:
            column = _as_code(x[:, j])
            codes, counts = np.unique(column[column != 0], return_counts=True)
            vocabularies.append(codes[counts >= MIN_CATEGORY_COUNT])
        numeric = [j for j in range(x.shape[1]) if j not in set(categorical)]
        columns = (signed_log(x[:, j].astype(np.float64)) for j in numeric)
        moments = np.array([(c.mean(), c.std()) for c in columns])
        mean, spread = moments.reshape(-1, 2).T
        std = np.where(spread < 1e-9, 1.0, spread)
        return cls(knots, levels, bins, embedded, vocabularies, numeric, mean, std)

    @property
    def code_inputs(self) -> list[int]:
        """Inputs read only through their embedding (category codes)."""
        return [j for j in self.categorical if j not in set(self.numeric)]

    @property
    def value_inputs(self) -> list[int]:
        """Numeric inputs also embedded by their exact value."""
        return [j for j in self.categorical if j in set(self.numeric)]

    @property
    def cardinalities(self) -> list[int]:
        return [len(v) + 2 for v in self.vocabularies]

    @property
    def width_per_input(self) -> int:
        """Encoded columns of a numeric input: its ``bins`` pieces and its magnitude."""
        return self.bins + 1

    @property
    def numeric_width(self) -> int:
        return len(self.numeric) * self.width_per_input

    def quantiles(self, x: np.ndarray) -> np.ndarray:
        """(n, numeric) each numeric input's quantile among the training rows, interpolated between knots."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))[:, self.numeric]
        knots, levels = self.knots[self.numeric], self.levels[self.numeric]
        # Each value's knot interval, then a linear interpolation between the interval's levels. A few
        # rows compare against every knot at once; more search per input (the same intervals; 128 knots,
        # 23 inputs: 31 against 41 µs at 8 rows, 54 against 42 at 16, 190 against 50 at 64).
        if len(x) <= 12:
            above = (x[:, :, None] >= knots[None, :, :]).sum(axis=2)
        else:
            above = np.column_stack(
                [np.searchsorted(knots[j], x[:, j], side="right") for j in range(len(self.numeric))]
            )
        hi = np.clip(above, 1, KNOTS - 1)
        cols = np.arange(len(self.numeric))[None, :]
        k0, k1 = knots[cols, hi - 1], knots[cols, hi]
        l0, l1 = levels[cols, hi - 1], levels[cols, hi]
        frac = np.clip(np.divide(x - k0, k1 - k0, out=np.zeros_like(x), where=k1 > k0), 0.0, 1.0)
        u = l0 + frac * (l1 - l0)
        u = np.where(above == 0, 0.0, u)  # below every training value
        return np.where(np.isfinite(x), u, 0.5)

    def encode_numeric(self, x: np.ndarray) -> np.ndarray:
        """(n, numeric * bins): piece b of an input is how far its quantile is into the b-th of ``bins``
        equal quantile ranges (0 before, 1 past it) -- equal-frequency PLE."""
        return self._encode(self.quantiles(x), self.magnitudes(x))

    def magnitudes(self, x: np.ndarray) -> np.ndarray:
        """(n, numeric) standardised signed logs, bounded at 8 std: the pieces saturate at the training
        extremes, so a card-testing burst 10x beyond any training count needs its magnitude as well."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))[:, self.numeric]
        return self._magnitudes(np.where(np.isfinite(x), x, 0.0))

    def _magnitudes(self, values: np.ndarray) -> np.ndarray:
        """Magnitudes of (n, numeric) finite values."""
        z = (signed_log(values) - self.log_mean) / self.log_std
        return np.clip(z, -MAX_MAGNITUDE, MAX_MAGNITUDE)

    def _encode(self, u: np.ndarray, z: np.ndarray) -> np.ndarray:
        pieces = np.clip(u[:, :, None] * self.bins - self._edges, 0.0, 1.0)
        return np.concatenate([pieces, z[:, :, None]], axis=2).reshape(len(u), -1)

    def reference(self) -> np.ndarray:
        """(numeric_width,) the encoding of an event at every numeric input's training median."""
        median = np.array(
            [
                np.interp(0.5, levels, knots)
                for knots, levels in zip(self.knots[self.numeric], self.levels[self.numeric], strict=True)
            ]
        )
        return self._encode(np.full((1, len(self.numeric)), 0.5), self._magnitudes(median[None, :]))[0]

    def compact(self, x: np.ndarray, chunk: int = PREDICT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
        """(quantiles, magnitudes), each (n, numeric) float32, a chunk of rows at a time: what training
        keeps per row. The pieces are expanded from the quantiles per batch (`expand`), so the training
        set is held at 2 numbers per input instead of ``width_per_input``."""
        n, width = len(x), len(self.numeric)
        u, z = np.empty((n, width), dtype=np.float32), np.empty((n, width), dtype=np.float32)
        for start in range(0, n, chunk):
            rows = x[start : start + chunk]
            u[start : start + chunk], z[start : start + chunk] = self.quantiles(rows), self.magnitudes(rows)
        return u, z

    def expand(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``encode_numeric`` in torch from `compact`'s two arrays (the same layout, in float32)."""
        edges = torch.arange(self.bins, dtype=u.dtype)
        pieces = torch.clamp(u.unsqueeze(2) * self.bins - edges, 0.0, 1.0)
        return torch.cat([pieces, z.unsqueeze(2)], dim=2).reshape(len(u), -1)

    def categories(self, x: np.ndarray) -> np.ndarray:
        """(n, categorical) vocabulary indices: 0 missing (code 0), 1 rare or unseen, 2.. known values."""
        x = np.atleast_2d(np.asarray(x))
        out = np.zeros((len(x), len(self.categorical)), dtype=np.int32)  # embeddings take int32 too
        for k, (j, vocabulary) in enumerate(zip(self.categorical, self.vocabularies, strict=True)):
            codes = _as_code(x[:, j]) if self.float32_codes else x[:, j].astype(np.float64)
            if len(vocabulary) == 0:  # no value was seen often enough in training: every value is rare
                out[:, k] = np.where(codes == 0, 0, 1)
                continue
            at = np.searchsorted(vocabulary, codes)
            known = (at < len(vocabulary)) & (vocabulary[np.minimum(at, len(vocabulary) - 1)] == codes)
            out[:, k] = np.where(codes == 0, 0, np.where(known, at + 2, 1))
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"knots": self.knots, "levels": self.levels, "bins": np.asarray(self.bins)}
        arrays["categorical"] = np.asarray(self.categorical, dtype=np.int64)
        arrays["numeric"] = np.asarray(self.numeric, dtype=np.int64)
        arrays["log_mean"], arrays["log_std"] = self.log_mean, self.log_std
        arrays["float32_codes"] = np.asarray(self.float32_codes)
        return arrays | {f"vocabulary_{k}": v for k, v in enumerate(self.vocabularies)}

    @classmethod
    def from_arrays(cls, data: Mapping) -> InputEncoder:
        categorical = [int(j) for j in data["categorical"]]
        vocabularies = [data[f"vocabulary_{k}"] for k in range(len(categorical))]
        numeric = [int(j) for j in data["numeric"]]
        return cls(
            data["knots"],
            data["levels"],
            int(data["bins"]),
            categorical,
            vocabularies,
            numeric,
            data["log_mean"],
            data["log_std"],
            bool(data["float32_codes"]) if "float32_codes" in data else False,
        )


def _as_code(values: np.ndarray) -> np.ndarray:
    """A value as the vocabularies hold it: rounded to float32 (training keeps its features in float32,
    serving reads float64; both must find the same entry). Category codes are 31-bit digests, so two
    categories whose codes round alike (1 in ~16M pairs) share an entry; integers below 2^24 are exact."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


class RiskNet(nn.Module):
    """Encoded numeric inputs and category embeddings, concatenated, through a ReLU MLP to one logit."""

    def __init__(
        self, numeric_width: int, cardinalities: Sequence[int], hidden: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(
            nn.Embedding(n, min(MAX_EMBEDDING, max(2, round(1.6 * n**0.56)))) for n in cardinalities
        )
        layers: list[nn.Module] = []
        size = numeric_width + sum(e.embedding_dim for e in self.embeddings)
        for width in hidden:
            layers += [nn.Linear(size, width), nn.ReLU(), nn.Dropout(dropout)]
            size = width
        layers.append(nn.Linear(size, 1))
        self.net = nn.Sequential(*layers)

    def embed(self, numeric: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        parts = [numeric, *(e(categories[:, k]) for k, e in enumerate(self.embeddings))]
        return torch.cat(parts, dim=1)

    def forward(self, numeric: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(numeric, categories)).squeeze(-1)


class _NumpyNet:
    """One trained net as numpy arrays: the serving path (~10x faster than torch for a row)."""

    def __init__(self, net: RiskNet, encoder: InputEncoder) -> None:
        linear = [m for m in net.net if isinstance(m, nn.Linear)]
        self.weights = [m.weight.detach().numpy().T.astype(np.float64) for m in linear]
        self.biases = [m.bias.detach().numpy().astype(np.float64) for m in linear]
        self.tables = [e.weight.detach().numpy().astype(np.float64) for e in net.embeddings]
        # The "average event" attributions are measured from: every numeric input at its training
        # median, every embedded input at its embeddings' mean over the vocabulary (not any one value).
        means = [t[2:].mean(axis=0) if len(t) > 2 else t.mean(axis=0) for t in self.tables]
        self.reference = np.concatenate([encoder.reference(), *means])
        # The reference's pre-activations and activations at each hidden layer (explain).
        self.reference_pre: list[np.ndarray] = []
        self.reference_out: list[np.ndarray] = []
        h = self.reference
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            self.reference_pre.append(h @ w + b)
            h = np.maximum(self.reference_pre[-1], 0)
            self.reference_out.append(h)
        self.reference_logit = float(h @ self.weights[-1][:, 0] + self.biases[-1][0])

    def encode(self, numeric: np.ndarray, categories: np.ndarray) -> np.ndarray:
        """(n, encoded width): what the MLP reads (the same numbers as RiskNet.embed)."""
        if not self.tables:
            return numeric
        embedded = [table[categories[:, k]] for k, table in enumerate(self.tables)]
        return np.concatenate([numeric, *embedded], axis=1)

    def logit(self, e: np.ndarray) -> np.ndarray:
        """The raw logit (n,) of encoded rows."""
        h = e
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = h @ w
            h += b
            np.maximum(h, 0, out=h)
        return h @ self.weights[-1][:, 0] + self.biases[-1][0]

    def explain(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw logit (n,), contributions per encoded column (n, width)) by DeepLIFT's Rescale rule.

        Each ReLU's multiplier is its output's move from the reference's over its input's move,
        ``(relu(z) - relu(z_ref)) / (z - z_ref)`` (its gradient where the input did not move). Chained back
        through the linear layers as gradients are, the multipliers times the encoded input's move give
        contributions whose sum is ``logit(e) - logit(reference)`` exactly: each step of the chain is an
        identity on the moves, not an approximation.
        """
        delta = e - self.reference
        multipliers = []
        h = e
        for w, b, ref_pre, ref_out in zip(
            self.weights[:-1], self.biases[:-1], self.reference_pre, self.reference_out, strict=True
        ):
            pre = h @ w
            pre += b
            h = np.maximum(pre, 0)
            moved = pre - ref_pre
            gradient = (pre > 0).astype(np.float64)
            multipliers.append(np.divide(h - ref_out, moved, out=gradient, where=moved != 0))
        logit = h @ self.weights[-1][:, 0] + self.biases[-1][0]
        back = multipliers[-1] * self.weights[-1][:, 0]
        for i in range(len(multipliers) - 1, 0, -1):
            back = back @ self.weights[i].T
            back *= multipliers[i - 1]
        return logit, (back @ self.weights[0].T) * delta


class RiskModel:
    """P(bad) for rows of inputs: the feature vector plus the anomaly score (``inputs``).

    ``nets`` are trained alike from different seeds; the risk is the sigmoid of their mean logit over
    one temperature. Averaging a few pays on real data (bench/RISK.md) at a few microseconds a net.
    """

    def __init__(
        self,
        nets: Sequence[RiskNet],
        encoder: InputEncoder,
        temperature: float,
        input_names: list[str],
        config: RiskConfig = RiskConfig(),
    ) -> None:
        self.nets = [net.eval() for net in nets]
        self.encoder = encoder
        self.temperature = temperature
        self.input_names = input_names
        self.config = config
        self._members = [_NumpyNet(net, encoder) for net in self.nets]
        # Which input each encoded column belongs to: attributions are summed per input.
        groups = [j for j in encoder.numeric for _ in range(encoder.width_per_input)]
        for j, table in zip(encoder.categorical, self._members[0].tables, strict=True):
            groups += [j] * table.shape[1]
        self._groups = np.asarray(groups, dtype=np.int64)

    # --- the shape of the inputs
    @staticmethod
    def inputs(features: np.ndarray, anomaly: np.ndarray) -> np.ndarray:
        """The features, then the anomaly score, in the features' precision (float64 serving, float32
        training: a float64 copy of a training set is twice its size)."""
        x = np.atleast_2d(features)
        return np.column_stack([x, np.atleast_1d(anomaly).astype(x.dtype, copy=False)])

    def _encoded(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.atleast_2d(x)
        return self.encoder.encode_numeric(x), self.encoder.categories(x)

    # --- serving
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Calibrated log-odds for rows of inputs (many rows a chunk at a time: the encoded rows of a
        whole data set at once would take several GB)."""
        x = np.atleast_2d(x)
        if len(x) > PREDICT_CHUNK:
            return np.concatenate(
                [self.logits(x[i : i + PREDICT_CHUNK]) for i in range(0, len(x), PREDICT_CHUNK)]
            )
        numeric, categories = self._encoded(x)
        total = np.zeros(len(numeric))
        for member in self._members:
            total += member.logit(member.encode(numeric, categories))
        return total / (len(self._members) * self.temperature)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(bad) for rows of inputs (features + anomaly)."""
        return expit(self.logits(x))

    def reference_logit(self) -> float:
        """The log-odds of the reference event(s), which attributions are measured from."""
        total = sum(member.reference_logit for member in self._members)
        return total / (len(self._members) * self.temperature)

    def explain(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(risk (n,), attributions (n, inputs)) in log-odds: DeepLIFT (Rescale) from the reference event,
        summed per input, so each row's attributions add up to logit(x) - reference_logit()."""
        numeric, categories = self._encoded(x)
        n = len(numeric)
        logit = np.zeros(n)
        per_column = None
        for member in self._members:
            raw, columns = member.explain(member.encode(numeric, categories))
            logit += raw
            per_column = columns if per_column is None else per_column + columns
        scale = 1.0 / (len(self._members) * self.temperature)
        attributions = np.zeros((n, len(self.input_names)))
        np.add.at(attributions.T, self._groups, (per_column * scale).T)
        return expit(logit * scale), attributions

    # --- training
    @staticmethod
    def effective_epochs(n_rows: int, epochs: int) -> int:
        """At least MIN_STEPS gradient steps: a retraining on a few thousand labelled outcomes is only a
        handful of batches per epoch, and a dozen epochs of those leaves the net barely fitted."""
        batches = max(1, -(-int(n_rows * 0.8) // BATCH))
        return max(epochs, -(-MIN_STEPS // batches))

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        input_names: list[str],
        config: RiskConfig = RiskConfig(),
        categorical: Sequence[int] = (),
        teacher: np.ndarray | None = None,
        seed: int = 0,
        on_epoch: Callable[[int, float], None] | None = None,
        values: Sequence[int] = (),
    ) -> RiskModel:
        """Fit on time-ordered rows. The latest ``validation_fraction`` chooses the epoch count (best
        validation log loss) and calibrates the temperature of a net trained on the other rows; with
        ``config.refit`` the served net is then trained on every row for that many epochs.
        ``teacher``: another model's P(bad) for the rows, mixed into the targets (distillation)."""
        with one_torch_thread():
            return cls._fit(x, y, input_names, config, categorical, values, teacher, seed, on_epoch)

    @classmethod
    def _fit(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        input_names: list[str],
        config: RiskConfig,
        categorical: Sequence[int],
        values: Sequence[int],
        teacher: np.ndarray | None,
        seed: int,
        on_epoch: Callable[[int, float], None] | None,
    ) -> RiskModel:
        torch.manual_seed(seed)
        x = np.asarray(x)  # float32 from training: the encoder reads a column or a chunk at a time
        labels = np.asarray(y, dtype=np.float32)
        cut = max(1, min(len(x) - 1, int(len(x) * (1.0 - config.validation_fraction))))
        encoder = InputEncoder.fit(x[:cut], config.bins, categorical, values)
        quantiles, magnitudes = (torch.from_numpy(a) for a in encoder.compact(x))
        categories = torch.from_numpy(encoder.categories(x))
        n_rows = len(x)
        del x  # the caller's array: only the compact encoding is needed from here on

        def numeric(rows: torch.Tensor | slice) -> torch.Tensor:
            return encoder.expand(quantiles[rows], magnitudes[rows])

        targets = labels
        if teacher is not None:
            w = config.label_weight
            targets = (w * labels + (1.0 - w) * np.asarray(teacher, dtype=np.float32)).astype(np.float32)
        t = torch.from_numpy(targets)
        truth = torch.from_numpy(labels)
        validation = slice(cut, None)

        def train(rows: int, epochs: int, stop_early: bool, member: int) -> tuple[RiskNet, int]:
            """A net trained on the first ``rows`` rows; with ``stop_early``, the best epoch on the
            validation slice's log loss (and that epoch's count), else exactly ``epochs``."""
            seed_of_member = seed + 1000 * member
            torch.manual_seed(seed_of_member)
            net = RiskNet(encoder.numeric_width, encoder.cardinalities, config.hidden, config.dropout)
            # Start at the base rate: the first epochs then learn the ranking, not the rarity of fraud,
            # and early validation losses are comparable with later ones.
            rate = float(np.clip(targets[:rows].mean(), 1e-4, 1 - 1e-4))
            with torch.no_grad():
                net.net[-1].bias.fill_(float(np.log(rate / (1 - rate))))
            warmup = -(-MIN_STEPS // max(1, -(-rows // BATCH)))  # epochs before stopping may stop it
            optimiser = torch.optim.AdamW(
                net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
            )
            loss_fn = nn.BCEWithLogitsLoss()
            generator = torch.Generator().manual_seed(seed_of_member)
            best_loss, best_state, best_epochs, since_best = float("inf"), None, epochs, 0
            for epoch in range(epochs):
                net.train()
                order = torch.randperm(rows, generator=generator)
                total = 0.0
                for start in range(0, rows, BATCH):
                    idx = order[start : start + BATCH]
                    optimiser.zero_grad()
                    loss = loss_fn(net(numeric(idx), categories[idx]), t[idx])
                    loss.backward()
                    optimiser.step()
                    total += loss.item() * len(idx)
                if on_epoch:
                    on_epoch(epoch, total / rows)
                if not stop_early or epoch + 1 < min(warmup, epochs):
                    continue
                held = float(loss_fn(_logits(net, numeric, categories, validation), truth[cut:]))
                if held < best_loss - 1e-5:
                    best_loss, best_epochs, since_best = held, epoch + 1, 0
                    best_state = {k: v.clone() for k, v in net.state_dict().items()}
                else:
                    since_best += 1
                    if since_best >= config.patience:
                        break
            if best_state is not None:
                net.load_state_dict(best_state)
            return net.eval(), best_epochs

        nets, held = [], []
        for member in range(config.members):
            net, epochs = train(cut, cls.effective_epochs(n_rows, config.epochs), True, member)
            held.append(_logits(net, numeric, categories, validation))
            if config.refit:
                # The latest rows are the most like the future: once they have chosen the epoch count,
                # the net is trained again on every row for that many epochs.
                net, _ = train(n_rows, epochs, False, member)
            nets.append(net)
        # One temperature for the mean logit, fitted on rows the nets it was measured on never saw.
        temperature = _fit_temperature(torch.stack(held).mean(dim=0), truth[cut:])
        return cls(nets, encoder, temperature, list(input_names), config)

    # --- artifacts
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        torch.save({"members": [net.state_dict() for net in self.nets]}, directory / WEIGHTS)
        np.savez(directory / ENCODER, **self.encoder.arrays())
        meta = {
            "input_names": self.input_names,
            "temperature": self.temperature,
            "hidden": list(self.config.hidden),
            "bins": self.encoder.bins,
            "dropout": self.config.dropout,
            "members": len(self.nets),
        }
        (directory / META).write_text(json.dumps(meta, indent=2), "utf-8")

    @classmethod
    def load(cls, directory: Path) -> RiskModel:
        directory = Path(directory)
        meta = json.loads((directory / META).read_text("utf-8"))
        with np.load(directory / ENCODER, allow_pickle=False) as data:
            encoder = InputEncoder.from_arrays(data)
        config = RiskConfig(
            hidden=tuple(meta["hidden"]),
            bins=int(meta["bins"]),
            dropout=meta["dropout"],
            members=int(meta["members"]),
        )
        # weights_only: a model file is data, never code.
        states = torch.load(directory / WEIGHTS, weights_only=True)["members"]
        nets = []
        for state in states:
            net = RiskNet(encoder.numeric_width, encoder.cardinalities, config.hidden, config.dropout)
            net.load_state_dict(state)
            nets.append(net)
        return cls(nets, encoder, float(meta["temperature"]), meta["input_names"], config)


def _logits(
    net: RiskNet, numeric: Callable[[slice], torch.Tensor], categories: torch.Tensor, rows: slice
) -> torch.Tensor:
    """The net's logits for ``rows``, expanded and scored PREDICT_CHUNK rows at a time."""
    net.eval()
    start, stop, _ = rows.indices(len(categories))
    with torch.no_grad():
        return torch.cat(
            [
                net(
                    numeric(slice(i, min(i + PREDICT_CHUNK, stop))),
                    categories[i : min(i + PREDICT_CHUNK, stop)],
                )
                for i in range(start, stop, PREDICT_CHUNK)
            ]
        )


def _fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature minimising the log loss on held-out rows (1-D search, robust and fast)."""
    grid = torch.exp(torch.linspace(np.log(0.05), np.log(20.0), 241))
    losses = [float(nn.functional.binary_cross_entropy_with_logits(logits / g, targets)) for g in grid]
    return float(grid[int(np.argmin(losses))])
