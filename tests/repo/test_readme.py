"""The README's configuration reference lists exactly the variables the config classes declare."""

from __future__ import annotations

import re
from pathlib import Path

from stream.config import env_markdown, known_env_vars
from workers.cli import all_config_classes

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_declared_variable() -> None:
    text = README.read_text()
    table = set(re.findall(r"^\| `(ZEROCF_[A-Z0-9_]+)` \|", text, flags=re.M))
    declared = known_env_vars(*all_config_classes())
    assert table == declared, f"README missing {sorted(declared - table)}, extra {sorted(table - declared)}"


def test_readme_table_is_the_generated_reference() -> None:
    """Defaults, flags and help in the README are the code's: regenerate with `zerocf config --markdown`."""
    assert env_markdown(*all_config_classes()) in README.read_text(), "run `zerocf config --markdown` and paste it"


def test_readme_names_the_two_setup_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (README.parent / ".ci" / "run").read_text()
