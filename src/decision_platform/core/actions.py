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


def is_action(value: object) -> bool:
    """Whether a stored or received value is one of the three actions (a bool is not, though Python counts
    it an int): what a row a hand edit or an older version left is checked against."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(ACTION_NAMES)


#: The kinds of model the registry holds, one champion each.
MODEL_KINDS: tuple[str, ...] = ("anomaly", "risk", "policy")
