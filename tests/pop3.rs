//! `legacy-mail-proxy pop3` against a real Dovecot, driven by real POP3 clients.
//!
//! Every check compares what the proxy serves with what Dovecot really holds, read by an
//! independent client (Python imaplib, or Dovecot's own POP3 server for UIDLs).

mod common;

use common::{Inetd, User, corpus, normalized, responses, servers};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

/// How the proxy reaches Dovecot in a test.
#[derive(Clone, Copy, Debug)]
enum Tls {
    Implicit,
    Starttls,
    Plain,
}

/// Proxy options for the test Dovecot: the lock directory is private to the test process,
/// failed logins are answered at once, and logs go to stderr (never stdout).
fn args(tls: Tls) -> Vec<String> {
    let s = servers();
    let (port, mode) = match tls {
        Tls::Implicit => (s.imaps_port, "implicit"),
        Tls::Starttls => (s.imap_port, "starttls"),
        Tls::Plain => (s.imap_port, "none"),
    };
    common::pop3_proxy_args(port, mode, &s.dir.join("pop3-locks"))
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Gives the option `name`, already in `args`, a new value.
fn set_option(args: &mut [String], name: &str, value: impl ToString) {
    let at = args.iter().position(|a| a == name).unwrap();
    args[at + 1] = value.to_string();
}

/// Runs one proxy process with `input` on stdin; returns (stdout, stderr, success).
fn dialogue(args: &[String], envs: &[(&str, &str)], input: &[u8]) -> (Vec<u8>, String, bool) {
    let out = common::run_proxy(args, envs, input);
    (
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

fn login(user: &User) -> String {
    format!("USER {}\r\nPASS {}\r\n", user.name, user.password)
}

/// A proxy process with a client logged in, kept open while the test does other things.
struct Live {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Live {
    /// Starts the proxy with `args` and logs `user` in; panics unless that works.
    fn login(args: &[String], user: &User) -> Live {
        let mut child = Command::new(common::proxy_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn proxy");
        let mut live = Live {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        };
        live.send(login(user).as_bytes());
        let replies: Vec<String> = (0..3).map(|_| live.line()).collect();
        assert_eq!(replies[2], "+OK Logged in.\r\n", "{replies:?}");
        live
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stdin.as_mut().unwrap().write_all(bytes).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line
    }

    /// Closes stdin and returns the rest of stdout, stderr, and whether it exited 0.
    fn finish(mut self) -> (String, String, bool) {
        drop(self.stdin.take());
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        let mut log = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        (rest, log, self.child.wait().unwrap().success())
    }
}

/// The reply to PASS in a transcript that starts with USER and PASS.
fn login_reply(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .lines()
        .nth(2)
        .unwrap_or("")
        .to_string()
}

fn seeded_user(prefix: &str) -> User {
    let user = servers().new_user(prefix);
    user.seed_many(&corpus());
    user
}

/// RETR over each TLS mode: every message byte-identical to Dovecot's BODY[] after CRLF
/// normalisation, LIST/STAT sizes equal to the octets sent, UIDLs equal to Dovecot's.
fn retrieve_all_and_compare(tls: Tls) {
    let user = seeded_user(&format!("retr-{tls:?}"));
    let reference = common::imap_fetch_all(&user);
    assert_eq!(reference.len(), 8);
    let n = reference.len();
    let mut input = login(&user);
    input.push_str("STAT\r\nLIST\r\nUIDL\r\n");
    for i in 1..=n {
        input.push_str(&format!("RETR {i}\r\n"));
    }
    input.push_str("QUIT\r\n");
    let (out, log, ok) = dialogue(&args(tls), &[], input.as_bytes());
    assert!(ok, "proxy failed:\n{log}");
    let mut shape = vec![false, false, false, false, true, true];
    shape.extend(std::iter::repeat_n(true, n));
    shape.push(false);
    let replies = responses(&out, &shape);
    assert_eq!(replies[2].0, "+OK Logged in.", "{log}");
    let total: usize = reference.iter().map(|(_, m)| m.len()).sum();
    assert_eq!(replies[3].0, format!("+OK {n} {total}"));
    let list: Vec<String> = (1..=n)
        .map(|i| format!("{i} {}\r\n", reference[i - 1].1.len()))
        .collect();
    assert_eq!(String::from_utf8_lossy(&replies[4].1), list.concat());
    let dovecot_sizes = common::dovecot_pop3_list(&user);
    let ours: Vec<u64> = reference.iter().map(|(_, m)| m.len() as u64).collect();
    assert_eq!(ours, dovecot_sizes, "sizes differ from Dovecot's own POP3");
    let uidls: Vec<String> = String::from_utf8_lossy(&replies[5].1)
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect();
    assert_eq!(
        uidls,
        common::dovecot_pop3_uidl(&user),
        "UIDLs differ from Dovecot's own POP3"
    );
    for (i, (_, raw)) in reference.iter().enumerate() {
        let (status, body) = &replies[6 + i];
        assert_eq!(status, &format!("+OK {} octets", raw.len()));
        assert!(
            body == &normalized(raw),
            "message {} differs from BODY[]",
            i + 1
        );
    }
    assert_eq!(replies[6 + n].0, "+OK Bye.");
    assert!(
        log.contains(&format!(
            "user={} listed={n} retrieved={n} deleted=0",
            user.name
        )),
        "{log}"
    );
    assert!(!log.contains(&user.password), "password in the log:\n{log}");
    // Downloads must not set \Seen.
    for (uid, flags) in common::imap_flags(&user) {
        assert!(
            !flags.contains(&"\\Seen".to_string()),
            "uid {uid} got \\Seen: {flags:?}"
        );
    }
}

#[test]
fn retr_matches_the_server_over_implicit_tls() {
    retrieve_all_and_compare(Tls::Implicit);
}

#[test]
fn retr_matches_the_server_over_starttls() {
    retrieve_all_and_compare(Tls::Starttls);
}

#[test]
fn retr_matches_the_server_over_plain_imap() {
    retrieve_all_and_compare(Tls::Plain);
}

#[test]
fn top_sends_headers_blank_line_and_n_body_lines() {
    let user = seeded_user("top");
    let input = format!(
        "{}TOP 3 0\r\nTOP 3 2\r\nTOP 4 999\r\nTOP 8 0\r\nTOP 7 5\r\nQUIT\r\n",
        login(&user)
    );
    let (out, log, _) = dialogue(&args(Tls::Plain), &[], input.as_bytes());
    let r = responses(
        &out,
        &[false, false, false, true, true, true, true, true, false],
    );
    let r = &r[1..];
    assert_eq!(r[2].1, b"Subject: dots\r\n\r\n");
    assert_eq!(r[3].1, b"Subject: dots\r\n\r\n.\r\n..\r\n");
    assert_eq!(r[4].1, normalized(&corpus()[3]), "{log}");
    assert_eq!(
        r[5].1,
        b"Subject: no separator\r\nX-Header: and no body at all\r\n"
    );
    assert_eq!(r[6].1, b"Subject: empty body\r\n\r\n");
}

#[test]
fn uidls_are_stable_across_sessions_and_new_mail_stays_invisible() {
    let user = seeded_user("uidl");
    let input = format!("{}UIDL\r\nQUIT\r\n", login(&user));
    let (first, ..) = dialogue(&args(Tls::Implicit), &[], input.as_bytes());
    // A session holds a snapshot: mail arriving during it stays invisible.
    let mut live = Live::login(&args(Tls::Plain), &user);
    user.seed(b"Subject: arrived during the session\r\n\r\nhi\r\n");
    user.resync();
    live.send(b"STAT\r\nQUIT\r\n");
    let stat = live.line();
    assert!(stat.starts_with("+OK 8 "), "{stat}");
    live.finish();
    let (second, ..) = dialogue(&args(Tls::Starttls), &[], input.as_bytes());
    let first = responses(&first, &[false, false, false, true, false]);
    let second = responses(&second, &[false, false, false, true, false]);
    assert!(
        String::from_utf8_lossy(&second[3].1).starts_with(&*String::from_utf8_lossy(&first[3].1))
    );
    assert_eq!(
        second[3].1.split(|&b| b == b'\n').count(),
        first[3].1.split(|&b| b == b'\n').count() + 1
    );
    let dovecot = common::dovecot_pop3_uidl(&user);
    assert_eq!(dovecot.len(), 9);
    assert!(
        String::from_utf8_lossy(&second[3].1).contains(&format!("9 {}\r\n", dovecot[8])),
        "{:?} vs {dovecot:?}",
        String::from_utf8_lossy(&second[3].1)
    );
}

/// What Dovecot held, as (UID, message bytes).
type Mailbox = Vec<(u32, Vec<u8>)>;

/// DELE 1 and 3, QUIT, under a policy; returns the user, the UIDs that were deleted, and
/// the mailbox before.
fn delete_with_policy(policy: &str) -> (User, Vec<u32>, Mailbox) {
    let user = servers().new_user(&format!("dele-{policy}"));
    user.seed_many(&[
        b"Subject: m1\r\n\r\none\r\n".to_vec(),
        b"Subject: m2\r\n\r\ntwo\r\n".to_vec(),
        b"Subject: m3\r\n\r\nthree\r\n".to_vec(),
    ]);
    // Another IMAP client's message flagged \Deleted but not yet expunged: a plain
    // EXPUNGE would destroy it.
    user.seed_with_flags(b"Subject: someone else's\r\n\r\nkeep me\r\n", "T");
    user.resync();
    let before = common::imap_fetch_all(&user);
    let input = format!("{}DELE 1\r\nDELE 3\r\nQUIT\r\n", login(&user));
    let (out, log, ok) = dialogue(
        &with(args(Tls::Plain), &["--delete-policy", policy]),
        &[],
        input.as_bytes(),
    );
    let out = String::from_utf8_lossy(&out);
    assert!(ok, "{out}\n{log}");
    let bye = if policy == "keep" {
        "+OK Bye, 2 messages kept on the server (delete policy keep).\r\n"
    } else {
        "+OK Bye, 2 messages deleted.\r\n"
    };
    assert!(out.ends_with(bye), "{out}\n{log}");
    (user, vec![before[0].0, before[2].0], before)
}

fn stat_through_proxy(user: &User, policy: &str) -> String {
    let input = format!("{}STAT\r\nQUIT\r\n", login(user));
    let (out, ..) = dialogue(
        &with(args(Tls::Plain), &["--delete-policy", policy]),
        &[],
        input.as_bytes(),
    );
    String::from_utf8_lossy(&out)
        .lines()
        .nth(3)
        .unwrap()
        .to_string()
}

#[test]
fn delete_policy_keep_leaves_the_server_untouched() {
    let (user, _, before) = delete_with_policy("keep");
    assert_eq!(common::imap_fetch_all(&user), before);
    for (_, flags) in common::imap_flags(&user) {
        assert!(!flags.iter().any(|f| f == "$POP3Deleted"), "{flags:?}");
    }
    assert!(stat_through_proxy(&user, "keep").starts_with("+OK 4 "));
}

#[test]
fn delete_policy_hide_sets_the_keyword_and_hides_the_messages() {
    let (user, deleted, before) = delete_with_policy("hide");
    assert_eq!(
        common::imap_fetch_all(&user),
        before,
        "hide must not remove anything"
    );
    for (uid, flags) in common::imap_flags(&user) {
        assert_eq!(
            flags.iter().any(|f| f == "$POP3Deleted"),
            deleted.contains(&uid),
            "uid {uid}: {flags:?}"
        );
    }
    assert!(stat_through_proxy(&user, "hide").starts_with("+OK 2 "));
}

#[test]
fn delete_policy_trash_moves_to_the_trash_mailbox() {
    let (user, deleted, before) = delete_with_policy("trash");
    let inbox: Vec<u32> = common::imap_fetch_all(&user)
        .iter()
        .map(|(uid, _)| *uid)
        .collect();
    assert_eq!(inbox, vec![before[1].0, before[3].0]);
    let trash: Vec<Vec<u8>> = common::imap_fetch_all_in(&user, "Trash")
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    let expected: Vec<Vec<u8>> = before
        .iter()
        .filter(|(uid, _)| deleted.contains(uid))
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(trash, expected);
}

#[test]
fn delete_policy_expunge_removes_only_the_deleted_messages() {
    let (user, _, before) = delete_with_policy("expunge");
    let after = common::imap_fetch_all(&user);
    assert_eq!(
        after,
        vec![before[1].clone(), before[3].clone()],
        "the other client's \\Deleted message must survive"
    );
}

#[test]
fn dele_without_quit_deletes_nothing() {
    let user = seeded_user("noquit");
    let before = common::imap_fetch_all(&user);
    let input = format!("{}DELE 1\r\nDELE 2\r\nRETR 3\r\n", login(&user));
    let (out, log, _) = dialogue(
        &with(args(Tls::Plain), &["--delete-policy", "expunge"]),
        &[],
        input.as_bytes(),
    );
    assert!(String::from_utf8_lossy(&out).contains("+OK Marked to be deleted."));
    assert!(log.contains("end=client closed the connection"), "{log}");
    assert_eq!(common::imap_fetch_all(&user), before);
}

#[test]
fn a_second_session_on_the_same_mailbox_gets_in_use() {
    let user = seeded_user("inuse");
    let again = format!("{}QUIT\r\n", login(&user));
    let first = Live::login(&args(Tls::Plain), &user);
    // Over another port and TLS mode: still the same mailbox.
    let (out, ..) = dialogue(&args(Tls::Implicit), &[], again.as_bytes());
    assert_eq!(
        login_reply(&out),
        "-ERR [IN-USE] Mailbox is locked by another POP3 session"
    );
    first.finish();
    // The lock dies with the process.
    let (out, ..) = dialogue(&args(Tls::Plain), &[], again.as_bytes());
    assert_eq!(login_reply(&out), "+OK Logged in.");
    // --no-lock allows concurrent sessions.
    let unlocked = with(args(Tls::Plain), &["--no-lock"]);
    let first = Live::login(&unlocked, &user);
    let (out, ..) = dialogue(&unlocked, &[], again.as_bytes());
    assert_eq!(login_reply(&out), "+OK Logged in.");
    first.finish();
}

/// A lock directory of its own, so its files can be counted.
fn private_lock_dir(args: &mut [String], name: &str) -> std::path::PathBuf {
    let dir = servers().dir.join("pop3-locks-private").join(name);
    set_option(args, "--lock-dir", dir.display());
    dir
}

fn lock_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Logs in as each spelling of `user`'s name while a session holds the mailbox: each must
/// get [IN-USE]. A wrong password with another spelling must leave no lock file behind.
fn every_spelling_is_refused(args: &[String], user: &User, spellings: &[String]) {
    let first = Live::login(args, user);
    for spelling in spellings {
        let input = format!("USER {spelling}\r\nPASS {}\r\nQUIT\r\n", user.password);
        let (out, log, _) = dialogue(args, &[], input.as_bytes());
        assert_eq!(
            login_reply(&out),
            "-ERR [IN-USE] Mailbox is locked by another POP3 session",
            "{spelling}\n{log}"
        );
    }
    let wrong = format!("USER {}@nowhere.test\r\nPASS wrong\r\nQUIT\r\n", user.name);
    let (out, ..) = dialogue(args, &[], wrong.as_bytes());
    assert!(login_reply(&out).starts_with("-ERR [AUTH]"));
    first.finish();
}

fn spellings(user: &User) -> Vec<String> {
    vec![
        user.name.to_uppercase(),
        format!("{}@example.test", user.name),
        format!("{}@other.test", user.name.to_uppercase()),
    ]
}

#[test]
fn the_lock_is_the_mailbox_the_server_opened_however_the_user_is_spelled() {
    let user = seeded_user("spelling");
    let mut args = args(Tls::Plain);
    let dir = private_lock_dir(&mut args, "mailboxid");
    // Dovecot ignores the domain (username_format=%n): all of these open one mailbox.
    every_spelling_is_refused(&args, &user, &spellings(&user));
    // One lock file: the mailbox's, named after the mailbox's GUID (Dovecot 2.3 has no
    // RFC 8474 MAILBOXID, which would come first).
    let files = lock_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with("x-guid%3Alocalhost%2F"), "{files:?}");
    // The lock went with the session.
    let (out, ..) = dialogue(&args, &[], format!("{}QUIT\r\n", login(&user)).as_bytes());
    assert_eq!(login_reply(&out), "+OK Logged in.");
}

#[test]
fn without_a_mailbox_id_the_lock_key_is_the_user_name_normalised_as_configured() {
    let user = seeded_user("no-objectid");
    let mut args = with(args(Tls::Plain), &["--lock-user-domain", "strip"]);
    set_option(&mut args, "--imap-port", imap_without_mailbox_ids());
    let dir = private_lock_dir(&mut args, "strip");
    every_spelling_is_refused(&args, &user, &spellings(&user));
    assert_eq!(
        lock_files(&dir),
        [format!("localhost%2F{}%2FINBOX.lock", user.name)]
    );
    // The default keeps the domain (two domains may be two accounts): case still folds.
    set_option(&mut args, "--lock-user-domain", "keep");
    every_spelling_is_refused(&args, &user, &[user.name.to_uppercase()]);
}

#[test]
fn wrong_password_gets_auth_and_three_failures_close() {
    let user = seeded_user("badpw");
    let input = format!(
        "USER {0}\r\nPASS wrong\r\nUSER {0}\r\nPASS wrong\r\nUSER {0}\r\nPASS wrong\r\nUSER {0}\r\nPASS {1}\r\n",
        user.name, user.password
    );
    let (out, log, _) = dialogue(&args(Tls::Implicit), &[], input.as_bytes());
    let fail = "+OK\r\n-ERR [AUTH] Authentication failed.\r\n";
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("+OK legacy-mail-proxy POP3 ready.\r\n{fail}{fail}{fail}")
    );
    assert!(
        log.contains("end=too many authentication failures"),
        "{log}"
    );
    assert!(
        !log.contains("wrong\r") && !log.contains("PASS wrong"),
        "{log}"
    );
}

#[test]
fn passwords_with_utf8_quotes_backslashes_and_spaces_pass_through() {
    let password = "pä ss \"quoted\" back\\slash 日本";
    let user = servers().new_user_with_password("utf8pw", password);
    user.seed_many(&[b"Subject: x\r\n\r\ny\r\n".to_vec()]);
    // USER/PASS through Python's poplib (sends UTF-8) over a real socket.
    let inetd = Inetd::start(common::proxy_bin(), &args(Tls::Implicit), &[]);
    let port = inetd.port.to_string();
    let got = common::python_ok(
        "import os,poplib\n\
         p=poplib.POP3('127.0.0.1',int(os.environ['PORT']))\n\
         p.user(os.environ['U']); p.pass_(os.environ['P'])\n\
         print(p.stat()[0]); p.quit()",
        &[("PORT", &port), ("U", &user.name), ("P", password)],
    );
    assert_eq!(
        String::from_utf8_lossy(&got).trim(),
        "1",
        "{}",
        inetd.logs()
    );
    // AUTH PLAIN (RFC 5034) with the initial response, as raw bytes.
    let token = base64(format!("\0{}\0{password}", user.name).as_bytes());
    let (out, log, _) = dialogue(
        &args(Tls::Starttls),
        &[],
        format!("AUTH PLAIN {token}\r\nSTAT\r\nQUIT\r\n").as_bytes(),
    );
    assert!(
        String::from_utf8_lossy(&out).contains("+OK Logged in.\r\n+OK 1 "),
        "{log}"
    );
    assert!(
        !log.contains(password) && !log.contains(&token),
        "secret in the log:\n{log}"
    );
}

fn base64(input: &[u8]) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                alphabet[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

#[test]
fn stopped_or_unreachable_backend_gets_sys_temp_not_auth() {
    let user = seeded_user("down");
    // A port where nothing listens: the backend is stopped.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    let mut args = args(Tls::Implicit);
    set_option(&mut args, "--imap-port", port);
    let (out, log, _) = dialogue(&args, &[], format!("{}QUIT\r\n", login(&user)).as_bytes());
    assert_eq!(
        login_reply(&out),
        "-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later"
    );
    assert!(log.contains("cannot connect to"), "{log}");
    // A backend that accepts and hangs up at once (dying during the greeting).
    let fault = common::FaultProxy::start(servers().imap_port, 0);
    let mut plain = self::args(Tls::Plain);
    set_option(&mut plain, "--imap-port", fault.port());
    let (out, ..) = dialogue(&plain, &[], format!("{}QUIT\r\n", login(&user)).as_bytes());
    assert!(String::from_utf8_lossy(&out).contains("-ERR [SYS/TEMP]"));
}

#[test]
fn a_certificate_from_an_untrusted_ca_is_refused() {
    let s = servers();
    let user = seeded_user("untrusted");
    for (mode, port) in [
        ("implicit", s.untrusted_imaps_port),
        ("starttls", s.untrusted_imap_port),
    ] {
        let args: Vec<String> = [
            "--log",
            "stderr",
            "pop3",
            "--imap-host",
            s.untrusted_host,
            "--imap-tls",
            mode,
            "--auth-failure-delay",
            "0",
            "--no-lock",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--imap-port".into(),
            port.to_string(),
            "--ca-file".into(),
            s.ca_file.display().to_string(),
        ])
        .collect();
        let (out, log, _) = dialogue(&args, &[], format!("{}QUIT\r\n", login(&user)).as_bytes());
        assert_eq!(
            login_reply(&out),
            "-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later",
            "{mode}"
        );
        assert!(log.contains("certificate verify failed"), "{mode}: {log}");
        assert!(!log.contains(&user.password));
    }
}

/// Without `--ca-file` the proxy trusts the system roots through OpenSSL's hashed directory
/// and skips the bundle file (src/tls.rs). The test CA is offered only in such a directory,
/// via `SSL_CERT_DIR`: the login works with the link and fails without it.
#[test]
fn without_a_ca_file_roots_come_from_the_hashed_directory() {
    let s = servers();
    let user = seeded_user("hashdir");
    let mut args = args(Tls::Implicit);
    let at = args.iter().position(|a| a == "--ca-file").unwrap();
    args.drain(at..at + 2);
    let hash = Command::new("openssl")
        .args(["x509", "-hash", "-noout", "-in"])
        .arg(&s.ca_file)
        .output()
        .expect("openssl x509 -hash");
    let hash = String::from_utf8(hash.stdout).unwrap();
    let with_link = s.dir.join("hashdir-with-link");
    let without_link = s.dir.join("hashdir-empty");
    for dir in [&with_link, &without_link] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
    }
    std::os::unix::fs::symlink(&s.ca_file, with_link.join(format!("{}.0", hash.trim()))).unwrap();
    let input = format!("{}QUIT\r\n", login(&user));
    for (dir, expected) in [(&with_link, "+OK"), (&without_link, "-ERR [SYS/TEMP]")] {
        let dir = dir.display().to_string();
        // An empty SSL_CERT_FILE counts as unset (this machine's own environment may set it).
        let envs = [("SSL_CERT_FILE", ""), ("SSL_CERT_DIR", dir.as_str())];
        let (out, log, _) = dialogue(&args, &envs, input.as_bytes());
        assert!(login_reply(&out).starts_with(expected), "{dir}: {log}");
        assert!(log.contains("default CA file: DirectoryInstead"), "{log}");
        if dir.ends_with("empty") {
            assert!(log.contains("certificate verify failed"), "{log}");
        }
    }
}

#[test]
fn backend_dying_during_retr_never_sends_the_terminating_dot() {
    let user = servers().new_user("cut");
    let big = common::message_to_cut();
    user.seed_many(&[big]);
    let run = |cut_after: usize| {
        let fault = common::FaultProxy::start(servers().imap_port, cut_after);
        let mut args = args(Tls::Plain);
        set_option(&mut args, "--imap-port", fault.port());
        let (out, log, ok) = dialogue(
            &args,
            &[],
            format!("{}DELE 1\r\nRSET\r\nRETR 1\r\nQUIT\r\n", login(&user)).as_bytes(),
        );
        (String::from_utf8_lossy(&out).into_owned(), log, ok)
    };
    // The message streams to the client as the backend sends it. Wherever the backend
    // dies after that began (here after 300 kB and after 1.3 MB), the client has "+OK" and
    // part of the message, so the connection must close without the terminating "." (and
    // without answering QUIT), or the client would store a truncated message as complete.
    for cut_after in [300_000, 1_300_000] {
        let (text, log, ok) = run(cut_after);
        assert!(!ok, "the proxy must report failure\n{log}");
        assert!(text.contains("+OK 1"), "{text:.300}\n{log}");
        assert!(
            text.len() > cut_after - 10_000,
            "the message was streamed as it came"
        );
        assert!(
            !text.ends_with("\r\n.\r\n"),
            "a truncated message was ended as if complete"
        );
        assert!(
            !text.contains("+OK Bye"),
            "QUIT must not be answered after a failed RETR"
        );
        assert!(log.contains("backend failed"), "{log}");
    }
    assert_eq!(common::imap_fetch_all(&user).len(), 1);
}

#[test]
fn fixed_login_checks_client_credentials_unless_told_to_ignore_them() {
    let user = seeded_user("fixed");
    let fixed = with(
        args(Tls::Implicit),
        &[
            "--auth",
            "fixed",
            "--imap-user",
            &user.name,
            "--client-user",
            "scanner",
        ],
    );
    let envs = [
        ("LMP_IMAP_PASSWORD", user.password.as_str()),
        ("LMP_CLIENT_PASSWORD", "letmein"),
    ];
    let (out, log, _) = dialogue(
        &fixed,
        &envs,
        b"USER scanner\r\nPASS letmein\r\nSTAT\r\nQUIT\r\n",
    );
    assert!(
        String::from_utf8_lossy(&out).contains("+OK Logged in.\r\n+OK 8 "),
        "{log}"
    );
    let (out, ..) = dialogue(&fixed, &envs, b"USER scanner\r\nPASS wrong\r\nQUIT\r\n");
    assert!(String::from_utf8_lossy(&out).contains("-ERR [AUTH]"));
    let (out, ..) = dialogue(
        &fixed,
        &envs,
        format!("{}QUIT\r\n", login(&user)).as_bytes(),
    );
    assert!(
        String::from_utf8_lossy(&out).contains("-ERR [AUTH]"),
        "the backend account is not a client login"
    );
    // Without client credentials configured, fixed mode refuses to start open.
    let open = with(
        args(Tls::Implicit),
        &["--auth", "fixed", "--imap-user", &user.name],
    );
    let (out, log, _) = dialogue(&open, &envs[..1], b"USER x\r\nPASS y\r\nQUIT\r\n");
    assert!(
        String::from_utf8_lossy(&out).contains("-ERR [SYS/PERM]"),
        "{log}"
    );
    assert!(log.contains("--client-user"), "{log}");
    let ignoring = with(open, &["--ignore-client-credentials"]);
    let (out, log, _) = dialogue(
        &ignoring,
        &envs[..1],
        b"USER anyone\r\nPASS anything\r\nSTAT\r\nQUIT\r\n",
    );
    assert!(
        String::from_utf8_lossy(&out).contains("+OK Logged in.\r\n+OK 8 "),
        "{log}"
    );
    assert!(log.contains("anyone who reaches this port"), "{log}");
}

#[test]
fn settings_of_the_python_legacy_email_proxy_are_honoured() {
    let s = servers();
    let user = seeded_user("legacy");
    let port = s.imaps_port.to_string();
    let ca = s.ca_file.display().to_string();
    let lock = s.dir.join("pop3-locks").display().to_string();
    let envs = [
        ("BACKEND_IMAP_HOST", s.tls_host),
        ("BACKEND_IMAP_PORT", port.as_str()),
        ("BACKEND_IMAP_USE_SSL", "true"),
        ("BACKEND_IMAP_USER", user.name.as_str()),
        ("BACKEND_IMAP_PASS", user.password.as_str()),
        ("BACKEND_MUTATE", "true"),
        ("LMP_CA_FILE", ca.as_str()),
        ("LMP_LOCK_DIR", lock.as_str()),
        ("LMP_AUTH_FAILURE_DELAY", "0"),
        ("LMP_IGNORE_CLIENT_CREDENTIALS", "true"),
    ];
    let args: Vec<String> = ["--log", "stderr", "pop3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (out, log, _) = dialogue(&args, &envs, b"USER any\r\nPASS any\r\nDELE 1\r\nQUIT\r\n");
    assert!(
        String::from_utf8_lossy(&out).ends_with("+OK Bye, 1 messages deleted.\r\n"),
        "{log}"
    );
    // BACKEND_MUTATE=true means expunge: the message is gone from the server.
    assert_eq!(common::imap_fetch_all(&user).len(), 7);
}

#[test]
fn poplib_curl_and_fetchmail_work_through_an_inetd_socket() {
    let user = seeded_user("clients");
    let reference = common::imap_fetch_all(&user);
    let inetd = Inetd::start(
        common::proxy_bin(),
        &with(args(Tls::Implicit), &["--delete-policy", "expunge"]),
        &[],
    );
    let port = inetd.port.to_string();
    // poplib: everything, keeping.
    let got = common::python_ok(
        "import os,poplib,sys\npoplib._MAXLINE=1<<20\n\
         p=poplib.POP3('127.0.0.1',int(os.environ['PORT']))\n\
         p.user(os.environ['U']); p.pass_(os.environ['P'])\n\
         n=p.stat()[0]\n\
         for i in range(1,n+1):\n    lines=p.retr(i)[1]\n    body=b''.join(l+b'\\r\\n' for l in lines)\n    sys.stdout.buffer.write(b'%d\\n' % len(body) + body)\n\
         p.quit()",
        &[("PORT", &port), ("U", &user.name), ("P", &user.password)],
    );
    let mut rest = &got[..];
    for (_, raw) in &reference {
        let nl = rest.iter().position(|&b| b == b'\n').unwrap();
        let len: usize = std::str::from_utf8(&rest[..nl]).unwrap().parse().unwrap();
        assert!(
            rest[nl + 1..nl + 1 + len] == normalized(raw)[..],
            "poplib got different bytes"
        );
        rest = &rest[nl + 1 + len..];
    }
    // curl: LIST and RETR of the dot-line message.
    let curl = common::require_client("curl");
    let url = format!("pop3://127.0.0.1:{port}/");
    let list = Command::new(&curl)
        .args([
            "-s",
            "--max-time",
            "30",
            "--user",
            &format!("{}:{}", user.name, user.password),
            &url,
        ])
        .output()
        .unwrap();
    let expected: String = reference
        .iter()
        .enumerate()
        .map(|(i, (_, m))| format!("{} {}\r\n", i + 1, m.len()))
        .collect();
    assert_eq!(String::from_utf8_lossy(&list.stdout), expected);
    let retr = Command::new(&curl)
        .args([
            "-s",
            "--max-time",
            "30",
            "--user",
            &format!("{}:{}", user.name, user.password),
            &format!("{url}3"),
        ])
        .output()
        .unwrap();
    assert_eq!(retr.stdout, normalized(&reference[2].1));
    // fetchmail, keeping: everything arrives, nothing leaves the server.
    let dir = servers().dir.join(format!("fetchmail-{}", user.name));
    std::fs::create_dir_all(&dir).unwrap();
    let run_fetchmail = |keep: bool| {
        let rc = dir.join("fetchmailrc");
        let out_file = dir.join(if keep { "kept.mbox" } else { "fetched.mbox" });
        std::fs::write(
            &rc,
            format!(
                "set no syslog\nset postmaster root\npoll 127.0.0.1 service {port} protocol pop3 uidl auth password:\n  user \"{}\" password \"{}\" is root here {} sslproto '' mda \"/bin/sh -c 'cat >> {}'\"\n",
                user.name,
                user.password,
                if keep { "keep" } else { "nokeep" },
                out_file.display()
            ),
        )
        .unwrap();
        let ids = dir.join("ids");
        let out = common::run_fetchmail(&rc, &dir, &["-i", ids.to_str().unwrap()]);
        assert!(
            matches!(out.status.code(), Some(0)),
            "fetchmail failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(out_file).unwrap()
    };
    let kept = run_fetchmail(true);
    assert_eq!(
        common::imap_fetch_all(&user).len(),
        8,
        "keep must leave the server untouched"
    );
    let fetched = run_fetchmail(false);
    assert_eq!(
        common::imap_fetch_all(&user).len(),
        0,
        "fetchmail nokeep deletes through the proxy"
    );
    for (_, raw) in &reference {
        let subject = raw.split(|&b| b == b'\n').next().unwrap();
        let subject = subject.strip_suffix(b"\r").unwrap_or(subject);
        for (name, mbox) in [("kept", &kept), ("fetched", &fetched)] {
            assert!(
                mbox.windows(subject.len()).any(|w| w == subject),
                "{name}: missing {}",
                String::from_utf8_lossy(subject)
            );
        }
    }
    let logs = inetd.logs();
    assert!(!logs.contains(&user.password), "password in the log");
    assert!(
        logs.contains("client=127.0.0.1:"),
        "client address from the socket: {logs}"
    );
}

#[test]
fn stat_on_a_ten_thousand_message_mailbox() {
    let user = servers().new_user("big-mailbox");
    let messages: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("Subject: {i}\r\n\r\nbody {i}\r\n").into_bytes())
        .collect();
    user.seed_many(&messages);
    let started = std::time::Instant::now();
    let (out, log, _) = dialogue(
        &args(Tls::Plain),
        &[],
        format!("{}STAT\r\nQUIT\r\n", login(&user)).as_bytes(),
    );
    let took = started.elapsed();
    let total: usize = messages.iter().map(Vec::len).sum();
    assert_eq!(
        String::from_utf8_lossy(&out).lines().nth(3).unwrap(),
        format!("+OK 10000 {total}"),
        "{log}"
    );
    // Not a timing assertion: printed for the record (see the benchmark for real figures).
    eprintln!("STAT of 10,000 messages through the debug build: {took:?}");
}

#[test]
fn memory_does_not_grow_with_message_size() {
    let user = servers().new_user("rss");
    let line = [b'A'; 76];
    let mut message = b"Subject: 30 MB\r\n\r\n".to_vec();
    while message.len() < 30 << 20 {
        message.extend_from_slice(&line);
        message.extend_from_slice(b"\r\n");
    }
    user.seed_many(&[message.clone()]);
    let time = common::require_client("time");
    let mut child = Command::new(time)
        .arg("-f")
        .arg("maxrss=%M")
        .arg(common::proxy_bin())
        .args(args(Tls::Implicit))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}RETR 1\r\nQUIT\r\n", login(&user)).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r = responses(&out.stdout, &[false, false, false, true, false]);
    assert_eq!(r[3].1.len(), message.len());
    let rss_kb: u64 = stderr
        .rsplit("maxrss=")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The whole message would be 30 MB on its own; streaming keeps the process far below
    // (about 16 MB here, most of it the debug binary and TLS).
    assert!(
        rss_kb < 24 * 1024,
        "peak RSS {rss_kb} kB for a 30 MB message"
    );
    eprintln!("peak RSS for RETR of 30 MB (debug build): {rss_kb} kB");
}

#[test]
fn idle_client_is_logged_out_and_backend_kept_alive_meanwhile() {
    let user = seeded_user("idle");
    let mut live = Live::login(
        &with(
            args(Tls::Plain),
            &["--idle-timeout", "3", "--keepalive", "1"],
        ),
        &user,
    );
    // Stay silent with stdin open: the proxy must end the session by itself.
    let bye = live.line();
    assert_eq!(bye, "-ERR Disconnected for inactivity.\r\n");
    let (rest, log, ok) = live.finish();
    assert_eq!(rest, "");
    // The session ran its course (the client's silence ended it): exit status 0, so that
    // systemd keeps no failed unit for it (README, "Logins, idle clients and exit codes").
    assert!(ok, "{log}");
    assert!(log.contains("end=idle timeout"), "{log}");
}

#[test]
fn by_default_nothing_but_protocol_bytes_leaves_the_process() {
    // No --log option: syslog, and this test machine has no syslog daemon. The proxy must
    // stay silent rather than fall back to stdout or stderr, which are the client's socket.
    let s = servers();
    let user = seeded_user("quiet");
    let args: Vec<String> = vec![
        "pop3".into(),
        "--imap-host".into(),
        s.tls_host.into(),
        "--imap-port".into(),
        s.imaps_port.to_string(),
        "--ca-file".into(),
        s.ca_file.display().to_string(),
        "--lock-dir".into(),
        s.dir.join("pop3-locks").display().to_string(),
    ];
    let input = format!("{}STAT\r\nRETR 9\r\nBOGUS\r\nQUIT\r\n", login(&user));
    let (out, stderr, ok) = dialogue(&args, &[], input.as_bytes());
    assert!(ok);
    assert_eq!(stderr, "", "stderr must stay empty");
    let text = String::from_utf8(out).unwrap();
    for line in text.lines() {
        assert!(
            line.starts_with("+OK") || line.starts_with("-ERR"),
            "not a POP3 reply: {line:?}"
        );
    }
    // A bad command line is not shown to the client either (it would reach its socket).
    let (out, stderr, ok) = dialogue(
        &["pop3".into(), "--no-such-option".into()],
        &[],
        b"QUIT\r\n",
    );
    assert!(!ok);
    assert!(out.is_empty() && stderr.is_empty(), "{stderr}");
}

#[test]
fn an_unreadable_ca_file_is_a_clear_sys_perm_not_a_silent_failure() {
    let user = seeded_user("badca");
    let mut args = args(Tls::Implicit);
    set_option(&mut args, "--ca-file", "/nonexistent/ca.pem");
    let (out, log, _) = dialogue(&args, &[], format!("{}QUIT\r\n", login(&user)).as_bytes());
    assert_eq!(
        login_reply(&out),
        "-ERR [SYS/PERM] Mail server cannot serve this mailbox"
    );
    assert!(
        log.contains("cannot read CA file /nonexistent/ca.pem"),
        "{log}"
    );
}

#[test]
fn junk_and_overlong_lines_through_the_real_binary() {
    let user = seeded_user("junk");
    let mut input = b"\x00\xff\xfe junk\r\n".to_vec();
    input.extend(std::iter::repeat_n(b'A', 100_000));
    input.extend_from_slice(b"\r\n");
    input.extend_from_slice(login(&user).as_bytes());
    input.extend_from_slice(b"LIST 1 2 3\r\nRETR 99999999999999999999\r\nSTAT\r\nQUIT\r\n");
    let (out, log, ok) = dialogue(&args(Tls::Plain), &[], &input);
    assert!(ok, "{log}");
    let text = String::from_utf8_lossy(&out);
    assert_eq!(
        text,
        format!(
            "+OK legacy-mail-proxy POP3 ready.\r\n-ERR Unknown command\r\n-ERR Line too long\r\n\
             +OK\r\n+OK Logged in.\r\n-ERR expected at most one message number\r\n\
             -ERR No such message\r\n+OK 8 {}\r\n+OK Bye.\r\n",
            common::imap_fetch_all(&user)
                .iter()
                .map(|(_, m)| m.len())
                .sum::<usize>()
        )
    );
}

/// Forwards 127.0.0.1 connections to Dovecot's plain IMAP port, deleting one capability
/// from the server's CAPABILITY lines: a server without MOVE, say, for testing fallbacks.
fn imap_without_capability(capability: &'static str) -> u16 {
    let needle = format!(" {capability}");
    imap_filtered(move |line| Some(common::without_capability(line, &needle)))
}

/// A server with no id for its mailboxes: Dovecot without RFC 8474 OBJECTID (2.3 has none,
/// but a later one would) and without its own mailbox GUID (`STATUS (X-GUID)`).
fn imap_without_mailbox_ids() -> u16 {
    imap_filtered(|line| {
        let has = |needle: &[u8]| {
            line.windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle))
        };
        let is_id = has(b"[MAILBOXID ") || (line.starts_with(b"* STATUS ") && has(b"X-GUID"));
        (!is_id).then(|| common::without_capability(line, " OBJECTID"))
    })
}

/// Dovecot's plain IMAP port seen through [`common::line_filter`].
fn imap_filtered(edit: impl Fn(Vec<u8>) -> Option<Vec<u8>> + Send + Sync + 'static) -> u16 {
    common::line_filter(servers().imap_port, edit)
}

#[test]
fn trash_without_move_and_with_a_space_in_the_folder_name() {
    let (user, deleted, before) = {
        let user = servers().new_user("trash-nomove");
        user.seed_many(&[
            b"Subject: m1\r\n\r\none\r\n".to_vec(),
            b"Subject: m2\r\n\r\ntwo\r\n".to_vec(),
        ]);
        // A folder whose name is the first word of the trash name: a COPY with an unquoted
        // name would land there.
        let s = servers();
        let out = s.doveadm(&["mailbox", "create", "-u", &user.name, "Deleted"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let before = common::imap_fetch_all(&user);
        (user, vec![before[0].0], before)
    };
    let mut args = with(
        args(Tls::Plain),
        &[
            "--delete-policy",
            "trash",
            "--trash-mailbox",
            "Deleted Items",
        ],
    );
    set_option(&mut args, "--imap-port", imap_without_capability("MOVE"));
    let (out, log, ok) = dialogue(
        &args,
        &[],
        format!("{}DELE 1\r\nQUIT\r\n", login(&user)).as_bytes(),
    );
    assert!(ok, "{log}");
    assert!(
        String::from_utf8_lossy(&out).ends_with("+OK Bye, 1 messages deleted.\r\n"),
        "{log}"
    );
    let inbox: Vec<u32> = common::imap_fetch_all(&user)
        .iter()
        .map(|(uid, _)| *uid)
        .collect();
    assert_eq!(inbox, vec![before[1].0]);
    assert_eq!(
        common::imap_fetch_all_in(&user, "Deleted").len(),
        0,
        "copied into the wrong folder"
    );
    let trash = common::imap_fetch_all_in(&user, "Deleted Items");
    assert_eq!(trash.len(), deleted.len());
    assert_eq!(trash[0].1, before[0].1);
}

#[test]
fn expunge_without_uidplus_refuses_dele_instead_of_a_plain_expunge() {
    let user = seeded_user("no-uidplus");
    let mut args = with(args(Tls::Plain), &["--delete-policy", "expunge"]);
    set_option(&mut args, "--imap-port", imap_without_capability("UIDPLUS"));
    let (out, log, _) = dialogue(
        &args,
        &[],
        format!("{}DELE 1\r\nQUIT\r\n", login(&user)).as_bytes(),
    );
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("-ERR [SYS/PERM] Cannot delete: the server lacks UIDPLUS"),
        "{text}\n{log}"
    );
    assert!(log.contains("DELE refused"), "{log}");
    assert_eq!(common::imap_fetch_all(&user).len(), 8);
}

#[test]
fn a_message_expunged_by_another_client_fails_alone() {
    let user = seeded_user("gone");
    let uids: Vec<u32> = common::imap_fetch_all(&user)
        .iter()
        .map(|(uid, _)| *uid)
        .collect();
    let mut live = Live::login(&args(Tls::Plain), &user);
    let out = servers().doveadm(&[
        "expunge",
        "-u",
        &user.name,
        "mailbox",
        "INBOX",
        "uid",
        &uids[0].to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    live.send(b"RETR 1\r\nTOP 3 0\r\nQUIT\r\n");
    let (rest, ..) = live.finish();
    assert!(
        rest.starts_with("-ERR Message was deleted by another client\r\n+OK\r\nSubject: dots\r\n"),
        "{rest}"
    );
    assert!(rest.ends_with("+OK Bye.\r\n"));
}

#[test]
fn sizes_differ_from_retr_only_by_the_line_endings_the_proxy_adds() {
    // RETR must end every message with CRLF and turn bare CR into CRLF; the server's
    // RFC822.SIZE counts the message as stored. Dovecot's own POP3 also adds the final
    // CRLF without counting it. Documented in the README.
    let user = servers().new_user("sizes");
    user.seed_many(&[
        b"Subject: no final newline\r\n\r\nlast line".to_vec(),
        b"Subject: cr\r\n\r\na\rb\r\n".to_vec(),
    ]);
    let reference = common::imap_fetch_all(&user);
    let (out, ..) = dialogue(
        &args(Tls::Plain),
        &[],
        format!("{}LIST\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n", login(&user)).as_bytes(),
    );
    let r = responses(&out, &[false, false, false, true, true, true, false]);
    let listed: Vec<usize> = String::from_utf8_lossy(&r[3].1)
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(listed, vec![reference[0].1.len(), reference[1].1.len()]);
    assert_eq!(r[4].1.len(), listed[0] + 2, "the final CRLF is added");
    assert_eq!(r[5].1.len(), listed[1] + 1, "the bare CR becomes CRLF");
    assert_eq!(r[5].1, b"Subject: cr\r\n\r\na\r\nb\r\n");
}

#[test]
fn a_trickling_client_cannot_hold_off_the_idle_logout() {
    let user = seeded_user("trickle");
    let mut child = Command::new(common::proxy_bin())
        .args(with(
            args(Tls::Plain),
            &["--idle-timeout", "2", "--keepalive", "1"],
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(login(&user).as_bytes()).unwrap();
    let started = std::time::Instant::now();
    // One byte of a never-ending line every 200 ms, for at most 20 s.
    while child.try_wait().unwrap().is_none()
        && started.elapsed() < std::time::Duration::from_secs(20)
    {
        if stdin.write_all(b"N").is_err() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("-ERR Disconnected for inactivity.\r\n"),
        "{text}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
}

/// Starts the proxy with both ends of a fresh TCP connection as its stdin and stdout, as
/// inetd would; returns the process and the client's end.
fn spawn_on_socket(args: &[String]) -> (std::process::Child, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let input = std::os::fd::OwnedFd::from(server.try_clone().unwrap());
    let child = Command::new(common::proxy_bin())
        .args(args)
        .stdin(Stdio::from(input))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(server)))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn proxy");
    (child, client)
}

/// A mailbox with one 20 MiB message: far more than the socket buffers hold.
fn user_with_a_big_message(prefix: &str) -> User {
    let user = servers().new_user(prefix);
    let big: Vec<u8> = b"Subject: big\r\n\r\n"
        .iter()
        .copied()
        .chain(
            std::iter::repeat_n(b'x', 78)
                .chain(*b"\r\n")
                .cycle()
                .take(20 << 20),
        )
        .collect();
    user.seed_many(&[big]);
    user
}

#[test]
fn a_client_that_stops_reading_cannot_hold_the_mailbox_forever() {
    let user = user_with_a_big_message("stall");
    // The send timeout is the idle timeout.
    let send_timeout = 3.0;
    let (mut proxy, mut stalled) = spawn_on_socket(&with(
        args(Tls::Plain),
        &["--idle-timeout", &send_timeout.to_string()],
    ));
    let started = std::time::Instant::now();
    stalled
        .write_all(format!("{}RETR 1\r\n", login(&user)).as_bytes())
        .unwrap();
    // Never read. The proxy gives up writing after one send timeout, and must then write
    // nothing more: each further write to this client would block for another timeout.
    let status = loop {
        if let Some(status) = proxy.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed().as_secs_f64() < 10.0 * send_timeout,
            "the stalled session does not end"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let held = started.elapsed().as_secs_f64();
    let mut log = String::new();
    proxy
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    eprintln!("a client that stopped reading held the process for {held:.2} s");
    assert!(!status.success(), "{log}");
    assert!(log.contains("end=client connection error"), "{log}");
    // One send timeout, plus the login and a margin for a busy machine.
    assert!(
        held < send_timeout + 2.0,
        "held for {held:.2} s with a {send_timeout} s send timeout\n{log}"
    );
    // The lock went with the process.
    let (out, ..) = dialogue(
        &args(Tls::Plain),
        &[],
        format!("{}QUIT\r\n", login(&user)).as_bytes(),
    );
    assert_eq!(login_reply(&out), "+OK Logged in.");
    drop(stalled);
}

#[test]
fn a_nul_in_user_or_pass_is_a_plain_err_and_no_error_in_the_log() {
    let user = servers().new_user("nul");
    let input = format!(
        "USER {0}\0x\r\nPASS {1}\r\nUSER {0}\r\nPASS {1}\0\r\nQUIT\r\n",
        user.name, user.password
    );
    let (out, log, _) = dialogue(&args(Tls::Plain), &[], input.as_bytes());
    let refused = "-ERR Control characters are not allowed in commands\r\n";
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!(
            "+OK legacy-mail-proxy POP3 ready.\r\n{refused}-ERR Give USER first\r\n+OK\r\n{refused}+OK Bye.\r\n"
        )
    );
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn a_valid_ca_file_logs_no_certificate_error_at_debug_level() {
    let user = servers().new_user("ca-quiet");
    // args() gives --ca-file and --log-level debug.
    for tls in [Tls::Implicit, Tls::Starttls] {
        let (out, log, _) = dialogue(
            &args(tls),
            &[],
            format!("{}QUIT\r\n", login(&user)).as_bytes(),
        );
        assert_eq!(login_reply(&out), "+OK Logged in.", "{log}");
        assert!(log.contains("DEBUG"), "{log}");
        assert!(!log.contains("load_verify_locations"), "{log}");
        assert!(!log.contains("no certificate or crl found"), "{log}");
    }
}

/// Runs `input` through a proxy whose IMAP server goes silent once the proxy has sent
/// `trigger` and `then_bytes` more bytes have come back; returns the output, the log and
/// the seconds until the proxy exited.
fn with_stalling_backend(
    tls: Tls,
    backend_timeout: f64,
    trigger: &'static [u8],
    then_bytes: usize,
    input: &str,
) -> (String, String, f64) {
    let port = match tls {
        Tls::Implicit => servers().imaps_port,
        Tls::Starttls | Tls::Plain => servers().imap_port,
    };
    let stall = common::FaultProxy::stall(port, trigger, then_bytes);
    let mut args = with(
        args(tls),
        &["--backend-timeout", &backend_timeout.to_string()],
    );
    set_option(&mut args, "--imap-port", stall.port());
    let started = std::time::Instant::now();
    let (out, log, _) = dialogue(&args, &[], input.as_bytes());
    let took = started.elapsed().as_secs_f64();
    (String::from_utf8_lossy(&out).into_owned(), log, took)
}

#[test]
fn a_backend_that_stalls_mid_retr_or_mid_login_costs_one_backend_timeout() {
    let user = servers().new_user("backend-stall");
    let body: Vec<u8> = b"Subject: stalls\r\n\r\n"
        .iter()
        .copied()
        .chain(std::iter::repeat_n(*b"0123456789abcdef0123456789abcdef\r\n", 30_000).flatten())
        .collect();
    user.seed_many(&[body]);
    let timeout = 2.0;
    // Login and process start-up, with room for a busy machine; a second timeout is not.
    let margin = 1.5;

    // In clear text the stall comes after the FETCH command; through TLS, where the
    // command cannot be seen, after 100 kB from the start.
    for (tls, trigger) in [(Tls::Plain, &b"BODY.PEEK[]"[..]), (Tls::Implicit, b"")] {
        let (out, log, took) = with_stalling_backend(
            tls,
            timeout,
            trigger,
            100_000,
            &format!("{}RETR 1\r\nQUIT\r\n", login(&user)),
        );
        eprintln!("{tls:?}, stalled mid-RETR: the client was released after {took:.2} s");
        assert!(out.contains("+OK 1"), "{out:.200}\n{log}");
        assert!(!out.ends_with(".\r\n") && !out.contains("+OK Bye"), "{log}");
        assert!(
            log.contains("timed out waiting for the IMAP server"),
            "{log}"
        );
        assert!(took < timeout + margin, "{took:.2} s\n{log}");
    }

    let (out, log, took) = with_stalling_backend(
        Tls::Plain,
        timeout,
        b"LOGIN",
        0,
        &format!("{}QUIT\r\n", login(&user)),
    );
    eprintln!("stalled mid-LOGIN: the client was answered after {took:.2} s");
    assert_eq!(
        login_reply(out.as_bytes()),
        "-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later",
        "{log}"
    );
    assert!(out.ends_with("+OK Bye.\r\n"), "{out}");
    assert!(took < timeout + margin, "{took:.2} s\n{log}");
}

/// The exit status says whether a session ran its course (README, "Logins, idle clients
/// and exit codes"): a client hanging up, even after the backend could not be reached, is
/// 0; an unusable configuration is 1. No server is needed.
#[test]
fn the_exit_status_says_whether_the_session_ran_its_course() {
    let run = |args: &[&str], envs: &[(&str, &str)], input: &[u8]| {
        let mut argv = vec!["--log".to_string(), "stderr".into(), "pop3".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let out = common::run_proxy(&argv, envs, input);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.code(),
            text,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Nothing listens on this port: the login fails with [SYS/TEMP], the client hangs up.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    let backend = [
        "--imap-host",
        "127.0.0.1",
        "--imap-port",
        &port,
        "--imap-tls",
        "none",
    ];
    let (code, out, log) = run(&backend, &[], b"USER a\r\nPASS b\r\n");
    assert!(out.contains("-ERR [SYS/TEMP]"), "{out}\n{log}");
    assert_eq!(code, Some(0), "{log}");
    let (code, out, log) = run(&backend, &[], b"CAPA\r\n");
    assert!(out.starts_with("+OK"), "{out}");
    assert_eq!(code, Some(0), "a client hanging up without QUIT: {log}");
    // No IMAP server configured: a configuration error, told at login.
    let (code, out, log) = run(&[], &[], b"USER a\r\nPASS b\r\nQUIT\r\n");
    assert!(out.contains("-ERR [SYS/PERM]"), "{out}\n{log}");
    assert!(log.contains("no IMAP server"), "{log}");
    assert_eq!(code, Some(1), "{log}");
    // Both legacy TLS flags true contradict each other: refused, not guessed.
    let both = [
        ("BACKEND_IMAP_HOST", "127.0.0.1"),
        ("BACKEND_IMAP_USE_SSL", "true"),
        ("BACKEND_IMAP_USE_STARTTLS", "true"),
    ];
    let (code, _, log) = run(&[], &both, b"");
    assert!(log.contains("both true"), "{log}");
    assert_eq!(code, Some(1), "{log}");
}

/// Read-ahead (issue 14) against Dovecot, which runs pipelined FETCHes at once: a
/// sequential download, a TOP sweep, and commands in between give the same bytes with
/// read-ahead off, at the default window and at a window smaller than most messages; the
/// bytes are Dovecot's BODY[]; and no flag changes on the server.
#[test]
fn read_ahead_serves_the_same_bytes_and_changes_no_flag() {
    let user = seeded_user("prefetch");
    let reference = common::imap_fetch_all(&user);
    let n = reference.len();
    let flags_before = common::imap_flags(&user);
    let mut input = login(&user);
    for i in 1..=n {
        input.push_str(&format!("TOP {i} 0\r\n"));
    }
    input.push_str("RETR 1\r\nRETR 2\r\nDELE 2\r\nLIST\r\nTOP 4 1\r\nNOOP\r\nRSET\r\n");
    for i in 3..=n {
        input.push_str(&format!("RETR {i}\r\n"));
    }
    input.push_str("QUIT\r\n");
    let mut outputs = Vec::new();
    for window in ["0", "4M", "3000"] {
        let args = with(args(Tls::Implicit), &["--prefetch-window", window]);
        let (out, log, ok) = dialogue(&args, &[], input.as_bytes());
        assert!(ok, "window {window}:\n{log}");
        outputs.push((window, out));
    }
    for (window, out) in &outputs[1..] {
        assert!(
            out == &outputs[0].1,
            "window {window} changed what the client got"
        );
    }
    let mut shape = vec![false, false, false];
    shape.extend(std::iter::repeat_n(true, n));
    shape.extend([true, true, false, true, true, false, false]);
    shape.extend(std::iter::repeat_n(true, n - 2));
    shape.push(false);
    let replies = responses(&outputs[1].1, &shape);
    let retrieved = [0, 1].into_iter().chain(2..n);
    let at = |i: usize| {
        if i < 2 {
            3 + n + i
        } else {
            3 + n + 7 + (i - 2)
        }
    };
    for i in retrieved {
        assert!(
            replies[at(i)].1 == normalized(&reference[i].1),
            "message {} differs from BODY[]",
            i + 1
        );
    }
    assert_eq!(common::imap_flags(&user), flags_before);
}

/// The IMAP connection begun at start-up (issue 14) never holds the process: a client that
/// leaves before logging in is let go at once, even while the server has not greeted yet,
/// and nothing logs in.
#[test]
fn a_client_that_leaves_before_logging_in_is_not_held_by_the_early_connection() {
    let timeout = 5.0;
    let (out, log, took) = with_stalling_backend(Tls::Plain, timeout, b"", 0, "CAPA\r\nQUIT\r\n");
    assert!(out.ends_with("+OK Bye.\r\n"), "{out}\n{log}");
    assert!(!log.contains("LOGIN"), "{log}");
    assert!(took < timeout / 2.0, "{took:.2} s\n{log}");
}
