"""YAML as the configuration files are read: a key given twice in one mapping is an error.

PyYAML keeps the last of two equal keys without a word, so a second ``rules:`` section (a paste, a merge
gone wrong) dropped every rule of the first, and a second ``when:`` replaced a rule's condition -- the
platform then served without them. YAML says the keys of a mapping are unique; this loader holds to it.
A ``<<`` merge is no duplicate: the keys written beside it override the merged ones, as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

_MERGE = "tag:yaml.org,2002:merge"
#: The most a configuration file is read (thousands of rules are well under it): /dev/zero, or a file of
#: gigabytes given by mistake, was read whole -- the command hung, filling memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if seen is not key_node.start_mark:
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing a key given twice in one mapping (a ``yaml.YAMLError`` whose
    ``problem`` names the key and its first line, ``problem_mark`` the second)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_config_text(path: Path) -> str:
    """The UTF-8 text of a configuration file; ValueError when it is larger than :data:`MAX_CONFIG_BYTES`
    (OSError, UnicodeDecodeError as reading raises them)."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES >> 20} MB: not a configuration file")
    return data.decode("utf-8")


def load_yaml_file(path: Path) -> Any:
    """:func:`load_yaml` of :func:`read_config_text`."""
    return load_yaml(read_config_text(path))
