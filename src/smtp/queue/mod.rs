//! The durable queue for `smtp --queue-dir` (store-and-forward for devices that never
//! retry) and the `queue` admin subcommand that delivers and manages it.
//!
//! - `store`: the files (data + envelope), their locks and tombstones
//! - `deliver`: one delivery attempt of a locked message through a [`Relay`], the retry
//!   schedule, the lifetime, and the bounce
//! - `dsn`: the RFC 3464 delivery-status notification
//! - `admin`: `queue run|list|flush|remove|hold|release`
//!
//! [`Relay`]: crate::smtp::relay::Relay

pub mod admin;
pub mod deliver;
pub mod dsn;
pub mod store;

pub use store::{Envelope, Locked, NewMessage, Queue, StoreError};

/// `smtp --queue-dir`: where messages are queued and how they are retried.
#[derive(Debug, Clone)]
pub struct QueueMode {
    pub queue: Queue,
    pub policy: deliver::Policy,
}

/// The environment variable that names a crash point (debug builds only).
pub const CRASH_ENV: &str = "LMP_DEBUG_CRASH_AT";

/// Fault injection for the crash tests: in a debug build, when `LMP_DEBUG_CRASH_AT` names
/// this step, the process sends itself SIGKILL here, exactly as `kill -9` would, so that
/// no destructor, flush or unlock runs beyond what the kernel does. The steps:
/// `spool-write` (after the first chunk of the queue's data file), `after-fsync` (queued
/// durably, before the client's `250`), `upstream-data` (inside the transfer of the
/// message upstream, before its end of data), `upstream-accepted` (the backend's `250`
/// arrived, before the tombstone: the duplicate window), `before-removal` (tombstone
/// written, queue files not yet removed). Release builds compile this to nothing.
pub fn crash_point(step: &str) {
    #[cfg(debug_assertions)]
    if std::env::var(CRASH_ENV).is_ok_and(|at| at == step) {
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        // The signal is on its way; never go past this step.
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = step;
}

#[cfg(test)]
mod tests;
