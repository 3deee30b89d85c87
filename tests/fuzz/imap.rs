//! IMAP targets: the response reader of its own (`imap_wire::Reader`), and the message
//! listing and the body fetch that `pop3::imap` runs with it on the raw IMAP connection
//! (`RawCommand`), fed server responses through `read_listing` and `read_body`.

use crate::mutate::Rng;
use crate::reach::hit;
use crate::wire::show;
use legacy_mail_proxy::imap_wire::{self, Fetch, Literals, Reader, Response};
use legacy_mail_proxy::pop3::imap::{read_body, read_listing};
use legacy_mail_proxy::pop3::maildrop::{FetchError, MessageSink};
use std::io::{self, BufReader};

pub const DICTIONARY: &[&[u8]] = &[
    b"* ",
    b"FETCH (",
    b"UID ",
    b"RFC822.SIZE ",
    b"FLAGS (",
    b"\\Seen",
    b"$POP3Deleted",
    b"BODY[]",
    b"BODY[]<0>",
    b"BODY[HEADER]",
    b"{",
    b"}",
    b"{0}\r\n",
    b"~{",
    b"L0 ",
    b"L1 ",
    b"OK",
    b"NO",
    b"BAD",
    b"* BYE",
    b"EXISTS",
    b")\r\n",
    b"\r\n",
    b"4294967295",
    b"(",
    b")",
    b"\"",
    b"NIL",
    b"X-GM-LABELS (\"a (b)\") ",
    b"{3+}\r\n",
    b"~{2}\r\n",
    b"* OK [ALERT] x {5}\r\n",
    b"+ ",
    b"* 2 EXPUNGE\r\n",
];

const KEYWORD: &str = "$POP3Deleted";

pub fn generate_listing(rng: &mut Rng) -> Vec<u8> {
    let mut input = vec![rng.below(2) as u8];
    for n in 1..=rng.below(6) {
        let uid = 3 * n + rng.below(3);
        let size = rng.below(100_000);
        let flags = rng.pick(&["", "\\Seen", "$POP3Deleted \\Seen", "\\Deleted"]);
        let line = match rng.below(4) {
            0 => format!("* {n} FETCH (FLAGS ({flags}) RFC822.SIZE {size} UID {uid})\r\n"),
            1 => format!("* {n} fetch (uid {uid} rfc822.size {size} flags ({flags}))\r\n"),
            _ => format!("* {n} FETCH (UID {uid} RFC822.SIZE {size} FLAGS ({flags}))\r\n"),
        };
        input.extend_from_slice(line.as_bytes());
        match rng.below(6) {
            0 => input.extend_from_slice(format!("* {} EXISTS\r\n", n + 1).as_bytes()),
            1 => input.extend_from_slice(
                format!("* {n} FETCH (UID {uid} BODY[HEADER] {{12}}\r\nSubject: x\r\n)\r\n")
                    .as_bytes(),
            ),
            2 => input.extend_from_slice(format!("* {n} FETCH (FLAGS (\\Seen))\r\n").as_bytes()),
            _ => {}
        }
    }
    input.extend_from_slice(rng.pick_bytes(&[
        &b"L0 OK Fetch completed (0.001 + 0.000 secs).\r\n"[..],
        b"L0 NO [SERVERBUG] Internal error\r\n",
        b"L0 BAD Error in IMAP command\r\n",
        b"* BYE Server shutting down\r\n",
    ]));
    input
}

pub fn run_listing(input: &[u8]) -> Result<(), String> {
    let (selector, response) = input.split_first().map_or((0, &[][..]), |(s, r)| (*s, r));
    let hide = (selector & 1 != 0).then_some(KEYWORD);
    let Ok(listed) = read_listing(response, hide) else {
        return Ok(());
    };
    if !has_line(response, b"L0 OK") {
        return Err("listing accepted without a tagged OK".into());
    }
    hit("imap listings read");
    let untagged = response
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"* "))
        .count();
    if listed.len() > untagged {
        return Err(format!(
            "{} messages from {untagged} untagged lines",
            listed.len()
        ));
    }
    let text = String::from_utf8_lossy(response);
    for (uid, size) in listed {
        if !text.contains(&uid.to_string()) || !text.contains(&size.to_string()) {
            return Err(format!("UID {uid} size {size} is not in the response"));
        }
    }
    Ok(())
}

/// Whether some line starts with `prefix` (the status word's case aside).
fn has_line(response: &[u8], prefix: &[u8]) -> bool {
    response
        .split(|&b| b == b'\n')
        .any(|l| l.len() >= prefix.len() && l[..prefix.len()].eq_ignore_ascii_case(prefix))
}

/// Range of the partial fetch and how much the sink takes, by the input's first byte.
const RANGES: [Option<usize>; 4] = [None, None, Some(16), Some(16 << 10)];
const TAKES: [usize; 4] = [usize::MAX, usize::MAX, 1, 40];

pub fn generate_body(rng: &mut Rng) -> Vec<u8> {
    let mut input = vec![rng.next() as u8];
    let body: &[u8] = rng.pick_bytes(&[
        &b"Subject: x\r\n\r\nbody\r\n.\r\nmore\r\n"[..],
        b"",
        b"short",
        b"Subject: literal {5}\r\n\r\n)\r\nL1 OK fake\r\n",
    ]);
    if rng.one_in(3) {
        input.extend_from_slice(b"* 3 EXISTS\r\n");
    }
    if rng.one_in(4) {
        input.extend_from_slice(b"* OK [ALERT] Mailbox is full {5}\r\n");
    }
    // UID 1 is asked for: before the body (Dovecot, Gmail), after it (Microsoft 365),
    // missing, or another one.
    let item = rng.pick(&[
        "UID 1 BODY[]",
        "UID 1 BODY[]<0>",
        "uid 1 body[]",
        "X-GM-LABELS (\"a (b)\") UID 1 BODY[]",
        "BODY[]",
        "BODY[]<0>",
        "UID 5 BODY[]",
        "UID 1 BODY[HEADER]",
    ]);
    input.extend_from_slice(format!("* 1 FETCH ({item} {{{}}}\r\n", body.len()).as_bytes());
    input.extend_from_slice(body);
    input.extend_from_slice(rng.pick_bytes(&[
        &b")\r\n"[..],
        b" FLAGS (\\Seen))\r\n",
        b" UID 1)\r\n",
        b" UID 5)\r\n",
    ]));
    if rng.one_in(4) {
        input.extend_from_slice(b"* 1 FETCH (FLAGS (\\Seen))\r\n");
    }
    input.extend_from_slice(rng.pick_bytes(&[
        &b"L1 OK Fetch completed.\r\n"[..],
        b"L1 NO [EXPUNGEISSUED] Some messages were expunged\r\n",
        b"L1 BAD Error in IMAP command\r\n",
    ]));
    input
}

/// Records what the reader hands on.
#[derive(Default)]
struct Sink {
    starts: usize,
    data_before_start: bool,
    received: Vec<u8>,
    /// Says "no more" once this much arrived, as TOP does.
    take: usize,
    stopped: bool,
    calls_after_stop: bool,
}

impl MessageSink for Sink {
    fn start(&mut self) -> io::Result<()> {
        self.starts += 1;
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> io::Result<bool> {
        self.data_before_start |= self.starts == 0;
        self.calls_after_stop |= self.stopped;
        self.received.extend_from_slice(bytes);
        self.stopped = self.received.len() >= self.take;
        Ok(!self.stopped)
    }
}

pub fn run_body(input: &[u8]) -> Result<(), String> {
    let (selector, response) = input.split_first().map_or((0, &[][..]), |(s, r)| (*s, r));
    let range = RANGES[usize::from(selector) % 4];
    let mut sink = Sink {
        take: TAKES[usize::from(selector >> 2) % 4],
        ..Sink::default()
    };
    let result = read_body(response, range, &mut sink);
    judge_body(response, range, &result, &sink)
}

fn judge_body(
    response: &[u8],
    range: Option<usize>,
    result: &Result<Option<(usize, bool)>, FetchError>,
    sink: &Sink,
) -> Result<(), String> {
    if sink.starts > 1 || sink.data_before_start || sink.calls_after_stop {
        return Err("the sink was started twice, fed before start, or fed after it stopped".into());
    }
    match result {
        Err(FetchError::Client(e)) => {
            Err(format!("a client error from a sink that never fails: {e}"))
        }
        Err(FetchError::Gone) => Err("Gone is the maildrop's to say".into()),
        Err(FetchError::Backend(_)) => Ok(()),
        Ok(_) if !has_line(response, b"L1 OK") => Err("body accepted without a tagged OK".into()),
        Ok(None) if sink.starts > 0 || !sink.received.is_empty() => {
            Err("no body, but the sink got one".into())
        }
        Ok(None) => Ok(()),
        Ok(Some((length, more))) => {
            hit("imap bodies read");
            // UID 1 was asked for: a body is passed on only with that UID in the response.
            if !response
                .windows(6)
                .any(|w| w[..5].eq_ignore_ascii_case(b"UID 1") && matches!(w[5], b' ' | b')'))
            {
                return Err("a body accepted without UID 1 in the response".into());
            }
            if sink.starts != 1 {
                return Err("a body without start".into());
            }
            if range.is_some_and(|r| *length > r) {
                return Err(format!("{length} octets for a range of {range:?}"));
            }
            let got = sink.received.len();
            let expected_more = !sink.stopped;
            if *more != expected_more || (expected_more && got != *length) || got > *length {
                return Err(format!(
                    "body of {length} octets, sink got {got} (more: {more})"
                ));
            }
            // What the sink got is the start of a literal of that length in the response
            // (`{n}` CRLF, n in any number of digits).
            let found = response.windows(3).enumerate().any(|(i, w)| {
                let start = i + 3;
                let digits = response[..i]
                    .iter()
                    .rev()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                w == b"}\r\n"
                    && digits > 0
                    && response[..i - digits].ends_with(b"{")
                    && std::str::from_utf8(&response[i - digits..i])
                        .ok()
                        .and_then(|d| d.parse::<usize>().ok())
                        == Some(*length)
                    && response[start..].starts_with(&sink.received)
            });
            if !found {
                return Err(format!(
                    "body {} is not a literal of the response",
                    show(&sink.received)
                ));
            }
            Ok(())
        }
    }
}

/// A forged outcome: what it breaks, the range, the reader's result, what the sink got.
type Forged = (
    &'static str,
    Option<usize>,
    Result<Option<(usize, bool)>, FetchError>,
    Sink,
);

/// Forged results that break one property each: the oracle must reject every one.
pub fn self_check() -> Result<(), String> {
    let response = b"* 1 FETCH (BODY[] {5}\r\nhello)\r\nL1 OK done\r\n";
    let sink = |received: &[u8], starts| Sink {
        starts,
        received: received.to_vec(),
        take: usize::MAX,
        ..Sink::default()
    };
    let forged: [Forged; 5] = [
        ("a short body", None, Ok(Some((5, true))), sink(b"hell", 1)),
        (
            "a body not in the response",
            None,
            Ok(Some((5, true))),
            sink(b"jello", 1),
        ),
        (
            "a body past its range",
            Some(4),
            Ok(Some((5, true))),
            sink(b"hello", 1),
        ),
        (
            "a body without start",
            None,
            Ok(Some((5, true))),
            sink(b"hello", 0),
        ),
        ("a phantom body", None, Ok(None), sink(b"hello", 1)),
    ];
    for (what, range, result, sink) in forged {
        if judge_body(response, range, &result, &sink).is_ok() {
            return Err(format!("IMAP body oracle accepted {what}"));
        }
    }
    if judge_body(b"L1 NO gone\r\n", None, &Ok(None), &Sink::default()).is_ok() {
        return Err("IMAP body oracle accepted success without OK".into());
    }
    let mut rng = Rng::new(1);
    for _ in 0..50 {
        run_body(&generate_body(&mut rng)).map_err(|e| format!("IMAP body oracle: {e}"))?;
        run_listing(&generate_listing(&mut rng))
            .map_err(|e| format!("IMAP listing oracle: {e}"))?;
        run_responses(&generate_responses(&mut rng))
            .map_err(|e| format!("IMAP response oracle: {e}"))?;
    }
    Ok(())
}

/// Responses of every kind, in the styles of Dovecot, Gmail and Microsoft 365, with
/// literals of every kind and unsolicited responses between them.
pub fn generate_responses(rng: &mut Rng) -> Vec<u8> {
    let mut input = Vec::new();
    for _ in 0..=rng.below(6) {
        let literal = rng.pick(&["{5}", "{5+}", "~{5}"]);
        let response = match rng.below(10) {
            0 => "* 3 EXISTS\r\n".to_string(),
            1 => "* 2 EXPUNGE\r\n".to_string(),
            2 => "* 4 FETCH (FLAGS (\\Seen) UID 9)\r\n".to_string(),
            3 => "* OK [ALERT] Quota nearly full {5}\r\n".to_string(),
            4 => "* 1 FETCH (X-GM-MSGID 17 X-GM-LABELS (\"\\\\Inbox\" \"a (b)\") UID 1 \
                  RFC822.SIZE 5 FLAGS ())\r\n"
                .to_string(),
            5 => format!("* 1 FETCH (BODY[] {literal}\r\nhello UID 1 FLAGS (\\Seen))\r\n"),
            6 => format!(
                "* 1 FETCH (UID 1 BODY[HEADER] {literal}\r\nhello BODY[]<0> {{3}}\r\nabc)\r\n"
            ),
            7 => format!("* STATUS {literal}\r\nIN(BX (MESSAGES 2 X-GUID ab12)\r\n"),
            8 => "+ Ready for more {5}\r\n".to_string(),
            _ => "* CAPABILITY IMAP4rev1 LITERAL+ MOVE\r\n".to_string(),
        };
        input.extend_from_slice(response.as_bytes());
    }
    input.extend_from_slice(rng.pick_bytes(&[
        &b"a1 OK [READ-WRITE] done\r\n"[..],
        b"a1 NO [TRYCREATE] no such mailbox\r\n",
        b"a1 BAD what\r\n",
        b"* BYE [UNAVAILABLE] throttled\r\n",
    ]));
    input
}

/// Takes every `BODY[]` literal, as the body fetch does.
#[derive(Default)]
struct Taker {
    offered: u64,
    taken: Vec<u8>,
}

impl Literals for Taker {
    fn offer(&mut self, _: u32, name: &str, _: &Fetch, length: u64) -> io::Result<bool> {
        let take = name.starts_with("BODY[]");
        if take {
            self.offered += length;
        }
        Ok(take)
    }
    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.taken.extend_from_slice(bytes);
        Ok(())
    }
}

/// Every response the reader makes of `input` with a buffer of `capacity`, the error
/// that ended the read (as text), and what the taker got.
fn read_responses(input: &[u8], capacity: usize) -> (Vec<Response>, String, Taker) {
    let mut reader = Reader::new(BufReader::with_capacity(capacity, input));
    let mut taker = Taker::default();
    let mut responses = Vec::new();
    loop {
        match reader.next(&mut taker) {
            Ok(response) => responses.push(response),
            Err(e) => return (responses, e.to_string(), taker),
        }
    }
}

/// The reader's results do not depend on how the input arrives; a taken literal gets
/// exactly its announced length; every read ends (at the input's end at the latest).
pub fn run_responses(input: &[u8]) -> Result<(), String> {
    let (responses, end, taker) = read_responses(input, 1);
    let (whole, whole_end, whole_taker) = read_responses(input, 64 * 1024);
    if responses != whole || end != whole_end || taker.taken != whole_taker.taken {
        return Err("the responses depend on the read size".into());
    }
    if end == imap_wire::Error::Closed.to_string() {
        hit("imap responses read to the end");
    }
    if taker.taken.len() as u64 > taker.offered {
        return Err("more literal octets taken than announced".into());
    }
    if responses
        .iter()
        .any(|r| matches!(r, Response::Message { .. }))
    {
        hit("imap message responses");
    }
    Ok(())
}
