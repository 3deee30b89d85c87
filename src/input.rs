//! The client's side of the connection: stdin with idle ticks, stdout that stops at its
//! first write error, and the peer's address.
//!
//! Under inetd and systemd `Accept=yes`, stdin is a socket: reads wait with a receive
//! timeout. In the demo and in tests it is a pipe, where a socket timeout would not work, so
//! one thread does the blocking reads and the session waits on a channel with a timeout.
//! (The thread is not used for sockets: handing every command from one thread to another
//! costs two wake-ups, which a busy machine turns into milliseconds.) Ticks come on a fixed
//! schedule, whether or not the client sends anything: each surfaces as an `ErrorKind::TimedOut`
//! read error, the session's cue to keep the backend alive and to check its idle limit
//! (RFC 1939 §3 autologout, RFC 5321 §4.5.3.2). A client trickling one byte at a time
//! therefore cannot hold off either.

use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{Receiver, RecvTimeoutError, sync_channel};
use std::time::{Duration, Instant};

/// A reader over stdin whose reads fail with `TimedOut` once every `tick`.
pub struct TickingStdin {
    /// stdin itself when it is a socket; then the fields below are unused.
    socket: Option<ManuallyDrop<TcpStream>>,
    chunks: Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
    tick: Duration,
    next_tick: Instant,
    eof: bool,
}

impl TickingStdin {
    pub fn new(tick: Duration) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: fd 0 is open for the whole process, and ManuallyDrop never closes it.
        let socket = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(0) });
        if socket.set_read_timeout(Some(tick)).is_ok() {
            return TickingStdin {
                socket: Some(socket),
                chunks: sync_channel(0).1,
                current: Vec::new(),
                pos: 0,
                tick,
                next_tick: Instant::now() + tick,
                eof: false,
            };
        }
        // A small bound keeps memory flat when the client sends faster than we relay.
        let (tx, rx) = sync_channel(4);
        std::thread::spawn(move || {
            let mut stdin = io::stdin().lock();
            loop {
                let mut buf = vec![0u8; 64 * 1024];
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Ok(buf)).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
        });
        TickingStdin {
            socket: None,
            chunks: rx,
            current: Vec::new(),
            pos: 0,
            tick,
            next_tick: Instant::now() + tick,
            eof: false,
        }
    }
}

impl TickingStdin {
    /// Drops what was read from a pipe but not yet handed out (a socket buffers nothing
    /// here). Used before a TLS handshake: bytes pipelined after STLS/STARTTLS.
    pub fn discard_buffered(&mut self) {
        self.current.clear();
        self.pos = 0;
    }

    /// Sets the tick (for example, the TLS handshake timeout); returns the old one.
    pub fn set_tick(&mut self, tick: Duration) -> Duration {
        self.next_tick = Instant::now() + tick;
        std::mem::replace(&mut self.tick, tick)
    }
}

impl Read for TickingStdin {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let now = Instant::now();
        if now >= self.next_tick {
            self.next_tick = now + self.tick;
            return Err(io::ErrorKind::TimedOut.into());
        }
        if let Some(socket) = &mut self.socket {
            socket.set_read_timeout(Some(self.next_tick - now))?;
            return match socket.read(buf) {
                // A receive timeout is EAGAIN on Linux.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.next_tick = Instant::now() + self.tick;
                    Err(io::ErrorKind::TimedOut.into())
                }
                other => other,
            };
        }
        if self.pos == self.current.len() {
            if self.eof {
                return Ok(0);
            }
            match self.chunks.recv_timeout(self.next_tick - now) {
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {
                    self.next_tick = Instant::now() + self.tick;
                    return Err(io::ErrorKind::TimedOut.into());
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.eof = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The client's address: the peer of the socket on stdin, else `REMOTE_ADDR` (set by
/// systemd `Accept=yes` and by xinetd's `REMOTE_HOST` logging), else "local" for a pipe.
pub fn client_address() -> String {
    if let Some(addr) = stdin_peer() {
        return addr.to_string();
    }
    for var in ["REMOTE_ADDR", "REMOTE_HOST"] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
        {
            return v;
        }
    }
    "local".to_string()
}

/// Sets up the client's socket on stdout; on a pipe this does nothing.
///
/// - A send timeout bounds how long a write may block. Without it, a client that stops
///   reading in the middle of a long reply would hold the process, and a POP3 mailbox
///   lock, forever.
/// - TCP_NODELAY: replies are written whole, and the last segment of each must not wait
///   for the client's delayed ACK of the one before (Nagle), 40 ms each time.
pub fn tune_client_socket(write_timeout: Duration) {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: as in `stdin_peer`: fd 1 stays open and is handed back before the
    // TcpStream could close it. Socket options belong to the socket, so they also apply
    // to the duplicate of fd 1 that `stdout_file` returns.
    let socket = unsafe { TcpStream::from_raw_fd(1) };
    let _ = socket.set_write_timeout(Some(write_timeout));
    let _ = socket.set_nodelay(true);
    let _ = socket.into_raw_fd();
}

fn stdin_peer() -> Option<SocketAddr> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: fd 0 is open for the whole process; the TcpStream is turned back into a raw
    // fd before it can be dropped, so fd 0 is never closed here. On a pipe, getpeername
    // fails with ENOTSOCK and we simply get None.
    let socket = unsafe { TcpStream::from_raw_fd(0) };
    let peer = socket.peer_addr().ok();
    let _ = socket.into_raw_fd();
    peer
}

/// stdout as a plain file. `std::io::Stdout` is line-buffered, which would cost a system
/// call per line of a message; this is a duplicate of fd 1 for use behind a `BufWriter`.
pub fn stdout_file() -> io::Result<std::fs::File> {
    use std::os::fd::AsFd;
    Ok(std::fs::File::from(
        io::stdout().as_fd().try_clone_to_owned()?,
    ))
}

/// The client's output as the sessions use it: stdout behind a 64 KiB buffer that gives up
/// at the first write error or stall (see [`ClientOutput`]). `send_timeout` is the one
/// [`tune_client_socket`] set.
pub fn client_output(
    send_timeout: Duration,
) -> io::Result<io::BufWriter<ClientOutput<std::fs::File>>> {
    Ok(io::BufWriter::with_capacity(
        64 * 1024,
        ClientOutput::new(stdout_file()?, send_timeout),
    ))
}

/// A writer to the client that fails every write and flush after the first failure.
///
/// Once a write to the client has failed (its send timeout expired, it reset the
/// connection), nothing more may be tried: each later attempt on a client that stopped
/// reading blocks for a whole send timeout again. A `BufWriter` retries its buffered bytes
/// in the session's final flush and again when it is dropped, which held the process, and a
/// POP3 mailbox lock, for several send timeouts. Behind this writer those retries fail at
/// once, and the process ends within one send timeout.
///
/// A write that returns short after blocking for the send timeout counts as a failure too:
/// the kernel returns what it managed to queue when the timeout expires, and `write_all`
/// would otherwise start another full timeout for the rest. A client that took in less than
/// one buffer in a whole send timeout has, for this purpose, stopped reading. (A blocking
/// socket returns short only then; a pipe, never.)
#[derive(Debug)]
pub struct ClientOutput<W> {
    inner: W,
    send_timeout: Duration,
    /// The first error, repeated to every later caller.
    failed: Option<(io::ErrorKind, String)>,
}

impl<W: Write> ClientOutput<W> {
    pub fn new(inner: W, send_timeout: Duration) -> Self {
        ClientOutput {
            inner,
            send_timeout,
            failed: None,
        }
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some((kind, why)) => Err(io::Error::new(
                *kind,
                format!("client connection already failed: {why}"),
            )),
        }
    }

    fn latch<T>(&mut self, result: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &result
            && e.kind() != io::ErrorKind::Interrupted
        {
            self.failed = Some((e.kind(), e.to_string()));
        }
        result
    }
}

impl<W: Write> Write for ClientOutput<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        let started = Instant::now();
        let result = match self.inner.write(buf) {
            // Half the timeout: the kernel counts in clock ticks, and a short write that
            // took this long can only have been cut by the timeout.
            Ok(n) if n < buf.len() && started.elapsed() >= self.send_timeout / 2 => {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client took {n} of {} bytes in {:.1} s (send timeout)",
                        buf.len(),
                        started.elapsed().as_secs_f64()
                    ),
                ))
            }
            other => other,
        };
        self.latch(result)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        let result = self.inner.flush();
        self.latch(result)
    }
}

#[cfg(test)]
mod tests {
    use super::ClientOutput;
    use std::cell::Cell;
    use std::io::{self, BufWriter, Write};
    use std::rc::Rc;
    use std::time::Duration;

    const SECOND: Duration = Duration::from_secs(1);

    /// A client that stopped reading: every write times out, and is counted.
    struct Stalled(Rc<Cell<u32>>);

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            self.0.set(self.0.get() + 1);
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A client that reads a trickle: each write blocks for the timeout, then takes a
    /// few bytes, as a socket with SO_SNDTIMEO does.
    struct Trickling {
        attempts: Rc<Cell<u32>>,
        timeout: Duration,
    }

    impl Write for Trickling {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.attempts.set(self.attempts.get() + 1);
            std::thread::sleep(self.timeout);
            Ok(buf.len().min(3))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn after_the_first_failed_write_nothing_is_written_again_not_even_at_drop() {
        let attempts = Rc::new(Cell::new(0));
        let mut out =
            BufWriter::with_capacity(32, ClientOutput::new(Stalled(attempts.clone()), SECOND));
        out.write_all(b"+OK 100 octets\r\n").unwrap();
        assert!(
            out.write_all(b"more than the buffer holds now\r\n")
                .is_err()
        );
        assert_eq!(attempts.get(), 1);
        let again = out.flush().unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
        // Buffered, but never sent: not at the next flush, not at drop.
        out.write_all(b"-ERR\r\n").unwrap();
        assert!(out.flush().is_err());
        drop(out);
        assert_eq!(
            attempts.get(),
            1,
            "a stalled client must cost one send timeout"
        );
    }

    #[test]
    fn a_write_cut_short_by_the_send_timeout_is_the_last_one() {
        let attempts = Rc::new(Cell::new(0));
        let timeout = Duration::from_millis(40);
        let trickling = Trickling {
            attempts: attempts.clone(),
            timeout,
        };
        let mut out = ClientOutput::new(trickling, timeout);
        let error = out.write_all(b"+OK 100 octets\r\n").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(out.flush().is_err());
        assert_eq!(attempts.get(), 1);
    }

    #[test]
    fn a_working_client_gets_every_byte() {
        let mut out = BufWriter::with_capacity(4, ClientOutput::new(Vec::new(), SECOND));
        out.write_all(b"+OK hello\r\n").unwrap();
        out.flush().unwrap();
        let inner = out.into_inner().unwrap();
        assert_eq!(inner.inner, b"+OK hello\r\n");
    }
}
