"""The decision policy: PPO (Stable-Baselines3) trained in the simulator, served without SB3.

SB3's ``predict`` costs ~160 µs p50 with multi-millisecond tails (tensor conversion, checks). At
serving we only need the actor's action probabilities, so the trained actor (MLP + action head) is
exported to plain numpy arrays and evaluated directly (~10 µs). The SB3 zip is kept beside it to
warm-start the next retraining.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch import nn

ACTOR = "policy.npz"
PPO_ZIP = "ppo.zip"
META = "policy.json"
#: Rows of states the actor scores at once (scoring a data set).
PROBABILITY_CHUNK = 8192
_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Tanh": np.tanh,
    "ReLU": lambda v: np.maximum(v, 0.0),
}


#: ``policy.json``'s ``type`` of a PPO actor (artifacts written before baselines could be served have none).
PPO_ACTOR = "ppo"


#: The optional last state column: the risk's log-odds (clipped to +-10). A policy whose thresholds sit
#: at risks of 0.02 or 0.05 reads them on this scale far more easily than on the risk itself.
RISK_LOGIT = "risk_logit"


def scaled_state(
    features: np.ndarray,
    anomaly: np.ndarray,
    risk: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    risk_logit: bool = False,
) -> np.ndarray:
    """Every policy's observation: signed-log features standardised on the training part, then the
    anomaly and the risk (and, with ``risk_logit``, the risk's log-odds). One function, so a served
    baseline and the PPO actor see the same state."""
    x = np.atleast_2d(np.asarray(features, dtype=np.float64))
    scaled = (np.sign(x) * np.log1p(np.abs(x)) - mean) / std
    columns = [scaled, np.atleast_1d(anomaly), np.atleast_1d(risk)]
    if risk_logit:
        p = np.clip(np.atleast_1d(np.asarray(risk, dtype=np.float64)), 1e-12, 1 - 1e-12)
        columns.append(np.clip(np.log(p) - np.log1p(-p), -10.0, 10.0))
    return np.column_stack(columns).astype(np.float32)


def unscaled_feature(states: np.ndarray, index: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The raw value of feature ``index`` back from states (the inverse of :func:`scaled_state`)."""
    v = np.asarray(states)[:, index].astype(np.float64) * std[index] + mean[index]
    return np.sign(v) * np.expm1(np.abs(v))


def expected_step_rewards(values: np.ndarray, risk: np.ndarray, amounts: np.ndarray) -> np.ndarray:
    """(n, 3): each action's expected reward of one step given the calibrated ``risk`` and the amount,
    ``(1 - risk) * (good_base + good_per_amount * amount) + risk * (bad_base + bad_per_amount * amount)``
    from the (4, 3) ``values`` of ``RewardTable.expected_step_values`` (the Bayes policy's prices)."""
    risk = np.asarray(risk, dtype=np.float64)[:, None]
    amounts = np.asarray(amounts, dtype=np.float64)[:, None]
    g0, g1, b0, b1 = np.asarray(values, dtype=np.float64)
    return (1.0 - risk) * (g0 + g1 * amounts) + risk * (b0 + b1 * amounts)


def step_value_columns(
    states: np.ndarray,
    values: np.ndarray,
    risk_index: int,
    amount_index: int | None,
    mean: np.ndarray,
    std: np.ndarray,
) -> np.ndarray:
    """(n, 3) float32: the Bayes step value of allow / throttle / block on each state, signed-log
    squashed (``sign(v) log(1 + |v|)``: monotone, so the best action stays the largest column, and a
    payment far beyond the training range lands a few units out, not thousands)."""
    states = np.atleast_2d(states)
    amounts = (
        np.zeros(len(states)) if amount_index is None else unscaled_feature(states, amount_index, mean, std)
    )
    v = expected_step_rewards(values, states[:, risk_index].astype(np.float64), amounts)
    return (np.sign(v) * np.log1p(np.abs(v))).astype(np.float32)


class PolicyModel:
    """Action probabilities of the PPO actor for states ``[scaled features..., anomaly, risk]`` (and
    ``risk_logit`` when its state names end with it).

    With ``step_values`` (the (4, 3) prices of ``RewardTable.expected_step_values``, frozen into the
    artifact) the network reads three more inputs than the state: the Bayes step value of each action on
    the state (:func:`step_value_columns`; the amount from the state's ``amount_feature``). They are
    computed from the state inside :meth:`inputs`, so training, the judged probabilities and serving (all
    through :meth:`probabilities` of the state every policy shares) read the same numbers. Why: the
    teacher decides from these values plus continuation values, and an MLP does not extrapolate the
    values' linear amount term from the scaled log amount beyond the training range (bench/POLICIES.md)."""

    def __init__(
        self,
        weights: list[np.ndarray],
        biases: list[np.ndarray],
        activation: str,
        state_names: list[str],
        scaler_mean: np.ndarray,
        scaler_std: np.ndarray,
        step_values: np.ndarray | None = None,
        amount_feature: str | None = "amount",
    ) -> None:
        self.weights, self.biases, self.activation = weights, biases, activation
        self.state_names = state_names
        # The policy reuses the risk model's scaling of features so both see the same state.
        self.scaler_mean, self.scaler_std = scaler_mean, scaler_std
        self._act = _ACTIVATIONS[activation]
        self.step_values = None if step_values is None else np.asarray(step_values, dtype=np.float64)
        if self.step_values is not None and self.step_values.shape != (4, 3):
            raise ValueError(f"step values must be (4, 3), got {self.step_values.shape}")
        self.amount_feature = amount_feature if amount_feature in state_names else None

    @property
    def input_spec(self) -> dict[str, object]:
        """What :meth:`inputs` adds to the state (the keyword arguments of :meth:`from_sb3`)."""
        return {"step_values": self.step_values, "amount_feature": self.amount_feature}

    def inputs(self, states: np.ndarray) -> np.ndarray:
        """The network's input for states: the state itself, then (with ``step_values``) the three
        squashed Bayes step values. What PPO observes in training (`fit_policy`) and reads at serving."""
        states = np.atleast_2d(states)
        if self.step_values is None:
            return states
        names = self.state_names
        amount = names.index(self.amount_feature) if self.amount_feature else None
        extra = step_value_columns(
            states, self.step_values, names.index("risk"), amount, self.scaler_mean, self.scaler_std
        )
        return np.column_stack([states, extra.astype(states.dtype)])

    def state(self, features: np.ndarray, anomaly: np.ndarray, risk: np.ndarray) -> np.ndarray:
        """The policy's observation: scaled features, then the two scores (and the risk's log-odds)."""
        return scaled_state(
            features, anomaly, risk, self.scaler_mean, self.scaler_std, RISK_LOGIT in self.state_names
        )

    def probabilities(self, states: np.ndarray) -> np.ndarray:
        """(n, k) states -> (n, 3) action probabilities (a chunk of rows at a time: a data set's states
        in float64, and each hidden layer's, would be several times the float32 states)."""
        states = np.atleast_2d(states)
        if len(states) > PROBABILITY_CHUNK:
            chunks = range(0, len(states), PROBABILITY_CHUNK)
            return np.concatenate([self.probabilities(states[i : i + PROBABILITY_CHUNK]) for i in chunks])
        h = np.asarray(self.inputs(states), dtype=np.float64)
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = self._act(h @ w + b)
        logits = h @ self.weights[-1] + self.biases[-1]
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    @classmethod
    def from_sb3(
        cls,
        ppo: object,
        state_names: Sequence[str],
        scaler_mean: np.ndarray,
        scaler_std: np.ndarray,
        step_values: np.ndarray | None = None,
        amount_feature: str | None = "amount",
    ) -> PolicyModel:
        policy = ppo.policy  # type: ignore[attr-defined]
        weights, biases, activation = [], [], "Tanh"
        for module in policy.mlp_extractor.policy_net:
            if isinstance(module, nn.Linear):
                weights.append(module.weight.detach().cpu().numpy().T.astype(np.float64))
                biases.append(module.bias.detach().cpu().numpy().astype(np.float64))
            else:
                activation = type(module).__name__
        head = policy.action_net
        weights.append(head.weight.detach().cpu().numpy().T.astype(np.float64))
        biases.append(head.bias.detach().cpu().numpy().astype(np.float64))
        return cls(
            weights,
            biases,
            activation,
            list(state_names),
            np.asarray(scaler_mean),
            np.asarray(scaler_std),
            step_values,
            amount_feature,
        )

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        arrays = {f"w{i}": w for i, w in enumerate(self.weights)} | {
            f"b{i}": b for i, b in enumerate(self.biases)
        }
        np.savez(directory / ACTOR, scaler_mean=self.scaler_mean, scaler_std=self.scaler_std, **arrays)
        meta = {
            "type": PPO_ACTOR,
            "activation": self.activation,
            "layers": len(self.weights),
            "state_names": self.state_names,
        }
        if self.step_values is not None:
            meta |= {"step_values": self.step_values.tolist(), "amount_feature": self.amount_feature}
        (directory / META).write_text(json.dumps(meta, indent=2), "utf-8")

    @classmethod
    def load(cls, directory: Path) -> PolicyModel:
        directory = Path(directory)
        meta = json.loads((directory / META).read_text("utf-8"))
        with np.load(directory / ACTOR, allow_pickle=False) as data:
            n = int(meta["layers"])
            return cls(
                [data[f"w{i}"] for i in range(n)],
                [data[f"b{i}"] for i in range(n)],
                meta["activation"],
                meta["state_names"],
                data["scaler_mean"],
                data["scaler_std"],
                meta.get("step_values"),
                meta.get("amount_feature"),
            )


def serving_distribution(
    probabilities: np.ndarray, mask: Sequence[bool], floor: float, explore_actions: Sequence[int]
) -> np.ndarray:
    """The distribution actually sampled at serving: the policy restricted to the actions the rules
    allow, with at least ``floor`` probability on each allowed action in ``explore_actions``.

    The floor keeps every allowed action's propensity above zero where it is safe to explore, which
    off-policy evaluation needs; actions outside ``explore_actions`` (block, by default) are only ever
    taken with the policy's own probability.
    """
    # Plain floats: on three actions numpy's per-call overhead costs ~50x the arithmetic.
    allowed = [bool(m) for m in mask]
    p = [float(probabilities[a]) if allowed[a] else 0.0 for a in range(3)]
    total = sum(p)
    if total <= 1e-12:
        # The policy put (almost) no mass on what the rules allow: take the allowed action nearest to
        # what it wanted (a capped block becomes a throttle, not a coin toss).
        wanted = max(range(3), key=lambda a: float(probabilities[a]))
        nearest = min((a for a in range(3) if allowed[a]), key=lambda a: abs(a - wanted))
        p = [1.0 if a == nearest else 0.0 for a in range(3)]
    else:
        p = [v / total for v in p]
    if sum(allowed) <= 1 or floor <= 0:
        return np.array(p)
    explorable = [allowed[a] and a in explore_actions for a in range(3)]
    short = [explorable[a] and p[a] < floor for a in range(3)]
    if not any(short):
        return np.array(p)
    need = sum(floor - p[a] for a in range(3) if short[a])
    # Room to give: what each other allowed action has above its own floor (floor <= 1/3 keeps it >= need).
    room = [
        0.0 if short[a] or not allowed[a] else max(p[a] - floor if explorable[a] else p[a], 0.0)
        for a in range(3)
    ]
    total_room = sum(room)
    return np.array([floor if short[a] else p[a] - need * room[a] / total_room for a in range(3)])


def serving_distributions(
    probabilities: np.ndarray, masks: np.ndarray, floor: float, explore_actions: Sequence[int]
) -> np.ndarray:
    """:func:`serving_distribution` of every row of (n, 3) ``probabilities`` and boolean ``masks``, over
    columns: the same floating-point operations in the same order, so the same numbers bit for bit
    (tests/unit/test_policy_and_rules.py). Rows where the rules leave the policy (almost) no mass take
    the per-row function."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    allowed = np.asarray(masks, dtype=bool)
    p = np.where(allowed, probabilities, 0.0)
    total = p[:, 0] + p[:, 1] + p[:, 2]  # sum() of three floats, left to right
    empty = total <= 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        p = p / total[:, None]
    if floor > 0:
        explorable = allowed & np.isin(np.arange(3), list(explore_actions))[None, :]
        short = explorable & (p < floor)
        adjust = (allowed.sum(axis=1) > 1) & short.any(axis=1)
        # need: the shortfalls added in action order (0.0 where not short adds nothing exactly).
        gap = np.where(short, floor - p, 0.0)
        need = gap[:, 0] + gap[:, 1] + gap[:, 2]
        room = np.where(short | ~allowed, 0.0, np.maximum(np.where(explorable, p - floor, p), 0.0))
        total_room = room[:, 0] + room[:, 1] + room[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            floored = np.where(short, floor, p - need[:, None] * room / total_room[:, None])
        p = np.where(adjust[:, None], floored, p)
    for i in np.flatnonzero(empty):
        p[i] = serving_distribution(probabilities[i], allowed[i], floor, explore_actions)
    return p


def sharpen(ppo: object, factor: float) -> None:
    """Multiply the actor's logits by ``factor`` (> 0): its most likely action stays, its probability
    rises (a softmax temperature of ``1 / factor``).

    Why: a cloned actor that agrees with its deterministic teacher on 99.6% of rows still puts a few
    tenths of a percent on the other actions everywhere; sampled at serving over a whole episode, that
    mass (a good customer blocked, a fraud allowed) costs more than the rows it gets wrong.
    """
    import torch

    if factor <= 0:
        raise ValueError(f"sharpening factor must be > 0, got {factor}")
    head = ppo.policy.action_net  # type: ignore[attr-defined]
    with torch.no_grad():
        head.weight.mul_(factor)
        head.bias.mul_(factor)


def imitate(
    ppo: object,
    states: np.ndarray,
    actions: np.ndarray,
    epochs: int = 5,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> float:
    """Warm-start the PPO actor by imitating a baseline policy's actions (behaviour cloning).

    Fraud is rare, so PPO from scratch spends most of its budget finding out that blocking everyone is
    bad. Starting from the best threshold policy, PPO only has to learn where long-term effects (a lost
    customer, a fraudster who gives up) make a different action better. ``weights`` (per row, e.g. what
    a wrong action costs there) replace the default partial class balancing. Returns the final accuracy.
    """
    import torch

    policy = ppo.policy  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(seed)
    obs = torch.as_tensor(states, dtype=torch.float32)
    target = torch.as_tensor(actions, dtype=torch.long)
    # Partly balance classes (square root): the rare actions matter, but full balancing over-blocks.
    if weights is None:
        counts = torch.bincount(target, minlength=3).clamp(min=1).float()
        row_weights = (1.0 / counts.sqrt())[target]
    else:
        row_weights = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    optimiser = torch.optim.Adam(policy.parameters(), lr=1e-3)
    # At least ~300 gradient steps: on a few thousand logged rows, a handful of epochs is only a dozen.
    epochs = max(epochs, -(-300 // max(1, -(-len(obs) // 1024))))
    for _ in range(epochs):
        order = torch.randperm(len(obs), generator=generator)
        for start in range(0, len(obs), 1024):
            idx = order[start : start + 1024]
            log_prob = policy.get_distribution(obs[idx]).log_prob(target[idx])
            loss = -(log_prob * row_weights[idx]).sum() / row_weights[idx].sum().clamp(min=1e-12)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    right = 0
    with torch.no_grad():  # a chunk at a time: every row's hidden layers at once would be GBs
        for start in range(0, len(obs), PROBABILITY_CHUNK):
            rows = slice(start, start + PROBABILITY_CHUNK)
            predicted = policy.get_distribution(obs[rows]).distribution.probs.argmax(dim=1)
            right += int((predicted == target[rows]).sum())
    return right / max(1, len(obs))
