"""The Realtime test server, driven by the real `realtime` client (2.34.1) against embedded Postgres.

Events come from logical decoding, which needs `wal_level = logical`: the module starts its own
embedded PostgreSQL with it (`LogicalPostgres`), since the session server of conftest.py runs with
`replica` and cannot be restarted under the other tests.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from realtime import AsyncRealtimeClient, RealtimePostgresChangesListenEvent, RealtimeSubscribeStates
from realtime_server import (
    DEFAULT_API_KEY,
    MALFORMED_KINDS,
    RealtimeServer,
    binding_id,
    make_jwt,
)
from support import wait_until
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

# realtime-py 2.34.1 logs `e.code`/`e.reason` of a ConnectionClosedError, deprecated in websockets 15.
# With this project's filterwarnings=error that DeprecationWarning is raised inside the client's
# receive task and kills it before it reconnects (in production the warning is only printed).
# (websockets warns from its own module, so the filter can only name the message.)
pytestmark = pytest.mark.filterwarnings(r"ignore:ConnectionClosed\.(code|reason) is deprecated:DeprecationWarning")

Event = RealtimePostgresChangesListenEvent
State = RealtimeSubscribeStates
SERVER_SCRIPT = Path(__file__).with_name("realtime_server.py")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
COLUMNS = [
    {"name": "id", "type": "int8"},
    {"name": "name", "type": "text"},
    {"name": "description", "type": "text"},
    {"name": "stars", "type": "int4"},
    {"name": "version", "type": "int8"},
]


# ------------------------------------------------------------------------------------------ fixtures


# This module's names for the shared fixtures of conftest.py (a logical-decoding database and a
# Realtime test server publishing its public.projects).
@pytest.fixture
def rt_dsn(live_dsn: str) -> str:
    return live_dsn


@pytest.fixture
def db(live_db: asyncpg.Connection) -> asyncpg.Connection:
    return live_db


@pytest.fixture
def server(live_server: RealtimeServer) -> RealtimeServer:
    return live_server


class Subscriber:
    """One realtime client with one channel; records events, system messages and subscribe states."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = DEFAULT_API_KEY,
        topic: str = "db-changes",
        table: str = "projects",
        events: tuple[Event, ...] = (Event.Insert, Event.Update, Event.Delete),
        filter: str | None = None,
        timeout: int = 5,
        max_retries: int = 5,
        initial_backoff: float = 0.1,
    ) -> None:
        self.client = AsyncRealtimeClient(
            f"{url}/realtime/v1",
            token=token,
            timeout=timeout,
            max_retries=max_retries,
            initial_backoff=initial_backoff,
        )
        self.topic = f"realtime:{topic}"
        self.changes: list[Any] = []  # PostgresChangesPayload dicts
        self.system: list[Any] = []
        self.states: list[tuple[State, Exception | None]] = []
        self.channel = self.client.channel(topic)
        for event in events:
            self.channel.on_postgres_changes(event, self.changes.append, table=table, schema="public", filter=filter)
        self.channel.on_system(self.system.append)

    async def subscribe(self) -> Subscriber:
        await self.channel.subscribe(lambda state, error: self.states.append((state, error)))
        return self

    def count(self, state: State) -> int:
        return sum(1 for seen, _ in self.states if seen == state)

    def error(self, state: State = State.CHANNEL_ERROR) -> Exception | None:
        return next((error for seen, error in reversed(self.states) if seen == state), None)

    @property
    def readiness(self) -> int:
        return sum(
            1 for m in self.system if m.extension == "postgres_changes" and m.message == "Subscribed to PostgreSQL"
        )

    async def ready(self, count: int = 1) -> None:
        await wait_until(lambda: self.readiness >= count, what=f"readiness #{count}")

    def data(self) -> list[dict[str, Any]]:
        return [change["data"] for change in self.changes]

    def records(self) -> list[Any]:
        return [(d["type"], (d.get("record") or d.get("old_record") or {}).get("name")) for d in self.data()]

    async def close(self) -> None:
        await self.client.close()
        listen = self.client._listen_task
        if listen is not None and listen.done() and not listen.cancelled():
            listen.exception()  # retrieved, so asyncio does not log it at shutdown


@pytest.fixture
async def subscriber(server: RealtimeServer) -> AsyncIterator[Callable[..., Awaitable[Subscriber]]]:
    """`await subscriber(**options)`: a subscribed client (or not, with subscribe=False), closed afterwards."""
    made: list[Subscriber] = []

    async def make(*, subscribe: bool = True, url: str | None = None, **options: Any) -> Subscriber:
        sub = Subscriber(url or server.url, **options)
        made.append(sub)
        return await sub.subscribe() if subscribe else sub

    yield make
    for sub in made:
        await sub.close()


async def insert(db: asyncpg.Connection, name: str, description: str | None = None, stars: int = 0) -> int:
    row_id: int = await db.fetchval(
        "insert into public.projects (name, description, stars) values ($1, $2, $3) returning id",
        name,
        description,
        stars,
    )
    return row_id


async def read_by_server(server: RealtimeServer, *names: str) -> None:
    """Everything committed so far has been read from the slot; the last changes are these rows."""
    await server.flush()
    rows = [change.record or change.old_record or {} for change in server.changes]
    assert [row.get("name") for row in rows][-len(names) :] == list(names)


async def delivered(sub: Subscriber, name: str, op: str = "INSERT") -> None:
    await wait_until(lambda: (op, name) in sub.records(), what=f"{op} {name} delivered")


# ------------------------------------------------------------------------------------------ join, readiness, events


async def test_join_echoes_bindings_with_ids_then_sends_readiness(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]]
) -> None:
    sub = await subscriber(filter="stars=gte.10")
    assert [state for state, _ in sub.states] == [State.SUBSCRIBED]
    await sub.ready()

    reply = next(m for m in server.sent("phx_reply", topic=sub.topic))
    echoed = reply["payload"]["response"]["postgres_changes"]
    sent = [
        {"event": e, "schema": "public", "table": "projects", "filter": "stars=gte.10"}
        for e in ("INSERT", "UPDATE", "DELETE")
    ]
    assert echoed == [{**binding, "id": binding_id(binding)} for binding in sent]  # verbatim, in order
    assert [callback.id for callback in sub.channel.postgres_changes_callbacks] == [b["id"] for b in echoed]
    assert all(0 < b["id"] < 2**27 for b in echoed) and len({b["id"] for b in echoed}) == 3

    system = sub.system[0]
    assert (system.channel, system.extension, system.status) == ("db-changes", "postgres_changes", "ok")
    order = [m["event"] for m in server.sent(topic=sub.topic)]
    assert order.index("phx_reply") < order.index("system")
    assert set(reply) == {"topic", "event", "payload", "ref"} and reply["ref"] == "1"

    # realtime-py's heartbeat has ref null, and the reply echoes it
    await wait_until(lambda: bool(server.sent("phx_reply", topic="phoenix")), what="heartbeat reply")
    assert server.received("heartbeat")[0]["ref"] is None
    assert server.sent("phx_reply", topic="phoenix")[0]["payload"] == {"status": "ok", "response": {}}
    assert server.connections[0].heartbeats >= 1


async def test_committed_changes_arrive_with_the_real_payload(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber()
    await sub.ready()
    row_id = await insert(db, "alpha", "first")
    await db.execute("update public.projects set stars = 7 where id = $1", row_id)
    tx = db.transaction()  # rolled back: never in the stream
    await tx.start()
    await insert(db, "ghost")
    await tx.rollback()
    async with db.transaction():  # two rows, one commit timestamp
        await insert(db, "beta")
        await insert(db, "gamma")
    await db.execute("delete from public.projects where id = $1", row_id)
    await wait_until(lambda: len(sub.changes) >= 5, what="five events")

    assert sub.records() == [
        ("INSERT", "alpha"),
        ("UPDATE", "alpha"),
        ("INSERT", "beta"),
        ("INSERT", "gamma"),
        ("DELETE", None),
    ]
    ids = {b["event"]: b["id"] for b in server.channels()[0].bindings}
    inserted, updated, beta, gamma, deleted = sub.changes
    assert (
        inserted["ids"] == [ids["INSERT"]] and updated["ids"] == [ids["UPDATE"]] and deleted["ids"] == [ids["DELETE"]]
    )
    assert set(inserted["data"]) == {"schema", "table", "commit_timestamp", "type", "errors", "columns", "record"}
    assert set(updated["data"]) == {*inserted["data"], "old_record"}
    assert set(deleted["data"]) == {"schema", "table", "commit_timestamp", "type", "errors", "columns", "old_record"}
    assert inserted["data"]["record"] == {
        "id": row_id,
        "name": "alpha",
        "description": "first",
        "stars": 0,
        "version": 1,
    }
    assert updated["data"]["record"] == {
        "id": row_id,
        "name": "alpha",
        "description": "first",
        "stars": 7,
        "version": 2,
    }
    assert updated["data"]["old_record"] == {"id": row_id}  # replica identity default: the key only
    assert deleted["data"]["old_record"] == {"id": row_id}
    for data in sub.data():
        assert (data["schema"], data["table"], data["errors"], data["columns"]) == ("public", "projects", None, COLUMNS)
        assert TIMESTAMP.match(data["commit_timestamp"])
    assert beta["data"]["commit_timestamp"] == gamma["data"]["commit_timestamp"]
    wire = server.sent("postgres_changes")
    assert all(m["ref"] is None and m["topic"] == sub.topic for m in wire)
    assert [m["payload"]["data"]["type"] for m in wire] == ["INSERT", "UPDATE", "INSERT", "INSERT", "DELETE"]

    # REPLICA IDENTITY FULL: the whole old row
    await db.execute("alter table public.projects replica identity full")
    await db.execute("update public.projects set stars = 9 where name = 'beta'")
    await delivered(sub, "beta", "UPDATE")
    assert sub.changes[-1]["data"]["old_record"]["name"] == "beta"
    assert sub.changes[-1]["data"]["old_record"]["stars"] == 0


async def test_rolled_back_changes_are_never_delivered(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber()
    await sub.ready()
    tx = db.transaction()
    await tx.start()
    await insert(db, "rolled-back")
    await tx.rollback()
    await insert(db, "kept")
    await delivered(sub, "kept")
    assert sub.records() == [("INSERT", "kept")]


async def test_filters_select_rows_on_the_new_row(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber(events=(Event.All,), filter="stars=gte.10")
    await sub.ready()
    await insert(db, "small", stars=1)
    big = await insert(db, "big", stars=20)
    await db.execute("update public.projects set stars = 2 where id = $1", big)  # moves out of the filter
    await insert(db, "marker", stars=10)
    await delivered(sub, "marker")
    assert sub.records() == [("INSERT", "big"), ("INSERT", "marker")]


async def test_select_limits_the_columns_to_those_named_and_the_key(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber(subscribe=False)
    narrow: list[Any] = []
    sub.channel.on_postgres_changes(Event.Insert, narrow.append, table="projects", schema="public", select=["name"])
    await sub.subscribe()
    await sub.ready()
    row_id = await insert(db, "selected", "not selected")
    await wait_until(lambda: len(narrow) == 1 and len(sub.changes) == 1, what="both bindings fired")
    wire = server.sent("postgres_changes")
    assert len(wire) == 2  # one message per column selection
    assert narrow[0]["data"]["record"] == {"id": row_id, "name": "selected"}
    assert narrow[0]["data"]["columns"] == [{"name": "id", "type": "int8"}, {"name": "name", "type": "text"}]
    assert sub.changes[0]["data"]["record"]["description"] == "not selected"


async def test_a_change_committed_while_nobody_is_joined_is_lost(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    await insert(db, "before anyone joined")
    await read_by_server(server, "before anyone joined")  # read from the slot, and nobody to give it to
    sub = await subscriber()
    await sub.ready()
    await insert(db, "after readiness")
    await delivered(sub, "after readiness")
    assert sub.records() == [("INSERT", "after readiness")]


async def test_readiness_can_be_slow_or_missing_and_events_wait_for_it(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    server.readiness_enabled = False  # the CDC side never comes up
    sub = await subscriber()
    assert sub.count(State.SUBSCRIBED) == 1  # the library says SUBSCRIBED on the join reply alone
    await insert(db, "between join and readiness")
    await read_by_server(server, "between join and readiness")
    assert sub.system == [] and server.subscribed() == 0

    server.readiness_enabled = True
    server.readiness_delay = 0.5
    started = time.monotonic()
    server.resubscribe()
    await sub.ready()
    assert time.monotonic() - started >= 0.5
    await insert(db, "after readiness")
    await delivered(sub, "after readiness")
    assert sub.records() == [("INSERT", "after readiness")]


async def test_only_channels_joined_at_that_moment_get_a_change(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    stays = await subscriber(topic="stays")
    leaves = await subscriber(topic="leaves")
    await stays.ready()
    await leaves.ready()
    await insert(db, "both")
    await delivered(stays, "both")
    await delivered(leaves, "both")

    await leaves.channel.unsubscribe()
    await wait_until(lambda: leaves.count(State.CLOSED) == 1, what="CLOSED after leave")
    leave = server.received("phx_leave", topic=leaves.topic)[0]
    assert server.sent(topic=leaves.topic)[-2:] == [
        {"ref": leave["ref"], "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "topic": leaves.topic},
        {"ref": leave["join_ref"], "event": "phx_close", "payload": {}, "topic": leaves.topic},
    ]
    await insert(db, "one")
    await delivered(stays, "one")
    assert leaves.records() == [("INSERT", "both")]


# ------------------------------------------------------------------------------------------ auth


@pytest.mark.parametrize(
    ("token", "error"),
    [
        (None, "API key is missing"),
        ("not-a-key", "The token provided is not a valid JWT"),
        (make_jwt({"role": "service_role", "exp": 4102444800}, "another-secret"), "Failed to validate JWT signature"),
        (make_jwt({"role": "service_role", "exp": int(time.time()) - 60}), "Token has expired"),
        (make_jwt({"exp": 4102444800}), "Fields `role` and `exp` are required in JWT"),
    ],
)
async def test_the_handshake_checks_the_apikey(server: RealtimeServer, token: str | None, error: str) -> None:
    client = AsyncRealtimeClient(f"{server.url}/realtime/v1", token=token, max_retries=1)
    with pytest.raises(InvalidStatus) as refused:
        await client.connect()
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body) == {"error": error}
    assert server.connections == [] and server.refused_handshakes == 1


async def test_join_checks_the_access_token_and_set_auth_refreshes_or_ends_it(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]]
) -> None:
    bad = await subscriber(topic="bad-token", subscribe=False)
    bad.client.access_token = "garbage"  # the join's access_token; the apikey stays good
    await bad.subscribe()
    assert bad.count(State.CHANNEL_ERROR) == 1
    assert "MalformedJWT: The token provided is not a valid JWT" in str(bad.error())
    await bad.close()

    sub = await subscriber()
    await sub.ready()
    await sub.client.set_auth(make_jwt({"role": "authenticated", "exp": int(time.time()) + 600}))
    await sub.ready(2)  # a good token re-creates the subscription: a fresh readiness, and no reply
    assert [m for m in server.sent("phx_reply", topic=sub.topic) if m["ref"] != "1"] == []

    await sub.client.set_auth("not a jwt")
    await wait_until(lambda: sub.count(State.CLOSED) == 1, what="CLOSED after a bad token")
    system, close = server.sent(topic=sub.topic)[-2:]
    assert system["payload"] == {
        "channel": "db-changes",
        "extension": "system",
        "message": "The token provided is not a valid JWT",
        "status": "error",
    }
    assert close["event"] == "phx_close" and close["ref"] == "1"


async def test_an_expiring_token_closes_the_channel_at_exp(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]]
) -> None:
    token = make_jwt({"role": "authenticated", "exp": int(time.time()) + 3})
    sub = await subscriber(token=token)
    await sub.ready()
    await wait_until(lambda: sub.count(State.CLOSED) == 1, what="CLOSED at exp")
    message = server.sent("system", topic=sub.topic)[-1]["payload"]["message"]
    assert re.fullmatch(r"Token has expired \d+ seconds ago", message)


# ------------------------------------------------------------------------------------------ faults: the socket


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012])
async def test_server_close_codes_make_the_client_reconnect_and_rejoin(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection, code: int
) -> None:
    sub = await subscriber()
    await sub.ready()
    assert server.disconnect(code) == 1
    await wait_until(lambda: sub.count(State.SUBSCRIBED) == 2, what="rejoin after the close")
    await sub.ready(2)

    error = sub.error()
    assert isinstance(error, ConnectionClosed) and error.rcvd is not None and error.rcvd.code == code
    announced = [m for m in server.sent("system") if m["payload"].get("message") == "Server requested disconnect"]
    if code == 1012:
        assert announced == [
            {
                "ref": None,
                "event": "system",
                "payload": {"extension": "system", "message": "Server requested disconnect", "status": "ok"},
                "topic": sub.topic,
            }
        ]
    else:
        assert announced == []
    assert all(m.extension == "postgres_changes" for m in sub.system)  # realtime-py drops it (no `channel`)
    assert [c.close_code for c in server.all_connections] == [code, None]
    await insert(db, "after reconnect")
    await delivered(sub, "after reconnect")


async def test_a_tcp_abort_is_a_1006_for_the_client(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber()
    await sub.ready()
    assert server.abort() == 1
    await wait_until(lambda: sub.count(State.SUBSCRIBED) == 2, what="rejoin after the abort")
    error = sub.error()
    assert isinstance(error, ConnectionClosed) and error.rcvd is None  # no close frame
    await sub.ready(2)
    await insert(db, "after abort")
    await delivered(sub, "after abort")


async def test_a_frozen_link_answers_nothing_and_loses_what_it_sends(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber()
    await sub.ready()
    assert server.freeze() == 1
    await insert(db, "lost in the freeze")
    await read_by_server(server, "lost in the freeze")
    ws = sub.client._ws_connection
    assert ws is not None
    pong = await ws.ping()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(pong), 1.0)
    # the client cannot tell: still connected, still joined, nothing arrived
    assert sub.client.is_connected and sub.channel.is_joined and sub.changes == []
    assert [f.dropped for f in server.frames if f.event == "postgres_changes"] == [True]

    assert server.thaw() == 1
    await asyncio.wait_for(pong, 30)  # the buffered ping is read and answered
    await insert(db, "after the thaw")
    await delivered(sub, "after the thaw")
    assert sub.records() == [("INSERT", "after the thaw")]


@pytest.mark.parametrize("status", [503, None])
async def test_refused_reconnects_exhaust_the_client_retry_budget(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], status: int | None
) -> None:
    sub = await subscriber(max_retries=3, initial_backoff=0.1)
    await sub.ready()
    server.refuse_connections(60, status=status)
    server.disconnect(1012)
    listen = sub.client._listen_task
    assert listen is not None
    await wait_until(listen.done, what="the client giving up")
    assert not sub.client.is_connected
    assert server.refused_handshakes == 3  # max_retries attempts, then the library stops for good
    error = listen.exception()
    if status is None:
        assert error is not None and not isinstance(error, InvalidStatus)
    else:
        assert isinstance(error, InvalidStatus) and error.response.status_code == 503
    assert sub.states[-1][0] == State.CHANNEL_ERROR  # and no further callback ever comes
    server.stop_refusing()


async def test_the_server_closes_an_idle_socket_with_1000(server: RealtimeServer) -> None:
    server.idle_timeout = 0.5
    async with ws_connect(f"{server.websocket_url}?apikey={DEFAULT_API_KEY}&vsn=1.0.0", ping_interval=None) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


# ------------------------------------------------------------------------------------------ faults: the channel


async def test_phx_error_makes_the_client_rejoin(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber()
    await sub.ready()
    assert server.send_phx_error() == 1
    assert server.sent("phx_error") == [{"ref": "1", "event": "phx_error", "payload": {}, "topic": sub.topic}]
    await wait_until(lambda: sub.count(State.SUBSCRIBED) == 2, what="rejoin after phx_error")
    assert sub.count(State.CHANNEL_ERROR) == 1
    await sub.ready(2)
    assert server.channels()[0].join_ref != "1"
    await insert(db, "after phx_error")
    await delivered(sub, "after phx_error")


async def test_a_slow_join_reply(server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]]) -> None:
    server.join_reply_delay = 0.5
    started = time.monotonic()
    sub = await subscriber()
    assert time.monotonic() - started >= 0.5
    assert [state for state, _ in sub.states] == [State.SUBSCRIBED]
    await sub.ready()


async def test_a_missing_join_reply_times_out_and_the_rejoin_is_a_duplicate_join(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]]
) -> None:
    server.drop_join_replies(1)
    sub = await subscriber(timeout=3)
    assert [state for state, _ in sub.states] == [State.TIMED_OUT]
    # The library rejoins on the same socket; the server still has the first join, so Phoenix answers
    # the new join and then closes the old one: the library ends CLOSED and forgets the channel.
    await wait_until(lambda: sub.count(State.CLOSED) == 1, what="CLOSED by the duplicate join")
    assert [state for state, _ in sub.states] == [State.TIMED_OUT, State.SUBSCRIBED, State.CLOSED]
    joins = server.received("phx_join", topic=sub.topic)
    assert len(joins) == 2
    tail = [m for m in server.sent(topic=sub.topic) if m["event"] != "system"][-2:]  # readiness may follow
    assert (tail[0]["event"], tail[0]["ref"]) == ("phx_reply", joins[1]["ref"])
    assert (tail[1]["event"], tail[1]["ref"]) == ("phx_close", joins[0]["join_ref"])
    assert sub.topic not in sub.client.channels


async def test_join_errors_and_the_rate_limit_disconnect(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]]
) -> None:
    server.fail_joins("ChannelRateLimitReached: Too many channels")
    limited = await subscriber(topic="limited")
    assert "ChannelRateLimitReached: Too many channels" in str(limited.error())
    await limited.close()

    server.fail_joins("ClientJoinRateLimitReached: Too many joins per second", disconnect=True)
    sub = await subscriber()
    assert "ClientJoinRateLimitReached" in str(sub.error())
    # the socket is closed 1001; the library reconnects and rejoins the errored channel
    await wait_until(lambda: sub.count(State.SUBSCRIBED) == 1, what="rejoin after the 1001")
    assert server.all_connections[1].close_code == 1001
    await sub.ready()


async def test_a_system_error_for_an_unpublished_table_then_the_duplicate_join_trap(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    await db.execute("create table public.unpublished (id bigint primary key)")
    sub = await subscriber(table="unpublished", events=(Event.Insert,))
    await wait_until(lambda: sub.count(State.CHANNEL_ERROR) == 1, what="the system error")
    message = json.loads(str(sub.error()))
    assert message == {
        "channel": "db-changes",
        "extension": "postgres_changes",
        "message": "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the "
        "given connect parameters: [event: INSERT, schema: public, table: unpublished, filters: [], select: nil]",
        "status": "error",
    }
    # realtime-py rejoins on the same socket a second later; the duplicate join ends it CLOSED
    await wait_until(lambda: sub.count(State.CLOSED) == 1, what="CLOSED after the rejoin")
    assert [state for state, _ in sub.states] == [State.SUBSCRIBED, State.CHANNEL_ERROR, State.SUBSCRIBED, State.CLOSED]


async def test_injected_system_errors(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber()
    await sub.ready()
    assert server.send_system_error('{:error, "Too many database timeouts"}') == 1
    await wait_until(lambda: sub.count(State.CHANNEL_ERROR) == 1, what="the postgres_changes error")
    assert server.subscribed() == 0  # the subscription is gone, the channel stays
    await insert(db, "while unsubscribed")
    await read_by_server(server, "while unsubscribed")
    await wait_until(lambda: sub.count(State.CLOSED) == 1, what="CLOSED after the rejoin")

    other = await subscriber(topic="other")
    await other.ready()
    # (the server still has the first client's channel: the duplicate join left it joined there)
    message = "Realtime was unable to connect to the project database"
    assert server.send_system_error(message, extension="system", topic=other.topic) == 1
    await wait_until(lambda: other.count(State.CLOSED) == 1, what="CLOSED by a system shutdown")
    assert sub.changes == [] and other.changes == []


# ------------------------------------------------------------------------------------------ faults: events


async def test_413_events_arrive_truncated_and_400_401_events_are_dropped_by_the_client(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber()
    await sub.ready()
    server.inject_error_events(413)
    row_id = await insert(db, "big", "x" * 100)
    await delivered(sub, "big")
    data = sub.changes[-1]["data"]
    assert data["errors"] == ["Error 413: Payload Too Large"]
    assert data["record"] == {"id": row_id, "name": "big", "stars": 0, "version": 1}  # the 100-byte value is gone
    assert data["columns"] == COLUMNS and TIMESTAMP.match(data["commit_timestamp"])

    server.max_record_bytes = 200  # a record over the limit is a 413 without injection
    await insert(db, "large", "y" * 300)
    await delivered(sub, "large")
    assert sub.changes[-1]["data"]["errors"] == ["Error 413: Payload Too Large"]
    server.max_record_bytes = 1_048_576

    server.inject_error_events(401)
    await insert(db, "unauthorized")
    server.inject_error_events(400)
    await insert(db, "no primary key")
    await insert(db, "marker")
    await delivered(sub, "marker")
    assert [name for _, name in sub.records()] == ["big", "large", "marker"]
    errors = [m["payload"]["data"] for m in server.sent("postgres_changes") if m["payload"]["data"]["errors"]][-2:]
    assert errors == [
        {
            "columns": [],
            "commit_timestamp": None,
            "errors": ["Error 401: Unauthorized"],
            "record": {},
            "schema": "public",
            "table": "projects",
            "type": "INSERT",
        },
        {
            "columns": [],
            "commit_timestamp": None,
            "errors": ["Error 400: Bad Request, no primary key"],
            "record": {},
            "schema": "public",
            "table": "projects",
            "type": "INSERT",
        },
    ]


async def test_a_table_without_primary_key_gives_400_events(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    await db.execute("create table public.keyless (name text)")
    await db.execute("alter publication supabase_realtime add table public.keyless")
    sub = await subscriber(table="keyless", events=(Event.Insert,))
    await sub.ready()
    await db.execute("insert into public.keyless values ('x')")
    await wait_until(lambda: server.events_sent == 1, what="the 400 event")
    assert server.sent("postgres_changes")[0]["payload"]["data"]["errors"] == ["Error 400: Bad Request, no primary key"]
    assert sub.changes == []  # realtime-py cannot parse `commit_timestamp: null` and drops it


async def test_dropped_events_are_silently_lost(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber()
    await sub.ready()
    server.drop_events(count=2)
    await insert(db, "dropped 1")
    await insert(db, "dropped 2")
    await insert(db, "kept")
    await delivered(sub, "kept")
    server.drop_events(seconds=60)
    await insert(db, "dropped 3")
    await read_by_server(server, "dropped 3")
    server.stop_dropping()
    await insert(db, "kept again")
    await delivered(sub, "kept again")
    assert sub.records() == [("INSERT", "kept"), ("INSERT", "kept again")]
    assert server.events_dropped == 3


async def test_malformed_frames_are_skipped_and_an_oversize_frame_closes_the_socket(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber()
    await sub.ready()
    for kind in MALFORMED_KINDS:
        if kind != "oversize":
            assert server.send_malformed(kind) == 1
    await insert(db, "after the garbage")
    await delivered(sub, "after the garbage")
    listen = sub.client._listen_task
    assert listen is not None and not listen.done() and sub.channel.is_joined
    assert sub.records() == [("INSERT", "after the garbage")] and sub.count(State.SUBSCRIBED) == 1

    server.send_malformed("oversize")  # over websockets' 1 MiB default: the client closes 1009
    await wait_until(lambda: sub.count(State.SUBSCRIBED) == 2, what="rejoin after the 1009")
    error = sub.error()
    assert isinstance(error, ConnectionClosed) and error.sent is not None and error.sent.code == 1009


async def test_delayed_events(
    server: RealtimeServer, subscriber: Callable[..., Awaitable[Subscriber]], db: asyncpg.Connection
) -> None:
    sub = await subscriber()
    await sub.ready()
    server.event_delay = 0.5
    committed = time.monotonic()
    await insert(db, "late")
    await delivered(sub, "late")
    assert time.monotonic() - committed >= 0.5


# ------------------------------------------------------------------------------------------ raw protocol


async def test_phoenix_rules_for_raw_frames(server: RealtimeServer) -> None:
    url = f"{server.websocket_url}?apikey={DEFAULT_API_KEY}&vsn=1.0.0"
    async with ws_connect(url, ping_interval=None) as ws:

        async def call(topic: str, event: str, ref: str, payload: Any = None) -> dict[str, Any]:
            await ws.send(json.dumps({"topic": topic, "event": event, "payload": payload or {}, "ref": ref}))
            while True:
                message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if message["ref"] == ref:
                    assert set(message) == {"topic", "event", "payload", "ref"}
                    return message

        assert (await call("phoenix", "heartbeat", "26"))["payload"] == {"status": "ok", "response": {}}
        garbage: list[str | bytes] = [
            "{not json",
            json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}}),
            b"\x00",
        ]
        for frame in garbage:
            await ws.send(frame)  # dropped; the socket stays open
        assert (await call("phoenix", "heartbeat", "27"))["payload"]["status"] == "ok"
        assert server.connections[0].malformed_in == 3

        unmatched = {"status": "error", "response": {"reason": "unmatched topic"}}
        assert (await call("realtime:nope", "broadcast", "28"))["payload"] == unmatched
        assert (await call("realtime:nope", "phx_leave", "29"))["payload"] == {"status": "ok", "response": {}}
        assert (await call("room:lobby", "phx_join", "30"))["payload"] == unmatched
        no_name = await call("realtime:", "phx_join", "31")
        assert no_name["payload"]["response"] == {"reason": "TopicNameRequired: You must provide a topic name"}

        empty = await call("realtime:empty", "phx_join", "32", {"config": {"postgres_changes": []}})
        assert empty["payload"] == {"status": "ok", "response": {"postgres_changes": []}}
        binding = {"event": "*", "schema": "public", "table": "projects", "filter": "name=in.(a,b)"}
        joined = await call("realtime:full", "phx_join", "33", {"config": {"postgres_changes": [binding, binding]}})
        ids = [b["id"] for b in joined["payload"]["response"]["postgres_changes"]]
        assert ids[0] == ids[1] == binding_id(binding)  # identical bindings, identical ids
        await wait_until(lambda: server.subscribed("realtime:full") == 1, what="readiness of the full channel")
        assert server.sent("system", topic="realtime:empty") == []  # no bindings, no readiness

        bad_filter = {"event": "INSERT", "schema": "public", "table": "projects", "filter": "name=hey.x"}
        await call("realtime:bad", "phx_join", "34", {"config": {"postgres_changes": [bad_filter]}})
        await wait_until(lambda: bool(server.sent("system", topic="realtime:bad")), what="the filter error")
        assert server.sent("system", topic="realtime:bad")[0]["payload"]["message"].startswith(
            "Error parsing `filter` params:"
        )

    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(f"{server.websocket_url}?apikey={DEFAULT_API_KEY}&vsn=2.0.0"):
            pass
    assert refused.value.response.status_code == 400


async def test_as_a_subprocess(rt_dsn: str, db: asyncpg.Connection) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SERVER_SCRIPT),
        "--dsn",
        rt_dsn,
        "--port",
        "0",
        "--publish-table",
        "public.projects",
        stdout=asyncio.subprocess.PIPE,
    )
    sub: Subscriber | None = None
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().strip()
        assert line.startswith("READY http://127.0.0.1:")
        url = line.removeprefix("READY ")
        sub = await Subscriber(url).subscribe()
        await sub.ready()
        await insert(db, "from a subprocess")
        await delivered(sub, "from a subprocess")
        async with aiohttp.ClientSession() as session, session.get(f"{url}/_control/disconnect?code=1011") as response:
            assert response.status == 200
            assert (await response.json())["result"] == 1
        await wait_until(lambda: sub is not None and sub.count(State.SUBSCRIBED) == 2, what="rejoin after 1011")
        error = sub.error()
        assert isinstance(error, ConnectionClosed) and error.rcvd is not None and error.rcvd.code == 1011
    finally:
        if sub is not None:
            await sub.close()
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0


async def test_websocket_url_is_what_the_client_builds(server: RealtimeServer) -> None:
    client = AsyncRealtimeClient(f"{server.url}/realtime/v1", token="k")
    assert client.endpoint_url() == f"{server.websocket_url}?apikey=k&vsn=1.0.0"
