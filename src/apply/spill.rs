//! Holding a source transaction until its commit, in memory up to a bound and on disk beyond.
//!
//! Streamed transactions (protocol v2+) arrive in blocks interleaved with other transactions,
//! and only their Stream Commit says they happened; a large plain transaction can be bigger
//! than memory too. Changes are kept here per top-level xid until then.
//!
//! Invariants:
//! - Memory per process is bounded by `memory_limit` bytes of buffered messages; beyond it a
//!   transaction's records go to a file of its own under the spill directory.
//! - Records keep the (sub)transaction xid they came with, so a Stream Abort of a
//!   subtransaction drops exactly its changes, and one of the top-level xid drops everything.
//! - Replay yields the messages in arrival order; a spill file is deleted when its
//!   transaction commits, aborts, or the buffer is reset after a reconnect.
//! - Files are private scratch space, not durable state: a crash loses them, and the source
//!   re-sends every transaction that was not confirmed.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::decode::Xid;

#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("spill file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spill file {path} is truncated or corrupt")]
    Corrupt { path: PathBuf },
}

enum Store {
    Memory(Vec<(Xid, Bytes)>),
    Disk {
        path: PathBuf,
        writer: BufWriter<File>,
        records: usize,
    },
}

struct Txn {
    store: Store,
    aborted: BTreeSet<Xid>,
    bytes: usize,
}

/// Buffers of open transactions.
pub struct SpillBuffer {
    dir: PathBuf,
    memory_limit: usize,
    in_memory: usize,
    txns: HashMap<Xid, Txn>,
    next_file: u64,
}

impl SpillBuffer {
    pub fn new(dir: &Path, memory_limit: usize) -> Result<Self, SpillError> {
        std::fs::create_dir_all(dir).map_err(|source| SpillError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(SpillBuffer {
            dir: dir.to_owned(),
            memory_limit,
            in_memory: 0,
            txns: HashMap::new(),
            next_file: 0,
        })
    }

    /// Bytes currently held in memory across all open transactions.
    pub fn in_memory(&self) -> usize {
        self.in_memory
    }

    /// Whether `xid` has spilled to disk.
    pub fn is_spilled(&self, xid: Xid) -> bool {
        matches!(
            self.txns.get(&xid).map(|t| &t.store),
            Some(Store::Disk { .. })
        )
    }

    /// Appends one encoded message of (sub)transaction `sub` to top-level transaction `xid`.
    pub fn push(&mut self, xid: Xid, sub: Xid, message: Bytes) -> Result<(), SpillError> {
        let len = message.len();
        let over = self.in_memory + len > self.memory_limit;
        let txn = self.txns.entry(xid).or_insert_with(|| Txn {
            store: Store::Memory(Vec::new()),
            aborted: BTreeSet::new(),
            bytes: 0,
        });
        if over {
            if let Store::Memory(records) = &mut txn.store {
                // Move this transaction's records to disk; it is the one growing.
                let path = self.dir.join(format!("txn-{xid}-{}.spill", self.next_file));
                self.next_file += 1;
                let file = File::create(&path).map_err(|source| SpillError::Io {
                    path: path.clone(),
                    source,
                })?;
                let mut writer = BufWriter::new(file);
                let moved = std::mem::take(records);
                for (s, m) in &moved {
                    write_record(&mut writer, &path, *s, m)?;
                }
                self.in_memory -= txn.bytes;
                txn.store = Store::Disk {
                    path,
                    writer,
                    records: moved.len(),
                };
            }
        }
        match &mut txn.store {
            Store::Memory(records) => {
                records.push((sub, message));
                self.in_memory += len;
            }
            Store::Disk {
                path,
                writer,
                records,
            } => {
                write_record(writer, path, sub, &message)?;
                *records += 1;
            }
        }
        txn.bytes += len;
        Ok(())
    }

    /// Stream Abort: `sub == xid` drops the whole transaction, else only that subtransaction.
    pub fn abort(&mut self, xid: Xid, sub: Xid) {
        if sub == xid {
            if let Some(t) = self.txns.remove(&xid) {
                self.release(t);
            }
        } else if let Some(t) = self.txns.get_mut(&xid) {
            t.aborted.insert(sub);
        }
    }

    /// Commit: the transaction's messages in arrival order, minus aborted subtransactions.
    pub fn commit(&mut self, xid: Xid) -> Result<Vec<Bytes>, SpillError> {
        let Some(mut t) = self.txns.remove(&xid) else {
            return Ok(Vec::new());
        };
        let aborted = std::mem::take(&mut t.aborted);
        let out = match &mut t.store {
            Store::Memory(records) => std::mem::take(records)
                .into_iter()
                .filter(|(s, _)| !aborted.contains(s))
                .map(|(_, m)| m)
                .collect(),
            Store::Disk {
                path,
                writer,
                records,
            } => {
                writer.flush().map_err(|source| SpillError::Io {
                    path: path.clone(),
                    source,
                })?;
                read_records(path, *records, &aborted)?
            }
        };
        self.release(t);
        Ok(out)
    }

    /// Drops every open transaction (after a reconnect the server re-sends them).
    pub fn reset(&mut self) {
        for (_, t) in std::mem::take(&mut self.txns) {
            self.release(t);
        }
    }

    fn release(&mut self, t: Txn) {
        match t.store {
            Store::Memory(_) => self.in_memory -= t.bytes,
            Store::Disk { path, writer, .. } => {
                drop(writer);
                // Best effort: a leftover scratch file is harmless and cleared at start.
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Removes scratch files a previous process left behind.
    pub fn clear_dir(&self) -> Result<(), SpillError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| SpillError::Io {
            path: self.dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "spill") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }
}

impl Drop for SpillBuffer {
    fn drop(&mut self) {
        self.reset();
    }
}

fn write_record(
    w: &mut BufWriter<File>,
    path: &Path,
    sub: Xid,
    m: &[u8],
) -> Result<(), SpillError> {
    let io = |source| SpillError::Io {
        path: path.to_owned(),
        source,
    };
    let len = u32::try_from(m.len()).map_err(|_| SpillError::Corrupt {
        path: path.to_owned(),
    })?;
    w.write_all(&sub.to_be_bytes()).map_err(io)?;
    w.write_all(&len.to_be_bytes()).map_err(io)?;
    w.write_all(m).map_err(io)
}

fn read_records(
    path: &Path,
    count: usize,
    aborted: &BTreeSet<Xid>,
) -> Result<Vec<Bytes>, SpillError> {
    let io = |source| SpillError::Io {
        path: path.to_owned(),
        source,
    };
    let corrupt = || SpillError::Corrupt {
        path: path.to_owned(),
    };
    let mut r = BufReader::new(File::open(path).map_err(io)?);
    let mut out = Vec::with_capacity(count.min(1 << 20));
    for _ in 0..count {
        let mut head = [0u8; 8];
        r.read_exact(&mut head).map_err(|_| corrupt())?;
        let sub = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).map_err(|_| corrupt())?;
        if !aborted.contains(&sub) {
            out.push(Bytes::from(buf));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u32) -> Bytes {
        Bytes::from(format!("message {i} {}", "x".repeat(100)))
    }

    #[test]
    fn memory_stays_bounded_and_order_is_kept_across_the_spill() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = SpillBuffer::new(dir.path(), 1000).unwrap();
        for i in 0..100 {
            b.push(7, 7, msg(i)).unwrap();
            assert!(b.in_memory() <= 1000);
        }
        assert!(b.is_spilled(7));
        // A small transaction alongside stays in memory.
        b.push(8, 8, msg(1000)).unwrap();
        assert!(!b.is_spilled(8));
        let out = b.commit(7).unwrap();
        assert_eq!(out.len(), 100);
        assert!(out.iter().enumerate().all(|(i, m)| *m == msg(i as u32)));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "file removed"
        );
        assert_eq!(b.commit(8).unwrap(), vec![msg(1000)]);
        assert_eq!(b.in_memory(), 0);
    }

    #[test]
    fn aborted_subtransactions_are_dropped_in_memory_and_on_disk() {
        for limit in [usize::MAX, 300] {
            let dir = tempfile::tempdir().unwrap();
            let mut b = SpillBuffer::new(dir.path(), limit).unwrap();
            b.push(7, 7, msg(1)).unwrap();
            b.push(7, 9, msg(2)).unwrap();
            b.push(7, 7, msg(3)).unwrap();
            b.push(7, 10, msg(4)).unwrap();
            b.abort(7, 9);
            assert_eq!(
                b.commit(7).unwrap(),
                vec![msg(1), msg(3), msg(4)],
                "limit {limit}"
            );
        }
    }

    #[test]
    fn top_level_abort_and_reset_free_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = SpillBuffer::new(dir.path(), 250).unwrap();
        for i in 0..10 {
            b.push(1, 1, msg(i)).unwrap();
        }
        b.push(2, 2, msg(99)).unwrap();
        b.abort(1, 1);
        assert!(b.commit(1).unwrap().is_empty());
        b.reset();
        assert!(b.commit(2).unwrap().is_empty());
        assert_eq!(b.in_memory(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_damaged_spill_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = SpillBuffer::new(dir.path(), 10).unwrap();
        b.push(3, 3, msg(1)).unwrap();
        b.push(3, 3, msg(2)).unwrap();
        if let Some(Txn {
            store: Store::Disk { path, writer, .. },
            ..
        }) = b.txns.get_mut(&3)
        {
            writer.flush().unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.set_len(5).unwrap();
        }
        assert!(matches!(b.commit(3), Err(SpillError::Corrupt { .. })));
    }
}
