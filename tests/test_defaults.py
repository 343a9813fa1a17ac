"""Every config key's default, recorded in tests/defaults.tsv. A default is part of every run that does not set its
key: changing one changes those runs' numbers and every recorded result measured under the old value. That once
happened unseen: the typed configuration (732bb8b) gave multi-expert models cosine heads (s = 30) by default where
they had linear ones, and GBME's row of the federated table fell from 38.8 to 17.5 % without a word
(docs/results.md). A changed, new or removed default fails here until the file is rewritten in the same commit,
whose message then says which runs it changes:

    .venv/bin/python tests/test_defaults.py > tests/defaults.tsv
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RECORDED = Path(__file__).with_name("defaults.tsv")


def current_defaults() -> list[str]:
    """One line per key of every built-in part: ``key<TAB>[part kind and name]<TAB>default`` (the default as
    ``--keys`` prints it)."""
    import clients  # noqa: F401  (the built-in plug-ins register their parts on import)
    import strategies  # noqa: F401
    from fedlt.config import key_rows

    lines = []
    for key, _, default, description in key_rows():
        part = description[:description.index("]") + 1] if description.startswith("[") else ""
        lines.append(f"{key}\t{part}\t{default}")
    return lines


def differences(recorded: list[str], now: list[str]) -> list[str]:
    """``- line`` for each recorded line not in ``now``, ``+ line`` for each new one."""
    return [f"- {line}" for line in recorded if line not in now] + [f"+ {line}" for line in now if line not in recorded]


def test_every_default_is_the_recorded_one() -> None:
    # in a fresh interpreter: other tests register plug-in parts of their own into this one's registries
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    now = done.stdout.splitlines()
    assert len(set(now)) == len(now), "two keys of one part print alike: the recorded file cannot tell them apart"
    changed = differences(RECORDED.read_text(encoding="utf-8").splitlines(), now)
    assert not changed, ("config defaults differ from tests/defaults.tsv (- recorded, + now). A default changes "
                         "every run that does not set its key: if meant, rewrite the file in the same commit and say "
                         "in its message which runs and recorded results it changes:\n"
                         "    .venv/bin/python tests/test_defaults.py > tests/defaults.tsv\n" + "\n".join(changed))


def test_the_check_sees_a_changed_default(monkeypatch) -> None:
    """The comparison reads the live schema: 732bb8b's head default undone shows as the expert models'
    classifier lines gone (a part lists only the keys it sets apart from its section's own defaults)."""
    from fedlt.models.experts import ExpertOptions

    before = current_defaults()
    monkeypatch.setattr(ExpertOptions.model_fields["classifier"], "default", "linear")
    changed = differences(before, current_defaults())
    assert "- model.classifier\t[model small_cnn_experts]\t'cosine'" in changed
    assert all(line.startswith("- model.classifier\t[model ") for line in changed)


if __name__ == "__main__":
    print("\n".join(current_defaults()))
