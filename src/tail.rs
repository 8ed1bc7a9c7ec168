//! `switchyard tail`: every decoded change as one JSON object per line.
//!
//! Invariants:
//! - With `ack`, a transaction's end LSN is marked durable only after its commit line has
//!   been written and stdout flushed: for tail, "durable downstream" means "printed".
//! - Without `ack` the slot never moves; a reconnect still resumes after the last
//!   printed commit, so output has no duplicates either way within one run.
//! - Values are rendered as PostgreSQL sent them (text format); unchanged TOAST columns
//!   are listed by name, never shown as NULL.

use std::io::Write;

use serde_json::{json, Map, Value};

use crate::decode::{Datum, Message, OldTuple, Relation, RelationCache, RelationId, Tuple};
use crate::lsn::Lsn;
use crate::source::{Received, SourceEvent};

/// Turns source events into JSON lines; owns the relation cache.
#[derive(Default)]
pub struct Renderer {
    relations: RelationCache,
    xid: Option<u32>,
}

/// A line to print, and the position that becomes durable once it is printed.
pub struct Line {
    pub json: Value,
    pub durable_after: Option<Lsn>,
}

impl Renderer {
    pub fn new() -> Self {
        Renderer {
            relations: RelationCache::new(),
            xid: None,
        }
    }

    pub fn render(&mut self, event: &SourceEvent) -> Line {
        match event {
            SourceEvent::Restarted {
                resume_from,
                attempt,
            } => {
                self.xid = None;
                Line {
                    json: json!({"op": "restarted", "resume_from": resume_from, "attempt": attempt}),
                    durable_after: None,
                }
            }
            SourceEvent::Message(r) => self.message(r),
        }
    }

    fn table(&self, id: RelationId) -> (Value, Option<&Relation>) {
        match self.relations.get(id) {
            Some(rel) => (json!(format!("{}.{}", rel.namespace, rel.name)), Some(rel)),
            None => (json!(format!("unknown relation {id}")), None),
        }
    }

    fn message(&mut self, r: &Received) -> Line {
        let lsn = r.wal_start;
        let mut durable_after = None;
        let json = match &r.message {
            Message::Begin(b) => {
                self.xid = Some(b.xid);
                json!({"op": "begin", "lsn": lsn, "xid": b.xid, "final_lsn": b.final_lsn, "commit_time": pg_time(b.commit_time)})
            }
            Message::Commit(c) => {
                durable_after = Some(c.end_lsn);
                let xid = self.xid.take();
                json!({"op": "commit", "lsn": lsn, "xid": xid, "commit_lsn": c.commit_lsn, "end_lsn": c.end_lsn, "commit_time": pg_time(c.commit_time)})
            }
            Message::Origin(o) => {
                json!({"op": "origin", "lsn": lsn, "name": o.name, "commit_lsn": o.commit_lsn})
            }
            Message::Relation(rel) => {
                let cols: Vec<Value> = rel
                    .columns
                    .iter()
                    .map(|c| json!({"name": c.name, "type_oid": c.type_oid, "type_modifier": c.type_modifier, "key": c.is_key()}))
                    .collect();
                let v = json!({
                    "op": "relation", "lsn": lsn, "xid": rel.xid.or(self.xid),
                    "table": format!("{}.{}", rel.namespace, rel.name),
                    "relation_id": rel.id.0,
                    "replica_identity": rel.replica_identity,
                    "columns": cols,
                });
                self.relations.apply(rel.clone());
                v
            }
            Message::Type(t) => {
                json!({"op": "type", "lsn": lsn, "type_oid": t.type_oid, "name": format!("{}.{}", t.namespace, t.name)})
            }
            Message::Insert(i) => {
                let (table, rel) = self.table(i.relation);
                let (new, toast) = tuple_json(rel, &i.new, false);
                json!({"op": "insert", "lsn": lsn, "xid": i.xid.or(self.xid), "table": table, "new": new, "unchanged_toast": toast})
            }
            Message::Update(u) => {
                let (table, rel) = self.table(u.relation);
                let (new, toast) = tuple_json(rel, &u.new, false);
                let mut v = json!({"op": "update", "lsn": lsn, "xid": u.xid.or(self.xid), "table": table, "new": new, "unchanged_toast": toast});
                if let Some(old) = &u.old {
                    old_json(&mut v, rel, old);
                }
                v
            }
            Message::Delete(d) => {
                let (table, rel) = self.table(d.relation);
                let mut v =
                    json!({"op": "delete", "lsn": lsn, "xid": d.xid.or(self.xid), "table": table});
                old_json(&mut v, rel, &d.old);
                v
            }
            Message::Truncate(t) => {
                let tables: Vec<Value> = t.relations.iter().map(|id| self.table(*id).0).collect();
                json!({"op": "truncate", "lsn": lsn, "xid": t.xid.or(self.xid), "tables": tables, "cascade": t.cascade(), "restart_identity": t.restart_identity()})
            }
            Message::Message(m) => {
                let content = match std::str::from_utf8(&m.content) {
                    Ok(s) => json!(s),
                    Err(_) => json!({"hex": hex(&m.content)}),
                };
                json!({"op": "message", "lsn": lsn, "xid": m.xid.or(if m.transactional() { self.xid } else { None }), "transactional": m.transactional(), "message_lsn": m.lsn, "prefix": m.prefix, "content": content})
            }
            Message::StreamStart(s) => {
                json!({"op": "stream_start", "lsn": lsn, "xid": s.xid, "first_segment": s.first_segment})
            }
            Message::StreamStop => json!({"op": "stream_stop", "lsn": lsn}),
            Message::StreamCommit(c) => {
                durable_after = Some(c.end_lsn);
                json!({"op": "stream_commit", "lsn": lsn, "xid": c.xid, "commit_lsn": c.commit_lsn, "end_lsn": c.end_lsn, "commit_time": pg_time(c.commit_time)})
            }
            Message::StreamAbort(a) => {
                json!({"op": "stream_abort", "lsn": lsn, "xid": a.xid, "subxid": a.subxid})
            }
            Message::BeginPrepare(b) => {
                self.xid = Some(b.xid);
                json!({"op": "begin_prepare", "lsn": lsn, "xid": b.xid, "gid": b.gid, "prepare_lsn": b.prepare_lsn, "end_lsn": b.end_lsn})
            }
            Message::Prepare(p) => {
                self.xid = None;
                json!({"op": "prepare", "lsn": lsn, "xid": p.xid, "gid": p.gid, "prepare_lsn": p.prepare_lsn, "end_lsn": p.end_lsn})
            }
            Message::StreamPrepare(p) => {
                json!({"op": "stream_prepare", "lsn": lsn, "xid": p.xid, "gid": p.gid, "prepare_lsn": p.prepare_lsn, "end_lsn": p.end_lsn})
            }
            Message::CommitPrepared(c) => {
                durable_after = Some(c.end_lsn);
                json!({"op": "commit_prepared", "lsn": lsn, "xid": c.xid, "gid": c.gid, "commit_lsn": c.commit_lsn, "end_lsn": c.end_lsn})
            }
            Message::RollbackPrepared(rb) => {
                durable_after = Some(rb.rollback_end_lsn);
                json!({"op": "rollback_prepared", "lsn": lsn, "xid": rb.xid, "gid": rb.gid, "end_lsn": rb.rollback_end_lsn})
            }
        };
        Line {
            json,
            durable_after,
        }
    }
}

fn datum_json(d: &Datum) -> Value {
    match d {
        Datum::Null | Datum::UnchangedToast => Value::Null,
        Datum::Text(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        Datum::Binary(b) => json!({"hex": hex(b)}),
    }
}

/// Column name → value, plus the names of unchanged TOAST columns. With `keys_only`,
/// only replica identity columns (the rest of a 'K' tuple is meaningless nulls).
fn tuple_json(rel: Option<&Relation>, t: &Tuple, keys_only: bool) -> (Value, Vec<String>) {
    let mut map = Map::new();
    let mut toast = Vec::new();
    for (i, d) in t.0.iter().enumerate() {
        let col = rel.and_then(|r| r.columns.get(i));
        if keys_only && !col.is_some_and(|c| c.is_key()) {
            continue;
        }
        let name = col
            .map(|c| c.name.clone())
            .unwrap_or_else(|| format!("${}", i + 1));
        if matches!(d, Datum::UnchangedToast) {
            toast.push(name);
            continue;
        }
        map.insert(name, datum_json(d));
    }
    (Value::Object(map), toast)
}

fn old_json(v: &mut Value, rel: Option<&Relation>, old: &OldTuple) {
    let (field, keys_only) = match old {
        OldTuple::Key(_) => ("key", true),
        OldTuple::Full(_) => ("old", false),
    };
    let (tuple, _) = tuple_json(rel, old.tuple(), keys_only);
    if let Value::Object(m) = v {
        m.insert(field.into(), tuple);
    }
}

/// PostgreSQL protocol time (microseconds since 2000-01-01 UTC) as RFC 3339 UTC.
pub fn pg_time(micros: i64) -> String {
    const UNIX_DAYS_AT_PG_EPOCH: i64 = 10_957;
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400) + UNIX_DAYS_AT_PG_EPOCH;
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian), era-based.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Writes lines to a buffered output, flushing at every point a reader should see at once:
/// a transaction end (before its position may be confirmed), a stream block end, anything
/// outside a transaction, and every `FLUSH_EVERY` lines of a long transaction.
pub struct Output<W: Write> {
    out: std::io::BufWriter<W>,
    unflushed: usize,
}

const FLUSH_EVERY: usize = 1024;

impl<W: Write> Output<W> {
    pub fn new(w: W) -> Self {
        Output {
            out: std::io::BufWriter::with_capacity(256 * 1024, w),
            unflushed: 0,
        }
    }

    pub fn write(&mut self, line: &Line) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, &line.json)?;
        self.out.write_all(b"\n")?;
        self.unflushed += 1;
        let boundary = line.durable_after.is_some()
            || matches!(
                line.json.get("op").and_then(Value::as_str),
                Some("stream_stop" | "stream_abort" | "restarted" | "relation")
            )
            || line.json.get("transactional") == Some(&Value::Bool(false));
        if boundary || self.unflushed >= FLUSH_EVERY {
            self.out.flush()?;
            self.unflushed = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_times_render_as_utc() {
        assert_eq!(pg_time(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(pg_time(-1), "1999-12-31T23:59:59.999999Z");
        // 2024-02-29 12:34:56.789 UTC
        assert_eq!(pg_time(762_525_296_789_000), "2024-02-29T12:34:56.789000Z");
    }

    #[test]
    fn hex_renders_bytes() {
        assert_eq!(hex(&[0, 0xff, 0x10]), "00ff10");
    }
}
