//! Formats nbackup processes and people exchange, with no I/O:
//!
//! * [`wire`] — the binary protocol between agent and server (preamble, frames,
//!   limits in [`limits`]), documented byte by byte in `docs/protocol.md`;
//! * [`name`] — validated names and session ids, the only values that reach paths;
//! * [`admin`] — the request and response types of the daemons' local admin API;
//! * [`freshness`] — whether an entry's backups keep up with its schedule;
//! * [`restore`] — the requests of a restore connection and the archive catalog;
//! * [`retention`] — which archives a bucket keeps (newest N, grandfather-father-son);
//! * [`enroll`] — how an agent obtains and renews its certificate;
//! * [`setup`] — the setup wizard's answers and the plan they make;
//! * [`config`] — the YAML configuration schema of both daemons, validated in two
//!   stages, so the runtime and the setup wizard share one definition.
//!
//! Nothing here opens sockets or files: callers hand in bytes or text.

pub mod admin;
pub mod config;
pub mod enroll;
pub mod freshness;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod manifest;
pub mod name;
pub mod restore;
pub mod retention;
pub mod setup;
pub mod wire;

pub use name::{Name, NameError, SessionId};
