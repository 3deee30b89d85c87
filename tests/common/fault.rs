//! A TCP forwarder that simulates a backend dying halfway: it relays 127.0.0.1
//! connections to a target port and, once a given number of bytes has come from the
//! server, delivers exactly those bytes and then drops both connections ([`FaultProxy::start`])
//! or, for a backend that hangs, keeps both open and forwards nothing more from the server
//! ([`FaultProxy::stall`]).

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
        Self::start_with(target_port, cut_after_bytes_from_server, AtLimit::Cut)
    }

    /// Like [`FaultProxy::start`], but after `stall_after_bytes_from_server` bytes the
    /// server's further bytes are swallowed and both connections stay open, as with a
    /// server that stops answering. The client's bytes still reach the server; everything
    /// closes when the client closes.
    pub fn stall(target_port: u16, stall_after_bytes_from_server: usize) -> FaultProxy {
        Self::start_with(target_port, stall_after_bytes_from_server, AtLimit::Stall)
    }

    fn start_with(
        target_port: u16,
        cut_after_bytes_from_server: usize,
        at_limit: AtLimit,
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
                    relay(client, server, cut_after_bytes_from_server, at_limit);
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

/// What happens once the server has sent its allowance of bytes.
#[derive(Clone, Copy)]
enum AtLimit {
    Cut,
    Stall,
}

fn relay(client: TcpStream, server: TcpStream, cut_after: usize, at_limit: AtLimit) {
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    // client → server, unlimited; server → client, cut after `cut_after` bytes.
    thread::spawn(move || pump(c2, s2, usize::MAX));
    thread::spawn(move || match at_limit {
        AtLimit::Cut => pump(server, client, cut_after),
        AtLimit::Stall => {
            if let Some(mut server) = pump_until(server, &client, cut_after) {
                // Swallow the rest until the server closes (after the client did).
                let _ = std::io::copy(&mut server, &mut std::io::sink());
                let _ = client.shutdown(Shutdown::Write);
            }
        }
    });
}

/// Copies `from` to `to`, passing a half-close on. After `limit` bytes both connections
/// are cut, as by a server dying in the middle of a response.
fn pump(from: TcpStream, to: TcpStream, limit: usize) {
    if let Some(from) = pump_until(from, &to, limit) {
        shutdown_all(&from, &to);
    }
}

/// Copies `limit` bytes from `from` to `to` and gives `from` back; `None` when either
/// connection ended first (a half-close is passed on).
fn pump_until(mut from: TcpStream, mut to: &TcpStream, limit: usize) -> Option<TcpStream> {
    let mut left = limit;
    let mut buf = [0u8; 16384];
    while left > 0 {
        let want = buf.len().min(left);
        match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return None;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    shutdown_all(&from, to);
                    return None;
                }
                left -= n;
            }
        }
    }
    let _ = to.flush();
    Some(from)
}
