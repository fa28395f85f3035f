-- vector-sync migration 0002: the change log, and the source table in the Realtime publication.
-- Every placeholder is filled with a quoted identifier or a type from a fixed list; none stands in
-- a comment.

-- One row per committed change of the source table, written by the change trigger in the same
-- transaction, so a change and its log row commit together or not at all. The webhook sender
-- (delivery state, retries) builds on it; the daemon's safety pass reads it to find changes that
-- no event brought, with an index instead of comparing the whole table.
-- txid is the writing transaction: everything below a snapshot's xmin has finished, so "txid at or
-- above the xmin of the last pass" is every change the last pass could not yet see, whatever
-- the commit order. (Kept as bigint: every xid8 value fits, and it compares with plain parameters.)
-- It is written on every change of the user's table, so it is kept cheap: a sequential key, a
-- btree on txid (values grow, so inserts land on the rightmost page) and a BRIN index on
-- created_at, which only the hourly retention reads.
create table if not exists vector_sync.webhook_logs (
  id             bigint generated always as identity primary key,
  project_id     text not null,
  event_type     text not null check (event_type in ('INSERT', 'UPDATE', 'DELETE')),
  source_version bigint,
  txid           bigint not null default pg_current_xact_id()::text::bigint,
  created_at     timestamptz not null default now()
);
create index if not exists webhook_logs_txid_idx on vector_sync.webhook_logs (txid);
create index if not exists webhook_logs_created_at_idx on vector_sync.webhook_logs using brin (created_at);
revoke all on vector_sync.webhook_logs from public;

create or replace function vector_sync.notify_project_change_direct() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
  change jsonb;
begin
  if tg_op = 'UPDATE' and new.version is not distinct from old.version then
    return null;  -- nothing the daemon cares about changed
  end if;
  if tg_op = 'DELETE' then
    change := jsonb_build_object('type', tg_op, 'id', old.{{id_column}}, 'version', old.version);
  else
    change := jsonb_build_object('type', tg_op, 'id', new.{{id_column}}, 'version', new.version);
  end if;
  insert into vector_sync.webhook_logs (project_id, event_type, source_version)
  values (change ->> 'id', tg_op, (change ->> 'version')::bigint);
  change := change || jsonb_build_object(
    'committed_at', round(extract(epoch from clock_timestamp())::numeric, 6));
  perform pg_notify('vector_sync', change::text);
  perform vector_sync.deliver_webhook(change);
  return null;
end
$$;

-- Retention: the log is needed only until a pass has seen it (seconds to minutes); a week leaves
-- room for audits. Batched so a large backlog never holds locks for long. Returns rows deleted.
create or replace function vector_sync.prune_webhook_logs(keep interval default interval '7 days')
returns bigint
language plpgsql security definer set search_path = '' as $$
declare
  deleted bigint := 0;
  step bigint;
begin
  loop
    delete from vector_sync.webhook_logs
     where id in (select l.id from vector_sync.webhook_logs l
                   where l.created_at < now() - keep
                   limit 10000);
    get diagnostics step = row_count;
    deleted := deleted + step;
    exit when step < 10000;
  end loop;
  return deleted;
end
$$;
revoke all on function vector_sync.prune_webhook_logs(interval) from public;

-- Realtime sends changes only for tables in the supabase_realtime publication. Plain Postgres has
-- no such publication: create it (the realtime source needs logical replication there too).
do $$
declare
  all_tables boolean;
begin
  select p.puballtables into all_tables from pg_catalog.pg_publication p where p.pubname = 'supabase_realtime';
  if not found then
    create publication supabase_realtime;
    all_tables := false;
  end if;
  if not all_tables then
    begin
      alter publication supabase_realtime add table {{table}};
    exception when duplicate_object then
      null;  -- already published
    end;
  end if;
end
$$;

-- Keep the log bounded where pg_cron is installed (Supabase); elsewhere the daemon prunes it after
-- its drift passes, or a DBA schedules the function.
do $$
begin
  if exists (select 1 from pg_catalog.pg_extension where extname = 'pg_cron') then
    perform cron.schedule('vector-sync-prune-webhook-logs', '17 * * * *',
                          'select vector_sync.prune_webhook_logs()');
  else
    raise notice 'pg_cron is not installed: vector_sync.prune_webhook_logs() is not scheduled';
  end if;
end
$$;
