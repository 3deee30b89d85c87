//! Across a wide-area link (issue 14): the latency relay of `common::latency` on its own,
//! then real clients through the proxy while the proxy's backend is 15 ms away (one way)
//! behind that relay, as in a deployment with the client on the LAN and the provider
//! across the Internet.
//!
//! The relay tests use small scripted servers and need nothing else. The client tests use
//! the real Dovecot and Postfix of the harness, the debug binary, and the proxy's defaults
//! (whatever read-ahead the proxy does by default must deliver the same bytes). They stay
//! short: the corpus is 8 messages, so a session costs a few dozen round trips.

mod common;

use common::{Inetd, LatencyRelay, LinkStats, corpus, normalized, postfix, servers};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// A scripted server on a free 127.0.0.1 port: `serve` runs for each connection, in its
/// own thread.
fn scripted(serve: fn(TcpStream)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || serve(conn));
        }
    });
    port
}

/// Greets with "hello", then answers each line: "split" with two parts 50 ms apart, any
/// other line with "ok <line>".
fn line_server(conn: TcpStream) {
    let mut out = conn.try_clone().unwrap();
    let _ = out.write_all(b"hello\n");
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let reply = if line == "split" {
            let _ = out.write_all(b"part1\n");
            thread::sleep(Duration::from_millis(50));
            "part2\n".to_string()
        } else {
            format!("ok {line}\n")
        };
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// Sends back everything it reads.
fn echo_server(conn: TcpStream) {
    let (mut from, mut to) = (conn.try_clone().unwrap(), conn);
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// Sends 50 MB on its own, then closes.
fn source_server(mut conn: TcpStream) {
    let block = vec![b'x'; 1 << 20];
    for _ in 0..50 {
        if conn.write_all(&block).is_err() {
            return;
        }
    }
}

/// Reads to EOF, then answers with the number of bytes read.
fn sink_server(mut conn: TcpStream) {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    let _ = writeln!(conn, "{total}");
}

fn connect(relay: &LatencyRelay) -> (BufReader<TcpStream>, TcpStream) {
    let conn = TcpStream::connect(("127.0.0.1", relay.port())).unwrap();
    conn.set_nodelay(true).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    (BufReader::new(conn.try_clone().unwrap()), conn)
}

fn read_line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

/// Waits until the relay has seen both sides close, so its counters are final.
fn settled(relay: &LatencyRelay) -> LinkStats {
    let mut last = relay.stats();
    loop {
        thread::sleep(relay.delay() * 3 + Duration::from_millis(20));
        let now = relay.stats();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[test]
fn relay_delays_each_direction_by_the_one_way_time() {
    let one_way = Duration::from_millis(50);
    let relay = LatencyRelay::start(scripted(line_server), one_way);
    let start = Instant::now();
    let (mut reader, _conn) = connect(&relay);
    assert_eq!(read_line(&mut reader), "hello\n");
    let greeting = start.elapsed();
    // SYN, SYN-ACK, ACK, then the greeting: 4 one-way times, as on a real link.
    assert!(
        greeting >= one_way * 4 && greeting < one_way * 4 + Duration::from_millis(40),
        "greeting after {greeting:?}"
    );
    let mut exchanges = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        writeln!(reader.get_mut(), "ping {i}").unwrap();
        assert_eq!(read_line(&mut reader), format!("ok ping {i}\n"));
        exchanges.push(t.elapsed());
    }
    exchanges.sort();
    assert!(
        exchanges[0] >= one_way * 2,
        "a round trip took less than two one-way times: {exchanges:?}"
    );
    assert!(
        exchanges[2] < one_way * 2 + Duration::from_millis(20),
        "the median round trip took far more than two one-way times: {exchanges:?}"
    );
}

#[test]
fn relay_keeps_the_byte_order_both_ways() {
    let relay = LatencyRelay::start(scripted(echo_server), Duration::from_millis(5));
    let conn = TcpStream::connect(("127.0.0.1", relay.port())).unwrap();
    let sent: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut writer = conn.try_clone().unwrap();
    let to_send = sent.clone();
    let sender = thread::spawn(move || {
        // Writes of every size from 1 byte up, so the relay sees uneven chunks.
        let (mut at, mut size) = (0, 1);
        while at < to_send.len() {
            let end = (at + size).min(to_send.len());
            writer.write_all(&to_send[at..end]).unwrap();
            at = end;
            size = size % 70_000 + 997;
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    (&conn).read_to_end(&mut got).unwrap();
    sender.join().unwrap();
    assert!(got == sent, "{} bytes came back, not the same", got.len());
    let stats = settled(&relay);
    assert_eq!(stats.bytes_to_server, sent.len() as u64);
    assert_eq!(stats.bytes_to_client, sent.len() as u64);
    assert_eq!(stats.connections, 1);
}

#[test]
fn relay_counts_the_legs_of_a_scripted_conversation() {
    let relay = LatencyRelay::start(scripted(line_server), Duration::from_millis(100));
    // Sequential: the greeting, then 3 questions each waiting for its answer.
    let (mut reader, conn) = connect(&relay);
    read_line(&mut reader);
    for i in 0..3 {
        writeln!(reader.get_mut(), "q{i}").unwrap();
        assert_eq!(read_line(&mut reader), format!("ok q{i}\n"));
    }
    drop((reader, conn));
    let sequential = settled(&relay);
    // Handshake 3 legs, greeting 1, then 2 per question.
    let expected = LinkStats {
        connections: 1,
        legs: 3 + 1 + 3 * 2,
        bytes_to_server: 3 * 3,
        bytes_to_client: 6 + 3 * 6,
    };
    assert_eq!(sequential, expected);
    assert_eq!(sequential.round_trips(), 5.0);

    // Pipelined: two questions in two writes without waiting are one leg, and their two
    // answers one more.
    let (mut reader, conn) = connect(&relay);
    read_line(&mut reader);
    reader.get_mut().write_all(b"a\n").unwrap();
    reader.get_mut().write_all(b"b\n").unwrap();
    assert_eq!(read_line(&mut reader), "ok a\n");
    assert_eq!(read_line(&mut reader), "ok b\n");
    drop((reader, conn));
    let pipelined = settled(&relay).since(&sequential);
    assert_eq!(pipelined.legs, 3 + 1 + 2, "{pipelined:?}");

    // Overlapped: a question sent on the first part of an answer, while the second part
    // is still on the link, waits for nothing: no leg of its own.
    let before = pipelined + sequential;
    let (mut reader, conn) = connect(&relay);
    read_line(&mut reader);
    writeln!(reader.get_mut(), "split").unwrap();
    assert_eq!(read_line(&mut reader), "part1\n");
    writeln!(reader.get_mut(), "next").unwrap();
    assert_eq!(read_line(&mut reader), "part2\n");
    assert_eq!(read_line(&mut reader), "ok next\n");
    drop((reader, conn));
    let overlapped = settled(&relay).since(&before);
    // Handshake 3, greeting 1, "split" 1, its answer 1, "ok next" 1.
    assert_eq!(overlapped.legs, 3 + 1 + 1 + 1 + 1, "{overlapped:?}");
}

/// A fast sequential client without delay: every exchange is two legs, none lost to the
/// race between the relay handing an answer over and the client's next question.
#[test]
fn relay_counts_every_exchange_of_a_fast_sequential_client() {
    let relay = LatencyRelay::start(scripted(line_server), Duration::ZERO);
    let (mut reader, conn) = connect(&relay);
    read_line(&mut reader);
    let exchanges = 3000;
    for i in 0..exchanges {
        writeln!(reader.get_mut(), "{i}").unwrap();
        read_line(&mut reader);
    }
    drop((reader, conn));
    assert_eq!(settled(&relay).legs, 3 + 1 + 2 * exchanges);
}

/// 50 MB each way through a 40 ms relay: the delay is paid once, not per chunk (a relay
/// that slept 40 ms per 64 KiB chunk would take over 30 s).
#[test]
fn relay_does_not_limit_throughput() {
    let one_way = Duration::from_millis(40);
    let total = 50u64 << 20;
    let limit = one_way * 6 + Duration::from_secs(3);

    let relay = LatencyRelay::start(scripted(source_server), one_way);
    let start = Instant::now();
    let (mut reader, _conn) = connect(&relay);
    let got = std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
    let download = start.elapsed();
    assert_eq!(got, total);
    assert!(download < limit, "50 MB from the server took {download:?}");

    let relay = LatencyRelay::start(scripted(sink_server), one_way);
    let start = Instant::now();
    let (mut reader, mut conn) = connect(&relay);
    let block = vec![b'y'; 1 << 20];
    for _ in 0..50 {
        conn.write_all(&block).unwrap();
    }
    conn.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_line(&mut reader), format!("{total}\n"));
    let upload = start.elapsed();
    assert!(upload < limit, "50 MB to the server took {upload:?}");
    eprintln!("50 MB through a 40 ms relay: down {download:?}, up {upload:?}");
}

/// The proxy for POP3 with its backend (Dovecot's implicit-TLS IMAP) behind `relay`, one
/// process per connection; `envs` added to its environment.
fn pop3_proxy(relay: &LatencyRelay, envs: &[(&str, &str)]) -> Inetd {
    let s = servers();
    let args = common::pop3_proxy_args(relay.port(), "implicit", &s.dir.join("wan-locks"));
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Inetd::start(common::proxy_bin(), &args, &envs)
}

fn seeded_user(prefix: &str) -> common::User {
    let user = servers().new_user(prefix);
    user.seed_many(&corpus());
    user
}

const POPLIB_RETR_ALL: &str = "import os,poplib,sys\npoplib._MAXLINE=1<<20\n\
     p=poplib.POP3('127.0.0.1',int(os.environ['PORT']),timeout=60)\n\
     p.user(os.environ['U']); p.pass_(os.environ['P'])\n\
     n=p.stat()[0]\n\
     for i in range(1,n+1):\n    lines=p.retr(i)[1]\n    body=b''.join(l+b'\\r\\n' for l in lines)\n    sys.stdout.buffer.write(b'%d\\n' % len(body) + body)\n\
     p.quit()";

/// poplib's RETR of every message through the proxy, 15 ms from Dovecot: byte-exact,
/// with the proxy's default read-ahead and with it turned off (the variable is ignored by
/// a proxy that has none).
#[test]
fn poplib_downloads_byte_exact_across_a_15_ms_link() {
    let user = seeded_user("wan-poplib");
    let reference = common::imap_fetch_all(&user);
    assert_eq!(reference.len(), 8);
    let relay = LatencyRelay::start(servers().imaps_port, Duration::from_millis(15));
    for envs in [&[][..], &[("LMP_PREFETCH_WINDOW", "0")][..]] {
        let inetd = pop3_proxy(&relay, envs);
        let before = relay.stats();
        let got = common::python_ok(
            POPLIB_RETR_ALL,
            &[
                ("PORT", &inetd.port.to_string()),
                ("U", &user.name),
                ("P", &user.password),
            ],
        );
        let mut rest = &got[..];
        for (i, (_, raw)) in reference.iter().enumerate() {
            let nl = rest.iter().position(|&b| b == b'\n').unwrap();
            let len: usize = std::str::from_utf8(&rest[..nl]).unwrap().parse().unwrap();
            assert!(
                rest[nl + 1..nl + 1 + len] == normalized(raw)[..],
                "{envs:?}: message {} differs from Dovecot's BODY[]",
                i + 1
            );
            rest = &rest[nl + 1 + len..];
        }
        assert!(rest.is_empty(), "{envs:?}: more than the 8 messages");
        let logs = inetd.logs();
        assert!(!logs.contains("panicked"), "{logs}");
        assert!(
            relay.stats().since(&before).connections >= 1,
            "the proxy did not reach Dovecot through the relay"
        );
    }
}

/// fetchmail (keep) through the proxy, 15 ms from Dovecot: each message handed to the
/// MDA is Dovecot's message with LF line endings, nothing added or lost (but the blank
/// line fetchmail itself puts after a header that had no body separator).
#[test]
fn fetchmail_downloads_byte_exact_across_a_15_ms_link() {
    let user = seeded_user("wan-fetchmail");
    let reference = common::imap_fetch_all(&user);
    let relay = LatencyRelay::start(servers().imaps_port, Duration::from_millis(15));
    let inetd = pop3_proxy(&relay, &[]);
    let dir = servers().dir.join(format!("wan-fetchmail-{}", user.name));
    std::fs::create_dir_all(&dir).unwrap();
    let mbox = dir.join("delivered");
    // Each message, then a separator line, in delivery order.
    let mda = dir.join("deliver");
    std::fs::write(
        &mda,
        format!(
            "#!/bin/sh\n{{ cat; printf '%s\\n' '<<end of message>>'; }} >> '{}'\n",
            mbox.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&mda, std::fs::Permissions::from_mode(0o700)).unwrap();
    let rc = dir.join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "set no syslog\nset postmaster root\n\
             poll 127.0.0.1 service {} protocol pop3 uidl auth password:\n  \
             user \"{}\" password \"{}\" is root here keep sslproto '' norewrite mda \"{}\"\n",
            inetd.port,
            user.name,
            user.password,
            mda.display()
        ),
    )
    .unwrap();
    let ids = dir.join("ids");
    let out = common::run_fetchmail(&rc, &dir, &["--invisible", "-i", ids.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "fetchmail failed: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        inetd.logs()
    );
    let delivered = std::fs::read(&mbox).unwrap();
    let expected: Vec<u8> = reference
        .iter()
        .flat_map(|(_, raw)| {
            let mut m = normalized(raw);
            m.retain(|&b| b != b'\r');
            // fetchmail writes the header/body separator even when a message has none.
            if !m.windows(2).any(|w| w == b"\n\n") {
                m.push(b'\n');
            }
            m.extend_from_slice(b"<<end of message>>\n");
            m
        })
        .collect();
    if let Some(at) =
        (0..delivered.len().max(expected.len())).find(|&i| delivered.get(i) != expected.get(i))
    {
        let around = |b: &[u8]| {
            String::from_utf8_lossy(&b[at.saturating_sub(80).min(b.len())..(at + 80).min(b.len())])
                .into_owned()
        };
        panic!(
            "fetchmail delivered other bytes from offset {at} ({} delivered, {} expected):\n\
             delivered: {:?}\nexpected:  {:?}",
            delivered.len(),
            expected.len(),
            around(&delivered),
            around(&expected)
        );
    }
    assert_eq!(common::imap_fetch_all(&user).len(), 8, "keep deleted mail");
}

/// smtplib through the proxy, 15 ms from Postfix: the message arrives byte-exact (but for
/// the trace fields the servers put on top).
#[test]
fn smtplib_sends_across_a_15_ms_link() {
    let s = servers();
    let sender = s.new_user("wan-sender");
    let recipient = s.new_user("wan-rcpt");
    let relay = LatencyRelay::start(postfix().submissions_port, Duration::from_millis(15));
    let args: Vec<String> = [
        "--log",
        "stderr",
        "smtp",
        "--smtp-host",
        s.tls_host,
        "--smtp-port",
        &relay.port().to_string(),
        "--smtp-tls",
        "implicit",
        "--ca-file",
        &s.ca_file.display().to_string(),
        "--client-auth",
        "passthrough",
        "--hostname",
        "proxy.test",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let inetd = Inetd::start(common::proxy_bin(), &args, &[]);
    let message = format!(
        "From: {}\r\nTo: {}\r\nSubject: across the WAN\r\n\
         Date: Thu, 03 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{}@example.test>\r\n\r\n\
         first line\r\n.leading dot\r\nlast line\r\n",
        sender.email, recipient.email, recipient.name
    );
    let file = s.dir.join(format!("wan-{}.eml", recipient.name));
    std::fs::write(&file, &message).unwrap();
    common::python_ok(
        "import os,smtplib\n\
         s=smtplib.SMTP('127.0.0.1',int(os.environ['T_PORT']),timeout=60)\n\
         s.ehlo('client.test')\n\
         s.login(os.environ['T_USER'],os.environ['T_PASS'])\n\
         s.sendmail(os.environ['T_FROM'],[os.environ['T_TO']],open(os.environ['T_MSG'],'rb').read())\n\
         s.quit()",
        &[
            ("T_PORT", &inetd.port.to_string()),
            ("T_USER", &sender.name),
            ("T_PASS", &sender.password),
            ("T_FROM", &sender.email),
            ("T_TO", &recipient.email),
            ("T_MSG", file.to_str().unwrap()),
        ],
    );
    common::wait_for_messages(&recipient, 1);
    let stored = common::imap_fetch_all(&recipient);
    assert_eq!(stored.len(), 1);
    let body = &stored[0].1;
    let at = body
        .windows(6)
        .position(|w| w == b"From: ")
        .expect("From: header stored");
    assert_eq!(String::from_utf8_lossy(&body[at..]), message);
    assert!(
        relay.stats().connections >= 1,
        "Postfix not reached through the relay"
    );
    let logs = inetd.logs();
    assert!(!logs.contains(&sender.password), "password in the log");
}
