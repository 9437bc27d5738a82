"""One source per fact: each setting's default is defined once (each Space's settings.py), the READMEs' tables are
made from it, and what both Spaces must agree on (the choices) is one file copied into both."""

from __future__ import annotations

import subprocess
import sys

import pytest
import settings_tables
from conftest import ROOT

SPACES = tuple(settings_tables.SPACES)


@pytest.mark.parametrize("module", ["choices.py", "environment.py"])
def test_both_spaces_carry_the_same_copy(module):
    assert (ROOT / "private_space" / module).read_bytes() == (ROOT / "public_space" / module).read_bytes(), (
        f"copy private_space/{module} to public_space/ (or the other way round): both Spaces deploy it"
    )


@pytest.mark.parametrize("space", SPACES)
def test_each_readme_table_is_the_one_its_settings_make(space):
    readme = (ROOT / space / "README.md").read_text()
    table = settings_tables.settings_of(space).SETTINGS.table()
    assert f"{settings_tables.BEGIN}\n{table}\n{settings_tables.END}" in readme, (
        "run python scripts/settings_tables.py"
    )


@pytest.mark.parametrize("space", SPACES)
def test_no_module_of_a_space_reads_the_environment_but_its_settings(space):
    readers = [
        path.name
        for path in (ROOT / space).glob("*.py")
        if path.name not in ("environment.py", "sign_in.py")
        and "os.getenv(" in path.read_text()  # sign_in: Spaces' own
    ]
    assert readers == [], "a setting read outside settings.py has no row in the README's table"


def test_a_setting_that_is_not_a_number_stops_the_app_with_a_sentence():
    code = "import sys; sys.path.insert(0, 'public_space'); import front_settings"
    env = {"PATH": "/usr/bin:/bin", "MAX_SIDE": "big"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert done.stderr.strip().endswith("MAX_SIDE must be a whole number, not 'big'.")
