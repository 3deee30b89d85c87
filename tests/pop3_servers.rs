//! `legacy-mail-proxy pop3` against the other IMAP servers of issue 13's matrix (Cyrus
//! IMAP and Courier IMAP, each over implicit TLS, STARTTLS and plain IMAP; tests/pop3.rs
//! covers Dovecot):
//! the same corpus served byte-exact over each TLS
//! mode, UIDL stability, the delete policies, `[IN-USE]`, `[AUTH]` and `[SYS/TEMP]`
//! (the server gone before login, or dying during RETR), through the real binary. The reference for every byte is what the server itself returns for `BODY[]`
//! (read with Python's imaplib), since its POP3 UIDL formats are its own.

mod common;

use common::{
    User, corpus, courier, cyrus, imap_fetch_all_at, imap_flags_at, normalized, responses, servers,
};

/// An IMAP server of the matrix: where it listens and how to seed it.
struct ImapServer {
    name: &'static str,
    imap_port: u16,
    imaps_port: u16,
    /// The `--imap-tls` modes it is tested with, most secure first.
    tls_modes: &'static [Tls],
    /// Its trash mailbox's name (`--trash-mailbox`): Courier's personal namespace is
    /// `INBOX.`, so a top-level `Trash` is an invalid name there.
    trash: &'static str,
    /// Makes `user` known to the server and appends `messages` to its INBOX, in order.
    seed: fn(&User, &[Vec<u8>]),
}

fn cyrus_server() -> ImapServer {
    let c = cyrus();
    ImapServer {
        name: "cyrus",
        imap_port: c.imap_port,
        imaps_port: c.imaps_port,
        tls_modes: &[Tls::Implicit, Tls::Starttls, Tls::Plain],
        trash: "Trash",
        seed: |user, messages| cyrus().seed(user, messages),
    }
}

fn courier_server() -> ImapServer {
    let c = courier();
    ImapServer {
        name: "courier",
        imap_port: c.imap_port,
        imaps_port: c.imaps_port,
        tls_modes: &[Tls::Implicit, Tls::Starttls, Tls::Plain],
        trash: "INBOX.Trash",
        seed: |user, messages| courier().seed(user, messages),
    }
}

#[derive(Clone, Copy, Debug)]
enum Tls {
    Implicit,
    Starttls,
    Plain,
}

/// Proxy options for `server` (like tests/pop3.rs's for Dovecot).
fn args(server: &ImapServer, tls: Tls, extra: &[&str]) -> Vec<String> {
    let s = servers();
    let (port, mode) = match tls {
        Tls::Implicit => (server.imaps_port, "implicit"),
        Tls::Starttls => (server.imap_port, "starttls"),
        Tls::Plain => (server.imap_port, "none"),
    };
    let locks = s.dir.join(format!("pop3-locks-{}", server.name));
    let mut args = common::pop3_proxy_args(port, mode, &locks);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn login(user: &User) -> String {
    format!("USER {}\r\nPASS {}\r\n", user.name, user.password)
}

/// Runs one proxy with `input`; returns (stdout, stderr).
fn dialogue(args: &[String], input: &str) -> (Vec<u8>, String) {
    let out = common::run_proxy(args, &[], input.as_bytes());
    (
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A user holding the corpus with CRLF line ends: Cyrus refuses bare LF in APPEND
/// ("Message contains bare newlines"), and CRLF is what RETR sends anyway.
fn seeded_user(server: &ImapServer, prefix: &str) -> User {
    let user = servers().new_user(&format!("{}-{prefix}", server.name));
    let messages: Vec<Vec<u8>> = corpus().iter().map(|m| normalized(m)).collect();
    (server.seed)(&user, &messages);
    user
}

/// STAT, LIST, UIDL and RETR of every message: sizes and bytes equal to the server's own
/// BODY[], UIDLs unique, no \Seen set, nothing deleted.
fn retr_matches_the_server(server: &ImapServer, tls: Tls) {
    let user = seeded_user(server, &format!("retr-{tls:?}"));
    let reference = imap_fetch_all_at(&user, server.imap_port, "INBOX");
    let n = reference.len();
    let stored: Vec<Vec<u8>> = reference.iter().map(|(_, m)| m.clone()).collect();
    let sent: Vec<Vec<u8>> = corpus().iter().map(|m| normalized(m)).collect();
    let firsts: Vec<String> = stored
        .iter()
        .map(|m| String::from_utf8_lossy(&m[..m.len().min(30)]).into_owned())
        .collect();
    assert_eq!(
        stored.len(),
        sent.len(),
        "{} holds {n} messages for {}: {firsts:?}",
        server.name,
        user.name
    );
    for (i, (stored, sent)) in stored.iter().zip(&sent).enumerate() {
        let at = stored.iter().zip(sent).position(|(a, b)| a != b);
        assert!(
            stored == sent,
            "{} did not store message {} as sent (lengths {} and {}, first difference at {at:?}): {:?}",
            server.name,
            i + 1,
            stored.len(),
            sent.len(),
            String::from_utf8_lossy(&stored[..stored.len().min(300)])
        );
    }
    let mut input = login(&user);
    input.push_str("STAT\r\nLIST\r\nUIDL\r\n");
    for i in 1..=n {
        input.push_str(&format!("RETR {i}\r\n"));
    }
    input.push_str("QUIT\r\n");
    let (out, log) = dialogue(&args(server, tls, &[]), &input);
    let mut shape = vec![false, false, false, false, true, true];
    shape.extend(std::iter::repeat_n(true, n));
    shape.push(false);
    let replies = responses(&out, &shape);
    assert_eq!(replies[2].0, "+OK Logged in.", "{log}");
    let total: usize = reference.iter().map(|(_, m)| m.len()).sum();
    assert_eq!(replies[3].0, format!("+OK {n} {total}"), "{log}");
    let list: Vec<String> = (1..=n)
        .map(|i| format!("{i} {}\r\n", reference[i - 1].1.len()))
        .collect();
    assert_eq!(String::from_utf8_lossy(&replies[4].1), list.concat());
    let uidls: std::collections::BTreeSet<String> = String::from_utf8_lossy(&replies[5].1)
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect();
    assert_eq!(uidls.len(), n, "UIDLs not unique: {uidls:?}");
    for (i, (_, raw)) in reference.iter().enumerate() {
        let (status, body) = &replies[6 + i];
        assert_eq!(status, &format!("+OK {} octets", raw.len()), "{log}");
        assert!(
            body == &normalized(raw),
            "message {} differs from BODY[]",
            i + 1
        );
    }
    assert_eq!(replies[6 + n].0, "+OK Bye.");
    for (uid, flags) in imap_flags_at(&user, server.imap_port) {
        assert!(!flags.iter().any(|f| f == "\\Seen"), "uid {uid}: {flags:?}");
    }
}

#[test]
fn cyrus_retr_matches_the_server_over_implicit_tls() {
    retr_matches_the_server(&cyrus_server(), Tls::Implicit);
}

#[test]
fn cyrus_retr_matches_the_server_over_starttls() {
    retr_matches_the_server(&cyrus_server(), Tls::Starttls);
}

#[test]
fn cyrus_retr_matches_the_server_over_plain_imap() {
    retr_matches_the_server(&cyrus_server(), Tls::Plain);
}

/// The same UIDLs in a later session, plus one for a message that arrived in between.
fn uidls_are_stable(server: &ImapServer) {
    let user = seeded_user(server, "uidl");
    let input = format!("{}UIDL\r\nQUIT\r\n", login(&user));
    let shape = [false, false, false, true, false];
    let (first, log) = dialogue(&args(server, server.tls_modes[0], &[]), &input);
    (server.seed)(&user, &[b"Subject: later\r\n\r\nhi\r\n".to_vec()]);
    let (second, _) = dialogue(&args(server, Tls::Plain, &[]), &input);
    let first = String::from_utf8_lossy(&responses(&first, &shape)[3].1).into_owned();
    let second = String::from_utf8_lossy(&responses(&second, &shape)[3].1).into_owned();
    assert_eq!(first.lines().count(), corpus().len(), "{log}");
    assert!(second.starts_with(&first), "{first}\nthen\n{second}");
    assert_eq!(second.lines().count(), first.lines().count() + 1);
}

#[test]
fn cyrus_uidls_are_stable_across_sessions() {
    uidls_are_stable(&cyrus_server());
}

/// What a server held, as (UID, message bytes).
type Mailbox = Vec<(u32, Vec<u8>)>;

/// DELE 1 and 3, QUIT under `policy`; returns the user, the deleted UIDs and the
/// mailbox before.
fn delete_with_policy(server: &ImapServer, policy: &str) -> (User, Vec<u32>, Mailbox) {
    let (user, before, out, log) = try_delete_with_policy(server, policy, server.trash);
    assert!(
        out.ends_with("+OK Bye, 2 messages deleted.\r\n"),
        "{out}\n{log}"
    );
    (user, vec![before[0].0, before[2].0], before)
}

/// DELE 1 and 3, QUIT under `policy` with `--trash-mailbox trash`; returns the user, the
/// mailbox before, and the proxy's output and log.
fn try_delete_with_policy(
    server: &ImapServer,
    policy: &str,
    trash: &str,
) -> (User, Mailbox, String, String) {
    let user = servers().new_user(&format!("{}-dele-{policy}", server.name));
    (server.seed)(
        &user,
        &[
            b"Subject: m1\r\n\r\none\r\n".to_vec(),
            b"Subject: m2\r\n\r\ntwo\r\n".to_vec(),
            b"Subject: m3\r\n\r\nthree\r\n".to_vec(),
        ],
    );
    let before = imap_fetch_all_at(&user, server.imap_port, "INBOX");
    let input = format!("{}DELE 1\r\nDELE 3\r\nQUIT\r\n", login(&user));
    let options = ["--delete-policy", policy, "--trash-mailbox", trash];
    let (out, log) = dialogue(&args(server, Tls::Plain, &options), &input);
    (
        user,
        before,
        String::from_utf8_lossy(&out).into_owned(),
        log,
    )
}

/// A wrong password is `-ERR [AUTH]` (not `[SYS/TEMP]`), and the password is not logged.
fn wrong_password_gets_auth(server: &ImapServer) {
    let user = seeded_user(server, "badpw");
    let input = format!("USER {}\r\nPASS wrong-one\r\nQUIT\r\n", user.name);
    let (out, log) = dialogue(&args(server, server.tls_modes[0], &[]), &input);
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("\r\n-ERR [AUTH] Authentication failed.\r\n"),
        "{out}\n{log}"
    );
    assert!(!log.contains("wrong-one"), "{log}");
}

#[test]
fn cyrus_wrong_password_gets_auth() {
    wrong_password_gets_auth(&cyrus_server());
}

/// A second session while one holds the mailbox gets `-ERR [IN-USE]`.
fn second_session_gets_in_use(server: &ImapServer) {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let user = seeded_user(server, "inuse");
    let args = args(server, Tls::Plain, &[]);
    let mut first = Command::new(common::proxy_bin())
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = first.stdin.take().unwrap();
    let mut stdout = BufReader::new(first.stdout.take().unwrap());
    stdin.write_all(login(&user).as_bytes()).unwrap();
    let mut line = String::new();
    for _ in 0..3 {
        line.clear();
        stdout.read_line(&mut line).unwrap();
    }
    assert_eq!(line, "+OK Logged in.\r\n");
    let (out, log) = dialogue(&args, &format!("{}QUIT\r\n", login(&user)));
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("-ERR [IN-USE]"), "{out}\n{log}");
    stdin.write_all(b"QUIT\r\n").unwrap();
    drop(stdin);
    first.wait().unwrap();
}

#[test]
fn cyrus_a_second_session_on_the_same_mailbox_gets_in_use() {
    second_session_gets_in_use(&cyrus_server());
}

#[test]
fn courier_retr_matches_the_server_over_implicit_tls() {
    retr_matches_the_server(&courier_server(), Tls::Implicit);
}

/// Courier's STARTTLS (on the plain port, as Debian's `IMAPDSTARTTLS=YES`): couriertls is
/// started by imaplogin after its tagged OK, under the `courier` user (see
/// tests/common/courier.rs).
#[test]
fn courier_retr_matches_the_server_over_starttls() {
    retr_matches_the_server(&courier_server(), Tls::Starttls);
}

#[test]
fn courier_retr_matches_the_server_over_plain_imap() {
    retr_matches_the_server(&courier_server(), Tls::Plain);
}

#[test]
fn courier_uidls_are_stable_across_sessions() {
    uidls_are_stable(&courier_server());
}

#[test]
fn courier_wrong_password_gets_auth() {
    wrong_password_gets_auth(&courier_server());
}

#[test]
fn courier_a_second_session_on_the_same_mailbox_gets_in_use() {
    second_session_gets_in_use(&courier_server());
}

fn delete_policy_expunge_removes_only_the_deleted_messages(c: &ImapServer) {
    let (user, _, before) = delete_with_policy(c, "expunge");
    assert_eq!(
        imap_fetch_all_at(&user, c.imap_port, "INBOX"),
        vec![before[1].clone()]
    );
}

#[test]
fn cyrus_delete_policy_expunge_removes_only_the_deleted_messages() {
    delete_policy_expunge_removes_only_the_deleted_messages(&cyrus_server());
}

fn delete_policy_hide_sets_the_keyword(c: &ImapServer) {
    let (user, deleted, before) = delete_with_policy(c, "hide");
    assert_eq!(imap_fetch_all_at(&user, c.imap_port, "INBOX"), before);
    for (uid, flags) in imap_flags_at(&user, c.imap_port) {
        assert_eq!(
            flags.iter().any(|f| f == "$POP3Deleted"),
            deleted.contains(&uid),
            "uid {uid}: {flags:?}"
        );
    }
}

#[test]
fn cyrus_delete_policy_hide_sets_the_keyword() {
    delete_policy_hide_sets_the_keyword(&cyrus_server());
}

/// Cyrus has MOVE; Courier has UIDPLUS but no MOVE (COPY, \\Deleted, UID EXPUNGE there).
/// The trash mailbox does not exist yet: both answer `[TRYCREATE]` and the proxy creates it.
fn delete_policy_trash_moves_to_the_trash_mailbox(c: &ImapServer) {
    let (user, _, before) = delete_with_policy(c, "trash");
    assert_eq!(
        imap_fetch_all_at(&user, c.imap_port, "INBOX"),
        vec![before[1].clone()]
    );
    let trash: Vec<Vec<u8>> = imap_fetch_all_at(&user, c.imap_port, c.trash)
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert_eq!(trash, vec![before[0].1.clone(), before[2].1.clone()]);
}

#[test]
fn cyrus_delete_policy_trash_moves_to_the_trash_mailbox() {
    delete_policy_trash_moves_to_the_trash_mailbox(&cyrus_server());
}

#[test]
fn courier_delete_policy_expunge_removes_only_the_deleted_messages() {
    delete_policy_expunge_removes_only_the_deleted_messages(&courier_server());
}

#[test]
fn courier_delete_policy_hide_sets_the_keyword() {
    delete_policy_hide_sets_the_keyword(&courier_server());
}

#[test]
fn courier_delete_policy_trash_moves_to_the_trash_mailbox() {
    delete_policy_trash_moves_to_the_trash_mailbox(&courier_server());
}

/// With the default `--trash-mailbox Trash`, Courier (personal namespace `INBOX.`) answers
/// the COPY with a bare NO ("Error in IMAP command received by server.", no
/// `[TRYCREATE]`): QUIT reports the failure, and nothing is removed.
#[test]
fn courier_trash_outside_its_namespace_fails_at_quit_and_loses_nothing() {
    let c = courier_server();
    let (user, before, out, log) = try_delete_with_policy(&c, "trash", "Trash");
    assert!(
        out.ends_with("-ERR [SYS/TEMP] Some deleted messages were not removed\r\n"),
        "{out}\n{log}"
    );
    assert!(
        log.contains("Error in IMAP command received by server"),
        "{log}"
    );
    assert_eq!(imap_fetch_all_at(&user, c.imap_port, "INBOX"), before);
}

/// The server's connection cut (through a fault-injecting TCP proxy) at once: `[SYS/TEMP]`,
/// not `[AUTH]`. Cut while RETR streams a 1.5 MB message: the client never gets the
/// terminating dot (it would store a truncated message as complete), QUIT is not answered,
/// and the message is still on the server.
fn sys_temp_when_the_server_goes_away(server: &ImapServer) {
    let user = servers().new_user(&format!("{}-cut", server.name));
    let big = common::message_to_cut();
    (server.seed)(&user, &[big]);
    let through_fault = |cut_after: usize, commands: &str| {
        let fault = common::FaultProxy::start(server.imap_port, cut_after);
        let mut args = args(server, Tls::Plain, &[]);
        let at = args.iter().position(|a| a == "--imap-port").unwrap();
        args[at + 1] = fault.port().to_string();
        let out = common::run_proxy(&args, &[], format!("{}{commands}", login(&user)).as_bytes());
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.success(),
        )
    };
    let (text, log, _) = through_fault(0, "QUIT\r\n");
    assert!(text.contains("\r\n-ERR [SYS/TEMP]"), "{text}\n{log}");
    let (text, log, ok) = through_fault(300_000, "RETR 1\r\nQUIT\r\n");
    assert!(!ok, "the proxy must report failure\n{log}");
    assert!(text.contains("+OK 1"), "{text:.300}\n{log}");
    assert!(text.len() > 290_000, "the message was streamed as it came");
    assert!(
        !text.ends_with("\r\n.\r\n"),
        "a truncated message was ended as if complete"
    );
    assert!(
        !text.contains("+OK Bye"),
        "QUIT answered after a failed RETR"
    );
    assert_eq!(imap_fetch_all_at(&user, server.imap_port, "INBOX").len(), 1);
}

#[test]
fn cyrus_sys_temp_when_the_server_goes_away() {
    sys_temp_when_the_server_goes_away(&cyrus_server());
}

#[test]
fn courier_sys_temp_when_the_server_goes_away() {
    sys_temp_when_the_server_goes_away(&courier_server());
}

/// What Courier sent while its couriertls could not start (the user `courier` missing; see
/// tests/common/courier.rs), replayed byte for byte by a one-connection stand-in: the tagged
/// OK, then its failure in plain text where the TLS handshake was due. The client gets
/// `[SYS/TEMP]`, and the log says the server's TLS side failed after agreeing, rather than
/// suggesting another `--imap-tls` mode.
#[test]
fn starttls_ok_then_plain_text_is_logged_as_the_server_tls_side_failing() {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (socket, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(socket.try_clone().unwrap());
        let mut writer = socket;
        writer
            .write_all(
                b"* OK [CAPABILITY IMAP4rev1 UIDPLUS CHILDREN NAMESPACE SORT QUOTA IDLE STARTTLS \
                  ENABLE UTF8=ACCEPT] Courier-IMAP ready.\r\n",
            )
            .unwrap();
        let mut command = String::new();
        reader.read_line(&mut command).unwrap();
        let tag = command.split(' ').next().unwrap().to_string();
        let reply = format!(
            "{tag} OK Begin SSL/TLS negotiation now.\r\n\
             {tag} NO STARTTLS failed: 500 Error starting couriertls.\r\n\
             * NO Error in IMAP command received by server.\r\n"
        );
        // The proxy may already have closed after its failed handshake.
        let _ = writer.write_all(reply.as_bytes());
        command
    });
    let locks = servers().dir.join("pop3-locks-starttls-plain-text");
    let args = common::pop3_proxy_args(port, "starttls", &locks);
    let user = servers().new_user("starttls-plain-text");
    let (out, log) = dialogue(&args, &format!("{}QUIT\r\n", login(&user)));
    let command = server.join().unwrap();
    assert!(command.ends_with(" STARTTLS\r\n"), "{command:?}");
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("\r\n-ERR [SYS/TEMP] "), "{text}");
    assert!(
        log.contains("wrong version number") && log.contains("said OK to STARTTLS"),
        "{log}"
    );
}
