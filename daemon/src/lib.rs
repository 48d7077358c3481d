//! The nbackup runtimes: the server that receives and commits archives, the agent
//! that produces and sends them, and what both share (TLS, PKI, framed connections,
//! durable filesystem operations).
//!
//! Daemons are library functions — [`server::run`] and [`agent::run_backup`] — so the
//! CLI, the demo and the tests start them the same way, in-process.

pub mod admin;
pub mod agent;
pub mod certwatch;
pub mod codec;
pub mod conn;
pub mod daemon;
pub mod fault;
pub mod fsutil;
pub mod notify;
pub mod pki;
mod pool;
pub mod restore;
pub mod server;
pub mod setup;
pub mod state;
pub mod throttle;
pub mod tls;

/// Locks a mutex, recovering from poisoning. Every critical section in this crate
/// leaves its state consistent before anything that could panic, so a panic
/// elsewhere must not take the daemon down with it. The one lock helper.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// This build's version, recorded in manifests and exchanged with peers.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
