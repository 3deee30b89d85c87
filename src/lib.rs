//! legacy-mail-proxy: lets POP3 and SMTP-only clients use modern IMAP and submission servers.
//!
//! One process serves one client on stdin/stdout, the way inetd spawns it. Each protocol is a
//! core generic over `BufRead + Write` (driven by byte transcripts in tests) plus a backend
//! behind a small trait.

pub mod base64;
pub mod calendar;
pub mod cli;
pub mod client_tls;
pub mod frontend;
pub mod imap;
pub mod imap_wire;
pub mod input;
pub mod lines;
pub mod lock;
pub mod logging;
pub mod net;
pub mod oauth2;
pub mod options;
pub mod pop3;
pub mod secret;
pub mod smtp;
pub mod smtp_wire;
pub mod starttls;
pub mod submission;
pub mod tls;
pub mod tunnel;
