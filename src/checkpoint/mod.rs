//! Checkpoints in RocksDB (`state/`): the slot's identity and confirmed position, and per
//! tenant their move state, backfill cursors and applied positions.
//!
//! ```text
//!   s:meta                       SlotRecord (which slot on which cluster)
//!   s:confirmed                  Lsn, big-endian: the furthest position the slot may have
//!                                been confirmed to (recorded before the stream may confirm it)
//!   s:ceiling                    present once every confirmation is recorded first (state
//!                                directories of earlier versions confirmed past s:confirmed)
//!   t:<tenant>\0state            the tenant's move record (JSON, owned by the move engine)
//!   t:<tenant>\0applied          Lsn: last source position durable on the tenant's target
//!   t:<tenant>\0cursor\0<table>  backfill cursor of one table (JSON)
//!   t:<tenant>\0gap              SlotGap: the slot was found confirmed past what this
//!                                directory recorded while the tenant was moving (JSON)
//! ```
//!
//! Invariants:
//! - Every write is synced (WAL fsync) before it is acknowledged: a checkpoint that returned
//!   (or that the [`Writer`] reported) is on disk, so a crash can only lose work that was
//!   never acknowledged. The writer's unsynced writes are acknowledged only after the synced
//!   write that follows them.
//! - Positions only move forward: `s:confirmed` and `applied` writes that would go back are
//!   ignored, so a late or replayed writer cannot rewind a resume point.
//! - A [`Batch`] commits atomically: a tenant's cursor and applied position never disagree.
//! - With `s:ceiling` present, the slot's confirmed position is never past `s:confirmed`
//!   unless something other than this daemon moved it: the stream confirms only up to
//!   what was recorded here.
//! - Tenant ids contain no NUL (see [`TenantId`]), so NUL separates key parts unambiguously.
//! - One process per state dir: RocksDB's lock makes a second opener fail with a clear error.

use std::path::{Path, PathBuf};

use rocksdb::{IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::tenant::TenantId;

pub mod writer;
pub use writer::{SlotGate, Writer, Written};

/// Errors of the checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("state directory {path} is in use by another switchyard process (RocksDB lock held)")]
    Locked { path: PathBuf },
    #[error("cannot open state directory {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("state store: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("state store key {key:?} holds an unreadable value: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("cannot start the checkpoint writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the checkpoint writer has stopped")]
    WriterGone,
    #[error("the checkpoint writer stopped after an earlier failed write: {0}")]
    Stopped(String),
    #[error("cannot create state directory {path} (mode 0700): {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which slot, on which cluster, this state belongs to. Recorded when the slot is created;
/// from then on a missing slot or a different cluster is a fatal error, never a fresh start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub slot: String,
    pub system_id: String,
    pub database: String,
    pub created_lsn: Lsn,
}

const SLOT_META: &[u8] = b"s:meta";
const SLOT_CONFIRMED: &[u8] = b"s:confirmed";
const SLOT_CEILING: &[u8] = b"s:ceiling";

/// Source changes a tenant's move never received: the slot was found confirmed to `to`
/// at a start, while this directory had recorded (so its daemon confirmed) only `from`.
/// Dropped with the tenant's other records when the move starts over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotGap {
    pub from: Lsn,
    pub to: Lsn,
}

fn tenant_prefix(tenant: &TenantId) -> Vec<u8> {
    let mut k = b"t:".to_vec();
    k.extend_from_slice(tenant.as_str().as_bytes());
    k.push(0);
    k
}

fn tenant_key(tenant: &TenantId, part: &str) -> Vec<u8> {
    let mut k = tenant_prefix(tenant);
    k.extend_from_slice(part.as_bytes());
    k
}

fn cursor_key(tenant: &TenantId, table: &str) -> Vec<u8> {
    let mut k = tenant_key(tenant, "cursor");
    k.push(0);
    k.extend_from_slice(table.as_bytes());
    k
}

fn printable(key: &[u8]) -> String {
    String::from_utf8_lossy(key).replace('\0', "/")
}

fn decode_lsn(key: &[u8], bytes: &[u8]) -> Result<Lsn, CheckpointError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| CheckpointError::Corrupt {
        key: printable(key),
        detail: format!("{} bytes where an 8-byte LSN belongs", bytes.len()),
    })?;
    Ok(Lsn::from_be_bytes(arr))
}

fn decode_json<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, CheckpointError> {
    serde_json::from_slice(bytes).map_err(|e| CheckpointError::Corrupt {
        key: printable(key),
        detail: e.to_string(),
    })
}

fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain data types cannot fail (no maps with non-string keys).
    serde_json::to_vec(value).expect("checkpoint records are plain serializable data")
}

/// The checkpoint store.
pub struct Store {
    db: DB,
    path: PathBuf,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, CheckpointError> {
        // The state names slots, tenants and positions: readable by its owner only. An
        // existing directory keeps the mode its operator gave it.
        if !path.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|source| CheckpointError::Create {
                    path: path.to_owned(),
                    source,
                })?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Small, write-mostly state: keep the footprint modest.
        opts.set_max_open_files(64);
        opts.set_keep_log_file_num(4);
        let db = DB::open(&opts, path).map_err(|source| {
            if source.to_string().contains("lock") {
                CheckpointError::Locked {
                    path: path.to_owned(),
                }
            } else {
                CheckpointError::Open {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        Ok(Store {
            db,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_options(sync: bool) -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(sync);
        w
    }

    fn get_lsn(&self, key: &[u8]) -> Result<Option<Lsn>, CheckpointError> {
        self.db
            .get_pinned(key)?
            .map(|v| decode_lsn(key, &v))
            .transpose()
    }

    fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, CheckpointError> {
        self.db
            .get_pinned(key)?
            .map(|v| decode_json(key, &v))
            .transpose()
    }

    pub fn slot(&self) -> Result<Option<SlotRecord>, CheckpointError> {
        self.get_json(SLOT_META)
    }

    /// The furthest position the slot may have been confirmed to (0/0 before the first).
    pub fn confirmed(&self) -> Result<Lsn, CheckpointError> {
        Ok(self.get_lsn(SLOT_CONFIRMED)?.unwrap_or(Lsn::INVALID))
    }

    /// Whether every confirmation is recorded before it is sent (see the module docs);
    /// false for a directory an earlier version wrote, until [`Batch::ceiling_kept`].
    pub fn ceiling_kept(&self) -> Result<bool, CheckpointError> {
        Ok(self.db.get_pinned(SLOT_CEILING)?.is_some())
    }

    /// The changes `tenant`'s move missed, if the slot was moved under it.
    pub fn slot_gap(&self, tenant: &TenantId) -> Result<Option<SlotGap>, CheckpointError> {
        self.get_json(&tenant_key(tenant, "gap"))
    }

    pub fn tenant_state<T: DeserializeOwned>(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<T>, CheckpointError> {
        self.get_json(&tenant_key(tenant, "state"))
    }

    pub fn applied(&self, tenant: &TenantId) -> Result<Lsn, CheckpointError> {
        Ok(self
            .get_lsn(&tenant_key(tenant, "applied"))?
            .unwrap_or(Lsn::INVALID))
    }

    pub fn cursor<T: DeserializeOwned>(
        &self,
        tenant: &TenantId,
        table: &str,
    ) -> Result<Option<T>, CheckpointError> {
        self.get_json(&cursor_key(tenant, table))
    }

    /// Every tenant with a recorded state, in key order.
    pub fn tenants<T: DeserializeOwned>(&self) -> Result<Vec<(TenantId, T)>, CheckpointError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(b"t:", rocksdb::Direction::Forward))
        {
            let (key, value) = item?;
            let Some(rest) = key.strip_prefix(b"t:") else {
                break;
            };
            let Some(nul) = rest.iter().position(|&b| b == 0) else {
                return Err(CheckpointError::Corrupt {
                    key: printable(&key),
                    detail: "tenant key without separator".into(),
                });
            };
            if &rest[nul + 1..] != b"state" {
                continue;
            }
            let id = std::str::from_utf8(&rest[..nul])
                .ok()
                .and_then(|s| TenantId::new(s).ok())
                .ok_or_else(|| CheckpointError::Corrupt {
                    key: printable(&key),
                    detail: "invalid tenant id".into(),
                })?;
            out.push((id, decode_json(&key, &value)?));
        }
        Ok(out)
    }

    /// Applies a batch atomically; with `sync`, durably. LSN raises in the batch are compared
    /// with the stored values here, so positions never go back. An unsynced write is
    /// visible at once and durable when a later synced write returns (see [`writer`]).
    pub(crate) fn commit(&self, batch: Batch, sync: bool) -> Result<(), CheckpointError> {
        let mut inner = batch.inner;
        for (key, lsn) in batch.raises {
            let current = self.get_lsn(&key)?.unwrap_or(Lsn::INVALID);
            if lsn > current {
                inner.put(&key, lsn.to_be_bytes());
            }
        }
        self.db.write_opt(inner, &Self::write_options(sync))?;
        Ok(())
    }

    /// Removes everything recorded for `tenant` (after cleanup or cancel); with `sync`,
    /// durably.
    pub(crate) fn forget_tenant(
        &self,
        tenant: &TenantId,
        sync: bool,
    ) -> Result<(), CheckpointError> {
        let prefix = tenant_prefix(tenant);
        let mut batch = WriteBatch::default();
        for item in self
            .db
            .iterator(IteratorMode::From(&prefix, rocksdb::Direction::Forward))
        {
            let (key, _) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            batch.delete(&key);
        }
        self.db.write_opt(batch, &Self::write_options(sync))?;
        Ok(())
    }
}

/// Several checkpoint writes that land together or not at all.
///
/// Not safe against concurrent committers raising the same LSN key: the daemon writes only
/// through the checkpoint [`Writer`]'s thread, which is what makes the read of the current
/// value in [`Store::commit`] sufficient.
#[derive(Default)]
pub struct Batch {
    inner: WriteBatch,
    raises: Vec<(Vec<u8>, Lsn)>,
}

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    fn raise_lsn(&mut self, key: Vec<u8>, lsn: Lsn) {
        match self.raises.iter_mut().find(|(k, _)| *k == key) {
            Some((_, l)) => *l = (*l).max(lsn),
            None => self.raises.push((key, lsn)),
        }
    }

    /// Which slot this state belongs to, recorded when the slot is created; its creation
    /// point is the first confirmed position.
    pub fn slot(&mut self, record: &SlotRecord) -> &mut Self {
        self.inner.put(SLOT_META, encode_json(record));
        self.raise_lsn(SLOT_CONFIRMED.to_vec(), record.created_lsn);
        self
    }

    pub fn confirmed(&mut self, lsn: Lsn) -> &mut Self {
        self.raise_lsn(SLOT_CONFIRMED.to_vec(), lsn);
        self
    }

    /// From this batch on, every confirmation is recorded before it is sent.
    pub fn ceiling_kept(&mut self) -> &mut Self {
        self.inner.put(SLOT_CEILING, b"1");
        self
    }

    pub fn slot_gap(&mut self, tenant: &TenantId, gap: &SlotGap) -> &mut Self {
        self.inner.put(tenant_key(tenant, "gap"), encode_json(gap));
        self
    }

    pub fn applied(&mut self, tenant: &TenantId, lsn: Lsn) -> &mut Self {
        self.raise_lsn(tenant_key(tenant, "applied"), lsn);
        self
    }

    pub fn tenant_state<T: Serialize>(&mut self, tenant: &TenantId, state: &T) -> &mut Self {
        self.inner
            .put(tenant_key(tenant, "state"), encode_json(state));
        self
    }

    pub fn cursor<T: Serialize>(
        &mut self,
        tenant: &TenantId,
        table: &str,
        cursor: &T,
    ) -> &mut Self {
        self.inner
            .put(cursor_key(tenant, table), encode_json(cursor));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[test]
    fn a_new_state_directory_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("state");
        let store = Store::open(&path).unwrap();
        drop(store);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{mode:o}");
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum State {
        Copying { table: String },
        Streaming,
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let slot = SlotRecord {
            slot: "sy".into(),
            system_id: "7300000000000000001".into(),
            database: "app".into(),
            created_lsn: Lsn(0x1000),
        };
        {
            let s = Store::open(dir.path()).unwrap();
            assert!(s.slot().unwrap().is_none());
            assert_eq!(s.confirmed().unwrap(), Lsn::INVALID);
            let mut b = Batch::new();
            b.slot(&slot);
            s.commit(b, true).unwrap();
            let mut b = Batch::new();
            b.tenant_state(
                &t("acme"),
                &State::Copying {
                    table: "public.orders".into(),
                },
            )
            .cursor(&t("acme"), "public.orders", &vec![42i64])
            .applied(&t("acme"), Lsn(0x2000))
            .confirmed(Lsn(0x1800));
            s.commit(b, true).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.slot().unwrap(), Some(slot));
        assert_eq!(s.confirmed().unwrap(), Lsn(0x1800));
        assert_eq!(s.applied(&t("acme")).unwrap(), Lsn(0x2000));
        assert_eq!(
            s.tenant_state::<State>(&t("acme")).unwrap(),
            Some(State::Copying {
                table: "public.orders".into()
            })
        );
        assert_eq!(
            s.cursor::<Vec<i64>>(&t("acme"), "public.orders").unwrap(),
            Some(vec![42])
        );
    }

    #[test]
    fn positions_never_move_backward() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut b = Batch::new();
        b.confirmed(Lsn(500)).applied(&t("a"), Lsn(700));
        s.commit(b, true).unwrap();
        let mut b = Batch::new();
        b.confirmed(Lsn(400))
            .applied(&t("a"), Lsn(600))
            .confirmed(Lsn(450));
        s.commit(b, true).unwrap();
        assert_eq!(s.confirmed().unwrap(), Lsn(500));
        assert_eq!(s.applied(&t("a")).unwrap(), Lsn(700));
    }

    #[test]
    fn tenants_are_listed_and_forgotten_without_touching_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        // "a" is a prefix of "ab": the NUL separator keeps them apart.
        for id in ["ab", "a", "weird'\"name"] {
            let mut b = Batch::new();
            b.tenant_state(&t(id), &State::Streaming)
                .cursor(&t(id), "public.t", &1)
                .applied(&t(id), Lsn(9));
            s.commit(b, true).unwrap();
        }
        let ids: Vec<String> = s
            .tenants::<State>()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id.to_string())
            .collect();
        assert_eq!(ids, ["a", "ab", "weird'\"name"]);
        s.forget_tenant(&t("a"), true).unwrap();
        assert!(s.tenant_state::<State>(&t("a")).unwrap().is_none());
        assert_eq!(s.applied(&t("a")).unwrap(), Lsn::INVALID);
        assert_eq!(
            s.tenant_state::<State>(&t("ab")).unwrap(),
            Some(State::Streaming)
        );
        assert_eq!(s.applied(&t("ab")).unwrap(), Lsn(9));
    }

    #[test]
    fn a_second_opener_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, CheckpointError::Locked { .. }), "{err}");
    }

    #[test]
    fn corrupt_values_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.db.put(SLOT_CONFIRMED, b"abc").unwrap();
        s.db.put(tenant_key(&t("x"), "state"), b"{not json")
            .unwrap();
        assert!(matches!(
            s.confirmed(),
            Err(CheckpointError::Corrupt { .. })
        ));
        assert!(matches!(
            s.tenant_state::<State>(&t("x")),
            Err(CheckpointError::Corrupt { .. })
        ));
        assert!(s.tenants::<State>().is_err());
    }

    #[test]
    fn a_slot_gap_is_kept_until_the_tenant_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(!s.ceiling_kept().unwrap());
        let gap = SlotGap {
            from: Lsn(0x100),
            to: Lsn(0x900),
        };
        let mut b = Batch::new();
        b.ceiling_kept()
            .slot_gap(&t("acme"), &gap)
            .confirmed(Lsn(0x900));
        s.commit(b, true).unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert!(s.ceiling_kept().unwrap());
        assert_eq!(s.slot_gap(&t("acme")).unwrap(), Some(gap));
        assert_eq!(s.slot_gap(&t("globex")).unwrap(), None);
        s.forget_tenant(&t("acme"), true).unwrap();
        assert_eq!(s.slot_gap(&t("acme")).unwrap(), None);
        assert!(
            s.ceiling_kept().unwrap(),
            "the slot's records are not a tenant's"
        );
    }
}
