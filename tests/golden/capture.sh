#!/usr/bin/env bash
# Re-captures the pgoutput golden files in this directory from a real PostgreSQL server.
#
# Starts a throwaway cluster (its own data directory, unix socket only, port $PORT), runs
# DML that exercises every message kind PostgreSQL 15 can emit, reads each scenario's
# messages back with pg_logical_slot_peek_binary_changes (one row = one pgoutput message,
# exactly the payload a walsender would put in XLogData) and writes them as hex, one per
# line. The cluster is stopped and deleted on exit, whatever happens.
#
# Usage: tests/golden/capture.sh            (as root or as a normal user)
#   PGBIN=/usr/lib/postgresql/15/bin PORT=54999 override the defaults.
#
# Values that differ per run (LSNs, xids, OIDs, timestamps) are not asserted by
# tests/it/decode_golden.rs; names and column values are, so keep them when editing the SQL.
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PORT=${PORT:-54999}
OUT=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-golden.XXXXXX")

# initdb and postgres refuse to run as root.
AS_OWNER=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$WORK"
    AS_OWNER=(runuser -u postgres --)
fi

cleanup() {
    if [ -f "$WORK/data/postmaster.pid" ]; then
        "${AS_OWNER[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

"${AS_OWNER[@]}" "$PGBIN/initdb" -D "$WORK/data" -U postgres --auth=trust -E UTF8 --locale=C >"$WORK/initdb.log"
"${AS_OWNER[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w start -o "\
 -c port=$PORT -c listen_addresses='' -c unix_socket_directories='$WORK'\
 -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10\
 -c max_prepared_transactions=10 -c logical_decoding_work_mem=64kB\
 -c timezone=UTC -c datestyle='iso, mdy' -c fsync=off" >/dev/null

sql() {
    PGOPTIONS="-c client_min_messages=warning" \
        "$PGBIN/psql" -h "$WORK" -p "$PORT" -U postgres -d postgres -X -q -A -t -v ON_ERROR_STOP=1 "$@"
}

VERSION=$(sql -c "SHOW server_version")

# capture FILE SLOT PROTO OPTIONS DESCRIPTION
capture() {
    local file=$1 slot=$2 proto=$3 options=$4 description=$5
    local call="pg_logical_slot_peek_binary_changes('$slot', NULL, NULL, 'proto_version', '$proto', 'publication_names', 'golden_pub', 'messages', 'true'$options)"
    {
        echo "# pgoutput messages captured from PostgreSQL $VERSION by tests/golden/capture.sh"
        echo "# scenario: $description"
        echo "# SELECT encode(data, 'hex') FROM $call"
        echo "# decoder: proto_version=$proto streaming_parallel=false"
        echo "# One message per line, in stream order; lines starting with # are comments."
        sql -c "SELECT encode(data, 'hex') FROM $call"
    } >"$OUT/$file"
    echo "wrote $file: $(grep -vc '^#' "$OUT/$file") messages"
}

sql >/dev/null <<'SQL'
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE kinds (id int PRIMARY KEY, t text, n numeric(12,3), j jsonb, a int[],
                    ts timestamptz, b bytea, m mood);
-- EXTERNAL: out of line without compression, so an update that leaves it alone sends 'u'.
CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE full_ident (id int, v text);
ALTER TABLE full_ident REPLICA IDENTITY FULL;
CREATE TABLE by_index (id int NOT NULL, code text NOT NULL, v text);
CREATE UNIQUE INDEX by_index_code ON by_index (code);
ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_code;
CREATE TABLE no_ident (id int, v text);
ALTER TABLE no_ident REPLICA IDENTITY NOTHING;
CREATE TABLE parent (id serial PRIMARY KEY, name text);
CREATE TABLE child (id serial PRIMARY KEY, parent_id int REFERENCES parent (id));
CREATE TABLE evolving (id int PRIMARY KEY, a text);
CREATE TABLE big (id int PRIMARY KEY, payload text);
CREATE TABLE scratch (id int);
CREATE PUBLICATION golden_pub FOR ALL TABLES;
SELECT pg_replication_origin_create('upstream_a');
SQL

# --- v1: plain transactions, every row message shape ------------------------------------
sql -c "SELECT pg_create_logical_replication_slot('golden_v1', 'pgoutput')" >/dev/null
sql >/dev/null <<'SQL'
INSERT INTO kinds VALUES (1, 'hello, wörld ✓', 12345.678, '{"k": [1, 2, {"x": null}]}',
                          '{1,2,3}', '2024-02-29 12:34:56.789+00', '\xdeadbeef', 'happy');
INSERT INTO kinds (id) VALUES (2);
UPDATE kinds SET t = 'updated', n = n * 2 WHERE id = 1;
UPDATE kinds SET id = 20 WHERE id = 2;
DELETE FROM kinds WHERE id = 20;
INSERT INTO docs SELECT 1, 'v1', string_agg(md5(i::text), '') FROM generate_series(1, 400) i;
UPDATE docs SET title = 'v2' WHERE id = 1;
INSERT INTO full_ident VALUES (1, 'a');
UPDATE full_ident SET v = 'b' WHERE id = 1;
DELETE FROM full_ident WHERE id = 1;
INSERT INTO by_index VALUES (1, 'c1', 'x');
UPDATE by_index SET code = 'c2' WHERE id = 1;
INSERT INTO no_ident VALUES (1, 'n');
INSERT INTO parent (name) VALUES ('p1');
INSERT INTO child (parent_id) VALUES (1);
TRUNCATE parent RESTART IDENTITY CASCADE;
TRUNCATE full_ident;
BEGIN;
INSERT INTO kinds (id, t) VALUES (3, 'with message');
SELECT pg_logical_emit_message(true, 'switchyard', 'transactional payload');
COMMIT;
SELECT pg_logical_emit_message(false, 'switchyard', 'non-transactional payload');
SELECT pg_logical_emit_message(false, 'switchyard.bin', '\x00ff10'::bytea);
INSERT INTO evolving VALUES (1, 'before');
ALTER TABLE evolving ADD COLUMN b int DEFAULT 7;
INSERT INTO evolving VALUES (2, 'after', 8);
SELECT pg_replication_origin_session_setup('upstream_a');
BEGIN;
SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2024-01-01 00:00:00+00');
INSERT INTO kinds (id, t) VALUES (4, 'from upstream_a');
COMMIT;
SELECT pg_replication_origin_session_reset();
SQL
capture v1_dml.hex golden_v1 1 "" \
    "types, K/O old tuples, unchanged TOAST, truncate, logical messages, ALTER TABLE, origin"
capture v1_binary.hex golden_v1 1 ", 'binary', 'true'" \
    "the same changes as v1_dml.hex with binary = true"
sql -c "SELECT pg_drop_replication_slot('golden_v1')" >/dev/null

# --- v2: streamed large transactions (logical_decoding_work_mem = 64kB) -----------------
sql -c "SELECT pg_create_logical_replication_slot('golden_v2', 'pgoutput')" >/dev/null
sql >/dev/null <<'SQL'
INSERT INTO scratch VALUES (1);
BEGIN;
INSERT INTO big SELECT i, 'r' || i FROM generate_series(1, 700) i;
SELECT pg_logical_emit_message(true, 'switchyard', 'inside a streamed transaction');
TRUNCATE scratch;
SAVEPOINT sp;
INSERT INTO big SELECT i, 's' || i FROM generate_series(701, 1400) i;
ROLLBACK TO SAVEPOINT sp;
INSERT INTO big VALUES (5000, 'after rollback to savepoint');
COMMIT;
BEGIN;
INSERT INTO big SELECT i, 'a' || i FROM generate_series(10001, 10700) i;
ROLLBACK;
-- An abort record is not flushed at once and the SQL interface decodes only flushed WAL;
-- a commit flushes everything before it.
INSERT INTO scratch VALUES (2);
SQL
capture v2_stream.hex golden_v2 2 ", 'streaming', 'on'" \
    "streamed commit with a rolled-back subtransaction, streamed abort"
sql -c "SELECT pg_drop_replication_slot('golden_v2')" >/dev/null

# --- v3: two-phase commit (slot created with two_phase = true) ---------------------------
sql -c "SELECT pg_create_logical_replication_slot('golden_v3', 'pgoutput', false, true)" >/dev/null
sql >/dev/null <<'SQL'
BEGIN;
INSERT INTO kinds (id, t) VALUES (100, 'prepared then committed');
PREPARE TRANSACTION 'sy_gid_commit';
COMMIT PREPARED 'sy_gid_commit';
BEGIN;
INSERT INTO kinds (id, t) VALUES (101, 'prepared then rolled back');
PREPARE TRANSACTION 'sy_gid_rollback';
ROLLBACK PREPARED 'sy_gid_rollback';
BEGIN;
INSERT INTO big SELECT i, 'p' || i FROM generate_series(20001, 20700) i;
PREPARE TRANSACTION 'sy_gid_stream';
COMMIT PREPARED 'sy_gid_stream';
SQL
capture v3_twophase.hex golden_v3 3 ", 'two_phase', 'on', 'streaming', 'on'" \
    "prepare + commit prepared, prepare + rollback prepared, streamed prepare"
sql -c "SELECT pg_drop_replication_slot('golden_v3')" >/dev/null
