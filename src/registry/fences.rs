//! The fences table and the check every fence trigger calls: part of the registry's schema,
//! and of the contract applications see (a moved tenant's write fails with
//! [`MOVED_SQLSTATE`]). The triggers on the application's tables, and arming and flipping a
//! fence, are the cutover's (`cutover::fence`).
//!
//! Invariants:
//! - Every name is quoted; function bodies are string literals, never dollar-quoted text
//!   that a hostile name could close.
//! - Only a session logged in as the functions' owner (switchyard's role) can pass a fence:
//!   `session_user = current_user` inside the SECURITY DEFINER trigger functions.

use crate::sql::{quote_ident, quote_literal};

/// The SQLSTATE of a write refused because the tenant moved (class `SY`, switchyard's own).
pub const MOVED_SQLSTATE: &str = "SY001";

/// Session setting that lets switchyard's own sessions write a fenced tenant (cleanup's
/// deletes, the reverse apply); it names the one tenant it lets through, and only in a
/// session logged in as the fence's owner (any role can set a custom setting).
pub const BYPASS_SETTING: &str = "switchyard.bypass_tenant";

/// Argument of the tenant's advisory lock (`$1` is the tenant id): one 64-bit key, so two
/// tenants sharing a lock (and one's cutover pausing the other's writers) does not happen in
/// practice, as it could with a 32-bit hash of the id.
pub const LOCK_ARGS: &str = "hashtextextended('switchyard fence ' || $1, 0)";

/// The fences table and the check every fence trigger calls; part of the registry DDL.
pub fn ddl(registry_schema: &str) -> String {
    let schema = quote_ident(registry_schema);
    let body = format!(
        "DECLARE f record;
BEGIN
  IF t IS NULL THEN
    RETURN;
  END IF;
  IF session_user = current_user THEN
    IF current_setting('session_replication_role') = 'replica' OR current_setting({cleanup}, true) = t THEN
      RETURN;
    END IF;
  END IF;
  PERFORM 1 FROM {schema}.fences WHERE tenant = t;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  PERFORM pg_advisory_xact_lock_shared(hashtextextended('switchyard fence ' || t, 0));
  IF current_setting('transaction_isolation') = 'read committed' THEN
    SELECT state, location, schema_name, version INTO f FROM {schema}.fences WHERE tenant = t;
  ELSE
    SELECT state, location, schema_name, version INTO f FROM {schema}.fences WHERE tenant = t FOR SHARE;
  END IF;
  IF f.state = 'moved' THEN
    RAISE EXCEPTION USING
      ERRCODE = '{MOVED_SQLSTATE}',
      MESSAGE = format('tenant %s has moved to %s (schema %s, route version %s); this location no longer takes its writes', t, f.location, f.schema_name, f.version),
      HINT = 'Re-read {registry}.routes and write to the new location.';
  END IF;
END",
        cleanup = quote_literal(BYPASS_SETTING),
        registry = registry_schema.replace('\'', "''"),
    );
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}.fences (
  tenant text PRIMARY KEY,
  state text NOT NULL CHECK (state IN ('armed', 'moved')),
  location text,
  schema_name text,
  version bigint,
  armed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  moved_at timestamptz);
CREATE TABLE IF NOT EXISTS {schema}.fence_gates (
  tbl oid PRIMARY KEY,
  tenants text[] NOT NULL);
CREATE OR REPLACE FUNCTION {schema}.fence_gate_values(vals text[], typ regtype) RETURNS text[] \
  LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS {gate_values};
CREATE OR REPLACE FUNCTION {schema}.fence_check(t text) RETURNS void LANGUAGE plpgsql AS {};
CREATE OR REPLACE FUNCTION {schema}.fence_whole() RETURNS trigger LANGUAGE plpgsql \
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {};
CREATE OR REPLACE FUNCTION {schema}.fence_truncate() RETURNS trigger LANGUAGE plpgsql \
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {};",
        quote_literal(&body),
        quote_literal(&format!(
            "BEGIN
  PERFORM {schema}.fence_check(TG_ARGV[0]);
  IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
  RETURN NEW;
END"
        )),
        quote_literal(&truncate_body(&schema)),
        gate_values = quote_literal(GATE_VALUES_BODY),
    )
}

/// The values of `vals` that the type `typ` accepts: what a shared table's gate may list
/// (a fenced tenant of another table may not even parse as this table's tenant column).
const GATE_VALUES_BODY: &str = "DECLARE v text; ok text[] := '{}';
BEGIN
  FOREACH v IN ARRAY vals LOOP
    BEGIN
      EXECUTE format('SELECT %L::%s', v, typ);
      ok := ok || v;
    EXCEPTION WHEN others THEN NULL;
    END;
  END LOOP;
  RETURN ok;
END";

/// TRUNCATE removes every row at once, so it is checked against every fenced tenant whose
/// rows the table holds: `TG_ARGV[0]` is `whole` (every row is the tenant `TG_ARGV[1]`'s) or
/// `column` (`TG_ARGV[1]` names the tenant column). A fenced tenant's TRUNCATE takes its
/// shared lock like a row write (the cutover waits for it) and is refused once it moved.
fn truncate_body(schema: &str) -> String {
    format!(
        "DECLARE f record; present boolean;
BEGIN
  IF TG_ARGV[0] = 'whole' THEN
    PERFORM {schema}.fence_check(TG_ARGV[1]);
    RETURN NULL;
  END IF;
  FOR f IN SELECT tenant FROM {schema}.fences LOOP
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I::text = $1)', TG_RELID::regclass, TG_ARGV[1])
      INTO present USING f.tenant;
    IF present THEN
      PERFORM {schema}.fence_check(f.tenant);
    END IF;
  END LOOP;
  RETURN NULL;
END"
    )
}
