//! A TCP forwarder that simulates a backend dying halfway: it relays 127.0.0.1
//! connections to a target port and, once a given number of bytes has come from the
//! server, delivers exactly those bytes and then drops both connections. Or
//! ([`FaultProxy::stall`]) one that goes silent halfway: the connections stay open and
//! nothing more comes from the server, as with a hung server or a lost route.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

pub struct FaultProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards each connection to
    /// 127.0.0.1:`target_port`. After `cut_after_bytes_from_server` bytes from the server
    /// (counted per connection, TLS bytes included), both sides are shut down.
    /// `usize::MAX` never cuts.
    pub fn start(target_port: u16, cut_after_bytes_from_server: usize) -> FaultProxy {
        FaultProxy::serve(target_port, move |client, server| {
            relay(client, server, cut_after_bytes_from_server)
        })
    }

    /// Listens on a free 127.0.0.1 port and forwards each connection to
    /// 127.0.0.1:`target_port` until the client has sent `trigger` (say `b"LOGIN"`, or
    /// `b"BODY.PEEK[]"`; empty: from the start, for TLS, where nothing can be seen); from
    /// then on `then_bytes` more bytes come from the server, and after them nothing: both
    /// connections stay open, silent, until the client closes its side.
    pub fn stall(target_port: u16, trigger: &'static [u8], then_bytes: usize) -> FaultProxy {
        FaultProxy::serve(target_port, move |client, server| {
            let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                return;
            };
            let triggered = Arc::new(AtomicBool::new(trigger.is_empty()));
            let seen = Arc::clone(&triggered);
            thread::spawn(move || watch_for(c2, s2, trigger, &seen));
            thread::spawn(move || stall_after(server, client, &triggered, then_bytes));
        })
    }

    /// Accepts connections on a free 127.0.0.1 port, connects each to
    /// 127.0.0.1:`target_port`, and hands both to `forward`.
    fn serve(
        target_port: u16,
        forward: impl Fn(TcpStream, TcpStream) + Send + 'static,
    ) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault proxy");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (stop2, conns2) = (Arc::clone(&stop), Arc::clone(&connections));
        thread::Builder::new()
            .name(format!("fault-proxy-{port}"))
            .spawn(move || {
                for client in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    conns2.fetch_add(1, Ordering::SeqCst);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    forward(client, server);
                }
            })
            .expect("spawn fault proxy");
        FaultProxy {
            port,
            stop,
            connections,
        }
    }

    /// The port clients (the proxy under test) should connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    /// Stops accepting; connections already relayed run to their end.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn shutdown_all(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

fn relay(client: TcpStream, server: TcpStream, cut_after: usize) {
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    // client → server, unlimited; server → client, cut after `cut_after` bytes.
    thread::spawn(move || pump(c2, s2, usize::MAX));
    thread::spawn(move || pump(server, client, cut_after));
}

/// Copies `from` to `to`, passing a half-close on. After `limit` bytes both connections
/// are cut, as by a server dying in the middle of a response.
fn pump(mut from: TcpStream, mut to: TcpStream, limit: usize) {
    let mut left = limit;
    let mut buf = [0u8; 16384];
    while left > 0 {
        let want = buf.len().min(left);
        match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    shutdown_all(&from, &to);
                    return;
                }
                left -= n;
            }
        }
    }
    let _ = to.flush();
    shutdown_all(&from, &to);
}

/// Copies client → server, setting `triggered` once `trigger` has gone by.
fn watch_for(mut from: TcpStream, mut to: TcpStream, trigger: &[u8], triggered: &AtomicBool) {
    let mut recent: Vec<u8> = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                recent.extend_from_slice(&buf[..n]);
                if !trigger.is_empty() && recent.windows(trigger.len()).any(|w| w == trigger) {
                    triggered.store(true, Ordering::SeqCst);
                }
                // Keep just enough to find a trigger split across reads.
                let keep = recent.len().min(trigger.len());
                recent.drain(..recent.len() - keep);
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Copies server → client; once `triggered`, only `limit` more bytes, then it reads and
/// drops what the server sends, so the client sees a server that has gone silent. Even
/// the server's close is not passed on then: a hung server or a lost route sends nothing.
fn stall_after(mut from: TcpStream, mut to: TcpStream, triggered: &AtomicBool, limit: usize) {
    let mut left = limit;
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let stalled = triggered.load(Ordering::SeqCst) && left == 0;
                if !stalled {
                    let _ = to.shutdown(Shutdown::Write);
                }
                // The client's side stays open through `watch_for`'s handle until the
                // client closes it.
                return;
            }
            Ok(n) => n,
        };
        let forward = if triggered.load(Ordering::SeqCst) {
            let forward = n.min(left);
            left -= forward;
            forward
        } else {
            n
        };
        if forward > 0 && to.write_all(&buf[..forward]).is_err() {
            return;
        }
    }
}

/// Forwards 127.0.0.1 connections to a plain-text server on `target_port`, passing each
/// line from the server through `edit`, which may change it or (`None`) drop it: a server
/// that lacks a capability or an answer the real one has. Returns the port to connect to.
pub fn line_filter(
    target_port: u16,
    edit: impl Fn(Vec<u8>) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> u16 {
    use std::io::BufRead;
    let edit = Arc::new(edit);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let server = TcpStream::connect(("127.0.0.1", target_port)).unwrap();
            let (mut client_in, mut server_out) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut client_in, &mut server_out);
                let _ = server_out.shutdown(Shutdown::Write);
            });
            let edit = edit.clone();
            thread::spawn(move || {
                let mut from_server = std::io::BufReader::new(server);
                let mut to_client = client;
                loop {
                    let mut line = Vec::new();
                    if from_server.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                        let _ = to_client.shutdown(Shutdown::Write);
                        return;
                    }
                    let Some(line) = edit(line) else { continue };
                    if to_client.write_all(&line).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// `line` without `needle` when it is an IMAP capability list (`* CAPABILITY …` or a
/// `[CAPABILITY …]` response code), unchanged otherwise.
pub fn without_capability(line: Vec<u8>, needle: &str) -> Vec<u8> {
    if line.starts_with(b"* CAPABILITY") || line.windows(12).any(|w| w == b"[CAPABILITY ") {
        return String::from_utf8_lossy(&line)
            .replace(needle, "")
            .into_bytes();
    }
    line
}
