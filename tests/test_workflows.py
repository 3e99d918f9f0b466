"""The GitHub workflows pass actionlint, and the book's published address follows from _config.yml.

actionlint (a static checker for GitHub Actions: YAML schema, expressions, job dependencies, action
inputs, shell scripts through shellcheck when it is installed) comes as a binary inside a PyPI wheel,
pinned in constraints.txt, so a broken workflow fails ``make test`` before it reaches GitHub.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def _actionlint():
    exe = Path(sys.executable).parent / "actionlint"
    found = str(exe) if exe.exists() else shutil.which("actionlint")
    assert found, "actionlint is missing: it is installed by `make env` (requirements.txt)"
    return found


def _lint(*paths):
    return subprocess.run([_actionlint(), "-no-color", *map(str, paths)], capture_output=True, text=True, cwd=ROOT)


def test_workflows_exist():
    names = {path.name for path in WORKFLOWS}
    assert {"ci.yml", "deploy.yml"} <= names, names


def test_actionlint_passes():
    run = _lint(*WORKFLOWS)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("mistake", [
    ("permissions:\n  contents: read\n  pages: write\n", "permissions:\n  contents: read\n  pagez: write\n"),
    ("needs: build", "needs: biuld"),
    ("steps.deployment.outputs.page_url", "steps.deployment.outputs.page_url }} ${{ matrix.nope"),
])
def test_actionlint_catches_a_broken_workflow(tmp_path, mistake):
    """The check can fail: a misspelt permission, a missing job and an unknown context are each reported."""
    old, new = mistake
    text = (ROOT / ".github" / "workflows" / "deploy.yml").read_text()
    assert old in text
    broken = tmp_path / ".github" / "workflows" / "deploy.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new))
    run = _lint(broken)
    assert run.returncode != 0 and "deploy.yml" in run.stdout, run.stdout + run.stderr


def test_ci_runs_ci_run_and_deploy_publishes_pages():
    ci = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    deploy = yaml.safe_load((ROOT / ".github" / "workflows" / "deploy.yml").read_text())
    on_ci = ci[True] if True in ci else ci["on"]                     # YAML 1.1 reads the key `on` as True
    assert "push" in on_ci and "pull_request" in on_ci
    assert any(".ci/run" in step.get("run", "") for job in ci["jobs"].values() for step in job["steps"])
    on_deploy = deploy[True] if True in deploy else deploy["on"]
    assert on_deploy["push"]["branches"] == [CONFIG["repository"]["branch"]]
    assert deploy["permissions"]["pages"] == "write" and deploy["permissions"]["id-token"] == "write"
    assert deploy["concurrency"]["group"]
    uses = [step.get("uses", "") for job in deploy["jobs"].values() for step in job.get("steps", [])]
    assert any(u.startswith("actions/upload-pages-artifact@") for u in uses)
    assert any(u.startswith("actions/deploy-pages@") for u in uses)
    runs = " ".join(step.get("run", "") for job in deploy["jobs"].values() for step in job.get("steps", []))
    assert "make book" in runs and "make pdf" in runs
    # every action is pinned to a full commit (40 hex digits), with the tag in a comment
    for path in WORKFLOWS:
        for ref in re.findall(r"uses:\s*([\w.-]+/[\w.-]+)@(\S+)", path.read_text()):
            assert re.fullmatch(r"[0-9a-f]{40}", ref[1]), f"{path.name}: {ref[0]}@{ref[1]} is not pinned to a commit"


def pages_address():
    """https://github.com/OWNER/REPO is published by GitHub Pages at https://OWNER.github.io/REPO/."""
    owner, repo = CONFIG["repository"]["url"].rstrip("/").removeprefix("https://github.com/").split("/")
    return f"https://{owner}.github.io/{repo}/"


def test_readme_and_front_page_give_the_pages_address():
    readme, intro = (ROOT / "README.md").read_text(), (ROOT / "book" / "intro.md").read_text()
    address = pages_address()
    assert f"<{address}>" in readme
    pdf = address + "attention-gradients.pdf"
    assert pdf in readme and f"({pdf})" in intro
    owner_repo = CONFIG["repository"]["url"].removeprefix("https://github.com/")
    assert f"https://github.com/{owner_repo}/actions/workflows/ci.yml/badge.svg" in readme
    # the PDF's name is the LaTeX target of _config.yml, and the deploy workflow copies that file
    assert CONFIG["latex"]["latex_documents"]["targetname"] == "attention-gradients.tex"
    assert "_build/latex/attention-gradients.pdf" in (ROOT / ".github" / "workflows" / "deploy.yml").read_text()
