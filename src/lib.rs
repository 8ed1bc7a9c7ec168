//! switchyard: moves SaaS tenants live between PostgreSQL locations with no lost writes.
//!
//! ```text
//!   source ──► decode ──► route ──► apply
//!     │                               │
//!     └──── feedback ◄── checkpoint ◄─┘     (registry, cutover, telemetry beside them)
//! ```
//!
//! The pipeline reads one logical replication slot (`source`), decodes pgoutput itself
//! (`decode`), and only confirms a position to the source once it is durable downstream.

pub mod apply;
pub mod assembly;
pub mod backfill;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod cutover;
pub mod daemon;
pub mod decode;
pub mod failpoint;
pub mod key;
pub mod layout;
pub mod lsn;
pub mod provision;
pub mod registry;
pub mod route;
pub mod source;
pub mod sql;
pub mod tail;
pub mod telemetry;
pub mod tenant;
pub mod verify;

/// mimalloc instead of glibc's malloc: the daemon's data path makes and frees many small
/// objects per change (decoded rows, fold entries, statement arrays), and glibc's
/// allocator was ~27 % of its instructions (docs/benchmarks.md, "2026-11-28, afternoon").
/// Set here so that the binary, the tests and the benches measure the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
