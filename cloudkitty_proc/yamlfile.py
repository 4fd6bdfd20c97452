"""Reading the operator's YAML files (metrics.yml, rating rules) safely.

One loader for every YAML file an operator writes, so that each gets the
same guarantees and the same one-line errors naming the file and line:

* the text must be UTF-8 (the error names the offset of the first bad byte);
* a key written twice in one mapping is refused (YAML's last-one-wins would
  silently drop the first definition of a service or a metric);
* aliases may not expand the document beyond ``MAX_NODES`` values (a 1 KB
  "billion laughs" file expands to 10^9 values: validating or printing it
  took minutes and gigabytes);
* values quoted in error messages are cut to an excerpt (``excerpt``).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from cloudkitty_proc.exceptions import ConfigError

#: the most values (scalars, sequences, mappings) a document may hold once
#: its aliases are expanded
MAX_NODES = 100_000
#: the most characters of a value quoted in an error message
EXCERPT = 80


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """``repr(value)``, cut to ``limit`` characters (with the full length)."""
    if isinstance(value, (dict, list, tuple, set)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _value in node.value:  # as written: before merge keys
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` may be overridden by the keys written here
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: SafeLoader refuses it below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {excerpt(key)} written twice (first on line {first})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """How many values ``root`` holds with every alias expanded, computed on
    the composed graph (an alias is the same node object), in time linear in
    the number of distinct nodes."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = ([c for pair in node.value for c in pair]
                    if isinstance(node, yaml.MappingNode) else list(node.value))
        if done:
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 0) for c in children)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def loads(text: str | bytes, path: str) -> Any:
    """Parse one YAML document; ConfigError (one line naming ``path``) when
    it is not UTF-8, not YAML, has a duplicate key or too many aliases."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{text[exc.start]:02x} at "
                              f"offset {exc.start})") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_NODES:
            raise ConfigError(f"{path}: YAML aliases expand the document to {size} values "
                              f"(at most {MAX_NODES}); write the values out instead")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML: {_where(exc)}{problem}") from None
    finally:
        loader.dispose()


def load(path: str | os.PathLike, *, what: str = "file", hint: str = "") -> Any:
    """Read and parse the YAML file ``path``; ConfigError naming it when it
    is missing, unreadable or not acceptable (see ``loads``). ``what`` names
    the file in the errors ("metrics file"), ``hint`` says which option sets it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        if hint:
            raise ConfigError(f"{path}: {what} not found ({hint})") from None
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: {what} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    return loads(data, path)
