-- vector-sync migration 0002: the change log, and the source table in the Realtime publication.
-- Every placeholder is filled with a quoted identifier, a quoted string constant or a type from a
-- fixed list; none stands in a comment.

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
  return null;
end
$$;
-- The webhook sender is a statement-level trigger (migration 0003), not a call per row.
drop function if exists vector_sync.deliver_webhook(jsonb);

-- Retention (vector_sync.prune_webhook_logs and its pg_cron job) comes with the delivery states
-- it must respect, in migration 0003.

-- Realtime sends changes only for tables in the supabase_realtime publication. Plain Postgres has
-- no such publication: create it (the realtime source needs logical replication there too).
-- A published table without a usable replica identity refuses every UPDATE and DELETE, so such a
-- table (a unique id but no primary key) is left out with a notice instead of being broken. A
-- publication the migrating role may not alter is left alone with a notice too.
do $$
declare
  all_tables boolean;
  identity "char";
  has_primary_key boolean;
  column_list boolean := false;
  publication_exists boolean;
begin
  select c.relreplident, exists (select 1 from pg_catalog.pg_index i where i.indrelid = c.oid and i.indisprimary)
    into identity, has_primary_key
    from pg_catalog.pg_class c where c.oid = pg_catalog.to_regclass({{table_literal}});
  if identity = 'n' or (identity = 'd' and not has_primary_key) then
    raise notice 'vector_sync: the source table has no primary key or replica identity; not added to the '
                 'supabase_realtime publication (the realtime source needs it)';
    return;
  end if;
  select p.puballtables into all_tables from pg_catalog.pg_publication p where p.pubname = 'supabase_realtime';
  publication_exists := found;
  begin
    if not publication_exists then
      create publication supabase_realtime;
      all_tables := false;
    end if;
    if not all_tables then
      alter publication supabase_realtime add table {{table}};
    end if;
  exception
    when duplicate_object then
      null;  -- already published
    when insufficient_privilege then
      raise notice 'vector_sync: not allowed to alter publication supabase_realtime; add the table to it yourself';
      return;
  end;
  if pg_catalog.current_setting('server_version_num')::integer >= 150000 then
    execute 'select exists (select 1 from pg_catalog.pg_publication_rel r join pg_catalog.pg_publication p
                             on p.oid = r.prpubid
                            where p.pubname = ''supabase_realtime'' and r.prrelid = $1::regclass
                              and (r.prattrs is not null or r.prqual is not null))'
      into column_list using pg_catalog.to_regclass({{table_literal}});
  end if;
  if column_list then
    raise notice 'vector_sync: supabase_realtime publishes the source table with a column list or row filter; '
                 'events may lack the id or version, or be missing (the drift pass still finds the changes)';
  end if;
end
$$;
