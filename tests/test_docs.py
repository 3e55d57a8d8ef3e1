"""Docs that make promises name the tests that keep them, and README's maps (modules, scripts, the run directory,
the install that CI runs) stay true to the tree and the code."""

import ast
import re
from pathlib import Path

from conftest import REPO

TEST_FILES = {"data": "test_data.py", "di": "test_data_integrity.py", "pr": "test_predict.py",
              "ti": "test_train_input.py", "tr": "test_train.py", "jr": "test_job_recovery.py",
              "cfg": "test_config.py", "ev": "test_evaluate.py", "co": "test_cost.py", "ex": "test_export.py",
              "rm": "test_remote.py", "ck": "test_checkpoint.py", "em": "test_eval_memory.py",
              "bl": "test_baselines.py", "prep": "test_prepare.py",
              "dp": "test_distributed.py"}


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


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index(f"## {title}"):].split("\n## ")[0]


def readme_run_layout() -> set[str]:
    """The top-level names README's run-directory block lists (`eval/<name>/` is `eval`)."""
    block = readme_section("The run directory").split("```")[1]
    return {line.split()[0].split("/")[0] for line in block.splitlines()[2:] if line.startswith("  ") and
            not line.startswith("   ")}


def test_the_readme_run_layout_names_every_path_rundir_names_and_only_those():
    from wellocr.rundir import LOCK_NAME, RunDir

    run = RunDir(Path("run"))
    named = {getattr(run, name).name for name, value in vars(RunDir).items() if isinstance(value, property)}
    expected = named | {LOCK_NAME, "checkpoint-<step>", "README.md"}  # README.md: the run's model card
    assert readme_run_layout() == expected


def test_everything_a_trained_run_leaves_is_in_the_readme_layout(trained_run):
    layout = readme_run_layout()
    left = {"checkpoint-<step>" if p.name.startswith("checkpoint-") else p.name for p in trained_run.iterdir()}
    assert left <= layout, f"README's run directory lacks {sorted(left - layout)}"


def test_the_readme_names_every_script_and_only_those():
    section = readme_section("Where things live")
    scripts = section[section.index("`scripts/`"):section.index("`docs/`")]
    named = set(re.findall(r"`([\w.]+\.(?:sh|py))`", scripts))
    assert named == {p.name for p in (REPO / "scripts").iterdir() if p.is_file()}


def test_ci_runs_the_readme_install_lines_as_written():
    """README's test command is `<install> && <install> && python -m pytest`; .ci/run runs the installs as one
    line, exactly as written, and ends with the test command."""
    block = readme_section("Set-up: two commands").split("```bash")[1].split("```")[0]
    commands = [line for line in block.splitlines() if line.startswith("pip install")]
    assert len(commands) == 2 and all("--index-url https://download.pytorch.org/whl/cpu" in c for c in commands)
    *installs, test = commands[1].split(" && ")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert " && ".join(installs) in ci
    assert ci[-1] == test == "python -m pytest"
    assert commands[0].split(" && ")[0] == installs[0]  # both commands install torch the same way
