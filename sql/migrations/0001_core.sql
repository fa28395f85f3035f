-- vector-sync migration 0001: the core objects.
-- Every placeholder is filled with a quoted identifier, a type from a fixed list or a validated
-- number. None stands in a comment: a name may hold a newline, which would end the comment.

create schema if not exists vector_sync;
revoke all on schema vector_sync from public;

-- Every row carries a version; the daemon records which version each vector came from.
alter table {{table}} add column if not exists version bigint not null default 1;

-- Every row starts at version 1. A real change (any column but version) bumps the version; a no-op
-- update, or an attempt to set the version by hand, leaves it where it was: versions only ever grow.
create or replace function vector_sync.bump_version() returns trigger
language plpgsql set search_path = '' as $$
begin
  if tg_op = 'INSERT' then
    new.version := 1;
  elsif (to_jsonb(new) - 'version') is distinct from (to_jsonb(old) - 'version') then
    new.version := old.version + 1;
  else
    new.version := old.version;
  end if;
  return new;
end
$$;

-- BEFORE triggers fire in name order: "zz_" runs after any of the user's own BEFORE UPDATE triggers,
-- so their edits are part of the change it sees.
create or replace trigger zz_vector_sync_bump_version
  before insert or update on {{table}}
  for each row execute function vector_sync.bump_version();

create table if not exists vector_sync.project_embeddings (
  project_id     {{id_type}} primary key references {{table}} ({{id_column}}) on delete cascade,
  version        bigint not null check (version >= 1),
  content_sha256 text not null,
  model          text not null,
  embedding      {{vector_type}} not null,
  embedded_at    timestamptz not null default clock_timestamp(),
  committed_at   timestamptz
);
create index if not exists project_embeddings_embedding_idx
  on vector_sync.project_embeddings using hnsw (embedding {{vector_opclass}});

-- A vector tells about its row's text, so it is visible exactly where its source row is: a role
-- granted select here still sees only the vectors of rows that row level security lets it read.
-- (The daemon, as the table's owner, is not subject to this.)
alter table vector_sync.project_embeddings enable row level security;
drop policy if exists follows_source_row on vector_sync.project_embeddings;
create policy follows_source_row on vector_sync.project_embeddings
  using (exists (select 1 from {{table}} t where t.{{id_column}} = project_id));

create table if not exists vector_sync.dead_letters (
  project_id     {{id_type}} primary key references {{table}} ({{id_column}}) on delete cascade,
  version        bigint not null,
  content_sha256 text not null,
  model          text not null,
  error          text not null,
  attempts       integer not null default 1,
  first_failed_at timestamptz not null default now(),
  last_failed_at  timestamptz not null default now()
);

-- Where the webhook sender plugs in (migration 0002 and later replace this body). A failure to send
-- must never fail the user's write, so callers get no error from here.
create or replace function vector_sync.deliver_webhook(change jsonb) returns void
language plpgsql security definer set search_path = '' as $$
begin
  return;
end
$$;

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
  change := change || jsonb_build_object(
    'committed_at', round(extract(epoch from clock_timestamp())::numeric, 6));
  perform pg_notify('vector_sync', change::text);
  perform vector_sync.deliver_webhook(change);
  return null;
end
$$;

create or replace trigger projects_change_trigger
  after insert or update or delete on {{table}}
  for each row execute function vector_sync.notify_project_change_direct();

-- Similarity search for applications. SECURITY INVOKER and joined with the source table, so the
-- caller's row level security on the source table decides which rows come back. An iterative index
-- scan (pgvector 0.8) keeps reading past rows the caller may not see, so match_count rows come back
-- when they exist.
create or replace function public.match_projects(
  query_embedding {{vector_type}},
  match_count integer default 10,
  min_similarity double precision default 0
) returns table (id {{id_type}}, similarity double precision)
language sql stable security invoker set search_path = '' {{search_settings}} as $$
  select t.{{id_column}}, 1 - (e.embedding operator({{vector_schema}}.<=>) query_embedding)
    from vector_sync.project_embeddings e
    join {{table}} t on t.{{id_column}} = e.project_id
   where 1 - (e.embedding operator({{vector_schema}}.<=>) query_embedding) >= min_similarity
   order by e.embedding operator({{vector_schema}}.<=>) query_embedding
   limit least(greatest(match_count, 0), 1000)
$$;
revoke all on function public.match_projects({{vector_type}}, integer, double precision) from public;
