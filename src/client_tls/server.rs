//! The server side of client TLS: the OpenSSL context from the certificate and key files,
//! and the client's duplex stream, which starts plain and can switch to TLS once.
//!
//! The `openssl` crate is used directly (native-tls is a wrapper over it on Linux and is
//! already in the tree) because native-tls cannot set OpenSSL's security level or cipher
//! list, and devices stuck on TLS 1.0 need security level 0 and the SHA-1 CBC suites.
//! The backend side keeps using native-tls at TLS 1.2+ with verification.
//!
//! stdin and stdout are one connection under inetd/systemd (fd 0 and 1 are the same
//! socket) but two pipes in tests: [`Duplex`] joins a reader and a writer into the one
//! `Read + Write` stream OpenSSL needs. The session reads through [`ClientReader`] and
//! writes through [`ClientWriter`], both handles on the same [`Link`].

use super::StartTls;
use crate::input::{ClientOutput, TickingStdin};
use anyhow::Context;
use openssl::ssl::{
    HandshakeError, SslAcceptor, SslFiletype, SslMethod, SslOptions, SslStream, SslVersion,
};
use std::cell::{Cell, RefCell};
use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// When the client's connection turns to TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain text, upgraded by STLS/STARTTLS (ports 110 and 25/587).
    StartTls,
    /// TLS from the first byte (POP3S 995, SMTPS 465).
    Implicit,
}

/// The oldest TLS version accepted from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MinVersion {
    Tls10,
    Tls11,
    Tls12,
    Tls13,
}

impl MinVersion {
    fn openssl(self) -> SslVersion {
        match self {
            MinVersion::Tls10 => SslVersion::TLS1,
            MinVersion::Tls11 => SslVersion::TLS1_1,
            MinVersion::Tls12 => SslVersion::TLS1_2,
            MinVersion::Tls13 => SslVersion::TLS1_3,
        }
    }
}

/// Client TLS settings, from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    /// PEM certificate chain (server certificate first).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    pub required: bool,
    pub min_version: MinVersion,
    pub handshake_timeout: Duration,
}

/// Builds the server context: certificate chain and key (checked to match), protocol floor.
///
/// From TLS 1.2 up, Mozilla's "intermediate" profile. Below it, OpenSSL's whole default
/// cipher list at security level 0: OpenSSL 3 refuses TLS 1.0/1.1 (their handshake
/// signatures use SHA-1/MD5) at any higher level, and old firmware often knows only
/// AES-CBC with SHA-1. This weakens only the client side of the gateway.
pub fn acceptor(settings: &Settings) -> anyhow::Result<SslAcceptor> {
    let mut builder =
        SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).context("cannot set up OpenSSL")?;
    builder
        .set_certificate_chain_file(&settings.cert)
        .with_context(|| {
            format!(
                "cannot load the client TLS certificate {} (PEM)",
                settings.cert.display()
            )
        })?;
    builder
        .set_private_key_file(&settings.key, SslFiletype::PEM)
        .with_context(|| {
            format!(
                "cannot load the client TLS key {} (PEM)",
                settings.key.display()
            )
        })?;
    builder.check_private_key().with_context(|| {
        format!(
            "the client TLS key {} does not match the certificate {}",
            settings.key.display(),
            settings.cert.display()
        )
    })?;
    if settings.min_version < MinVersion::Tls12 {
        // The Mozilla profile also switches the old versions off by option.
        builder.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
        builder.set_security_level(0);
        builder
            .set_cipher_list("DEFAULT:@SECLEVEL=0")
            .context("cannot set the legacy cipher list")?;
    }
    builder
        .set_min_proto_version(Some(settings.min_version.openssl()))
        .context("cannot set the minimum TLS version")?;
    Ok(builder.build())
}

/// What the client stream reads from: stdin, or a socket in tests.
pub trait ClientInput: Read {
    /// Drops bytes read from the connection but not yet handed out.
    fn discard_buffered(&mut self);
    /// Sets how long a read may wait before it fails with a tick; returns the old value.
    fn set_tick(&mut self, tick: Duration) -> Duration;
}

impl ClientInput for TickingStdin {
    fn discard_buffered(&mut self) {
        TickingStdin::discard_buffered(self)
    }
    fn set_tick(&mut self, tick: Duration) -> Duration {
        TickingStdin::set_tick(self, tick)
    }
}

/// The client's input and output as one stream, for OpenSSL.
pub struct Duplex<I, O> {
    pub input: I,
    pub output: O,
}

impl<I: ClientInput, O: Write> Read for Duplex<I, O> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.input.read(buf) {
            // An idle tick must reach OpenSSL as "try again" (a retriable BIO read), or the
            // connection would be marked broken; the session reads WouldBlock as a tick.
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(io::ErrorKind::WouldBlock.into()),
            other => other,
        }
    }
}

impl<I, O: Write> Write for Duplex<I, O> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.output.flush()
    }
}

enum Link<I, O> {
    Plain(Duplex<I, O>),
    Tls(Box<SslStream<Duplex<I, O>>>),
    /// The handshake failed; nothing more may be read or written.
    Broken,
}

impl<I: ClientInput, O: Write> Link<I, O> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(duplex) => duplex.read(buf),
            Link::Tls(stream) => stream.read(buf),
            Link::Broken => Err(broken()),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Plain(duplex) => duplex.write(buf),
            Link::Tls(stream) => stream.write(buf),
            Link::Broken => Err(broken()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Plain(duplex) => duplex.flush(),
            Link::Tls(stream) => stream.flush(),
            Link::Broken => Err(broken()),
        }
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "client TLS handshake failed")
}

/// State shared by the reader, the writer and the upgrade.
struct Shared<I, O> {
    link: RefCell<Link<I, O>>,
    /// Counts upgrades: a reader that sees it change drops what it had buffered.
    upgrades: Cell<u32>,
}

/// The client connection: plain at first, TLS after [`StartTls::start`] (or at once with
/// implicit TLS).
pub struct ClientTls<I, O> {
    shared: Rc<Shared<I, O>>,
    acceptor: Option<SslAcceptor>,
    settings: Option<Settings>,
    client: String,
}

/// The client's plain input and output as one stream; STLS/STARTTLS or implicit TLS is
/// possible when `settings` and `acceptor` are given. Returns the upgrade handle for the
/// session and the session's reader and writer.
pub fn client_stream<I: ClientInput, O: Write>(
    input: I,
    output: O,
    settings: Option<Settings>,
    acceptor: Option<SslAcceptor>,
    client: &str,
) -> (ClientTls<I, O>, ClientReader<I, O>, ClientWriter<I, O>) {
    let shared = Rc::new(Shared {
        link: RefCell::new(Link::Plain(Duplex { input, output })),
        upgrades: Cell::new(0),
    });
    let reader = ClientReader {
        shared: shared.clone(),
        seen: 0,
        buf: vec![0; 16 * 1024].into_boxed_slice(),
        pos: 0,
        len: 0,
    };
    let writer = ClientWriter {
        shared: shared.clone(),
    };
    let tls = ClientTls {
        shared,
        acceptor,
        settings,
        client: client.to_string(),
    };
    (tls, reader, writer)
}

impl<I: ClientInput, O: Write> ClientTls<I, O> {
    /// Sends a TLS close_notify, so the client sees an orderly end (no truncation alert).
    pub fn close_notify(&self) {
        if let Ok(mut link) = self.shared.link.try_borrow_mut()
            && let Link::Tls(stream) = &mut *link
        {
            let _ = stream.shutdown();
            let _ = stream.flush();
        }
    }

    fn handshake(&mut self) -> Result<(), String> {
        let (Some(acceptor), Some(settings)) = (&self.acceptor, &self.settings) else {
            return Err("client TLS is not configured".into());
        };
        let mut duplex = match self.shared.link.replace(Link::Broken) {
            Link::Plain(duplex) => duplex,
            other => {
                self.shared.link.replace(other);
                return Err("TLS is already active".into());
            }
        };
        // The injection defence: bytes the client sent after STLS/STARTTLS, in the same
        // packet or before our reply, were sent in clear text and are dropped here, both
        // in stdin's own buffer and (through `upgrades`) in the session's reader.
        duplex.input.discard_buffered();
        self.shared.upgrades.set(self.shared.upgrades.get() + 1);
        // A silent or slow client may take at most the handshake timeout.
        let timeout = settings.handshake_timeout;
        let idle_tick = duplex.input.set_tick(timeout);
        let deadline = Instant::now() + timeout;
        let mut attempt = acceptor.accept(duplex);
        let outcome = loop {
            match attempt {
                Ok(stream) => break Ok(stream),
                Err(HandshakeError::WouldBlock(mid)) => {
                    if Instant::now() >= deadline {
                        break Err(format!("no handshake within {} s", timeout.as_secs_f64()));
                    }
                    attempt = mid.handshake();
                }
                Err(HandshakeError::Failure(mid)) => break Err(reason(mid.error())),
                Err(HandshakeError::SetupFailure(e)) => break Err(e.to_string()),
            }
        };
        match outcome {
            Ok(mut stream) => {
                stream.get_mut().input.set_tick(idle_tick);
                log::info!(
                    "client TLS with {}: {} {}",
                    self.client,
                    stream.ssl().version_str(),
                    stream.ssl().current_cipher().map_or("-", |c| c.name())
                );
                self.shared.link.replace(Link::Tls(Box::new(stream)));
                Ok(())
            }
            Err(why) => {
                log::warn!("client TLS handshake with {} failed: {why}", self.client);
                Err(why)
            }
        }
    }
}

/// A handshake failure's reason: OpenSSL's error codes and texts, never the bytes seen.
fn reason(error: &openssl::ssl::Error) -> String {
    if let Some(stack) = error.ssl_error() {
        return stack.to_string();
    }
    match error.io_error() {
        Some(e) => format!("connection error: {e}"),
        None => format!("{error}"),
    }
}

impl<I: ClientInput, O: Write> StartTls for ClientTls<I, O> {
    fn offered(&self) -> bool {
        self.acceptor.is_some()
            && self
                .settings
                .as_ref()
                .is_some_and(|s| s.mode == Mode::StartTls)
            && !self.active()
    }

    fn active(&self) -> bool {
        matches!(&*self.shared.link.borrow(), Link::Tls(_))
    }

    fn required(&self) -> bool {
        self.settings.as_ref().is_some_and(|s| s.required)
    }

    fn start(&mut self) -> Result<(), String> {
        self.handshake()
    }
}

/// The session's input: a buffer over the link, emptied when the link turns to TLS.
pub struct ClientReader<I, O> {
    shared: Rc<Shared<I, O>>,
    seen: u32,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
}

impl<I: ClientInput, O: Write> Read for ClientReader<I, O> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        super::read_through_buffer(self, out)
    }
}

impl<I: ClientInput, O: Write> BufRead for ClientReader<I, O> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.seen != self.shared.upgrades.get() {
            // Plain-text bytes pipelined after STLS/STARTTLS: never commands.
            self.seen = self.shared.upgrades.get();
            self.pos = 0;
            self.len = 0;
        }
        if self.pos == self.len {
            let n = self.shared.link.borrow_mut().read(&mut self.buf)?;
            self.pos = 0;
            self.len = n;
        }
        Ok(&self.buf[self.pos..self.len])
    }

    fn consume(&mut self, amount: usize) {
        self.pos = (self.pos + amount).min(self.len);
    }
}

/// The session's output (put a `BufWriter` in front: each write is a TLS record).
pub struct ClientWriter<I, O> {
    shared: Rc<Shared<I, O>>,
}

impl<I: ClientInput, O: Write> Write for ClientWriter<I, O> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.link.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.shared.link.borrow_mut().flush()
    }
}

/// The production stream: stdin with idle ticks, stdout giving up at its first failure.
pub type StdioTls = ClientTls<TickingStdin, ClientOutput<std::fs::File>>;

/// The session's ends of the client connection.
pub type StdioReader = ClientReader<TickingStdin, ClientOutput<std::fs::File>>;
pub type StdioWriter = io::BufWriter<ClientWriter<TickingStdin, ClientOutput<std::fs::File>>>;

/// Why the client connection could not be set up (each already logged).
#[derive(Debug)]
pub enum SetupError {
    /// The certificate or key is unusable: the client should hear "try later" in plain
    /// text, its protocol's way.
    Config,
    /// stdout cannot be used, or the implicit-TLS handshake failed: nothing more to say.
    Connection,
}

/// stdin/stdout with client TLS as configured; with implicit TLS, after the handshake.
/// `tick` is the idle tick of the reads, `send_timeout` the one set on the socket.
pub fn stdio(
    settings: Option<Settings>,
    client: &str,
    tick: Duration,
    send_timeout: Duration,
) -> Result<(StdioTls, StdioReader, StdioWriter), SetupError> {
    let acceptor = match &settings {
        None => None,
        Some(settings) => match acceptor(settings) {
            Ok(acceptor) => Some(acceptor),
            Err(e) => {
                log::error!("client TLS configuration error: {e:#}");
                return Err(SetupError::Config);
            }
        },
    };
    let output = match crate::input::stdout_file() {
        Ok(file) => ClientOutput::new(file, send_timeout),
        Err(e) => {
            log::error!("cannot use stdout: {e}");
            return Err(SetupError::Connection);
        }
    };
    let implicit = settings.as_ref().is_some_and(|s| s.mode == Mode::Implicit);
    let (mut tls, reader, writer) =
        client_stream(TickingStdin::new(tick), output, settings, acceptor, client);
    if implicit && tls.handshake().is_err() {
        return Err(SetupError::Connection);
    }
    Ok((tls, reader, io::BufWriter::with_capacity(64 * 1024, writer)))
}
