//! The integration tests, one binary: each module is one area, run against throwaway
//! PostgreSQL clusters that the tests start themselves (`support`). One binary links the
//! crate (and RocksDB) once instead of once per area.
//!
//! `cargo test --release --features failpoints --test it` runs them all; a module alone:
//! `cargo test --release --features failpoints --test it safety::`.

mod support;

mod apply;
mod backfill;
#[cfg(feature = "failpoints")]
mod crash;
mod cutover;
mod daemon;
mod decode_golden;
mod demo;
mod faults;
mod harness;
mod hostile;
mod model;
mod provision;
mod registry;
mod replication;
mod safety;
