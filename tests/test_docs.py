"""The pages of figures are what docs/make_pages.py writes from the committed results, and the links between
the docs lead somewhere."""

import re
import subprocess
import sys

from helpers import REPO


def test_the_generated_pages_are_up_to_date():
    result = subprocess.run([sys.executable, "docs/make_pages.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_file():
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "notebooks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to {target}, which is not there"


def test_the_readme_is_for_a_first_read():
    assert len((REPO / "README.md").read_text().splitlines()) <= 210


def test_the_results_page_has_a_section_for_each_committed_results_folder_and_no_other():
    """A comparison still running leaves run folders (ignored by git) under results/: not a section."""
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True, check=True)
    folders = {path.split("/")[1] for path in tracked.stdout.split() if path.count("/") >= 2}
    headings = set(re.findall(r"^## (\S+)$", (REPO / "docs" / "results.md").read_text(), re.M))
    assert headings == folders
