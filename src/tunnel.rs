//! `legacy-mail-proxy tunnel`: joins a plain-text client on stdin/stdout to a TLS server,
//! the xinetd POP3→POP3S recipe done right.
//!
//! That recipe ran `openssl s_client -quiet -verify_quiet`, which carries on after a failed
//! certificate check. Here the certificate and host name are verified (RFC 6125, through
//! native-tls), and a client whose server fails the check gets nothing from it: the process
//! logs why and exits non-zero before it has written a byte to stdout.
//!
//! TLS starts at the first byte (RFC 8314 implicit TLS: POP3S, IMAPS, SMTPS) or after the
//! protocol's STARTTLS, done by [`crate::starttls`] (RFC 2595, RFC 3501, RFC 3207).
//!
//! The relay is full duplex: data the server sends while the client is silent (IMAP IDLE,
//! RFC 2177) reaches the client at once. One OpenSSL stream cannot be read and written
//! from two threads, so one thread owns it and never blocks reading it: a reader thread
//! per side turns socket reads into events, the TLS layer reads the server's bytes from an
//! in-memory inbox (see [`Wire`]), and a writer thread sends to the client. End of input on
//! either side is passed on as a half-close (TLS close_notify and TCP FIN towards the
//! server, FIN towards a socket client) and the tunnel waits for the other side to finish.
//!
//! Buffers between the two sides are bounded (a few chunks each way). The relay loop can
//! block while writing to the server; a server that stops reading while it writes more than
//! the kernel's socket buffers hold, to a client that does the same, ends the tunnel after
//! the backend timeout rather than growing memory. Mail protocols never do that in practice.

use crate::net;
use crate::options::BackendOptions;
use crate::starttls::{self, Protocol};
use anyhow::{Context, bail};
use native_tls::{HandshakeError, TlsConnector, TlsStream};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::{Duration, Instant};

/// Largest TLS record's plaintext (RFC 8446 §5.1): one read takes a whole record.
const CHUNK: usize = 16 * 1024;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// TLS server to join the client to, as HOST:PORT ([ADDRESS]:PORT for IPv6).
    #[arg(long, env = "LMP_CONNECT", value_name = "HOST:PORT")]
    pub connect: Endpoint,

    /// Speak this protocol's STARTTLS first, instead of TLS from the first byte.
    #[arg(long, env = "LMP_STARTTLS", value_enum, value_name = "PROTOCOL")]
    pub starttls: Option<Protocol>,

    /// Name the server's certificate must carry [default: HOST of --connect].
    #[arg(long, env = "LMP_SERVER_NAME", value_name = "NAME")]
    pub server_name: Option<String>,

    #[command(flatten)]
    pub backend: BackendOptions,

    /// Seconds both sides may stay silent before the tunnel closes. IMAP clients renew IDLE
    /// every 29 minutes (RFC 2177), so stay above 1740 for IMAP.
    #[arg(
        long,
        env = "LMP_IDLE_TIMEOUT",
        default_value = "1800",
        value_name = "SECONDS"
    )]
    pub idle_timeout: u64,
}

/// A server address as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = || format!("{text:?} is not HOST:PORT (use [ADDRESS]:PORT for IPv6)");
        let (host, port) = text.rsplit_once(':').ok_or_else(usage)?;
        let host = match host.strip_prefix('[') {
            Some(inner) => inner.strip_suffix(']').ok_or_else(usage)?,
            // An unbracketed IPv6 address would make the port ambiguous.
            None if host.contains(':') => return Err(usage()),
            None => host,
        };
        if host.is_empty() || host.contains(['[', ']', '/', ' ']) {
            return Err(usage());
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(usage)?;
        Ok(Endpoint {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How a tunnel ended.
#[derive(Debug)]
enum End {
    /// Both sides closed their direction.
    Closed,
    /// Neither side sent anything for the idle timeout.
    IdleTimeout,
    /// A socket failed; the text says which side and why.
    Failed(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => f.write_str("closed"),
            End::IdleTimeout => f.write_str("idle-timeout"),
            End::Failed(why) => write!(f, "error: {why}"),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    /// Bytes from the client to the server.
    up: u64,
    /// Bytes from the server to the client.
    down: u64,
}

/// Serves one client on stdin/stdout until both sides have closed.
pub fn serve(args: Args) -> ExitCode {
    let client = crate::input::client_address();
    let mode = match args.starttls {
        Some(protocol) => format!("starttls-{protocol}"),
        None => "implicit".to_string(),
    };
    log::info!(
        "tunnel connect from {client} to {} ({mode} TLS)",
        args.connect
    );
    let started = Instant::now();
    let (greeting, tls) = match open(&args) {
        Ok(opened) => opened,
        Err(e) => {
            // Nothing has been written to the client: it sees the connection close.
            log::error!("tunnel from {client} to {}: {e:#}", args.connect);
            return ExitCode::FAILURE;
        }
    };
    let idle = Duration::from_secs(args.idle_timeout.max(1));
    // No Nagle delay on interactive traffic, and no write blocked forever on a client
    // that stopped reading.
    crate::input::tune_client_socket(idle);
    let mut counts = Counts::default();
    let end = match relay(tls, greeting, idle, &mut counts) {
        Ok(end) => end,
        Err(e) => End::Failed(format!("{e:#}")),
    };
    log::info!(
        "tunnel end: client={client} server={} up={} down={} duration={:.3}s end={end}",
        args.connect,
        counts.up,
        counts.down,
        started.elapsed().as_secs_f64()
    );
    match end {
        End::Closed => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// Connects, runs STARTTLS if asked, and completes a verified TLS handshake. Returns what the
/// client must see first (the replayed greeting after STARTTLS) and the TLS stream.
fn open(args: &Args) -> anyhow::Result<(Vec<u8>, TlsStream<Wire>)> {
    let backend = &args.backend;
    if backend.danger_accept_invalid_certs {
        log::warn!(
            "--danger-accept-invalid-certs: anyone between here and {} can read and change this connection",
            args.connect
        );
    }
    let connector = backend.tls().connector()?;
    let name = args.server_name.as_deref().unwrap_or(&args.connect.host);
    let mut socket = net::connect_tcp(&args.connect.host, args.connect.port, backend.timeouts())
        .with_context(|| format!("cannot connect to {}", args.connect))?;
    let greeting = match args.starttls {
        Some(protocol) => starttls::negotiate(protocol, &mut socket)?,
        None => Vec::new(),
    };
    let tls = handshake(&connector, name, socket)?;
    Ok((greeting, tls))
}

fn handshake(
    connector: &TlsConnector,
    name: &str,
    socket: TcpStream,
) -> anyhow::Result<TlsStream<Wire>> {
    let wire = Wire {
        socket,
        inbox: None,
    };
    match connector.connect(name, wire) {
        Ok(tls) => Ok(tls),
        Err(HandshakeError::Failure(e)) => bail!("TLS handshake for {name} failed: {e}"),
        Err(HandshakeError::WouldBlock(_)) => bail!("TLS handshake for {name} timed out"),
    }
}

/// The TLS layer's view of the server socket. During the handshake it reads the socket
/// itself (the backend timeout bounds each read). Once the relay runs, a reader thread owns
/// the socket's reads and the relay loop puts what arrives into `inbox`; reads then never
/// block, and a read with nothing in the inbox says `WouldBlock`, which OpenSSL supports as
/// a non-blocking transport. Writes always go straight to the socket.
#[derive(Debug)]
struct Wire {
    socket: TcpStream,
    inbox: Option<Inbox>,
}

#[derive(Debug, Default)]
struct Inbox {
    bytes: Vec<u8>,
    start: usize,
    /// The server closed its side: after `bytes` comes end of input.
    eof: bool,
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(inbox) = &mut self.inbox else {
            return self.socket.read(buf);
        };
        let waiting = &inbox.bytes[inbox.start..];
        if waiting.is_empty() {
            return if inbox.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = waiting.len().min(buf.len());
        buf[..n].copy_from_slice(&waiting[..n]);
        inbox.start += n;
        if inbox.start == inbox.bytes.len() {
            inbox.bytes.clear();
            inbox.start = 0;
        }
        Ok(n)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A send timeout shows as WouldBlock on Linux, which OpenSSL would take for "try
        // again later"; it is a real failure here.
        self.socket.write(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => {
                io::Error::new(io::ErrorKind::TimedOut, "timed out writing to the server")
            }
            _ => e,
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.socket.flush()
    }
}

/// What the helper threads report to the relay loop.
#[derive(Debug)]
enum Event {
    /// Bytes from the server (TLS records); empty at end of input.
    Server(io::Result<Vec<u8>>),
    /// Bytes from the client; empty at end of input.
    Client(io::Result<Vec<u8>>),
    /// Writing to the client failed.
    ClientWriteFailed(io::Error),
    /// Everything for the client is written and the client's side closed. `half_closed` is
    /// false when stdout is not a socket (a pipe cannot be half-closed).
    ClientWriteDone { half_closed: bool },
}

/// The state of the relay loop: which directions are still open, and bytes in flight.
struct Relay {
    tls: TlsStream<Wire>,
    to_client: Option<SyncSender<Vec<u8>>>,
    /// Client bytes the TLS layer has not taken yet (it may want server data first).
    pending: Vec<u8>,
    /// The client has ended its input.
    client_eof: bool,
    /// That end has been passed on: close_notify and FIN sent to the server.
    to_server_closed: bool,
    /// The server has ended its output (and the writer was told to close the client's side).
    server_eof: bool,
}

fn relay(
    mut tls: TlsStream<Wire>,
    greeting: Vec<u8>,
    idle: Duration,
    counts: &mut Counts,
) -> anyhow::Result<End> {
    let server_reads = tls.get_ref().socket.try_clone()?;
    // Read timeouts belong to the socket, not to one descriptor: clear the handshake's, the
    // idle limit below is the only one that applies from now on.
    server_reads.set_read_timeout(None)?;
    tls.get_mut().inbox = Some(Inbox::default());

    let (events_tx, events) = sync_channel::<Event>(16);
    let server_tx = events_tx.clone();
    std::thread::spawn(move || read_into(server_reads, server_tx, Event::Server));
    let client_tx = events_tx.clone();
    std::thread::spawn(move || read_into(io::stdin(), client_tx, Event::Client));
    let stdout = crate::input::stdout_file().context("cannot use stdout")?;
    let (to_client, client_chunks) = sync_channel::<Vec<u8>>(16);
    std::thread::spawn(move || write_client(stdout, client_chunks, events_tx, idle));

    if !greeting.is_empty() {
        counts.down += greeting.len() as u64;
        let _ = to_client.send(greeting);
    }
    let mut relay = Relay {
        tls,
        to_client: Some(to_client),
        pending: Vec::new(),
        client_eof: false,
        to_server_closed: false,
        server_eof: false,
    };
    relay.run(&events, idle, counts)
}

impl Relay {
    fn run(
        &mut self,
        events: &Receiver<Event>,
        idle: Duration,
        counts: &mut Counts,
    ) -> anyhow::Result<End> {
        let mut last_data = Instant::now();
        let mut to_client_closed = false;
        loop {
            if to_client_closed && self.to_server_closed {
                return Ok(End::Closed);
            }
            let event = match events.recv_timeout(idle.saturating_sub(last_data.elapsed())) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => return Ok(End::IdleTimeout),
                Err(RecvTimeoutError::Disconnected) => bail!("relay threads ended"),
            };
            match event {
                Event::Server(Ok(bytes)) => {
                    if bytes.is_empty() {
                        self.inbox().eof = true;
                    } else {
                        last_data = Instant::now();
                        self.inbox().bytes.extend_from_slice(&bytes);
                    }
                    counts.down += self.drain_server()?;
                    // The TLS layer may have been waiting for these bytes to take ours.
                    counts.up += self.flush_client_bytes()?;
                }
                // The client has ended and we passed that on; a server that had already
                // closed answers our close_notify with a reset. That is the normal end
                // of a session (QUIT, then both sides close), not a failure.
                Event::Server(Err(e))
                    if self.to_server_closed
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset
                                | io::ErrorKind::BrokenPipe
                                | io::ErrorKind::NotConnected
                        ) =>
                {
                    log::debug!("server reset after the client's end: {e}");
                    self.inbox().eof = true;
                    counts.down += self.drain_server()?;
                    if !self.server_eof {
                        self.server_closed();
                    }
                }
                Event::Server(Err(e)) => {
                    return Ok(End::Failed(format!("reading from the server: {e}")));
                }
                Event::Client(Ok(bytes)) => {
                    if bytes.is_empty() {
                        self.client_eof = true;
                    } else {
                        last_data = Instant::now();
                        self.pending.extend_from_slice(&bytes);
                    }
                    counts.up += self.flush_client_bytes()?;
                }
                Event::Client(Err(e)) => {
                    return Ok(End::Failed(format!("reading from the client: {e}")));
                }
                Event::ClientWriteFailed(e) => {
                    return Ok(End::Failed(format!("writing to the client: {e}")));
                }
                Event::ClientWriteDone { half_closed } => {
                    to_client_closed = true;
                    // A pipe cannot tell the client that the server has gone without
                    // closing it, and it closes only when this process exits.
                    if !half_closed {
                        return Ok(End::Closed);
                    }
                }
            }
        }
    }

    fn inbox(&mut self) -> &mut Inbox {
        self.tls
            .get_mut()
            .inbox
            .as_mut()
            .expect("the relay runs with an inbox")
    }

    /// Hands the client every byte the TLS layer can decrypt from the inbox. Returns the
    /// count; at the server's end of data it closes the client's direction.
    fn drain_server(&mut self) -> anyhow::Result<u64> {
        let mut count = 0;
        let mut buf = vec![0u8; CHUNK];
        while !self.server_eof {
            match self.tls.read(&mut buf) {
                Ok(0) => self.server_closed(),
                Ok(n) => {
                    count += n as u64;
                    if let Some(to_client) = &self.to_client {
                        // The writer thread has stopped only after reporting why.
                        let _ = to_client.send(buf[..n].to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if self.inbox().eof => {
                    // End of TCP data without TLS close_notify. Nothing more can come, and
                    // mail protocols end their own sessions (QUIT, LOGOUT), so a truncation
                    // attack cannot hide anything that matters (RFC 8446 §6.1).
                    log::debug!("server closed without close_notify: {e}");
                    self.server_closed();
                }
                Err(e) => bail!("TLS error from the server: {e}"),
            }
        }
        Ok(count)
    }

    fn server_closed(&mut self) {
        self.server_eof = true;
        // Dropping the sender lets the writer finish what is queued, then close.
        self.to_client = None;
    }

    /// Gives the TLS layer the client's pending bytes, then passes on the client's end of
    /// data once everything before it is sent.
    fn flush_client_bytes(&mut self) -> anyhow::Result<u64> {
        let mut count = 0;
        while !self.pending.is_empty() {
            match self.tls.write(&self.pending) {
                Ok(n) => {
                    count += n as u64;
                    self.pending.drain(..n);
                }
                // Renegotiation: the TLS layer needs server bytes first; retried then.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(count),
                Err(e) => bail!("writing to the server: {e}"),
            }
        }
        self.tls.flush().context("writing to the server")?;
        if self.client_eof && !self.to_server_closed {
            self.to_server_closed = true;
            // close_notify, then FIN: the server sees a clean end of the client's data and
            // may still answer (RFC 8446 §6.1 allows the other direction to go on).
            if let Err(e) = self.tls.shutdown() {
                log::debug!("TLS close_notify to the server: {e}");
            }
            if let Err(e) = self.tls.get_ref().socket.shutdown(Shutdown::Write) {
                log::debug!("half-closing the server socket: {e}");
            }
        }
        Ok(count)
    }
}

/// Reads `source` until end of input or an error, sending each chunk as an event. The end is
/// an empty chunk.
fn read_into(
    mut source: impl Read,
    events: SyncSender<Event>,
    event: fn(io::Result<Vec<u8>>) -> Event,
) {
    loop {
        let mut buf = vec![0u8; CHUNK];
        let result = match source.read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Ok(buf)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
        let last = !matches!(&result, Ok(chunk) if !chunk.is_empty());
        if events.send(event(result)).is_err() || last {
            return;
        }
    }
}

/// Writes each chunk to the client. When the relay drops its sender (the server has closed)
/// it half-closes the client's socket, so the client sees the end while it may still send.
fn write_client(
    mut out: File,
    chunks: Receiver<Vec<u8>>,
    events: SyncSender<Event>,
    idle: Duration,
) {
    // A client that stops reading would block this write forever; under inetd stdout is a
    // socket, and a send timeout bounds it. (On a pipe the call fails; nothing to bound.)
    let _ = socket_view(&out).map(|s| s.set_write_timeout(Some(idle)));
    while let Ok(chunk) = chunks.recv() {
        if let Err(e) = out.write_all(&chunk) {
            // Dropped first: the relay loop may be blocked sending us the next chunk, and
            // only then can it take this event.
            drop(chunks);
            let _ = events.send(Event::ClientWriteFailed(e));
            return;
        }
    }
    let half_closed = socket_view(&out)
        .map(|s| s.shutdown(Shutdown::Write).is_ok())
        .unwrap_or(false);
    let _ = events.send(Event::ClientWriteDone { half_closed });
}

/// The socket behind `file`, for socket options and shutdown(2), through a duplicate
/// descriptor (any stream socket accepts them, TCP or not). Calls on a pipe fail with
/// ENOTSOCK, which callers treat as "not a socket".
fn socket_view(file: &File) -> io::Result<TcpStream> {
    Ok(TcpStream::from(OwnedFd::from(file.try_clone()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_host_port_and_bracketed_ipv6() {
        let parse = |s: &str| s.parse::<Endpoint>();
        assert_eq!(
            parse("pop.example.org:995"),
            Ok(Endpoint {
                host: "pop.example.org".into(),
                port: 995
            })
        );
        assert_eq!(parse("[::1]:993").unwrap().host, "::1");
        assert_eq!(parse("[::1]:993").unwrap().to_string(), "[::1]:993");
        assert_eq!(parse("127.0.0.1:465").unwrap().to_string(), "127.0.0.1:465");
        for bad in [
            "host",
            "host:",
            ":995",
            "host:0",
            "host:65536",
            "host:pop3s",
            "::1:993",
            "[::1]",
            "[::1:993",
            "a b:1",
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn wire_reads_its_inbox_and_says_would_block_when_empty() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut wire = Wire {
            socket,
            inbox: Some(Inbox::default()),
        };
        let mut buf = [0u8; 4];
        assert_eq!(
            wire.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        wire.inbox
            .as_mut()
            .unwrap()
            .bytes
            .extend_from_slice(b"abcdef");
        assert_eq!(wire.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf, b"abcd");
        wire.inbox.as_mut().unwrap().eof = true;
        assert_eq!(wire.read(&mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"ef");
        assert_eq!(wire.read(&mut buf).unwrap(), 0);
    }
}
