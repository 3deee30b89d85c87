//! `legacy-mail-proxy tunnel` against the real test servers: curl's `pop3://`, `imap://`
//! and `smtp://` through the tunnel to implicit-TLS and STARTTLS ports, IMAP IDLE pushing a
//! message delivered while the client is silent, refusal of a server whose certificate
//! comes from an unknown CA (the client must receive nothing at all), the idle timeout, and
//! the close in both directions.
//!
//! Each test runs the real binary the way inetd does: a small listener here gives every
//! connection its own `tunnel` process with the socket as stdin and stdout, and its stderr
//! (`--log stderr`) in a file the test reads.

mod common;

use common::{postfix, proxy_bin, require_client, servers, wait_for_messages};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Listens on 127.0.0.1 like inetd and runs `legacy-mail-proxy --log stderr tunnel ARGS`
/// for each connection, with a clean environment.
struct Tunnel {
    port: u16,
    /// Each connection's process and the file holding its stderr, in accept order.
    children: Arc<Mutex<Vec<(Child, PathBuf)>>>,
}

impl Tunnel {
    fn start(args: &[&str]) -> Tunnel {
        static N: AtomicU64 = AtomicU64::new(0);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let children = Arc::new(Mutex::new(Vec::new()));
        let list = Arc::clone(&children);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let log = servers().dir.join(format!(
                    "tunnel-{}-{}.log",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                let fd = OwnedFd::from(conn);
                let child = Command::new(proxy_bin())
                    .args(["--log", "stderr", "--log-level", "debug", "tunnel"])
                    .args(&args)
                    .env_clear()
                    .stdin(Stdio::from(fd.try_clone().unwrap()))
                    .stdout(Stdio::from(fd))
                    .stderr(File::create(&log).unwrap())
                    .spawn()
                    .expect("spawn the tunnel");
                list.lock().unwrap().push((child, log));
            }
        });
        Tunnel { port, children }
    }

    /// To a trusted server on 127.0.0.1, trusting only the harness CA, with `extra`
    /// options (`--starttls imap`, …).
    fn to(port: u16, extra: &[&str]) -> Tunnel {
        let s = servers();
        let connect = format!("{}:{port}", s.host);
        let ca = s.ca_file.display().to_string();
        let mut args = vec!["--connect", &connect, "--ca-file", &ca];
        args.extend(extra);
        Tunnel::start(&args)
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
    }

    /// Waits for the `index`th connection's process to exit; its status and log.
    fn finished(&self, index: usize) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let mut children = self.children.lock().unwrap();
                if let Some((child, log)) = children.get_mut(index)
                    && let Some(status) = child.try_wait().unwrap()
                {
                    return (status, std::fs::read_to_string(log).unwrap());
                }
            }
            assert!(
                Instant::now() < deadline,
                "tunnel process {index} still running after 30 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn logs(&self) -> String {
        let children = self.children.lock().unwrap();
        children
            .iter()
            .map(|(_, log)| std::fs::read_to_string(log).unwrap_or_default())
            .collect()
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for (child, _) in self.children.lock().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A POP3S endpoint: TLS with the harness's server certificate in front of Dovecot's
/// plain POP3 port (the harness Dovecot has no POP3S listener). Test-only relay: it polls
/// both sides with short read timeouts, which is fine for a handful of lines.
fn pop3s_endpoint() -> u16 {
    let s = servers();
    let identity = native_tls::Identity::from_pkcs8(
        &std::fs::read(&s.tls.server_cert).unwrap(),
        &std::fs::read(&s.tls.server_key).unwrap(),
    )
    .unwrap();
    let acceptor = Arc::new(native_tls::TlsAcceptor::new(identity).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let backend_port = s.pop3_port;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let acceptor = Arc::clone(&acceptor);
            std::thread::spawn(move || {
                let Ok(mut tls) = acceptor.accept(conn) else {
                    return;
                };
                let mut backend = TcpStream::connect(("127.0.0.1", backend_port)).unwrap();
                backend.set_nonblocking(true).unwrap();
                let step = Some(Duration::from_millis(5));
                tls.get_ref().set_read_timeout(step).unwrap();
                let mut buf = [0u8; 16384];
                loop {
                    match tls.read(&mut buf) {
                        Ok(0) => {
                            let _ = backend.shutdown(Shutdown::Write);
                        }
                        Ok(n) => backend.write_all(&buf[..n]).unwrap(),
                        Err(_) => {}
                    }
                    match backend.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => tls.write_all(&buf[..n]).unwrap(),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
                let _ = tls.shutdown();
            });
        }
    });
    port
}

fn curl(args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new(require_client("curl"))
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BODY: &str = "\r\n\r\nfirst line\r\n.a line that starts with a dot\r\nlast line\r\n";

fn message(subject: &str) -> Vec<u8> {
    format!("From: sender@example.org\r\nTo: someone@example.test\r\nSubject: {subject}{BODY}")
        .into_bytes()
}

/// A new account with one message; curl fetches it (`pop3://…/1` or `imap://…/INBOX;UID=1`)
/// through a tunnel to `port` and must get it byte for byte; the tunnel must end cleanly.
fn curl_fetches_through(port: u16, extra: &[&str], scheme: &str) {
    let s = servers();
    let user = s.new_user(&format!("tunnel-{scheme}"));
    let expected = message(&format!("{scheme} {extra:?}"));
    user.seed_many(&[&expected]);
    let tunnel = Tunnel::to(port, extra);
    let path = if scheme == "pop3" { "1" } else { "INBOX;UID=1" };
    let url = format!("{scheme}://127.0.0.1:{}/{path}", tunnel.port);
    let login = format!("{}:{}", user.name, user.password);
    let (ok, body, err) = curl(&[&url, "--user", &login]);
    assert!(ok, "curl: {err}\n{}", tunnel.logs());
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&expected)
    );
    let (status, log) = tunnel.finished(0);
    assert!(status.success(), "{status}: {log}");
}

#[test]
fn curl_pop3_through_implicit_tls() {
    curl_fetches_through(pop3s_endpoint(), &[], "pop3");
}

#[test]
fn curl_pop3_through_stls() {
    curl_fetches_through(servers().pop3_port, &["--starttls", "pop3"], "pop3");
}

#[test]
fn curl_imap_through_implicit_tls() {
    curl_fetches_through(servers().imaps_port, &[], "imap");
}

#[test]
fn curl_imap_through_starttls() {
    curl_fetches_through(servers().imap_port, &["--starttls", "imap"], "imap");
}

fn curl_smtp_sends_through(tunnel: &Tunnel, subject: &str) {
    let s = servers();
    let user = s.new_user("tunnel-smtp");
    let expected = message(subject);
    let file = s.dir.join(format!("{}.eml", user.name));
    std::fs::write(&file, &expected).unwrap();
    let url = format!("smtp://127.0.0.1:{}/client.test", tunnel.port);
    let login = format!("{}:{}", user.name, user.password);
    let (ok, _, err) = curl(&[
        &url,
        "--user",
        &login,
        "--mail-from",
        &user.email,
        "--mail-rcpt",
        &user.email,
        "--upload-file",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "curl: {err}\n{}", tunnel.logs());
    wait_for_messages(&user, 1);
    let stored = common::imap_fetch_all(&user);
    let text = String::from_utf8_lossy(&stored[0].1).into_owned();
    // Postfix adds Message-Id and Date; everything the client sent arrives unchanged, over
    // TLS and authenticated ("ESMTPSA", RFC 3848).
    assert!(text.contains("with ESMTPSA"), "{text}");
    assert!(
        text.contains(&format!("\r\nSubject: {subject}\r\n")),
        "{text}"
    );
    assert!(text.ends_with(BODY), "{text}");
    let (status, log) = tunnel.finished(0);
    assert!(status.success(), "{status}: {log}");
}

#[test]
fn curl_smtp_through_implicit_tls() {
    let p = postfix();
    // By name this time: the certificate must match "localhost" as well as 127.0.0.1.
    let connect = format!("localhost:{}", p.submissions_port);
    let ca = servers().ca_file.display().to_string();
    let tunnel = Tunnel::start(&["--connect", &connect, "--ca-file", &ca]);
    curl_smtp_sends_through(&tunnel, "smtps");
}

#[test]
fn curl_smtp_through_starttls() {
    let tunnel = Tunnel::to(postfix().submission_port, &["--starttls", "smtp"]);
    curl_smtp_sends_through(&tunnel, "smtp starttls");
}

/// Reads lines until one starts with `prefix`; returns everything read.
fn read_until(reader: &mut impl BufRead, prefix: &str) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("waiting for {prefix:?} after {all:?}: {e}"));
        assert!(
            n > 0,
            "connection closed while waiting for {prefix:?}: {all}"
        );
        all.push_str(&line);
        if line.starts_with(prefix) {
            return all;
        }
    }
}

#[test]
fn imap_idle_sees_a_message_delivered_while_the_client_is_silent() {
    let s = servers();
    let user = s.new_user("tunnel-idle");
    let tunnel = Tunnel::to(s.imaps_port, &[]);
    let stream = tunnel.connect();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let greeting = read_until(&mut reader, "* ");
    assert!(greeting.starts_with("* OK"), "{greeting}");
    writer
        .write_all(format!("a LOGIN {} {}\r\n", user.name, user.password).as_bytes())
        .unwrap();
    read_until(&mut reader, "a OK");
    writer.write_all(b"b SELECT INBOX\r\n").unwrap();
    let select = read_until(&mut reader, "b OK");
    assert!(select.contains("* 0 EXISTS"), "{select}");
    writer.write_all(b"c IDLE\r\n").unwrap();
    read_until(&mut reader, "+");

    // From here the client sends nothing until the new message shows.
    let delivered = Instant::now();
    user.deliver_lmtp(&message("during idle"));
    let pushed = read_until(&mut reader, "* 1 EXISTS");
    let latency = delivered.elapsed();
    // Dovecot notices the delivery at once (inotify); anything near its 30 s fallback
    // check would mean the tunnel held the data back.
    assert!(
        latency < Duration::from_secs(5),
        "EXISTS took {latency:?}: {pushed}"
    );

    writer.write_all(b"DONE\r\n").unwrap();
    read_until(&mut reader, "c OK");
    writer.write_all(b"d LOGOUT\r\n").unwrap();
    read_until(&mut reader, "d OK");
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    drop((writer, reader));
    let (status, log) = tunnel.finished(0);
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("end=closed"), "{log}");
}

/// Connects through a tunnel that must refuse its server, and checks the client got
/// nothing, the process failed, and the log says why.
fn refused(tunnel: &Tunnel, why: &str) {
    let mut stream = tunnel.connect();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    let (status, log) = tunnel.finished(0);
    assert!(
        got.is_empty(),
        "the client received {:?}; log: {log}",
        String::from_utf8_lossy(&got)
    );
    assert!(!status.success(), "{log}");
    assert!(log.contains(why), "log lacks {why:?}: {log}");
}

#[test]
fn unknown_ca_is_refused_and_the_client_gets_nothing() {
    let s = servers();
    let p = postfix();
    let ca = s.ca_file.display().to_string();
    for (host, port, starttls) in [
        (s.untrusted_host, s.untrusted_imaps_port, None),
        (s.untrusted_host, s.untrusted_imap_port, Some("imap")),
        (p.host, p.untrusted_submissions_port, None),
        (p.host, p.untrusted_submission_port, Some("smtp")),
    ] {
        let connect = format!("{host}:{port}");
        let mut args = vec!["--connect", &connect, "--ca-file", &ca];
        if let Some(protocol) = starttls {
            args.extend(["--starttls", protocol]);
        }
        refused(&Tunnel::start(&args), "certificate verify failed");
    }
}

#[test]
fn a_certificate_for_another_name_is_refused() {
    let tunnel = Tunnel::to(servers().imaps_port, &["--server-name", "imap.example.org"]);
    refused(&tunnel, "certificate verify failed");
}

#[test]
fn an_unreachable_server_sends_the_client_nothing() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    refused(&Tunnel::to(port, &[]), "cannot connect to");
}

#[test]
fn the_client_closing_first_still_gets_the_servers_last_words() {
    let s = servers();
    let tunnel = Tunnel::to(s.imaps_port, &[]);
    let mut stream = tunnel.connect();
    // LOGOUT and end of input at once: the tunnel must pass the command, then the
    // half-close, and keep relaying the server's answer.
    stream.write_all(b"a LOGOUT\r\n").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).unwrap();
    assert!(got.starts_with("* OK"), "{got}");
    assert!(got.contains("\r\n* BYE"), "{got}");
    assert!(got.contains("\r\na OK Logout"), "{got}");
    assert!(got.ends_with("\r\n"), "{got}");
    let (status, log) = tunnel.finished(0);
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("end=closed"), "{log}");
}

#[test]
fn the_server_closing_first_is_passed_on_and_the_tunnel_waits_for_the_client() {
    let s = servers();
    let tunnel = Tunnel::to(s.pop3_port, &["--starttls", "pop3"]);
    let stream = tunnel.connect();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    read_until(&mut reader, "+OK");
    writer.write_all(b"QUIT\r\n").unwrap();
    read_until(&mut reader, "+OK");
    // The server closed after QUIT; the client sees the end while its side is still open.
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // The tunnel is still there, waiting for the client to close its side.
    assert!(
        tunnel.children.lock().unwrap()[0]
            .0
            .try_wait()
            .unwrap()
            .is_none()
    );
    drop(writer);
    drop(reader);
    let (status, log) = tunnel.finished(0);
    assert!(status.success(), "{status}: {log}");
}

#[test]
fn both_sides_silent_for_the_idle_timeout_closes_the_tunnel() {
    let tunnel = Tunnel::to(servers().imaps_port, &["--idle-timeout", "1"]);
    let stream = tunnel.connect();
    let mut reader = BufReader::new(stream);
    read_until(&mut reader, "* OK");
    let greeted = Instant::now();
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    let silent = greeted.elapsed();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        silent >= Duration::from_millis(900) && silent < Duration::from_secs(10),
        "closed after {silent:?}"
    );
    let (status, log) = tunnel.finished(0);
    assert!(!status.success());
    assert!(log.contains("end=idle-timeout"), "{log}");
}

#[test]
fn after_imap_starttls_the_client_sees_only_what_came_over_tls() {
    let s = servers();
    let tunnel = Tunnel::to(s.imap_port, &["--starttls", "imap"]);
    let stream = tunnel.connect();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    // The plain-text greeting advertises STARTTLS in a CAPABILITY code; the client must
    // not be told of it (RFC 3501 §6.2.1), nor see the STARTTLS exchange itself.
    let greeting = read_until(&mut reader, "* ");
    assert!(greeting.starts_with("* OK "), "{greeting}");
    assert!(!greeting.contains("CAPABILITY"), "{greeting}");
    writer.write_all(b"a CAPABILITY\r\n").unwrap();
    let capabilities = read_until(&mut reader, "a OK");
    assert!(
        capabilities.starts_with("* CAPABILITY IMAP4rev1"),
        "{capabilities}"
    );
    assert!(!capabilities.contains("STARTTLS"), "{capabilities}");
    assert!(!capabilities.contains("LMP1"), "{capabilities}");
    writer.write_all(b"b LOGOUT\r\n").unwrap();
    read_until(&mut reader, "b OK");
}

#[test]
fn after_smtp_starttls_the_clients_ehlo_gets_the_tls_extensions() {
    let p = postfix();
    let tunnel = Tunnel::to(p.submission_port, &["--starttls", "smtp"]);
    let stream = tunnel.connect();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let greeting = read_until(&mut reader, "220 ");
    assert!(!greeting.contains("250"), "{greeting}");
    writer.write_all(b"EHLO client.test\r\n").unwrap();
    let ehlo = read_until(&mut reader, "250 ");
    // Postfix offers AUTH only over TLS here (smtpd_tls_security_level=encrypt), and no
    // STARTTLS once TLS is on: this is the answer from inside TLS.
    assert!(ehlo.contains("\r\n250-AUTH PLAIN"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    writer.write_all(b"QUIT\r\n").unwrap();
    read_until(&mut reader, "221");
}

#[test]
fn after_pop3_stls_the_client_sees_the_servers_own_greeting() {
    let s = servers();
    let mut direct = BufReader::new(TcpStream::connect((s.host, s.pop3_port)).unwrap());
    let expected = read_until(&mut direct, "+OK");
    let tunnel = Tunnel::to(s.pop3_port, &["--starttls", "pop3"]);
    let stream = tunnel.connect();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(read_until(&mut reader, "+OK"), expected);
    writer.write_all(b"CAPA\r\n").unwrap();
    let capa = read_until(&mut reader, ".");
    assert!(capa.starts_with("+OK"), "{capa}");
    assert!(!capa.contains("\r\nSTLS\r\n"), "{capa}");
    writer.write_all(b"QUIT\r\n").unwrap();
    read_until(&mut reader, "+OK");
}
