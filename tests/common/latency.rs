//! A wide-area link in user space (issue 14): a TCP relay that listens on 127.0.0.1,
//! forwards each connection to a target port, and delays every byte by a configurable
//! one-way time in each direction. The kernel's `netem` is not available on these machines.
//!
//! What it models:
//! - **Latency, not bandwidth.** Each chunk is time-stamped when the relay reads it and
//!   written on once it is due (`read time + one-way delay`). Nothing sleeps per chunk, so a
//!   bulk transfer pays the delay once, not once per chunk; the only cap is the machine.
//!   A bounded queue (at most [`QUEUE_CHUNKS`] chunks of up to 64 KiB per direction) passes
//!   back-pressure on instead of buffering without limit, like a large TCP window.
//! - **Order.** One queue per direction, written by one thread: bytes leave in the order
//!   they came; a half-close (EOF) travels the link like data, after the bytes before it.
//! - **The TCP handshake.** The relay accepts the client at once (loopback), so it opens
//!   the connection to the target only 3 one-way times later and holds the client's data
//!   until then. That is when a real server would accept (SYN, SYN-ACK, ACK), so a
//!   server-first protocol's greeting reaches the client 2 round trips after it connected,
//!   and the first bytes of a client-first protocol (a TLS ClientHello) ride with the ACK,
//!   as on a real link.
//!
//! - **Acknowledgements.** The relay's sockets acknowledge at once (TCP_QUICKACK before every
//!   read): a link adds no delay but the configured one, and the delayed-ACK timer (up to
//!   40 ms) of a TCP endpoint that is not there in reality would hold a sender that has
//!   Nagle's algorithm on. One effect of the real link is therefore not modelled: such a
//!   sender (Postfix's smtpd, which flushes the replies to pipelined MAIL and RCPT early
//!   when the message that follows them is longer than its 4 KiB read buffer) waits for the
//!   far end's ACK of its first segment before it sends its last small one, and across a
//!   real link that ACK takes the return trip. See tests/bench/RESULTS-wan.md.
//!
//! What it counts ([`LinkStats`], summed over all connections, read with
//! [`LatencyRelay::stats`]): connections, bytes each way, and the link's **legs**
//! (one-way trips), from which round trips = legs ÷ 2:
//! - every connection starts with 3 legs: SYN, SYN-ACK, ACK (the client's first data, if it
//!   speaks first, goes with the ACK);
//! - after that, data arriving at the relay starts a new leg when the data before it on
//!   that connection went the other way **and** nothing is still on its way in either
//!   direction (the relay has handed every byte it read to the other side's socket). So
//!   each request that had to wait for
//!   the previous answer, and each answer, is a leg, while a pipelined command sent while
//!   an answer is still on the link adds none: it costs no extra waiting.
//!
//! A session's time across the link is then close to `round trips × RTT + transfer time`:
//! a sequential POP3 `RETR` costs one round trip (request leg, answer leg), SMTP without
//! pipelining four per message (MAIL, RCPT, DATA, the text), with PIPELINING two, with
//! BDAT one. Data the server sends on its own while the client is also sending (rare in
//! mail protocols) can make a leg look overlapped; bytes still in the senders' socket
//! buffers are not seen by the relay. The figures are a measure of waiting, not a
//! packet trace.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Chunks each direction may hold before reading pauses (with 64 KiB reads, 64 MiB).
pub const QUEUE_CHUNKS: usize = 1024;

/// How many one-way trips the TCP handshake takes before the server accepts.
const HANDSHAKE_LEGS: u64 = 3;

/// What crossed the link, summed over its connections. Subtract two readings to get one
/// session's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub connections: u64,
    /// One-way trips (see the module header); round trips are half of this.
    pub legs: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
}

impl LinkStats {
    /// Round trips: legs ÷ 2 (a session that ends on an answer has an even number).
    pub fn round_trips(&self) -> f64 {
        self.legs as f64 / 2.0
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &LinkStats) -> LinkStats {
        LinkStats {
            connections: self.connections - earlier.connections,
            legs: self.legs - earlier.legs,
            bytes_to_server: self.bytes_to_server - earlier.bytes_to_server,
            bytes_to_client: self.bytes_to_client - earlier.bytes_to_client,
        }
    }
}

impl std::ops::Add for LinkStats {
    type Output = LinkStats;
    fn add(self, other: LinkStats) -> LinkStats {
        LinkStats {
            connections: self.connections + other.connections,
            legs: self.legs + other.legs,
            bytes_to_server: self.bytes_to_server + other.bytes_to_server,
            bytes_to_client: self.bytes_to_client + other.bytes_to_client,
        }
    }
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    legs: AtomicU64,
    bytes: [AtomicU64; 2],
}

/// A running relay. Dropping it stops accepting; open connections run to their end.
pub struct LatencyRelay {
    port: u16,
    one_way_nanos: Arc<AtomicU64>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

impl LatencyRelay {
    /// Listens on a free 127.0.0.1 port and relays each connection to
    /// 127.0.0.1:`target_port`, `one_way` late in each direction.
    pub fn start(target_port: u16, one_way: Duration) -> LatencyRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind latency relay");
        let port = listener.local_addr().unwrap().port();
        let relay = LatencyRelay {
            port,
            one_way_nanos: Arc::new(AtomicU64::new(one_way.as_nanos() as u64)),
            counters: Arc::default(),
            stop: Arc::default(),
        };
        let (delay, counters, stop) = (
            Arc::clone(&relay.one_way_nanos),
            Arc::clone(&relay.counters),
            Arc::clone(&relay.stop),
        );
        thread::Builder::new()
            .name(format!("latency-relay-{port}"))
            .spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let one_way = Duration::from_nanos(delay.load(Ordering::SeqCst));
                    let counters = Arc::clone(&counters);
                    thread::spawn(move || {
                        Connection::relay(client, target_port, one_way, counters)
                    });
                }
            })
            .expect("spawn latency relay");
        relay
    }

    /// The port to connect to instead of the target's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Changes the one-way delay for connections accepted from now on.
    pub fn set_delay(&self, one_way: Duration) {
        self.one_way_nanos
            .store(one_way.as_nanos() as u64, Ordering::SeqCst);
    }

    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.one_way_nanos.load(Ordering::SeqCst))
    }

    /// Totals so far, over every connection.
    pub fn stats(&self) -> LinkStats {
        let c = &self.counters;
        LinkStats {
            connections: c.connections.load(Ordering::SeqCst),
            legs: c.legs.load(Ordering::SeqCst),
            bytes_to_server: c.bytes[TO_SERVER].load(Ordering::SeqCst),
            bytes_to_client: c.bytes[TO_CLIENT].load(Ordering::SeqCst),
        }
    }
}

impl Drop for LatencyRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

const TO_SERVER: usize = 0;
const TO_CLIENT: usize = 1;

/// Bytes read from one side, due at the other side at `due`; empty: the sender's EOF.
struct Chunk {
    due: Instant,
    data: Vec<u8>,
}

/// Which way data last went on a connection, and what is still on the link: what decides
/// whether new data starts a leg.
#[derive(Default)]
struct Turns {
    last: Option<usize>,
    undelivered: [u64; 2],
}

/// One relayed connection: its turn state, shared by its four threads.
struct Connection {
    one_way: Duration,
    turns: Mutex<Turns>,
    counters: Arc<Counters>,
}

impl Connection {
    /// Relays `client` to the target: reads the client at once, connects to the target
    /// when the handshake would complete, then runs both directions.
    fn relay(client: TcpStream, target_port: u16, one_way: Duration, counters: Arc<Counters>) {
        let accepted = Instant::now();
        counters.connections.fetch_add(1, Ordering::SeqCst);
        counters.legs.fetch_add(HANDSHAKE_LEGS, Ordering::SeqCst);
        let link = Arc::new(Connection {
            one_way,
            turns: Mutex::default(),
            counters,
        });
        let _ = client.set_nodelay(true);
        let Ok(client_reader) = client.try_clone() else {
            return;
        };
        let (to_server, queued) = sync_channel(QUEUE_CHUNKS);
        let reader = Arc::clone(&link);
        thread::spawn(move || reader.read_side(client_reader, TO_SERVER, &to_server));
        // The target accepts when the handshake's third leg arrives.
        sleep_until(accepted + one_way * HANDSHAKE_LEGS as u32);
        let server = match TcpStream::connect(("127.0.0.1", target_port)) {
            Ok(server) => server,
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
        };
        let _ = server.set_nodelay(true);
        let (Ok(server_reader), Ok(server_writer), Ok(client_writer)) =
            (server.try_clone(), server.try_clone(), client.try_clone())
        else {
            return;
        };
        let (to_client, answers) = sync_channel(QUEUE_CHUNKS);
        let reader = Arc::clone(&link);
        thread::spawn(move || reader.read_side(server_reader, TO_CLIENT, &to_client));
        let writer = Arc::clone(&link);
        thread::spawn(move || writer.write_side(&answers, client_writer, TO_CLIENT, &server));
        link.write_side(&queued, server_writer, TO_SERVER, &client);
    }

    /// Reads `from`, time-stamping each chunk for the other side and counting legs.
    fn read_side(&self, mut from: TcpStream, direction: usize, queue: &SyncSender<Chunk>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // Acknowledged at once, like a link that adds no delay of its own (header).
            legacy_mail_proxy::net::ack_at_once(&from);
            let n = from.read(&mut buf).unwrap_or(0);
            let due = Instant::now() + self.one_way;
            if n > 0 {
                self.arrived(direction, n as u64);
            }
            let data = buf[..n].to_vec();
            if queue.send(Chunk { due, data }).is_err() || n == 0 {
                return;
            }
        }
    }

    /// Data went onto the link in `direction`: a new leg if it turns the conversation
    /// round while the link is idle (see the module header).
    fn arrived(&self, direction: usize, n: u64) {
        let mut turns = self.turns.lock().unwrap();
        if turns.last != Some(direction) {
            let idle = turns.undelivered == [0, 0];
            // The client's first data rides with the handshake's last leg.
            let with_handshake = turns.last.is_none() && direction == TO_SERVER;
            if idle && !with_handshake {
                self.counters.legs.fetch_add(1, Ordering::SeqCst);
            }
            turns.last = Some(direction);
        }
        turns.undelivered[direction] += n;
        self.counters.bytes[direction].fetch_add(n, Ordering::SeqCst);
    }

    /// Writes each chunk to `to` when it is due; passes EOF on as a half-close. If `to`
    /// fails, both sockets are shut so that the readers stop too.
    fn write_side(
        &self,
        queue: &Receiver<Chunk>,
        mut to: TcpStream,
        direction: usize,
        other: &TcpStream,
    ) {
        while let Ok(chunk) = queue.recv() {
            sleep_until(chunk.due);
            if chunk.data.is_empty() {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            // Handed to the socket counts as delivered, so this comes before the write: the
            // other side may answer before `write_all` returns, and its answer must find
            // the link idle (counted after the write, about 1 leg in 200 was missed on a
            // busy machine).
            self.turns.lock().unwrap().undelivered[direction] -= chunk.data.len() as u64;
            if to.write_all(&chunk.data).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                let _ = other.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        thread::sleep(when - now);
    }
}
