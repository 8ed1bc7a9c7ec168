//! Log sequence numbers.
//!
//! Invariants:
//! - `Lsn` is a plain position in the source WAL; `Lsn::INVALID` (0/0) means "no position"
//!   and is what PostgreSQL itself uses for that.
//! - Text form is PostgreSQL's `X/X` (upper hex, no padding); parsing accepts any case.
//! - `to_be_bytes` gives big-endian bytes so that byte order equals LSN order (RocksDB keys).
//! - [`ProgressLsn`] only ever moves forward: shared progress between tasks can never regress.
//! - [`CommitLsn`] is the end of a source transaction's commit, the unit the pipeline counts
//!   in: received from the stream, applied at a target, confirmed to the source. It is a type
//!   of its own so that a keepalive's or a BEGIN's position cannot stand in for one.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// A position in the source cluster's write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// PostgreSQL's InvalidXLogRecPtr.
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }

    /// Bytes from `earlier` to `self`, zero when `earlier` is ahead (lag never goes negative).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    pub fn from_be_bytes(bytes: [u8; 8]) -> Lsn {
        Lsn(u64::from_be_bytes(bytes))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Where a source transaction's commit record ends: received from the stream, applied at
/// a target, confirmed to the source. Every change of the transaction is before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitLsn(Lsn);

impl CommitLsn {
    /// No commit yet (a position before any transaction).
    pub const NONE: CommitLsn = CommitLsn(Lsn::INVALID);

    /// The end of a commit record: a COMMIT message's end LSN, or a position recorded as one.
    pub fn of(end: Lsn) -> CommitLsn {
        CommitLsn(end)
    }

    pub fn lsn(self) -> Lsn {
        self.0
    }

    pub fn is_valid(self) -> bool {
        self.0.is_valid()
    }
}

impl fmt::Display for CommitLsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<CommitLsn> for Lsn {
    fn from(end: CommitLsn) -> Lsn {
        end.0
    }
}

/// Why a text LSN was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {text:?}: expected two hexadecimal halves like 16/B374D848")]
pub struct ParseLsnError {
    text: String,
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError { text: s.to_owned() };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let valid_half = |h: &str| !h.is_empty() && h.len() <= 8;
        if !valid_half(hi) || !valid_half(lo) {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An LSN shared between tasks that only moves forward.
///
/// Used for the durable position: the consumer raises it after a target commit, the
/// replication task reads it for standby status updates. A stale or reordered writer
/// can never pull it back, which is what keeps the confirmed position honest.
#[derive(Debug, Default)]
pub struct ProgressLsn(AtomicU64);

impl ProgressLsn {
    pub fn new(start: Lsn) -> Self {
        ProgressLsn(AtomicU64::new(start.0))
    }

    /// Raises the position to `lsn` if it is ahead; returns the position now held.
    pub fn advance(&self, lsn: Lsn) -> Lsn {
        let prev = self.0.fetch_max(lsn.0, Ordering::AcqRel);
        Lsn(prev.max(lsn.0))
    }

    pub fn get(&self) -> Lsn {
        Lsn(self.0.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_postgres_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::INVALID);
        assert_eq!("a/b".parse::<Lsn>().unwrap(), Lsn(0xA_0000_000B));
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "G/1",
            "1/2/3",
            "123456789/0",
            "-1/0",
            " 1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn progress_never_moves_backward() {
        let p = ProgressLsn::new(Lsn(100));
        assert_eq!(p.advance(Lsn(50)), Lsn(100));
        assert_eq!(p.get(), Lsn(100));
        assert_eq!(p.advance(Lsn(200)), Lsn(200));
        assert_eq!(p.advance(Lsn(150)), Lsn(200));
        assert_eq!(p.get(), Lsn(200));
    }

    #[test]
    fn lag_saturates() {
        assert_eq!(Lsn(10).bytes_since(Lsn(4)), 6);
        assert_eq!(Lsn(4).bytes_since(Lsn(10)), 0);
    }

    proptest! {
        #[test]
        fn text_round_trip(v in any::<u64>()) {
            let lsn = Lsn(v);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }

        #[test]
        fn byte_order_is_lsn_order(a in any::<u64>(), b in any::<u64>()) {
            prop_assert_eq!(Lsn(a).to_be_bytes().cmp(&Lsn(b).to_be_bytes()), a.cmp(&b));
            prop_assert_eq!(Lsn::from_be_bytes(Lsn(a).to_be_bytes()), Lsn(a));
        }
    }
}
