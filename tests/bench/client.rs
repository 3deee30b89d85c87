//! The benchmark's own POP3 and SMTP clients: the same code drives all three columns, so
//! any difference between columns is the server side's.
//!
//! They are deliberately small and fast: one buffered reader per connection (64 KiB),
//! commands written in one `write` each, replies scanned with `read_until`, no pipelining
//! (legacy clients rarely pipeline, and a gateway pays one round trip per command either
//! way). TLS (only for direct access) is native-tls, verified against the test CA.

use legacy_mail_proxy::net::Stream;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Where a client connects, and whether it speaks TLS to get there.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub port: u16,
    pub tls: Tls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tls {
    /// Plain TCP to 127.0.0.1.
    None,
    /// POP3 `STLS` (RFC 2595) after the greeting.
    Stls,
    /// TLS from the first byte (submissions, RFC 8314).
    Implicit,
}

pub type Result<T> = std::result::Result<T, String>;

fn tcp(port: u16) -> Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect {port}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    // Generous: a 50 MB message through a gateway on a busy machine.
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

fn tls_wrap(connector: &native_tls::TlsConnector, s: TcpStream) -> Result<Stream> {
    connector
        .connect("localhost", s)
        .map(|t| Stream::Tls(Box::new(t)))
        .map_err(|e| format!("TLS handshake: {e}"))
}

/// Connects to `ep`, with TLS from the first byte if it says so.
fn open(ep: &Endpoint, tls: &native_tls::TlsConnector) -> Result<BufReader<Stream>> {
    let tcp = tcp(ep.port)?;
    let stream = match ep.tls {
        Tls::Implicit => tls_wrap(tls, tcp)?,
        Tls::None | Tls::Stls => Stream::Plain(tcp),
    };
    Ok(BufReader::with_capacity(64 * 1024, stream))
}

/// A TLS client that trusts only the test CA.
pub fn connector(ca_file: &std::path::Path) -> native_tls::TlsConnector {
    let pem = std::fs::read(ca_file).expect("read CA file");
    let ca = native_tls::Certificate::from_pem(&pem).expect("CA certificate");
    native_tls::TlsConnector::builder()
        .add_root_certificate(ca)
        .disable_built_in_roots(true)
        .build()
        .expect("TLS connector")
}

/// Reads one line into `line` (cleared first); fails on EOF.
fn read_line(io: &mut BufReader<Stream>, line: &mut Vec<u8>) -> Result<()> {
    line.clear();
    match io.read_until(b'\n', line) {
        Ok(0) => Err("connection closed by the server".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("read: {e}")),
    }
}

fn send(io: &mut BufReader<Stream>, bytes: &[u8]) -> Result<()> {
    io.get_mut()
        .write_all(bytes)
        .map_err(|e| format!("write: {e}"))
}

/// What a multi-line POP3 reply carried.
#[derive(Default, Debug, Clone, Copy)]
pub struct Body {
    /// Octets after removing dot-stuffing, CRLF included (what LIST counts).
    pub octets: u64,
    pub lines: u64,
}

pub struct Pop3 {
    io: BufReader<Stream>,
    line: Vec<u8>,
}

impl Pop3 {
    /// Connects, reads the greeting and, for [`Tls::Stls`], upgrades the connection.
    pub fn connect(ep: &Endpoint, tls: &native_tls::TlsConnector) -> Result<Pop3> {
        let mut c = Pop3 {
            io: open(ep, tls)?,
            line: Vec::with_capacity(1024),
        };
        c.status()?;
        if ep.tls == Tls::Stls {
            c.command("STLS")?;
            // Nothing follows +OK until the handshake, so the buffer is empty here.
            let Stream::Plain(tcp) = c.io.into_inner() else {
                unreachable!()
            };
            c.io = BufReader::with_capacity(64 * 1024, tls_wrap(tls, tcp)?);
        }
        Ok(c)
    }

    fn status(&mut self) -> Result<String> {
        read_line(&mut self.io, &mut self.line)?;
        let text = String::from_utf8_lossy(&self.line).trim_end().to_string();
        if text.starts_with("+OK") {
            Ok(text)
        } else {
            Err(format!("POP3 server said {text:?}"))
        }
    }

    /// A single-line command; returns the +OK line.
    pub fn command(&mut self, command: &str) -> Result<String> {
        send(&mut self.io, format!("{command}\r\n").as_bytes())?;
        self.status()
            .map_err(|e| format!("{}: {e}", command.split(' ').next().unwrap_or("")))
    }

    /// A multi-line command (RETR, LIST, UIDL): reads the body to the final dot.
    pub fn multiline(&mut self, command: &str) -> Result<Body> {
        self.command(command)?;
        let mut body = Body::default();
        loop {
            read_line(&mut self.io, &mut self.line)?;
            if self.line == b".\r\n" {
                return Ok(body);
            }
            if !self.line.ends_with(b"\r\n") {
                return Err(format!("{command}: line without CRLF"));
            }
            let stuffed = u64::from(self.line[0] == b'.');
            body.octets += self.line.len() as u64 - stuffed;
            body.lines += 1;
        }
    }

    pub fn login(&mut self, user: &str, password: &str) -> Result<()> {
        self.command(&format!("USER {user}"))?;
        self.command(&format!("PASS {password}")).map(drop)
    }

    /// STAT: (messages, octets).
    pub fn stat(&mut self) -> Result<(u64, u64)> {
        let line = self.command("STAT")?;
        let mut f = line.split_whitespace().skip(1).map(|n| n.parse::<u64>());
        match (f.next(), f.next()) {
            (Some(Ok(n)), Some(Ok(octets))) => Ok((n, octets)),
            _ => Err(format!("bad STAT reply {line:?}")),
        }
    }

    pub fn quit(mut self) -> Result<()> {
        self.command("QUIT").map(drop)
    }
}

pub struct Smtp {
    io: BufReader<Stream>,
    line: Vec<u8>,
}

impl Smtp {
    /// Connects and reads the 220 greeting.
    pub fn connect(ep: &Endpoint, tls: &native_tls::TlsConnector) -> Result<Smtp> {
        let mut c = Smtp {
            io: open(ep, tls)?,
            line: Vec::with_capacity(1024),
        };
        c.expect(220, "greeting")?;
        Ok(c)
    }

    /// Reads a (possibly multi-line) reply and checks its code.
    fn expect(&mut self, code: u16, after: &str) -> Result<()> {
        let mut all = String::new();
        loop {
            read_line(&mut self.io, &mut self.line)?;
            all.push_str(&String::from_utf8_lossy(&self.line));
            if self.line.len() < 4 || self.line[3] != b'-' {
                break;
            }
        }
        if all.starts_with(&code.to_string()) {
            Ok(())
        } else {
            Err(format!("after {after}: {}", all.trim_end()))
        }
    }

    fn command(&mut self, line: &str, code: u16) -> Result<()> {
        send(&mut self.io, format!("{line}\r\n").as_bytes())?;
        self.expect(code, line.split(' ').next().unwrap_or(line))
    }

    pub fn ehlo_auth(&mut self, user: &str, password: &str) -> Result<()> {
        self.command("EHLO bench.test", 250)?;
        let token = legacy_mail_proxy::base64::encode(format!("\0{user}\0{password}").as_bytes());
        self.command(&format!("AUTH PLAIN {token}"), 235)
    }

    /// One transaction; `data` is already dot-stuffed and ends with CRLF "." CRLF.
    pub fn send(&mut self, from: &str, to: &str, data: &[u8]) -> Result<()> {
        self.command(&format!("MAIL FROM:<{from}>"), 250)?;
        self.command(&format!("RCPT TO:<{to}>"), 250)?;
        self.command("DATA", 354)?;
        send(&mut self.io, data)?;
        self.expect(250, "end of data")
    }

    pub fn quit(mut self) -> Result<()> {
        self.command("QUIT", 221)
    }
}
