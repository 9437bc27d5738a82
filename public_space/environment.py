"""A Space's settings, each read from the environment once, beside its default and its meaning.

Each Space's settings module (`front_settings.py`, `back_settings.py`) lists its settings through one `Settings`:
the app reads its constants there, the Space's README table is made from the same list (`Settings.table`, kept
equal by tests/test_settings.py), and `scripts/deploy.py` takes its defaults from it.
Both Spaces carry an identical copy of this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: str  # as the environment would write it; "" for unset
    meaning: str
    kind: str  # "variable" or "secret"


class Settings:
    """The settings of one Space, in the order they are read."""

    def __init__(self) -> None:
        self.listed: list[Setting] = []

    def text(self, name: str, default: str, meaning: str, *, secret: bool = False) -> str:
        """The variable as it is set (surrounding spaces dropped), or `default`."""
        self.listed.append(Setting(name, default, meaning, "secret" if secret else "variable"))
        return os.getenv(name, default).strip()

    def secret(self, name: str, meaning: str) -> str | None:
        """A secret, or None when it is unset or empty."""
        return self.text(name, "", meaning, secret=True) or None

    def count(self, name: str, default: int, meaning: str) -> int:
        """A whole number (an empty variable counts as unset)."""
        value = self.text(name, str(default), meaning) or str(default)
        try:
            return int(value)
        except ValueError:
            raise SystemExit(f"{name} must be a whole number, not {value!r}.") from None

    def number(self, name: str, default: float, meaning: str) -> float:
        """A number (an empty variable counts as unset)."""
        value = self.text(name, f"{default:g}", meaning) or f"{default:g}"
        try:
            return float(value)
        except ValueError:
            raise SystemExit(f"{name} must be a number, not {value!r}.") from None

    def default(self, name: str) -> str:
        """The default of the setting called `name`, as the environment would write it."""
        return next(setting.default for setting in self.listed if setting.name == name)

    def table(self) -> str:
        """The Markdown table of every setting, as the Space's README shows it."""
        rows = ["| Name | Default | Meaning |", "| --- | --- | --- |"]
        for setting in self.listed:
            secret = " (secret)" if setting.kind == "secret" else ""
            default = f"`{setting.default}`" if setting.default else "unset"
            rows.append(f"| `{setting.name}`{secret} | {default} | {setting.meaning} |")
        return "\n".join(rows)
