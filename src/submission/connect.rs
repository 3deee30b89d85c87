//! Opening a submission connection: TCP with our own timeouts and TCP_NODELAY, implicit TLS
//! (RFC 8314 §3, port 465) or STARTTLS (RFC 3207, port 587) with native-tls, which verifies
//! the certificate and host name with the trust the connector was built with (`--ca-file`
//! or the system roots), then the greeting and EHLO.
//!
//! Every wait is bounded by a socket timeout on a socket we own: the TCP connect by the
//! connect timeout, the TLS handshake and each reply by the I/O timeout (the greeting by
//! the longer of the two, RFC 5321 §4.5.3.2.1 allowing the server 5 minutes). No thread
//! watches from outside.

use super::client::{Client, Error, Transport};
use super::reply::Reply;
use crate::net::{self, Stream, Timeouts};
use native_tls::TlsConnector;
use std::fmt;
use std::io;
use std::net::Shutdown;
use std::time::Duration;

impl Transport for Stream {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        let tcp = tcp_of(self);
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))
    }

    fn cut(&mut self) {
        // Below TLS: no close_notify, no buffered record; the server sees the TCP stream end.
        let _ = tcp_of(self).shutdown(Shutdown::Both);
    }

    fn is_quiet(&self) -> bool {
        let tcp = tcp_of(self);
        if tcp.set_nonblocking(true).is_err() {
            return false;
        }
        // Any byte waiting (a 421, a TLS alert) or the end of the stream: not quiet.
        let quiet = matches!(tcp.peek(&mut [0]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        tcp.set_nonblocking(false).is_ok() && quiet
    }

    fn ack_at_once(&mut self) {
        crate::net::ack_at_once(tcp_of(self));
    }
}

/// The TCP socket under `stream`.
fn tcp_of(stream: &Stream) -> &std::net::TcpStream {
    match stream {
        Stream::Plain(tcp) => tcp,
        Stream::Tls(tls) => tls.get_ref(),
    }
}

/// How the connection is secured. The connectors carry the trust settings.
#[derive(Clone)]
pub enum Security {
    Implicit(TlsConnector),
    StartTls(TlsConnector),
    /// Plain text: passwords and messages cross the network readable.
    None,
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Security::Implicit(_) => "Implicit",
            Security::StartTls(_) => "StartTls",
            Security::None => "None",
        })
    }
}

/// Where a submission server is and how to reach it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub timeouts: Timeouts,
    /// Our name in EHLO.
    pub hello: String,
}

/// Why a connection could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// DNS, TCP, the TLS handshake (an untrusted certificate too), or a silent server.
    Unreachable(String),
    /// The server answered, but refused us (a `554` greeting, STARTTLS refused) or spoke
    /// no SMTP.
    Refused(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Unreachable(why) | OpenError::Refused(why) => f.write_str(why),
        }
    }
}

impl Endpoint {
    /// The wait for the greeting: never shorter than the I/O timeout.
    fn greeting_timeout(&self) -> Duration {
        self.timeouts.io.max(self.timeouts.connect)
    }

    /// Connects, secures, reads the greeting and says EHLO (again after STARTTLS, as RFC
    /// 3207 §4.2 requires: the first answer no longer counts). Returns a client whose
    /// [`Client::extensions`] are the server's.
    pub fn open(&self) -> Result<Client<Stream>, OpenError> {
        let at = format!("{}:{}", self.host, self.port);
        let lost = |what: &str, e: Error| match e {
            Error::Io(_) => OpenError::Unreachable(format!("{at}: {what}: {e}")),
            _ => OpenError::Refused(format!("{at}: {what}: {e}")),
        };
        let tcp = net::connect_tcp(&self.host, self.port, self.timeouts)
            .map_err(|e| OpenError::Unreachable(format!("cannot connect to {at}: {e}")))?;
        tcp.set_read_timeout(Some(self.greeting_timeout()))
            .map_err(|e| OpenError::Unreachable(format!("{at}: {e}")))?;
        let stream = match &self.security {
            Security::Implicit(connector) => self.handshake(connector, tcp)?,
            _ => Stream::Plain(tcp),
        };
        let mut client = Client::new(stream);
        let greeting = client.greeting().map_err(|e| lost("greeting", e))?;
        expect(&at, "greeting", &greeting, 220)?;
        client
            .set_timeout(self.timeouts.io)
            .map_err(|e| OpenError::Unreachable(format!("{at}: {e}")))?;
        let hello = client.hello(&self.hello).map_err(|e| lost("EHLO", e))?;
        expect(&at, "EHLO", &hello, 250)?;
        let Security::StartTls(connector) = &self.security else {
            return Ok(client);
        };
        // Never fall back to plain text: a downgrade would expose the password.
        if !client.extensions().starttls {
            return Err(OpenError::Refused(format!("{at} does not offer STARTTLS")));
        }
        let stream = match client.starttls().map_err(|e| lost("STARTTLS", e))? {
            Ok(Stream::Plain(tcp)) => self.handshake(connector, tcp)?,
            Ok(Stream::Tls(_)) => unreachable!("STARTTLS runs on a plain connection"),
            Err(refusal) => {
                return Err(OpenError::Refused(format!(
                    "{at}: STARTTLS answered {refusal}"
                )));
            }
        };
        let mut client = Client::new(stream);
        let hello = client
            .hello(&self.hello)
            .map_err(|e| lost("EHLO after STARTTLS", e))?;
        expect(&at, "EHLO", &hello, 250)?;
        Ok(client)
    }

    fn handshake(
        &self,
        connector: &TlsConnector,
        tcp: std::net::TcpStream,
    ) -> Result<Stream, OpenError> {
        net::wrap_tls(connector, &self.host, tcp)
            .map_err(|e| OpenError::Unreachable(format!("{}:{}: {e}", self.host, self.port)))
    }
}

fn expect(at: &str, what: &str, reply: &Reply, code: u16) -> Result<(), OpenError> {
    match reply.code == code {
        true => Ok(()),
        false => Err(OpenError::Refused(format!("{at}: {what} answered {reply}"))),
    }
}

/// This machine's name for EHLO when none is configured (what lettre's `hostname` feature
/// gave), or `[127.0.0.1]` when it has none usable.
pub fn local_hostname() -> String {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that
    // and we look only up to the first NUL (or the whole buffer).
    let ok = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0;
    let len = memchr::memchr(0, &name).unwrap_or(name.len());
    match std::str::from_utf8(&name[..len]) {
        Ok(host) if ok && !host.is_empty() && host.bytes().all(|b| b.is_ascii_graphic()) => {
            host.to_string()
        }
        _ => "[127.0.0.1]".to_string(),
    }
}
