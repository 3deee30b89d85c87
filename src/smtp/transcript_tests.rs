//! Byte-exact transcripts of the SMTP core against the in-memory relay.
//!
//! Every transcript is run several ways: in one piece, one byte per read, in odd-sized
//! pieces, and with idle ticks (read timeouts) between pieces. All runs must give the same
//! replies and the same backend exchanges, as RFC 2920 pipelining and real networks
//! chunk input arbitrarily.

use super::auth::{AllowedSenders, ClientAuth};
use super::data::has_bare_cr_or_lf;
use super::memory::{Delivery, MemoryRelay};
use super::relay::RelayError;
use super::reply::Reply;
use super::session::{Config, Session, Stats};
use std::collections::VecDeque;
use std::io::{self, BufReader, Read};
use std::time::Duration;

/// Hands out its parts in order; `None` is a read timeout (an idle tick).
pub(super) struct Feed {
    parts: VecDeque<Option<Vec<u8>>>,
}

impl Read for Feed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.parts.pop_front() {
            None => Ok(0),
            Some(None) => Err(io::ErrorKind::TimedOut.into()),
            Some(Some(mut part)) => {
                let n = part.len().min(buf.len());
                buf[..n].copy_from_slice(&part[..n]);
                if n < part.len() {
                    self.parts.push_front(Some(part.split_off(n)));
                }
                Ok(n)
            }
        }
    }
}

pub(super) fn feed(input: &[u8], chunk: usize, ticks: bool) -> Feed {
    let mut parts = VecDeque::new();
    for piece in input.chunks(chunk.max(1)) {
        parts.push_back(Some(piece.to_vec()));
        if ticks {
            parts.push_back(None);
        }
    }
    Feed { parts }
}

pub(super) fn run_once(config: &Config, relay: &mut MemoryRelay, input: Feed) -> (String, Stats) {
    let mut out = Vec::new();
    let stats = Session::new(BufReader::new(input), &mut out, relay, config).run();
    (String::from_utf8_lossy(&out).into_owned(), stats)
}

struct Run {
    out: String,
    relay: MemoryRelay,
    stats: Stats,
}

/// Runs `input` in every chunking; all must agree. `setup` prepares each fresh relay.
fn transcript_with(config: &Config, setup: impl Fn(&mut MemoryRelay), input: &[u8]) -> Run {
    let mut relay = MemoryRelay::default();
    setup(&mut relay);
    let (out, stats) = run_once(config, &mut relay, feed(input, input.len(), false));
    for (chunk, ticks) in [(1, false), (2, false), (3, true), (7, false), (64, true)] {
        let mut other = MemoryRelay::default();
        setup(&mut other);
        let (o, s) = run_once(config, &mut other, feed(input, chunk, ticks));
        assert_eq!(o, out, "output with chunks of {chunk} (ticks: {ticks})");
        assert_eq!(
            normal_log(&other.log),
            normal_log(&relay.log),
            "backend log with chunks of {chunk}"
        );
        assert_eq!(
            normal_deliveries(&other.delivered),
            normal_deliveries(&relay.delivered),
            "deliveries with chunks of {chunk}"
        );
        assert_eq!(s, stats);
    }
    Run { out, relay, stats }
}

/// Generated Date: and Message-ID: differ from run to run, and with them the length.
fn normal_log(log: &[String]) -> Vec<String> {
    log.iter()
        .map(|l| match l.starts_with("MESSAGE ") {
            true => "MESSAGE".to_string(),
            false => l.clone(),
        })
        .collect()
}

fn normal_deliveries(deliveries: &[Delivery]) -> Vec<Delivery> {
    deliveries
        .iter()
        .map(|d| {
            let text = String::from_utf8_lossy(&d.data);
            let masked: Vec<&str> = text
                .split("\r\n")
                .map(|line| {
                    if line.starts_with("Message-ID: <") && line.ends_with("@mx.test>") {
                        "Message-ID: (generated)"
                    } else if line.starts_with("Date: ") && line.ends_with(" +0000") {
                        "Date: (generated)"
                    } else {
                        line
                    }
                })
                .collect();
            Delivery {
                data: masked.join("\r\n").into_bytes(),
                ..d.clone()
            }
        })
        .collect()
}

fn transcript(config: &Config, input: &str) -> Run {
    transcript_with(config, |_| {}, input.as_bytes())
}

pub(super) fn config() -> Config {
    let mut c = Config::new("mx.test");
    c.auth_failure_delay = Duration::ZERO;
    // Ticks between input pieces must stay far below the idle timeout.
    c.tick = Duration::from_millis(1);
    c
}

pub(super) const GREETING: &str = "220 mx.test ESMTP ready\r\n";
const EHLO_REPLY: &str = "250-mx.test greets c.example\r\n250-PIPELINING\r\n250-SIZE 36700160\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n";
/// Header fields that keep the proxy from adding its own, so message bytes are exact.
pub(super) const DATED: &str =
    "Date: Sat, 22 Nov 2025 00:32:00 +0000\r\nMessage-ID: <1@c.example>\r\n";

fn replies(lines: &[&str]) -> String {
    lines.concat()
}

#[test]
fn a_message_is_relayed_and_answered_with_the_backends_reply() {
    let message = format!("From: a@c.example\r\nSubject: hi\r\n{DATED}\r\nHello\r\n");
    let run = transcript(
        &config(),
        &format!(
            "EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<b@d.example>\r\nDATA\r\n{message}.\r\nQUIT\r\n"
        ),
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            EHLO_REPLY,
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "354 End data with <CR><LF>.<CR><LF>\r\n",
            "250 2.0.0 Ok: queued as Q1\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert_eq!(
        run.relay.log,
        [
            "CONNECT",
            "MAIL FROM:<a@c.example>",
            "RCPT TO:<b@d.example>",
            "DATA",
            &format!("MESSAGE {}", message.len()),
            "QUIT"
        ]
    );
    assert_eq!(
        run.relay.delivered,
        [Delivery {
            from: "a@c.example".into(),
            to: vec!["b@d.example".into()],
            data: message.into_bytes(),
        }]
    );
    assert_eq!(
        run.stats,
        Stats {
            messages: 1,
            sent: 1,
            failed: 0,
            broken: false
        }
    );
}

#[test]
fn probes_that_only_greet_never_touch_the_backend() {
    let run = transcript(
        &config(),
        "EHLO c.example\r\nNOOP\r\nHELO c\r\nVRFY x\r\nQUIT\r\n",
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            EHLO_REPLY,
            "250 2.0.0 Ok\r\n",
            "250 mx.test\r\n",
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n",
            "221 2.0.0 Bye\r\n"
        ])
    );
    assert!(run.relay.log.is_empty());
}

#[test]
fn each_smuggling_sequence_is_content_and_only_one_message_reaches_the_backend() {
    let sequences: [&[u8]; 8] = [
        b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\r", b"\n.\r", b"\r.\n",
    ];
    for seq in sequences {
        let mut input =
            b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<b@d.example>\r\nDATA\r\n"
                .to_vec();
        input.extend_from_slice(format!("Subject: s\r\n{DATED}\r\nfirst").as_bytes());
        input.extend_from_slice(seq);
        input.extend_from_slice(
            b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@d.example>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n",
        );
        let run = transcript_with(&config(), |_| {}, &input);
        assert_eq!(
            run.out,
            replies(&[
                GREETING,
                EHLO_REPLY,
                "250 2.1.0 Ok\r\n",
                "250 2.1.5 Ok\r\n",
                "354 End data with <CR><LF>.<CR><LF>\r\n",
                "250 2.0.0 Ok: queued as Q1\r\n",
                "221 2.0.0 Bye\r\n",
            ]),
            "{seq:?}"
        );
        assert_eq!(run.relay.delivered.len(), 1, "{seq:?}");
        let data = &run.relay.delivered[0].data;
        let want = format!(
            "Subject: s\r\n{DATED}\r\nfirst\r\n.\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@d.example>\r\nDATA\r\nsmuggled\r\n"
        );
        assert_eq!(String::from_utf8_lossy(data), want, "{seq:?}");
        // With only CRLF line endings, the relay's dot-stuffing covers every dot line, so
        // the backend cannot see an end of data inside this message either.
        assert!(!has_bare_cr_or_lf(data), "{seq:?}");
        assert_eq!(
            run.relay
                .log
                .iter()
                .filter(|l| l.starts_with("MAIL"))
                .count(),
            1,
            "{seq:?}"
        );
    }
}

#[test]
fn dot_lines_are_unstuffed_and_bare_line_endings_normalised() {
    let run = transcript(
        &config(),
        &format!(
            "HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\nSubject: dots\n{DATED}\n..\r\n...x\r\n.y\nbare\rcr\r\n.\r\nQUIT\r\n"
        ),
    );
    assert!(
        run.out.contains("250 2.0.0 Ok: queued as Q1\r\n"),
        "{}",
        run.out
    );
    assert_eq!(
        String::from_utf8_lossy(&run.relay.delivered[0].data),
        format!("Subject: dots\r\n{DATED}\r\n.\r\n..x\r\ny\r\nbare\r\ncr\r\n")
    );
}

#[test]
fn eight_bit_and_binary_bytes_pass_unchanged() {
    let mut body: Vec<u8> = (0u8..=255)
        .filter(|&b| b != b'\r' && b != b'\n' && b != b'.')
        .collect();
    body.extend_from_slice(b"\r\nGr\xc3\xbc\xc3\x9fe \xff\xfe\x00\r\n");
    let mut message = format!("Subject: 8bit\r\n{DATED}\r\n").into_bytes();
    message.extend_from_slice(&body);
    let mut input =
        b"EHLO c.example\r\nMAIL FROM:<a@c> BODY=8BITMIME\r\nRCPT TO:<b@d>\r\nDATA\r\n".to_vec();
    input.extend_from_slice(&message);
    input.extend_from_slice(b".\r\nQUIT\r\n");
    let run = transcript_with(&config(), |_| {}, &input);
    assert_eq!(run.relay.delivered[0].data, message);
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    // Two transactions and a refused recipient, all sent before reading any reply
    // (RFC 2920 allows everything up to DATA and after the final dot in one group).
    let input = format!(
        "EHLO c.example\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nRCPT TO:<nobody@d>\r\nRCPT TO:<e@d>\r\nDATA\r\nSubject: 1\r\n{DATED}\r\none\r\n.\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\nSubject: 2\r\n{DATED}\r\ntwo\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n"
    );
    let run = transcript_with(
        &config(),
        |r| r.unknown = vec!["nobody@d".into()],
        input.as_bytes(),
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            EHLO_REPLY,
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "550 5.1.1 <nobody@d>: Recipient address rejected: User unknown\r\n",
            "250 2.1.5 Ok\r\n",
            "354 End data with <CR><LF>.<CR><LF>\r\n",
            "250 2.0.0 Ok: queued as Q1\r\n",
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "354 End data with <CR><LF>.<CR><LF>\r\n",
            "250 2.0.0 Ok: queued as Q2\r\n",
            "250 2.0.0 Ok\r\n",
            "250 2.0.0 Ok\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert_eq!(run.relay.delivered[0].to, ["b@d", "e@d"]);
    assert_eq!(run.relay.delivered[1].to, ["b@d"]);
    assert_eq!(run.relay.log.iter().filter(|l| *l == "CONNECT").count(), 1);
}

#[test]
fn commands_out_of_sequence_get_503_and_the_session_goes_on() {
    let mut strict = config();
    strict.require_helo = true;
    let run = transcript(
        &strict,
        "MAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\nEHLO c.example\r\nDATA\r\nMAIL FROM:<a@c>\r\nMAIL FROM:<a@c>\r\nDATA\r\nRSET\r\nRCPT TO:<b@d>\r\nQUIT\r\n",
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            "503 5.5.1 Send HELO/EHLO first\r\n",
            "503 5.5.1 Need MAIL command\r\n",
            "503 5.5.1 Need MAIL command\r\n",
            EHLO_REPLY,
            "503 5.5.1 Need MAIL command\r\n",
            "250 2.1.0 Ok\r\n",
            "503 5.5.1 Nested MAIL command\r\n",
            "503 5.5.1 Need RCPT command\r\n",
            "250 2.0.0 Ok\r\n",
            "503 5.5.1 Need MAIL command\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert_eq!(
        run.relay.log,
        ["CONNECT", "MAIL FROM:<a@c>", "RSET", "QUIT"],
        "RSET reaches the backend's open transaction"
    );
}

#[test]
fn scanners_sloppy_smtp_is_accepted_as_postfix_accepts_it() {
    let mut c = config();
    c.sender_domain = Some("lan.example".into());
    // Bytes a device may send: no HELO before MAIL, a sender without a domain, a space
    // after `TO:`, a 5000-character line, no Date:/Message-ID:, QUIT pipelined after the
    // final dot; then a bare HELO and an EHLO with an unbracketed IP address.
    let long = "x".repeat(5000);
    let message = format!("Subject: scan\r\n\r\n{long}\r\n");
    let run = transcript(
        &c,
        &format!(
            "MAIL FROM:<scanner>\r\nRCPT TO: <desk@corp.example>\r\nDATA\r\n{message}.\r\nHELO\r\nEHLO 192.168.1.20\r\nQUIT\r\n"
        ),
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "354 End data with <CR><LF>.<CR><LF>\r\n",
            "250 2.0.0 Ok: queued as Q1\r\n",
            "250 mx.test\r\n",
            &EHLO_REPLY.replace("c.example", "192.168.1.20"),
            "221 2.0.0 Bye\r\n",
        ])
    );
    let delivered = &normal_deliveries(&run.relay.delivered)[0];
    assert_eq!(delivered.from, "scanner@lan.example");
    assert_eq!(delivered.to, ["desk@corp.example"]);
    assert_eq!(
        String::from_utf8_lossy(&delivered.data),
        format!("Subject: scan\r\nDate: (generated)\r\nMessage-ID: (generated)\r\n\r\n{long}\r\n")
    );
}

#[test]
fn a_sender_without_a_domain_is_refused_with_the_option_to_set_or_forced() {
    let input = "HELO c\r\nMAIL FROM:<scanner>\r\nQUIT\r\n";
    let run = transcript(&config(), input);
    assert!(
        run.out.contains(
            "\r\n501 5.1.3 <scanner>: sender needs a domain; the gateway's admin can set --sender-domain or --force-sender\r\n"
        ),
        "{}",
        run.out
    );
    assert!(run.relay.log.is_empty());
    let mut c = config();
    c.force_sender = Some("gw@corp.example".into());
    let run = transcript(&c, input);
    assert!(run.out.contains("\r\n250 2.1.0 Ok\r\n"), "{}", run.out);
    assert_eq!(run.relay.log[1], "MAIL FROM:<gw@corp.example>");
}

#[test]
fn require_helo_refuses_mail_before_a_named_helo() {
    let mut c = config();
    c.require_helo = true;
    let run = transcript(
        &c,
        "MAIL FROM:<a@c>\r\nHELO\r\nEHLO\r\nMAIL FROM:<a@c>\r\nHELO c\r\nMAIL FROM:<a@c>\r\nQUIT\r\n",
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            "503 5.5.1 Send HELO/EHLO first\r\n",
            "501 5.5.4 Syntax: HELO hostname\r\n",
            "501 5.5.4 Syntax: EHLO hostname\r\n",
            "503 5.5.1 Send HELO/EHLO first\r\n",
            "250 mx.test\r\n",
            "250 2.1.0 Ok\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
}

#[test]
fn data_after_only_refused_recipients_is_554() {
    let run = transcript_with(
        &config(),
        |r| r.unknown = vec!["x@d".into()],
        b"EHLO c.example\r\nMAIL FROM:<a@c>\r\nRCPT TO:<x@d>\r\nDATA\r\nQUIT\r\n",
    );
    assert!(
        run.out.ends_with(
            "550 5.1.1 <x@d>: Recipient address rejected: User unknown\r\n554 5.5.1 No valid recipients\r\n221 2.0.0 Bye\r\n"
        ),
        "{}",
        run.out
    );
}

#[test]
fn syntax_errors_unknown_commands_and_long_lines() {
    let long = format!("NOOP {}\r\n", "x".repeat(600));
    let huge = format!("{}\r\n", "y".repeat(13_000));
    let run = transcript(
        &config(),
        &format!(
            "EHLO a\x01b\r\nFOO\r\n{long}{huge}EHLO c.example\r\nMAIL FROM:<a b@c>\r\nMAIL FROM:<a@c> SMTPUTF8\r\nMAIL FROM:<j\u{f6}@c>\r\nSTARTTLS\r\nAUTH PLAIN\r\nBDAT 10 LAST\r\nQUIT\r\n"
        ),
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            "501 5.5.4 Syntax: EHLO hostname\r\n",
            "500 5.5.2 Command not recognized\r\n",
            "500 5.5.2 Line too long\r\n",
            "500 5.5.2 Line too long\r\n",
            EHLO_REPLY,
            "501 5.1.3 Bad character in address\r\n",
            "555 5.5.4 Unsupported parameter SMTPUTF8\r\n",
            "553 5.6.7 Non-ASCII addresses need SMTPUTF8, which is not offered\r\n",
            "502 5.5.1 STARTTLS not implemented\r\n",
            "503 5.5.1 Authentication not enabled\r\n",
            "502 5.5.1 BDAT not implemented\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert!(run.relay.log.is_empty());
}

#[test]
fn too_many_bad_commands_close_the_session() {
    let run = transcript(&config(), &"FOO\r\n".repeat(25));
    let expected = format!(
        "{GREETING}{}421 4.7.0 mx.test Too many errors\r\n",
        "500 5.5.2 Command not recognized\r\n".repeat(20)
    );
    assert_eq!(run.out, expected);
}

#[test]
fn declared_size_over_the_limit_is_refused_at_mail() {
    let mut c = config();
    c.max_message_size = 100;
    let run = transcript(
        &c,
        "HELO c\r\nMAIL FROM:<a@c> SIZE=101\r\nMAIL FROM:<a@c> SIZE=100\r\nQUIT\r\n",
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            "250 mx.test\r\n",
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n",
            "250 2.1.0 Ok\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
}

#[test]
fn an_oversized_message_is_read_to_its_final_dot_then_refused() {
    let mut c = config();
    c.max_message_size = 1000;
    c.head_max = 100; // the part that fits goes through the spool file
    let body = "0123456789\r\n".repeat(200);
    let run = transcript(
        &c,
        &format!(
            "HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\n{body}.\r\nNOOP\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\nSubject: small\r\n{DATED}\r\nok\r\n.\r\nQUIT\r\n"
        ),
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            "250 mx.test\r\n",
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "354 End data with <CR><LF>.<CR><LF>\r\n",
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n",
            "250 2.0.0 Ok\r\n",
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "354 End data with <CR><LF>.<CR><LF>\r\n",
            "250 2.0.0 Ok: queued as Q1\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert_eq!(
        run.relay.log,
        [
            "CONNECT",
            "MAIL FROM:<a@c>",
            "RCPT TO:<b@d>",
            "RSET",
            "MAIL FROM:<a@c>",
            "RCPT TO:<b@d>",
            "DATA",
            &format!(
                "MESSAGE {}",
                format!("Subject: small\r\n{DATED}\r\nok\r\n").len()
            ),
            "QUIT"
        ]
    );
    assert_eq!(run.stats.failed, 1);
}

#[test]
fn a_message_larger_than_the_memory_head_is_relayed_byte_exact_from_the_spool_file() {
    let mut c = config();
    c.head_max = 128;
    let body: String = (0..500).map(|i| format!("line {i} .dot\r\n")).collect();
    let message = format!("Subject: big\r\n{DATED}\r\n{body}");
    let run = transcript(
        &c,
        &format!("HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\n{message}.\r\nQUIT\r\n"),
    );
    assert_eq!(
        String::from_utf8_lossy(&run.relay.delivered[0].data),
        message
    );
}

#[test]
fn a_header_block_longer_than_the_memory_head_is_refused() {
    let mut c = config();
    c.head_max = 64;
    let headers: String = (0..10).map(|i| format!("X-H{i}: value\r\n")).collect();
    let run = transcript(
        &c,
        &format!(
            "HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\n{headers}\r\nbody\r\n.\r\nQUIT\r\n"
        ),
    );
    assert!(
        run.out.contains("552 5.3.4 Header block too large\r\n"),
        "{}",
        run.out
    );
    assert!(run.relay.delivered.is_empty());
}

#[test]
fn recipients_over_the_limit_get_452() {
    let mut c = config();
    c.max_recipients = 2;
    let run = transcript_with(
        &c,
        |r| r.unknown = vec!["x@d".into()],
        b"HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<x@d>\r\nRCPT TO:<1@d>\r\nRCPT TO:<2@d>\r\nRCPT TO:<3@d>\r\nQUIT\r\n",
    );
    assert!(
        run.out.ends_with(
            "250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Too many recipients\r\n221 2.0.0 Bye\r\n"
        ),
        "refused recipients do not count: {}",
        run.out
    );
}

#[test]
fn an_unknown_recipient_gets_the_backends_550_and_the_others_are_delivered() {
    let run = transcript_with(
        &config(),
        |r| r.unknown = vec!["ghost@d".into()],
        format!("EHLO c.example\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nRCPT TO:<ghost@d>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: x\r\n{DATED}\r\nx\r\n.\r\nQUIT\r\n").as_bytes(),
    );
    assert!(
        run.out
            .contains("550 5.1.1 <ghost@d>: Recipient address rejected: User unknown\r\n")
    );
    assert_eq!(run.relay.delivered[0].to, ["b@d", "c@d"]);
}

#[test]
fn an_unreachable_backend_gives_4xx_so_the_client_retries() {
    let run = transcript_with(
        &config(),
        |r| r.down = true,
        b"HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nQUIT\r\n",
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            "250 mx.test\r\n",
            "451 4.4.1 Backend unavailable; try again later\r\n",
            "503 5.5.1 Need MAIL command\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
}

#[test]
fn a_refused_proxy_login_gives_4_3_5_a_lost_connection_4_4_2_and_a_failed_token_4_7_0() {
    // Only a 535 from the backend is a refused login; a cut while logging in is an outage;
    // an OAuth2 account without an accepted token is the proxy's own temporary
    // authentication failure (RFC 4954 §6), never the client's 535.
    type Setup = fn(&mut MemoryRelay);
    let cases: [(Setup, &str); 3] = [
        (
            |r| r.login_refused = true,
            "451 4.3.5 Relay login failed; try again later\r\n",
        ),
        (
            |r| r.login_cut = true,
            "451 4.4.2 Backend unavailable: connection lost; try again later\r\n",
        ),
        (
            |r| r.oauth2_failed = true,
            "454 4.7.0 Temporary authentication failure; try again later\r\n",
        ),
    ];
    for (setup, expected) in cases {
        let run = transcript_with(&config(), setup, b"HELO c\r\nMAIL FROM:<a@c>\r\nQUIT\r\n");
        assert!(run.out.contains(expected), "{}", run.out);
        assert!(!run.out.contains("535"), "{}", run.out);
    }
}

#[test]
fn the_backends_refusal_of_the_message_is_passed_on() {
    let run = transcript_with(
        &config(),
        |r| {
            r.data_reply = Some(Reply::from_backend(
                554,
                &["5.2.252 SendAsDenied; a@c not allowed to send as x@y"],
            ))
        },
        format!("HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\nSubject: x\r\n{DATED}\r\nx\r\n.\r\nQUIT\r\n").as_bytes(),
    );
    assert!(
        run.out.contains("354 End data with <CR><LF>.<CR><LF>\r\n554 5.2.252 SendAsDenied; a@c not allowed to send as x@y\r\n"),
        "{}",
        run.out
    );
    let run = transcript_with(
        &config(),
        |r| r.data_reply = Some(Reply::from_backend(421, &["4.4.2 Timeout"])),
        format!(
            "HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\n{DATED}\r\nx\r\n.\r\nQUIT\r\n"
        )
        .as_bytes(),
    );
    assert!(run.out.contains("\r\n451 4.4.2 Timeout\r\n"), "{}", run.out);
}

#[test]
fn a_client_gone_after_its_final_dot_is_asked_about_once_the_backend_answered() {
    // The check runs after the backend's answer (so the log can tell the message's fate)
    // and the reply is still written, for a client that only half-closed.
    let message = format!("{DATED}\r\nx\r\n");
    let input = format!("HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\n{message}.\r\n");
    let mut relay = MemoryRelay::default();
    let asked = std::cell::RefCell::new(Vec::new());
    let mut out = Vec::new();
    let config = config();
    Session::new(
        BufReader::new(feed(input.as_bytes(), input.len(), false)),
        &mut out,
        &mut relay,
        &config,
    )
    .client_closed_check(|| {
        asked.borrow_mut().push(());
        true
    })
    .run();
    assert_eq!(asked.borrow().len(), 1);
    assert!(
        String::from_utf8_lossy(&out).ends_with("250 2.0.0 Ok: queued as Q1\r\n"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(relay.delivered.len(), 1);
}

#[test]
fn the_client_leaving_mid_data_sends_nothing_upstream() {
    let run = transcript(
        &config(),
        "HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\nSubject: x\r\n\r\nhalf a mess",
    );
    assert!(run.out.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"));
    // No RSET first: QUIT ends the open transaction (RFC 5321 §4.1.1.10).
    assert_eq!(
        run.relay.log,
        ["CONNECT", "MAIL FROM:<a@c>", "RCPT TO:<b@d>", "QUIT"]
    );
    assert!(run.relay.delivered.is_empty());
    assert_eq!(run.stats.failed, 1);
}

#[test]
fn idle_clients_are_closed_with_421_after_the_timeout() {
    let mut c = config();
    c.tick = Duration::from_secs(60);
    c.idle_timeout = Duration::from_secs(300);
    // Four idle ticks are fine, the fifth ends the session; data resets the count.
    let mut parts: VecDeque<Option<Vec<u8>>> = VecDeque::new();
    parts.push_back(Some(b"HELO c\r\n".to_vec()));
    parts.extend([None, None, None, None]);
    parts.push_back(Some(
        b"MAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\nabc".to_vec(),
    ));
    parts.extend([None, None, None, None, None, None]);
    let mut relay = MemoryRelay::default();
    let (out, _) = run_once(&c, &mut relay, Feed { parts });
    assert_eq!(
        out,
        replies(&[
            GREETING,
            "250 mx.test\r\n",
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "354 End data with <CR><LF>.<CR><LF>\r\n",
            "421 4.4.2 mx.test Timeout exceeded, closing connection\r\n",
        ])
    );
    assert_eq!(relay.log.last().map(String::as_str), Some("QUIT"));
    assert!(relay.delivered.is_empty());
}

fn local_auth() -> Config {
    let mut c = config();
    c.auth = ClientAuth::Local {
        user: "scanner".into(),
        password: "s3cret pw".into(),
    };
    c
}

const EHLO_AUTH: &str = "250-mx.test greets c.example\r\n250-PIPELINING\r\n250-SIZE 36700160\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n";

fn b64(s: &str) -> String {
    crate::base64::encode(s.as_bytes())
}

#[test]
fn local_auth_requires_auth_before_mail_and_checks_credentials() {
    let input = format!(
        "EHLO c.example\r\nMAIL FROM:<a@c>\r\nAUTH PLAIN {}\r\nAUTH PLAIN {}\r\nAUTH PLAIN {}\r\nMAIL FROM:<a@c>\r\nQUIT\r\n",
        b64("\0scanner\0wrong"),
        b64("\0scanner\0s3cret pw"),
        b64("\0scanner\0s3cret pw"),
    );
    let run = transcript(&local_auth(), &input);
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            EHLO_AUTH,
            "530 5.7.0 Authentication required\r\n",
            "535 5.7.8 Authentication credentials invalid\r\n",
            "235 2.7.0 Authentication successful\r\n",
            "503 5.5.1 Already authenticated\r\n",
            "250 2.1.0 Ok\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
}

#[test]
fn auth_login_and_plain_with_a_challenge() {
    let input = format!(
        "EHLO c.example\r\nAUTH LOGIN\r\n{}\r\n{}\r\nQUIT\r\n",
        b64("scanner"),
        b64("s3cret pw")
    );
    let run = transcript(&local_auth(), &input);
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            EHLO_AUTH,
            "334 VXNlcm5hbWU6\r\n",
            "334 UGFzc3dvcmQ6\r\n",
            "235 2.7.0 Authentication successful\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    let input = format!(
        "EHLO c.example\r\nAUTH LOGIN {}\r\n{}\r\nAUTH PLAIN\r\n*\r\nAUTH PLAIN\r\n{}\r\nQUIT\r\n",
        b64("scanner"),
        b64("nope"),
        b64("\0scanner\0s3cret pw")
    );
    let run = transcript(&local_auth(), &input);
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            EHLO_AUTH,
            "334 UGFzc3dvcmQ6\r\n",
            "535 5.7.8 Authentication credentials invalid\r\n",
            "334 \r\n",
            "501 5.0.0 Authentication cancelled\r\n",
            "334 \r\n",
            "235 2.7.0 Authentication successful\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
}

#[test]
fn cancelled_and_malformed_auth_count_towards_the_error_limit() {
    // Each of these, repeated, must end the session within 20 errors: a cancel at the
    // first or the second challenge, bad base64 in an initial response or a challenge
    // response, an unknown mechanism, malformed AUTH lines.
    let steps = [
        "AUTH PLAIN\r\n*\r\n",
        "AUTH LOGIN\r\n*\r\n",
        &format!("AUTH LOGIN {}\r\n*\r\n", b64("scanner")),
        "AUTH PLAIN !!!!\r\n",
        "AUTH LOGIN\r\n!!!!\r\n",
        "AUTH CRAM-MD5\r\n",
        "AUTH PLAIN a b\r\n",
    ];
    for step in steps {
        let run = transcript(
            &local_auth(),
            &format!("EHLO c.example\r\n{}", step.repeat(25)),
        );
        assert!(
            run.out.ends_with("421 4.7.0 mx.test Too many errors\r\n"),
            "{step:?}: {}",
            run.out
        );
    }
}

#[test]
fn every_way_of_logging_in_counts_towards_the_failure_limit() {
    let wrong_login = |initial: bool| match initial {
        true => format!("AUTH LOGIN {}\r\n{}\r\n", b64("scanner"), b64("wrong")),
        false => format!("AUTH LOGIN\r\n{}\r\n{}\r\n", b64("scanner"), b64("wrong")),
    };
    let wrong_plain = |initial: bool| {
        let message = b64("\0scanner\0wrong");
        match initial {
            true => format!("AUTH PLAIN {message}\r\n"),
            false => format!("AUTH PLAIN\r\n{message}\r\n"),
        }
    };
    // A PLAIN message that is not `authzid NUL user NUL password` is a failed login too.
    let malformed = format!("AUTH PLAIN {}\r\n", b64("scanner wrong"));
    let input = format!(
        "EHLO c.example\r\n{}{}{}NOOP\r\n",
        wrong_login(true),
        wrong_login(false),
        wrong_plain(false)
    );
    let run = transcript(&local_auth(), &input);
    assert!(
        run.out
            .ends_with("535 5.7.8 Authentication credentials invalid\r\n421 4.7.0 mx.test Too many failed authentications\r\n"),
        "{}",
        run.out
    );
    let input = format!(
        "EHLO c.example\r\n{}{malformed}{}NOOP\r\n",
        wrong_plain(true),
        wrong_login(true)
    );
    let run = transcript(&local_auth(), &input);
    assert!(
        run.out
            .ends_with("421 4.7.0 mx.test Too many failed authentications\r\n"),
        "{}",
        run.out
    );
}

#[test]
fn bad_auth_input_and_too_many_failures() {
    let bad = b64("\0scanner\0bad");
    let input = format!(
        "EHLO c.example\r\nAUTH PLAIN !!!!\r\nAUTH CRAM-MD5\r\nAUTH PLAIN {bad}\r\nAUTH PLAIN {bad}\r\nAUTH PLAIN {bad}\r\nNOOP\r\n"
    );
    let run = transcript(&local_auth(), &input);
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            EHLO_AUTH,
            "501 5.5.2 Invalid base64 data\r\n",
            "504 5.5.4 Unrecognized authentication type\r\n",
            "535 5.7.8 Authentication credentials invalid\r\n",
            "535 5.7.8 Authentication credentials invalid\r\n",
            "535 5.7.8 Authentication credentials invalid\r\n",
            "421 4.7.0 mx.test Too many failed authentications\r\n",
        ])
    );
}

#[test]
fn passthrough_auth_logs_in_to_the_backend_with_the_clients_credentials() {
    let mut c = config();
    c.auth = ClientAuth::Passthrough;
    let input = format!(
        "EHLO c.example\r\nMAIL FROM:<a@c>\r\nAUTH PLAIN {}\r\nAUTH PLAIN {}\r\nMAIL FROM:<a@c>\r\nQUIT\r\n",
        b64("\0alice\0wrong"),
        b64("\0alice\0right")
    );
    let run = transcript_with(
        &c,
        |r| r.accounts = vec![("alice".into(), "right".into())],
        input.as_bytes(),
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            EHLO_AUTH,
            "530 5.7.0 Authentication required\r\n",
            "535 5.7.8 Error: authentication failed\r\n",
            "235 2.7.0 Authentication successful\r\n",
            "250 2.1.0 Ok\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert_eq!(
        run.relay.log,
        ["AUTH alice", "AUTH alice", "MAIL FROM:<a@c>", "QUIT"]
    );
    // A backend that cannot be reached is a temporary failure, not a wrong password.
    let run = transcript_with(&c, |r| r.down = true, input.as_bytes());
    assert!(
        run.out
            .contains("454 4.7.0 Temporary authentication failure\r\n"),
        "{}",
        run.out
    );
}

#[test]
fn senders_outside_the_allowed_list_get_550_5_7_1() {
    let mut c = config();
    c.allowed_senders = AllowedSenders::new(&["scanner@lan.example", "@corp.example"]);
    let run = transcript(
        &c,
        "HELO c\r\nMAIL FROM:<x@evil.example>\r\nMAIL FROM:<>\r\nMAIL FROM:<Bob@CORP.example>\r\nQUIT\r\n",
    );
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            "250 mx.test\r\n",
            "550 5.7.1 Sender address <x@evil.example> not allowed\r\n",
            "550 5.7.1 Sender address <> not allowed\r\n",
            "250 2.1.0 Ok\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
}

#[test]
fn rewriting_touches_only_the_named_header_fields() {
    let mut c = config();
    c.force_sender = Some("relay@corp.example".into());
    c.edits.rewrite_from = Some("relay@corp.example".into());
    c.edits.reply_to = Some("desk@corp.example".into());
    let body = "From: not a header\r\n..dot\r\n\u{e9}\r\n";
    let input = format!(
        "HELO c\r\nMAIL FROM:<scanner@lan>\r\nRCPT TO:<b@d>\r\nDATA\r\nReceived: by x\r\nFrom: \"Lobby Scanner\"\r\n  <scanner@lan>\r\nReply-To: old@lan\r\nSubject: scan\r\n{DATED}\r\n{body}.\r\nQUIT\r\n"
    );
    let run = transcript(&c, &input);
    assert_eq!(run.relay.log[1], "MAIL FROM:<relay@corp.example>");
    assert_eq!(
        String::from_utf8_lossy(&run.relay.delivered[0].data),
        format!(
            "Received: by x\r\nFrom: \"Lobby Scanner\"\r\n  <relay@corp.example>\r\nSubject: scan\r\n{DATED}Reply-To: desk@corp.example\r\n\r\nFrom: not a header\r\n.dot\r\n\u{e9}\r\n"
        )
    );
}

#[test]
fn missing_date_and_message_id_are_added_and_nothing_else_changes() {
    let run = transcript(
        &config(),
        "HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\nSubject: no date\r\n\r\nbody\r\n.\r\nQUIT\r\n",
    );
    let data = String::from_utf8_lossy(&run.relay.delivered[0].data).into_owned();
    let lines: Vec<&str> = data.split("\r\n").collect();
    assert_eq!(lines[0], "Subject: no date");
    assert!(
        lines[1].starts_with("Date: ") && lines[1].ends_with(" +0000"),
        "{data}"
    );
    assert!(
        lines[2].starts_with("Message-ID: <") && lines[2].ends_with("@mx.test>"),
        "{data}"
    );
    assert_eq!(&lines[3..], ["", "body", ""]);
    assert!(!data.contains("Return-Path"));
}

#[test]
fn a_thousand_messages_in_one_session_use_one_backend_connection() {
    let mut input = String::from("EHLO c.example\r\n");
    for i in 0..1000 {
        input.push_str(&format!(
            "MAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\nSubject: {i}\r\n{DATED}\r\nmessage {i}\r\n.\r\n"
        ));
    }
    input.push_str("QUIT\r\n");
    let mut relay = MemoryRelay::default();
    let (out, stats) = run_once(&config(), &mut relay, feed(input.as_bytes(), 4096, true));
    assert_eq!(stats.sent, 1000);
    assert_eq!(relay.delivered.len(), 1000);
    assert!(out.contains("250 2.0.0 Ok: queued as Q1000\r\n"));
    assert_eq!(relay.log.iter().filter(|l| *l == "CONNECT").count(), 1);
}

/// `HELO`, then one transaction to `rcpts` with a small dated message, then `QUIT`.
fn one_message(rcpts: &[&str]) -> String {
    let mut input = String::from("HELO c\r\nMAIL FROM:<a@c>\r\n");
    for rcpt in rcpts {
        input.push_str(&format!("RCPT TO:<{rcpt}>\r\n"));
    }
    input.push_str(&format!("DATA\r\nSubject: x\r\n{DATED}\r\nx\r\n.\r\n"));
    input
}

#[test]
fn a_backend_421_on_rcpt_refuses_data_at_once() {
    let mut input = one_message(&["a@d", "b@d"]);
    input.push_str("QUIT\r\n");
    let run = transcript_with(
        &config(),
        |r| {
            r.rcpt_replies = vec![(
                "b@d".into(),
                Reply::from_backend(421, &["4.4.2 mx closing connection"]),
            )]
        },
        input.as_bytes(),
    );
    // No 354: the client is not made to upload a message that cannot be sent. The message
    // lines that follow are then junk commands, each refused.
    assert!(
        run.out.starts_with(&replies(&[
            GREETING,
            "250 mx.test\r\n",
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "451 4.4.2 mx closing connection\r\n",
            "451 4.4.2 Connection to the backend lost; try again later\r\n",
        ])),
        "{}",
        run.out
    );
    assert!(!run.out.contains("354"), "{}", run.out);
    assert!(run.relay.delivered.is_empty());
}

#[test]
fn data_after_only_temporary_refusals_is_451_so_the_client_retries() {
    let mut input = one_message(&["busy@d"]);
    input.push_str("QUIT\r\n");
    let run = transcript_with(
        &config(),
        |r| {
            r.rcpt_replies = vec![(
                "busy@d".into(),
                Reply::from_backend(450, &["4.2.1 <busy@d>: Mailbox busy"]),
            )]
        },
        input.as_bytes(),
    );
    assert!(
        run.out.contains(
            "450 4.2.1 <busy@d>: Mailbox busy\r\n451 4.5.0 No recipient accepted yet; try again later\r\n"
        ),
        "{}",
        run.out
    );
}

#[test]
fn a_refused_data_command_is_passed_on_and_the_next_transaction_works() {
    let mut input = one_message(&["b@d"]);
    input.push_str(&format!(
        "MAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\nSubject: 2\r\n{DATED}\r\ny\r\n.\r\nQUIT\r\n"
    ));
    let run = transcript_with(
        &config(),
        |r| r.data_command_reply = Some(Reply::from_backend(554, &["5.7.1 Error: data refused"])),
        input.as_bytes(),
    );
    // The message is received before the backend sees DATA, so the refusal of DATA is
    // the reply to the final dot.
    assert!(
        run.out.contains(
            "354 End data with <CR><LF>.<CR><LF>\r\n554 5.7.1 Error: data refused\r\n250 2.1.0 Ok\r\n"
        ),
        "{}",
        run.out
    );
    assert!(
        run.out.ends_with(
            "354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"
        ),
        "{}",
        run.out
    );
    assert_eq!(
        run.relay.log[..6],
        [
            "CONNECT",
            "MAIL FROM:<a@c>",
            "RCPT TO:<b@d>",
            "DATA",
            "RSET",
            "MAIL FROM:<a@c>"
        ]
    );
}

#[test]
fn odd_backend_replies_never_reach_the_client_as_success() {
    let input = format!("{}QUIT\r\n", one_message(&["b@d"]));
    let lost = "354 End data with <CR><LF>.<CR><LF>\r\n451 4.4.2 Connection to the backend lost; try again later\r\n221 2.0.0 Bye\r\n";
    type Setup = fn(&mut MemoryRelay);
    let cases: [(&str, Setup); 4] = [
        ("250 to DATA", |r| {
            r.data_command_reply = Some(Reply::from_backend(250, &["2.0.0 Ok"]))
        }),
        ("354 to the final dot", |r| {
            r.data_reply = Some(Reply::from_backend(354, &["go on"]))
        }),
        ("a lost connection while sending", |r| {
            r.data_error = Some(RelayError::Unavailable("connection reset".into()))
        }),
        ("a connection lost at DATA", |r| {
            r.drop_at = Some("DATA".into())
        }),
    ];
    for (name, setup) in cases {
        let run = transcript_with(&config(), setup, input.as_bytes());
        assert!(run.out.ends_with(lost), "{name}: {}", run.out);
        assert!(run.relay.delivered.is_empty(), "{name}");
        assert!(run.relay.log.contains(&"DROPPED".to_string()), "{name}");
        assert_eq!(run.stats.sent, 0, "{name}");
    }
    let run = transcript_with(
        &config(),
        |r| r.data_error = Some(RelayError::Local("spool read error".into())),
        input.as_bytes(),
    );
    assert!(
        run.out
            .contains("\r\n451 4.3.0 Local error in processing; try again later\r\n"),
        "{}",
        run.out
    );
}

/// A slow upload: the message comes in three parts with idle ticks of 30 s between them.
fn slow_upload(config: &Config, relay: &mut MemoryRelay) -> String {
    let mut parts: VecDeque<Option<Vec<u8>>> = VecDeque::new();
    parts.push_back(Some(
        b"HELO c\r\nMAIL FROM:<a@c>\r\nRCPT TO:<b@d>\r\nDATA\r\n".to_vec(),
    ));
    parts.push_back(Some(
        format!("Subject: scan\r\n{DATED}\r\npage 1\r\n").into_bytes(),
    ));
    parts.extend([None, None]);
    parts.push_back(Some(b"page 2\r\n".to_vec()));
    parts.extend([None, None, None]);
    parts.push_back(Some(b"page 3\r\n.\r\nQUIT\r\n".to_vec()));
    run_once(config, relay, Feed { parts }).0
}

#[test]
fn a_slow_upload_keeps_the_backend_alive_with_noop() {
    let mut c = config();
    c.tick = Duration::from_secs(30);
    c.keepalive = Duration::from_secs(60);
    let mut relay = MemoryRelay::default();
    let out = slow_upload(&c, &mut relay);
    assert!(out.contains("250 2.0.0 Ok: queued as Q1\r\n"), "{out}");
    assert_eq!(
        relay.log,
        [
            "CONNECT",
            "MAIL FROM:<a@c>",
            "RCPT TO:<b@d>",
            "NOOP",
            "NOOP",
            "DATA",
            &format!(
                "MESSAGE {}",
                format!("Subject: scan\r\n{DATED}\r\npage 1\r\npage 2\r\npage 3\r\n").len()
            ),
            "QUIT"
        ]
    );
    // If the connection is lost anyway, the client learns it at the final dot: 451, and
    // nothing is sent.
    let mut relay = MemoryRelay::default();
    relay.drop_at = Some("NOOP".into());
    let out = slow_upload(&c, &mut relay);
    assert!(
        out.ends_with(
            "451 4.4.2 Connection to the backend lost; try again later\r\n221 2.0.0 Bye\r\n"
        ),
        "{out}"
    );
    assert!(relay.delivered.is_empty());
    assert!(!relay.log.iter().any(|l| l == "DATA"), "{:?}", relay.log);
}

#[test]
fn refused_recipients_count_towards_the_error_limit() {
    let unknown: Vec<String> = (0..25).map(|i| format!("u{i}@d")).collect();
    let mut input = String::from("HELO c\r\nMAIL FROM:<a@c>\r\n");
    for rcpt in &unknown {
        input.push_str(&format!("RCPT TO:<{rcpt}>\r\n"));
    }
    let run = transcript_with(&config(), |r| r.unknown = unknown.clone(), input.as_bytes());
    assert_eq!(run.out.matches("550 5.1.1").count(), 20, "{}", run.out);
    assert!(
        run.out.ends_with("421 4.7.0 mx.test Too many errors\r\n"),
        "{}",
        run.out
    );
    assert_eq!(
        run.relay
            .log
            .iter()
            .filter(|l| l.starts_with("RCPT"))
            .count(),
        20
    );
}

#[test]
fn junk_commands_past_the_limit_count_as_errors() {
    let run = transcript(&config(), &"NOOP\r\n".repeat(130));
    assert_eq!(run.out.matches("250 2.0.0 Ok\r\n").count(), 120);
    assert!(
        run.out.ends_with("421 4.7.0 mx.test Too many errors\r\n"),
        "{}",
        run.out
    );
}

/// Found by the fuzzer (tests/fuzz): a bare CR, a NUL or another control character in a
/// command line was read as white space or ignored with the rest of the line, so
/// `EHLO c.example\rMAIL FROM:<a@c>` and `NOOP \0` got 250. RFC 5321 §2.3.8 allows CR
/// only in CRLF, and smuggling attacks live on bare CR: such a line is refused (501) and
/// counts as an error. An unknown verb stays 500.
#[test]
fn control_characters_in_commands_are_refused() {
    let run = transcript(
        &config(),
        "EHLO c.example\rMAIL FROM:<a@c.example>\r\nNOOP \0\r\nEHLO c.example\r\n\
         HELO c.example\x0bx\r\nRSET\x7f\r\nVRFY b\x01\r\nQUIT\r\n",
    );
    let refused = "501 5.5.4 Control characters are not allowed in commands\r\n";
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            refused,
            refused,
            EHLO_REPLY,
            refused,
            "500 5.5.2 Command not recognized\r\n",
            refused,
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert!(run.relay.log.is_empty());
}

/// Found by the fuzzer (tests/fuzz): everything before the first ':' of a source route was
/// dropped unread, so `MAIL FROM:<@re SIZE=lay.example:a@c.example>` (a space and a
/// parameter inside the brackets) got 250. A route is `@domain` hops separated by ','
/// (RFC 5321 §4.1.2); it is still accepted and ignored when it is one.
#[test]
fn a_source_route_must_be_at_domains() {
    let run = transcript(
        &config(),
        "EHLO c.example\r\nMAIL FROM:<@re SIZE=lay.example:a@c.example>\r\n\
         MAIL FROM:<@:a@c.example>\r\nMAIL FROM:<@r1.example,,@r2:a@c.example>\r\n\
         MAIL FROM:<@relay.example,@[192.0.2.1]:a@c.example>\r\n\
         RCPT TO:<@r1.example,@r 2:b@d.example>\r\nRCPT TO:<@r1.example:b@d.example>\r\n\
         QUIT\r\n",
    );
    let bad = "501 5.1.3 Bad source route\r\n";
    assert_eq!(
        run.out,
        replies(&[
            GREETING,
            EHLO_REPLY,
            bad,
            bad,
            bad,
            "250 2.1.0 Ok\r\n",
            bad,
            "250 2.1.5 Ok\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert_eq!(
        normal_log(&run.relay.log),
        normal_log(&[
            "CONNECT".into(),
            "MAIL FROM:<a@c.example>".into(),
            "RCPT TO:<b@d.example>".into(),
            "QUIT".into(),
        ])
    );
}

// ---- STARTTLS (RFC 3207) ----

/// Runs `packets` with STARTTLS-style client TLS at several read sizes (all must agree);
/// returns the output, the backend's log, and the output length at each handshake.
fn starttls_transcript(
    config: &Config,
    packets: &[&[u8]],
    setup: impl Fn(&mut crate::client_tls::testing::FakeTls),
) -> (String, Vec<String>, Vec<usize>) {
    let mut results = Vec::new();
    for size in [1, 2, 3, 7, 64, 4096] {
        let (input, output, mut tls) = crate::client_tls::testing::connection(packets, size);
        setup(&mut tls);
        let mut relay = MemoryRelay::default();
        Session::new(input, output.clone(), &mut relay, config)
            .with_tls(&mut tls)
            .run();
        let out = String::from_utf8_lossy(&output.0.borrow()).into_owned();
        results.push((out, normal_log(&relay.log), tls.started_at.clone()));
    }
    for other in &results[1..] {
        assert_eq!(other, &results[0], "the read size changed the session");
    }
    results.swap_remove(0)
}

const EHLO_STARTTLS: &str = "250-mx.test greets c.example\r\n250-PIPELINING\r\n250-SIZE 36700160\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n";
const READY: &str = "220 2.0.0 Ready to start TLS\r\n";

#[test]
fn starttls_is_offered_until_used_and_the_session_starts_over_after_it() {
    let (out, log, started) = starttls_transcript(
        &local_auth(),
        &[
            b"EHLO c.example\r\nAUTH PLAIN AHNjYW5uZXIAczNjcmV0IHB3\r\nSTARTTLS\r\n",
            b"MAIL FROM:<a@c.example>\r\nEHLO c.example\r\nSTARTTLS\r\nQUIT\r\n",
        ],
        |_| {},
    );
    let before = replies(&[
        GREETING,
        &EHLO_STARTTLS.replace("250 STARTTLS", "250-STARTTLS\r\n250 AUTH PLAIN LOGIN"),
        "235 2.7.0 Authentication successful\r\n",
        READY,
    ]);
    assert_eq!(
        out,
        replies(&[
            &before,
            // RFC 3207 §4.2: the AUTH from before TLS is forgotten.
            "530 5.7.0 Authentication required\r\n",
            EHLO_AUTH,
            "503 5.5.1 TLS already active\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert_eq!(started, vec![before.len()]);
    // The relay is not even connected: nothing reached the backend.
    assert!(log.is_empty(), "{log:?}");
}

#[test]
fn commands_pipelined_after_starttls_in_one_packet_are_never_executed() {
    // The CVE-2011-0411 class: commands appended in clear text to the client's STARTTLS.
    let (out, log, started) = starttls_transcript(
        &config(),
        &[
            b"EHLO c.example\r\nSTARTTLS\r\nRSET\r\nMAIL FROM:<evil@x.example>\r\n",
            b"EHLO c.example\r\nQUIT\r\n",
        ],
        |_| {},
    );
    assert_eq!(
        out,
        replies(&[
            GREETING,
            EHLO_STARTTLS,
            READY,
            EHLO_REPLY,
            "221 2.0.0 Bye\r\n"
        ])
    );
    assert_eq!(started.len(), 1);
    assert!(log.is_empty(), "{log:?}");
}

#[test]
fn with_tls_required_mail_and_auth_get_530_until_starttls() {
    let mut config = local_auth();
    config.auth = ClientAuth::None;
    let (out, log, _) = starttls_transcript(
        &config,
        &[
            b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nNOOP\r\nSTARTTLS\r\n",
            b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nQUIT\r\n",
        ],
        |tls| tls.required = true,
    );
    assert_eq!(
        out,
        replies(&[
            GREETING,
            EHLO_STARTTLS,
            "530 5.7.0 Must issue a STARTTLS command first\r\n",
            "250 2.0.0 Ok\r\n",
            READY,
            EHLO_REPLY,
            "250 2.1.0 Ok\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert_eq!(log, ["CONNECT", "MAIL FROM:<a@c.example>", "QUIT"]);

    // AUTH is neither offered nor accepted before TLS.
    let (out, _, _) = starttls_transcript(
        &local_auth(),
        &[b"EHLO c.example\r\nAUTH PLAIN AHNjYW5uZXIAczNjcmV0IHB3\r\nQUIT\r\n"],
        |tls| tls.required = true,
    );
    assert_eq!(
        out,
        replies(&[
            GREETING,
            EHLO_STARTTLS,
            "530 5.7.0 Must issue a STARTTLS command first\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
}

#[test]
fn starttls_refused_in_a_transaction_unknown_without_tls_and_a_failed_handshake_closes() {
    let (out, _, started) = starttls_transcript(
        &config(),
        &[b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nSTARTTLS\r\nQUIT\r\n"],
        |_| {},
    );
    assert_eq!(
        out,
        replies(&[
            GREETING,
            EHLO_STARTTLS,
            "250 2.1.0 Ok\r\n",
            "503 5.5.1 STARTTLS not allowed during a mail transaction\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );
    assert!(started.is_empty());

    let (out, _, _) = starttls_transcript(
        &config(),
        &[b"EHLO c.example\r\nSTARTTLS\r\nQUIT\r\n"],
        |tls| tls.mode_starttls = false,
    );
    assert_eq!(
        out,
        replies(&[
            GREETING,
            EHLO_REPLY,
            "502 5.5.1 STARTTLS not implemented\r\n",
            "221 2.0.0 Bye\r\n",
        ])
    );

    let (out, _, started) =
        starttls_transcript(&config(), &[b"STARTTLS\r\n", b"QUIT\r\n"], |tls| {
            tls.fail = true
        });
    assert_eq!(out, replies(&[GREETING, READY]));
    assert_eq!(started, vec![GREETING.len() + READY.len()]);
}

/// A session that ran its course is not broken, however the client ended it; one whose
/// client connection failed is (the process's exit status, `frontend::Ending`).
#[test]
fn a_failed_client_connection_marks_the_session_broken() {
    struct Failing(&'static [u8]);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            self.0.read(buf)
        }
    }
    let config = Config::new("proxy.test");
    let mut relay = MemoryRelay::default();
    let mut out = Vec::new();
    let input = BufReader::new(Failing(b"EHLO client\r\n"));
    let stats = Session::new(input, &mut out, &mut relay, &config).run();
    assert!(stats.broken);
    for hang_up in [&b"EHLO client\r\n"[..], b"EHLO client\r\nQUIT\r\n"] {
        let mut out = Vec::new();
        let stats = Session::new(hang_up, &mut out, &mut relay, &config).run();
        assert!(!stats.broken, "{}", String::from_utf8_lossy(&out));
    }
}
