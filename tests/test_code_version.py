"""A stage's code version changes with the code it runs, and only with it: docstrings, comments and helpers the stage
does not import leave it (and so the stage's cache) as it was."""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("train_cam", "infer_cams", "eval_cam", "make_pseudo_labels", "eval_seg")
PROBE = ("import json; from flows.code_version import code_version; "
         f"print(json.dumps({{s: code_version('tasks.' + s) for s in {STAGES!r}}}))")


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    for package in ("flows", "tasks", "models", "storage"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def versions(project: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=project, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_docstrings_and_comments_do_not_count(project):
    before = versions(project)
    edit(project / "tasks" / "engine" / "resume.py", '"""', '"""Reworded. ')
    edit(project / "tasks" / "train_cam.py", '"""', '"""Reworded. ')
    edit(project / "tasks" / "train_cam.py", "log = logging.getLogger(__name__)",
         "log = logging.getLogger(__name__)  # a new comment\n# and a comment line")
    assert versions(project) == before


def test_code_counts_for_the_stages_that_run_it(project):
    before = versions(project)
    edit(project / "tasks" / "train_cam.py", "log = logging.getLogger(__name__)",
         "log = logging.getLogger(__name__ + '.edited')")
    after = versions(project)
    assert after["train_cam"] != before["train_cam"]
    assert {s: after[s] for s in STAGES if s != "train_cam"} == {s: before[s] for s in STAGES if s != "train_cam"}


def test_a_shared_helper_counts_only_where_imported(project):
    before = versions(project)
    edit(project / "tasks" / "engine" / "resume.py", "log = logging.getLogger(__name__)",
         "log = logging.getLogger(__name__ + '.edited')")
    after = versions(project)
    assert after["train_cam"] != before["train_cam"]
    assert after["eval_cam"] == before["eval_cam"] and after["infer_cams"] == before["infer_cams"]


def test_function_and_class_docstrings_do_not_count(tmp_path):
    from flows.code_version import code_tree

    one, two, three = tmp_path / "one.py", tmp_path / "two.py", tmp_path / "three.py"
    one.write_text('class A:\n    """A."""\n    def f(self):\n        """F."""\n        return 1\n')
    two.write_text('class A:\n    """Another."""\n\n    def f(self):  # one\n        """G."""\n        return 1\n')
    three.write_text('class A:\n    def f(self):\n        return 2\n')
    assert ast.dump(code_tree(one)) == ast.dump(code_tree(two)) != ast.dump(code_tree(three))
