//! Transaction assembly: the routed changes of one source transaction, gathered per target
//! and tenant between its BEGIN and COMMIT and handed over at the commit as one
//! [`SourceTxn`] per target.
//!
//! Invariants:
//! - At most one source transaction is open. A row change, watermark or commit outside one
//!   is a protocol error ([`AssemblyError`]), never guessed at; a reconnect drops the open
//!   transaction whole ([`Assembler::reset`]), since the server sends it again from BEGIN.
//! - A tenant's changes keep their source order; tenants and targets are handed over in a
//!   stable (sorted) order.
//! - The change bytes held for one source transaction stay within the limit summed over
//!   every moving tenant it touches: the tenant whose change crosses it loses its changes of
//!   this transaction and is reported ([`Overflow`]); what it held counts no more.
//! - A forgotten tenant (it failed) has nothing of this transaction handed over.
//! - Pure: no I/O, no clock. Whether a change is applied at all (the backfill verdicts) is
//!   decided before it gets here.

pub mod images;

use std::collections::{BTreeMap, BTreeSet};

use crate::apply::{SourceTxn, Work};
use crate::backfill::chunk::Watermark;
use crate::lsn::{CommitLsn, Lsn};
use crate::tenant::{TargetId, TenantId};

/// A message that makes sense only inside a transaction arrived outside one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("replication protocol: {what} outside a transaction")]
pub struct AssemblyError {
    pub what: &'static str,
}

/// A tenant's change made the open transaction hold more than the limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow {
    pub xid: u32,
    pub limit: u64,
}

/// The source transactions of the stream, one open at a time.
#[derive(Debug)]
pub struct Assembler {
    open: Option<Transaction>,
    /// Bytes of change data one source transaction may hold (`move.max_txn_mb`).
    limit: u64,
}

impl Assembler {
    pub fn new(limit: u64) -> Assembler {
        Assembler { open: None, limit }
    }

    /// BEGIN: a new transaction replaces whatever was open (it was cut off by the server).
    pub fn begin(&mut self, final_lsn: Lsn, xid: u32) {
        self.open = Some(Transaction {
            final_lsn,
            xid,
            limit: self.limit,
            parts: BTreeMap::new(),
            held: BTreeMap::new(),
            held_total: 0,
            touched: BTreeSet::new(),
            marks: Vec::new(),
        });
    }

    /// The stream reconnected: the open transaction comes again from its start.
    pub fn reset(&mut self) {
        self.open = None;
    }

    /// The open transaction, for a row change.
    pub fn open(&mut self) -> Result<&mut Transaction, AssemblyError> {
        self.open.as_mut().ok_or(AssemblyError {
            what: "a row change",
        })
    }

    /// A backfill watermark takes effect at its transaction's commit.
    pub fn watermark(&mut self, mark: Watermark) -> Result<(), AssemblyError> {
        self.open
            .as_mut()
            .map(|t| t.marks.push(mark))
            .ok_or(AssemblyError {
                what: "a watermark",
            })
    }

    /// COMMIT: the transaction, closed.
    pub fn commit(&mut self) -> Result<Transaction, AssemblyError> {
        self.open.take().ok_or(AssemblyError { what: "a commit" })
    }

    /// Drops everything of `tenant` in the open transaction (the tenant stopped).
    pub fn forget(&mut self, tenant: &TenantId) {
        if let Some(t) = &mut self.open {
            t.forget(tenant);
        }
    }
}

/// One source transaction being assembled.
#[derive(Debug)]
pub struct Transaction {
    final_lsn: Lsn,
    xid: u32,
    limit: u64,
    parts: BTreeMap<TargetId, BTreeMap<TenantId, Vec<Work>>>,
    /// Bytes of change data held per tenant, and in all.
    held: BTreeMap<TenantId, u64>,
    held_total: u64,
    touched: BTreeSet<TenantId>,
    marks: Vec<Watermark>,
}

impl Transaction {
    /// Where the transaction's commit record is (from BEGIN).
    pub fn final_lsn(&self) -> Lsn {
        self.final_lsn
    }

    pub fn xid(&self) -> u32 {
        self.xid
    }

    /// Notes that the transaction concerns `tenant` (its backfill state may change at the
    /// commit) even if nothing of it is applied.
    pub fn touch(&mut self, tenant: &TenantId) {
        if !self.touched.contains(tenant) {
            self.touched.insert(tenant.clone());
        }
    }

    /// The tenants the transaction concerns.
    pub fn touched(&self) -> &BTreeSet<TenantId> {
        &self.touched
    }

    /// Adds a stream change of `tenant`, counted against the limit.
    pub fn push_change(
        &mut self,
        target: &TargetId,
        tenant: &TenantId,
        work: Work,
    ) -> Result<(), Overflow> {
        let added = work.weight() as u64;
        self.work_of(target, tenant).push(work);
        // Looked up before inserting, as in `work_of`: no identifier cloned per change.
        match self.held.get_mut(tenant) {
            Some(held) => *held += added,
            None => {
                self.held.insert(tenant.clone(), added);
            }
        }
        self.held_total += added;
        if self.held_total > self.limit {
            // One transaction over N moving tenants holds the bound once, not N times: the
            // tenant whose change crossed it goes, and the rest stay within it.
            self.forget(tenant);
            return Err(Overflow {
                xid: self.xid,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Adds the rows of a backfill chunk of `tenant` (bounded by the chunk size, so not
    /// counted against the limit).
    pub fn push_copy(&mut self, target: &TargetId, tenant: &TenantId, work: Work) {
        self.work_of(target, tenant).push(work);
        self.touch(tenant);
    }

    /// The watermarks seen, in order, to handle at the commit.
    pub fn take_marks(&mut self) -> Vec<Watermark> {
        std::mem::take(&mut self.marks)
    }

    /// Drops everything of `tenant`.
    pub fn forget(&mut self, tenant: &TenantId) {
        for by_tenant in self.parts.values_mut() {
            by_tenant.remove(tenant);
        }
        if let Some(held) = self.held.remove(tenant) {
            self.held_total -= held;
        }
        self.touched.remove(tenant);
    }

    /// The transaction as handed to each target: every target with changes, or with a
    /// tenant whose backfill state changed (`states`), committed at `end`.
    pub fn into_targets(
        self,
        end: CommitLsn,
        mut states: BTreeMap<TargetId, Vec<(TenantId, String)>>,
    ) -> Vec<(TargetId, SourceTxn)> {
        let mut handed = Vec::new();
        let mut parts = self.parts;
        let mut targets: BTreeSet<TargetId> = parts
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(t, _)| t.clone())
            .collect();
        targets.extend(states.keys().cloned());
        for target in targets {
            let txn = SourceTxn {
                end,
                parts: parts
                    .remove(&target)
                    .map(|p| p.into_iter().collect())
                    .unwrap_or_default(),
                states: states.remove(&target).unwrap_or_default(),
            };
            handed.push((target, txn));
        }
        handed
    }

    /// The work list of `tenant` at `target`, looked up before inserting: the usual case
    /// (the transaction already has work there) clones no identifier.
    fn work_of(&mut self, target: &TargetId, tenant: &TenantId) -> &mut Vec<Work> {
        if !self.parts.contains_key(target) {
            self.parts.insert(target.clone(), BTreeMap::new());
        }
        let by_tenant = self.parts.get_mut(target).expect("inserted above");
        if !by_tenant.contains_key(tenant) {
            by_tenant.insert(tenant.clone(), Vec::new());
        }
        by_tenant.get_mut(tenant).expect("inserted above")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::Statement;
    use crate::backfill::chunk::Mark;

    fn tenant(s: &str) -> TenantId {
        TenantId::new(s.to_string()).unwrap()
    }

    fn target(s: &str) -> TargetId {
        TargetId::new(s.to_string()).unwrap()
    }

    /// A change whose weight is its SQL's length.
    fn change(sql: &str) -> Work {
        Work::Statement(Statement {
            sql: sql.to_string(),
            params: Vec::new(),
            expect_rows: None,
        })
    }

    fn sqls(txn: &SourceTxn, t: &TenantId) -> Vec<String> {
        txn.parts
            .iter()
            .filter(|(id, _)| id == t)
            .flat_map(|(_, w)| w)
            .map(|w| match w {
                Work::Statement(s) => s.sql.clone(),
                other => panic!("unexpected work {other:?}"),
            })
            .collect()
    }

    fn mark(chunk: u64) -> Watermark {
        Watermark {
            run: 1,
            tenant: "a".into(),
            table: "public.t".into(),
            chunk,
            mark: Mark::Low,
        }
    }

    #[test]
    fn messages_outside_a_transaction_are_protocol_errors() {
        let mut a = Assembler::new(1 << 20);
        assert_eq!(a.open().unwrap_err().what, "a row change");
        assert_eq!(a.watermark(mark(1)).unwrap_err().what, "a watermark");
        assert_eq!(a.commit().unwrap_err().what, "a commit");
        a.begin(Lsn(100), 7);
        a.watermark(mark(1)).unwrap();
        let mut txn = a.commit().unwrap();
        assert_eq!((txn.final_lsn(), txn.xid()), (Lsn(100), 7));
        assert_eq!(txn.take_marks(), vec![mark(1)]);
        assert!(a.commit().is_err(), "a commit closes the transaction");
        assert_eq!(
            AssemblyError { what: "a commit" }.to_string(),
            "replication protocol: a commit outside a transaction"
        );
    }

    #[test]
    fn a_reconnect_drops_the_open_transaction_and_begin_starts_afresh() {
        let (a_, t1) = (tenant("a"), target("t1"));
        let mut a = Assembler::new(1 << 20);
        a.begin(Lsn(100), 7);
        a.open()
            .unwrap()
            .push_change(&t1, &a_, change("x"))
            .unwrap();
        a.reset();
        assert!(a.commit().is_err());
        a.begin(Lsn(100), 7);
        a.open()
            .unwrap()
            .push_change(&t1, &a_, change("x"))
            .unwrap();
        // A BEGIN without the COMMIT before it: the server cut that transaction off.
        a.begin(Lsn(200), 8);
        let handed = a
            .commit()
            .unwrap()
            .into_targets(CommitLsn::of(Lsn(210)), BTreeMap::new());
        assert!(handed.is_empty(), "{handed:?}");
    }

    #[test]
    fn changes_are_grouped_per_target_and_tenant_in_source_order() {
        let (a_, b_, c_) = (tenant("a"), tenant("b"), tenant("c"));
        let (t1, t2) = (target("t1"), target("t2"));
        let mut a = Assembler::new(1 << 20);
        a.begin(Lsn(100), 7);
        let txn = a.open().unwrap();
        txn.push_change(&t2, &b_, change("b1")).unwrap();
        txn.push_change(&t1, &a_, change("a1")).unwrap();
        txn.push_change(&t2, &b_, change("b2")).unwrap();
        txn.push_copy(&t1, &a_, change("a-chunk"));
        txn.push_change(&t1, &a_, change("a2")).unwrap();
        txn.touch(&c_);
        assert_eq!(
            txn.touched().len(),
            2,
            "a copy touches its tenant; b only changed"
        );
        let states = BTreeMap::from([(target("t3"), vec![(c_.clone(), "{}".to_string())])]);
        let handed = a
            .commit()
            .unwrap()
            .into_targets(CommitLsn::of(Lsn(150)), states);
        let names: Vec<_> = handed.iter().map(|(t, _)| t.to_string()).collect();
        assert_eq!(names, ["t1", "t2", "t3"]);
        assert!(handed.iter().all(|(_, s)| s.end == CommitLsn::of(Lsn(150))));
        assert_eq!(sqls(&handed[0].1, &a_), ["a1", "a-chunk", "a2"]);
        assert_eq!(sqls(&handed[1].1, &b_), ["b1", "b2"]);
        assert!(handed[2].1.parts.is_empty());
        assert_eq!(handed[2].1.states, vec![(c_, "{}".to_string())]);
    }

    #[test]
    fn the_tenant_crossing_the_bound_goes_and_the_others_stay_within_it() {
        let (a_, b_) = (tenant("a"), tenant("b"));
        let t1 = target("t1");
        let ten = "0123456789";
        let weight = change(ten).weight() as u64;
        let mut a = Assembler::new(3 * weight);
        a.begin(Lsn(100), 42);
        let txn = a.open().unwrap();
        txn.push_change(&t1, &a_, change(ten)).unwrap();
        txn.push_change(&t1, &b_, change(ten)).unwrap();
        txn.push_change(&t1, &b_, change(ten)).unwrap();
        assert_eq!(
            txn.push_change(&t1, &b_, change(ten)),
            Err(Overflow {
                xid: 42,
                limit: 3 * weight
            })
        );
        // What b held counts no more: a may still add two changes.
        txn.push_change(&t1, &a_, change(ten)).unwrap();
        txn.push_change(&t1, &a_, change(ten)).unwrap();
        assert!(txn.push_change(&t1, &a_, change(ten)).is_err());
        let handed = a
            .commit()
            .unwrap()
            .into_targets(CommitLsn::of(Lsn(150)), BTreeMap::new());
        assert!(handed.is_empty(), "a crossed it too: {handed:?}");
    }

    #[test]
    fn a_forgotten_tenant_hands_nothing_over_and_frees_its_share() {
        let (a_, b_) = (tenant("a"), tenant("b"));
        let t1 = target("t1");
        let weight = change("x").weight() as u64;
        let mut a = Assembler::new(2 * weight);
        a.begin(Lsn(100), 1);
        let txn = a.open().unwrap();
        txn.push_change(&t1, &a_, change("x")).unwrap();
        txn.push_change(&t1, &b_, change("x")).unwrap();
        a.forget(&a_);
        let txn = a.open().unwrap();
        assert!(!txn.touched().contains(&a_));
        txn.push_change(&t1, &b_, change("x")).unwrap();
        let handed = a
            .commit()
            .unwrap()
            .into_targets(CommitLsn::of(Lsn(150)), BTreeMap::new());
        assert_eq!(handed.len(), 1);
        assert!(sqls(&handed[0].1, &a_).is_empty());
        assert_eq!(sqls(&handed[0].1, &b_), ["x", "x"]);
    }
}
