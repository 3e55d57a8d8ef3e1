"""Docs that make promises name the tests that keep them: every test a docs table names must exist."""

import ast
import re

from conftest import REPO

TEST_FILES = {"data": "test_data.py", "di": "test_data_integrity.py", "pr": "test_predict.py",
              "ti": "test_train_input.py", "tr": "test_train.py", "jr": "test_job_recovery.py",
              "cfg": "test_config.py", "ev": "test_evaluate.py", "co": "test_cost.py", "ex": "test_export.py",
              "rm": "test_remote.py", "ck": "test_checkpoint.py", "em": "test_eval_memory.py",
              "bl": "test_baselines.py"}


def test_every_bad_input_row_names_a_test_that_exists():
    text = (REPO / "docs" / "BAD_INPUT.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| bad input")
            and not line.startswith("|---")]
    assert len(rows) >= 40
    defined = {prefix: {node.name for node in ast.walk(ast.parse((REPO / "tests" / name).read_text()))
                        if isinstance(node, ast.FunctionDef)} for prefix, name in TEST_FILES.items()}
    for row in rows:
        named = re.findall(r"\b([a-z]+)::(test_\w+)", row.rsplit("|", 2)[-2])
        assert named, f"no test named in: {row}"
        for prefix, test in named:
            assert test in defined[prefix], f"{TEST_FILES[prefix]} has no {test} (docs/BAD_INPUT.md: {row[:60]})"


def test_the_readme_module_map_names_every_module_and_only_those():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Where things live"):].split("\n## ")[0]
    package = section[section.index("`wellocr/`"):section.index("`configs/`")]
    named = set(re.findall(r"`([a-z_]+)`", package)) - {"main"}
    modules = {p.stem for p in (REPO / "wellocr").glob("*.py") if p.stem != "__init__"}
    assert named == modules, f"README lacks {sorted(modules - named)}; names missing {sorted(named - modules)}"
