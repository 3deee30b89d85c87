//! What the POP3 core needs from a mailbox store, and how that can fail.
//!
//! The core never sees IMAP: it sees an [`Opener`] that turns client credentials into a
//! [`Maildrop`], a fixed snapshot of messages. The real one reads IMAP (`imap.rs`); an
//! in-memory one (`memory.rs`) drives the transcript tests.

use std::fmt;
use std::io;

/// One message of the session's snapshot (RFC 1939 §5: numbers stay fixed for the session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageInfo {
    /// Octets as RETR sends them before dot-stuffing (CRLF line endings).
    pub size: u64,
    /// RFC 1939 §7 unique-id: printable ASCII 0x21..=0x7E, at most 70 characters.
    pub uidl: String,
}

/// Why a login did not open a maildrop. Each maps to its own RFC 3206 response code.
#[derive(Debug)]
pub enum OpenError {
    /// The credentials were refused: `-ERR [AUTH]`.
    Auth(String),
    /// Another session holds the maildrop: `-ERR [IN-USE]` (RFC 2449 §8.1.1).
    InUse,
    /// The backend is unreachable, slow, or its TLS failed: `-ERR [SYS/TEMP]`, so clients
    /// do not ask the user for a new password during an outage.
    Temporary(String),
    /// The configuration cannot work, and retrying will not help: `-ERR [SYS/PERM]`.
    Permanent(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Auth(why) => write!(f, "authentication failed: {why}"),
            OpenError::InUse => f.write_str("maildrop in use by another session"),
            OpenError::Temporary(why) => write!(f, "backend unavailable: {why}"),
            OpenError::Permanent(why) => write!(f, "backend unusable: {why}"),
        }
    }
}

/// A backend failure after login.
#[derive(Debug)]
pub struct BackendError(pub String);

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a streamed message ended badly.
#[derive(Debug)]
pub enum FetchError {
    /// The message was expunged by another client; nothing was streamed.
    Gone,
    /// The backend failed, possibly after part of the message was streamed.
    Backend(BackendError),
    /// Writing to the client failed.
    Client(io::Error),
}

/// Receives a message as the backend streams it.
pub trait MessageSink {
    /// Called once, before any data, when the backend knows the message exists.
    fn start(&mut self) -> io::Result<()>;
    /// Called with consecutive pieces of the raw message. Returns `false` when it needs no
    /// more (TOP has sent its lines), so the backend can stop fetching.
    fn data(&mut self, bytes: &[u8]) -> io::Result<bool>;
}

/// How much of a message the session needs, so the backend can size its fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// RETR: all of it.
    Whole,
    /// TOP: the header and a few lines; the sink says when it has enough.
    Head,
}

/// What the UPDATE state did on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The delete policy was applied to the messages.
    Applied,
    /// The policy keeps every message on the server; nothing was changed.
    Kept,
}

/// The messages of one session, numbered from 1 as POP3 sees them.
pub trait Maildrop {
    /// The snapshot taken at login, in UID order.
    fn messages(&self) -> &[MessageInfo];

    /// Streams message `index` (0-based) into `sink`.
    fn fetch(
        &mut self,
        index: usize,
        extent: Extent,
        sink: &mut dyn MessageSink,
    ) -> Result<(), FetchError>;

    /// Marks message `index` as read, after a complete RETR, when the policy asks for it.
    fn mark_retrieved(&mut self, index: usize) -> Result<(), BackendError>;

    /// Checks up front that deleting can work, so DELE can refuse with a clear reason
    /// rather than failing only at QUIT.
    fn check_delete(&self) -> Result<(), String>;

    /// Keeps the backend connection alive while the client is idle.
    fn keepalive(&mut self) -> Result<(), BackendError>;

    /// The UPDATE state (RFC 1939 §6): applies the delete policy to these messages.
    fn delete(&mut self, indexes: &[usize]) -> Result<Update, BackendError>;

    /// Ends the backend session politely.
    fn close(&mut self);
}

/// Client credentials, as USER/PASS or AUTH PLAIN gave them.
pub struct Credentials<'a> {
    pub user: &'a str,
    pub password: &'a str,
}

/// Turns client credentials into an open maildrop.
pub trait Opener {
    fn open(&mut self, credentials: &Credentials) -> Result<Box<dyn Maildrop>, OpenError>;
}

/// What `DELE` + `QUIT` does on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletePolicy {
    /// DELE never changes the server.
    Keep,
    /// Deleted messages get a keyword (`--deleted-keyword`) and are hidden from later
    /// sessions.
    Hide,
    /// Deleted messages are moved to `--trash-mailbox`.
    Trash,
    /// Deleted messages are flagged `\Deleted` and removed with UID EXPUNGE (RFC 4315).
    Expunge,
}
