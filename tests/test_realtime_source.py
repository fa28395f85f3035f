"""The daemon's Realtime source against the Realtime test server and embedded Postgres (wal_level = logical).

Every test ends with every row embedded at its latest version and no (id, version) written twice:
a trigger on `project_embeddings` records each write in `test_audit.writes`.
"""

from __future__ import annotations

import asyncpg
import pytest
from realtime_server import RealtimeServer
from support import all_current, realtime_settings, running, twice_written, wait_until
from vector_sync.events import Source

# realtime-py 2.34.1 reads ConnectionClosed.code (deprecated in websockets 15) on its error path; with
# filterwarnings=error that warning would be raised inside its receive task. Production only prints it.
pytestmark = pytest.mark.filterwarnings(r"ignore:ConnectionClosed\.(code|reason) is deprecated:DeprecationWarning")


async def insert(db: asyncpg.Connection, name: str) -> int:
    return int(await db.fetchval("insert into projects (name, description) values ($1, 'd') returning id", name))


async def test_a_steady_stream_arrives_by_realtime(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    async with running(realtime_settings(live_dsn, live_server)) as handle:
        await wait_until(lambda: handle.daemon.intake is not None and handle.daemon.intake.live.get(Source.REALTIME))
        ids = [await insert(live_db, f"p{n}") for n in range(20)]
        for project in ids[:10]:
            await live_db.execute("update projects set description = 'changed' where id = $1", project)
        for project in ids[15:]:
            await live_db.execute("delete from projects where id = $1", project)
        await wait_until(lambda: all_current(live_db), what="every row embedded at its latest version")
        events = handle.daemon.metrics.events.labels("realtime")._value.get()
    assert events >= 35
    assert await twice_written(live_db) == []
    assert await live_db.fetchval("select count(*) from vector_sync.project_embeddings") == 15
