"""The README's commands are what a user runs and what CI runs."""

import re

from helpers import REPO


def section(readme: str, title: str) -> list[str]:
    """The bash blocks of a README section."""
    return re.findall(r"```bash\n(.*?)\n```", readme.split(f"## {title}", 1)[1].split("\n## ", 1)[0], re.S)


def test_the_quick_start_trains_a_run_and_ci_runs_the_readmes_test_command():
    readme = (REPO / "README.md").read_text()
    assert any("python -m bn_lightning fit --config configs/" in command for command in section(readme, "Quick start"))
    tests = section(readme, "Tests")
    assert len(tests) == 1 and "\n" not in tests[0]
    ci_command = re.search(r"^TEST_COMMAND='(.*)'$", (REPO / ".ci" / "run").read_text(), re.M).group(1)
    assert ci_command == tests[0]
