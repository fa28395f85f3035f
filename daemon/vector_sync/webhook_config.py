"""Where the database's webhook sender finds its URL and signing secret: Supabase Vault when it is
installed (encrypted at rest), else the private table vector_sync.config."""

from __future__ import annotations

import base64
import secrets
from urllib.parse import urlsplit

import asyncpg

from vector_sync.config import decode_webhook_secret

URL_NAME = "vector_sync_webhook_url"
SECRET_NAME = "vector_sync_webhook_secret"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_target(url: str, secret: str) -> None:
    """ValueError unless `url` is an http(s) URL and `secret` a Standard Webhooks secret."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) URL of the daemon's /webhook route, got {url!r}")
    decode_webhook_secret(secret)


async def store_webhook_target(conn: asyncpg.Connection, url: str, secret: str) -> str:
    """Store both values where `vector_sync.secret()` reads them; returns where ("vault" or "config")."""
    check_target(url, secret)
    has_vault = await conn.fetchval("select to_regclass('vault.secrets') is not null")
    async with conn.transaction():
        for name, value in ((URL_NAME, url), (SECRET_NAME, secret)):
            if has_vault:
                existing = await conn.fetchval("select id from vault.secrets where name = $1", name)
                if existing is None:
                    await conn.execute("select vault.create_secret($1, $2, 'vector-sync webhook sender')", value, name)
                else:
                    await conn.execute("select vault.update_secret($1, $2)", existing, value)
                # A value left in the table from before Vault would be read if Vault's went missing.
                await conn.execute("delete from vector_sync.config where key = $1", f"secret:{name}")
            else:
                await conn.execute(
                    """
                    insert into vector_sync.config (key, value) values ($1, $2)
                    on conflict (key) do update set value = excluded.value, updated_at = now()
                    """,
                    f"secret:{name}",
                    value,
                )
    return "vault" if has_vault else "config"
