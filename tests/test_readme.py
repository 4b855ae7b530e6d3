"""The README's quick start is what CI runs."""

import re

from helpers import REPO


def test_readme_has_two_quick_start_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start, re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "python -m bn_lightning fit --config configs/" in commands[0]
    ci_command = re.search(r"^TEST_COMMAND='(.*)'$", (REPO / ".ci" / "run").read_text(), re.M).group(1)
    assert ci_command == commands[1]
