//! `legacy-mail-proxy smtp` against a real Postfix (submission with implicit TLS and
//! STARTTLS, SASL through Dovecot, delivery into Dovecot over LMTP). The tests that matter
//! for any submission server (byte-exact delivery, STARTTLS, unknown recipient, wrong
//! login, PIPELINING) also run against Exim and OpenSMTPD ([`Backend`], issue 13's server
//! matrix). Messages sent through
//! the proxy are read back over IMAP and compared byte for byte, ignoring only the trace
//! fields the servers prepend (Return-Path, Delivered-To, Received).
//!
//! Clients: raw transcripts on the binary's stdin/stdout, swaks (`--pipe`), curl
//! `smtp://` and Python's smtplib through a small inetd-style listener that gives each
//! connection its own proxy process with the socket as stdin/stdout.

mod common;
#[path = "../src/smtp/fake_backend.rs"]
mod fake_backend;

use common::{
    FaultProxy, User, exim, imap_fetch_all, opensmtpd, postfix, proxy_bin, python, require_client,
    servers, wait_until,
};
use fake_backend::{FakeSmtp, Script};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A submission server of the matrix, and the replies in which the servers differ.
struct Backend {
    name: &'static str,
    submissions_port: u16,
    submission_port: u16,
    logs: fn() -> String,
    /// What marks the reply to a message's final dot when it was queued: a part of it
    /// found in no other reply (OpenSMTPD puts the queue id first).
    queued: &'static str,
    /// The replies to MAIL and to RCPT of a known recipient (passed on by the proxy).
    mail_ok: &'static str,
    rcpt_ok: &'static str,
    /// The reply to RCPT of an unknown address, for that address.
    unknown_recipient: fn(&str) -> String,
    /// The start of the reply to AUTH with a wrong password.
    wrong_password: &'static str,
    /// Makes the accounts created so far known to the server, when it does not ask the
    /// harness Dovecot (OpenSMTPD's static tables).
    sync_accounts: fn(),
}

fn postfix_backend() -> Backend {
    let p = postfix();
    Backend {
        name: "postfix",
        submissions_port: p.submissions_port,
        submission_port: p.submission_port,
        logs: || postfix().logs(),
        // `Ok: 157 bytes queued as ID` after BDAT, `Ok: queued as ID` after DATA.
        queued: "250 2.0.0 Ok: ",
        mail_ok: "250 2.1.0 Ok",
        rcpt_ok: "250 2.1.5 Ok",
        unknown_recipient: |to| format!("550 5.1.1 <{to}>: Recipient address rejected"),
        wrong_password: "535 5.7.8",
        sync_accounts: || {},
    }
}

fn exim_backend() -> Backend {
    let e = exim();
    Backend {
        name: "exim",
        submissions_port: e.submissions_port,
        submission_port: e.submission_port,
        logs: || exim().logs(),
        // Exim sends no enhanced status codes: the proxy adds the generic class ones.
        queued: "250 2.0.0 OK id=",
        mail_ok: "250 2.1.0 Ok",
        rcpt_ok: "250 2.0.0 Accepted",
        unknown_recipient: |_| "550 5.0.0 Unrouteable address".into(),
        wrong_password: "535 5.0.0 Incorrect authentication data",
        sync_accounts: || {},
    }
}

fn opensmtpd_backend() -> Backend {
    let o = opensmtpd();
    Backend {
        name: "opensmtpd",
        submissions_port: o.submissions_port,
        submission_port: o.submission_port,
        logs: || opensmtpd().logs(),
        queued: " Message accepted for delivery",
        mail_ok: "250 2.0.0 Ok",
        rcpt_ok: "250 2.1.5 Destination address valid: Recipient ok",
        // OpenSMTPD sends no enhanced status code here: the proxy adds the class's own.
        unknown_recipient: |to| format!("550 5.0.0 Invalid recipient: <{to}>"),
        wrong_password: "535 5.0.0 Authentication failed",
        sync_accounts: || opensmtpd().sync(),
    }
}

/// How the proxy reaches Postfix, and as whom.
struct Proxy {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Proxy {
    /// Implicit TLS to Postfix's "submissions" port, logging in as `account`, open to
    /// any client (`--client-auth none`).
    fn implicit(account: &User) -> Proxy {
        Self::implicit_to(&postfix_backend(), account)
    }

    fn implicit_to(backend: &Backend, account: &User) -> Proxy {
        (backend.sync_accounts)();
        Self::to(backend.submissions_port, "implicit", account)
    }

    /// Implicit TLS, without --smtp-user: the client's AUTH decides
    /// (`--client-auth passthrough`).
    fn passthrough() -> Proxy {
        let mut proxy = Proxy::to(
            postfix().submissions_port,
            "implicit",
            &servers().new_user("unused"),
        );
        let at = proxy.args.iter().position(|a| a == "--smtp-user").unwrap();
        proxy.args.drain(at..at + 2);
        let at = proxy
            .args
            .iter()
            .position(|a| a == "--client-auth")
            .unwrap();
        proxy.args[at + 1] = "passthrough".into();
        proxy.env.clear();
        proxy
    }

    fn starttls_to(backend: &Backend, account: &User) -> Proxy {
        (backend.sync_accounts)();
        Self::to(backend.submission_port, "starttls", account)
    }

    /// Plain text to a scripted backend on 127.0.0.1:`port`, no login, open to any client.
    fn fake(port: u16) -> Proxy {
        let args = [
            "--smtp-host",
            "127.0.0.1",
            "--smtp-port",
            &port.to_string(),
            "--smtp-tls",
            "none",
            "--client-auth",
            "none",
            "--hostname",
            "proxy.test",
            "--connect-timeout",
            "5",
            "--backend-timeout",
            "30",
        ];
        Proxy {
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
        }
    }

    fn to(port: u16, tls: &str, account: &User) -> Proxy {
        let s = servers();
        Proxy {
            args: vec![
                "--smtp-host".into(),
                s.host.into(),
                "--smtp-port".into(),
                port.to_string(),
                "--smtp-tls".into(),
                tls.into(),
                "--ca-file".into(),
                s.ca_file.display().to_string(),
                "--smtp-user".into(),
                account.name.clone(),
                "--client-auth".into(),
                "none".into(),
                "--hostname".into(),
                "proxy.test".into(),
                "--connect-timeout".into(),
                "5".into(),
                "--backend-timeout".into(),
                "30".into(),
            ],
            env: vec![("LMP_SMTP_PASSWORD".into(), account.password.clone())],
        }
    }

    fn arg(mut self, name: &str, value: &str) -> Proxy {
        self.args.push(name.into());
        self.args.push(value.into());
        self
    }

    /// Replaces the value of an option already given.
    fn set(mut self, name: &str, value: &str) -> Proxy {
        let at = self.args.iter().position(|a| a == name).unwrap();
        self.args[at + 1] = value.into();
        self
    }

    fn env(mut self, name: &str, value: &str) -> Proxy {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.into(), value.into()));
        self
    }

    /// The proxy command; logs go to stderr. The environment is emptied so that nothing
    /// from the calling shell (LMP_*, BACKEND_*) changes the configuration.
    fn command(&self) -> Command {
        let mut c = Command::new(proxy_bin());
        c.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .args(["--log", "stderr", "--log-level", "debug", "smtp"])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// The command line as one shell string (for swaks `--pipe`).
    fn shell_line(&self) -> String {
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut line = String::from("env -i PATH=/usr/bin:/bin");
        for (k, v) in &self.env {
            line.push_str(&format!(" {k}={}", quote(v)));
        }
        line.push(' ');
        line.push_str(&quote(proxy_bin()));
        line.push_str(" --log off smtp");
        for a in &self.args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        line
    }

    /// One session: writes all of `input` (pipelined), returns (replies, log).
    fn session(&self, input: &[u8]) -> (String, String) {
        let input = input.to_vec();
        self.session_with(move |mut stdin| {
            let _ = stdin.write_all(&input);
        })
    }

    /// One session whose input `write` gives from its own thread; returns (replies, log).
    fn session_with(&self, write: impl FnOnce(ChildStdin) + Send + 'static) -> (String, String) {
        let mut child = self
            .command()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start proxy");
        let stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || write(stdin));
        let out = child.wait_with_output().expect("proxy output");
        writer.join().unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Listens on 127.0.0.1 like inetd: each connection gets its own proxy process with
    /// the socket as stdin and stdout. Logs of all sessions go to the returned file.
    fn listen(&self) -> (u16, PathBuf) {
        static N: AtomicU64 = AtomicU64::new(0);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = servers().dir.join(format!(
            "smtp-proxy-{}-{}.log",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&log, "").unwrap();
        let mut command = self.command();
        let log_path = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let fd = OwnedFd::from(conn);
                let stderr = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log_path)
                    .unwrap();
                let child = command
                    .stdin(Stdio::from(fd.try_clone().unwrap()))
                    .stdout(Stdio::from(fd))
                    .stderr(Stdio::from(stderr))
                    .spawn();
                if let Ok(mut child) = child {
                    std::thread::spawn(move || child.wait());
                }
            }
        });
        (port, log)
    }
}

/// The message as stored, without the trace fields Postfix and Dovecot put on top.
fn without_trace(stored: &[u8]) -> Vec<u8> {
    let mut pos = 0;
    loop {
        let rest = &stored[pos..];
        let is_trace = ["Return-Path:", "Delivered-To:", "Received:"]
            .iter()
            .any(|name| {
                rest.len() >= name.len() && rest[..name.len()].eq_ignore_ascii_case(name.as_bytes())
            });
        if !is_trace {
            return rest.to_vec();
        }
        // Skip the field and its folded continuation lines.
        loop {
            let nl = stored[pos..].iter().position(|&b| b == b'\n').unwrap() + pos + 1;
            pos = nl;
            if !matches!(stored.get(pos), Some(b' ' | b'\t')) {
                break;
            }
        }
    }
}

/// Waits until `user` holds `n` messages (Postfix delivers asynchronously).
fn wait_for(user: &User, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while user.maildir_count() < n {
        assert!(
            Instant::now() < deadline,
            "{} has {} messages, expected {n}\n{}",
            user.name,
            user.maildir_count(),
            postfix().logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The one message in `user`'s INBOX, trace fields removed; fails if there are others.
fn only_message(user: &User) -> Vec<u8> {
    wait_for(user, 1, Duration::from_secs(30));
    let all = imap_fetch_all(user);
    assert_eq!(all.len(), 1, "messages: {all:?}");
    without_trace(&all[0].1)
}

fn transaction(from: &str, to: &[&str], message: &[u8]) -> Vec<u8> {
    let mut t = format!("MAIL FROM:<{from}>\r\n").into_bytes();
    for rcpt in to {
        t.extend_from_slice(format!("RCPT TO:<{rcpt}>\r\n").as_bytes());
    }
    t.extend_from_slice(b"DATA\r\n");
    t.extend_from_slice(message);
    t.extend_from_slice(b".\r\n");
    t
}

fn wrap_session(transactions: &[u8]) -> Vec<u8> {
    let mut s = b"EHLO client.test\r\n".to_vec();
    s.extend_from_slice(transactions);
    s.extend_from_slice(b"QUIT\r\n");
    s
}

/// Header fields that keep the proxy (and Postfix, which adds From: for local clients)
/// from adding their own, so stored bytes are predictable.
fn dated(subject: &str) -> String {
    format!(
        "From: Client <client@client.test>\r\nSubject: {subject}\r\nDate: Sat, 22 Nov 2025 00:32:00 +0000\r\nMessage-ID: <{subject}@client.test>\r\n"
    )
}

/// The code of each reply's last line, in order: one per reply.
fn final_codes(out: &str) -> Vec<&str> {
    out.split("\r\n")
        .filter(|l| l.len() > 3 && l.as_bytes()[3] == b' ')
        .map(|l| &l[..3])
        .collect()
}

fn queued_replies(out: &str) -> usize {
    out.matches(postfix_backend().queued).count()
}

#[test]
fn a_configuration_error_is_answered_with_421_and_logged() {
    let out = Command::new(proxy_bin())
        .env_clear()
        .args(["--log", "stderr", "smtp"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "421 4.3.5 Service not available: configuration error\r\n"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("no submission server: set --smtp-host"),
        "{log}"
    );
}

#[test]
fn raw_session_relays_byte_exact_through_implicit_tls() {
    raw_session_relays_byte_exact(&postfix_backend());
}

#[test]
fn exim_raw_session_relays_byte_exact_through_implicit_tls() {
    raw_session_relays_byte_exact(&exim_backend());
}

#[test]
fn opensmtpd_raw_session_relays_byte_exact_through_implicit_tls() {
    raw_session_relays_byte_exact(&opensmtpd_backend());
}

fn raw_session_relays_byte_exact(b: &Backend) {
    let s = servers();
    let sender = s.new_user("raw-sender");
    let rcpt = s.new_user("raw-rcpt");
    let mut message = format!(
        "From: Sender <{}>\r\nTo: {}\r\n{}\r\n",
        sender.email,
        rcpt.email,
        dated("raw")
    )
    .into_bytes();
    message.extend_from_slice(b"8-bit: Gr\xc3\xbc\xc3\x9fe, \xe9t\xe9 (Latin-1 byte)\r\n");
    message.extend_from_slice(b".\r\n..two dots stored as one\r\n. space\r\nend\r\n");
    // On the wire: dot lines stuffed.
    let mut wire = Vec::new();
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    // at-rcpt: the one RCPT gets the server's own reply (with-message would answer it
    // here and check it with the message; refused_recipient_checked_with_the_message).
    let (out, log) = Proxy::implicit_to(b, &sender)
        .arg("--recipient-check", "at-rcpt")
        .session(&wrap_session(&transaction(
            &sender.email,
            &[&rcpt.email],
            &wire,
        )));
    let lines: Vec<&str> = out.split("\r\n").collect();
    assert_eq!(lines[0], "220 proxy.test ESMTP ready", "{out}");
    assert!(
        lines.contains(&b.mail_ok) && lines.contains(&b.rcpt_ok),
        "{}'s own replies are passed on: {out}\n{log}",
        b.name
    );
    assert_eq!(
        out.matches(b.queued).count(),
        1,
        "{out}\n{log}\n{}",
        (b.logs)()
    );
    assert!(out.ends_with("221 2.0.0 Bye\r\n"));
    assert!(log.contains("result=sent"), "{log}");
    assert_eq!(
        String::from_utf8_lossy(&only_message(&rcpt)),
        String::from_utf8_lossy(&message)
    );
}

#[test]
fn starttls_backend_with_swaks_over_a_pipe() {
    starttls_backend_with_swaks(&postfix_backend());
}

#[test]
fn exim_starttls_backend_with_swaks_over_a_pipe() {
    starttls_backend_with_swaks(&exim_backend());
}

#[test]
fn opensmtpd_starttls_backend_with_swaks_over_a_pipe() {
    starttls_backend_with_swaks(&opensmtpd_backend());
}

fn starttls_backend_with_swaks(b: &Backend) {
    let swaks = require_client("swaks");
    let s = servers();
    let sender = s.new_user("swaks-sender");
    let rcpt = s.new_user("swaks-rcpt");
    let proxy = Proxy::starttls_to(b, &sender);
    let out = Command::new(swaks)
        .args(["--pipe", &proxy.shell_line()])
        .args(["--from", &sender.email, "--to", &rcpt.email])
        .args(["--header", "Subject: via swaks", "--body", "swaks body"])
        .args(["--timeout", "60"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("<-  250 ") && l.contains(b.queued)),
        "{text}"
    );
    let stored = String::from_utf8_lossy(&only_message(&rcpt)).into_owned();
    assert!(stored.contains("Subject: via swaks\r\n"), "{stored}");
    assert!(stored.contains("\r\n\r\nswaks body\r\n"), "{stored}");
}

#[test]
fn curl_smtp_url_through_an_inetd_socket() {
    let curl = require_client("curl");
    let s = servers();
    let sender = s.new_user("curl-sender");
    let rcpt = s.new_user("curl-rcpt");
    let (port, log) = Proxy::implicit(&sender).listen();
    let message = format!(
        "From: {}\r\n{}\r\ncurl body\r\n.leading dot\r\n",
        sender.email,
        dated("curl")
    );
    let file = s.dir.join(format!("curl-{}.eml", rcpt.name));
    std::fs::write(&file, &message).unwrap();
    let out = Command::new(curl)
        .args(["-sS", "-v", &format!("smtp://127.0.0.1:{port}/client.test")])
        .args(["--mail-from", &sender.email, "--mail-rcpt", &rcpt.email])
        .arg("--upload-file")
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(text.contains("< 250 2.0.0 Ok: "), "{text}");
    assert_eq!(String::from_utf8_lossy(&only_message(&rcpt)), message);
}

const SMTPLIB_SEND: &str = r#"
import os, smtplib
s = smtplib.SMTP("127.0.0.1", int(os.environ["T_PORT"]), timeout=60)
s.ehlo("client.test")
print(sorted(s.esmtp_features))
msg = open(os.environ["T_MSG"], "rb").read()
refused = s.sendmail(os.environ["T_FROM"], os.environ["T_TO"].split(","), msg)
for rcpt, (code, text) in sorted(refused.items()):
    print("REFUSED", rcpt, code, text.decode())
s.quit()
"#;

#[test]
fn python_smtplib_unknown_recipient_gets_550_5_1_1_and_the_others_are_delivered() {
    smtplib_unknown_recipient_gets_550_and_the_others_are_delivered(&postfix_backend());
}

#[test]
fn exim_python_smtplib_unknown_recipient_gets_550_and_the_others_are_delivered() {
    smtplib_unknown_recipient_gets_550_and_the_others_are_delivered(&exim_backend());
}

#[test]
fn opensmtpd_python_smtplib_unknown_recipient_gets_550_and_the_others_are_delivered() {
    smtplib_unknown_recipient_gets_550_and_the_others_are_delivered(&opensmtpd_backend());
}

fn smtplib_unknown_recipient_gets_550_and_the_others_are_delivered(b: &Backend) {
    let s = servers();
    let sender = s.new_user("py-sender");
    let first = s.new_user("py-rcpt");
    let second = s.new_user("py-rcpt");
    let (port, log) = Proxy::implicit_to(b, &sender).listen();
    let message = format!(
        "From: {}\r\n{}\r\nsmtplib body\r\n",
        sender.email,
        dated("smtplib")
    );
    let file = s.dir.join(format!("py-{}.eml", first.name));
    std::fs::write(&file, &message).unwrap();
    let ghost = format!("ghost-{}@example.test", first.name);
    let to = format!("{},{ghost},{}", first.email, second.email);
    let out = python(
        SMTPLIB_SEND,
        &[
            ("T_PORT", &port.to_string()),
            ("T_MSG", file.to_str().unwrap()),
            ("T_FROM", &sender.email),
            ("T_TO", &to),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        stdout.contains("['8bitmime', 'enhancedstatuscodes', 'pipelining', 'size']"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "REFUSED {ghost} {}",
            (b.unknown_recipient)(&ghost)
        )),
        "{stdout}"
    );
    for user in [&first, &second] {
        assert_eq!(String::from_utf8_lossy(&only_message(user)), message);
    }
}

#[test]
fn a_stopped_backend_gives_4xx() {
    let s = servers();
    let sender = s.new_user("stopped");
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = Proxy::to(port, "implicit", &sender);
    let (out, log) = proxy.session(&wrap_session(b"MAIL FROM:<a@example.test>\r\n"));
    assert!(
        out.contains("\r\n451 4.4.1 Backend unavailable; try again later\r\n"),
        "{out}"
    );
    assert!(
        log.contains(&format!(
            "cannot connect to 127.0.0.1:{port}: Connection refused"
        )),
        "{log}"
    );
}

#[test]
fn an_untrusted_backend_certificate_gives_4xx() {
    let s = servers();
    let sender = s.new_user("untrusted");
    for (port, tls) in [
        (postfix().untrusted_submissions_port, "implicit"),
        (postfix().untrusted_submission_port, "starttls"),
    ] {
        let (out, log) =
            Proxy::to(port, tls, &sender).session(&wrap_session(b"MAIL FROM:<a@example.test>\r\n"));
        assert!(
            out.contains("\r\n451 4.4.1 Backend unavailable; try again later\r\n"),
            "{tls}: {out}"
        );
        assert!(log.to_lowercase().contains("certificate"), "{tls}: {log}");
    }
}

#[test]
fn a_wrong_backend_password_is_logged_clearly_and_gives_4xx() {
    wrong_backend_password_is_logged_clearly_and_gives_4xx(&postfix_backend());
}

#[test]
fn exim_a_wrong_backend_password_is_logged_clearly_and_gives_4xx() {
    wrong_backend_password_is_logged_clearly_and_gives_4xx(&exim_backend());
}

#[test]
fn opensmtpd_a_wrong_backend_password_is_logged_clearly_and_gives_4xx() {
    wrong_backend_password_is_logged_clearly_and_gives_4xx(&opensmtpd_backend());
}

fn wrong_backend_password_is_logged_clearly_and_gives_4xx(b: &Backend) {
    let s = servers();
    let sender = s.new_user("wrongpw");
    let proxy = Proxy::implicit_to(b, &sender).env("LMP_SMTP_PASSWORD", "not the password");
    let (out, log) = proxy.session(&wrap_session(b"MAIL FROM:<a@example.test>\r\n"));
    assert!(
        out.contains("\r\n451 4.3.5 Relay login failed; try again later\r\n"),
        "{out}"
    );
    assert!(
        log.contains("the backend refused the proxy's login (--smtp-user and its password)")
            && log.contains(&format!("user {}", sender.name))
            && log.contains(b.wrong_password),
        "{log}"
    );
    assert!(!log.contains("not the password"), "{log}");
}

#[test]
fn a_bare_lf_message_is_stored_with_crlf() {
    let s = servers();
    let sender = s.new_user("barelf-sender");
    let rcpt = s.new_user("barelf-rcpt");
    let body = format!(
        "{}\nline one\nline two\n\nlast\r\n",
        dated("bare-lf").replace("\r\n", "\n")
    );
    let (out, _) = Proxy::implicit(&sender).session(&wrap_session(&transaction(
        &sender.email,
        &[&rcpt.email],
        body.as_bytes(),
    )));
    assert_eq!(queued_replies(&out), 1, "{out}");
    assert_eq!(
        String::from_utf8_lossy(&only_message(&rcpt)),
        body.replace("\r\n", "\n").replace('\n', "\r\n")
    );
}

#[test]
fn each_smuggling_sequence_leaves_exactly_one_message() {
    let s = servers();
    let sender = s.new_user("smuggle-sender");
    let victim = s.new_user("smuggle-victim");
    let proxy = Proxy::implicit(&sender);
    let sequences: [(&str, &[u8]); 8] = [
        ("lf-dot-lf", b"\n.\n"),
        ("lf-dot-crlf", b"\n.\r\n"),
        ("cr-dot-crlf", b"\r.\r\n"),
        ("crlf-dot-cr", b"\r\n.\r"),
        ("crlf-dot-lf", b"\r\n.\n"),
        ("cr-dot-cr", b"\r.\r"),
        ("lf-dot-cr", b"\n.\r"),
        ("cr-dot-lf", b"\r.\n"),
    ];
    let mut rcpts = Vec::new();
    let mut transactions = Vec::new();
    for (name, seq) in sequences {
        let rcpt = s.new_user("smuggle-rcpt");
        let mut message = dated(name).into_bytes();
        message.extend_from_slice(b"\r\nbefore");
        message.extend_from_slice(seq);
        message.extend_from_slice(
            format!(
                "MAIL FROM:<evil@example.test>\r\nRCPT TO:<{}>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n",
                victim.email
            )
            .as_bytes(),
        );
        transactions.extend(transaction(&sender.email, &[&rcpt.email], &message));
        rcpts.push(rcpt);
    }
    let (out, log) = proxy.session(&wrap_session(&transactions));
    assert_eq!(queued_replies(&out), sequences.len(), "{out}\n{log}");
    // What Postfix itself counted in that session: had any sequence ended a message at the
    // backend, the rest would have been a ninth MAIL, RCPT and DATA. Read once the session
    // is over, so nothing is left to arrive.
    // One EHLO, and each message as one BDAT (Postfix offers CHUNKING).
    let n = sequences.len();
    assert_eq!(
        postfix_session_counts(&sender.name),
        format!(
            "ehlo=1 auth=1 mail={n} rcpt={n} bdat={n} quit=1 commands={}",
            3 * n + 3
        )
    );
    for ((name, _), rcpt) in sequences.iter().zip(&rcpts) {
        let stored = String::from_utf8_lossy(&only_message(rcpt)).into_owned();
        assert!(stored.contains(&format!("Subject: {name}\r\n")), "{stored}");
        assert!(
            stored.contains("\r\n.\r\nMAIL FROM:<evil@example.test>\r\n")
                && stored.ends_with("\r\nsmuggled\r\n"),
            "{name}: {stored:?}"
        );
    }
    assert_eq!(
        victim.maildir_count(),
        0,
        "a smuggled message was delivered"
    );
}

/// The command counts Postfix logged when the session that logged in as `user` ended
/// (`disconnect from localhost[127.0.0.1] ehlo=1 auth=1 mail=8 … commands=27`).
fn postfix_session_counts(user: &str) -> String {
    let mut counts = None;
    wait_until(
        &format!("Postfix logs the end of {user}'s session"),
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(&postfix().log_file).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            // `postfix/smtpd[PID]: QUEUEID: client=…, sasl_method=PLAIN, sasl_username=USER`
            let Some(at) = lines
                .iter()
                .position(|l| l.ends_with(&format!(" sasl_username={user}")))
            else {
                return false;
            };
            let Some(process) = lines[at]
                .split(' ')
                .find(|w| w.starts_with("postfix/smtpd["))
            else {
                return false;
            };
            let end = format!("{process} disconnect from ");
            counts = lines[at..].iter().find_map(|l| {
                let rest = &l[l.find(&end)? + end.len()..];
                Some(rest.split_once(' ')?.1.to_string())
            });
            counts.is_some()
        },
    );
    counts.unwrap()
}

/// Tests that change the shared Postfix's configuration, or need its defaults, hold this.
static POSTFIX_CONFIG: Mutex<()> = Mutex::new(());

fn postfix_config_lock() -> MutexGuard<'static, ()> {
    POSTFIX_CONFIG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `postconf -c DIR` with each of `changes`, then `postfix reload`, and waits until
/// the configuration is in force: until `ready` holds.
fn reconfigure_postfix(changes: &[&[&str]], ready: impl FnMut() -> bool) {
    let dir = postfix().config_dir.to_str().unwrap();
    let postconf = changes.iter().map(|args| (["postconf", "-c", dir], *args));
    let reload = std::iter::once((["postfix", "-c", dir], &["reload"][..]));
    for (command, args) in postconf.chain(reload) {
        let status = Command::new(command[0])
            .args(&command[1..])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{command:?} {args:?}");
    }
    wait_until(
        "Postfix reloads its configuration",
        Duration::from_secs(30),
        ready,
    );
}

/// The EHLO reply of Postfix's STARTTLS port (before TLS).
fn postfix_ehlo() -> String {
    let Ok(stream) = TcpStream::connect(("127.0.0.1", postfix().submission_port)) else {
        return String::new();
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut reply = String::new();
    let mut line = String::new();
    let _ = reader.read_line(&mut line);
    let _ = writer.write_all(b"EHLO probe.test\r\n");
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        reply.push_str(&line);
        if line.starts_with("250 ") {
            break;
        }
    }
    let _ = writer.write_all(b"QUIT\r\n");
    reply
}

/// The message_size_limit Postfix's smtpd processes use now (their EHLO SIZE).
fn postfix_size_limit() -> Option<u64> {
    postfix_ehlo()
        .lines()
        .find_map(|l| l.strip_prefix("250-SIZE ")?.trim().parse().ok())
}

/// Sets Postfix's message_size_limit until dropped, then puts the old value back.
struct SizeLimit {
    old: u64,
}

impl SizeLimit {
    fn set(limit: u64) -> SizeLimit {
        let old = postfix_size_limit().expect("Postfix advertises SIZE");
        Self::apply(limit);
        SizeLimit { old }
    }

    fn apply(limit: u64) {
        reconfigure_postfix(&[&["-e", &format!("message_size_limit={limit}")]], || {
            postfix_size_limit() == Some(limit)
        });
    }
}

impl Drop for SizeLimit {
    fn drop(&mut self) {
        Self::apply(self.old);
    }
}

#[test]
fn an_oversized_message_is_refused_after_its_final_dot() {
    let s = servers();
    let sender = s.new_user("big-sender");
    let rcpt = s.new_user("big-rcpt");
    let proxy = Proxy::implicit(&sender).arg("--max-message-size", "10000");
    let big = format!(
        "{}\r\n{}",
        dated("big"),
        "0123456789abcdef\r\n".repeat(1000)
    );
    let small = format!("{}\r\nsmall\r\n", dated("small"));
    let mut input = transaction(&sender.email, &[&rcpt.email], big.as_bytes());
    input.extend_from_slice(b"NOOP\r\n");
    input.extend(transaction(&sender.email, &[&rcpt.email], small.as_bytes()));
    let (out, log) = proxy.session(&wrap_session(&input));
    assert!(
        out.contains(
            "354 End data with <CR><LF>.<CR><LF>\r\n552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n"
        ),
        "{out}"
    );
    assert!(log.contains("result=refused"), "{log}");
    assert_eq!(queued_replies(&out), 1, "{out}");
    assert!(String::from_utf8_lossy(&only_message(&rcpt)).ends_with("\r\n\r\nsmall\r\n"));
}

#[test]
fn a_pipelined_session_is_answered_in_order() {
    pipelined_session_is_answered_in_order(&postfix_backend());
}

#[test]
fn exim_a_pipelined_session_is_answered_in_order() {
    pipelined_session_is_answered_in_order(&exim_backend());
}

#[test]
fn opensmtpd_a_pipelined_session_is_answered_in_order() {
    pipelined_session_is_answered_in_order(&opensmtpd_backend());
}

#[test]
fn a_refused_recipient_answered_250_is_the_reply_to_the_final_dot_and_nothing_goes_out() {
    refused_recipient_checked_with_the_message(&postfix_backend());
}

#[test]
fn exim_a_refused_recipient_answered_250_is_the_reply_to_the_final_dot() {
    refused_recipient_checked_with_the_message(&exim_backend());
}

#[test]
fn without_chunking_a_refused_recipient_answered_250_is_the_reply_to_the_final_dot() {
    refused_recipient_checked_with_the_message(&Backend {
        submissions_port: postfix().no_chunking_submissions_port,
        ..postfix_backend()
    });
}

/// `--recipient-check with-message` (the default): a transaction's first RCPT is answered
/// at once and sent with the message (Postfix and Exim: MAIL, RCPT, BDAT LAST and the
/// message in one write; Postfix without CHUNKING: MAIL, RCPT and DATA). The server's
/// refusal of it reaches the client at its final dot, or at DATA when a second recipient
/// brought it; the message goes to no one, and the session goes on in step. (OpenSMTPD
/// 7.6 offers no PIPELINING: nothing can be held, each RCPT gets its own answer, as its
/// unknown-recipient test shows.)
fn refused_recipient_checked_with_the_message(backend: &Backend) {
    let s = servers();
    let sender = s.new_user("held-sender");
    let rcpt = s.new_user("held-rcpt");
    let ghost = format!("ghost-{}@example.test", rcpt.name);
    let message = |n: &str| format!("{}\r\n{n}\r\n", dated(&format!("held-{n}")));
    let mut input = Vec::new();
    input.extend(transaction(
        &sender.email,
        &[&ghost],
        message("one").as_bytes(),
    ));
    // A second recipient brings the server's verdict on the first before DATA, which is
    // refused then: no message is sent (RFC 2920: the client waits for 354).
    input.extend(
        format!(
            "MAIL FROM:<{}>\r\nRCPT TO:<{ghost}>\r\nRCPT TO:<{}>\r\nDATA\r\n",
            sender.email, rcpt.email
        )
        .as_bytes(),
    );
    input.extend(transaction(
        &sender.email,
        &[&rcpt.email],
        message("three").as_bytes(),
    ));
    let (out, log) = Proxy::implicit_to(backend, &sender).session(&wrap_session(&input));
    let codes = final_codes(&out);
    assert_eq!(
        codes,
        [
            "220", "250", "250", "250", "354", "550", "250", "250", "250", "550", "250", "250",
            "354", "250", "221"
        ],
        "{out}\n{log}"
    );
    let refusal = (backend.unknown_recipient)(&ghost);
    assert_eq!(out.matches(&refusal).count(), 2, "{out}");
    assert!(
        out.contains("250 2.1.5 Ok, checked when the message is sent\r\n"),
        "{out}"
    );
    // The proxy's own account of each message: one refused, one sent (the DATA it
    // refused never became a message).
    assert_eq!(log.matches("smtp message: ").count(), 2, "{log}");
    assert_eq!(log.matches(" result=sent ").count(), 1, "{log}");
    assert_eq!(
        String::from_utf8_lossy(&only_message(&rcpt)),
        message("three")
    );
}

fn pipelined_session_is_answered_in_order(backend: &Backend) {
    let s = servers();
    let sender = s.new_user("pipe-sender");
    let a = s.new_user("pipe-a");
    let b = s.new_user("pipe-b");
    let mut input = b"EHLO client.test\r\n".to_vec();
    input.extend(transaction(
        &sender.email,
        &[&a.email, "nobody-pipe@example.test", &b.email],
        format!("{}\r\none\r\n", dated("pipe-1")).as_bytes(),
    ));
    input.extend_from_slice(b"RSET\r\nNOOP\r\n");
    input.extend(transaction(
        &sender.email,
        &[&b.email],
        format!("{}\r\ntwo\r\n", dated("pipe-2")).as_bytes(),
    ));
    input.extend_from_slice(b"QUIT\r\n");
    let (out, log) = Proxy::implicit_to(backend, &sender).session(&input);
    let codes = final_codes(&out);
    assert_eq!(
        codes,
        [
            "220", "250", "250", "250", "550", "250", "354", "250", "250", "250", "250", "250",
            "354", "250", "221"
        ],
        "{out}\n{log}"
    );
    let unknown = (backend.unknown_recipient)("nobody-pipe@example.test");
    assert!(out.contains(&unknown), "{out}");
    assert_eq!(
        String::from_utf8_lossy(&only_message(&a)),
        format!("{}\r\none\r\n", dated("pipe-1"))
    );
    wait_for(&b, 2, Duration::from_secs(30));
}

#[test]
fn passthrough_auth_logs_in_upstream_with_the_clients_credentials() {
    let s = servers();
    let sender = s.new_user_with_password("pass-sender", "p\u{e4}ss w\"rd");
    let rcpt = s.new_user("pass-rcpt");
    let proxy = Proxy::passthrough();
    let b64 = |s: &str| {
        let out = Command::new("base64")
            .arg("-w0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(s.as_bytes())?;
                let mut o = String::new();
                c.stdout.take().unwrap().read_to_string(&mut o)?;
                c.wait()?;
                Ok(o)
            })
            .unwrap();
        out.trim().to_string()
    };
    let wrong = b64(&format!("\0{}\0wrong", sender.name));
    let right = b64(&format!("\0{}\0{}", sender.name, sender.password));
    let mut input = format!(
        "EHLO client.test\r\nMAIL FROM:<{}>\r\nAUTH PLAIN {wrong}\r\nAUTH PLAIN {right}\r\n",
        sender.email
    )
    .into_bytes();
    input.extend(transaction(
        &sender.email,
        &[&rcpt.email],
        format!("{}\r\npassthrough\r\n", dated("passthrough")).as_bytes(),
    ));
    input.extend_from_slice(b"QUIT\r\n");
    let (out, log) = proxy.env("LMP_AUTH_FAILURE_DELAY", "0").session(&input);
    assert!(
        out.contains("250 AUTH PLAIN LOGIN\r\n530 5.7.0 Authentication required\r\n535 5.7.8 Error: authentication failed"),
        "{out}\n{log}"
    );
    assert!(
        out.contains("\r\n235 2.7.0 Authentication successful\r\n"),
        "{out}"
    );
    assert_eq!(queued_replies(&out), 1, "{out}\n{log}");
    assert!(
        !log.contains(&sender.password) && !log.contains(&right),
        "{log}"
    );
    only_message(&rcpt);
}

#[test]
fn from_and_reply_to_rewriting_reaches_the_mailbox_byte_exact() {
    let s = servers();
    let sender = s.new_user("rewrite-sender");
    let rcpt = s.new_user("rewrite-rcpt");
    let proxy = Proxy::implicit(&sender)
        .arg("--force-sender", &sender.email)
        .arg("--rewrite-from", &sender.email)
        .arg("--reply-to", "desk@example.test");
    let message =
        "From: \"Lobby Scanner\" <scanner@lan.invalid>\r\nSubject: scan\r\n\r\nFrom: body line\r\n";
    let (out, log) = proxy.session(&wrap_session(&transaction(
        "scanner@lan.invalid",
        &[&rcpt.email],
        message.as_bytes(),
    )));
    assert_eq!(queued_replies(&out), 1, "{out}\n{log}");
    let stored = String::from_utf8_lossy(&only_message(&rcpt)).into_owned();
    let (head, body) = stored.split_once("\r\n\r\n").unwrap();
    let lines: Vec<&str> = head.split("\r\n").collect();
    assert_eq!(
        lines[0],
        format!("From: \"Lobby Scanner\" <{}>", sender.email)
    );
    assert_eq!(lines[1], "Subject: scan");
    assert_eq!(lines[2], "Reply-To: desk@example.test");
    assert!(
        lines[3].starts_with("Date: ") && lines[4].starts_with("Message-ID: <"),
        "{head}"
    );
    assert_eq!(lines.len(), 5, "{head}");
    assert_eq!(body, "From: body line\r\n");
    // The envelope sender upstream was forced (Return-Path shows it).
    let all = imap_fetch_all(&rcpt);
    assert!(
        String::from_utf8_lossy(&all[0].1).starts_with(&format!("Return-Path: <{}>", sender.email))
    );
}

#[test]
fn one_thousand_messages_in_one_session_are_all_delivered() {
    let s = servers();
    let sender = s.new_user("thousand-sender");
    let rcpt = s.new_user("thousand-rcpt");
    let mut transactions = Vec::new();
    for i in 0..1000 {
        transactions.extend(transaction(
            &sender.email,
            &[&rcpt.email],
            format!("{}\r\nmessage {i}\r\n", dated(&format!("n{i}"))).as_bytes(),
        ));
    }
    let started = Instant::now();
    let (out, log) = Proxy::implicit(&sender).session(&wrap_session(&transactions));
    let elapsed = started.elapsed();
    assert_eq!(
        queued_replies(&out),
        1000,
        "{}\n{log}",
        &out[out.len().saturating_sub(2000)..]
    );
    assert!(log.contains("messages=1000 sent=1000 failed=0"), "{log}");
    eprintln!(
        "1000 messages through the proxy (raw pipelined client): {:.1}s, {:.0} msg/s",
        elapsed.as_secs_f64(),
        1000.0 / elapsed.as_secs_f64()
    );
    wait_for(&rcpt, 1000, Duration::from_secs(180));
}

/// Measurements for the README (run with `--ignored --nocapture`): peak RSS while relaying
/// a 30 MB message, and messages per second for 1,000 small messages with Python's
/// smtplib through the proxy and straight to Postfix.
#[test]
#[ignore]
fn measure_rss_and_throughput() {
    let s = servers();
    let sender = s.new_user("measure-sender");
    let rcpt = s.new_user("measure-rcpt");
    let proxy = Proxy::implicit(&sender);

    // Peak RSS for a small and a 30 MB message. The harness's Postfix keeps the 10 MB
    // default message_size_limit; raise it for this measurement (restored on drop).
    let _lock = postfix_config_lock();
    let _limit = SizeLimit::set(50 * 1024 * 1024);
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    for (name, size) in [("1 KB", 1024), ("30 MB", 30 * 1024 * 1024)] {
        let body = line.repeat(size / line.len());
        let input = wrap_session(&transaction(
            &sender.email,
            &[&rcpt.email],
            format!("{}\r\n{body}", dated("rss")).as_bytes(),
        ));
        let mut cmd = Command::new("/usr/bin/time");
        cmd.arg("-v").arg(proxy.command().get_program());
        cmd.args(proxy.command().get_args());
        cmd.env_clear().envs(proxy.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let started = Instant::now();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        let _ = writer.join();
        let elapsed = started.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(queued_replies(&stdout), 1, "{stdout}\n{stderr}");
        let rss = stderr
            .lines()
            .find(|l| l.contains("Maximum resident set size"))
            .unwrap_or("?")
            .trim();
        eprintln!(
            "{name} message: {rss}; session {:.2}s",
            elapsed.as_secs_f64()
        );
    }

    // 1,000 small messages, same client code, through the proxy and direct.
    let (port, _) = proxy.listen();
    let script = r#"
import os, smtplib, ssl, time
n = 1000
msg = b"Subject: speed\r\nDate: Sat, 22 Nov 2025 00:32:00 +0000\r\nMessage-ID: <x@client.test>\r\n\r\nbody\r\n"
if os.environ["T_MODE"] == "proxy":
    s = smtplib.SMTP("127.0.0.1", int(os.environ["T_PORT"]), timeout=60)
else:
    ctx = ssl.create_default_context(cafile=os.environ["LMP_CA_FILE"])
    s = smtplib.SMTP_SSL("127.0.0.1", int(os.environ["LMP_SUBMISSIONS_PORT"]), context=ctx, timeout=60)
    s.login(os.environ["T_USER"], os.environ["T_PASS"])
t = time.monotonic()
for i in range(n):
    s.sendmail(os.environ["T_FROM"], [os.environ["T_TO"]], msg)
dt = time.monotonic() - t
s.quit()
print("%.2f s, %.0f msg/s" % (dt, n / dt))
"#;
    for mode in ["proxy", "direct"] {
        let out = python(
            script,
            &[
                ("T_MODE", mode),
                ("T_PORT", &port.to_string()),
                ("T_USER", &sender.name),
                ("T_PASS", &sender.password),
                ("T_FROM", &sender.email),
                ("T_TO", &rcpt.email),
            ],
        );
        eprintln!(
            "1000 messages with smtplib, {mode}: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the proxy with one end of a TCP connection as stdin and stdout, as inetd does;
/// returns the process and the client's end.
fn spawn_on_socket(proxy: &Proxy) -> (std::process::Child, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let fd = OwnedFd::from(server);
    let child = proxy
        .command()
        .stdin(Stdio::from(fd.try_clone().unwrap()))
        .stdout(Stdio::from(fd))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start proxy");
    (child, client)
}

/// Waits for `child` to exit within `limit`; kills it and fails otherwise.
fn wait_exit(mut child: std::process::Child, limit: Duration, what: &str) -> String {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: the proxy was still running after {limit:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_client_that_stops_reading_is_dropped_after_the_idle_timeout() {
    let proxy = Proxy::fake(closed_port()).arg("--idle-timeout", "2");
    let (child, client) = spawn_on_socket(&proxy);
    // The client pipelines EHLO after EHLO (each answered with a few hundred bytes, none
    // of them counted as errors) and never reads: the socket buffers fill up and the
    // proxy's writes block.
    let mut writer = client.try_clone().unwrap();
    std::thread::spawn(move || {
        let burst = b"EHLO client.test\r\n".repeat(1000);
        while writer.write_all(&burst).is_ok() {}
    });
    let log = wait_exit(child, Duration::from_secs(60), "client not reading");
    assert!(log.contains("end=client write failed"), "{log}");
    drop(client);
}

#[test]
fn a_slow_upload_keeps_a_backend_that_drops_idle_clients_alive() {
    // Like Postfix's smtpd_timeout, but 2 s instead of 300.
    let fake = FakeSmtp::start(Script {
        idle_limit: Some(Duration::from_secs(2)),
        ..Script::default()
    });
    let proxy = Proxy::fake(fake.port).arg("--smtp-keepalive", "0.5");
    let pages: Vec<String> = (1..=6).map(|i| format!("page {i}\r\n")).collect();
    let message = format!("{}\r\n{}", dated("scan"), pages.concat());
    let input_pages = pages.clone();
    let (out, log) = proxy.session_with(move |mut stdin| {
        let head = format!(
            "EHLO scanner.test\r\nMAIL FROM:<scanner@lan.test>\r\nRCPT TO:<desk@example.test>\r\nDATA\r\n{}\r\n",
            dated("scan")
        );
        stdin.write_all(head.as_bytes()).unwrap();
        // A scanner sending pages as it scans them: 4.2 s in all, the backend's limit 2 s.
        for page in input_pages {
            std::thread::sleep(Duration::from_millis(700));
            stdin.write_all(page.as_bytes()).unwrap();
        }
        stdin.write_all(b".\r\nQUIT\r\n").unwrap();
    });
    assert!(
        out.contains("\r\n250 2.0.0 Ok: queued as F1\r\n"),
        "{out}\n{log}"
    );
    let journal = fake.journal();
    assert_eq!(journal.messages, [message.into_bytes()]);
    assert!(
        journal.commands.iter().filter(|c| *c == "NOOP").count() >= 4,
        "{:?}",
        journal.commands
    );
    assert!(!journal.commands.contains(&"*TIMEOUT".to_string()));
}

#[test]
fn the_client_gets_221_and_its_connection_closed_before_the_backend_answers_quit() {
    let fake = FakeSmtp::start(Script {
        quit_delay: Duration::from_secs(5),
        ..Script::default()
    });
    let (child, mut client) = spawn_on_socket(&Proxy::fake(fake.port));
    let started = Instant::now();
    // MAIL opens the backend connection, so QUIT has one to close.
    client
        .write_all(b"EHLO client.test\r\nMAIL FROM:<a@lan.test>\r\nQUIT\r\n")
        .unwrap();
    let mut replies = String::new();
    client.read_to_string(&mut replies).unwrap();
    let closed_after = started.elapsed();
    assert!(
        replies.ends_with("250 2.1.0 Ok\r\n221 2.0.0 Bye\r\n"),
        "{replies}"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "the client waited {closed_after:?} for the backend's QUIT"
    );
    let log = wait_exit(child, Duration::from_secs(30), "QUIT");
    assert!(log.contains("end=quit"), "{log}");
    assert_eq!(fake.commands().last().map(String::as_str), Some("QUIT"));
}

#[test]
fn postfix_refusing_an_oversized_message_at_the_final_dot_reaches_the_client() {
    let _lock = postfix_config_lock();
    let s = servers();
    let sender = s.new_user("pf552-sender");
    let rcpt = s.new_user("pf552-rcpt");
    // Over Postfix's default message_size_limit (10,240,000 bytes), under the proxy's.
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    let big = format!(
        "{}\r\n{}",
        dated("pf552-big"),
        line.repeat(11_000_000 / line.len())
    );
    let small = format!("{}\r\nsmall\r\n", dated("pf552-small"));
    let mut input = transaction(&sender.email, &[&rcpt.email], big.as_bytes());
    input.extend(transaction(&sender.email, &[&rcpt.email], small.as_bytes()));
    let (out, log) = Proxy::implicit(&sender).session(&wrap_session(&input));
    assert!(
        out.contains(
            // Postfix's refusal of a BDAT chunk (its DATA refusal says "message file too
            // big").
            "354 End data with <CR><LF>.<CR><LF>\r\n552 5.3.4 Chunk exceeds message size limit\r\n"
        ),
        "{out}\n{log}"
    );
    assert!(log.contains("result=refused"), "{log}");
    // The connection stays usable for the next message.
    assert_eq!(queued_replies(&out), 1, "{out}");
    assert_eq!(String::from_utf8_lossy(&only_message(&rcpt)), small);
}

#[test]
fn a_backend_offering_only_auth_login_is_logged_in_to_with_login() {
    // Like Exchange: no PLAIN. An extra Postfix STARTTLS port whose SASL mechanisms are
    // filtered down to LOGIN, added for this test and removed after it.
    let _lock = postfix_config_lock();
    let port = closed_port();
    let service = format!("127.0.0.1:{port}/inet");
    reconfigure_postfix(
        &[
            &[
                "-M",
                &format!("{service}=127.0.0.1:{port} inet n - n - - smtpd"),
            ],
            &[
                "-P",
                &format!("{service}/smtpd_sasl_mechanism_filter=login"),
            ],
        ],
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            reconfigure_postfix(&[&["-MX", &self.0]], || true);
        }
    }
    let _remove = Remove(service);

    let s = servers();
    let sender = s.new_user("login-sender");
    let rcpt = s.new_user("login-rcpt");
    let message = format!("{}\r\nvia LOGIN\r\n", dated("login-only"));
    let (out, log) = Proxy::to(port, "starttls", &sender).session(&wrap_session(&transaction(
        &sender.email,
        &[&rcpt.email],
        message.as_bytes(),
    )));
    assert_eq!(queued_replies(&out), 1, "{out}\n{log}");
    assert_eq!(String::from_utf8_lossy(&only_message(&rcpt)), message);
    let pf_log = std::fs::read_to_string(&postfix().log_file).unwrap();
    assert!(
        pf_log.contains(&format!(
            "sasl_method=LOGIN, sasl_username={}\n",
            sender.name
        )),
        "Postfix did not log a LOGIN for {}",
        sender.name
    );
}

/// Sends `input` in one write to a proxy listening at `port`, then reads until the proxy
/// closes; returns the replies.
fn raw_client(port: u16, input: &[u8]) -> String {
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    client.write_all(input).unwrap();
    let mut out = String::new();
    let _ = client.read_to_string(&mut out);
    out
}

#[test]
fn a_scanners_sloppy_smtp_is_delivered_through_postfix() {
    let s = servers();
    let sender = s.new_user("sloppy-sender");
    let rcpt = s.new_user("sloppy-rcpt");
    let proxy = Proxy::implicit(&sender).arg("--sender-domain", MAIL_DOMAIN_FOR_SCANNERS);
    let (port, log) = proxy.listen();
    // A bare HELO and an unbracketed IP address in EHLO are greeted.
    let out = raw_client(port, b"HELO\r\nEHLO 192.168.1.20\r\nQUIT\r\n");
    assert!(
        out.starts_with(
            "220 proxy.test ESMTP ready\r\n250 proxy.test\r\n250-proxy.test greets 192.168.1.20\r\n"
        ),
        "{out}"
    );
    // No HELO, a sender without a domain, a space after TO:, a 1500-character line, no
    // Date: or Message-ID:, and QUIT pipelined after the final dot.
    let long = "y".repeat(1500);
    let input = format!(
        "MAIL FROM:<scanner>\r\nRCPT TO: <{}>\r\nDATA\r\nSubject: scan\r\n\r\n{long}\r\n.\r\nQUIT\r\n",
        rcpt.email
    );
    let out = raw_client(port, input.as_bytes());
    assert_eq!(
        queued_replies(&out),
        1,
        "{out}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(out.ends_with("221 2.0.0 Bye\r\n"), "{out}");
    wait_for(&rcpt, 1, Duration::from_secs(30));
    let stored = imap_fetch_all(&rcpt);
    let text = String::from_utf8_lossy(&stored[0].1).into_owned();
    assert!(
        text.contains(&format!(
            "Return-Path: <scanner@{MAIL_DOMAIN_FOR_SCANNERS}>"
        )),
        "{text}"
    );
    let message = String::from_utf8_lossy(&without_trace(&stored[0].1)).into_owned();
    assert!(message.starts_with("Subject: scan\r\nDate: "), "{message}");
    assert_eq!(message.matches("\r\nMessage-ID: <").count(), 1, "{message}");
    // The gateway passes the long line on whole; Postfix folds it at 998 characters
    // (smtp_line_length_limit) on its way to the mailbox. No byte is lost.
    assert_eq!(
        message
            .split("\r\n\r\n")
            .nth(1)
            .unwrap()
            .replace("\r\n ", ""),
        format!("{long}\r\n"),
        "{message}"
    );
}

/// The domain `--sender-domain` gives scanners in these tests.
const MAIL_DOMAIN_FOR_SCANNERS: &str = "scanners.test";

#[test]
fn auth_login_with_the_user_name_on_the_auth_line_logs_in_upstream() {
    let s = servers();
    let sender = s.new_user("authlogin-ir");
    let (port, log) = Proxy::passthrough().listen();
    // smtplib sends `AUTH LOGIN <user>` (an initial response) and then the password.
    let out = python(
        &format!(
            r#"
import os, smtplib
s = smtplib.SMTP("127.0.0.1", {port})
s.ehlo("printer")
s.user, s.password = os.environ["LMP_USER"], os.environ["LMP_PASS"]
code, text = s.auth("LOGIN", s.auth_login, initial_response_ok=True)
print(code, text.decode())
s.quit()
"#
        ),
        &[("LMP_USER", &sender.name), ("LMP_PASS", &sender.password)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("235 "),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap()
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("(AUTH LOGIN)"), "{log}");
}

/// A scripted backend offering only AUTH LOGIN, with the account `gw`/`pw`.
fn login_backend() -> FakeSmtp {
    FakeSmtp::start(Script {
        extensions: vec!["AUTH LOGIN".into()],
        // "gw" and "pw", base64-encoded as on the wire.
        account: Some(("Z3c=".into(), "cHc=".into())),
        ..Script::default()
    })
}

/// Bytes `login_backend` sends before each step of the proxy's login: its greeting (16),
/// the reply to EHLO (26), the two AUTH LOGIN challenges (18 each).
const LOGIN_STEPS: [(usize, &str); 4] = [
    (16, "during EHLO"),
    (42, "after AUTH LOGIN"),
    (60, "after the user name"),
    (78, "after the password"),
];

/// The proxy logging in as `gw` to 127.0.0.1:`port` (plain text), with
/// --backend-timeout `timeout`.
fn logging_in_to(port: u16, timeout: &str) -> Proxy {
    Proxy::fake(port)
        .set("--backend-timeout", timeout)
        .arg("--smtp-user", "gw")
        .env("LMP_SMTP_PASSWORD", "pw")
}

/// Sends EHLO and MAIL on the proxy's socket; returns the reply to MAIL, how long it
/// took, and the log once QUIT has ended the session.
fn mail_reply_and_log(proxy: &Proxy) -> (String, Duration, String) {
    let (child, client) = spawn_on_socket(proxy);
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let started = Instant::now();
    (&client)
        .write_all(b"EHLO client.test\r\nMAIL FROM:<a@lan.test>\r\n")
        .unwrap();
    // The EHLO reply ends with its first `250 ` line; the next line answers MAIL.
    while !line.starts_with("250 ") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    line.clear();
    reader.read_line(&mut line).unwrap();
    let reply = line;
    let took = started.elapsed();
    (&client).write_all(b"QUIT\r\n").unwrap();
    let log = wait_exit(child, Duration::from_secs(30), "QUIT after MAIL");
    (reply, took, log)
}

#[test]
fn a_connection_cut_during_the_relays_login_is_an_outage_not_a_wrong_password() {
    let backend = login_backend();
    // The whole login works through the fault proxy when nothing is cut.
    let whole = FaultProxy::start(backend.port, usize::MAX);
    let (reply, _, log) = mail_reply_and_log(&logging_in_to(whole.port(), "30"));
    assert_eq!(reply, "250 2.1.0 Ok\r\n", "{log}");
    for (cut, when) in &LOGIN_STEPS[1..] {
        let fault = FaultProxy::start(backend.port, *cut);
        let (reply, _, log) = mail_reply_and_log(&logging_in_to(fault.port(), "30"));
        assert_eq!(
            reply, "451 4.4.2 Backend unavailable: connection lost; try again later\r\n",
            "cut {when}: {log}"
        );
        assert!(
            log.contains("backend failed at MAIL: backend connection lost:")
                && log.contains("logging in as gw"),
            "cut {when}: {log}"
        );
        assert!(
            !log.contains("--smtp-user") && !log.contains(": ERROR: "),
            "cut {when}: the password is blamed: {log}"
        );
    }
}

#[test]
fn a_backend_that_stalls_during_the_relays_login_holds_the_client_once_the_timeout() {
    let backend = login_backend();
    let timeout = Duration::from_secs(3);
    for (step, (stall, when)) in LOGIN_STEPS.into_iter().enumerate() {
        let fault = FaultProxy::stall(backend.port, b"", stall);
        let (reply, took, log) = mail_reply_and_log(&logging_in_to(fault.port(), "3"));
        eprintln!("stall {when}: the client waited {took:?} for its reply to MAIL");
        // A stall before EHLO is answered is part of the connection step: unavailable.
        let (expected, logged) = match step {
            0 => (
                "451 4.4.1 Backend unavailable; try again later\r\n",
                "backend failed at MAIL: backend unavailable:",
            ),
            _ => (
                "451 4.4.2 Backend unavailable: connection lost; try again later\r\n",
                "backend failed at MAIL: backend connection lost:",
            ),
        };
        assert_eq!(reply, expected, "stall {when}: {log}");
        // The connection is opened when the process starts, a little before the client
        // has its greeting, so the wait it sees may end a little before the timeout.
        assert!(
            took >= timeout - Duration::from_millis(500)
                && took < timeout + Duration::from_millis(1500),
            "stall {when}: the client waited {took:?} with --backend-timeout 3\n{log}"
        );
        assert!(
            log.contains(logged) && !log.contains("--smtp-user"),
            "stall {when}: {log}"
        );
    }
}

/// A client that sends one message and closes the connection right after its final dot,
/// without waiting for the reply; returns the log of its session once it has ended.
fn send_and_leave(port: u16, log: &std::path::Path, from: &str, to: &str, message: &str) -> String {
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    client
        .write_all(
            format!("EHLO device.test\r\nMAIL FROM:<{from}>\r\nRCPT TO:<{to}>\r\nDATA\r\n")
                .as_bytes(),
        )
        .unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("354 ") {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "no 354");
    }
    // Everything sent so far is read, so closing sends a FIN, not a reset: the proxy's
    // socket is in CLOSE-WAIT when the backend answers the final dot.
    client
        .write_all(format!("{message}.\r\n").as_bytes())
        .unwrap();
    drop(reader);
    drop(client);
    let read_log = || std::fs::read_to_string(log).unwrap();
    wait_until(
        "the session's last log line",
        Duration::from_secs(30),
        || read_log().contains("smtp session end:"),
    );
    read_log()
}

#[test]
fn a_client_gone_after_its_final_dot_has_its_message_delivered_and_its_fate_logged() {
    let s = servers();
    let sender = s.new_user("gone-sender");
    let rcpt = s.new_user("gone-rcpt");
    let (port, log) = Proxy::implicit(&sender).listen();
    let message = format!("{}\r\nleft before the reply\r\n", dated("gone"));
    let log = send_and_leave(port, &log, &sender.email, &rcpt.email, &message);
    assert_eq!(String::from_utf8_lossy(&only_message(&rcpt)), message);
    assert!(
        log.contains("gone before the reply to its message: the backend accepted it; the client may not know, and may send it again: 250 2.0.0 Ok: "),
        "{log}"
    );
    // A backend that takes its time and then refuses the message.
    let fake = FakeSmtp::start(Script {
        end_of_data: vec!["554 5.7.1 Message refused".into()],
        end_of_data_delay: Duration::from_millis(500),
        ..Script::default()
    });
    let (port, log) = Proxy::fake(fake.port).listen();
    let log = send_and_leave(port, &log, "a@lan.test", "b@example.test", &message);
    assert!(
        log.contains("gone before the reply to its message: the backend refused it; the client may never learn of it: 554 5.7.1 Message refused"),
        "{log}"
    );
}

/// A TCP relay between the proxy and a backend that counts the proxy's round trips: each
/// time bytes from the backend follow bytes from the proxy, the proxy waited once. The
/// count per message is the difference between sessions with more and fewer messages.
struct CountingRelay {
    port: u16,
    state: std::sync::Arc<Mutex<RelayCount>>,
}

#[derive(Default)]
struct RelayCount {
    /// Whether the last bytes forwarded came from the proxy.
    proxy_spoke_last: bool,
    round_trips: usize,
}

impl CountingRelay {
    fn start(backend_port: u16) -> CountingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(Mutex::new(RelayCount::default()));
        let shared = std::sync::Arc::clone(&state);
        std::thread::spawn(move || {
            for proxy in listener.incoming().flatten() {
                let Ok(backend) = TcpStream::connect(("127.0.0.1", backend_port)) else {
                    continue;
                };
                let _ = (proxy.set_nodelay(true), backend.set_nodelay(true));
                for (from, to, from_proxy) in [
                    (
                        proxy.try_clone().unwrap(),
                        backend.try_clone().unwrap(),
                        true,
                    ),
                    (
                        backend.try_clone().unwrap(),
                        proxy.try_clone().unwrap(),
                        false,
                    ),
                ] {
                    let state = std::sync::Arc::clone(&shared);
                    std::thread::spawn(move || relay_counting(from, to, from_proxy, &state));
                }
            }
        });
        CountingRelay { port, state }
    }

    fn round_trips(&self) -> usize {
        self.state.lock().unwrap().round_trips
    }
}

fn relay_counting(
    mut from: TcpStream,
    mut to: TcpStream,
    from_proxy: bool,
    state: &Mutex<RelayCount>,
) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            // Counted before forwarding: the other side cannot answer bytes it has not had.
            let mut count = state.lock().unwrap();
            if !from_proxy && count.proxy_spoke_last {
                count.round_trips += 1;
            }
            count.proxy_spoke_last = from_proxy;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A message of `size` bytes or a little more whose lines start with dots in every way
/// that matters: `.`, `..`, `.x`, dots at the start of long lines, and a line `.` alone.
fn dotted_message(subject: &str, size: usize) -> Vec<u8> {
    let mut message = format!("{}\r\n", dated(subject)).into_bytes();
    let lines: [&[u8]; 6] = [
        b".\r\n",
        b"..\r\n",
        b".x\r\n",
        b"...three\r\n",
        b"plain line with a . inside\r\n",
        b". space after a dot, and a longer line to vary where lines fall on buffers\r\n",
    ];
    let mut i = 0;
    while message.len() < size {
        message.extend_from_slice(lines[i % lines.len()]);
        i += 1;
    }
    message
}

/// The client's wire form of `message` (dot-stuffed), for DATA to the proxy.
fn stuffed(message: &[u8]) -> Vec<u8> {
    let mut wire = Vec::with_capacity(message.len() + message.len() / 8);
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire
}

/// Sends `messages` from `sender` to `rcpt` in one session through a counting relay to
/// 127.0.0.1:`backend_port` (TLS `tls`, the proxy logging in as `sender`); returns the
/// relay's round trips, the replies and the log.
fn counted_session(
    backend_port: u16,
    tls: &str,
    sender: &User,
    rcpt: &str,
    messages: &[Vec<u8>],
) -> (usize, String, String) {
    let relay = CountingRelay::start(backend_port);
    let mut input = Vec::new();
    for message in messages {
        input.extend(transaction(&sender.email, &[rcpt], &stuffed(message)));
    }
    let (out, log) = Proxy::to(relay.port, tls, sender).session(&wrap_session(&input));
    (relay.round_trips(), out, log)
}

#[test]
fn postfix_gets_each_message_as_one_bdat_in_one_round_trip_or_two_when_checked_at_rcpt() {
    let s = servers();
    let one = postfix_round_trips_per_message(s, "with-message");
    let two = postfix_round_trips_per_message(s, "at-rcpt");
    assert_eq!(
        one, 1.0,
        "MAIL, RCPT and BDAT LAST with the message in one flight"
    );
    assert_eq!(two, 2.0, "MAIL+RCPT in one flight, then BDAT LAST");
}

/// The link round trips per message through `--recipient-check {check}` to Postfix: the
/// difference between sessions of 11 and of 1 message, over 10.
fn postfix_round_trips_per_message(s: &common::Servers, check: &str) -> f64 {
    let mut per_run = Vec::new();
    for n in [1, 11] {
        let sender = s.new_user(&format!("rt{n}-{check}-sender"));
        let rcpt = s.new_user(&format!("rt{n}-{check}-rcpt"));
        let messages: Vec<Vec<u8>> = (0..n)
            .map(|i| dotted_message(&format!("rt{n}-{check}-{i}"), 10_000))
            .collect();
        let relay = CountingRelay::start(postfix().submissions_port);
        let mut input = Vec::new();
        for message in &messages {
            input.extend(transaction(
                &sender.email,
                &[&rcpt.email],
                &stuffed(message),
            ));
        }
        let (out, log) = Proxy::to(relay.port, "implicit", &sender)
            .arg("--recipient-check", check)
            .session(&wrap_session(&input));
        let round_trips = relay.round_trips();
        assert_eq!(queued_replies(&out), n, "{out}\n{log}");
        // Postfix's own count of the session: one EHLO, and BDAT instead of DATA.
        assert_eq!(
            postfix_session_counts(&sender.name),
            format!(
                "ehlo=1 auth=1 mail={n} rcpt={n} bdat={n} quit=1 commands={}",
                3 * n + 3
            )
        );
        wait_for(&rcpt, n, Duration::from_secs(60));
        let mut stored: Vec<Vec<u8>> = imap_fetch_all(&rcpt)
            .into_iter()
            .map(|(_, m)| without_trace(&m))
            .collect();
        let mut sent = messages.clone();
        stored.sort();
        sent.sort();
        assert!(stored == sent, "the stored messages differ from those sent");
        per_run.push(round_trips);
    }
    eprintln!(
        "Postfix (PIPELINING, CHUNKING), --recipient-check {check}: {per_run:?} round trips \
         for 1 and 11 messages"
    );
    (per_run[1] - per_run[0]) as f64 / 10.0
}

#[test]
fn round_trips_per_message_without_pipelining_or_chunking() {
    let message = format!("{}\r\n.\r\nbody\r\n", dated("fake")).into_bytes();
    let mut seen = Vec::new();
    for (extensions, expected) in [
        (vec![], 4.0),
        (vec!["PIPELINING".to_string()], 2.0),
        (vec!["CHUNKING".to_string()], 3.0),
        (vec!["PIPELINING".to_string(), "CHUNKING".to_string()], 1.0),
    ] {
        let fake = FakeSmtp::start(Script {
            extensions: extensions.clone(),
            ..Script::default()
        });
        let mut counts = Vec::new();
        for n in [1, 6] {
            let relay = CountingRelay::start(fake.port);
            let input: Vec<u8> = (0..n)
                .flat_map(|_| transaction("a@lan.test", &["b@example.test"], &stuffed(&message)))
                .collect();
            let (out, log) = Proxy::fake(relay.port).session(&wrap_session(&input));
            assert_eq!(
                out.matches("250 2.0.0 Ok: queued as").count(),
                n,
                "{out}\n{log}"
            );
            counts.push(relay.round_trips());
        }
        let per_message = (counts[1] - counts[0]) as f64 / 5.0;
        seen.push(format!("{extensions:?}: {per_message}"));
        assert_eq!(per_message, expected, "{extensions:?}");
        assert!(fake.journal().messages.iter().all(|m| *m == message));
    }
    eprintln!("round trips per message: {}", seen.join(", "));
}

#[test]
fn leading_dots_arrive_byte_exact_through_bdat_and_through_data() {
    let s = servers();
    for (port, way) in [
        (postfix().submissions_port, "bdat"),
        (postfix().no_chunking_submissions_port, "data"),
    ] {
        let sender = s.new_user(&format!("dots-{way}-sender"));
        let rcpt = s.new_user(&format!("dots-{way}-rcpt"));
        // Over several of the client's 256 KiB pieces, so dots fall on their boundaries.
        let message = dotted_message(&format!("dots-{way}"), 700_000);
        let (_, out, log) = counted_session(
            port,
            "implicit",
            &sender,
            &rcpt.email,
            std::slice::from_ref(&message),
        );
        assert_eq!(queued_replies(&out), 1, "{way}: {out}\n{log}");
        let counts = postfix_session_counts(&sender.name);
        assert!(counts.contains(&format!("{way}=1")), "{way}: {counts}");
        assert!(
            only_message(&rcpt) == message,
            "{way}: the stored message differs"
        );
    }
}

#[test]
fn a_30_mb_message_arrives_byte_exact_through_bdat_and_through_data() {
    let _lock = postfix_config_lock();
    let _limit = SizeLimit::set(40_000_000);
    let s = servers();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz.0123456789abcdefghijklmnopqrstuvwxyz\r\n.";
    for (port, way) in [
        (postfix().submissions_port, "bdat"),
        (postfix().no_chunking_submissions_port, "data"),
    ] {
        let sender = s.new_user(&format!("big30-{way}-sender"));
        let rcpt = s.new_user(&format!("big30-{way}-rcpt"));
        let mut message = format!("{}\r\n", dated(&format!("big30-{way}"))).into_bytes();
        while message.len() < 30_000_000 {
            message.extend_from_slice(line);
        }
        message.extend_from_slice(b"end\r\n");
        let started = Instant::now();
        let (_, out, log) = counted_session(
            port,
            "implicit",
            &sender,
            &rcpt.email,
            std::slice::from_ref(&message),
        );
        eprintln!("30 MB through {way}: {:?}", started.elapsed());
        assert_eq!(queued_replies(&out), 1, "{way}: {out}\n{log}");
        let stored = only_message(&rcpt);
        assert!(
            stored.len() == message.len() && stored == message,
            "{way}: stored {} bytes, sent {}",
            stored.len(),
            message.len()
        );
    }
}
