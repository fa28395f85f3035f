"""A stand-in for pg_net 0.20 in a test database: its SQL surface and a Python worker that sends.

`install(conn)` creates what vector-sync touches of pg_net, as pg_net 0.20.4 defines it
(supabase/pg_net sql/pg_net.sql; ../shared/docs/supabase-db-and-api.md section 1):

- `net.http_request_queue` (UNLOGGED, `id bigserial`) and `net._http_response` (UNLOGGED, indexed
  only on `created`), with the same columns;
- `net.http_post(url, body, params, headers, timeout_milliseconds)`, which adds a missing
  Content-Type, raises when it is anything but exactly `application/json`, appends the url-encoded
  params to the url and queues `convert_to(body::text, 'UTF8')`. Nothing is sent before commit: the
  queue row is only visible to the worker once the writer commits (and a rollback removes it).

It is idempotent and may run before or after the vector-sync migrations (they look the function up
at run time). `break_http_post(conn)` replaces `net.http_post` with one that raises; `install` again
repairs it.

`PgNetWorker` plays pg_net's background worker: every `poll_interval` it takes committed queue rows
(`DELETE ... RETURNING` on its own connection sees only committed rows), sends each concurrently with
aiohttp under the row's timeout, and records one `_http_response` row per request: the status and
body, or `status_code` null with curl's `error_msg` ("Timeout was reached", "Couldn't connect to
server"). Like pg_net, it leaves `timed_out` null. Unlike pg_net's worker, which waits for a whole
batch before it takes the next, a slow request here never holds up later ones (tests stay fast).

Faults: `fail_next(Fault.TIMEOUT | DROP | STRANGER, ...)` for the next matching requests; `pause()`
(requests stay queued, as with a stalled worker), `resume()`; `crash()` empties both unlogged tables,
resets the id sequence (so request ids are reused, as after crash recovery) and forgets what was in
flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiohttp
import asyncpg

PG_NET_VERSION = "0.20.4"
TIMEOUT_ERROR = "Timeout was reached"
CONNECT_ERROR = "Couldn't connect to server"
STRANGER_BODY = '{"ok": true}'

INSTALL_SQL = r"""
create schema if not exists net;

create unlogged table if not exists net.http_request_queue (
  id                   bigserial,
  method               text not null check (method in ('GET', 'POST', 'DELETE')),
  url                  text not null,
  headers              jsonb,
  body                 bytea,
  timeout_milliseconds integer not null
);

create unlogged table if not exists net._http_response (
  id           bigint,
  status_code  integer,
  content_type text,
  headers      jsonb,
  content      text,
  timed_out    boolean,
  error_msg    text,
  created      timestamptz not null default now()
);
create index if not exists _http_response_created_idx on net._http_response (created);

-- pg_net does these two in C; percent-encoding of the UTF-8 bytes is what it does too.
create or replace function net._urlencode_string(string text) returns text
language plpgsql immutable strict as $$
declare
  raw bytea := convert_to(string, 'UTF8');
  encoded text := '';
  byte integer;
begin
  for i in 0 .. length(raw) - 1 loop
    byte := get_byte(raw, i);
    if (byte between 48 and 57) or (byte between 65 and 90) or (byte between 97 and 122)
       or byte in (45, 46, 95, 126) then
      encoded := encoded || chr(byte);
    else
      encoded := encoded || '%' || upper(lpad(to_hex(byte), 2, '0'));
    end if;
  end loop;
  return encoded;
end
$$;

create or replace function net._encode_url_with_params_array(url text, params_array text[]) returns text
language sql immutable strict as $$
  select case when cardinality(params_array) = 0 then url
              else url || case when strpos(url, '?') > 0 then '&' else '?' end
                       || array_to_string(params_array, '&') end
$$;

create or replace function net.http_post(
  url text,
  body jsonb default '{}'::jsonb,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
  timeout_milliseconds integer default 5000
) returns bigint
language plpgsql volatile parallel safe as $$
declare
  request_id bigint;
  params_array text[];
  content_type text;
begin
  select header_value into content_type
    from jsonb_each_text(coalesce(headers, '{}'::jsonb)) r(header_name, header_value)
   where lower(header_name) = 'content-type'
   limit 1;
  if content_type is null then
    headers := coalesce(headers, '{}'::jsonb) || '{"Content-Type": "application/json"}'::jsonb;
  end if;
  if content_type <> 'application/json' then
    raise exception 'Content-Type header must be "application/json"';
  end if;
  select coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
    into params_array
    from jsonb_each_text(params);
  insert into net.http_request_queue (method, url, headers, body, timeout_milliseconds)
  values ('POST', net._encode_url_with_params_array(url, params_array), headers,
          convert_to(body::text, 'UTF8'), timeout_milliseconds)
  returning id into request_id;
  return request_id;
end
$$;
"""

BROKEN_HTTP_POST_SQL = """
create or replace function net.http_post(
  url text,
  body jsonb default '{}'::jsonb,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
  timeout_milliseconds integer default 5000
) returns bigint
language plpgsql volatile as $$
begin
  raise exception 'pg_net stand-in: http_post is broken on purpose';
end
$$;
"""

# Only committed rows are visible here, so nothing is taken before its transaction commits.
_TAKE = """
delete from net.http_request_queue
 where id in (select q.id from net.http_request_queue q order by q.id limit $1 for update skip locked)
returning id, method, url, headers, body, timeout_milliseconds
"""
_RECORD = """
insert into net._http_response (id, status_code, content_type, headers, content, timed_out, error_msg)
values ($1, $2, $3, $4::jsonb, $5, null, $6)
"""


async def install(conn: asyncpg.Connection) -> None:
    """Create (or repair) the stand-in's schema, tables and functions in conn's database."""
    await conn.execute(INSTALL_SQL)


async def break_http_post(conn: asyncpg.Connection) -> None:
    """Make `net.http_post` raise (same signature, so it still counts as installed)."""
    await conn.execute(BROKEN_HTTP_POST_SQL)


class Fault(enum.StrEnum):
    TIMEOUT = "timeout"  # nothing answers: after the row's timeout, error_msg 'Timeout was reached'
    DROP = "drop"  # taken off the queue and never answered (no response row at all)
    STRANGER = "stranger"  # someone else answers 200 without echoing the webhook-id (not sent to the url)


@dataclass(frozen=True, slots=True)
class Request:
    """A request as taken off the queue."""

    id: int
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    timeout_ms: int

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")


@dataclass(slots=True)
class Sent:
    """What became of one request (in the order they were taken)."""

    request: Request
    taken_at: float
    fault: Fault | None = None
    status_code: int | None = None
    error_msg: str | None = None
    content: str | None = None
    finished: bool = False


@dataclass(slots=True)
class _Rule:
    fault: Fault
    remaining: int
    match: Callable[[Request], bool]


@dataclass(slots=True)
class _Response:
    id: int
    status_code: int | None
    content_type: str | None
    headers: dict[str, str] | None
    content: str | None
    error_msg: str | None


@dataclass
class PgNetWorker:
    """pg_net's background worker, in this event loop. Use as `async with PgNetWorker(dsn) as worker`."""

    dsn: str
    poll_interval: float = 0.05
    batch_size: int = 200
    max_connections: int = 100
    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._conn: asyncpg.Connection | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._paused = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._responses: list[_Response] = []
        self._rules: list[_Rule] = []
        self._iterations = 0  # loop iterations started
        self._idle_iteration = -1  # the last iteration that found nothing to do

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        self._conn = await asyncpg.connect(self.dsn)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, force_close=True)
        )
        self._task = asyncio.create_task(self._run(), name="pg-net-standin-worker")

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            finally:
                await self._cancel_in_flight()
                if self._session is not None:
                    await self._session.close()
                if self._conn is not None:
                    await self._conn.close()

    # --- control ------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop taking requests off the queue (they stay queued); those in flight still finish."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def fail_next(self, fault: Fault, count: int = 1, match: Callable[[Request], bool] | None = None) -> None:
        """Apply `fault` to the next `count` requests taken (those `match` accepts)."""
        self._rules.append(_Rule(fault, count, match or (lambda _request: True)))

    async def crash(self) -> None:
        """As after a crash of the server: pg_net's unlogged tables come back empty and their id
        sequence restarts at 1; what the worker had in flight is never answered."""
        async with self._lock:
            await self._cancel_in_flight()
            self._responses.clear()
            assert self._conn is not None
            await self._conn.execute("truncate net.http_request_queue, net._http_response restart identity")

    async def drained(self, timeout: float = 30.0) -> None:
        """Wait until every request committed before this call is taken and its response recorded."""
        self._check_alive()
        called_at = self._iterations
        deadline = time.monotonic() + timeout
        while self._idle_iteration <= called_at:
            self._check_alive()
            if self._paused:
                raise AssertionError("the pg_net stand-in is paused: its queue cannot drain")
            if time.monotonic() > deadline:
                raise AssertionError(f"the pg_net stand-in's queue did not drain within {timeout}s")
            self._wake.set()
            await asyncio.sleep(self.poll_interval / 2)

    def _check_alive(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # raises what killed the worker
            raise AssertionError("the pg_net stand-in worker has stopped")

    # --- the worker ---------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._conn is not None
        while not self._closing:
            async with self._lock:
                self._iterations += 1
                iteration = self._iterations
                await self._flush()
                taken = []
                if not self._paused:
                    taken = await self._conn.fetch(_TAKE, self.batch_size)
                    for row in taken:
                        self._spawn(row)
                if not taken and not self._in_flight and not self._responses:
                    self._idle_iteration = iteration
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        if not self._responses:
            return
        assert self._conn is not None
        responses, self._responses = self._responses, []
        await self._conn.executemany(
            _RECORD,
            [
                (
                    r.id,
                    r.status_code,
                    r.content_type,
                    json.dumps(r.headers) if r.headers is not None else None,
                    r.content,
                    r.error_msg,
                )
                for r in responses
            ],
        )

    def _spawn(self, row: asyncpg.Record) -> None:
        headers = json.loads(row["headers"]) if row["headers"] is not None else {}
        request = Request(
            id=row["id"],
            method=row["method"],
            url=row["url"],
            headers={str(k): str(v) for k, v in headers.items()},
            body=bytes(row["body"] or b""),
            timeout_ms=row["timeout_milliseconds"],
        )
        sent = Sent(request, time.monotonic(), fault=self._fault_for(request))
        self.sent.append(sent)
        task = asyncio.create_task(self._send(sent))
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()

    def _fault_for(self, request: Request) -> Fault | None:
        for rule in self._rules:
            if rule.remaining > 0 and rule.match(request):
                rule.remaining -= 1
                return rule.fault
        return None

    async def _cancel_in_flight(self) -> None:
        tasks = list(self._in_flight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()

    async def _send(self, sent: Sent) -> None:
        request = sent.request
        timeout = request.timeout_ms / 1000
        if sent.fault is Fault.DROP:
            sent.finished = True
            return
        if sent.fault is Fault.STRANGER:
            self._answer(sent, _Response(request.id, 200, "application/json", {}, STRANGER_BODY, None))
            return
        if sent.fault is Fault.TIMEOUT:
            await asyncio.sleep(timeout)
            self._answer(sent, _Response(request.id, None, None, None, None, TIMEOUT_ERROR))
            return
        assert self._session is not None
        headers = {"User-Agent": f"pg_net/{PG_NET_VERSION}", **request.headers}
        try:
            async with self._session.request(
                request.method,
                request.url,
                data=request.body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                content = await response.text(errors="replace")
                answer = _Response(
                    request.id,
                    response.status,
                    response.headers.get("Content-Type"),
                    dict(response.headers),
                    content,
                    None,
                )
        except TimeoutError:
            answer = _Response(request.id, None, None, None, None, TIMEOUT_ERROR)
        except aiohttp.ClientConnectorError:
            answer = _Response(request.id, None, None, None, None, CONNECT_ERROR)
        except aiohttp.ClientError as exc:
            answer = _Response(request.id, None, None, None, None, f"{type(exc).__name__}: {exc}")
        self._answer(sent, answer)

    def _answer(self, sent: Sent, answer: _Response) -> None:
        sent.status_code = answer.status_code
        sent.error_msg = answer.error_msg
        sent.content = answer.content
        sent.finished = True
        self._responses.append(answer)

    # --- reading ------------------------------------------------------------------------------

    def to(self, webhook_id: str) -> list[Sent]:
        """The requests taken so far that carry `webhook_id`."""
        return [sent for sent in self.sent if sent.request.webhook_id == webhook_id]


def describe(sent: list[Sent]) -> list[dict[str, Any]]:
    """A readable summary of requests, for assertion messages."""
    return [
        {
            "id": s.request.id,
            "webhook_id": s.request.webhook_id,
            "fault": s.fault and s.fault.value,
            "status": s.status_code,
            "error": s.error_msg,
        }
        for s in sent
    ]
