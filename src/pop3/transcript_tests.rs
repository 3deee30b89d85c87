//! Byte-exact transcripts of the POP3 core against the in-memory maildrop. Each transcript
//! is also replayed one byte at a time (and at other read sizes) to prove that how the
//! client's bytes arrive changes nothing, and sent all at once to prove pipelining works.

use super::NulBytes;
use super::maildrop::OpenError;
use super::memory::MemoryOpener;
use super::session::{Config, End, Session, Summary};
use std::io::{BufReader, Read};
use std::time::Duration;

const GREETING: &str = "+OK legacy-mail-proxy POP3 ready.\r\n";
const M1: &[u8] = b"From: a@example.test\r\nSubject: one\r\n\r\nHello\r\n.dot line\r\n";
const M2: &[u8] = b"Subject: two\n\nbare\nlf\n";
const M3: &[u8] = b"Subject: three\r\n\r\nno final newline";

fn opener() -> MemoryOpener {
    MemoryOpener::new(
        "alice",
        "pa ss\"\\é",
        vec![M1.to_vec(), M2.to_vec(), M3.to_vec()],
    )
}

fn config() -> Config {
    Config {
        auth_failure_delay: Duration::ZERO,
        ..Config::default()
    }
}

fn run_with(
    opener: &mut MemoryOpener,
    config: Config,
    input: &[u8],
    read_size: usize,
) -> (String, Summary) {
    let reader = BufReader::with_capacity(read_size, input);
    let mut output = Vec::new();
    let summary = Session::new(reader, &mut output, opener, config).run();
    (String::from_utf8_lossy(&output).into_owned(), summary)
}

/// Runs `input` whole, then one byte at a time and at a few other read sizes, with a fresh
/// opener each time; all runs must produce the same bytes.
fn transcript(make: impl Fn() -> MemoryOpener, input: &[u8]) -> (String, Summary, MemoryOpener) {
    let mut first = make();
    let (out, summary) = run_with(&mut first, config(), input, input.len().max(1));
    for size in [1, 2, 3, 5, 64] {
        let mut again = make();
        let (other, other_summary) = run_with(&mut again, config(), input, size);
        assert_eq!(other, out, "read size {size} changed the output");
        assert_eq!(
            other_summary, summary,
            "read size {size} changed the summary"
        );
    }
    (out, summary, first)
}

const LOGIN: &str = "USER alice\r\nPASS pa ss\"\\é\r\n";
const LOGGED_IN: &str = "+OK\r\n+OK Logged in.\r\n";

#[test]
fn full_session_with_every_transaction_command() {
    let input = format!(
        "{LOGIN}STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 3\r\nTOP 1 0\r\nTOP 1 1\r\nRETR 1\r\nRETR 2\r\nRETR 3\r\nNOOP\r\nQUIT\r\n"
    );
    let (out, summary, opener) = transcript(opener, input.as_bytes());
    let m1 = "From: a@example.test\r\nSubject: one\r\n\r\nHello\r\n..dot line\r\n";
    let expected = format!(
        "{GREETING}{LOGGED_IN}\
         +OK 3 118\r\n\
         +OK\r\n1 56\r\n2 26\r\n3 36\r\n.\r\n\
         +OK 2 26\r\n\
         +OK\r\n1 00000001000004d2\r\n2 00000002000004d2\r\n3 00000003000004d2\r\n.\r\n\
         +OK 3 00000003000004d2\r\n\
         +OK\r\nFrom: a@example.test\r\nSubject: one\r\n\r\n.\r\n\
         +OK\r\nFrom: a@example.test\r\nSubject: one\r\n\r\nHello\r\n.\r\n\
         +OK 56 octets\r\n{m1}.\r\n\
         +OK 26 octets\r\nSubject: two\r\n\r\nbare\r\nlf\r\n.\r\n\
         +OK 36 octets\r\nSubject: three\r\n\r\nno final newline\r\n.\r\n\
         +OK\r\n\
         +OK Bye.\r\n"
    );
    assert_eq!(out, expected);
    assert_eq!(summary.end, End::Quit);
    assert_eq!(summary.user.as_deref(), Some("alice"));
    assert_eq!(
        (summary.listed, summary.retrieved, summary.deleted),
        (3, 3, 0)
    );
    let journal = opener.journal.borrow();
    assert_eq!(journal.marked_seen, vec![0, 1, 2]);
    assert!(journal.deleted.is_empty());
    assert!(journal.closed);
}

#[test]
fn sizes_in_list_match_the_octets_retr_sends_before_stuffing() {
    let (out, _, _) = transcript(
        opener,
        format!("{LOGIN}LIST 1\r\nRETR 1\r\nQUIT\r\n").as_bytes(),
    );
    let body_start = out.find("octets\r\n").unwrap() + 8;
    let body = &out[body_start..out.rfind(".\r\n+OK Bye").unwrap()];
    let unstuffed = body.replace("\r\n..", "\r\n.");
    assert!(
        out.contains(&format!("+OK 1 {}\r\n", unstuffed.len())),
        "{out}"
    );
}

#[test]
fn dele_hides_messages_rset_restores_and_quit_applies() {
    let input = format!(
        "{LOGIN}DELE 2\r\nDELE 2\r\nSTAT\r\nLIST\r\nUIDL 2\r\nRETR 2\r\nTOP 2 1\r\nLIST 2\r\nRSET\r\nSTAT\r\nDELE 1\r\nDELE 3\r\nQUIT\r\n"
    );
    let (out, summary, opener) = transcript(opener, input.as_bytes());
    let expected = format!(
        "{GREETING}{LOGGED_IN}\
         +OK Marked to be deleted.\r\n\
         -ERR Message is deleted\r\n\
         +OK 2 92\r\n\
         +OK\r\n1 56\r\n3 36\r\n.\r\n\
         -ERR Message is deleted\r\n\
         -ERR Message is deleted\r\n\
         -ERR Message is deleted\r\n\
         -ERR Message is deleted\r\n\
         +OK\r\n\
         +OK 3 118\r\n\
         +OK Marked to be deleted.\r\n\
         +OK Marked to be deleted.\r\n\
         +OK Bye, 2 messages deleted.\r\n"
    );
    assert_eq!(out, expected);
    assert_eq!(opener.journal.borrow().deleted, vec![0, 2]);
    assert_eq!(summary.deleted, 2);
}

#[test]
fn a_connection_that_ends_without_quit_deletes_nothing() {
    for ending in ["", "QUI", "NOOP\r\n"] {
        let input = format!("{LOGIN}DELE 1\r\nDELE 2\r\n{ending}");
        let (_, summary, opener) = transcript(opener, input.as_bytes());
        assert_eq!(summary.end, End::ClientClosed);
        assert!(opener.journal.borrow().deleted.is_empty());
        assert!(opener.journal.borrow().closed);
    }
}

#[test]
fn message_numbers_are_checked_each_way_they_can_be_wrong() {
    let input = format!(
        "{LOGIN}RETR 0\r\nRETR 4\r\nRETR x\r\nRETR 1x\r\nRETR -1\r\nRETR +1\r\nRETR 99999999999999999999999\r\nLIST 0\r\nTOP 1 x\r\nTOP 1 -1\r\nDELE 9\r\nQUIT\r\n"
    );
    let (out, _, _) = transcript(opener, input.as_bytes());
    let expected = format!(
        "{GREETING}{LOGGED_IN}\
         -ERR No such message\r\n\
         -ERR No such message\r\n\
         -ERR Invalid message number\r\n\
         -ERR Invalid message number\r\n\
         -ERR Invalid message number\r\n\
         -ERR Invalid message number\r\n\
         -ERR No such message\r\n\
         -ERR No such message\r\n\
         -ERR Invalid number of lines\r\n\
         -ERR Invalid number of lines\r\n\
         -ERR No such message\r\n\
         +OK Bye.\r\n"
    );
    assert_eq!(out, expected);
}

#[test]
fn top_with_more_lines_than_the_body_sends_the_whole_message() {
    let (out, _, _) = transcript(
        opener,
        format!("{LOGIN}TOP 2 99999999999999999999999\r\nQUIT\r\n").as_bytes(),
    );
    assert!(
        out.contains("+OK\r\nSubject: two\r\n\r\nbare\r\nlf\r\n.\r\n"),
        "{out}"
    );
}

#[test]
fn commands_in_the_wrong_state_are_refused() {
    let input = "STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 1 1\r\nDELE 1\r\nRSET\r\nNOOP\r\nPASS x\r\n\
                 USER alice\r\nPASS pa ss\"\\é\r\nUSER bob\r\nPASS x\r\nAUTH PLAIN\r\nQUIT\r\n";
    let (out, _, _) = transcript(opener, input.as_bytes());
    let not_in = "-ERR Log in first (USER/PASS or AUTH)\r\n".repeat(8);
    let expected = format!(
        "{GREETING}{not_in}-ERR Give USER first\r\n{LOGGED_IN}\
         -ERR Already logged in\r\n-ERR Already logged in\r\n-ERR Already logged in\r\n\
         +OK Bye.\r\n"
    );
    assert_eq!(out, expected);
}

#[test]
fn capa_lists_what_works_in_each_state() {
    let (out, _, _) = transcript(
        opener,
        format!("CAPA\r\n{LOGIN}CAPA\r\nQUIT\r\n").as_bytes(),
    );
    let implementation = format!(
        "IMPLEMENTATION legacy-mail-proxy-{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    let expected = format!(
        "{GREETING}+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n{implementation}.\r\n\
         {LOGGED_IN}+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n{implementation}.\r\n\
         +OK Bye.\r\n"
    );
    assert_eq!(out, expected);
}

#[test]
fn capa_advertises_expire_only_when_configured() {
    let mut opener = opener();
    let config = Config {
        capa_expire: Some("NEVER".into()),
        ..config()
    };
    let (out, _) = run_with(&mut opener, config, b"CAPA\r\nQUIT\r\n", 64);
    assert!(out.contains("\r\nEXPIRE NEVER\r\n"), "{out}");
}

#[test]
fn auth_plain_with_initial_response_and_continuation() {
    // authzid empty, authcid alice, password with space, quote, backslash and é.
    let token = crate::base64::encode("\0alice\0pa ss\"\\é".as_bytes());
    let with_authzid = crate::base64::encode("alice\0alice\0pa ss\"\\é".as_bytes());
    for input in [
        format!("AUTH PLAIN {token}\r\nQUIT\r\n"),
        format!("AUTH plain\r\n{token}\r\nQUIT\r\n"),
        format!("AUTH PLAIN {with_authzid}\r\nQUIT\r\n"),
    ] {
        let (out, summary, _) = transcript(opener, input.as_bytes());
        assert!(out.ends_with("+OK Logged in.\r\n+OK Bye.\r\n"), "{out}");
        assert_eq!(summary.user.as_deref(), Some("alice"));
    }
    let (out, _, _) = transcript(
        opener,
        format!("AUTH PLAIN\r\n{token}\r\nQUIT\r\n").as_bytes(),
    );
    assert_eq!(
        out,
        format!("{GREETING}+ \r\n+OK Logged in.\r\n+OK Bye.\r\n")
    );
}

#[test]
fn auth_errors() {
    let wrong = crate::base64::encode(b"\0alice\0nope");
    let other_authzid = crate::base64::encode(b"root\0alice\0pa ss\"\\\xc3\xa9");
    let input = format!(
        "AUTH\r\nAUTH CRAM-MD5\r\nAUTH PLAIN\r\n*\r\nAUTH PLAIN !!!!\r\nAUTH PLAIN {}\r\nAUTH PLAIN {wrong}\r\nAUTH PLAIN {other_authzid}\r\nQUIT\r\n",
        crate::base64::encode(b"no-nuls")
    );
    let (out, summary, _) = transcript(opener, input.as_bytes());
    let expected = format!(
        "{GREETING}+OK\r\nPLAIN\r\n.\r\n\
         -ERR Unsupported authentication mechanism\r\n\
         + \r\n-ERR Authentication cancelled\r\n\
         -ERR Invalid base64 in authentication response\r\n\
         -ERR Malformed PLAIN response\r\n\
         -ERR [AUTH] Authentication failed.\r\n\
         -ERR [AUTH] Authentication failed.\r\n\
         +OK Bye.\r\n"
    );
    assert_eq!(out, expected);
    assert_eq!(summary.end, End::Quit);
}

#[test]
fn third_failed_login_closes_the_connection() {
    let input = "USER alice\r\nPASS a\r\nUSER alice\r\nPASS b\r\nUSER alice\r\nPASS c\r\nUSER alice\r\nPASS pa ss\"\\é\r\n";
    let (out, summary, opener) = transcript(opener, input.as_bytes());
    let fail = "+OK\r\n-ERR [AUTH] Authentication failed.\r\n";
    assert_eq!(out, format!("{GREETING}{fail}{fail}{fail}"));
    assert_eq!(summary.end, End::TooManyAuthFailures);
    assert!(opener.journal.borrow().logins.is_empty());
}

#[test]
fn failed_login_waits_before_answering() {
    let mut opener = opener();
    let config = Config {
        auth_failure_delay: Duration::from_millis(300),
        ..config()
    };
    let started = std::time::Instant::now();
    let (out, _) = run_with(&mut opener, config, b"USER alice\r\nPASS wrong\r\n", 64);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(out.ends_with("-ERR [AUTH] Authentication failed.\r\n"));
}

#[test]
fn backend_outage_is_sys_temp_not_auth_and_in_use_is_reported() {
    type Case = (fn() -> OpenError, &'static str);
    let cases: [Case; 3] = [
        (
            || OpenError::Temporary("connection refused".into()),
            "-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n",
        ),
        (
            || OpenError::InUse,
            "-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n",
        ),
        (
            || OpenError::Permanent("no such mailbox".into()),
            "-ERR [SYS/PERM] Mail server cannot serve this mailbox\r\n",
        ),
    ];
    for (error, reply) in cases {
        let make = || {
            let mut opener = opener();
            opener.open_error = Some(error);
            opener
        };
        // Several in a row must not close the connection the way auth failures do.
        let (out, summary, _) = transcript(
            make,
            format!("{LOGIN}{LOGIN}{LOGIN}{LOGIN}QUIT\r\n").as_bytes(),
        );
        assert_eq!(
            out,
            format!(
                "{GREETING}{}+OK Bye.\r\n",
                format!("+OK\r\n{reply}").repeat(4)
            )
        );
        assert_eq!(summary.end, End::Quit);
    }
}

#[test]
fn message_expunged_elsewhere_fails_alone() {
    let make = || {
        let mut opener = opener();
        opener.gone = vec![1];
        opener
    };
    let (out, summary, _) = transcript(
        make,
        format!("{LOGIN}RETR 2\r\nTOP 2 0\r\nRETR 3\r\nQUIT\r\n").as_bytes(),
    );
    let expected = format!(
        "{GREETING}{LOGGED_IN}\
         -ERR Message was deleted by another client\r\n\
         -ERR Message was deleted by another client\r\n\
         +OK 36 octets\r\nSubject: three\r\n\r\nno final newline\r\n.\r\n\
         +OK Bye.\r\n"
    );
    assert_eq!(out, expected);
    assert_eq!(summary.retrieved, 1);
}

#[test]
fn backend_dying_mid_message_closes_without_the_terminating_dot() {
    let make = || {
        let mut opener = opener();
        opener.die_after = Some(30);
        opener
    };
    let (out, summary, opener) = transcript(
        make,
        format!("{LOGIN}DELE 3\r\nRETR 1\r\nQUIT\r\n").as_bytes(),
    );
    let expected = format!(
        "{GREETING}{LOGGED_IN}+OK Marked to be deleted.\r\n+OK 56 octets\r\nFrom: a@example.test\r\nSubject:"
    );
    assert_eq!(out, expected);
    assert!(matches!(summary.end, End::BackendFailed(_)));
    assert!(
        opener.journal.borrow().deleted.is_empty(),
        "no QUIT, no delete"
    );
}

#[test]
fn dele_is_refused_clearly_when_the_backend_cannot_delete() {
    let make = || {
        let mut opener = opener();
        opener.cannot_delete = Some("server has no UIDPLUS".into());
        opener
    };
    let (out, _, opener) = transcript(
        make,
        format!("{LOGIN}DELE 1\r\nSTAT\r\nQUIT\r\n").as_bytes(),
    );
    assert!(
        out.contains("-ERR [SYS/PERM] Cannot delete: server has no UIDPLUS\r\n+OK 3 118\r\n"),
        "{out}"
    );
    assert!(opener.journal.borrow().deleted.is_empty());
}

#[test]
fn failed_update_answers_err_at_quit() {
    let make = || {
        let mut opener = opener();
        opener.delete_fails = true;
        opener
    };
    let (out, summary, _) = transcript(make, format!("{LOGIN}DELE 1\r\nQUIT\r\n").as_bytes());
    assert!(out.ends_with(
        "+OK Marked to be deleted.\r\n-ERR [SYS/TEMP] Some deleted messages were not removed\r\n"
    ));
    assert!(matches!(summary.end, End::UpdateFailed(_)));
    assert_eq!(summary.deleted, 0);
}

#[test]
fn overlong_lines_and_junk_get_errors_and_twenty_bad_commands_close() {
    let mut input = format!("{}\r\nNOOP\r\n", "X".repeat(5000));
    input.push_str("\u{1}\u{2}\u{3}\r\n");
    input.push_str(&"BOGUS\r\n".repeat(30));
    let (out, summary, _) = transcript(opener, input.as_bytes());
    let mut expected = format!(
        "{GREETING}-ERR Line too long\r\n-ERR Log in first (USER/PASS or AUTH)\r\n-ERR Unknown command\r\n"
    );
    expected.push_str(&"-ERR Unknown command\r\n".repeat(16));
    expected.push_str("-ERR Too many bad commands, closing.\r\n");
    assert_eq!(out, expected);
    assert_eq!(summary.end, End::TooManyBadCommands);
}

#[test]
fn binary_junk_and_bare_lf_commands_do_not_break_the_session() {
    let mut input =
        b"\xff\xfe\x00\r\nUSER alice\nPASS pa ss\"\\\xc3\xa9\nRETR \xff\nSTAT\nQUIT\n".to_vec();
    input.extend_from_slice(b"never read\r\n");
    let (out, summary, _) = transcript(opener, &input);
    let expected = format!(
        "{GREETING}-ERR Unknown command\r\n{LOGGED_IN}-ERR Invalid message number\r\n+OK 3 118\r\n+OK Bye.\r\n"
    );
    assert_eq!(out, expected);
    assert_eq!(summary.end, End::Quit);
}

#[test]
fn nul_bytes_are_replaced_by_default_and_kept_on_request() {
    let make = || MemoryOpener::new("alice", "pw", vec![b"A: 1\r\n\r\nx\0y\r\n".to_vec()]);
    let (out, _, _) = transcript(make, b"USER alice\r\nPASS pw\r\nRETR 1\r\nQUIT\r\n");
    assert!(
        out.contains("x\u{FFFD}y"),
        "0x80 appears (lossy) instead of NUL: {out:?}"
    );
    let mut opener = make();
    let config = Config {
        nul_bytes: NulBytes::Keep,
        ..config()
    };
    let (out, _) = run_with(
        &mut opener,
        config,
        b"USER alice\r\nPASS pw\r\nRETR 1\r\nQUIT\r\n",
        64,
    );
    assert!(out.contains("x\0y"));
}

#[test]
fn empty_maildrop() {
    let make = || MemoryOpener::new("alice", "pw", Vec::new());
    let (out, _, _) = transcript(
        make,
        b"USER alice\r\nPASS pw\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nQUIT\r\n",
    );
    let expected = format!(
        "{GREETING}{LOGGED_IN}+OK 0 0\r\n+OK\r\n.\r\n+OK\r\n.\r\n-ERR No such message\r\n+OK Bye.\r\n"
    );
    assert_eq!(out, expected);
}

#[test]
fn empty_and_headerless_messages() {
    let make = || {
        MemoryOpener::new(
            "alice",
            "pw",
            vec![Vec::new(), b"no separator\r\nat all".to_vec()],
        )
    };
    let (out, _, _) = transcript(
        make,
        b"USER alice\r\nPASS pw\r\nLIST\r\nRETR 1\r\nTOP 1 0\r\nTOP 2 0\r\nRETR 2\r\nQUIT\r\n",
    );
    let expected = format!(
        "{GREETING}{LOGGED_IN}+OK\r\n1 0\r\n2 22\r\n.\r\n\
         +OK 0 octets\r\n.\r\n\
         +OK\r\n.\r\n\
         +OK\r\nno separator\r\nat all\r\n.\r\n\
         +OK 22 octets\r\nno separator\r\nat all\r\n.\r\n\
         +OK Bye.\r\n"
    );
    assert_eq!(out, expected);
}

/// Input that stalls (read timeouts) before sending anything more.
struct Stalling {
    stalls: usize,
    rest: &'static [u8],
}

impl Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.stalls > 0 {
            self.stalls -= 1;
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.rest.read(buf)
    }
}

#[test]
fn idle_ticks_keep_the_backend_alive_and_the_idle_limit_logs_out() {
    let mut opener = opener();
    let journal = opener.journal.clone();
    let input = BufReader::new(Stalling {
        stalls: 3,
        rest: b"STAT\r\nQUIT\r\n",
    });
    let mut output = Vec::new();
    // Log in first with a whole transcript, then stall: use a chained reader.
    let login = std::io::Cursor::new(LOGIN.as_bytes());
    let summary = Session::new(
        BufReader::new(login.chain(input)),
        &mut output,
        &mut opener,
        config(),
    )
    .run();
    assert_eq!(summary.end, End::Quit);
    assert_eq!(journal.borrow().keepalives, 3);

    let mut opener = self::opener();
    let config = Config {
        idle_timeout: Duration::ZERO,
        ..config()
    };
    let mut output = Vec::new();
    let input = BufReader::new(Stalling {
        stalls: 1,
        rest: b"STAT\r\n",
    });
    let summary = Session::new(input, &mut output, &mut opener, config).run();
    assert_eq!(summary.end, End::IdleTimeout);
    assert!(
        String::from_utf8(output)
            .unwrap()
            .ends_with("-ERR Disconnected for inactivity.\r\n")
    );
}

/// A tiny deterministic PRNG (xorshift64*), so failures reproduce without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_sessions_never_panic_and_never_delete_without_quit() {
    let words = [
        "USER alice",
        "PASS pa ss\"\\é",
        "PASS x",
        "STAT",
        "LIST",
        "LIST 2",
        "UIDL",
        "UIDL 9",
        "RETR 1",
        "RETR 3",
        "TOP 1 0",
        "TOP 2 1",
        "DELE 1",
        "DELE 2",
        "RSET",
        "NOOP",
        "CAPA",
        "AUTH",
        "AUTH PLAIN",
        "AGFsaWNlAHBhIHNzIlzDqQ==",
        "*",
        "QUIT",
        "",
        " ",
        ".",
        "\u{0}",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..3000 {
        let mut input = Vec::new();
        for _ in 0..rng.below(12) {
            if rng.below(5) == 0 {
                for _ in 0..rng.below(40) {
                    input.push(rng.next() as u8);
                }
            } else {
                input.extend_from_slice(words[rng.below(words.len())].as_bytes());
            }
            input.extend_from_slice(if rng.below(4) == 0 { b"\n" } else { b"\r\n" });
        }
        let mut opener = opener();
        opener.chunk = 1 + rng.below(9);
        let journal = opener.journal.clone();
        let (out, summary) = run_with(&mut opener, config(), &input, 1 + rng.below(16));
        assert!(out.starts_with(GREETING), "round {round}");
        if summary.end != End::Quit {
            assert!(
                journal.borrow().deleted.is_empty(),
                "round {round}: deleted without QUIT"
            );
        }
        assert!(summary.deleted <= 3);
    }
}

#[test]
fn latin1_credentials_are_read_as_latin1_not_refused() {
    // "pässwörd" as an old Windows client sends it: CP1252/Latin-1 bytes, not UTF-8.
    let make = || MemoryOpener::new("jürgen", "pässwörd", vec![M1.to_vec()]);
    let (out, summary, _) = transcript(
        make,
        b"USER j\xfcrgen\r\nPASS p\xe4ssw\xf6rd\r\nSTAT\r\nQUIT\r\n",
    );
    assert!(out.contains("+OK Logged in.\r\n+OK 1 56\r\n"), "{out}");
    assert_eq!(summary.user.as_deref(), Some("jürgen"));
}

#[test]
fn sasl_plain_is_utf8_only_unlike_user_and_pass() {
    // RFC 4616: PLAIN is UTF-8. The same Latin-1 password that USER/PASS accepts (above)
    // is a failed login in AUTH PLAIN, as it is in smtp; the backend is never asked.
    let make = || MemoryOpener::new("jürgen", "pässwörd", vec![M1.to_vec()]);
    let latin1 = crate::base64::encode(b"\0j\xfcrgen\0p\xe4ssw\xf6rd");
    let utf8 = crate::base64::encode("\0jürgen\0pässwörd".as_bytes());
    let input = format!("AUTH PLAIN {latin1}\r\nAUTH PLAIN {utf8}\r\nQUIT\r\n");
    let (out, summary, opener) = transcript(make, input.as_bytes());
    assert_eq!(
        out,
        format!("{GREETING}-ERR [AUTH] Authentication failed.\r\n+OK Logged in.\r\n+OK Bye.\r\n")
    );
    assert_eq!(summary.user.as_deref(), Some("jürgen"));
    assert_eq!(opener.journal.borrow().logins.len(), 1);
}

#[test]
fn quit_under_keep_says_the_messages_stay() {
    let make = || {
        let mut opener = opener();
        opener.keeps_everything = true;
        opener
    };
    let (out, summary, _) = transcript(make, format!("{LOGIN}DELE 1\r\nQUIT\r\n").as_bytes());
    assert!(
        out.ends_with("+OK Bye, 1 messages kept on the server (delete policy keep).\r\n"),
        "{out}"
    );
    assert_eq!(summary.deleted, 0);
}

#[test]
fn the_debug_log_never_shows_passwords_or_sasl_data() {
    use super::session::redacted_for_tests as redacted;
    assert_eq!(redacted(b"PASS secret word"), "PASS ********");
    assert_eq!(redacted(b"pass secret"), "PASS ********");
    assert_eq!(redacted(b"AUTH PLAIN AGFsaWNlAHB3"), "AUTH PLAIN ********");
    assert_eq!(redacted(b"AUTH PLAIN"), "AUTH PLAIN");
    assert_eq!(redacted(b"RETR 1"), "RETR 1");
    assert_eq!(redacted(b"USER a\x1bb"), "USER a\\u{1b}b");
}

#[test]
fn malformed_logins_count_toward_the_bad_command_limit() {
    let no_nuls = crate::base64::encode(b"no-nuls");
    // Five kinds of malformed login, none of which reaches the backend: four rounds make
    // twenty bad commands.
    let round = format!(
        "PASS x\r\nAUTH PLAIN *\r\nAUTH PLAIN\r\n*\r\nAUTH PLAIN !!!!\r\nAUTH PLAIN {no_nuls}\r\n"
    );
    let input = format!("{}USER alice\r\nPASS pa ss\"\\é\r\n", round.repeat(4));
    let (out, summary, opener) = transcript(opener, input.as_bytes());
    assert_eq!(summary.end, End::TooManyBadCommands, "{out}");
    assert!(
        out.ends_with("-ERR Invalid base64 in authentication response\r\n-ERR Too many bad commands, closing.\r\n"),
        "{out}"
    );
    assert!(
        out.starts_with(&format!("{GREETING}-ERR Give USER first\r\n")),
        "{out}"
    );
    assert!(opener.journal.borrow().logins.is_empty());
}

#[test]
fn nul_in_user_or_password_is_the_clients_error_not_the_servers() {
    // A backend that would answer [SYS/PERM] if it were asked: it must not be.
    let unusable = || MemoryOpener {
        open_error: Some(|| OpenError::Permanent("LOGIN: BAD".into())),
        ..opener()
    };
    let input = "USER al\0ice\r\nPASS secret\r\nUSER alice\r\nPASS pa\0ss\r\nQUIT\r\n";
    let (out, summary, _) = transcript(unusable, input.as_bytes());
    // Refused as a line, before the command is even parsed (the fuzzer's fix for every
    // control character; a NUL in AUTH PLAIN's decoded parts is caught in the session).
    let refused = "-ERR Control characters are not allowed in commands\r\n";
    assert_eq!(
        out,
        format!("{GREETING}{refused}-ERR Give USER first\r\n+OK\r\n{refused}+OK Bye.\r\n")
    );
    assert_eq!(summary.end, End::Quit);
    // Counted as bad commands.
    let input = "USER al\0ice\r\nPASS secret\r\n".repeat(20);
    let (out, summary, _) = transcript(unusable, input.as_bytes());
    assert_eq!(summary.end, End::TooManyBadCommands, "{out}");
}

#[test]
fn every_way_of_logging_in_pays_the_delay_and_counts_toward_the_limit() {
    let wrong = crate::base64::encode(b"\0alice\0nope");
    let ways = [
        "USER alice\r\nPASS nope\r\n".to_string(),
        format!("AUTH PLAIN {wrong}\r\n"),
        format!("AUTH PLAIN\r\n{wrong}\r\n"),
    ];
    let delay = Duration::from_millis(150);
    for way in &ways {
        let started = std::time::Instant::now();
        let config = Config {
            auth_failure_delay: delay,
            ..config()
        };
        let (out, _) = run_with(&mut opener(), config, way.as_bytes(), 64);
        assert!(
            started.elapsed() >= delay,
            "{way:?} answered without the delay"
        );
        assert!(
            out.ends_with("-ERR [AUTH] Authentication failed.\r\n"),
            "{out}"
        );
    }
    // One of each: the third closes the connection, and the right password that follows
    // is never tried.
    let input = format!("{}USER alice\r\nPASS pa ss\"\\é\r\n", ways.concat());
    let (out, summary, opener) = transcript(opener, input.as_bytes());
    assert_eq!(summary.end, End::TooManyAuthFailures, "{out}");
    assert!(opener.journal.borrow().logins.is_empty());
}

/// Found by the fuzzer (tests/fuzz): a NUL, a bare CR or another control character in a
/// command was read as a separator or kept in the argument, and the command succeeded
/// (`DELE 1\r`, `AUTH \x0cPLAIN`, `USER a\0b`). Dovecot refuses such lines; so do we, as
/// a bad command with a plain -ERR (issue 9 also asks this for NUL in USER and PASS).
#[test]
fn control_characters_in_commands_are_refused() {
    let input =
        b"USER ali\0ce\r\nPASS pa ss\"\\\xc3\xa9\r\nUSER alice\r\nPASS pa ss\"\\\xc3\xa9\0\r\n\
                  AUTH \x0cPLAIN\r\nUSER alice\r\nPASS pa ss\"\\\xc3\xa9\r\n\
                  DELE 1\r\r\nSTAT\r\nLIST\x0b\r\nRETR 2\x7f\r\nQUIT\r\n";
    let (out, summary, opener) = transcript(opener, input);
    let refused = "-ERR Control characters are not allowed in commands\r\n";
    let expected = format!(
        "{GREETING}{refused}-ERR Give USER first\r\n+OK\r\n{refused}{refused}{LOGGED_IN}\
         {refused}+OK 3 118\r\n-ERR Unknown command\r\n{refused}+OK Bye.\r\n"
    );
    assert_eq!(out, expected);
    assert_eq!(summary.end, End::Quit);
    assert!(opener.journal.borrow().deleted.is_empty());
}

// ---- STLS (RFC 2595 §4) ----

/// Runs `packets` through a session with STARTTLS-style client TLS, at several read sizes
/// (all must agree); returns the output, the summary and the output length at each
/// handshake.
fn stls_transcript(
    packets: &[&[u8]],
    setup: impl Fn(&mut crate::client_tls::testing::FakeTls),
) -> (String, Summary, Vec<usize>) {
    let mut results = Vec::new();
    for size in [1, 2, 3, 5, 64, 4096] {
        let (input, output, mut tls) = crate::client_tls::testing::connection(packets, size);
        setup(&mut tls);
        let mut opener = opener();
        let summary = Session::new(input, output.clone(), &mut opener, config())
            .with_tls(&mut tls)
            .run();
        let out = String::from_utf8_lossy(&output.0.borrow()).into_owned();
        results.push((out, summary, tls.started_at.clone()));
    }
    let first = results[0].clone();
    for other in &results[1..] {
        assert_eq!(other, &first, "the read size changed the session");
    }
    first
}

const CAPA_PLAIN: &str = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\n";
const CAPA_TAIL: &str =
    "RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION legacy-mail-proxy-0.1.0\r\n.\r\n";

#[test]
fn stls_is_announced_before_tls_and_not_after_and_user_is_forgotten() {
    let (out, summary, started) = stls_transcript(
        &[
            b"CAPA\r\nUSER alice\r\nSTLS\r\n",
            b"CAPA\r\nPASS pa ss\"\\\xc3\xa9\r\nSTLS\r\nQUIT\r\n",
        ],
        |_| {},
    );
    let begin = "+OK Begin TLS negotiation\r\n";
    let before = format!("{GREETING}{CAPA_PLAIN}STLS\r\n{CAPA_TAIL}+OK\r\n{begin}");
    assert_eq!(
        out,
        format!(
            "{before}{CAPA_PLAIN}{CAPA_TAIL}-ERR Give USER first\r\n-ERR TLS is already active\r\n+OK Bye.\r\n"
        )
    );
    // The go-ahead was on the wire before the handshake began, once.
    assert_eq!(started, vec![before.len()]);
    assert_eq!(summary.end, End::Quit);
}

#[test]
fn commands_pipelined_after_stls_in_one_packet_are_never_executed() {
    // The CVE-2011-0411 class: a man in the middle appends commands to the client's STLS.
    let (out, summary, started) = stls_transcript(
        &[
            b"STLS\r\nCAPA\r\nUSER alice\r\nQUIT\r\n",
            b"PASS pa ss\"\\\xc3\xa9\r\nNOOP\r\nQUIT\r\n",
        ],
        |_| {},
    );
    assert_eq!(
        out,
        format!(
            "{GREETING}+OK Begin TLS negotiation\r\n-ERR Give USER first\r\n-ERR Log in first (USER/PASS or AUTH)\r\n+OK Bye.\r\n"
        )
    );
    assert_eq!(started.len(), 1);
    assert_eq!(summary.end, End::Quit);
}

#[test]
fn with_tls_required_logins_are_refused_with_auth_until_stls() {
    let login = b"USER alice\r\nPASS pa ss\"\\\xc3\xa9\r\n";
    let (out, summary, _) = stls_transcript(
        &[
            b"USER alice\r\nPASS x\r\nAUTH PLAIN AGFsaWNlAHg=\r\nSTLS\r\n",
            login,
            b"STAT\r\nQUIT\r\n",
        ],
        |tls| tls.required = true,
    );
    let refused = "-ERR [AUTH] Plain-text logins are disabled: use STLS (or port 995) first\r\n";
    assert_eq!(
        out,
        format!(
            "{GREETING}{refused}{refused}{refused}+OK Begin TLS negotiation\r\n+OK\r\n+OK Logged in.\r\n+OK 3 118\r\n+OK Bye.\r\n"
        )
    );
    assert_eq!(summary.end, End::Quit);
}

#[test]
fn a_failed_handshake_ends_the_session_and_without_tls_stls_is_unknown() {
    let (out, summary, _) = stls_transcript(&[b"STLS\r\n", b"QUIT\r\n"], |tls| tls.fail = true);
    assert_eq!(out, format!("{GREETING}+OK Begin TLS negotiation\r\n"));
    assert_eq!(summary.end, End::TlsFailed("handshake refused".into()));

    let (out, _, started) = stls_transcript(&[b"STLS\r\nCAPA\r\nQUIT\r\n"], |tls| {
        tls.mode_starttls = false
    });
    assert_eq!(
        out,
        format!("{GREETING}-ERR Unknown command\r\n{CAPA_PLAIN}{CAPA_TAIL}+OK Bye.\r\n")
    );
    assert!(started.is_empty());
}

#[test]
fn after_implicit_tls_there_is_no_stls_and_logins_work_even_when_required() {
    let (out, summary, started) = stls_transcript(
        &[b"CAPA\r\nSTLS\r\nUSER alice\r\nPASS pa ss\"\\\xc3\xa9\r\nQUIT\r\n"],
        |tls| {
            tls.active = true;
            tls.required = true;
        },
    );
    assert_eq!(
        out,
        format!(
            "{GREETING}{CAPA_PLAIN}{CAPA_TAIL}-ERR TLS is already active\r\n+OK\r\n+OK Logged in.\r\n+OK Bye.\r\n"
        )
    );
    assert!(started.is_empty());
    assert_eq!(summary.end, End::Quit);
}
