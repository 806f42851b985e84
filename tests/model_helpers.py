"""Test helpers: policies that always propose one action, corrupt artifacts, and the risk attributions
computed the plain way."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from decision_platform.models.baseline_policy import Policy, load_policy
from decision_platform.models.policy import ACTOR, PolicyModel
from decision_platform.models.registry import ModelRegistry
from decision_platform.models.risk import RiskModel


def fixed_policy(template: Policy, action: int) -> PolicyModel:
    """An actor with ``template``'s state (same state names, same scaler) that proposes ``action`` with
    probability ~1 whatever the state. ``template`` may be a PPO actor or a baseline served as the policy."""
    head_b = np.full(3, -20.0)
    head_b[action] = 20.0
    # A PPO template may read more than its state (the Bayes step values): the same inputs, so a copy of
    # its ppo.zip beside this actor (register_policy) still observes what the actor reads.
    spec = template.input_spec if isinstance(template, PolicyModel) else {}
    width = len(template.state_names) + (3 if spec.get("step_values") is not None else 0)
    return PolicyModel(
        [np.zeros((width, 3))],
        [head_b],
        "Tanh",
        template.state_names,
        template.scaler_mean,
        template.scaler_std,
        **spec,
    )


def nan_policy(template: Policy) -> PolicyModel:
    """An actor like :func:`fixed_policy` whose weights are NaN (corrupted before they were hashed): it
    loads, its hash matches, and every probability it gives is NaN."""
    actor = fixed_policy(template, 0)
    return PolicyModel(
        [np.full_like(w, np.nan) for w in actor.weights],
        [np.full_like(b, np.nan) for b in actor.biases],
        "Tanh",
        template.state_names,
        template.scaler_mean,
        template.scaler_std,
        **actor.input_spec,  # the template actor's inputs (the Bayes step values, if it reads them)
    )


def register_policy(
    registry: ModelRegistry, action: int, status: str = "challenger", nan: bool = False
) -> str:
    """Register a copy of the champion policy's artifact (features.yaml, ppo.zip...) whose actor always
    proposes ``action`` (``nan``: gives NaN instead); every call registers a distinct version."""
    source = registry.verified_path(registry.champion("policy"))  # type: ignore[arg-type]
    template = load_policy(source)
    actor = nan_policy(template) if nan else fixed_policy(template, action)

    def write(directory: Path) -> None:
        for path in source.iterdir():
            if path.is_file():
                shutil.copyfile(path, directory / path.name)
        actor.save(directory)
        (directory / "test-origin.txt").write_text(uuid.uuid4().hex)  # a distinct hash, hence version

    return registry.register(
        "policy", write, {"source": "test", "events": 0}, {"always": float(action)}, status
    )


def corrupt(registry: ModelRegistry, version: str) -> None:
    """Truncate the actor file of ``version``: its hash no longer matches."""
    record = registry.repository.get_model(version)
    assert record is not None
    actor = registry.model_dir / record["artifact_path"] / ACTOR
    actor.write_bytes(actor.read_bytes()[:100])


def deeplift_in_torch(model: RiskModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(risk, attributions) of ``model.explain`` the plain way: each torch net in float64, every ReLU
    replaced by a unit whose gradient is DeepLIFT's multiplier ``(relu(z) - relu(z_ref)) / (z - z_ref)``,
    autograd for the chain, and the gradient times the encoded input's move from the reference, summed
    per input. Shares only the encoder and the reference with the numpy path under test."""
    numeric = torch.from_numpy(model.encoder.encode_numeric(x))
    categories = torch.from_numpy(model.encoder.categories(x))
    logit = torch.zeros(len(x), dtype=torch.float64)
    columns = np.zeros((len(x), len(model._groups)))
    for net, member in zip(model.nets, model._members, strict=True):
        net = net.double()
        encoded = net.embed(numeric, categories).detach().requires_grad_(True)
        h, h_ref = encoded, torch.from_numpy(member.reference)[None, :]
        for layer in net.net:
            if isinstance(layer, nn.Linear):
                h, h_ref = layer(h), layer(h_ref)
            elif isinstance(layer, nn.ReLU):
                moved = h - h_ref
                out, out_ref = torch.relu(h), torch.relu(h_ref)
                ratio = torch.where(moved != 0, (out - out_ref) / moved, (h > 0).double()).detach()
                h, h_ref = out.detach() + ratio * (h - h.detach()), out_ref
        raw = h.squeeze(-1)
        raw.sum().backward()
        logit += raw.detach()
        columns += encoded.grad.numpy() * (encoded.detach().numpy() - member.reference)
    scale = 1.0 / (len(model.nets) * model.temperature)
    attributions = np.zeros((len(x), len(model.input_names)))
    np.add.at(attributions.T, model._groups, (columns * scale).T)
    return torch.sigmoid(logit * scale).numpy(), attributions
