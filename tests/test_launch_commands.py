"""Every `sky ...` command the docs quote is one SkyPilot accepts, checked with SkyPilot's own code, offline.

Where commands are quoted: README.md and docs/*.md (code blocks and inline code), and the opening comments of
configs/*.yaml and sky/*.yaml (backslash-continued lines joined). Each command is
- parsed by SkyPilot's CLI itself: the click command objects of `sky.client.cli.command` (`make_context`, which
  also runs the option callbacks: `--secret NAME` copies NAME from the shell and fails when it is not set there);
- for `sky launch` / `sky jobs launch` of a task file, turned into the task as the CLI does it
  (`_merge_cli_and_file_vars`, `_make_task_or_dag_from_entrypoint_with_overrides`, which refuses an env declared
  with no value), and its secrets resolved as `sky.execution` does before launching (`_resolve_managed_secrets`,
  which refuses a declared secret without a value: "No value available for secret(s): ...").
The shell has what a user following docs/RUNPOD.md has: WANDB_API_KEY, HF_TOKEN and the bucket's AWS keys exported.
Placeholders (`<id>`, `<run>`, ...) are replaced with example values.
"""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO

USER_SHELL = {"WANDB_API_KEY": "0" * 8, "HF_TOKEN": "hf_example", "AWS_ACCESS_KEY_ID": "example-key-id",
              "AWS_SECRET_ACCESS_KEY": "example-secret"}
PLACEHOLDERS = {"id": "1"}  # anything else in <...> becomes "example"
SKY_COMMAND = re.compile(r"(?<![\w./-])sky (?=[a-z-])")
COMMAND_END = re.compile(r"\s+#\s|;|\s\(|`")


# ---------------------------------------------------------------- finding the quoted commands


def join_continuations(lines: list[str]) -> list[str]:
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
        else:
            joined.append(pending + line.strip())
            pending = ""
    return joined + ([pending] if pending else [])


def commands_in(text: str) -> list[str]:
    """The `sky ...` commands in a line of code or comment: each runs to `;`, ` (`, ` # ` or the end."""
    found = []
    for match in SKY_COMMAND.finditer(text):
        rest = text[match.start():]
        end = COMMAND_END.search(rest)
        command = (rest[:end.start()] if end else rest).strip().rstrip(".,:")
        found.append(re.sub(r"\s+", " ", command))
    return found


def header_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:])
    return lines


def markdown_code(path: Path) -> list[str]:
    """Lines of fenced code blocks (continuations joined) and inline code spans."""
    code, prose, fenced = [], [], None
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            if fenced is None:
                fenced = []
            else:
                code += join_continuations(fenced)
                fenced = None
        elif fenced is not None:
            fenced.append(line)
        else:
            prose.append(line)
    spans = re.findall(r"`([^`\n]+)`", "\n".join(prose))
    return code + spans


def quoted_commands() -> list[tuple[str, str]]:
    """(where, command) for every sky command quoted in the docs and file headers."""
    sources: list[tuple[str, list[str]]] = [("README.md", markdown_code(REPO / "README.md"))]
    sources += [(f"docs/{p.name}", markdown_code(p)) for p in sorted((REPO / "docs").glob("*.md"))]
    sources += [(f"{p.parent.name}/{p.name}", join_continuations(header_lines(p)))
                for folder in ("configs", "sky") for p in sorted((REPO / folder).glob("*.yaml"))]
    return [(where, command) for where, lines in sources for line in lines for command in commands_in(line)]


COMMANDS = quoted_commands()


def fill_placeholders(command: str) -> str:
    return re.sub(r"<([^<>]+)>", lambda m: PLACEHOLDERS.get(m.group(1), "example"), command)


# ---------------------------------------------------------------- SkyPilot's own checks


@pytest.fixture
def sky_cli(tmp_path, monkeypatch):
    """SkyPilot's CLI with a throwaway HOME and empty configs, run from the repo root with a user's shell."""
    home = tmp_path / "home"
    home.mkdir()
    empty = tmp_path / "empty-config.yaml"
    empty.write_text("{}\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SKYPILOT_GLOBAL_CONFIG", str(empty))
    monkeypatch.setenv("SKYPILOT_PROJECT_CONFIG", str(empty))
    monkeypatch.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    for name in [n for n in __import__("os").environ if n.startswith("WELLOCR_")]:
        monkeypatch.delenv(name)
    for name, value in USER_SHELL.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)
    import sky
    from sky.client.cli import command

    sky.skypilot_config.reload_config()
    return command


def parse(command_module, argv: list[str]):
    """(click command, context) for `sky <argv>`, parsed by SkyPilot's click objects; raises click errors."""
    import click

    cmd, ctx, name, rest = command_module.cli, None, "sky", argv
    while True:
        # A command named without arguments ("every `sky jobs launch`") is a reference to it: it must exist.
        ctx = cmd.make_context(name, rest, parent=ctx, resilient_parsing=not rest)
        if not isinstance(cmd, click.Group):
            return cmd, ctx
        rest = [*(getattr(ctx, "_protected_args", None) or ctx.protected_args), *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)


def launch_dag(command_module, ctx):
    """The task DAG `sky launch` / `sky jobs launch` would submit, built by the CLI's own functions, with its
    secrets resolved as `sky.execution` resolves them before a launch."""
    from sky import dag as dag_lib
    from sky import execution

    params = dict(ctx.params)
    params["env"] = command_module._merge_cli_and_file_vars([params.get("env_file")], params["env"])
    params["secret"] = command_module._merge_cli_and_file_vars([params.get("env_file"), params.get("secret_file")],
                                                               params["secret"])
    params["cloud"], params["region"], params["zone"] = command_module._handle_infra_cloud_region_zone_options(
        params.get("infra"), params.get("cloud"), params.get("region"), params.get("zone"))
    make = command_module._make_task_or_dag_from_entrypoint_with_overrides
    task_or_dag = make(**{k: v for k, v in params.items() if k in inspect.signature(make).parameters})
    if isinstance(task_or_dag, dag_lib.Dag):
        dag = task_or_dag
    else:
        with dag_lib.Dag() as dag:
            dag.add(task_or_dag)
    execution._resolve_managed_secrets(dag)
    return dag


def check(command_module, command: str):
    """Raises what SkyPilot would raise for `command`; returns the launch DAG for a launch of a task file."""
    argv = shlex.split(fill_placeholders(command))
    assert argv[0] == "sky", command
    cmd, ctx = parse(command_module, argv[1:])
    entrypoint = ctx.params.get("entrypoint") or ()
    if cmd.name == "launch" and len(entrypoint) == 1 and entrypoint[0].endswith(".yaml"):
        return launch_dag(command_module, ctx)
    return None


# ---------------------------------------------------------------- the quoted commands


def test_the_quoted_commands_are_found():
    where = {w for w, _ in COMMANDS}
    assert {"README.md", "docs/RUNPOD.md", "docs/CLOUDS.md", "docs/COST.md", "configs/train_r16.yaml",
            "sky/train_r16.yaml", "sky/train_r16_runpod.yaml", "sky/train_r16_volume.yaml", "sky/quick_val.yaml",
            "sky/checkpoint_volume.yaml"} <= where
    launches = [c for _, c in COMMANDS if c.startswith("sky jobs launch sky/train_r16.yaml")]
    assert len(launches) >= 4 and any("\\" not in c and "--secret AWS_SECRET_ACCESS_KEY" in c for c in launches)
    assert ("sky/train_r16.yaml", "sky jobs logs --controller <id>") in COMMANDS
    assert ("sky/quick_val.yaml", "sky down wellocr-smoke") in COMMANDS


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_skypilot_accepts_the_quoted_command(sky_cli, where, command):
    dag = check(sky_cli, command)
    if dag is not None:
        assert all(not t.managed_secret_refs for t in dag.tasks)


def test_the_object_storage_launch_gets_the_remote_and_every_secret(sky_cli):
    for where in ("docs/RUNPOD.md", "docs/CLOUDS.md"):
        command = next(c for w, c in COMMANDS if w == where and c.startswith("sky jobs launch sky/train_r16"))
        (task,) = check(sky_cli, command).tasks
        assert task.envs["WELLOCR_REMOTE"] == "s3://my-bucket/wellocr"
        assert {k: v.get_secret_value() for k, v in task.secrets.items()} == USER_SHELL


# ---------------------------------------------------------------- the checks catch broken commands


def test_a_launch_without_the_remote_is_refused(sky_cli):
    with pytest.raises(ValueError, match="Environment variable 'WELLOCR_REMOTE' is None"):
        check(sky_cli, "sky jobs launch sky/train_r16.yaml --secret WANDB_API_KEY --secret HF_TOKEN "
                       "--secret AWS_ACCESS_KEY_ID --secret AWS_SECRET_ACCESS_KEY")


def test_a_launch_missing_declared_secrets_is_refused(sky_cli):
    with pytest.raises(RuntimeError, match="No value available for secret\\(s\\): AWS_ACCESS_KEY_ID, "
                                           "AWS_SECRET_ACCESS_KEY"):
        check(sky_cli, "sky jobs launch sky/train_r16.yaml --env WELLOCR_REMOTE=s3://b/p --secret WANDB_API_KEY "
                       "--secret HF_TOKEN")


def test_a_secret_not_in_the_shell_is_refused(sky_cli, monkeypatch):
    import click

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(click.UsageError, match="HF_TOKEN is not set in local environment"):
        check(sky_cli, "sky jobs launch sky/train_r16_volume.yaml --secret WANDB_API_KEY --secret HF_TOKEN")


def test_an_unknown_option_or_command_is_refused(sky_cli):
    import click

    with pytest.raises(click.NoSuchOption):
        check(sky_cli, "sky jobs launch sky/train_r16_volume.yaml --secrets WANDB_API_KEY")
    with pytest.raises(click.UsageError, match="No such command"):
        check(sky_cli, "sky job queue")


def test_commands_are_found_in_prose_code_and_continued_lines():
    assert commands_in("Monitor: sky jobs queue; sky jobs logs <id> (re-attach); or sky down x.") == [
        "sky jobs queue", "sky jobs logs <id>", "sky down x"]
    assert commands_in("sky jobs cancel <id>         # or: sky jobs cancel -n wellocr-r16") == [
        "sky jobs cancel <id>", "sky jobs cancel -n wellocr-r16"]
    assert commands_in("see sky/train_r16.yaml and `sky-jobs-controller-1`") == []
    assert join_continuations(["  sky jobs launch a.yaml \\", "    --env X=1 \\", "  --secret Y", "next"]) == [
        "sky jobs launch a.yaml --env X=1 --secret Y", "next"]


def test_no_doc_installs_wellocr_from_the_package_index():
    """wellocr is not on the package index: the install is from the clone (`pip install -e '.[cloud]'`)."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    quoted = [f"{p.name}: {m.group(0)}" for p in docs
              for m in re.finditer(r"pip install ['\"]?wellocr\b[^`\n]*", p.read_text())]
    assert quoted == []
