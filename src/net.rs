//! Backend connections: TCP with timeouts, and TLS on top when asked.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How a backend connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS from the first byte (IMAPS 993, SMTPS 465, POP3S 995).
    Implicit,
    /// Plain greeting, then STARTTLS before anything else (IMAP 143, submission 587).
    Starttls,
    /// No encryption at all. Passwords cross the network in clear text.
    None,
}

/// A plain or TLS-wrapped TCP stream.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<native_tls::TlsStream<TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Connection timeouts for a backend.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub io: Duration,
}

/// Asks the kernel to acknowledge what arrives next on `socket` at once instead of after
/// the delayed-ACK timer (TCP_QUICKACK, Linux only; elsewhere nothing happens). The mode
/// lapses by itself, so callers ask before every read whose reply a peer with Nagle's
/// algorithm on may be holding back until its earlier data is acknowledged (Postfix's
/// smtpd after an early flush of pipelined replies: up to 40 ms each time otherwise).
pub fn ack_at_once(socket: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: a valid socket descriptor and a c_int option of the right size. A
        // failure (not TCP, an old kernel) only leaves the kernel's usual delayed ACKs.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                std::ptr::addr_of!(on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = socket;
}

/// Connects to the first address of `host` that answers within the connect timeout.
pub fn connect_tcp(host: &str, port: u16, timeouts: Timeouts) -> io::Result<TcpStream> {
    let mut last_error = None;
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeouts.connect) {
            Ok(stream) => {
                stream.set_read_timeout(Some(timeouts.io))?;
                stream.set_write_timeout(Some(timeouts.io))?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
    }))
}

/// Wraps `tcp` in TLS, verifying the certificate for `host`.
pub fn wrap_tls(
    connector: &native_tls::TlsConnector,
    host: &str,
    tcp: TcpStream,
) -> io::Result<Stream> {
    match connector.connect(host, tcp) {
        Ok(tls) => Ok(Stream::Tls(Box::new(tls))),
        Err(native_tls::HandshakeError::Failure(e)) => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("TLS handshake with {host} failed: {e}"),
        )),
        Err(native_tls::HandshakeError::WouldBlock(_)) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("TLS handshake with {host} timed out"),
        )),
    }
}

/// Reads one line (up to LF) a byte at a time, so nothing after it is consumed. Used before
/// STARTTLS, where bytes read past the server's OK would belong to the TLS handshake.
pub fn read_line_unbuffered(stream: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < max {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(line);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "server line too long before STARTTLS",
    ))
}
