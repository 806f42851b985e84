"""The three actions and the model kinds: the vocabulary every floor shares, defined once."""

from __future__ import annotations

import enum


class Action(enum.IntEnum):
    """What a decision does. The integers are the API's and the database's (``action`` 0 / 1 / 2)."""

    ALLOW = 0
    THROTTLE = 1  # step-up / rate-limit / slow down
    BLOCK = 2


ALLOW, THROTTLE, BLOCK = Action.ALLOW, Action.THROTTLE, Action.BLOCK

#: ``ACTION_NAMES[action]``: the API's ``action_name``, the metrics' ``action`` label, rewards.yaml's keys.
ACTION_NAMES: tuple[str, ...] = tuple(action.name.lower() for action in Action)

#: The kinds of model the registry holds, one champion each.
MODEL_KINDS: tuple[str, ...] = ("anomaly", "risk", "policy")
