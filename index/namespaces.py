"""Tenant namespaces: valid names, and the record keys that keep one namespace's records from another's.

The default namespace is "" and its keys are the bare ids, so stores written before namespaces read
unchanged; any other namespace prefixes its keys with its name and a separator that no id may contain.
"""
from __future__ import annotations

import re

DEFAULT_NAMESPACE = ""
SEPARATOR = "\x1f"  # ASCII unit separator: never in a valid namespace, refused in ids
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")


def validate_namespace(namespace: str) -> str:
    if namespace == DEFAULT_NAMESPACE:
        return namespace
    if not isinstance(namespace, str) or not _NAME.fullmatch(namespace):
        raise ValueError(f"invalid namespace {namespace!r}: use 1-64 letters, digits or _ . : @ -, "
                         "starting with a letter or digit ('' is the default namespace)")
    return namespace


def scoped(namespace: str, name: str) -> str:
    """The record key of `name` (a document or session id) inside `namespace`."""
    validate_namespace(namespace)
    if SEPARATOR in name:
        raise ValueError(f"ids may not contain the control character \\x1f: {name!r}")
    return name if namespace == DEFAULT_NAMESPACE else f"{namespace}{SEPARATOR}{name}"


def unscoped(key: str) -> tuple[str, str]:
    """(namespace, name) of a record key made by `scoped`."""
    namespace, separator, name = key.partition(SEPARATOR)
    return (namespace, name) if separator else (DEFAULT_NAMESPACE, key)


def label(namespace: str, name: str) -> str:
    """How messages show an id: bare in the default namespace, else `namespace/name`."""
    return name if namespace == DEFAULT_NAMESPACE else f"{namespace}/{name}"
