"""YAML files the recipes read (sweep specs, the demo's config), refused when too large or when
their aliases expand past a bound (a few nested aliases can mean billions of values)."""
from __future__ import annotations

from pathlib import Path

import yaml

MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000  # YAML values after expanding aliases


def load_yaml(path: Path, what: str = "sweep spec"):
    """A YAML file (`what` it should be, for the messages), refusing one over MAX_SPEC_BYTES or whose aliases expand past MAX_SPEC_NODES values."""
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise ValueError(f"{path} is larger than {MAX_SPEC_BYTES:,} bytes: not a {what}")
    try:
        loader = yaml.SafeLoader(path.read_text())
        try:
            node = loader.get_single_node()
            stack, seen = [node] if node is not None else [], 0
            while stack:  # the composed graph walked as it would be expanded, stopped at the bound
                n = stack.pop()
                seen += 1
                if seen > MAX_SPEC_NODES:
                    raise ValueError(f"{path} expands to more than {MAX_SPEC_NODES:,} values "
                                     f"(nested aliases?): not a {what}")
                if isinstance(n, yaml.MappingNode):
                    stack += [x for kv in n.value for x in kv]
                elif isinstance(n, yaml.SequenceNode):
                    stack += n.value
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid YAML: {str(e)[:200]}") from None
