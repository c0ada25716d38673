"""The `outbound` command as a user runs it (real subprocesses of the installed script):
`--version`, help for every command and option, `outbound config` (secrets masked,
fits 80 columns, `--json`, a bad value reported) and `outbound bench --list`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import outbound
from outbound import Config
from outbound.benchmarks.suite import SCENARIOS, run_suite
from outbound.cli import build_parser
from outbound.config_command import masked

OUTBOUND = Path(sys.executable).parent / "outbound"  # the console script the install made

# Secrets a user might set: none of them may be printed.
SECRETS = {
    "OUTBOUND_API_TOKEN": "tok-4f1b9e-api",
    "OUTBOUND_S3_SECRET_KEY": "s3-secret-77aa",
    "OUTBOUND_DATABASE_URL": "postgresql://app:pg-pass-93@127.0.0.1:5432/orders",
    "OUTBOUND_SMTP_URL": "smtp://mailer:smtp-pass-12@127.0.0.1:2525",
    "OUTBOUND_JOURNAL": "nats://nats-token-55@127.0.0.1:4222,nats://u:nats-pass-66@127.0.0.1:4223",
}
SECRET_PARTS = ["tok-4f1b9e-api", "s3-secret-77aa", "pg-pass-93", "smtp-pass-12"]
SECRET_PARTS += ["nats-token-55", "nats-pass-66"]


def outbound_command(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # Only this test's OUTBOUND_* variables: the runner's own must not change what is shown.
    base = {key: value for key, value in os.environ.items() if not key.startswith("OUTBOUND_")}
    return subprocess.run(
        [str(OUTBOUND), *args],
        env={**base, "COLUMNS": "80", **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version_prints_the_installed_version() -> None:
    answer = outbound_command("--version")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == f"outbound {outbound.__version__}"


def test_every_command_and_option_has_help_text() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) >= {"demo", "serve", "replay", "bench", "config"}
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    for name, command in commands.choices.items():
        assert helps.get(name), f"`outbound -h` has no line for {name}"
        assert command.description, f"`outbound {name} -h` has no description"
        for action in command._actions:
            assert action.help, f"outbound {name} {action.option_strings} has no help text"
    top = outbound_command("-h")
    assert top.returncode == 0
    for name in commands.choices:
        assert f"\n    {name} " in top.stdout, top.stdout  # listed with its one-line help
    assert "outbound config" in top.stdout and "examples:" in top.stdout
    for name in commands.choices:
        shown = outbound_command(name, "-h")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"usage: outbound {name}")
        assert max(len(line) for line in shown.stdout.splitlines()) <= 80


def test_config_prints_every_variable_with_default_and_meaning_and_masks_secrets() -> None:
    answer = outbound_command("config", env={**SECRETS, "OUTBOUND_POOL_WORKERS": "3"})
    assert answer.returncode == 0, answer.stderr
    text = answer.stdout
    for secret in SECRET_PARTS:
        assert secret not in text and secret not in answer.stderr
    for variable, _default, meaning in Config.describe():
        assert f"{variable} = " in text
        assert " ".join(meaning.split()[:3]) in " ".join(text.split())
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "  OUTBOUND_POOL_WORKERS = 3  (set; default 8)" in lines
    assert "  OUTBOUND_RUN_HISTORY = 10000  (default)" in lines
    assert "  OUTBOUND_API_TOKEN = ****  (set; default unset)" in lines
    assert "OUTBOUND_DATABASE_URL = postgresql://app:****@127.0.0.1:5432/orders" in text
    assert "OUTBOUND_SMTP_URL = smtp://mailer:****@127.0.0.1:2525" in text
    assert "nats://****@127.0.0.1:4222,nats://u:****@127.0.0.1:4223" in text
    assert "Journal (durability, cluster)" in lines and "HTTP destination" in lines


def test_readmes_configuration_table_lists_every_variable() -> None:
    """README's Configuration table names every setting (alone, as `A` / `B`, or as the
    `_SUFFIX` of the variable before it)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    missing = []
    for variable, _default, _meaning in Config.describe():
        prefix, last = variable.rsplit("_", 1)
        if not any(
            f"`{variable}`" in row or (f"`_{last}`" in row and f"`{prefix}_" in row) for row in rows
        ):
            missing.append(variable)
    assert missing == []


def test_config_json_lists_every_variable_masked() -> None:
    answer = outbound_command("config", "--json", env=SECRETS)
    assert answer.returncode == 0, answer.stderr
    listed = {entry["name"]: entry for entry in json.loads(answer.stdout)}
    assert set(listed) == {variable for variable, _, _ in Config.describe()}
    assert listed["OUTBOUND_API_TOKEN"] == {
        "name": "OUTBOUND_API_TOKEN",
        "field": "api_token",
        "section": "HTTP API (outbound serve)",
        "default": "unset",
        "value": "****",
        "meaning": "bearer token the HTTP API requires (unset: open)",
        "secret": True,
        "set": True,
    }
    assert listed["OUTBOUND_DATA_DIR"]["value"] is None and not listed["OUTBOUND_DATA_DIR"]["set"]
    assert listed["OUTBOUND_LOG_FORMAT"]["default"] == "plain"
    for secret in SECRET_PARTS:
        assert secret not in answer.stdout


def test_config_reports_a_bad_value_without_its_secret() -> None:
    bad = {"OUTBOUND_JOURNAL": "http://user:journal-pass-1@127.0.0.1:4222"}
    answer = outbound_command("config", env=bad)
    assert answer.returncode == 1
    assert "OUTBOUND_JOURNAL" in answer.stderr and "not a valid configuration" in answer.stderr
    assert "journal-pass-1" not in answer.stderr + answer.stdout
    assert "http://user:****@127.0.0.1:4222" in answer.stderr
    log_format = outbound_command("config", env={"OUTBOUND_LOG_FORMAT": "xml"})
    assert log_format.returncode == 1 and "OUTBOUND_LOG_FORMAT='xml'" in log_format.stderr


@pytest.mark.parametrize(
    ("variable", "value", "shown"),
    [
        ("OUTBOUND_HTTP_SIGNING_SECRETS", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "****"),
        ("OUTBOUND_DATABASE_URL", "postgresql://127.0.0.1/db?user=a&password=x1", None),
        ("OUTBOUND_DATABASE_URL", "postgresql://a@127.0.0.1/db", "postgresql://****@127.0.0.1/db"),
        ("OUTBOUND_S3_ENDPOINT", "http://127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("OUTBOUND_JOURNAL_CREDS", "/etc/outbound/nats.creds", "/etc/outbound/nats.creds"),
    ],
)
def test_masking_of_single_values(variable: str, value: str, shown: str | None) -> None:
    if shown is None:  # a password in the query
        assert masked(variable, value) == "postgresql://127.0.0.1/db?user=a&password=****"
    else:
        assert masked(variable, value) == shown


def test_bench_list_names_every_scenario_on_one_line_each() -> None:
    answer = outbound_command("bench", "--list")
    assert answer.returncode == 0, answer.stderr
    lines = answer.stdout.splitlines()
    assert [line.split()[0] for line in lines] == SCENARIOS
    for line in lines:
        assert len(line.split()) > 2, line  # a name and what it measures
        assert len(line) <= 80
    unknown = outbound_command("bench", "--only", "nope")
    assert unknown.returncode == 2
    assert "invalid choice: 'nope'" in unknown.stderr and "runs" in unknown.stderr


def test_bench_writes_its_table_and_chart_under_the_output_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Saved results of the scenarios not run are read from there too (no scenario is run:
    `only` names none of them)."""
    output = tmp_path / "results"
    output.mkdir()
    saved = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "runs.json"
    (output / "runs.json").write_text(saved.read_text())
    monkeypatch.chdir(tmp_path)
    assert run_suite(only=["none of them"], results=output) == 0
    assert "| runs |" in (output / "summary.md").read_text()
    assert (output / "throughput.png").stat().st_size > 0
    assert not (tmp_path / "benchmarks").exists()
    assert str(output.resolve() / "throughput.png") in capsys.readouterr().out
