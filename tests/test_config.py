"""Settings: durations, defaults, derived values, error lines, and the CLI's handling of bad configuration."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vector_sync import logs
from vector_sync.config import (
    ConfigError,
    EmbedderName,
    Settings,
    SourceName,
    TableName,
    load_settings,
    parse_column_list,
    parse_duration,
    parse_table_name,
)

DATABASE_URL = "postgresql://vs:db-password-42@127.0.0.1:9/vs"
GOOD_SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123").decode()
SHORT_SECRET = "whsec_" + base64.b64encode(b"hunter2-short").decode()  # 13 bytes: too short
GARBAGE_SECRET = "whsec_hunter2 is not base64!!"
COMMANDS = ["run", "migrate", "sql", "check", "reconcile", "status", "search", "demo"]
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*(?: / [A-Z][A-Z0-9_]*)*$")


# --- durations --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("0ms", 0.0),
        ("1500ms", 1.5),
        ("20s", 20.0),
        ("0s", 0.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2.5", 2.5),
        ("2.5s", 2.5),
        ("0.5m", 30.0),
        ("0", 0.0),
        ("20", 20.0),
        (" 20s ", 20.0),
        (0, 0.0),
        (7, 7.0),
        (1.25, 1.25),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["soon", "", " ", "-1", "-5s", -1, -0.5, "5 minutes", "1d", "ms", "s", "1.2.3", "20sec", "5M5", "1e3", "..5", True],
)
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from([("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)]))
def test_parse_duration_units(number: int, unit: tuple[str, float]) -> None:
    suffix, factor = unit
    assert parse_duration(f"{number}{suffix}") == pytest.approx(number * factor)
    assert parse_duration(str(number)) == pytest.approx(number)


# --- defaults and derived values ---------------------------------------------------------------------


def settings(**env: Any) -> Settings:
    values: dict[str, Any] = {"DATABASE_URL": DATABASE_URL, "VECTOR_SYNC_EMBEDDER": "hash"}
    values.update(env)
    return load_settings(**values)


def test_defaults_match_the_interface() -> None:
    s = settings()
    assert s.database_url is not None and s.database_url.get_secret_value() == DATABASE_URL
    assert s.supabase_url is None
    assert s.supabase_key is None
    assert s.openai_api_key is None
    assert s.openai_base_url is None
    assert s.active_embedder is EmbedderName.HASH
    assert s.embedding_model == "text-embedding-3-small"
    assert s.embedding_dimensions == 1536
    assert s.active_sources == frozenset({SourceName.LISTEN})
    assert s.webhook_secret is None
    assert s.webhook_token is None
    assert s.http_port == 8080
    assert s.http_host == "0.0.0.0"
    assert s.table == TableName("public", "projects")
    assert s.id_column == "id"
    assert s.content_columns == ("name", "description")
    assert s.insert_delay == 20.0
    assert s.update_delay == 0.0
    assert s.batch_size == 100
    assert s.max_requests_per_second == 50
    assert s.max_concurrent_requests == 4
    assert s.log_format in (None, "text")
    assert s.log_level == "INFO"


def test_the_embedder_defaults_to_openai() -> None:
    s = load_settings(DATABASE_URL=DATABASE_URL, OPENAI_API_KEY="sk-x-123")
    assert s.active_embedder is EmbedderName.OPENAI
    s = load_settings(DATABASE_URL=DATABASE_URL, require_embedder=False)
    assert s.active_embedder is EmbedderName.OPENAI


def test_log_format_default_is_text_and_json_on_railway_off_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAILWAY_ENVIRONMENT", raising=False)
    assert logs.default_format(io.StringIO()) == "text"
    monkeypatch.setenv("RAILWAY_ENVIRONMENT", "production")
    assert logs.default_format(io.StringIO()) == "json"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.default_format(Terminal()) == "text"


def test_table_names_parse() -> None:
    assert settings(VECTOR_SYNC_TABLE="projects").table == TableName("public", "projects")
    assert settings(VECTOR_SYNC_TABLE="App.Projects").table == TableName("app", "projects")
    assert settings(VECTOR_SYNC_TABLE='"App"."My ""Projects"""').table == TableName("App", 'My "Projects"')
    assert settings(VECTOR_SYNC_TABLE='app."a.b"').table == TableName("app", "a.b")


def test_content_columns_are_a_comma_list_in_order() -> None:
    assert settings(VECTOR_SYNC_CONTENT_COLUMNS="title, body ,summary").content_columns == ("title", "body", "summary")


def test_sources_default_to_listen() -> None:
    assert settings().active_sources == {SourceName.LISTEN}


def test_sources_default_to_realtime_when_supabase_url_is_set() -> None:
    # The default itself (interface.md); Settings alone does not run the cross-variable checks.
    s = Settings(SUPABASE_URL="https://abc.supabase.co", SUPABASE_SERVICE_ROLE_KEY="service-key-1")
    assert s.active_sources == {SourceName.REALTIME}


def test_the_realtime_source_runs_with_a_url_and_a_key() -> None:
    s = settings(SUPABASE_URL="https://abc.supabase.co", SUPABASE_SERVICE_ROLE_KEY="service-key-1")
    assert s.active_sources == {SourceName.REALTIME}
    assert s.safety_interval == 0  # off unless asked for
    assert s.realtime_ready_timeout == 30


def test_the_safety_interval_takes_a_duration() -> None:
    s = settings(
        SUPABASE_URL="https://abc.supabase.co",
        SUPABASE_SERVICE_ROLE_KEY="service-key-1",
        VECTOR_SYNC_SAFETY_INTERVAL="1m",
    )
    assert s.safety_interval == 60
    with pytest.raises(ConfigError) as raised:
        settings(VECTOR_SYNC_SAFETY_INTERVAL="often")
    assert any(problem.startswith("VECTOR_SYNC_SAFETY_INTERVAL") for problem in raised.value.problems)


@pytest.mark.parametrize(
    "extra", [{"VECTOR_SYNC_WEBHOOK_SECRET": GOOD_SECRET}, {"VECTOR_SYNC_WEBHOOK_TOKEN": "tok-123"}]
)
def test_sources_add_webhook_when_a_secret_or_token_is_set(extra: dict[str, str]) -> None:
    assert settings(**extra).active_sources == {SourceName.LISTEN, SourceName.WEBHOOK}
    with_realtime = Settings(SUPABASE_URL="https://abc.supabase.co", SUPABASE_KEY="service-key-1", **extra)
    assert with_realtime.active_sources == {SourceName.REALTIME, SourceName.WEBHOOK}


def test_explicit_sources_win() -> None:
    s = settings(VECTOR_SYNC_SOURCES="listen", VECTOR_SYNC_WEBHOOK_SECRET=GOOD_SECRET)
    assert s.active_sources == {SourceName.LISTEN}
    s = settings(VECTOR_SYNC_SOURCES=" Webhook , listen ", VECTOR_SYNC_WEBHOOK_TOKEN="tok-123")
    assert s.active_sources == {SourceName.LISTEN, SourceName.WEBHOOK}


def test_http_port_from_port_or_vector_sync_http_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("VECTOR_SYNC_EMBEDDER", "hash")
    monkeypatch.setenv("VECTOR_SYNC_HTTP_PORT", "9001")
    assert load_settings().http_port == 9001
    monkeypatch.setenv("PORT", "9000")
    assert load_settings().http_port == 9000  # PORT (Railway's) wins
    monkeypatch.delenv("VECTOR_SYNC_HTTP_PORT")
    assert load_settings().http_port == 9000


def test_supabase_key_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("VECTOR_SYNC_EMBEDDER", "hash")
    monkeypatch.setenv("SUPABASE_URL", "https://abc.supabase.co")
    monkeypatch.setenv("SUPABASE_KEY", "alias-key-1")
    s = load_settings()
    assert s.supabase_key is not None and s.supabase_key.get_secret_value() == "alias-key-1"
    monkeypatch.delenv("SUPABASE_KEY")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "service-key-1")
    s = load_settings()
    assert s.supabase_key is not None and s.supabase_key.get_secret_value() == "service-key-1"


def test_realtime_needs_a_key() -> None:
    with pytest.raises(ConfigError) as raised:
        settings(SUPABASE_URL="https://abc.supabase.co")
    assert any(p.startswith("SUPABASE_SERVICE_ROLE_KEY") for p in raised.value.problems)


def test_secrets_lists_every_secret() -> None:
    s = settings(
        VECTOR_SYNC_WEBHOOK_SECRET=GOOD_SECRET,
        VECTOR_SYNC_WEBHOOK_TOKEN="tok-123",
        OPENAI_API_KEY="sk-abc-123",
        SUPABASE_URL="https://abc.supabase.co",
        SUPABASE_KEY="service-key-1",
        VECTOR_SYNC_SOURCES="listen,webhook",
    )
    assert {GOOD_SECRET, "tok-123", "sk-abc-123", "service-key-1", "db-password-42"} <= set(s.secrets())


# --- error lines ----------------------------------------------------------------------------------------


BAD_VALUES = [
    ("VECTOR_SYNC_BATCH_SIZE", "5000"),
    ("VECTOR_SYNC_BATCH_SIZE", "0"),
    ("VECTOR_SYNC_BATCH_SIZE", "many"),
    ("VECTOR_SYNC_INSERT_DELAY", "soon"),
    ("VECTOR_SYNC_INSERT_DELAY", "-5s"),
    ("VECTOR_SYNC_UPDATE_DELAY", "later"),
    ("VECTOR_SYNC_EMBEDDING_DIMENSIONS", "0"),
    ("VECTOR_SYNC_EMBEDDING_DIMENSIONS", "wide"),
    ("VECTOR_SYNC_SOURCES", "kafka"),
    ("VECTOR_SYNC_SOURCES", "listen,carrier-pigeon"),
    ("VECTOR_SYNC_EMBEDDER", "gpt"),
    ("VECTOR_SYNC_HTTP_PORT", "70000"),
    ("PORT", "http"),
    ("VECTOR_SYNC_TABLE", "a.b.c"),
    ("VECTOR_SYNC_TABLE", '"unterminated'),
    ("VECTOR_SYNC_ID_COLUMN", "x" * 64),
    ("VECTOR_SYNC_CONTENT_COLUMNS", "name," + "y" * 64),
    ("VECTOR_SYNC_MAX_REQUESTS_PER_SECOND", "0"),
    ("VECTOR_SYNC_MAX_CONCURRENT_REQUESTS", "0"),
    ("VECTOR_SYNC_LOG_FORMAT", "xml"),
    ("VECTOR_SYNC_LOG_LEVEL", "LOUD"),
    ("SUPABASE_URL", "ftp://abc.supabase.co"),
    ("OPENAI_BASE_URL", "localhost:11434/v1"),
]


def problems_for(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    base = {"DATABASE_URL": DATABASE_URL, "VECTOR_SYNC_EMBEDDER": "hash"}
    for name, value in {**base, **env}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    problems = raised.value.problems
    assert str(raised.value) == "\n".join(problems)
    return problems


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    problems = problems_for(monkeypatch, **{variable: value})
    assert len(problems) == 1, problems
    line = problems[0]
    assert "\n" not in line
    assert line.startswith((variable, f"PORT / {variable}")), line
    assert repr(value) in line or value in line, f"{line!r} does not show what it got"
    assert len(line) > len(variable) + len(value) + 10, f"{line!r} does not say what is expected"


@pytest.mark.parametrize("secret", [SHORT_SECRET, GARBAGE_SECRET, "not-even-prefixed-hunter2"])
def test_a_bad_webhook_secret_is_masked(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    problems = problems_for(monkeypatch, VECTOR_SYNC_WEBHOOK_SECRET=secret)
    assert len(problems) == 1, problems
    assert problems[0].startswith("VECTOR_SYNC_WEBHOOK_SECRET")
    text = "\n".join(problems)
    assert secret not in text
    assert secret.removeprefix("whsec_") not in text
    assert "hunter2" not in text


def test_a_bad_value_in_dotenv_is_masked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(f"VECTOR_SYNC_WEBHOOK_SECRET={GARBAGE_SECRET}\n")
    monkeypatch.chdir(tmp_path)
    problems = problems_for(monkeypatch)
    assert len(problems) == 1 and problems[0].startswith("VECTOR_SYNC_WEBHOOK_SECRET")
    assert "hunter2" not in problems[0]


def test_a_database_url_that_is_not_postgres_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = problems_for(monkeypatch, DATABASE_URL="mysql://vs:db-password-42@127.0.0.1/vs")
    assert len(problems) == 1, problems
    assert problems[0].startswith("DATABASE_URL")
    assert "db-password-42" not in problems[0]


def test_several_problems_give_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = problems_for(
        monkeypatch,
        VECTOR_SYNC_BATCH_SIZE="5000",
        VECTOR_SYNC_INSERT_DELAY="soon",
        VECTOR_SYNC_LOG_LEVEL="LOUD",
        VECTOR_SYNC_WEBHOOK_SECRET=GARBAGE_SECRET,
    )
    assert len(problems) == 4, problems
    for variable in ("VECTOR_SYNC_BATCH_SIZE", "VECTOR_SYNC_INSERT_DELAY", "VECTOR_SYNC_LOG_LEVEL"):
        assert sum(line.startswith(variable) for line in problems) == 1, problems
    assert sum(line.startswith("VECTOR_SYNC_WEBHOOK_SECRET") for line in problems) == 1
    assert "hunter2" not in "\n".join(problems)


def test_missing_values_are_reported_with_bad_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """One line per problem: a missing DATABASE_URL is not hidden by a bad value elsewhere."""
    monkeypatch.setenv("VECTOR_SYNC_BATCH_SIZE", "5000")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    problems = raised.value.problems
    assert sum(line.startswith("VECTOR_SYNC_BATCH_SIZE") for line in problems) == 1, problems
    assert sum(line.startswith("DATABASE_URL") for line in problems) == 1, problems
    assert sum(line.startswith("OPENAI_API_KEY") for line in problems) == 1, problems


def test_requirement_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert {line.split(":")[0] for line in raised.value.problems} == {"DATABASE_URL", "OPENAI_API_KEY"}
    with pytest.raises(ConfigError) as raised:
        settings(VECTOR_SYNC_SOURCES="webhook")
    assert [line.split(":")[0] for line in raised.value.problems] == ["VECTOR_SYNC_SOURCES"]
    with pytest.raises(ConfigError) as raised:
        settings(VECTOR_SYNC_CONTENT_COLUMNS="id,name")
    assert [line.split(":")[0] for line in raised.value.problems] == ["VECTOR_SYNC_CONTENT_COLUMNS"]


def test_dotenv_is_read_and_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(
        f"DATABASE_URL={DATABASE_URL}\nVECTOR_SYNC_EMBEDDER=hash\nVECTOR_SYNC_BATCH_SIZE=7\nVECTOR_SYNC_INSERT_DELAY=3s\n"
    )
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert (s.batch_size, s.insert_delay) == (7, 3.0)
    monkeypatch.setenv("VECTOR_SYNC_BATCH_SIZE", "9")
    s = load_settings()
    assert (s.batch_size, s.insert_delay) == (9, 3.0)


# --- the command line -------------------------------------------------------------------------------------


def cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(cwd)), **env}
    try:
        return subprocess.run(
            [sys.executable, "-m", "vector_sync", *args],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"vector-sync {' '.join(args)} did not exit within {timeout}s: {exc.stderr!r}") from None


RUN_BASE = {"DATABASE_URL": DATABASE_URL, "VECTOR_SYNC_EMBEDDER": "hash", "VECTOR_SYNC_HTTP_PORT": "0"}


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({**RUN_BASE, "VECTOR_SYNC_BATCH_SIZE": "5000"}, "VECTOR_SYNC_BATCH_SIZE"),
        ({**RUN_BASE, "VECTOR_SYNC_INSERT_DELAY": "soon"}, "VECTOR_SYNC_INSERT_DELAY"),
        ({"VECTOR_SYNC_EMBEDDER": "hash", "VECTOR_SYNC_HTTP_PORT": "0"}, "DATABASE_URL"),
        ({"DATABASE_URL": DATABASE_URL, "VECTOR_SYNC_HTTP_PORT": "0"}, "OPENAI_API_KEY"),
        ({**RUN_BASE, "VECTOR_SYNC_SOURCES": "webhook"}, "VECTOR_SYNC_SOURCES"),
        ({**RUN_BASE, "VECTOR_SYNC_WEBHOOK_SECRET": SHORT_SECRET}, "VECTOR_SYNC_WEBHOOK_SECRET"),
        ({**RUN_BASE, "VECTOR_SYNC_WEBHOOK_SECRET": GARBAGE_SECRET}, "VECTOR_SYNC_WEBHOOK_SECRET"),
    ],
    ids=["batch-size", "insert-delay", "no-database-url", "no-openai-key", "webhook-no-secret", "short", "garbage"],
)
def test_run_with_bad_configuration_exits_2(tmp_path: Path, env: dict[str, str], variable: str) -> None:
    result = cli(["run"], tmp_path, env)
    assert result.returncode == 2, (result.returncode, result.stderr)
    problem_lines = [line for line in result.stderr.splitlines() if variable in line]
    assert problem_lines, result.stderr
    assert "db-password-42" not in result.stderr + result.stdout
    for secret in (SHORT_SECRET, GARBAGE_SECRET):
        assert secret not in result.stderr + result.stdout
        assert secret.removeprefix("whsec_") not in result.stderr + result.stdout
    assert "hunter2" not in result.stderr + result.stdout


def test_run_reports_several_problems_one_line_each(tmp_path: Path) -> None:
    env = {**RUN_BASE, "VECTOR_SYNC_BATCH_SIZE": "5000", "VECTOR_SYNC_INSERT_DELAY": "soon"}
    result = cli(["run"], tmp_path, env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert sum("VECTOR_SYNC_BATCH_SIZE" in line for line in lines) == 1, result.stderr
    assert sum("VECTOR_SYNC_INSERT_DELAY" in line for line in lines) == 1, result.stderr
    assert not any("VECTOR_SYNC_BATCH_SIZE" in line and "VECTOR_SYNC_INSERT_DELAY" in line for line in lines)


def test_run_reads_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"VECTOR_SYNC_BATCH_SIZE=5000\nVECTOR_SYNC_WEBHOOK_SECRET={GARBAGE_SECRET}\n")
    result = cli(["run"], tmp_path, RUN_BASE)
    assert result.returncode == 2, result.stderr
    assert "VECTOR_SYNC_BATCH_SIZE" in result.stderr
    assert "VECTOR_SYNC_WEBHOOK_SECRET" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_the_environment_wins_over_dotenv_in_the_cli(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("VECTOR_SYNC_EMBEDDING_DIMENSIONS=3072\nVECTOR_SYNC_TABLE=app.items\n")
    from_file = cli(["sql", "--offline", "--id-type", "bigint"], tmp_path, {})
    assert from_file.returncode == 0, from_file.stderr
    assert "halfvec(3072)" in from_file.stdout
    assert '"app"."items"' in from_file.stdout
    overridden = cli(["sql", "--offline", "--id-type", "bigint"], tmp_path, {"VECTOR_SYNC_EMBEDDING_DIMENSIONS": "100"})
    assert overridden.returncode == 0, overridden.stderr
    assert "vector(100)" in overridden.stdout
    assert "3072" not in overridden.stdout
    assert '"app"."items"' in overridden.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_the_environment_variables(tmp_path: Path, command: str) -> None:
    result = cli([command, "--help"], tmp_path, {})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert re.search(r"\b(DATABASE_URL|OPENAI_API_KEY|VECTOR_SYNC_[A-Z_]+|SUPABASE_[A-Z_]+|PORT)\b", text), text
    # Every entry of the environment section is a variable name, not an internal field name.
    section = text.split("environment variables read:", 1)
    assert len(section) == 2, text
    entries = [line.strip() for line in section[1].splitlines() if line.strip() and not line.strip().startswith("(")]
    assert entries, text
    for entry in entries:
        assert ENV_NAME.match(entry), f"{command} --help lists {entry!r}, which is not an environment variable"


@pytest.mark.parametrize(
    ("command", "variable"),
    [
        ("run", "DATABASE_URL"),
        ("run", "VECTOR_SYNC_WEBHOOK_SECRET"),
        ("migrate", "DATABASE_URL"),
        ("migrate", "VECTOR_SYNC_TABLE"),
        ("sql", "VECTOR_SYNC_EMBEDDING_DIMENSIONS"),
        ("check", "SUPABASE_URL"),
        ("reconcile", "OPENAI_API_KEY"),
        ("status", "DATABASE_URL"),
        ("search", "VECTOR_SYNC_EMBEDDER"),
        ("demo", "OPENAI_API_KEY"),
    ],
)
def test_help_names_the_variables_the_command_reads(tmp_path: Path, command: str, variable: str) -> None:
    result = cli([command, "--help"], tmp_path, {})
    assert result.returncode == 0, result.stderr
    assert variable in result.stdout


@pytest.mark.parametrize(
    ("text", "columns"),
    [
        ("name,description", ("name", "description")),
        (" name , description ", ("name", "description")),
        ('"a,b", c', ("a,b", "c")),
        ('" padded "', (" padded ",)),
        ('"say ""hi"""', ('say "hi"',)),
        ('pro"jects', ('pro"jects',)),
        ("Name", ("Name",)),  # column names are taken as written
    ],
)
def test_content_columns_take_double_quotes_for_unusual_names(text: str, columns: tuple[str, ...]) -> None:
    assert parse_column_list(text) == columns


@pytest.mark.parametrize("text", ['"unterminated', '"a"b', 'name, "x" y'])
def test_a_malformed_column_list_is_a_configuration_error(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings(VECTOR_SYNC_CONTENT_COLUMNS=text)
    assert raised.value.problems[0].startswith("VECTOR_SYNC_CONTENT_COLUMNS")


def test_unquoted_table_names_fold_ascii_capitals_only() -> None:
    assert parse_table_name("Public.MixedCase") == TableName("public", "mixedcase")
    assert parse_table_name("\u00dcber") == TableName("public", "\u00dcber")
