//! Decodes pgoutput messages captured from a real PostgreSQL 15 server (tests/golden/*.hex,
//! produced by tests/golden/capture.sh) and checks them against what the capture script did.
//!
//! Every line of every golden file must decode, with the stream state tracked across the
//! file as it would be on a connection, and must re-encode to the very bytes the server
//! sent: that checks the encoder against reality, not just against the decoder.
//!
//! PostgreSQL 15 speaks pgoutput protocol versions 1–3. Version 4 (PostgreSQL 16+, with the
//! abort LSN/timestamp in Stream Abort under `streaming = parallel`) is covered by the
//! property and unit tests in src/decode/ only.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use switchyard::decode::encode::encode;
use switchyard::decode::{
    Datum, Decoder, DecoderOptions, Message, OldTuple, Relation, RelationCache, RelationId,
    ReplicaIdentity, Tuple,
};
use switchyard::lsn::Lsn;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn unhex(line: &str, at: &str) -> Vec<u8> {
    assert!(line.len() % 2 == 0, "{at}: odd number of hex digits");
    (0..line.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&line[i..i + 2], 16)
                .unwrap_or_else(|e| panic!("{at}: bad hex at {i}: {e}"))
        })
        .collect()
}

/// Reads a golden file: the decoder options from its `# decoder:` header, then one message
/// per non-comment line.
fn load(name: &str) -> (DecoderOptions, Vec<Bytes>) {
    let path = golden_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut opts = None;
    let mut messages = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix("# decoder:") {
            let mut o = DecoderOptions::default();
            for kv in header.split_whitespace() {
                match kv.split_once('=') {
                    Some(("proto_version", v)) => o.proto_version = v.parse().unwrap(),
                    Some(("streaming_parallel", v)) => o.streaming_parallel = v.parse().unwrap(),
                    _ => panic!("{name}: unknown decoder option {kv:?}"),
                }
            }
            opts = Some(o);
        } else if !line.is_empty() && !line.starts_with('#') {
            messages.push(Bytes::from(unhex(line, &format!("{name}:{}", n + 1))));
        }
    }
    let opts = opts.unwrap_or_else(|| panic!("{name}: no '# decoder:' header"));
    assert!(!messages.is_empty(), "{name}: no messages");
    (opts, messages)
}

/// Decodes a whole golden file in order; every message must decode and re-encode exactly.
fn decode_file(name: &str) -> Vec<Message> {
    let (opts, raw) = load(name);
    let mut decoder = Decoder::new(opts);
    let mut out = Vec::with_capacity(raw.len());
    for (i, bytes) in raw.into_iter().enumerate() {
        let msg = decoder
            .decode(bytes.clone())
            .unwrap_or_else(|e| panic!("{name} message {}: {e}", i + 1));
        assert_eq!(
            encode(&msg, opts).freeze(),
            bytes,
            "{name} message {}: re-encoding differs from the server's bytes",
            i + 1
        );
        out.push(msg);
    }
    assert!(!decoder.in_stream(), "{name} ends inside a streamed block");
    out
}

fn text(d: &Datum) -> &str {
    match d {
        Datum::Text(b) => std::str::from_utf8(b).expect("text value is UTF-8"),
        other => panic!("expected a text value, got {other:?}"),
    }
}

fn texts(t: &Tuple) -> Vec<Option<&str>> {
    t.0.iter()
        .map(|d| match d {
            Datum::Null => None,
            d => Some(text(d)),
        })
        .collect()
}

/// Relations by name as the stream described them (last description wins).
fn relation<'a>(msgs: &'a [Message], name: &str) -> &'a Relation {
    msgs.iter()
        .rev()
        .find_map(|m| match m {
            Message::Relation(r) if r.name == name => Some(r),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Relation message for {name}"))
}

fn rows_of(msgs: &[Message], rel: RelationId) -> Vec<&Message> {
    msgs.iter()
        .filter(|m| match m {
            Message::Insert(x) => x.relation == rel,
            Message::Update(x) => x.relation == rel,
            Message::Delete(x) => x.relation == rel,
            _ => false,
        })
        .collect()
}

/// Every row message is preceded by a description of its relation with the same number of
/// columns (checked through RelationCache, as the pipeline will).
fn check_rows_against_relations(msgs: &[Message]) {
    let mut cache = RelationCache::new();
    for m in msgs {
        let (rel, tuples): (RelationId, Vec<&Tuple>) = match m {
            Message::Relation(r) => {
                cache.apply(r.clone());
                continue;
            }
            Message::Insert(x) => (x.relation, vec![&x.new]),
            Message::Update(x) => (
                x.relation,
                x.old.iter().map(OldTuple::tuple).chain([&x.new]).collect(),
            ),
            Message::Delete(x) => (x.relation, vec![x.old.tuple()]),
            Message::Truncate(t) => {
                for id in &t.relations {
                    cache.resolve(*id).unwrap();
                }
                continue;
            }
            _ => continue,
        };
        for t in tuples {
            assert_eq!(cache.columns(rel, t).unwrap().count(), t.0.len());
        }
    }
}

/// Begin/Commit (and Begin Prepare/Prepare) pair up, and the LSNs agree the way the
/// protocol says: Begin's final LSN is the commit record's LSN.
fn check_transaction_framing(msgs: &[Message]) {
    let mut open: Option<Lsn> = None;
    for m in msgs {
        match m {
            Message::Begin(b) => {
                assert!(open.is_none(), "nested Begin");
                open = Some(b.final_lsn);
            }
            Message::Commit(c) => {
                assert_eq!(
                    open.take(),
                    Some(c.commit_lsn),
                    "Commit without matching Begin"
                );
                assert!(c.end_lsn > c.commit_lsn);
            }
            Message::BeginPrepare(b) => {
                assert!(open.is_none(), "nested Begin Prepare");
                open = Some(b.prepare_lsn);
            }
            Message::Prepare(p) => {
                assert_eq!(
                    open.take(),
                    Some(p.prepare_lsn),
                    "Prepare without Begin Prepare"
                );
            }
            _ => {}
        }
    }
    assert!(open.is_none(), "transaction left open");
}

#[test]
fn every_golden_file_decodes() {
    let mut names: Vec<String> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".hex"))
        .collect();
    names.sort();
    assert!(names.len() >= 4, "golden files missing: {names:?}");
    for name in &names {
        let msgs = decode_file(name);
        check_rows_against_relations(&msgs);
        check_transaction_framing(&msgs);
    }
}

#[test]
fn v1_relation_and_type_messages() {
    let msgs = decode_file("v1_dml.hex");
    let mood = msgs
        .iter()
        .find_map(|m| match m {
            Message::Type(t) => Some(t),
            _ => None,
        })
        .expect("Type message for the enum");
    assert_eq!(
        (mood.namespace.as_str(), mood.name.as_str()),
        ("public", "mood")
    );
    assert_eq!(mood.xid, None);

    let kinds = relation(&msgs, "kinds");
    assert_eq!(kinds.namespace, "public");
    assert_eq!(kinds.replica_identity, ReplicaIdentity::Default);
    let cols: Vec<(&str, u32, bool)> = kinds
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid, c.is_key()))
        .collect();
    assert_eq!(
        cols,
        vec![
            ("id", 23, true),
            ("t", 25, false),
            ("n", 1700, false),
            ("j", 3802, false),
            ("a", 1007, false),
            ("ts", 1184, false),
            ("b", 17, false),
            ("m", mood.type_oid, false),
        ]
    );
    // numeric(12,3): ((precision << 16) | scale) + VARHDRSZ.
    assert_eq!(kinds.columns[2].type_modifier, ((12 << 16) | 3) + 4);
    assert_eq!(kinds.columns[0].type_modifier, -1);

    assert_eq!(
        relation(&msgs, "full_ident").replica_identity,
        ReplicaIdentity::Full
    );
    assert_eq!(
        relation(&msgs, "no_ident").replica_identity,
        ReplicaIdentity::Nothing
    );
    let by_index = relation(&msgs, "by_index");
    assert_eq!(by_index.replica_identity, ReplicaIdentity::Index);
    let keys: Vec<&str> = by_index
        .columns
        .iter()
        .filter(|c| c.is_key())
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(keys, ["code"]);
}

#[test]
fn v1_insert_update_delete_values() {
    let msgs = decode_file("v1_dml.hex");
    let kinds = relation(&msgs, "kinds").id;
    let rows = rows_of(&msgs, kinds);

    let Message::Insert(first) = rows[0] else {
        panic!(
            "expected the first kinds change to be an Insert: {:?}",
            rows[0]
        )
    };
    assert_eq!(first.xid, None);
    assert_eq!(
        texts(&first.new),
        vec![
            Some("1"),
            Some("hello, wörld ✓"),
            Some("12345.678"),
            Some(r#"{"k": [1, 2, {"x": null}]}"#),
            Some("{1,2,3}"),
            Some("2024-02-29 12:34:56.789+00"),
            Some("\\xdeadbeef"),
            Some("happy"),
        ]
    );

    let Message::Insert(nulls) = rows[1] else {
        panic!("expected Insert")
    };
    assert_eq!(texts(&nulls.new)[0], Some("2"));
    assert!(nulls.new.0[1..].iter().all(|d| *d == Datum::Null));

    // Key unchanged under REPLICA IDENTITY DEFAULT: no old tuple.
    let Message::Update(upd) = rows[2] else {
        panic!("expected Update")
    };
    assert_eq!(upd.old, None);
    assert_eq!(texts(&upd.new)[1..3], [Some("updated"), Some("24691.356")]);

    // Key changed: the old key comes as 'K', non-key columns null.
    let Message::Update(key_change) = rows[3] else {
        panic!("expected Update")
    };
    let Some(OldTuple::Key(old)) = &key_change.old else {
        panic!("expected a 'K' old tuple: {:?}", key_change.old)
    };
    assert_eq!(texts(old)[0], Some("2"));
    assert!(old.0[1..].iter().all(|d| *d == Datum::Null));
    assert_eq!(texts(&key_change.new)[0], Some("20"));

    let Message::Delete(del) = rows[4] else {
        panic!("expected Delete")
    };
    let OldTuple::Key(old) = &del.old else {
        panic!("expected 'K' on delete under DEFAULT identity")
    };
    assert_eq!(texts(old)[0], Some("20"));

    // Replica identity USING INDEX: old key carries the index column only.
    let by_index = relation(&msgs, "by_index").id;
    let Some(Message::Update(u)) = rows_of(&msgs, by_index).get(1).copied() else {
        panic!("expected the by_index update")
    };
    let Some(OldTuple::Key(old)) = &u.old else {
        panic!("expected 'K' old tuple for the index key change")
    };
    assert_eq!(texts(old), [None, Some("c1"), None]);
    assert_eq!(texts(&u.new), [Some("1"), Some("c2"), Some("x")]);
}

#[test]
fn v1_unchanged_toast_is_u() {
    let msgs = decode_file("v1_dml.hex");
    let docs = relation(&msgs, "docs").id;
    let rows = rows_of(&msgs, docs);
    let Message::Insert(ins) = rows[0] else {
        panic!("expected Insert")
    };
    let body = text(&ins.new.0[2]);
    assert_eq!(body.len(), 400 * 32, "the TOASTed body is 400 md5 digests");
    let Message::Update(upd) = rows[1] else {
        panic!("expected Update")
    };
    assert_eq!(upd.old, None);
    assert_eq!(text(&upd.new.0[1]), "v2");
    assert_eq!(upd.new.0[2], Datum::UnchangedToast);
}

#[test]
fn v1_replica_identity_full_sends_old_rows() {
    let msgs = decode_file("v1_dml.hex");
    let rel = relation(&msgs, "full_ident").id;
    let rows = rows_of(&msgs, rel);
    let Message::Update(upd) = rows[1] else {
        panic!("expected Update")
    };
    let Some(OldTuple::Full(old)) = &upd.old else {
        panic!("expected an 'O' old tuple: {:?}", upd.old)
    };
    assert_eq!(texts(old), [Some("1"), Some("a")]);
    assert_eq!(texts(&upd.new), [Some("1"), Some("b")]);
    let Message::Delete(del) = rows[2] else {
        panic!("expected Delete")
    };
    let OldTuple::Full(old) = &del.old else {
        panic!("expected 'O' on delete under FULL identity")
    };
    assert_eq!(texts(old), [Some("1"), Some("b")]);
}

#[test]
fn v1_truncate_options_and_relations() {
    let msgs = decode_file("v1_dml.hex");
    let truncates: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::Truncate(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(truncates.len(), 2);

    let cascade = truncates[0];
    assert_eq!(cascade.options, 0b11);
    assert!(cascade.cascade() && cascade.restart_identity());
    let mut names: Vec<&str> = cascade
        .relations
        .iter()
        .map(|id| {
            msgs.iter()
                .find_map(|m| match m {
                    Message::Relation(r) if r.id == *id => Some(r.name.as_str()),
                    _ => None,
                })
                .unwrap()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["child", "parent"]);

    let plain = truncates[1];
    assert_eq!(plain.options, 0);
    assert!(!plain.cascade() && !plain.restart_identity());
    assert_eq!(plain.relations, [relation(&msgs, "full_ident").id]);
}

#[test]
fn v1_logical_messages() {
    let msgs = decode_file("v1_dml.hex");
    let mut inside_txn = false;
    let mut seen = Vec::new();
    for m in &msgs {
        match m {
            Message::Begin(_) => inside_txn = true,
            Message::Commit(_) => inside_txn = false,
            Message::Message(lm) => {
                assert_eq!(lm.xid, None);
                assert!(lm.lsn.is_valid());
                // Transactional messages come inside their transaction, the others alone.
                assert_eq!(lm.transactional(), inside_txn, "{lm:?}");
                seen.push((lm.flags, lm.prefix.as_str(), lm.content.clone()));
            }
            _ => {}
        }
    }
    assert_eq!(
        seen,
        vec![
            (
                1,
                "switchyard",
                Bytes::from_static(b"transactional payload")
            ),
            (
                0,
                "switchyard",
                Bytes::from_static(b"non-transactional payload")
            ),
            (0, "switchyard.bin", Bytes::from_static(&[0x00, 0xff, 0x10])),
        ]
    );
}

#[test]
fn v1_relation_change_mid_stream() {
    let msgs = decode_file("v1_dml.hex");
    let mut cache = RelationCache::new();
    let mut evolving = Vec::new();
    for m in &msgs {
        if let Message::Relation(r) = m {
            let change = cache.apply(r.clone());
            if r.name == "evolving" {
                evolving.push(change);
            }
        }
    }
    assert_eq!(
        evolving.len(),
        2,
        "evolving described before and after ALTER TABLE"
    );
    assert!(evolving[0].is_new());
    let diff = evolving[1].diff().expect("ADD COLUMN is a change");
    assert!(diff.columns_changed && !diff.renamed && !diff.replica_identity_changed);
    assert_eq!(diff.previous.columns.len(), 2);

    let rel = relation(&msgs, "evolving");
    let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "a", "b"]);
    let rows = rows_of(&msgs, rel.id);
    let Message::Insert(after) = rows[1] else {
        panic!("expected Insert")
    };
    assert_eq!(texts(&after.new), [Some("2"), Some("after"), Some("8")]);
}

#[test]
fn v1_origin() {
    let msgs = decode_file("v1_dml.hex");
    let i = msgs
        .iter()
        .position(|m| matches!(m, Message::Origin(_)))
        .expect("Origin message");
    let Message::Origin(o) = &msgs[i] else {
        unreachable!()
    };
    assert_eq!(o.name, "upstream_a");
    assert_eq!(o.commit_lsn, "0/ABCDEF".parse().unwrap());
    // Sent right after the Begin of the transaction replayed from that origin.
    assert!(matches!(msgs[i - 1], Message::Begin(_)));
    let Message::Insert(ins) = &msgs[i + 1] else {
        panic!("expected the origin's insert")
    };
    assert_eq!(texts(&ins.new)[1], Some("from upstream_a"));
}

#[test]
fn v1_binary_values() {
    let msgs = decode_file("v1_binary.hex");
    let kinds = relation(&msgs, "kinds").id;
    let rows = rows_of(&msgs, kinds);
    let Message::Insert(first) = rows[0] else {
        panic!("expected Insert")
    };
    // int4 send format: 4 bytes big-endian; text send format: the UTF-8 bytes.
    assert_eq!(
        first.new.0[0],
        Datum::Binary(Bytes::from_static(&[0, 0, 0, 1]))
    );
    assert_eq!(
        first.new.0[1],
        Datum::Binary(Bytes::from("hello, wörld ✓".as_bytes()))
    );
    assert_eq!(
        first.new.0[6],
        Datum::Binary(Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef]))
    );
    let Message::Insert(nulls) = rows[1] else {
        panic!("expected Insert")
    };
    assert_eq!(nulls.new.0[1], Datum::Null);

    let docs = relation(&msgs, "docs").id;
    let Message::Update(upd) = rows_of(&msgs, docs)[1] else {
        panic!("expected Update")
    };
    assert_eq!(upd.new.0[2], Datum::UnchangedToast);
}

#[test]
fn v2_streamed_transactions() {
    let msgs = decode_file("v2_stream.hex");
    let mut in_block: Option<u32> = None;
    let mut starts: Vec<(u32, bool)> = Vec::new();
    let mut row_xids_in_blocks = 0;
    for m in &msgs {
        match m {
            Message::StreamStart(s) => {
                assert!(in_block.is_none());
                in_block = Some(s.xid);
                starts.push((s.xid, s.first_segment));
            }
            Message::StreamStop => assert!(in_block.take().is_some()),
            Message::Insert(x) => {
                assert_eq!(x.xid.is_some(), in_block.is_some(), "{x:?}");
                row_xids_in_blocks += usize::from(x.xid.is_some());
            }
            Message::Relation(r) => assert_eq!(r.xid.is_some(), in_block.is_some()),
            Message::Truncate(t) => assert_eq!(t.xid.is_some(), in_block.is_some()),
            Message::Message(lm) => assert_eq!(lm.xid.is_some(), in_block.is_some()),
            _ => {}
        }
    }
    assert!(
        row_xids_in_blocks > 1000,
        "the big transactions were streamed"
    );

    // Two streamed transactions; only each one's first block is marked first.
    let mut xids: Vec<u32> = starts.iter().map(|s| s.0).collect();
    xids.dedup();
    assert_eq!(xids.len(), 2, "{starts:?}");
    let (committed, aborted) = (xids[0], xids[1]);
    for xid in &xids {
        let flags: Vec<bool> = starts.iter().filter(|s| s.0 == *xid).map(|s| s.1).collect();
        assert!(flags[0] && flags[1..].iter().all(|f| !f), "{flags:?}");
        if *xid == committed {
            assert!(
                flags.len() >= 2,
                "the committed transaction spans several blocks"
            );
        }
    }

    let commits: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::StreamCommit(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0].xid, committed);
    assert!(commits[0].end_lsn > commits[0].commit_lsn);

    let aborts: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::StreamAbort(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(aborts.len(), 2, "{aborts:?}");
    // ROLLBACK TO SAVEPOINT inside the committed transaction aborts only the subxact...
    assert_eq!(aborts[0].xid, committed);
    assert_ne!(aborts[0].subxid, committed);
    assert_eq!(
        aborts[0].abort, None,
        "no abort LSN below protocol v4 parallel"
    );
    // ...while ROLLBACK aborts the whole second transaction.
    assert_eq!((aborts[1].xid, aborts[1].subxid), (aborted, aborted));

    // Rows written in the savepoint carry the subtransaction's xid, the others the top's.
    let subxid = aborts[0].subxid;
    let big = relation(&msgs, "big").id;
    let mut sub_rows = 0;
    let mut after_savepoint = false;
    for m in &msgs {
        if let Message::Insert(x) = m {
            if x.relation != big {
                continue;
            }
            let payload = text(&x.new.0[1]);
            if payload == "after rollback to savepoint" {
                // ROLLBACK TO SAVEPOINT re-establishes the savepoint: a new subtransaction.
                let xid = x.xid.expect("streamed");
                assert!(xid != committed && xid != subxid, "{xid}");
                after_savepoint = true;
                continue;
            }
            // Generated rows are a one-letter batch marker followed by the id.
            match payload.as_bytes()[0] {
                b's' => {
                    assert_eq!(x.xid, Some(subxid));
                    sub_rows += 1;
                }
                b'r' => assert_eq!(x.xid, Some(committed)),
                b'a' => assert_eq!(x.xid, Some(aborted)),
                _ => {}
            }
        }
    }
    assert!(
        sub_rows > 0,
        "savepoint rows were streamed before the rollback"
    );

    assert!(after_savepoint);

    let streamed_message = msgs
        .iter()
        .find_map(|m| match m {
            Message::Message(lm) => Some(lm),
            _ => None,
        })
        .unwrap();
    assert_eq!(streamed_message.xid, Some(committed));
    assert!(streamed_message.transactional());
    assert_eq!(
        &streamed_message.content[..],
        b"inside a streamed transaction"
    );

    let streamed_truncate = msgs
        .iter()
        .find_map(|m| match m {
            Message::Truncate(t) => Some(t),
            _ => None,
        })
        .unwrap();
    assert_eq!(streamed_truncate.xid, Some(committed));
    assert_eq!(streamed_truncate.relations, [relation(&msgs, "scratch").id]);
}

#[test]
fn v2_decoder_refuses_stream_messages_at_v1() {
    // The same bytes with options that do not match the connection fail loudly instead
    // of being misread.
    let (_, raw) = load("v2_stream.hex");
    let mut decoder = Decoder::new(DecoderOptions::default());
    let first_error = raw.into_iter().find_map(|b| decoder.decode(b).err());
    let err = first_error
        .expect("a v1 decoder must refuse Stream Start")
        .to_string();
    assert!(
        err.contains("Stream Start") && err.contains("version 2"),
        "{err}"
    );
}

#[test]
fn v3_two_phase() {
    let msgs = decode_file("v3_twophase.hex");
    let gid_of = |m: &Message| -> Option<(&'static str, String, u32)> {
        Some(match m {
            Message::BeginPrepare(x) => ("begin prepare", x.gid.clone(), x.xid),
            Message::Prepare(x) => ("prepare", x.gid.clone(), x.xid),
            Message::StreamPrepare(x) => ("stream prepare", x.gid.clone(), x.xid),
            Message::CommitPrepared(x) => ("commit prepared", x.gid.clone(), x.xid),
            Message::RollbackPrepared(x) => ("rollback prepared", x.gid.clone(), x.xid),
            _ => return None,
        })
    };
    let events: Vec<_> = msgs.iter().filter_map(gid_of).collect();
    let shape: Vec<(&str, &str)> = events.iter().map(|(k, g, _)| (*k, g.as_str())).collect();
    assert_eq!(
        shape,
        [
            ("begin prepare", "sy_gid_commit"),
            ("prepare", "sy_gid_commit"),
            ("commit prepared", "sy_gid_commit"),
            ("begin prepare", "sy_gid_rollback"),
            ("prepare", "sy_gid_rollback"),
            ("rollback prepared", "sy_gid_rollback"),
            ("stream prepare", "sy_gid_stream"),
            ("commit prepared", "sy_gid_stream"),
        ]
    );
    // Each GID keeps one xid from prepare to its resolution.
    for gid in ["sy_gid_commit", "sy_gid_rollback", "sy_gid_stream"] {
        let mut xids: Vec<u32> = events.iter().filter(|e| e.1 == gid).map(|e| e.2).collect();
        xids.dedup();
        assert_eq!(xids.len(), 1, "{gid}: {xids:?}");
    }

    // Rollback Prepared points back at the end of the prepare it undoes.
    let prepare_end = msgs
        .iter()
        .find_map(|m| match m {
            Message::Prepare(p) if p.gid == "sy_gid_rollback" => Some(p.end_lsn),
            _ => None,
        })
        .unwrap();
    let rollback = msgs
        .iter()
        .find_map(|m| match m {
            Message::RollbackPrepared(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(rollback.prepare_end_lsn, prepare_end);
    assert!(rollback.rollback_end_lsn > rollback.prepare_end_lsn);
    assert!(rollback.rollback_time >= rollback.prepare_time);

    // The large prepared transaction was streamed, then prepared with 'p' outside a block.
    let p = msgs
        .iter()
        .position(|m| matches!(m, Message::StreamPrepare(_)))
        .unwrap();
    assert!(matches!(msgs[p - 1], Message::StreamStop));
    let Message::StreamPrepare(sp) = &msgs[p] else {
        unreachable!()
    };
    let streamed = msgs[..p]
        .iter()
        .filter(|m| matches!(m, Message::Insert(x) if x.xid == Some(sp.xid)))
        .count();
    assert_eq!(streamed, 700);

    let kinds = relation(&msgs, "kinds").id;
    let committed: Vec<_> = rows_of(&msgs, kinds)
        .into_iter()
        .filter_map(|m| match m {
            Message::Insert(x) => Some(texts(&x.new)[1]),
            _ => None,
        })
        .collect();
    assert_eq!(
        committed,
        [
            Some("prepared then committed"),
            Some("prepared then rolled back")
        ]
    );
}

/// The fuzz seeds (fuzz/corpus/decode/seed-*) are valid streams in the fuzz target's input
/// layout, so the fuzzer starts from messages the decoder accepts.
#[test]
fn fuzz_seeds_decode_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seed-")
        {
            continue;
        }
        seeds += 1;
        let data = std::fs::read(&path).unwrap();
        let (&flags, mut rest) = data.split_first().unwrap();
        let opts = DecoderOptions {
            proto_version: 1 + u32::from(flags & 0b11),
            streaming_parallel: flags & 0b100 != 0,
        };
        let mut decoder = Decoder::new(opts);
        let mut decoded = 0;
        while let [hi, lo, body @ ..] = rest {
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            assert!(
                len <= body.len(),
                "{}: frame runs past the end",
                path.display()
            );
            let (msg, tail) = body.split_at(len);
            decoder
                .decode(Bytes::copy_from_slice(msg))
                .unwrap_or_else(|e| panic!("{} frame {decoded}: {e}", path.display()));
            decoded += 1;
            rest = tail;
        }
        assert!(rest.is_empty() && decoded > 0, "{}", path.display());
    }
    assert!(seeds >= 5, "only {seeds} seeds in {}", dir.display());
}

/// Every input of the committed fuzz corpus (the minimized result of the last long run, see
/// docs/proof.md), fed to the decoder on stable Rust in the fuzz target's layout: refused
/// messages are errors, never panics, and a refused message leaves the decoder usable.
#[test]
fn the_fuzz_corpus_replays_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let (mut inputs, mut accepted, mut refused) = (0, 0, 0);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        inputs += 1;
        let Some((&flags, mut rest)) = data.split_first() else {
            continue;
        };
        let mut decoder = Decoder::new(DecoderOptions {
            proto_version: 1 + u32::from(flags & 0b11),
            streaming_parallel: flags & 0b100 != 0,
        });
        while !rest.is_empty() {
            let (msg, tail) = match rest {
                [hi, lo, body @ ..] => {
                    let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(body.len());
                    body.split_at(len)
                }
                short => (short, &[][..]),
            };
            rest = tail;
            match decoder.decode(Bytes::copy_from_slice(msg)) {
                Ok(_) => accepted += 1,
                Err(_) => refused += 1,
            }
        }
    }
    assert!(
        inputs >= 100,
        "only {inputs} corpus inputs in {}",
        dir.display()
    );
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
}
