//! The client's side of the connection: stdin with idle ticks, and the peer's address.
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

use std::io::{self, Read};
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
