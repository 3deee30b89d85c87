//! SMTP targets: the command parser, the session core over the in-memory relay, the DATA
//! decoder against a reference decoder, and backend replies as the relay reads and passes
//! them on.

use crate::mutate::{Rng, unbase64};
use crate::reach::hit;
use crate::wire::{ClientLine, is_control, keyword, next_line, output_lines, show, words};
use legacy_mail_proxy::base64;
use legacy_mail_proxy::smtp::auth::ClientAuth;
use legacy_mail_proxy::smtp::command;
use legacy_mail_proxy::smtp::data::DataDecoder;
use legacy_mail_proxy::smtp::memory::MemoryRelay;
use legacy_mail_proxy::smtp::relay::{Stage, check};
use legacy_mail_proxy::smtp::reply::{Enhanced, Reply};
use legacy_mail_proxy::smtp::session::{Config, Session};
use legacy_mail_proxy::starttls::{read_smtp_reply, strip_capability_code};
use legacy_mail_proxy::submission::{self, Client, Extensions, Transport};
use std::io::BufReader;
use std::time::Duration;

/// The session's line buffer limit (`command::AUTH_LINE_MAX`); shorter per-verb limits are
/// the parser's.
const LINE_BUFFER: usize = 12288;
const MAX_SIZE: u64 = 50_000;
const MAX_RECIPIENTS: usize = 5;

pub const DICTIONARY: &[&[u8]] = &[
    b"EHLO ",
    b"HELO ",
    b"MAIL FROM:",
    b"RCPT TO:",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"VRFY ",
    b"EXPN ",
    b"HELP",
    b"AUTH ",
    b"PLAIN",
    b"LOGIN",
    b"STARTTLS",
    b"BDAT ",
    b"<",
    b">",
    b"<>",
    b"@",
    b"a@example.test",
    b"postmaster",
    b" SIZE=",
    b" BODY=8BITMIME",
    b" BODY=7BIT",
    b" AUTH=<>",
    b"\r\n.\r\n",
    b"\r\n",
    b"\n.\n",
    b"\r.\r",
    b"..",
    b"=",
    b"*",
    b"\"",
    b"\\",
    b"[127.0.0.1]",
    b"@a,@b:",
];

pub const DATA_DICTIONARY: &[&[u8]] = &[
    b"\r\n.\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b"\r\n..\r\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\r\r\n",
    b"Subject: x\r\n",
    b"\r\n\r\n",
];

pub const REPLY_DICTIONARY: &[&[u8]] = &[
    b"250 ",
    b"250-",
    b"354 ",
    b"421 ",
    b"451 ",
    b"550 ",
    b"235 ",
    b"334 ",
    b"2.0.0 ",
    b"4.4.2 ",
    b"5.1.1 ",
    b"2.1.5",
    b"\r\n",
    b"9.9.9 ",
    b"5.1234.1 ",
    b"-",
    b" ",
];

const PLAIN: &str = "\0alice\0secret pw";

fn command_line(rng: &mut Rng) -> String {
    let address = |rng: &mut Rng| {
        (*rng.pick(&[
            "bob@example.test",
            "nobody@example.test",
            "later@example.test",
            "\"odd name\"@example.test",
            "user@[192.0.2.1]",
            "postmaster",
            "@relay.example:carol@example.test",
            "",
        ]))
        .to_string()
    };
    match rng.below(22) {
        0 | 1 => format!(
            "EHLO {}",
            rng.pick(&["client.example", "[192.0.2.7]", "192.0.2.7"])
        ),
        2 => "HELO client.example".into(),
        3..=5 => {
            let mut line = format!("MAIL FROM:<{}>", address(rng));
            if rng.one_in(3) {
                line.push_str(&format!(" SIZE={}", rng.below(80_000)));
            }
            if rng.one_in(3) {
                line.push_str(" BODY=8BITMIME");
            }
            line
        }
        6..=9 => format!("RCPT TO:<{}>", address(rng)),
        10 | 11 => format!("DATA\r\n{}", message(rng)),
        12 => "RSET".into(),
        13 => "NOOP".into(),
        14 => "VRFY bob".into(),
        15 => "EXPN list".into(),
        16 => "HELP".into(),
        17 => format!("AUTH PLAIN {}", base64::encode(PLAIN.as_bytes())),
        18 => format!("AUTH PLAIN\r\n{}", base64::encode(PLAIN.as_bytes())),
        19 => format!(
            "AUTH LOGIN\r\n{}\r\n{}",
            base64::encode(b"alice"),
            base64::encode(b"secret pw")
        ),
        20 => "STARTTLS".into(),
        _ => "QUIT".into(),
    }
}

/// A message body ending in the end-of-data line.
fn message(rng: &mut Rng) -> String {
    let mut m = String::new();
    if rng.one_in(2) {
        m.push_str("Date: Sat, 22 Nov 2025 00:32:00 +0000\r\nMessage-ID: <1@c.example>\r\n");
    }
    m.push_str("From: a@example.test\r\nSubject: test\r\n\r\n");
    for _ in 0..rng.below(6) {
        m.push_str(rng.pick::<&str>(&["hello", "..stuffed", ".", "x\ny", "a\rb", "", "é 8bit"]));
        m.push_str("\r\n");
    }
    m.push('.');
    m
}

pub fn generate_command(rng: &mut Rng) -> Vec<u8> {
    let line = command_line(rng);
    line.split("\r\n")
        .next()
        .unwrap_or_default()
        .as_bytes()
        .to_vec()
}

// Bits of the session input's settings byte.
const AUTH_MASK: u8 = 3;
const UNKNOWN_RCPT: u8 = 4;
const DEFERRED_RCPT: u8 = 8;
const DROP_AT_RCPT: u8 = 16;
const READ_SIZES: [usize; 8] = [usize::MAX, 1, 2, 3, 7, 64, 512, 4096];

pub fn generate_session(rng: &mut Rng) -> Vec<u8> {
    let mut settings = rng.next() as u8;
    if !rng.one_in(8) {
        settings &= !DROP_AT_RCPT;
    }
    let mut input = vec![settings];
    if !rng.one_in(8) {
        input.extend_from_slice(b"EHLO client.example\r\n");
    }
    if settings & AUTH_MASK == 1 || settings & AUTH_MASK == 2 {
        let auth = command_line(&mut Rng::new(17 + rng.below(3) as u64));
        input.extend_from_slice(auth.as_bytes());
        input.extend_from_slice(b"\r\n");
    }
    for _ in 0..rng.below(3) {
        input.extend_from_slice(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<bob@example.test>\r\n");
        input.extend_from_slice(format!("DATA\r\n{}\r\n", message(rng)).as_bytes());
    }
    for _ in 0..rng.below(8) {
        input.extend_from_slice(command_line(rng).as_bytes());
        input.extend_from_slice(if rng.one_in(10) { b"\n" } else { b"\r\n" });
    }
    if !rng.one_in(5) {
        input.extend_from_slice(b"QUIT\r\n");
    }
    input
}

/// The parser's line limit for a verb, per RFC 5321 §4.5.3.1.4 and the extensions.
fn limit(verb: &[u8]) -> usize {
    match verb {
        b"AUTH" => 12288,
        b"MAIL" => 510 + 26 + 500,
        _ => 510,
    }
}

/// Why a command line must never get a 2yz or 3yz reply; `None` when success depends on
/// the session. Necessary conditions only, so the oracle cannot cry wolf.
fn junk(line: &[u8]) -> Option<String> {
    let (verb, rest) = keyword(line);
    if line.len() > limit(&verb) {
        return Some("an overlong line".into());
    }
    if line.contains(&0) {
        return Some("NUL in the line".into());
    }
    if line.iter().any(|&b| is_control(b)) {
        return Some("a control character".into());
    }
    let rest = rest.unwrap_or_default();
    let blank = words(rest).is_empty();
    match verb.as_slice() {
        b"EHLO" | b"HELO" | b"NOOP" | b"HELP" | b"EXPN" => None,
        b"DATA" | b"RSET" | b"QUIT" if !blank => Some("arguments to a verb that takes none".into()),
        b"DATA" | b"RSET" | b"QUIT" => None,
        b"VRFY" if blank => Some("VRFY without an argument".into()),
        b"VRFY" => None,
        b"AUTH" if blank => Some("AUTH without a mechanism".into()),
        b"AUTH" => None,
        b"MAIL" => path_junk(rest, b"FROM:", true),
        b"RCPT" => path_junk(rest, b"TO:", false),
        _ => Some("an unknown verb".into()),
    }
}

/// Necessary conditions on `FROM:<path> params` or `TO:<path>` (RFC 5321 §4.1.2).
fn path_junk(rest: &[u8], prefix: &[u8], reverse: bool) -> Option<String> {
    if !rest.is_ascii() {
        return Some("a non-ASCII path".into());
    }
    let Some(after) = rest
        .get(..prefix.len())
        .filter(|p| p.eq_ignore_ascii_case(prefix))
        .map(|_| &rest[prefix.len()..])
    else {
        return Some(format!("no {}", String::from_utf8_lossy(prefix)));
    };
    let after = after.trim_ascii_start();
    let (address, params) = match after.strip_prefix(b"<") {
        Some(inner) => {
            // The first '>' outside a quoted local part ends the path.
            let Some(close) = closing_bracket(inner) else {
                return Some("a path without '>'".into());
            };
            (&inner[..close], &inner[close + 1..])
        }
        None => {
            let end = after.iter().position(|&b| b == b' ').unwrap_or(after.len());
            (&after[..end], &after[end..])
        }
    };
    let address = match address.strip_prefix(b"@") {
        Some(_) => match address.iter().position(|&b| b == b':') {
            Some(i) => {
                // `@domain` hops separated by ',' (RFC 5321 §4.1.2 A-d-l).
                let hop_ok = |hop: &[u8]| {
                    hop.len() > 1
                        && hop[0] == b'@'
                        && hop[1..].iter().all(|&b| {
                            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']')
                        })
                };
                if !address[..i].split(|&b| b == b',').all(hop_ok) {
                    return Some(format!("the source route {}", show(&address[..i])));
                }
                &address[i + 1..]
            }
            None => return Some("a source route without ':'".into()),
        },
        None => address,
    };
    if address.len() > 254 {
        return Some("an address over 254 octets".into());
    }
    let ok_address = match address.iter().rposition(|&b| b == b'@') {
        Some(at) => at > 0 && at + 1 < address.len(),
        // MAIL takes the null path and, since the hardening issue, a bare local part
        // (`MAIL FROM:<scanner>`, completed or refused by the session); RCPT only
        // `postmaster` without a domain.
        None => reverse || address.eq_ignore_ascii_case(b"postmaster"),
    };
    if !ok_address {
        return Some(format!("the address {}", show(address)));
    }
    for param in words(params) {
        let (key, value) = match param.iter().position(|&b| b == b'=') {
            Some(i) => (&param[..i], &param[i + 1..]),
            None => (param, &b""[..]),
        };
        let key = key.to_ascii_uppercase();
        let fine = reverse
            && match key.as_slice() {
                b"SIZE" => !value.is_empty() && value.iter().all(u8::is_ascii_digit),
                b"BODY" => {
                    value.eq_ignore_ascii_case(b"7BIT") || value.eq_ignore_ascii_case(b"8BITMIME")
                }
                b"AUTH" => !value.is_empty(),
                _ => false,
            };
        if !fine {
            return Some(format!("the parameter {}", show(param)));
        }
    }
    None
}

/// The parameters after MAIL's `FROM:<path>` (or bare path).
fn mail_parameters(rest: &[u8]) -> &[u8] {
    let after = rest.get(5..).unwrap_or_default().trim_ascii_start();
    match after.strip_prefix(b"<") {
        Some(inner) => closing_bracket(inner).map_or(&b""[..], |i| &inner[i + 1..]),
        None => after
            .iter()
            .position(|&b| b == b' ')
            .map_or(&b""[..], |i| &after[i..]),
    }
}

/// Where the `>` that closes a path is, skipping quoted strings (RFC 5321 §4.1.2).
fn closing_bracket(path: &[u8]) -> Option<usize> {
    let mut quoted = false;
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The parser alone: what it accepts must be well-formed, and its error replies must be
/// well-formed replies.
pub fn run_command(line: &[u8]) -> Result<(), String> {
    match command::parse(line) {
        Ok(parsed) => {
            if let Some(why) = junk(line) {
                // What the session always refuses (502 for verbs it does not implement, 504
                // for an unknown AUTH mechanism) may parse: the refusal is the session's.
                let refused = matches!(
                    parsed,
                    command::Command::NotImplemented(_)
                        | command::Command::Auth(command::AuthStart {
                            mechanism: command::Mechanism::Other(_),
                            ..
                        })
                );
                if !refused {
                    return Err(format!("parsed {parsed:?} from a line with {why}"));
                }
            }
            if let command::Command::Ehlo(name) | command::Command::Helo(name) = &parsed
                && !name.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!("greeting name {name:?}"));
            }
            Ok(())
        }
        Err(e) => {
            let reply = e.reply();
            if reply.code < 400 {
                return Err(format!("parse error {e:?} answered {}", reply.code));
            }
            let mut wire = Vec::new();
            reply.write_to(&mut wire).map_err(|e| e.to_string())?;
            parse_replies(&output_lines(&wire)?).map(drop)
        }
    }
}

/// One reply read off the wire.
#[derive(Debug)]
struct WireReply<'a> {
    code: u16,
    lines: Vec<&'a [u8]>,
}

/// Groups output lines into replies: `ddd-text` lines, then a `ddd text` line, one code,
/// each line at most 512 octets with its CRLF (RFC 5321 §4.2, §4.5.3.1.5), no controls.
fn parse_replies<'a>(lines: &[&'a [u8]]) -> Result<Vec<WireReply<'a>>, String> {
    let mut replies = Vec::new();
    let mut open: Option<WireReply> = None;
    for &line in lines {
        let code = line
            .get(..3)
            .filter(|c| c.iter().all(u8::is_ascii_digit) && (b'2'..=b'5').contains(&c[0]))
            .map(|c| {
                u16::from(c[0] - b'0') * 100 + u16::from(c[1] - b'0') * 10 + u16::from(c[2] - b'0')
            })
            .ok_or_else(|| format!("not an SMTP reply line: {}", show(line)))?;
        if line.len() + 2 > 512 {
            return Err(format!("reply line over 512 octets: {}", show(line)));
        }
        if line.iter().any(|&b| is_control(b)) {
            return Err(format!("control character in reply {}", show(line)));
        }
        if std::str::from_utf8(line).is_err() {
            return Err(format!("reply line is not UTF-8: {}", show(line)));
        }
        let reply = open.get_or_insert(WireReply {
            code,
            lines: Vec::new(),
        });
        if reply.code != code {
            return Err(format!("reply changes its code mid-way: {}", show(line)));
        }
        reply.lines.push(&line[4.min(line.len())..]);
        match line.get(3) {
            Some(b'-') => {}
            Some(b' ') => replies.extend(open.take()),
            _ => return Err(format!("no separator after the code: {}", show(line))),
        }
    }
    if open.is_some() {
        return Err("a multi-line reply without its last line".into());
    }
    Ok(replies)
}

/// Where the message that follows a 354 ends: after `.` CRLF at its start or after CRLF
/// `.` CRLF (RFC 5321 §4.1.1.4), the oracle's own reading.
fn end_of_data(data: &[u8]) -> Option<usize> {
    if data.starts_with(b".\r\n") {
        return Some(3);
    }
    data.windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|i| i + 5)
}

/// The session's view the oracle keeps.
struct Model {
    auth: u8,
    authed: bool,
    /// Whether a transaction is open; `None` when the replies do not tell.
    transaction: Option<bool>,
    recipients: usize,
    /// Error replies (and junk commands past Postfix's limit) since the last delivery.
    errors: usize,
    junk: usize,
    auth_failures: usize,
    /// Each accepted message as the oracle's own decoder reads it.
    accepted_messages: Vec<Vec<u8>>,
}

/// Runs one session input and checks its transcript and what the relay received.
pub fn run_session(input: &[u8]) -> Result<(), String> {
    let (settings, client) = input.split_first().map_or((0, &[][..]), |(s, c)| (*s, c));
    let mut config = Config::new("mx.test");
    config.auth_failure_delay = Duration::ZERO;
    config.max_message_size = MAX_SIZE;
    config.max_recipients = MAX_RECIPIENTS;
    config.auth = match settings & AUTH_MASK {
        1 => ClientAuth::Local {
            user: "alice".into(),
            password: "secret pw".into(),
        },
        2 => ClientAuth::Passthrough,
        _ => ClientAuth::None,
    };
    let mut relay = MemoryRelay::default();
    relay.accounts = vec![("alice".into(), "secret pw".into())];
    if settings & UNKNOWN_RCPT != 0 {
        relay.unknown = vec!["nobody@example.test".into()];
    }
    if settings & DEFERRED_RCPT != 0 {
        relay.rcpt_replies = vec![(
            "later@example.test".into(),
            Reply::from_backend(451, &["4.2.0 try later"]),
        )];
    }
    if settings & DROP_AT_RCPT != 0 {
        relay.drop_at = Some("RCPT".into());
    }
    let read_size = READ_SIZES[usize::from(settings >> 5) % READ_SIZES.len()];
    let reader = BufReader::with_capacity(read_size.min(client.len().max(1)), client);
    let mut out = Vec::new();
    Session::new(reader, &mut out, &mut relay, &config).run();
    let mut model = Model::new(settings & AUTH_MASK);
    check_transcript(&mut model, client, &out)?;
    if model.accepted_messages.len() != relay.delivered.len() {
        return Err(format!(
            "{} messages accepted, the relay delivered {}",
            model.accepted_messages.len(),
            relay.delivered.len()
        ));
    }
    for (sent, delivery) in model.accepted_messages.iter().zip(&relay.delivered) {
        if has_bare_line_end(&delivery.data) {
            return Err(format!("bare CR or LF relayed: {}", show(&delivery.data)));
        }
        // Header edits may add fields; the body after the header block is relayed as sent.
        if let Some(blank) = sent.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = &sent[blank + 4..];
            if !delivery.data.ends_with(body) {
                return Err(format!(
                    "body {} relayed as {}",
                    show(body),
                    show(&delivery.data)
                ));
            }
        }
    }
    Ok(())
}

fn has_bare_line_end(data: &[u8]) -> bool {
    data.iter().enumerate().any(|(i, &b)| {
        (b == b'\r' && data.get(i + 1) != Some(&b'\n'))
            || (b == b'\n' && (i == 0 || data[i - 1] != b'\r'))
    })
}

fn check_transcript(model: &mut Model, client: &[u8], out: &[u8]) -> Result<(), String> {
    let lines = output_lines(out)?;
    let replies = parse_replies(&lines)?;
    let mut replies = replies.iter().peekable();
    match replies.next() {
        Some(greeting) if greeting.code == 220 => {}
        other => return Err(format!("no 220 greeting: {other:?}")),
    }
    let mut pos = 0;
    let mut n = 0;
    while let Some((line, next)) = next_line(client, pos, LINE_BUFFER) {
        pos = next;
        n += 1;
        let Some(reply) = replies.next() else {
            return Err(format!("no reply to line {n} {}", describe(line)));
        };
        let line_number = n;
        let context = || format!("line {line_number} {} got {}", describe(line), reply.code);
        if reply.code >= 400 {
            model.errors += 1;
        }
        let ClientLine::Line(line) = line else {
            if reply.code < 400 {
                return Err(format!("{}: success for an overlong line", context()));
            }
            if closes(model, reply, &mut replies)? {
                return Ok(());
            }
            continue;
        };
        let (verb, rest) = keyword(line);
        if matches!(
            verb.as_slice(),
            b"NOOP" | b"RSET" | b"VRFY" | b"HELP" | b"EXPN"
        ) {
            model.junk += 1;
        }
        if reply.code < 400
            && let Some(why) = junk(line)
        {
            return Err(format!("{}: success for a line with {why}", context()));
        }
        let args = words(rest.unwrap_or_default());
        match (reply.code, verb.as_slice()) {
            (221, b"QUIT") => {
                hit("smtp QUITs");
                return match replies.next() {
                    None => Ok(()),
                    Some(extra) => Err(format!("a reply after 221: {extra:?}")),
                };
            }
            (221, _) | (_, b"QUIT") if reply.code < 400 => {
                return Err(format!("{}: QUIT and 221 go together", context()));
            }
            (334, b"AUTH") => {
                let mut responses: Vec<&[u8]> = args.get(1).into_iter().copied().collect();
                let mut last = reply;
                while last.code == 334 {
                    let Some((response, after)) = next_line(client, pos, LINE_BUFFER) else {
                        return no_more(&mut replies, "after the client left mid-AUTH");
                    };
                    pos = after;
                    n += 1;
                    match response {
                        ClientLine::Line(r) => responses.push(r),
                        ClientLine::TooLong => responses.push(b"(overlong)"),
                    }
                    let Some(reply) = replies.next() else {
                        return Err(format!("{}: no reply to a SASL response", context()));
                    };
                    last = reply;
                    if responses.len() > 2 {
                        return Err(format!("{}: a third SASL challenge", context()));
                    }
                }
                if last.code >= 400 {
                    model.errors += 1;
                }
                model
                    .auth_result(last.code, &args, &responses)
                    .map_err(|why| format!("{}: {why}", context()))?;
                if last.code >= 400 && closes(model, last, &mut replies)? {
                    return Ok(());
                }
            }
            (235, b"AUTH") => {
                let responses: Vec<&[u8]> = args.get(1).into_iter().copied().collect();
                model
                    .auth_result(235, &args, &responses)
                    .map_err(|why| format!("{}: {why}", context()))?;
            }
            (354, b"DATA") => {
                if model.transaction == Some(false)
                    || (model.transaction.is_some() && model.recipients == 0)
                {
                    return Err(format!(
                        "{}: DATA accepted without MAIL and RCPT",
                        context()
                    ));
                }
                let Some(length) = end_of_data(&client[pos..]) else {
                    return no_more(&mut replies, "after the client left mid-DATA");
                };
                let data = &client[pos..pos + length];
                pos += length;
                let Some(reply) = replies.next() else {
                    return Err(format!("{}: no reply to the final dot", context()));
                };
                model.transaction = Some(false);
                model.recipients = 0;
                if reply.code < 300 {
                    // Header edits add a little; the limit applies to what was received.
                    let message = reference_decode(&data[..length - 3]);
                    if message.len() as u64 > MAX_SIZE + 1000 {
                        let size = message.len();
                        return Err(format!("{}: accepted {size} octets", context()));
                    }
                    model.accepted_messages.push(message);
                    hit("smtp messages relayed");
                    model.errors = 0;
                    model.junk = 0;
                } else {
                    model.errors += 1;
                    if closes(model, reply, &mut replies)? {
                        return Ok(());
                    }
                }
            }
            (300..=399, _) => {
                return Err(format!("{}: an intermediate reply out of place", context()));
            }
            (200..=299, b"EHLO" | b"HELO") => {
                model.transaction = Some(false);
                model.recipients = 0;
            }
            (200..=299, b"MAIL") => {
                if model.transaction == Some(true) {
                    return Err(format!("{}: nested MAIL accepted", context()));
                }
                if model.auth != 0 && model.auth != 3 && !model.authed {
                    return Err(format!("{}: MAIL accepted before AUTH", context()));
                }
                let parameters = words(mail_parameters(rest.unwrap_or_default()));
                let size = parameters.iter().find_map(|p| {
                    p.get(..5)
                        .filter(|k| k.eq_ignore_ascii_case(b"SIZE="))
                        .map(|_| {
                            String::from_utf8_lossy(&p[5..])
                                .parse::<u64>()
                                .unwrap_or(u64::MAX)
                        })
                });
                if size.is_some_and(|s| s > MAX_SIZE) {
                    return Err(format!("{}: MAIL accepted over SIZE", context()));
                }
                model.transaction = Some(true);
                model.recipients = 0;
            }
            (200..=299, b"RCPT") => {
                if model.transaction == Some(false) {
                    return Err(format!(
                        "{}: RCPT accepted outside a transaction",
                        context()
                    ));
                }
                model.recipients += 1;
                hit("smtp RCPTs accepted");
                if model.recipients > MAX_RECIPIENTS {
                    return Err(format!(
                        "{}: more than {MAX_RECIPIENTS} recipients",
                        context()
                    ));
                }
            }
            (200..=299, b"RSET") => {
                model.transaction = Some(false);
                model.recipients = 0;
            }
            (200..=299, b"NOOP" | b"VRFY" | b"HELP") => {}
            (200..=299, _) => {
                return Err(format!("{}: success for this verb", context()));
            }
            _ => {
                // Refused. DATA may have ended the transaction (a lost backend); a refused
                // MAIL or RCPT changes nothing the oracle relies on.
                if verb == b"DATA" {
                    model.transaction = None;
                }
                if verb == b"AUTH" {
                    model.auth_failures += 1;
                }
                if closes(model, reply, &mut replies)? {
                    return Ok(());
                }
            }
        }
    }
    no_more(&mut replies, "after the last client line")
}

type Replies<'i, 'a> = std::iter::Peekable<std::slice::Iter<'i, WireReply<'a>>>;

/// After an error reply: a 421 may follow and close the session, once enough errors or
/// failed logins were seen. True when the session closed here.
fn closes(model: &Model, reply: &WireReply, replies: &mut Replies) -> Result<bool, String> {
    let cause = model.errors + model.junk.saturating_sub(100) >= 20 || model.auth_failures >= 3;
    let closing = if reply.code == 421 {
        true
    } else if replies.peek().is_some_and(|r| r.code == 421) {
        replies.next();
        true
    } else {
        false
    };
    if !closing {
        return Ok(false);
    }
    if !cause {
        return Err(format!(
            "421 without cause ({} errors, {} junk commands, {} failed logins)",
            model.errors, model.junk, model.auth_failures
        ));
    }
    hit("smtp sessions closed with 421");
    no_more(replies, "after 421").map(|()| true)
}

fn no_more(replies: &mut Replies, when: &str) -> Result<(), String> {
    match replies.next() {
        None => Ok(()),
        Some(extra) => Err(format!("a reply {when}: {extra:?}")),
    }
}

fn describe(line: ClientLine) -> String {
    match line {
        ClientLine::Line(line) => show(line),
        ClientLine::TooLong => "(overlong)".into(),
    }
}

impl Model {
    /// A fresh session; `auth` is the settings' AUTH_MASK bits.
    fn new(auth: u8) -> Model {
        Model {
            auth,
            authed: false,
            transaction: Some(false),
            recipients: 0,
            errors: 0,
            junk: 0,
            auth_failures: 0,
            accepted_messages: Vec::new(),
        }
    }

    /// Checks the outcome of an AUTH exchange: 235 only for the right credentials.
    fn auth_result(
        &mut self,
        code: u16,
        args: &[&[u8]],
        responses: &[&[u8]],
    ) -> Result<(), String> {
        if code >= 400 {
            // Every failed way of logging in may count towards the limit.
            self.auth_failures += 1;
        }
        if code != 235 {
            return Ok(());
        }
        if self.auth == 0 || self.auth == 3 {
            return Err("AUTH succeeded with authentication off".into());
        }
        if self.authed {
            return Err("a second AUTH succeeded".into());
        }
        if self.transaction == Some(true) {
            return Err("AUTH succeeded inside a transaction".into());
        }
        let decode = |r: &[u8]| {
            if r == b"=" {
                Some(Vec::new())
            } else {
                unbase64(r)
            }
        };
        let mechanism = args
            .first()
            .map(|m| m.to_ascii_uppercase())
            .unwrap_or_default();
        let good = match (mechanism.as_slice(), responses) {
            (b"PLAIN", [response]) => decode(response).is_some_and(|d| {
                let parts: Vec<&[u8]> = d.split(|&b| b == 0).collect();
                matches!(parts.as_slice(), [z, u, p]
                    if (z.is_empty() || z == u) && *u == b"alice" && *p == b"secret pw")
            }),
            (b"LOGIN", [user, password]) => {
                decode(user).as_deref() == Some(b"alice")
                    && decode(password).as_deref() == Some(b"secret pw")
            }
            _ => false,
        };
        if !good {
            return Err(format!(
                "AUTH {} succeeded with {:?}",
                show(&mechanism),
                responses.iter().map(|r| show(r)).collect::<Vec<_>>()
            ));
        }
        self.authed = true;
        hit("smtp AUTH successes");
        Ok(())
    }
}

// ---- DATA decoder ----------------------------------------------------------------------

pub fn generate_data(rng: &mut Rng) -> Vec<u8> {
    let mut input = vec![rng.next() as u8];
    input.extend_from_slice(message(rng).as_bytes());
    input.extend_from_slice(b"\r\n");
    if rng.one_in(2) {
        input.extend_from_slice(b"QUIT\r\n");
    }
    input
}

/// The message a DATA phase must yield, by the oracle's own reading: up to the end of
/// data, every CRLF, bare CR and bare LF a line end (CRLF), and a leading dot removed from
/// every line that has more after it (RFC 5321 §4.5.2).
fn reference_decode(data: &[u8]) -> Vec<u8> {
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let mut ended = false;
    while i < data.len() {
        match data[i] {
            b'\r' => {
                lines.push(&data[start..i]);
                if data.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
                ended = true;
            }
            b'\n' => {
                lines.push(&data[start..i]);
                start = i + 1;
                ended = true;
            }
            _ => ended = false,
        }
        i += 1;
    }
    let mut out = Vec::new();
    for line in lines {
        let line = match line {
            [b'.', rest @ ..] if !rest.is_empty() => rest,
            _ => line,
        };
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    if !ended && start < data.len() {
        let tail = &data[start..];
        out.extend_from_slice(match tail {
            [b'.', rest @ ..] if !rest.is_empty() => rest,
            _ => tail,
        });
    }
    out
}

/// Decodes in pieces of `chunk` bytes, as the session feeds what arrives.
fn decode_in(input: &[u8], chunk: usize) -> (Vec<u8>, usize, bool) {
    let mut decoder = DataDecoder::new();
    let mut out = Vec::new();
    let mut used = 0;
    for piece in input.chunks(chunk.max(1)) {
        let n = decoder.decode(piece, &mut out);
        used += n;
        if n > piece.len() {
            return (out, usize::MAX, false);
        }
        if decoder.is_done() {
            break;
        }
    }
    (out, used, decoder.is_done())
}

pub fn run_data(input: &[u8]) -> Result<(), String> {
    let (selector, data) = input.split_first().map_or((0, &[][..]), |(s, d)| (*s, d));
    let chunk = [1, 2, 3, 5, 7, 64, 1000, usize::MAX][usize::from(selector) % 8];
    let whole = decode_in(data, usize::MAX);
    let pieces = decode_in(data, chunk);
    if pieces != whole {
        return Err(format!(
            "pieces of {chunk} decode differently from the whole"
        ));
    }
    let (out, used, done) = whole;
    match end_of_data(data) {
        Some(end) => {
            if !done || used != end {
                return Err(format!(
                    "end of data at {end}, decoder used {used} (done: {done})"
                ));
            }
            // Without the final ".\r\n": the CRLF before it belongs to the message.
            let expected = reference_decode(&data[..end - 3]);
            if out != expected {
                return Err(format!(
                    "decoded {}, expected {}",
                    show(&out),
                    show(&expected)
                ));
            }
        }
        None => {
            if done || used != data.len() {
                return Err(format!("no end of data, but the decoder stopped at {used}"));
            }
            // A partial last line may still change (a dot, a CR): the whole lines decoded
            // so far must agree.
            let expected = reference_decode(data);
            let whole_lines = out.len() - out.rsplit(|&c| c == b'\n').next().map_or(0, <[u8]>::len);
            if !expected.starts_with(&out[..whole_lines]) {
                return Err(format!(
                    "decoded {}, expected {}",
                    show(&out),
                    show(&expected)
                ));
            }
        }
    }
    if has_bare_line_end(&out) {
        return Err(format!("bare CR or LF in decoded data {}", show(&out)));
    }
    Ok(())
}

// ---- backend replies -------------------------------------------------------------------

pub fn generate_replies(rng: &mut Rng) -> Vec<u8> {
    let mut input = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let reply = rng.pick_bytes(&[
            &b"250 2.1.0 Ok\r\n"[..],
            b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n",
            b"550 5.1.1 <x@example.test>: Recipient address rejected: User unknown\r\n",
            b"421 4.4.2 mx.example Error: timeout exceeded\r\n",
            b"354 End data with <CR><LF>.<CR><LF>\r\n",
            b"235 2.7.0 Authentication successful\r\n",
            b"451-4.3.0 first\r\n451 4.3.0 second\r\n",
            b"250 Ok\r\n",
            b"554 5.7.1 \xc3\xa9t\xc3\xa9 refused\r\n",
            b"250-2.0.0 a\r\n250-2.0.0\r\n250 2.0.0 c\r\n",
            b"535 5.7.8 Error: authentication failed: UGFzc3dvcmQ6\r\n",
        ]);
        input.extend_from_slice(reply);
    }
    input
}

/// The backend's bytes as the relay sees them: an SMTP server's side of a connection that
/// hands out 7 bytes per read and swallows what the client writes.
struct Replay<'a> {
    input: &'a [u8],
}

impl std::io::Read for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(7).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl std::io::Write for Replay<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Transport for Replay<'_> {
    fn set_timeout(&mut self, _: std::time::Duration) -> std::io::Result<()> {
        Ok(())
    }
    fn cut(&mut self) {}
    fn is_quiet(&self) -> bool {
        true
    }
}

/// Replies as the submission client reads them off the backend (a malformed line is an
/// error, and reading goes on with the next), then as the relay turns them into our
/// replies and writes them to the client.
pub fn run_replies(input: &[u8]) -> Result<(), String> {
    let mut client = Client::new(Replay { input });
    loop {
        match client.read_reply() {
            Ok(reply) => {
                if !(200..600).contains(&reply.code) || reply.lines.is_empty() {
                    return Err(format!("read an impossible reply {reply:?}"));
                }
                let _ = Extensions::parse(&reply);
                check_backend_reply(reply.code, &reply.lines)?;
                hit("smtp replies read by the submission client");
            }
            Err(submission::Error::Malformed(_)) => hit("smtp reply lines refused"),
            Err(_) => break,
        }
    }
    // The raw lines too, whatever the reader makes of them: the relay must cope with any text.
    let texts: Vec<String> = input
        .split(|&b| b == b'\n')
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    for code in [250, 354, 421, 550] {
        check_backend_reply(code, &texts)?;
    }
    Ok(())
}

/// A backend reply must reach the client as well-formed SMTP with the same code (421
/// becomes 451), an enhanced code of its class, and be judged by [`check`] by its class.
fn check_backend_reply<S: AsRef<str>>(code: u16, texts: &[S]) -> Result<(), String> {
    let reply = Reply::from_backend(code, texts);
    if let Some(e) = reply.enhanced {
        if u16::from(e.class) != code / 100 {
            return Err(format!("{code} got enhanced code {e}"));
        }
        if Enhanced::parse(&e.to_string()) != Some(e) {
            return Err(format!("enhanced code {e} does not read back"));
        }
    } else if matches!(code / 100, 2 | 4 | 5) {
        return Err(format!("{code} without an enhanced code"));
    }
    for (stage, good) in [
        (Stage::Mail, code / 100 == 2),
        (Stage::Rcpt, code / 100 == 2),
        (Stage::Data, code == 354),
        (Stage::EndOfData, code / 100 == 2),
        (Stage::Rset, code / 100 == 2),
        (Stage::Noop, code / 100 == 2),
    ] {
        let refusal = (400..600).contains(&code)
            && matches!(
                stage,
                Stage::Mail | Stage::Rcpt | Stage::Data | Stage::EndOfData
            );
        if check(stage, reply.clone()).is_ok() != (good || refusal) {
            return Err(format!("{stage} judged {code} wrongly"));
        }
    }
    let relayed = reply.relayed();
    let expected = if code == 421 { 451 } else { code };
    let mut wire = Vec::new();
    relayed.write_to(&mut wire).map_err(|e| e.to_string())?;
    let lines = output_lines(&wire)?;
    let replies = parse_replies(&lines)?;
    match replies.as_slice() {
        [one] if one.code == expected && one.lines.len() == texts.len().max(1) => Ok(()),
        other => Err(format!("backend {code} relayed as {other:?}")),
    }
}

// ---- the STARTTLS exchange's reply reader ----------------------------------------------

pub fn generate_starttls(rng: &mut Rng) -> Vec<u8> {
    let mut input = rng
        .pick_bytes(&[
            &b"220 mx.example ESMTP Postfix\r\n"[..],
            b"220-mx.example ESMTP\r\n220-more\r\n220 ready\r\n",
            b"250-mx.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n",
            b"220 2.0.0 Ready to start TLS\r\n",
            b"454 4.7.0 TLS not available due to local problem\r\n",
            b"220\r\n",
            b"220 x\n",
        ])
        .to_vec();
    // What follows the reply (a TLS handshake, or an injected command) must stay unread.
    input.extend_from_slice(rng.pick_bytes(&[
        &b"\x16\x03\x01\x02\x00\x01"[..],
        b"250 injected\r\n",
        b"",
    ]));
    input
}

/// The reply reader used before STARTTLS reads one reply and not a byte more (bytes after
/// the go-ahead belong to the TLS handshake: CVE-2011-0411), and only well-formed replies.
pub fn run_starttls(input: &[u8]) -> Result<(), String> {
    let mut rest = input;
    if let Ok((code, raw)) = read_smtp_reply(&mut rest) {
        if !input.starts_with(&raw) || rest.len() + raw.len() != input.len() {
            return Err(format!(
                "read {} octets for a reply of {}",
                input.len() - rest.len(),
                raw.len()
            ));
        }
        let lines: Vec<&[u8]> = raw.split_inclusive(|&b| b == b'\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let last = i + 1 == lines.len();
            let digits = line.get(..3).filter(|d| d.iter().all(u8::is_ascii_digit));
            let ok = line.ends_with(b"\n")
                && digits.is_some_and(|d| d == format!("{code:03}").as_bytes())
                && match line.get(3) {
                    Some(b'-') => !last,
                    Some(b' ' | b'\r' | b'\n') => last,
                    _ => false,
                };
            if !ok {
                return Err(format!(
                    "reply {code} accepted with the line {}",
                    show(line)
                ));
            }
        }
        hit("starttls replies read");
    }
    let first = input
        .split_inclusive(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    let stripped = strip_capability_code(first);
    if stripped != first && !stripped.starts_with(b"* OK ") {
        return Err(format!(
            "greeting {} became {}",
            show(first),
            show(&stripped)
        ));
    }
    Ok(())
}

/// Forged transcripts that break one property each: the oracle must reject every one.
pub fn self_check() -> Result<(), String> {
    const G: &str = "220 mx.test ESMTP ready\r\n";
    let forged: [(&str, &str, String); 9] = [
        (
            "an extra reply",
            "NOOP\r\n",
            format!("{G}250 ok\r\n250 again\r\n"),
        ),
        (
            "a missing reply",
            "NOOP\r\nNOOP\r\n",
            format!("{G}250 ok\r\n"),
        ),
        ("250 for a NUL", "NOOP \0\r\n", format!("{G}250 ok\r\n")),
        ("a bare LF", "NOOP\r\n", format!("{G}250 ok\n")),
        (
            "a code change",
            "EHLO x\r\n",
            format!("{G}250-a\r\n251 b\r\n"),
        ),
        (
            "RCPT without MAIL",
            "RCPT TO:<a@b>\r\n",
            format!("{G}250 ok\r\n"),
        ),
        (
            "250 for a bad address",
            "MAIL FROM:<a>\r\n",
            format!("{G}250 ok\r\n"),
        ),
        (
            "an early 421",
            "FOO\r\n",
            format!("{G}500 no\r\n421 bye\r\n"),
        ),
        (
            "a wrong password",
            "AUTH PLAIN AGFsaWNlAHdyb25n\r\n",
            format!("{G}235 2.7.0 ok\r\n"),
        ),
    ];
    for (what, client, out) in forged {
        let mut model = Model::new(1);
        if check_transcript(&mut model, client.as_bytes(), out.as_bytes()).is_ok() {
            return Err(format!("SMTP oracle accepted {what}"));
        }
    }
    if reference_decode(b"a\r\n..b\nc\r") != b"a\r\n.b\r\nc\r\n" {
        return Err("reference DATA decoder".into());
    }
    let mut rng = Rng::new(1);
    for _ in 0..50 {
        run_session(&generate_session(&mut rng))
            .map_err(|e| format!("SMTP oracle refused a valid session: {e}"))?;
        run_data(&generate_data(&mut rng))
            .map_err(|e| format!("DATA oracle refused a valid message: {e}"))?;
        run_replies(&generate_replies(&mut rng))
            .map_err(|e| format!("reply oracle refused valid replies: {e}"))?;
    }
    Ok(())
}
