//! What the SMTP core needs from the submission server it relays through.
//!
//! Each call maps to one backend exchange of RFC 5321 §3.3 (MAIL, RCPT, DATA, RSET) or
//! RFC 4954 (AUTH), and answers with the backend's own reply, so the client sees the
//! backend's code, enhanced code and text. A call fails with [`RelayError`] only when no
//! backend reply exists (unreachable, TLS, timeout, lost connection) or the proxy's own
//! login was refused; the core turns that into a 4xx so the client retries.
//!
//! The real relay (`backend.rs`) speaks SMTP through lettre; an in-memory one
//! (`memory.rs`) drives the transcript tests.

use super::reply::Reply;
use std::fmt;
use std::io::Read;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayError {
    /// No usable backend connection: DNS, TCP, TLS, timeout, lost connection, garbled reply.
    Unavailable(String),
    /// The backend refused the configured --smtp-user credentials.
    LoginRefused(String),
    /// A local failure (reading the spooled message).
    Local(String),
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayError::Unavailable(why) => write!(f, "backend unavailable: {why}"),
            RelayError::LoginRefused(why) => write!(f, "backend refused the proxy's login: {why}"),
            RelayError::Local(why) => write!(f, "local error: {why}"),
        }
    }
}

pub type RelayResult = Result<Reply, RelayError>;

pub trait Relay {
    /// `--client-auth passthrough`: logs in to the backend with the client's credentials
    /// (connecting first). The backend's reply decides (235, 535…); later transactions use
    /// these credentials.
    fn login(&mut self, user: &str, password: &str) -> RelayResult;

    /// Opens a transaction: connects and logs in when there is no live connection, then
    /// sends `MAIL FROM:<from>` (empty `from` is the null path).
    fn mail(&mut self, from: &str) -> RelayResult;

    /// `RCPT TO:<to>`. A rejected recipient leaves the transaction open for the others.
    fn rcpt(&mut self, to: &str) -> RelayResult;

    /// `DATA`, then the message: `len` bytes from `message`, CRLF lines, not dot-stuffed.
    /// The reply is the backend's answer to the final dot (or to DATA itself).
    fn data(&mut self, message: &mut dyn Read, len: u64) -> RelayResult;

    /// Abandons the open transaction, if any (`RSET`).
    fn reset(&mut self);

    /// Ends the backend session politely (`QUIT`).
    fn quit(&mut self);
}
