//! Our own submission (SMTP) client: the layer under the SMTP relay, generic over the
//! stream like rust-imap's `Client<T>`, driven by byte transcripts in its tests. It knows
//! nothing of the SMTP front end, POP3 or the command line.
//!
//! Why not lettre (which the design named): a gateway needs what lettre's `SmtpConnection`
//! hides. Its socket (for TCP_NODELAY, and to cut the connection when the spool fails
//! mid-message) was found by scanning `/proc/self/fd`; its connect had no timeout of its
//! own, so a watchdog thread wrote `421` to the client and ended the process; it keeps
//! only some EHLO keywords, so a second EHLO learnt PIPELINING; it has no BDAT; and its
//! byte-at-a-time dot-stuffing was a third of the CPU on large messages. Each of these
//! workarounds cost more than the code here, so nothing of lettre remains in the program.
//!
//! - `reply`: the EHLO extensions (RFC 5321 §4.1.1.1); the reply type and reader are
//!   [`crate::smtp_wire`]'s;
//! - `client`: commands, pipelined groups, AUTH, DATA and BDAT over any [`Transport`];
//! - `dot`: dot-stuffing (RFC 5321 §4.5.2);
//! - `connect`: TCP, TLS, STARTTLS, greeting and EHLO on a real socket.

mod client;
mod connect;
mod dot;
mod reply;

pub use client::{Client, Command, Error, SendError, Transport};
pub use connect::{Endpoint, OpenError, Security, local_hostname};
pub use reply::{Extensions, Reply};

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod transcript;
