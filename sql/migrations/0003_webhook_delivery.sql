-- vector-sync migration 0003: signed webhook delivery through pg_net, with retries, an audit trail
-- (webhook_logs, webhook_attempts) and a fallback queue the daemon drains (pending_webhooks).
-- Works unchanged without pg_net, pg_cron, Vault or pgcrypto: what needs a missing extension is
-- skipped (the change log still fills). Every placeholder is a quoted identifier, a quoted string
-- constant or a type from a fixed list; none stands in a comment.
--
-- Why an outbox: pg_net sends only after commit, never retries, keeps its queue and responses in
-- unlogged tables (lost in a crash) and reuses request ids after crash recovery. So each change is
-- recorded here in the writer's transaction; a reconciler (pg_cron, every 10 seconds) matches
-- pg_net's responses, retries failures and lost requests with back-off, and hands what is
-- exhausted to the daemon through pending_webhooks. A 2xx counts only when its body echoes the
-- webhook-id: a stranger answering a reused request id is not a delivery.

-- Settings, and the secrets where there is no Vault. Readable by no one but the owner.
create table if not exists vector_sync.config (
  key        text primary key,
  value      text not null,
  updated_at timestamptz not null default now()
);
revoke all on vector_sync.config from public;
insert into vector_sync.config (key, value) values
  ('max_attempts', '4'),        -- the first send and 3 retries
  ('backoff_base_s', '2'),      -- retry n waits base * 2^(n-1) seconds: 2, 4, 8
  ('http_timeout_ms', '5000'),  -- pg_net's timeout_milliseconds
  ('lost_grace_s', '30'),       -- no response this long after the timeout: the request was lost
  ('batch_size', '2000'),       -- most sends per reconciler run (pg_net sends ~200/s: a 10 s tick)
  ('log_retention', '14 days')  -- delivered and unsent log rows older than this are pruned
on conflict (key) do nothing;

alter table vector_sync.webhook_logs
  add column if not exists webhook_id       text,
  add column if not exists payload          jsonb,
  add column if not exists status           text not null default 'unsent'
    check (status in ('unsent', 'pending', 'in_flight', 'retry_wait', 'delivered', 'exhausted')),
  add column if not exists attempt_count    integer not null default 0,
  add column if not exists next_attempt_at  timestamptz,
  add column if not exists last_status_code integer,
  add column if not exists last_error       text,
  add column if not exists delivered_at     timestamptz,
  add column if not exists updated_at       timestamptz;
create index if not exists webhook_logs_due_idx
  on vector_sync.webhook_logs (next_attempt_at) where status in ('pending', 'retry_wait');
create index if not exists webhook_logs_open_idx
  on vector_sync.webhook_logs (status) where status in ('pending', 'in_flight', 'retry_wait');

-- One row per HTTP attempt; request_id is pg_net's id, which is not unique over time.
create table if not exists vector_sync.webhook_attempts (
  log_id       bigint not null references vector_sync.webhook_logs (id) on delete cascade,
  attempt_no   integer not null,
  request_id   bigint not null,
  sent_at      timestamptz not null default clock_timestamp(),
  signature_ts bigint not null,
  completed_at timestamptz,
  outcome      text check (outcome in ('success', 'http_error', 'transport_error', 'lost')),
  status_code  integer,
  error        text,
  primary key (log_id, attempt_no)
);
create index if not exists webhook_attempts_open_idx
  on vector_sync.webhook_attempts (sent_at) where completed_at is null;
revoke all on vector_sync.webhook_attempts from public;

-- Changes whose webhook failed every attempt. The daemon claims rows (FOR UPDATE SKIP LOCKED),
-- embeds them and sets resolved_at; a claim older than five minutes is taken again.
create table if not exists vector_sync.pending_webhooks (
  log_id         bigint primary key references vector_sync.webhook_logs (id) on delete cascade,
  project_id     text not null,
  event_type     text not null,
  source_version bigint,
  attempts       integer not null,
  last_error     text,
  created_at     timestamptz not null default now(),
  claimed_at     timestamptz,
  resolved_at    timestamptz
);
create index if not exists pending_webhooks_open_idx
  on vector_sync.pending_webhooks (created_at) where resolved_at is null;
revoke all on vector_sync.pending_webhooks from public;

create or replace function vector_sync.config_value(setting text, fallback text) returns text
language sql stable security definer set search_path = '' as $$
  select coalesce((select c.value from vector_sync.config c where c.key = setting), fallback)
$$;

-- A secret from Supabase Vault when it is installed, else from the config table ('secret:<name>').
create or replace function vector_sync.secret(secret_name text) returns text
language plpgsql stable security definer set search_path = '' as $$
declare
  found_value text;
begin
  if pg_catalog.to_regclass('vault.decrypted_secrets') is not null then
    execute 'select decrypted_secret from vault.decrypted_secrets where name = $1 limit 1'
      into found_value using secret_name;
  end if;
  if found_value is null then
    select c.value into found_value from vector_sync.config c where c.key = 'secret:' || secret_name;
  end if;
  return found_value;
end
$$;

-- HMAC-SHA256 (RFC 2104) on the core sha256(): plain Postgres has no pgcrypto. A key longer than
-- the 64-byte block is hashed first; the padded key is XORed byte by byte with 0x36 and 0x5c.
create or replace function vector_sync.hmac_sha256(mac_key bytea, message bytea) returns bytea
language plpgsql immutable strict security definer set search_path = '' as $$
declare
  block bytea;
  inner_key bytea;
  outer_key bytea;
  byte_index integer;
begin
  if pg_catalog.length(mac_key) > 64 then
    mac_key := pg_catalog.sha256(mac_key);
  end if;
  block := mac_key || pg_catalog.decode(pg_catalog.repeat('00', 64 - pg_catalog.length(mac_key)), 'hex');
  inner_key := block;
  outer_key := block;
  for byte_index in 0..63 loop
    inner_key := pg_catalog.set_byte(inner_key, byte_index, pg_catalog.get_byte(block, byte_index) # 54);
    outer_key := pg_catalog.set_byte(outer_key, byte_index, pg_catalog.get_byte(block, byte_index) # 92);
  end loop;
  return pg_catalog.sha256(outer_key || pg_catalog.sha256(inner_key || message));
end
$$;

-- Standard Webhooks: "v1," + base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>")), the key being
-- the base64 after "whsec_". A 32-byte MAC is 44 base64 characters: encode() never wraps it.
create or replace function vector_sync.webhook_signature(
  webhook_id text, signed_at bigint, body text, signing_secret text
) returns text
language sql immutable strict security definer set search_path = '' as $$
  select 'v1,' || pg_catalog.encode(
    vector_sync.hmac_sha256(
      pg_catalog.decode(pg_catalog.regexp_replace(signing_secret, '^whsec_', ''), 'base64'),
      pg_catalog.convert_to(webhook_id || '.' || signed_at::text || '.' || body, 'UTF8')),
    'base64')
$$;

create or replace function vector_sync.pg_net_installed() returns boolean
language sql stable security definer set search_path = '' as $$
  select pg_catalog.to_regprocedure('net.http_post(text,jsonb,jsonb,jsonb,integer)') is not null
$$;

-- Queue one HTTP attempt (pg_net sends it after this transaction commits). The webhook-id stays the
-- same across attempts; the timestamp and signature are new each time.
create or replace function vector_sync.send_webhook_attempt(
  log_id bigint, target_url text, signing_secret text
) returns bigint
language plpgsql volatile security definer set search_path = '' as $$
declare
  entry vector_sync.webhook_logs%rowtype;
  signed_at bigint := pg_catalog.floor(extract(epoch from pg_catalog.clock_timestamp()))::bigint;
  record_json jsonb;
  request_id bigint;
begin
  select * into entry from vector_sync.webhook_logs l where l.id = log_id for update;
  if not found or entry.status in ('delivered', 'exhausted', 'unsent') then
    return null;
  end if;
  if entry.webhook_id is null then
    entry.webhook_id := 'msg_' || pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', '');
    -- Thin body in the Supabase Database Webhook shape: the daemon reads the row itself.
    record_json := pg_catalog.jsonb_build_object(
      'id', pg_catalog.to_jsonb(entry.project_id::{{id_type}}), 'version', entry.source_version);
    entry.payload := pg_catalog.jsonb_build_object(
      'type', entry.event_type,
      'table', {{table_name_literal}},
      'schema', {{table_schema_literal}},
      'record', case when entry.event_type = 'DELETE' then null else record_json end,
      'old_record', case when entry.event_type = 'DELETE' then record_json else null end,
      'committed_at', pg_catalog.round(extract(epoch from entry.created_at)::numeric, 6));
  end if;
  -- pg_net sends convert_to(body::text, 'UTF8'): sign exactly that text.
  request_id := net.http_post(
    url := target_url,
    body := entry.payload,
    params := '{}'::jsonb,
    headers := pg_catalog.jsonb_build_object(
      'Content-Type', 'application/json',
      'webhook-id', entry.webhook_id,
      'webhook-timestamp', signed_at::text,
      'webhook-signature', vector_sync.webhook_signature(entry.webhook_id, signed_at, entry.payload::text, signing_secret)),
    timeout_milliseconds := vector_sync.config_value('http_timeout_ms', '5000')::integer);
  insert into vector_sync.webhook_attempts (log_id, attempt_no, request_id, signature_ts)
  values (entry.id, entry.attempt_count + 1, request_id, signed_at);
  update vector_sync.webhook_logs l
     set status = 'in_flight', attempt_count = entry.attempt_count + 1, next_attempt_at = null,
         webhook_id = entry.webhook_id, payload = entry.payload, updated_at = pg_catalog.clock_timestamp()
   where l.id = entry.id;
  return request_id;
end
$$;

-- A failed or lost attempt: retry after base * 2^(n-1) seconds, or hand the change to the daemon.
create or replace function vector_sync.webhook_attempt_failed(log_id bigint, status_code integer, error text)
returns void
language plpgsql volatile security definer set search_path = '' as $$
declare
  entry vector_sync.webhook_logs%rowtype;
  base_seconds numeric := vector_sync.config_value('backoff_base_s', '2')::numeric;
begin
  select * into entry from vector_sync.webhook_logs l where l.id = log_id for update;
  if entry.attempt_count >= vector_sync.config_value('max_attempts', '4')::integer then
    update vector_sync.webhook_logs l
       set status = 'exhausted', last_status_code = status_code, last_error = error,
           next_attempt_at = null, updated_at = pg_catalog.clock_timestamp()
     where l.id = entry.id;
    insert into vector_sync.pending_webhooks (log_id, project_id, event_type, source_version, attempts, last_error)
    values (entry.id, entry.project_id, entry.event_type, entry.source_version, entry.attempt_count, error)
    on conflict do nothing;
    perform pg_catalog.pg_notify('vector_sync_pending', entry.id::text);
  else
    update vector_sync.webhook_logs l
       set status = 'retry_wait', last_status_code = status_code, last_error = error,
           next_attempt_at = pg_catalog.clock_timestamp()
             + pg_catalog.make_interval(secs => (base_seconds * pg_catalog.power(2, entry.attempt_count - 1))::float8),
           updated_at = pg_catalog.clock_timestamp()
     where l.id = entry.id;
  end if;
end
$$;

-- Once per statement, after the row trigger has logged each change: send this transaction's new
-- log rows. One exception block for the whole statement (not one subtransaction per row), and a
-- failure to send never fails the user's write: the rows stay 'pending' for the reconciler.
create or replace function vector_sync.send_new_webhooks() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
  target_url text;
  signing_secret text;
  entry record;
begin
  if not vector_sync.pg_net_installed() then
    return null;
  end if;
  begin
    -- Inside the block too: a Vault secret that cannot be decrypted (a restore, a key change) must
    -- not fail the user's write either.
    target_url := vector_sync.secret('vector_sync_webhook_url');
    signing_secret := vector_sync.secret('vector_sync_webhook_secret');
    if target_url is null or signing_secret is null then
      return null;  -- delivery not configured (`vector-sync webhook configure`)
    end if;
    update vector_sync.webhook_logs l
       set status = 'pending', next_attempt_at = pg_catalog.clock_timestamp()
     where l.txid = pg_catalog.pg_current_xact_id()::text::bigint and l.status = 'unsent';
  exception when others then
    raise warning 'vector_sync: webhook delivery unavailable (%); changes stay logged as unsent', sqlerrm;
    return null;
  end;
  begin
    for entry in
      select l.id from vector_sync.webhook_logs l
       where l.txid = pg_catalog.pg_current_xact_id()::text::bigint and l.status = 'pending'
       order by l.id
    loop
      perform vector_sync.send_webhook_attempt(entry.id, target_url, signing_secret);
    end loop;
  exception when others then
    raise warning 'vector_sync: webhooks not queued now, the reconciler will send them: %', sqlerrm;
  end;
  return null;
end
$$;

create or replace trigger zz_vector_sync_send_webhooks
  after insert or update or delete on {{table}}
  for each statement execute function vector_sync.send_new_webhooks();

-- The reconciler: pg_cron runs it every 10 seconds; callable by hand. Returns what it did.
create or replace function vector_sync.reconcile_webhooks() returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  batch integer := vector_sync.config_value('batch_size', '2000')::integer;
  lost_after interval := pg_catalog.make_interval(secs => (
    vector_sync.config_value('http_timeout_ms', '5000')::numeric / 1000
    + vector_sync.config_value('lost_grace_s', '30')::numeric)::float8);
  target_url text;
  signing_secret text;
  oldest timestamptz;
  attempt record;
  delivered integer := 0;
  failed integer := 0;
  lost integer := 0;
  sent integer := 0;
begin
  if not vector_sync.pg_net_installed() then
    return pg_catalog.jsonb_build_object('skipped', 'pg_net is not installed');
  end if;
  if not pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('vector_sync.reconcile_webhooks')) then
    return pg_catalog.jsonb_build_object('skipped', 'another reconciler is running');
  end if;
  select pg_catalog.min(a.sent_at) into oldest from vector_sync.webhook_attempts a where a.completed_at is null;
  if oldest is not null then
    -- Responses. _http_response is indexed only on created, so the join is bounded by it.
    for attempt in
      select a.log_id, a.attempt_no, r.status_code, r.error_msg,
             (r.error_msg is null and r.status_code between 200 and 299) as ok
        from vector_sync.webhook_attempts a
        join vector_sync.webhook_logs l on l.id = a.log_id
        join net._http_response r on r.id = a.request_id and r.created >= a.sent_at - interval '1 second'
       where a.completed_at is null
         and r.created >= oldest - interval '1 second'
         and (not (r.error_msg is null and r.status_code between 200 and 299)
              or pg_catalog.strpos(coalesce(r.content, ''), '"' || l.webhook_id || '"') > 0)
    loop
      update vector_sync.webhook_attempts a
         set completed_at = pg_catalog.clock_timestamp(), status_code = attempt.status_code, error = attempt.error_msg,
             outcome = case when attempt.ok then 'success'
                            when attempt.error_msg is null then 'http_error'
                            else 'transport_error' end
       where a.log_id = attempt.log_id and a.attempt_no = attempt.attempt_no;
      if attempt.ok then
        update vector_sync.webhook_logs l
           set status = 'delivered', delivered_at = pg_catalog.clock_timestamp(),
               last_status_code = attempt.status_code, last_error = null, updated_at = pg_catalog.clock_timestamp()
         where l.id = attempt.log_id and l.status = 'in_flight';
        delivered := delivered + 1;
      else
        perform vector_sync.webhook_attempt_failed(
          attempt.log_id, attempt.status_code, coalesce(attempt.error_msg, 'HTTP ' || attempt.status_code));
        failed := failed + 1;
      end if;
    end loop;
    -- Lost: no response of ours (a 2xx without the echo is a stranger's), no longer queued, and
    -- well past the timeout (a crash emptied pg_net's unlogged tables, or the response expired).
    for attempt in
      select a.log_id, a.attempt_no
        from vector_sync.webhook_attempts a
       where a.completed_at is null
         and a.sent_at < pg_catalog.clock_timestamp() - lost_after
         and not exists (select 1 from net.http_request_queue q where q.id = a.request_id)
    loop
      update vector_sync.webhook_attempts a
         set completed_at = pg_catalog.clock_timestamp(), outcome = 'lost', error = 'no response of ours from pg_net'
       where a.log_id = attempt.log_id and a.attempt_no = attempt.attempt_no;
      perform vector_sync.webhook_attempt_failed(attempt.log_id, null, 'lost: no response of ours from pg_net');
      lost := lost + 1;
    end loop;
  end if;
  -- Everything due: retries, and first sends the trigger could not queue.
  target_url := vector_sync.secret('vector_sync_webhook_url');
  signing_secret := vector_sync.secret('vector_sync_webhook_secret');
  if target_url is not null and signing_secret is not null then
    for attempt in
      select l.id from vector_sync.webhook_logs l
       where l.status in ('pending', 'retry_wait') and l.next_attempt_at <= pg_catalog.clock_timestamp()
       order by l.next_attempt_at
       limit batch
       for update skip locked
    loop
      begin
        perform vector_sync.send_webhook_attempt(attempt.id, target_url, signing_secret);
        sent := sent + 1;
      exception when others then
        -- Counts as an attempt: a sender that can never queue (a secret that is not base64, a
        -- broken pg_net) must end in pending_webhooks, not retry for ever.
        update vector_sync.webhook_logs l set attempt_count = l.attempt_count + 1 where l.id = attempt.id;
        perform vector_sync.webhook_attempt_failed(attempt.id, null, 'could not queue: ' || left(sqlerrm, 400));
      end;
    end loop;
  end if;
  return pg_catalog.jsonb_build_object('delivered', delivered, 'failed', failed, 'lost', lost, 'sent', sent);
end
$$;

-- Retention: delivered and never-sent rows older than log_retention; rows still being delivered,
-- or waiting in pending_webhooks, are kept.
create or replace function vector_sync.prune_webhook_logs(keep interval default null)
returns bigint
language plpgsql security definer set search_path = '' as $$
declare
  cutoff timestamptz := pg_catalog.now()
    - coalesce(keep, vector_sync.config_value('log_retention', '14 days')::interval);
  deleted bigint := 0;
  step bigint;
begin
  loop
    delete from vector_sync.webhook_logs
     where id in (select l.id from vector_sync.webhook_logs l
                   where l.created_at < cutoff
                     and (l.status in ('unsent', 'delivered')
                          or (l.status = 'exhausted'
                              and not exists (select 1 from vector_sync.pending_webhooks p
                                               where p.log_id = l.id and p.resolved_at is null)))
                   limit 10000);
    get diagnostics step = row_count;
    deleted := deleted + step;
    exit when step < 10000;
  end loop;
  return deleted;
end
$$;

-- Nothing in vector_sync for anyone but its owner (and what the owner grants on purpose).
revoke all on all tables in schema vector_sync from public;
revoke all on all functions in schema vector_sync from public;
do $$
declare
  api_role text;
begin
  -- Each role on its own: PostgREST set-ups may have one without the other.
  foreach api_role in array array['anon', 'authenticated'] loop
    if exists (select 1 from pg_catalog.pg_roles where rolname = api_role) then
      execute pg_catalog.format('revoke all on schema vector_sync from %I', api_role);
      execute pg_catalog.format('revoke all on all tables in schema vector_sync from %I', api_role);
      execute pg_catalog.format('revoke all on all functions in schema vector_sync from %I', api_role);
    end if;
  end loop;
end
$$;

-- Schedules, where pg_cron is installed. Seconds schedules need pg_cron 1.5 or later; older ones get
-- a run a minute. cron.schedule with an existing name replaces the job.
do $$
declare
  cron_version text;
begin
  select e.extversion into cron_version from pg_catalog.pg_extension e where e.extname = 'pg_cron';
  if cron_version is null then
    raise notice 'pg_cron is not installed: vector_sync.prune_webhook_logs() is not scheduled (the daemon '
                 'prunes after its drift passes); call vector_sync.reconcile_webhooks() yourself to retry webhooks';
    return;
  end if;
  if pg_catalog.string_to_array(cron_version, '.')::integer[] >= array[1, 5] then
    perform cron.schedule('vector-sync-reconcile-webhooks', '10 seconds', 'select vector_sync.reconcile_webhooks()');
  else
    raise notice 'pg_cron % has no seconds schedules: the webhook reconciler runs every minute', cron_version;
    perform cron.schedule('vector-sync-reconcile-webhooks', '* * * * *', 'select vector_sync.reconcile_webhooks()');
  end if;
  perform cron.schedule('vector-sync-prune-webhook-logs', '17 * * * *', 'select vector_sync.prune_webhook_logs()');
  -- A 10-second job writes 8,640 rows a day to cron.job_run_details, which pg_cron never deletes.
  perform cron.schedule('vector-sync-prune-cron-history', '23 * * * *', $job$
    delete from cron.job_run_details
     where end_time < now() - interval '1 day'
       and jobid in (select jobid from cron.job where jobname like 'vector-sync-%')$job$);
end
$$;
