"""``{name}`` placeholders in prompt templates: parsing and checking (stdlib only, safe to import from config)."""

from __future__ import annotations

import string
from collections.abc import Iterable


def placeholder_names(template: str) -> set[str]:
    """Field names used by a ``str.format`` template; raises ValueError on malformed braces."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as err:  # unbalanced braces
        raise ValueError(
            f"malformed template {template!r}: {err} (write a literal brace as {{{{ or }}}})"
        ) from None
    names = set()
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name == "" or not name.isidentifier() or spec or conversion:
            raise ValueError(f"bad placeholder {{{name}}} in template {template!r} (use plain {{name}})")
        names.add(name)
    return names


def check_placeholders(templates: Iterable[str], *, allowed: set[str], required: str | None = None) -> None:
    """Raise ValueError naming the template when it uses an unknown placeholder or lacks ``required``."""
    shown = ", ".join(f"{{{n}}}" for n in sorted(allowed))
    for template in templates:
        names = placeholder_names(template)
        unknown = names - allowed
        if unknown:
            bad = ", ".join(f"{{{n}}}" for n in sorted(unknown))
            raise ValueError(f"unknown placeholder {bad} in template {template!r} (allowed: {shown})")
        if required and required not in names:
            raise ValueError(f"template {template!r} has no {{{required}}} placeholder")
