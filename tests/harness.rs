//! Tests of the test harness itself: the servers it starts behave as the proxy's tests
//! assume, its reference clients see what is really stored, and its checks can fail.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{
    FaultProxy, address_in_use, courier, cyrus, dovecot_pop3_list, dovecot_pop3_uidl, exim,
    imap_fetch_all, imap_fetch_all_at, imap_flags, imap_mailbox_list, postfix, python, python_ok,
    require_client, servers, start_on_free_ports, wait_for_messages,
};

/// Python: log in over implicit TLS, trusting only the CA file given in LMP_TEST_CA.
const IMAPS_LOGIN: &str = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["LMP_TEST_CA"])
m = imaplib.IMAP4_SSL(os.environ["LMP_TEST_HOST"], int(os.environ["LMP_TEST_PORT"]), ssl_context=ctx)
u, p = os.environ["LMP_TEST_USER"], os.environ["LMP_TEST_PASS"]
typ, _ = m.authenticate("PLAIN", lambda _: ("\0%s\0%s" % (u, p)).encode())
print(typ, m.sock.version())
m.logout()
"#;

fn imaps_login(host: &str, port: u16, ca: &std::path::Path, user: &common::User) -> Output {
    python(
        IMAPS_LOGIN,
        &[
            ("LMP_TEST_CA", ca.to_str().unwrap()),
            ("LMP_TEST_HOST", host),
            ("LMP_TEST_PORT", &port.to_string()),
            ("LMP_TEST_USER", &user.name),
            ("LMP_TEST_PASS", &user.password),
        ],
    )
}

#[test]
fn dovecot_imaps_login_verifies_with_our_ca_only() {
    let s = servers();
    let user = s.new_user("imaps");
    for host in [s.tls_host, s.host] {
        let out = imaps_login(host, s.imaps_port, &s.ca_file, &user);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.starts_with("OK TLSv1."),
            "IMAPS to {host}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The same server must be refused by a client that trusts only the other CA.
    let out = imaps_login(s.host, s.imaps_port, &s.untrusted_ca_file, &user);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CERTIFICATE_VERIFY_FAILED"));
}

#[test]
fn dovecot_starttls_then_login() {
    let s = servers();
    let user = s.new_user("starttls");
    let out = python_ok(
        r#"
import imaplib, os, ssl
m = imaplib.IMAP4(os.environ["LMP_HOST"], int(os.environ["LMP_IMAP_PORT"]))
assert "STARTTLS" in m.capabilities, m.capabilities
m.starttls(ssl_context=ssl.create_default_context(cafile=os.environ["LMP_CA_FILE"]))
u, p = os.environ["LMP_TEST_USER"], os.environ["LMP_TEST_PASS"]
print(m.login(u, p)[0], m.sock.version())
"#,
        &[
            ("LMP_TEST_USER", &user.name),
            ("LMP_TEST_PASS", &user.password),
        ],
    );
    assert!(String::from_utf8_lossy(&out).starts_with("OK TLSv1."));
}

#[test]
fn untrusted_endpoints_fail_verification_with_our_ca() {
    let s = servers();
    let user = s.new_user("untrusted");
    let out = imaps_login(s.untrusted_host, s.untrusted_imaps_port, &s.ca_file, &user);
    assert!(!out.status.success(), "untrusted IMAPS was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CERTIFICATE_VERIFY_FAILED"), "{err}");
    // It is a working server: with its own CA the login succeeds.
    let out = imaps_login(
        s.untrusted_host,
        s.untrusted_imaps_port,
        &s.untrusted_ca_file,
        &user,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // STARTTLS on the untrusted plain port: LOGINDISABLED before TLS, then refused.
    let out = python(
        r#"
import imaplib, os, ssl
m = imaplib.IMAP4(os.environ["LMP_UNTRUSTED_HOST"], int(os.environ["LMP_UNTRUSTED_IMAP_PORT"]))
print(" ".join(m.capabilities))
m.starttls(ssl_context=ssl.create_default_context(cafile=os.environ["LMP_CA_FILE"]))
"#,
        &[],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("LOGINDISABLED"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CERTIFICATE_VERIFY_FAILED"));
}

#[test]
fn seeded_messages_are_served_byte_exact_with_dovecot_uidls() {
    let s = servers();
    let user = s.new_user("seed");
    let long_line = "x".repeat(5000);
    let messages: Vec<Vec<u8>> = vec![
        b"Subject: one\r\n\r\nCRLF body\r\n.leading dot\r\n".to_vec(),
        b"Subject: two\n\nLF body\n".to_vec(),
        format!("Subject: three\r\n\r\n{long_line}\r\n").into_bytes(),
    ];
    user.seed_many(&messages);
    let fetched = imap_fetch_all(&user);
    let expected: Vec<(u32, Vec<u8>)> = vec![
        (1, messages[0].clone()),
        (2, b"Subject: two\r\n\r\nLF body\r\n".to_vec()),
        (3, messages[2].clone()),
    ];
    assert_eq!(fetched, expected);

    let uidls = dovecot_pop3_uidl(&user);
    assert_eq!(uidls.len(), 3);
    for (i, uidl) in uidls.iter().enumerate() {
        // %08Xu%08Xv: the UID, then UIDVALIDITY, each as 8 hex digits. Despite the
        // upper-case X, Dovecot 2.3 writes lower-case hex digits.
        assert_eq!(uidl.len(), 16, "{uidl}");
        assert!(
            uidl.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
            "{uidl}"
        );
        assert_eq!(&uidl[..8], format!("{:08x}", i + 1));
        assert_eq!(uidl[8..], uidls[0][8..], "one UIDVALIDITY");
    }
    let sizes: Vec<u64> = expected.iter().map(|(_, m)| m.len() as u64).collect();
    assert_eq!(dovecot_pop3_list(&user), sizes);
}

#[test]
fn seeding_ten_thousand_messages_is_fast_and_ordered() {
    let s = servers();
    let user = s.new_user("bulk");
    let messages: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("Subject: bulk {i}\r\n\r\nmessage {i}\r\n").into_bytes())
        .collect();
    let t = Instant::now();
    user.seed_many(&messages);
    let seeding = t.elapsed();
    assert!(
        seeding < Duration::from_secs(20),
        "seeding took {seeding:?}"
    );
    let uidls = dovecot_pop3_uidl(&user);
    assert_eq!(uidls.len(), 10_000);
    assert_eq!(&uidls[9_999][..8], "00002710");
    assert_eq!(&uidls[0xabc][..8], "00000abd");
    let fetched = imap_fetch_all(&user);
    assert_eq!(fetched.len(), 10_000);
    for (i, (uid, body)) in fetched.iter().enumerate() {
        assert_eq!(*uid as usize, i + 1);
        assert_eq!(body, &messages[i]);
    }
}

#[test]
fn accounts_are_isolated_and_flags_and_mailboxes_are_visible() {
    let s = servers();
    let a = s.new_user("iso");
    let b = s.new_user("iso");
    assert_ne!(a.name, b.name);
    a.seed(b"Subject: new\r\n\r\nx\r\n");
    a.seed_with_flags(b"Subject: seen\r\n\r\ny\r\n", "SF");
    a.resync();
    assert_eq!(imap_fetch_all(&a).len(), 2);
    assert!(imap_fetch_all(&b).is_empty());
    assert!(dovecot_pop3_uidl(&b).is_empty());
    let flags = imap_flags(&a);
    assert_eq!(flags.len(), 2);
    assert!(flags[0].1.is_empty(), "{flags:?}");
    let mut seen = flags[1].1.clone();
    seen.sort();
    assert_eq!(seen, ["\\Flagged", "\\Seen"]);
    assert_eq!(imap_mailbox_list(&a), ["INBOX"]);
    let out = s.doveadm(&["mailbox", "create", "-u", &a.name, "Archive"]);
    assert!(out.status.success(), "{out:?}");
    let mut boxes = imap_mailbox_list(&a);
    boxes.sort();
    assert_eq!(boxes, ["Archive", "INBOX"]);
}

#[test]
fn passwords_with_special_characters_work_and_wrong_ones_fail() {
    let s = servers();
    let password = "pä ss \"quoted\" back\\slash 'ü' {x}";
    let user = s.new_user_with_password("special", password);
    user.seed_many(&[b"Subject: hi\r\n\r\nhi\r\n"]);
    assert_eq!(dovecot_pop3_uidl(&user).len(), 1); // POP3 USER/PASS
    assert_eq!(imap_fetch_all(&user).len(), 1); // IMAP AUTHENTICATE PLAIN
    let mut wrong = user.clone();
    wrong.password = "pä ss \"quoted\" back\\slash 'ü' {y}".into();
    let out = imaps_login(s.host, s.imaps_port, &s.ca_file, &wrong);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("AUTHENTICATIONFAILED"));
}

#[test]
fn lmtp_delivery_adds_trace_headers() {
    let s = servers();
    let user = s.new_user("lmtp");
    user.deliver_lmtp(b"Subject: via lmtp\n\n.dot line\nend\n");
    let fetched = imap_fetch_all(&user);
    assert_eq!(fetched.len(), 1);
    let text = String::from_utf8_lossy(&fetched[0].1);
    assert!(
        text.starts_with("Return-Path: <sender@example.org>\r\n"),
        "{text}"
    );
    assert!(text.contains(&format!("Delivered-To: {}\r\n", user.email)));
    assert!(
        text.ends_with("Subject: via lmtp\r\n\r\n.dot line\r\nend\r\n"),
        "{text}"
    );
}

fn swaks(port: u16, implicit_tls: bool, args: &[&str]) -> (bool, String) {
    let swaks = require_client("swaks");
    let s = servers();
    let out = Command::new(swaks)
        .args(["--server", &format!("127.0.0.1:{port}")])
        .arg(if implicit_tls { "--tlsc" } else { "--tls" })
        .args(["--tls-verify", "--tls-ca-path"])
        .arg(&s.ca_file)
        .args(["--tls-sni", "localhost", "--timeout", "30"])
        .args(args)
        .output()
        .expect("run swaks");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// swaks logging in as `user` with `password` and `mechanism`, sending from `user` to `to`.
fn swaks_as(
    (port, implicit_tls): (u16, bool),
    mechanism: &str,
    user: &common::User,
    password: &str,
    to: &str,
    extra: &[&str],
) -> (bool, String) {
    let mut args = vec![
        "--auth",
        mechanism,
        "--auth-user",
        &user.name,
        "--auth-password",
        password,
        "--from",
        &user.email,
        "--to",
        to,
    ];
    args.extend_from_slice(extra);
    swaks(port, implicit_tls, &args)
}

#[test]
fn postfix_submission_on_both_ports_delivers_into_dovecot() {
    let p = postfix();
    let s = servers();
    let sender = s.new_user_with_password("sender", "sënder pass \"\\");
    let rcpt = s.new_user("rcpt");
    for (port, implicit) in [(p.submissions_port, true), (p.submission_port, false)] {
        let subject = format!("port {port}");
        let (ok, out) = swaks(
            port,
            implicit,
            &[
                "--auth",
                "PLAIN",
                "--auth-user",
                &sender.name,
                "--auth-password",
                &sender.password,
                "--from",
                &sender.email,
                "--to",
                &rcpt.email,
                "--header",
                &format!("Subject: {subject}"),
            ],
        );
        assert!(
            ok && out.contains("250 2.0.0 Ok: queued"),
            "{out}\n{}",
            p.logs()
        );
    }
    wait_for_messages(&rcpt, 2);
    let fetched = imap_fetch_all(&rcpt);
    assert_eq!(fetched.len(), 2);
    for (port, (_, m)) in [p.submissions_port, p.submission_port].iter().zip(&fetched) {
        let text = String::from_utf8_lossy(m);
        assert!(
            text.contains(&format!("Subject: port {port}\r\n")),
            "{text}"
        );
        assert!(text.contains(&format!("Delivered-To: {}", rcpt.email)));
    }
}

#[test]
fn postfix_rejects_unknown_recipients_with_550_5_1_1() {
    let p = postfix();
    let user = servers().new_user("unknown");
    let (ok, out) = swaks_as(
        (p.submission_port, false),
        "PLAIN",
        &user,
        &user.password,
        "nobody-here@example.test",
        &[],
    );
    assert!(!ok);
    assert!(
        out.contains("550 5.1.1 <nobody-here@example.test>"),
        "{out}"
    );
}

#[test]
fn postfix_rejects_unauthenticated_relay_and_wrong_certificates() {
    let p = postfix();
    let user = servers().new_user("noauth");
    for to in [user.email.as_str(), "someone@elsewhere.invalid"] {
        let (ok, out) = swaks(
            p.submissions_port,
            true,
            &["--from", "x@elsewhere.invalid", "--to", to],
        );
        assert!(!ok);
        assert!(out.contains("554 5.7.1"), "{out}");
    }
    assert_eq!(user.maildir_count(), 0);
    for (port, implicit) in [
        (p.untrusted_submissions_port, true),
        (p.untrusted_submission_port, false),
    ] {
        let (ok, out) = swaks(
            port,
            implicit,
            &["--to", &user.email, "--quit-after", "EHLO"],
        );
        assert!(!ok, "untrusted port {port} was accepted: {out}");
        assert!(out.contains("certificate verify failed"), "{out}");
    }
}

/// Exim (the second submission server, unpacked rather than installed) takes AUTH PLAIN and
/// LOGIN through Dovecot on both ports, including a non-ASCII password, and delivers into
/// the same Dovecot Maildirs.
#[test]
fn exim_submission_on_both_ports_delivers_into_dovecot() {
    let started = Instant::now();
    let e = exim();
    eprintln!("Exim answered after {:?}", started.elapsed());
    let s = servers();
    let sender = s.new_user_with_password("exim-sender", "sënder pass \"\\");
    let rcpt = s.new_user("exim-rcpt");
    let ports = [
        (e.submissions_port, true, "PLAIN"),
        (e.submission_port, false, "LOGIN"),
    ];
    for (port, implicit, mechanism) in ports {
        let subject = format!("Subject: exim port {port}");
        let (ok, out) = swaks_as(
            (port, implicit),
            mechanism,
            &sender,
            &sender.password,
            &rcpt.email,
            &["--header", &subject],
        );
        assert!(ok && out.contains("<~  250 OK id="), "{out}\n{}", e.logs());
        assert!(out.contains("ESMTP legacy-mail-proxy test Exim"), "{out}");
    }
    wait_for_messages(&rcpt, 2);
    let fetched = imap_fetch_all(&rcpt);
    assert_eq!(fetched.len(), 2);
    for (port, (_, m)) in [e.submissions_port, e.submission_port].iter().zip(&fetched) {
        let text = String::from_utf8_lossy(m);
        assert!(
            text.contains(&format!("Subject: exim port {port}\r\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("Delivered-To: {}", rcpt.email)),
            "{text}"
        );
        assert!(
            text.contains("with esmtpsa"),
            "Exim's Received field: {text}"
        );
    }
}

/// Exim refuses what Postfix refuses: a wrong password (535), an unknown recipient (550),
/// mail without AUTH (550 relay) and MAIL before STARTTLS on the submission port.
#[test]
fn exim_refuses_wrong_passwords_unknown_recipients_and_unauthenticated_mail() {
    let e = exim();
    let user = servers().new_user("exim-refuse");
    let auth = |password: &str, to: &str| {
        swaks_as(
            (e.submission_port, false),
            "PLAIN",
            &user,
            password,
            to,
            &[],
        )
    };
    let (ok, out) = auth("not the password", &user.email);
    assert!(
        !ok && out.contains("535 Incorrect authentication data"),
        "{out}"
    );
    let (ok, out) = auth(&user.password, "nobody-here@example.test");
    assert!(!ok && out.contains("550 Unrouteable address"), "{out}");
    let (ok, out) = swaks(
        e.submissions_port,
        true,
        &["--from", "x@elsewhere.invalid", "--to", &user.email],
    );
    assert!(
        !ok && out.contains("550 5.7.1 Relay access denied"),
        "{out}"
    );
    let mut plain = TcpStream::connect((e.host, e.submission_port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"EHLO t\r\nMAIL FROM:<x@example.test>\r\nQUIT\r\n")
        .unwrap();
    let mut text = String::new();
    plain.read_to_string(&mut text).unwrap();
    assert!(!text.contains("AUTH"), "AUTH offered without TLS: {text}");
    assert!(
        text.contains("5.7.0 Must issue a STARTTLS command first"),
        "{text}"
    );
    assert_eq!(user.maildir_count(), 0);
}

/// Seeds `user` with two messages (a dot line, an 8-bit byte) and reads them back over
/// IMAP on `port`: they must be stored as sent.
fn seeds_byte_exact(
    user: &common::User,
    port: u16,
    seed: impl Fn(&common::User, &[Vec<u8>]),
    logs: impl Fn() -> String,
) {
    let messages = vec![
        b"Subject: one\r\n\r\nfirst\r\n".to_vec(),
        b"Subject: two\r\n\r\n.\r\n8-bit \xe9\r\n".to_vec(),
    ];
    seed(user, &messages);
    let fetched = imap_fetch_all_at(user, port, "INBOX");
    let bodies: Vec<Vec<u8>> = fetched.into_iter().map(|(_, m)| m).collect();
    assert_eq!(bodies, messages, "{}", logs());
}

/// Cyrus IMAP (unpacked rather than installed) knows a harness user with the same
/// password, keeps APPENDed messages byte for byte, refuses a wrong password, and speaks
/// implicit TLS with the harness CA.
#[test]
fn cyrus_serves_appended_messages_byte_exact_and_refuses_wrong_passwords() {
    let started = Instant::now();
    let c = cyrus();
    eprintln!("Cyrus answered after {:?}", started.elapsed());
    let user = servers().new_user("cyrus");
    seeds_byte_exact(&user, c.imap_port, |u, m| c.seed(u, m), || c.logs());
    let out = imaps_login(c.host, c.imaps_port, &servers().ca_file, &user);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut wrong = user.clone();
    wrong.password = "not the password".into();
    let out = imaps_login(c.host, c.imaps_port, &servers().ca_file, &wrong);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("authentication failure"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Courier IMAP (unpacked, in its own mount namespace) knows a harness user with the same
/// password, keeps APPENDed messages byte for byte and refuses a wrong password; its
/// namespace's bind mounts are invisible here.
#[test]
fn courier_serves_appended_messages_byte_exact_and_refuses_wrong_passwords() {
    let started = Instant::now();
    let c = courier();
    eprintln!("Courier answered after {:?}", started.elapsed());
    let user = servers().new_user("courier");
    seeds_byte_exact(&user, c.imap_port, |u, m| c.seed(u, m), || c.logs());
    let login = |password: &str| {
        python(
            "import imaplib, os\n\
             m = imaplib.IMAP4('127.0.0.1', int(os.environ['PORT']))\n\
             print(m.login(os.environ['U'], os.environ['P'])[0])",
            &[
                ("PORT", &c.imap_port.to_string()),
                ("U", &user.name),
                ("P", password),
            ],
        )
    };
    let ok = login(&user.password);
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "OK");
    let bad = login("not the password");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("Login failed."));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("/etc/courier"), "{mounts}");
    assert!(!mounts.contains(" /etc/passwd "), "{mounts}");
}

/// Courier's STARTTLS on the plain port completes with a client that is not ours (Python's
/// imaplib, trusting only the harness CA), and LOGIN then works over TLS. This is the
/// harness set-up check: it failed with "wrong version number" while the user `courier`,
/// which imaplogin drops to before it runs couriertls, was missing.
#[test]
fn courier_starttls_completes_with_a_standard_client() {
    let c = courier();
    let user = servers().new_user("courier-starttls");
    c.account(&user);
    let out = python(
        "import imaplib, os, ssl\n\
         ctx = ssl.create_default_context(cafile=os.environ['CA'])\n\
         m = imaplib.IMAP4('localhost', int(os.environ['PORT']))\n\
         print(m.starttls(ssl_context=ctx)[0], m.sock.version())\n\
         print(m.login(os.environ['U'], os.environ['P'])[0])\n\
         m.logout()",
        &[
            ("CA", servers().tls.ca_cert.to_str().unwrap()),
            ("PORT", &c.imap_port.to_string()),
            ("U", &user.name),
            ("P", &user.password),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("OK TLSv1.") && stdout.ends_with("\nOK\n"),
        "stdout: {stdout}\nstderr: {}\nCourier logs: {}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
}

#[test]
fn fault_proxy_cuts_after_the_given_number_of_server_bytes() {
    let s = servers();
    let read_all = |port: u16| {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.ends_with(b"\r\n") && got.len() > 10 {
                        let _ = c.write_all(b"a LOGOUT\r\n");
                    }
                }
                Err(e) => panic!("read: {e} after {got:?}"),
            }
        }
        got
    };
    let cut = FaultProxy::start(s.imap_port, 10);
    assert_eq!(read_all(cut.port()), b"* OK [CAPA");
    let through = FaultProxy::start(s.imap_port, usize::MAX);
    let all = read_all(through.port());
    assert!(all.starts_with(b"* OK [CAPABILITY"), "{all:?}");
    assert!(all.ends_with(b"a OK Logout completed.\r\n"), "{all:?}");
    assert_eq!((cut.connections(), through.connections()), (1, 1));
}

/// Binds `port` as a server would, after "another process" (this test) took it first.
fn bind_taken_port(port: u16) -> Result<TcpListener, String> {
    let _thief = TcpListener::bind(("127.0.0.1", port)).map_err(|e| format!("thief: {e}"))?;
    TcpListener::bind(("127.0.0.1", port)).map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))
}

#[test]
fn a_port_taken_before_the_server_binds_it_is_retried_with_new_ports() {
    let mut tried = Vec::new();
    let listeners = start_on_free_ports(2, address_in_use, |ports| {
        tried.push(ports.to_vec());
        if tried.len() == 1 {
            bind_taken_port(ports[1])?;
        }
        ports
            .iter()
            .map(|&p| TcpListener::bind(("127.0.0.1", p)).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap();
    assert_eq!(tried.len(), 2, "{tried:?}");
    assert_eq!(tried[1].len(), 2);
    assert_ne!(tried[0][1], tried[1][1], "the retry must pick new ports");
    assert_eq!(listeners[1].local_addr().unwrap().port(), tried[1][1]);
}

#[test]
fn port_clashes_are_tried_three_times_and_other_failures_once() {
    let mut attempts = 0;
    let err = start_on_free_ports(1, address_in_use, |ports| {
        attempts += 1;
        bind_taken_port(ports[0])
    })
    .unwrap_err();
    assert_eq!(attempts, 3);
    assert!(address_in_use(&err), "{err}");

    attempts = 0;
    let err = start_on_free_ports(1, address_in_use, |_| -> Result<(), String> {
        attempts += 1;
        Err("dovecot: not installed".to_string())
    })
    .unwrap_err();
    assert_eq!((attempts, err.as_str()), (1, "dovecot: not installed"));
}

#[test]
fn missing_client_panics_with_install_command() {
    let err = std::panic::catch_unwind(|| require_client("no-such-mail-client")).unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(
        msg.contains("apt-get install -y --no-install-recommends"),
        "{msg}"
    );
    assert!(msg.contains("./tests/run-all"), "{msg}");
}

/// Run in a child process by `servers_die_with_the_test_process`.
#[test]
#[ignore = "helper: run by servers_die_with_the_test_process in a child process"]
fn child_starts_servers_and_exits() {
    let s = servers();
    let p = postfix();
    println!(
        "LMP-CHILD {} {} {}",
        s.dir.display(),
        s.dovecot_pid(),
        p.master_pid()
    );
}

#[test]
fn servers_die_with_the_test_process() {
    let line = common::run_child_test("child_starts_servers_and_exits");
    let f: Vec<&str> = line.split(' ').collect();
    let (dir, pgids) = (std::path::Path::new(f[0]), [f[1], f[2]]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive: Vec<u32> = pgids
            .iter()
            .flat_map(|g| common::live_process_group_members(g.parse().unwrap()))
            .collect();
        if alive.is_empty() && !dir.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the child exited: live server processes {alive:?}, dir exists: {}",
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// tests/sweep-secrets (run by tests/run-all after the suite) finds a token, a client
/// secret or a password in any log, names the file and line but never the secret, and
/// fails when there is nothing to check.
#[test]
fn the_secret_sweep_finds_a_secret_in_a_log_and_fails_on_nothing() {
    let top = servers().dir.join(format!("sweep-{}", std::process::id()));
    let run = top.join("lmp-test.1.abc");
    for dir in ["oauth2/secrets", "passwd", "log", "inetd/1-0"] {
        std::fs::create_dir_all(run.join(dir)).unwrap();
    }
    let token = "Zm9vYmFyYmF6cXV4LXRva2VuLXZhbHVlLTEyMzQ1Ng";
    let write = |path: &str, text: &str| std::fs::write(run.join(path), text).unwrap();
    let sweep = || {
        Command::new(require_client("python3"))
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sweep-secrets"))
            .arg(&top)
            .output()
            .unwrap()
    };
    let text = |out: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    write("oauth2/secrets/issued-tokens", &format!("{token}\n"));
    write(
        "oauth2/secrets/lmp-confidential",
        "c0ffee0123456789abcdef\n",
    );
    write("passwd/alice-1", "alice-1:{PLAIN}pw0123456789a::::::\n");
    write("log/dovecot.log", "imap-login: Login: user=<alice-1>\n");
    write("inetd/1-0/0.log", "INFO: pop3 session end\n");
    let out = sweep();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("no secret in any log"),
        "{}",
        text(&out)
    );

    for (line, secret, kind) in [
        (format!("Bearer {token}"), token, "issued token"),
        (format!("auth=x{token}y"), token, "issued token"),
        (
            "secret=c0ffee0123456789abcdef".to_string(),
            "c0ffee0123456789abcdef",
            "client secret",
        ),
        (
            "pass pw0123456789a".to_string(),
            "pw0123456789a",
            "password of alice-1",
        ),
    ] {
        write("inetd/1-0/0.log", &format!("INFO: one\nDEBUG: {line}\n"));
        let out = sweep();
        let shown = text(&out);
        assert!(!out.status.success(), "{shown}");
        assert!(
            shown.contains("lmp-test.1.abc/inetd/1-0/0.log:2: ") && shown.contains(kind),
            "{shown}"
        );
        assert!(
            !shown.contains(secret),
            "the sweep printed the secret: {shown}"
        );
    }
    std::fs::remove_dir_all(&run).unwrap();
    let out = sweep();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to check"), "{}", text(&out));
}
