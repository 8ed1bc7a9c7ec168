#!/usr/bin/env bash
# The target's own floor for the move bench's backlog: how long the target cluster needs to
# apply the net effect of one backlog round (20,000 inserts, 40,000 updates at spread keys
# of a 1,000,000-row tenant) as set-based statements that are already built, split over
# SESSIONS connections by key, with nothing else running: no walsender, no daemon, no
# decoding. Any logical pipeline that applies those changes through SQL pays at least this
# on the target; switchyard's catch-up also needs the walsender's decoding and its own CPU
# on the same cores. See docs/benchmarks.md ("the floor").
#
# Run as root on a machine with PostgreSQL's server binaries on PATH:
#   bash docs/experiments/apply-floor.sh [ROUNDS] [SESSIONS...]
# Prints, per round and session count, the wall time from the first statement to the last
# commit and the backends' CPU (utime + stime, 10 ms ticks).
set -euo pipefail
rounds=${1:-3}
shift || true
sessions=(1 2)
[ $# -gt 0 ] && sessions=("$@")
dir=$(mktemp -d /tmp/apply-floor.XXXXXX)
chown postgres "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { su postgres -c "pg_ctl -D $dir/d -m immediate stop" >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
su postgres -c "initdb -D $dir/d -A trust" >/dev/null
su postgres -c "pg_ctl -D $dir/d -l $dir/log -o '-p $port -k $dir -c listen_addresses= -c fsync=off -c full_page_writes=off -c wal_level=logical' start" >/dev/null
P="psql -h $dir -p $port -U postgres -X -q -v ON_ERROR_STOP=1"
$P <<'SQL'
CREATE TABLE orders (
    tenant_id int NOT NULL, id bigint NOT NULL, customer text NOT NULL, status text NOT NULL,
    amount numeric(12,2) NOT NULL, created timestamptz NOT NULL, note text,
    PRIMARY KEY (tenant_id, id));
INSERT INTO orders
  SELECT 1, g, 'customer ' || (g % 5000), 'open', (g % 1000) + 0.5,
         '2026-01-01'::timestamptz + g * interval '1 s', NULL
    FROM generate_series(1, 1000000) g;
VACUUM ANALYZE orders;
SQL

# One session's share of round $1 among $2 sessions (keys with id % $2 = $3), as text
# arrays in a temporary table, then the folded statements in one transaction, after a
# barrier that starts every session at once.
session() {
  local r=$1 n=$2 k=$3
  $P <<SQL
CREATE TEMP TABLE upd AS
  WITH keys AS (
    SELECT DISTINCT id FROM (
      SELECT (i::bigint * 7919) % 1000000 + 1 AS id FROM generate_series(1, 20000) i
      UNION ALL
      SELECT (i::bigint * 104729) % 1000000 + 1 FROM generate_series(1, 20000) i) k
    WHERE id % $n = $k)
  SELECT array_agg(o.tenant_id::text ORDER BY o.id) a, array_agg(o.id::text ORDER BY o.id) b,
         array_agg(o.customer ORDER BY o.id) c, array_agg('paid'::text ORDER BY o.id) d,
         array_agg((o.amount + 1)::text ORDER BY o.id) e,
         array_agg(o.created::text ORDER BY o.id) f, array_agg('n$r'::text ORDER BY o.id) g
    FROM orders o JOIN keys USING (id) WHERE o.tenant_id = 1;
CREATE TEMP TABLE ins AS
  SELECT array_agg('1'::text) a, array_agg((10000000 * $r + i)::text ORDER BY i) b,
         array_agg('c' || i ORDER BY i) c, array_agg('new'::text) d,
         array_agg(i::text ORDER BY i) e, array_agg(now()::text) f,
         array_agg(NULL::text) g
    FROM generate_series(1, 20000) i WHERE (10000000 * $r + i) % $n = $k;
SELECT pg_backend_pid() AS pid \gset
\setenv PID :pid
\! while [ ! -e $dir/go ]; do sleep 0.001; done
\! awk '{print "cpu0", \$14 + \$15}' /proc/\$PID/stat
SELECT 'start', extract(epoch FROM clock_timestamp());
BEGIN;
UPDATE orders AS t SET customer = CAST(u.c AS text), status = CAST(u.d AS text),
    amount = CAST(u.e AS numeric(12,2)), created = CAST(u.f AS timestamptz),
    note = CAST(u.g AS text)
  FROM upd, unnest(upd.a, upd.b, upd.c, upd.d, upd.e, upd.f, upd.g) AS u(a, b, c, d, e, f, g)
  WHERE t.tenant_id = CAST(u.a AS int) AND t.id = CAST(u.b AS bigint);
INSERT INTO orders (tenant_id, id, customer, status, amount, created, note)
  SELECT CAST(u.a AS int), CAST(u.b AS bigint), u.c, u.d, CAST(u.e AS numeric(12,2)),
         CAST(u.f AS timestamptz), u.g
    FROM ins, unnest(ins.a, ins.b, ins.c, ins.d, ins.e, ins.f, ins.g) AS u(a, b, c, d, e, f, g);
COMMIT;
SELECT 'end', extract(epoch FROM clock_timestamp());
\! awk '{print "cpu1", \$14 + \$15}' /proc/\$PID/stat
SQL
}

round=1
for ((i = 0; i < rounds; i++)); do
  for n in "${sessions[@]}"; do
    rm -f "$dir/go"
    $P -c CHECKPOINT
    for ((k = 0; k < n; k++)); do
      session "$round" "$n" "$k" > "$dir/out.$k" 2>&1 &
    done
    sleep 2 # every session has built its arrays and waits at the barrier
    touch "$dir/go"
    wait
    cat "$dir"/out.* | awk -v n="$n" -v r="$round" '
      /cpu0/ {c0 += $2} /cpu1/ {c1 += $2}
      /start/ {if (s == "" || $3 < s) s = $3} /end/ {if ($3 > e) e = $3}
      END {printf "round %d sessions %d: wall %.3f s, backend CPU %.2f s\n", r, n, e - s, (c1 - c0) / 100}'
    rm -f "$dir"/out.*
    round=$((round + 1))
  done
done
