"""Settings: the one place that reads the environment (and `.env`) and validates it.

Every problem is reported as one line naming the variable, what it got (secrets masked) and what it
expects; the CLI turns a `ConfigError` into exit code 2.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import string
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class SourceName(StrEnum):
    REALTIME = "realtime"
    WEBHOOK = "webhook"
    LISTEN = "listen"


class EmbedderName(StrEnum):
    OPENAI = "openai"
    HASH = "hash"


class ConfigError(Exception):
    """Configuration is invalid; `problems` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """`500ms`, `20s`, `5m`, `1h` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 20s, 5m or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError("expected a duration such as 500ms, 20s, 5m or a number of seconds")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, NoDecode]


@dataclass(frozen=True, slots=True)
class TableName:
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


_IDENTIFIER_PART = re.compile(r'"((?:[^"]|"")+)"|([^".\s]+)')
# Postgres folds unquoted names in a UTF-8 database by ASCII rules only: "Ü" stays "Ü".
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_COLUMN_ITEM = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^,"\s][^,]*?)?)\s*(?:,|$)')


def parse_table_name(text: str) -> TableName:
    """`schema.table`, `table` (schema public) or double-quoted parts with any characters.

    Unquoted parts are folded to lower case as Postgres does (A-Z only). The result is only ever used through
    `sqltext.quote_ident`, so odd characters are carried, never pasted.
    """
    parts: list[str] = []
    position = 0
    text = text.strip()
    while True:
        match = _IDENTIFIER_PART.match(text, position)
        if not match:
            raise ValueError('expected [schema.]table, with "double quotes" around unusual names')
        quoted, bare = match.groups()
        parts.append(quoted.replace('""', '"') if quoted is not None else bare.translate(_ASCII_LOWER))
        position = match.end()
        if position == len(text):
            break
        if text[position] != ".":
            raise ValueError('expected [schema.]table, with "double quotes" around unusual names')
        position += 1
    if len(parts) == 1:
        return TableName("public", parts[0])
    if len(parts) == 2:
        return TableName(parts[0], parts[1])
    raise ValueError("expected at most one dot: [schema.]table")


def _comma_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_column_list(text: str) -> tuple[str, ...]:
    """`name,description`; a name with a comma, a quote or spaces at its ends goes in double quotes
    (`"a,b"`, `" padded "`; a quote inside is doubled). Names are taken as written, not case-folded."""
    columns: list[str] = []
    position = 0
    while position < len(text):
        match = _COLUMN_ITEM.match(text, position)
        if match is None or match.end() == position:
            raise ValueError('expected a comma list of column names, with "double quotes" around unusual names')
        quoted, bare = match.groups()
        if quoted is not None:
            columns.append(quoted.replace('""', '"'))
        elif bare:
            columns.append(bare)
        position = match.end()
    return tuple(columns)


def _check_identifier(name: str) -> str:
    if not name or "\x00" in name or len(name.encode()) > 63:
        raise ValueError("expected a column name of 1 to 63 bytes")
    return name


def decode_webhook_secret(secret: str) -> bytes:
    """A Standard Webhooks secret is `whsec_` + base64 of the key bytes."""
    body = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("expected whsec_ followed by base64") from exc
    if len(key) < 16:
        raise ValueError("expected at least 16 bytes of key after whsec_")
    return key


class Settings(BaseSettings):
    """All settings; field aliases are the environment variable names of the interface."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    database_url: SecretStr | None = Field(None, validation_alias="DATABASE_URL")
    supabase_url: str | None = Field(None, validation_alias="SUPABASE_URL")
    supabase_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_KEY")
    )
    openai_api_key: SecretStr | None = Field(None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(None, validation_alias="OPENAI_BASE_URL")
    embedder: EmbedderName | None = Field(None, validation_alias="VECTOR_SYNC_EMBEDDER")
    embedding_model: str = Field("text-embedding-3-small", validation_alias="VECTOR_SYNC_EMBEDDING_MODEL")
    encoding_format: Literal["float", "base64"] = Field("float", validation_alias="VECTOR_SYNC_ENCODING_FORMAT")
    embedding_dimensions: int = Field(1536, ge=1, le=16000, validation_alias="VECTOR_SYNC_EMBEDDING_DIMENSIONS")
    sources: Annotated[frozenset[SourceName] | None, NoDecode] = Field(None, validation_alias="VECTOR_SYNC_SOURCES")
    webhook_secret: SecretStr | None = Field(None, validation_alias="VECTOR_SYNC_WEBHOOK_SECRET")
    webhook_token: SecretStr | None = Field(None, validation_alias="VECTOR_SYNC_WEBHOOK_TOKEN")
    http_port: int = Field(8080, ge=0, le=65535, validation_alias=AliasChoices("PORT", "VECTOR_SYNC_HTTP_PORT"))
    http_host: str = Field("0.0.0.0", validation_alias="VECTOR_SYNC_HTTP_HOST")
    table: Annotated[TableName, NoDecode] = Field(TableName("public", "projects"), validation_alias="VECTOR_SYNC_TABLE")
    id_column: str = Field("id", validation_alias="VECTOR_SYNC_ID_COLUMN")
    content_columns: Annotated[tuple[str, ...], NoDecode] = Field(
        ("name", "description"), validation_alias="VECTOR_SYNC_CONTENT_COLUMNS"
    )
    insert_delay: Duration = Field(20.0, validation_alias="VECTOR_SYNC_INSERT_DELAY")
    update_delay: Duration = Field(0.0, validation_alias="VECTOR_SYNC_UPDATE_DELAY")
    batch_size: int = Field(100, ge=1, le=2048, validation_alias="VECTOR_SYNC_BATCH_SIZE")
    max_requests_per_second: int = Field(50, ge=1, le=100_000, validation_alias="VECTOR_SYNC_MAX_REQUESTS_PER_SECOND")
    max_concurrent_requests: int = Field(4, ge=1, le=256, validation_alias="VECTOR_SYNC_MAX_CONCURRENT_REQUESTS")
    log_format: Literal["text", "json"] | None = Field(None, validation_alias="VECTOR_SYNC_LOG_FORMAT")
    log_level: str = Field("INFO", validation_alias="VECTOR_SYNC_LOG_LEVEL")

    # Bounds and tuning beyond the interface's table; defaults suit a production daemon.
    max_pending: int = Field(100_000, ge=10, le=10_000_000, validation_alias="VECTOR_SYNC_MAX_PENDING")
    request_timeout: Duration = Field(30.0, validation_alias="VECTOR_SYNC_REQUEST_TIMEOUT")
    max_retries: int = Field(6, ge=0, le=50, validation_alias="VECTOR_SYNC_MAX_RETRIES")
    webhook_rate_limit: int = Field(1000, ge=1, le=1_000_000, validation_alias="VECTOR_SYNC_WEBHOOK_RATE_LIMIT")
    shutdown_grace: Duration = Field(10.0, validation_alias="VECTOR_SYNC_SHUTDOWN_GRACE")
    pool_size: int = Field(4, ge=2, le=100, validation_alias="VECTOR_SYNC_DB_POOL_SIZE")
    # A periodic recent-changes pass for deployments where no second stream covers Realtime's
    # silent drops (its rate limit). 0 = off.
    safety_interval: Duration = Field(0.0, validation_alias="VECTOR_SYNC_SAFETY_INTERVAL")
    realtime_ready_timeout: Duration = Field(30.0, validation_alias="VECTOR_SYNC_REALTIME_READY_TIMEOUT")
    # How long `run` keeps trying an unreachable database at start before it exits 1.
    startup_timeout: Duration = Field(30.0, validation_alias="VECTOR_SYNC_STARTUP_TIMEOUT")

    @field_validator(
        "insert_delay",
        "update_delay",
        "request_timeout",
        "shutdown_grace",
        "safety_interval",
        "realtime_ready_timeout",
        "startup_timeout",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, value: object) -> object:
        if isinstance(value, str):
            names = [name.lower() for name in _comma_list(value)]
            if not names:
                raise ValueError("expected a comma list of realtime, webhook, listen")
            unknown = [name for name in names if name not in SourceName.__members__.values()]
            if unknown:
                raise ValueError(f"unknown source {unknown[0]!r}; expected realtime, webhook or listen")
            return frozenset(SourceName(name) for name in names)
        return value

    @field_validator("table", mode="before")
    @classmethod
    def _table(cls, value: object) -> object:
        return parse_table_name(value) if isinstance(value, str) else value

    @field_validator("id_column")
    @classmethod
    def _id_column(cls, value: str) -> str:
        return _check_identifier(value)

    @field_validator("content_columns", mode="before")
    @classmethod
    def _content_columns(cls, value: object) -> object:
        if isinstance(value, str):
            columns = parse_column_list(value)
            if not columns:
                raise ValueError("expected a comma list of column names")
            return tuple(_check_identifier(column) for column in columns)
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            decode_webhook_secret(value.get_secret_value())
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.match(r"^postgres(ql)?://", value.get_secret_value()):
            raise ValueError("expected a postgres:// or postgresql:// DSN")
        return value

    @field_validator("supabase_url", "openai_base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("expected an http(s):// URL")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("expected TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR or CRITICAL")
        return level

    # Derived values: the defaults that depend on other settings.

    @property
    def active_sources(self) -> frozenset[SourceName]:
        if self.sources is not None:
            return self.sources
        chosen = {SourceName.REALTIME if self.supabase_url else SourceName.LISTEN}
        if self.webhook_secret is not None or self.webhook_token is not None:
            chosen.add(SourceName.WEBHOOK)
        return frozenset(chosen)

    @property
    def active_embedder(self) -> EmbedderName:
        return self.embedder or EmbedderName.OPENAI

    @property
    def vector_model(self) -> str:
        """The model name stored with each vector: what made it, so a change re-embeds."""
        if self.active_embedder is EmbedderName.HASH:
            return f"hash-{self.embedding_dimensions}"
        return self.embedding_model

    @property
    def webhook_key(self) -> bytes | None:
        if self.webhook_secret is None:
            return None
        return decode_webhook_secret(self.webhook_secret.get_secret_value())

    def secrets(self) -> list[str]:
        """Every secret value, so the log filter can scrub them wherever they might appear."""
        values = [self.supabase_key, self.openai_api_key, self.webhook_secret, self.webhook_token]
        found = [value.get_secret_value() for value in values if value is not None]
        if self.database_url is not None:
            password = _dsn_password(self.database_url.get_secret_value())
            if password:
                found.append(password)
        return [value for value in found if len(value) >= 4]


ENV_NAMES: dict[str, str] = {}
"""Field name → the variable(s) that set it, as shown in help texts."""
FIELD_OF_VARIABLE: dict[str, str] = {}
"""Every variable name (aliases included) → its field."""
for _name, _field in Settings.model_fields.items():
    _alias = _field.validation_alias
    _choices = [str(choice) for choice in _alias.choices] if isinstance(_alias, AliasChoices) else [str(_alias)]
    ENV_NAMES[_name] = " / ".join(_choices)
    FIELD_OF_VARIABLE.update(dict.fromkeys(_choices, _name))
SECRET_FIELDS = {name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)}


def _dsn_password(dsn: str) -> str | None:
    match = re.match(r"^[a-z]+://[^:/@]*:([^@]*)@", dsn)
    return match.group(1) if match and match.group(1) else None


def mask_dsn(dsn: str) -> str:
    """The DSN with its password replaced, for logs and `check`."""
    password = _dsn_password(dsn)
    return dsn.replace(f":{password}@", ":***@", 1) if password else dsn


def _shown(field: str, value: Any) -> str:
    if field in SECRET_FIELDS:
        return "'***'"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "...'"


def _variable_given(field: str, overrides: dict[str, Any]) -> str:
    """Which of a field's variables the user actually set (PORT or VECTOR_SYNC_HTTP_PORT, ...)."""
    choices = ENV_NAMES[field].split(" / ")
    for choice in choices:
        if choice in overrides or choice in os.environ:
            return choice
    return choices[0]


def load_settings(*, require_database: bool = True, require_embedder: bool = True, **overrides: Any) -> Settings:
    """Build the settings from the environment, `.env` and `overrides`; raise `ConfigError`.

    Every problem is reported at once: values that fail validation, and (with those set aside)
    values that are missing or do not fit together.
    """
    problems: list[str] = []
    failed: set[str] = set()
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            location = str(error["loc"][0]) if error["loc"] else "?"
            field = FIELD_OF_VARIABLE.get(location, location)
            failed.add(field)
            name = _variable_given(field, overrides) if field in ENV_NAMES else location
            reason = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{name}: got {_shown(field, error.get('input'))}: {reason}")
        # Set the bad values aside (their defaults stand in) to find what else is wrong.
        stand_ins = {field: Settings.model_fields[field].default for field in failed if field in ENV_NAMES}
        try:
            settings = Settings(**{**overrides, **stand_ins})
        except ValidationError:
            raise ConfigError(problems) from None
    problems += requirement_problems(
        settings,
        require_database=require_database and "database_url" not in failed,
        require_embedder=require_embedder and not failed & {"embedder", "openai_api_key"},
    )
    if problems:
        raise ConfigError(problems)
    return settings


def requirement_problems(settings: Settings, *, require_database: bool, require_embedder: bool) -> list[str]:
    """Checks that span several variables, or depend on the command being run."""
    problems = []
    if require_database and settings.database_url is None:
        problems.append("DATABASE_URL: missing: expected a postgres:// DSN of the source database")
    if require_embedder and settings.active_embedder is EmbedderName.OPENAI and settings.openai_api_key is None:
        problems.append(
            "OPENAI_API_KEY: missing: expected an API key (any value for a local server that ignores it), "
            "or VECTOR_SYNC_EMBEDDER=hash for the offline lexical embedder"
        )
    sources = settings.active_sources
    if SourceName.WEBHOOK in sources and settings.webhook_secret is None and settings.webhook_token is None:
        problems.append(
            "VECTOR_SYNC_SOURCES: got 'webhook' without VECTOR_SYNC_WEBHOOK_SECRET or "
            "VECTOR_SYNC_WEBHOOK_TOKEN: expected one of them to be set"
        )
    if SourceName.REALTIME in sources:
        if settings.supabase_url is None:
            problems.append("SUPABASE_URL: missing: the realtime source needs the project URL")
        if settings.supabase_key is None:
            problems.append("SUPABASE_SERVICE_ROLE_KEY: missing: the realtime source needs the service key")
    if settings.id_column in settings.content_columns:
        problems.append(f"VECTOR_SYNC_CONTENT_COLUMNS: got {settings.id_column!r}: the id column cannot be embedded")
    return problems
