//! Reaching an IMAP server: TCP with timeouts, then implicit TLS, STARTTLS (RFC 3501
//! §6.2.1) or, knowingly, nothing; the greeting; and on a plain connection the check that
//! LOGIN is allowed (`LOGINDISABLED`). The result is a [`Connection`] ready for LOGIN or
//! AUTHENTICATE.

use super::{Connection, capability_code, has_capability};
use crate::imap_wire::{Status, StatusKind};
use crate::net::{self, Stream, Timeouts, TlsMode};
use crate::starttls::Protocol;

/// Where and how to reach the IMAP server.
#[derive(Clone)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// `Err` holds why TLS could not be set up (a bad CA file): every connection then
    /// fails with [`Error::Permanent`] rather than the process dying silently.
    pub connector: Result<native_tls::TlsConnector, String>,
    pub timeouts: Timeouts,
}

/// Why no connection ready for LOGIN could be had.
#[derive(Debug)]
pub enum Error {
    /// The server is unreachable, slow, or refused us: worth trying again later.
    Temporary(String),
    /// The configuration cannot work (a bad CA file, LOGIN disabled without TLS).
    Permanent(String),
}

/// A connection ready for LOGIN, and its greeting (`None` after STARTTLS, whose greeting
/// told the capabilities before TLS).
pub type Connected = (Connection<Stream>, Option<Status>);

/// Connects and reads the greeting; after this the connection is ready for LOGIN. Returns
/// the greeting too, unless STARTTLS made it obsolete (RFC 3501 §6.2.1: capabilities must
/// be asked again after TLS).
pub fn connect(server: &Server) -> Result<Connected, Error> {
    let temporary = |what: &str, e: &dyn std::fmt::Display| {
        Error::Temporary(format!(
            "{what} {}:{}: {e}{}",
            server.host,
            server.port,
            mode_hint(server.tls, &e.to_string())
        ))
    };
    let connector = match (&server.connector, server.tls) {
        (_, TlsMode::None) => None,
        (Ok(connector), _) => Some(connector),
        (Err(why), _) => return Err(Error::Permanent(why.clone())),
    };
    let mut tcp = net::connect_tcp(&server.host, server.port, server.timeouts)
        .map_err(|e| temporary("cannot connect to", &e))?;
    let stream = match (server.tls, connector) {
        (TlsMode::Starttls, Some(connector)) => {
            // Read a byte at a time, so nothing after the OK is consumed: the next bytes
            // belong to the TLS handshake (and injected plain text fails it).
            crate::starttls::negotiate(Protocol::Imap, &mut tcp)
                .map_err(|e| temporary("STARTTLS failed with", &format!("{e:#}")))?;
            let tls = net::wrap_tls(connector, &server.host, tcp)
                .map_err(|e| temporary("TLS failed with", &e))?;
            // No greeting follows STARTTLS (RFC 3501 §6.2.1).
            return Ok((Connection::new(tls), None));
        }
        (TlsMode::Implicit, Some(connector)) => net::wrap_tls(connector, &server.host, tcp)
            .map_err(|e| temporary("TLS failed with", &e))?,
        _ => Stream::Plain(tcp),
    };
    let mut connection = Connection::new(stream);
    let greeting = connection
        .greeting()
        .map_err(|e| temporary("no greeting from", &e))?;
    if greeting.kind != StatusKind::Ok {
        return Err(temporary("refused by", &greeting));
    }
    if server.tls == TlsMode::None {
        // The greeting's capabilities where it has them (Dovecot's does): no round trip.
        let names = match capability_code(&greeting) {
            Some(names) => names,
            None => {
                connection
                    .capability()
                    .map_err(|e| temporary("CAPABILITY failed at", &e))?
                    .0
            }
        };
        if has_capability(&names, "LOGINDISABLED") {
            return Err(Error::Permanent(format!(
                "{}:{} refuses LOGIN without TLS (LOGINDISABLED); use --imap-tls starttls",
                server.host, server.port
            )));
        }
    }
    Ok((connection, Some(greeting)))
}

/// The usual cause of three puzzling failures: a TLS mode that does not fit the port, or a
/// server whose TLS side fails after it agreed to STARTTLS.
fn mode_hint(mode: TlsMode, error: &str) -> &'static str {
    let timed_out = error.contains("temporarily unavailable") || error.contains("timed out");
    let plain_text = error.contains("wrong version number");
    match mode {
        TlsMode::Implicit if plain_text => {
            " (the server did not start TLS: a plain port? try --imap-tls starttls)"
        }
        // We stop reading at the tagged OK, so these bytes came after the server's go-ahead:
        // Courier, for one, says OK and then reports in plain text that its couriertls
        // helper failed to start (e.g. its user `courier` is missing).
        TlsMode::Starttls if plain_text => {
            " (the server said OK to STARTTLS, then sent plain text instead of TLS: its TLS \
             side failed to start; see the server's log)"
        }
        TlsMode::Starttls | TlsMode::None if timed_out => {
            " (timed out: if this port speaks TLS from the start, use --imap-tls implicit)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN_TEXT_ERROR: &str = "TLS handshake with localhost failed: error:0A00010B:SSL \
        routines:ssl3_get_record:wrong version number:../ssl/record/ssl3_record.c:350:";

    #[test]
    fn plain_text_after_a_starttls_ok_blames_the_server_tls_side() {
        let hint = mode_hint(TlsMode::Starttls, PLAIN_TEXT_ERROR);
        assert!(hint.contains("said OK to STARTTLS"), "{hint:?}");
        assert!(hint.contains("server's log"), "{hint:?}");
    }

    #[test]
    fn plain_text_on_implicit_tls_suggests_starttls() {
        let hint = mode_hint(TlsMode::Implicit, PLAIN_TEXT_ERROR);
        assert!(hint.contains("try --imap-tls starttls"), "{hint:?}");
    }
}
