//! What the two client-facing servers, `pop3` and `smtp`, share, so that they behave the
//! same way and the README describes it once ("Logins, idle clients and exit codes"):
//!
//! - [`login`]: checking a client's password, SASL PLAIN, and the price of a failed login;
//! - [`idle`]: how long a client may stay silent, and when the backend hears from us;
//! - [`legacy`]: the environment names of the Python legacy-email-proxy;
//! - [`exit_code`]: what the process's exit status says.

pub mod idle;
pub mod legacy;
pub mod login;

use std::process::ExitCode;

/// How a server process ended, as its exit status tells systemd, xinetd or a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The session ran its course, whoever ended it: QUIT, the client hanging up or going
    /// silent, too many failed logins or bad commands. Those are the client's doing, not
    /// a failure of the service; under systemd's `Accept=yes` each would otherwise leave a
    /// failed unit behind.
    Served,
    /// The session broke off: the backend failed in a way that ended it (a message cut
    /// off, deletes not applied), or the client's connection or TLS failed.
    Broken,
    /// Nothing could be served: the configuration is unusable, or client TLS could not be
    /// set up. The client was told so (`-ERR`, `421`) where it could be.
    NotServed,
}

/// 0 for [`Ending::Served`], 1 otherwise; the log line says which end it was. A bad
/// command line is 2 (see main).
pub fn exit_code(ending: Ending) -> ExitCode {
    match ending {
        Ending::Served => ExitCode::SUCCESS,
        Ending::Broken | Ending::NotServed => ExitCode::FAILURE,
    }
}
