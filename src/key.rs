//! Primary-key values as PostgreSQL orders them: what backfill's cursors, re-reads and
//! the apply compaction's key sets compare.
//!
//! Invariants:
//! - Integers compare numerically; text-like keys (text, varchar, uuid) by bytes, which is
//!   how `COLLATE "C"` sorts them and, for uuid's canonical lower-case text, how the type
//!   compares.
//! - A value read from the binary form equals the one read from the text form.

use std::cmp::Ordering;

/// One primary-key column value, ordered as the chunk query orders it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum KeyValue {
    Int(i64),
    /// Text-like keys (text, varchar, uuid): byte order, as `COLLATE "C"` sorts them.
    Text(String),
}

impl PartialOrd for KeyValue {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for KeyValue {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (KeyValue::Int(a), KeyValue::Int(b)) => a.cmp(b),
            (KeyValue::Text(a), KeyValue::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            // A column has one type; mixed values only arise from a bug elsewhere.
            (KeyValue::Int(_), KeyValue::Text(_)) => Ordering::Less,
            (KeyValue::Text(_), KeyValue::Int(_)) => Ordering::Greater,
        }
    }
}

/// How a primary-key column's text is read back into a comparable value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Int,
    Text,
    /// uuid: compared as the type compares (bytes), which is also the byte order of its
    /// canonical lower-case text, so the value is kept as that text.
    Uuid,
}

impl KeyKind {
    /// Key column types backfill can order: smallint, integer, bigint, text, varchar, uuid.
    pub fn for_type_oid(oid: u32) -> Option<KeyKind> {
        match oid {
            20 | 21 | 23 => Some(KeyKind::Int),
            25 | 1043 => Some(KeyKind::Text),
            2950 => Some(KeyKind::Uuid),
            _ => None,
        }
    }

    /// The kind for a `format_type` name, e.g. `integer` or `character varying(20)`.
    pub fn for_type_name(type_sql: &str) -> Option<KeyKind> {
        match type_sql {
            "smallint" | "integer" | "bigint" => Some(KeyKind::Int),
            "text" => Some(KeyKind::Text),
            "uuid" => Some(KeyKind::Uuid),
            t if t == "character varying" || t.starts_with("character varying(") => {
                Some(KeyKind::Text)
            }
            _ => None,
        }
    }

    /// The value from its binary form (binary COPY) for a column of type `oid`, equal to
    /// what [`Self::parse`] makes of the text form; `None` for a type outside the kind or
    /// bytes that are not a value of it.
    pub fn decode_binary(self, oid: u32, raw: &[u8]) -> Option<KeyValue> {
        match (self, oid) {
            (KeyKind::Int, 21) => Some(KeyValue::Int(
                i16::from_be_bytes(raw.try_into().ok()?).into(),
            )),
            (KeyKind::Int, 23) => Some(KeyValue::Int(
                i32::from_be_bytes(raw.try_into().ok()?).into(),
            )),
            (KeyKind::Int, 20) => Some(KeyValue::Int(i64::from_be_bytes(raw.try_into().ok()?))),
            // text and varchar send their characters (in the client encoding, UTF-8).
            (KeyKind::Text, 25 | 1043) => {
                Some(KeyValue::Text(std::str::from_utf8(raw).ok()?.to_owned()))
            }
            (KeyKind::Uuid, 2950) => {
                let b: [u8; 16] = raw.try_into().ok()?;
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                Some(KeyValue::Text(format!(
                    "{}-{}-{}-{}-{}",
                    &hex[..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..]
                )))
            }
            _ => None,
        }
    }

    pub fn parse(self, text: &str) -> Option<KeyValue> {
        match self {
            KeyKind::Int => text.parse().ok().map(KeyValue::Int),
            KeyKind::Text => Some(KeyValue::Text(text.to_owned())),
            KeyKind::Uuid => Some(KeyValue::Text(text.to_ascii_lowercase())),
        }
    }
}
