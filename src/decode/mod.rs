//! pgoutput decoding: bytes from the replication stream → typed [`Message`]s.
//!
//! ```text
//!   source (XLogData payload: Bytes) ──► Decoder::decode ──► Message ──► route/apply
//!                                            │
//!                                            └─ in_stream flag (xid prefix inside Stream Start..Stop)
//! ```
//!
//! Invariants:
//! - Pure: no I/O, no clocks, no global state. The only state is whether we are inside a
//!   streamed block, because pgoutput prefixes row messages with an xid only there.
//! - Zero-copy: column values and message contents are `Bytes` slices of the input.
//! - Never panics on input: every malformed, truncated or oversized message is a typed
//!   [`DecodeError`] naming the message kind and the offset where it went wrong.
//! - A message must be consumed exactly; trailing bytes are an error, not ignored.

pub mod encode;
mod message;
mod parse;
mod relation;

pub use message::*;
pub use parse::{DecodeError, Decoder, DecoderOptions};
pub use relation::{ColumnValues, RelationCache, RelationChange, RelationDiff, RelationError};
