//! POP3 targets: the command parser alone, and the whole session core over the in-memory
//! maildrop, with an oracle that reads the transcript as a client would.

use crate::mutate::{Rng, unbase64};
use crate::reach::hit;
use crate::wire::{ClientLine, client_lines, is_control, keyword, output_lines, show, words};
use legacy_mail_proxy::base64;
use legacy_mail_proxy::pop3::NulBytes;
use legacy_mail_proxy::pop3::command;
use legacy_mail_proxy::pop3::memory::MemoryOpener;
use legacy_mail_proxy::pop3::session::{Config, Session};
use std::io::BufReader;
use std::time::Duration;

/// The session core's line limit (RFC 2449 §4 allows 255; SASL responses are longer).
const MAX_LINE: usize = 2048;
const USER: &[u8] = b"alice";
const PASSWORD: &[u8] = b"secret pw";

/// The maildrop every session sees: dot lines, bare LF and CR, no final line break, an
/// empty message, NUL, and a body holding the end-of-message sequence.
const MESSAGES: [&[u8]; 5] = [
    b"From: a@example.test\r\nSubject: one\r\n\r\nHello\r\n.dot line\r\n",
    b"Subject: two\n\nbare\nlf\n.\n..\n",
    b"Subject: three\r\n\r\nno final newline",
    b"",
    b"Subject: nul\r\n\r\na\0b\r\rc\r\n.\r\n\r\n.\r\nend\r\n..x\r\n",
];

/// Read sizes of the client connection, chosen by the input's first byte.
const READ_SIZES: [usize; 8] = [usize::MAX, 1, 2, 3, 5, 7, 64, 4096];

pub const DICTIONARY: &[&[u8]] = &[
    b"USER ",
    b"PASS ",
    b"AUTH ",
    b"PLAIN",
    b"CAPA",
    b"STAT",
    b"LIST",
    b"UIDL",
    b"RETR ",
    b"TOP ",
    b"DELE ",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"APOP ",
    b"STLS",
    b"alice",
    b"secret pw",
    b"\r\n",
    b"\n",
    b" ",
    b"*",
    b"=",
    b"AGFsaWNlAHNlY3JldCBwdw==",
    b"1",
    b"5",
    b"6",
    b"0",
];

/// One client command line, valid or plausibly so.
fn command_line(rng: &mut Rng) -> Vec<u8> {
    let number = |rng: &mut Rng| {
        if rng.one_in(8) {
            rng.below(8).to_string()
        } else {
            (1 + rng.below(MESSAGES.len())).to_string()
        }
    };
    let line = match rng.below(20) {
        0 => "CAPA".to_string(),
        1 => "STAT".into(),
        2 => "LIST".into(),
        3 => format!("LIST {}", number(rng)),
        4 => "UIDL".into(),
        5 => format!("UIDL {}", number(rng)),
        6 | 7 => format!("RETR {}", number(rng)),
        8 | 9 => format!("TOP {} {}", number(rng), rng.below(4)),
        10 | 11 => format!("DELE {}", number(rng)),
        12 => "RSET".into(),
        13 => "NOOP".into(),
        14 => "USER alice".into(),
        15 => "PASS secret pw".into(),
        16 => "AUTH".into(),
        17 => "APOP alice 0123456789abcdef".into(),
        18 => "STLS".into(),
        _ => "QUIT".into(),
    };
    let mut line = line.into_bytes();
    if rng.one_in(6) {
        line.make_ascii_lowercase();
    }
    line
}

/// A login, by USER/PASS or by AUTH PLAIN in one of its forms.
fn login(rng: &mut Rng) -> Vec<u8> {
    let plain = |authz: &str| base64::encode(format!("{authz}\0alice\0secret pw").as_bytes());
    match rng.below(5) {
        0 | 1 => b"USER alice\r\nPASS secret pw\r\n".to_vec(),
        2 => format!("AUTH PLAIN {}\r\n", plain("")).into_bytes(),
        3 => format!("AUTH PLAIN\r\n{}\r\n", plain("alice")).into_bytes(),
        _ => b"USER alice\r\nPASS wrong\r\nUSER alice\r\nPASS secret pw\r\n".to_vec(),
    }
}

/// A session input: a settings byte, then what the client sends.
pub fn generate_session(rng: &mut Rng) -> Vec<u8> {
    let mut input = vec![rng.next() as u8 & !(DIE_AFTER * (!rng.one_in(8)) as u8)];
    if rng.one_in(4) {
        input.extend_from_slice(b"CAPA\r\n");
    }
    if !rng.one_in(10) {
        input.extend(login(rng));
    }
    for _ in 0..rng.below(12) {
        input.extend(command_line(rng));
        input.extend_from_slice(if rng.one_in(10) { b"\n" } else { b"\r\n" });
    }
    if !rng.one_in(5) {
        input.extend_from_slice(b"QUIT\r\n");
    }
    input
}

pub fn generate_command(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 => login(rng)
            .split(|&b| b == b'\n')
            .next()
            .unwrap_or_default()
            .to_vec(),
        _ => command_line(rng),
    }
}

// Bits of the settings byte.
const NUL_KEEP: u8 = 1;
const GONE: u8 = 2;
const DIE_AFTER: u8 = 4;
const SMALL_CHUNKS: u8 = 8;

/// Why a line must not get `+OK` whatever the state: the parser's part of the oracle.
/// `None` when the line is well-formed enough that success depends on the session.
fn syntax_junk(line: &[u8]) -> Option<&'static str> {
    if line.contains(&0) {
        return Some("NUL in the line");
    }
    let (verb, rest) = keyword(line);
    const KNOWN: [&[u8]; 13] = [
        b"USER", b"PASS", b"AUTH", b"CAPA", b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE",
        b"RSET", b"NOOP", b"QUIT",
    ];
    if !KNOWN.contains(&verb.as_slice()) {
        return Some("unknown command");
    }
    match verb.as_slice() {
        // The name and password are opaque text (old clients send Latin-1).
        b"USER" if rest.is_none_or(|r| r.is_empty()) => return Some("USER without a name"),
        b"PASS" if rest.is_none() => return Some("PASS without a password"),
        b"USER" | b"PASS" => return None,
        _ => {}
    }
    if line.iter().any(|&b| is_control(b)) {
        return Some("control character");
    }
    let rest = rest.unwrap_or_default();
    if std::str::from_utf8(rest).is_err() {
        // The parser reads such arguments as one unreadable word; the session refuses it.
        return None;
    }
    let count = words(rest).len();
    let fits = match verb.as_slice() {
        b"LIST" | b"UIDL" => count <= 1,
        b"RETR" | b"DELE" => count == 1,
        b"TOP" | b"AUTH" => count <= 2 && (verb != b"TOP" || count == 2),
        _ => count == 0,
    };
    (!fits).then_some("wrong number of arguments")
}

/// The parser alone: whatever it accepts must be well-formed.
pub fn run_command(line: &[u8]) -> Result<(), String> {
    match (command::parse(line), syntax_junk(line)) {
        (Ok(command), Some(why)) => Err(format!("parsed {command:?} from a line with {why}")),
        _ => Ok(()),
    }
}

/// A message as RETR must send it before dot-stuffing: CRLF line ends (bare CR and LF
/// become CRLF), a final CRLF, NUL replaced unless kept. The oracle's own version.
fn normalized(message: &[u8], keep_nul: bool) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let mut line = Vec::new();
    let mut i = 0;
    while i < message.len() {
        match message[i] {
            b'\r' => {
                lines.push(std::mem::take(&mut line));
                if message.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => lines.push(std::mem::take(&mut line)),
            0 if !keep_nul => line.push(0x80),
            b => line.push(b),
        }
        i += 1;
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

fn octets(lines: &[Vec<u8>]) -> usize {
    lines.iter().map(|l| l.len() + 2).sum()
}

/// The client's view of the session so far.
struct Model {
    logged_in: bool,
    user: Option<Vec<u8>>,
    deleted: [bool; MESSAGES.len()],
    errors: usize,
    auth_errors: usize,
    settings: u8,
    /// The session ended inside a message (the backend failed, as configured).
    cut_mid_message: bool,
}

impl Model {
    /// The message a numeric argument names, if the session must accept it.
    fn message(&self, arg: &[u8]) -> Result<usize, &'static str> {
        if arg.is_empty() || !arg.iter().all(u8::is_ascii_digit) {
            return Err("a message number that is not a number");
        }
        let n: usize = std::str::from_utf8(arg)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        if n == 0 || n > MESSAGES.len() {
            return Err("a message number out of range");
        }
        if self.deleted[n - 1] {
            return Err("a deleted message");
        }
        Ok(n - 1)
    }

    fn listing(&self, uidl: bool) -> Vec<Vec<u8>> {
        (0..MESSAGES.len())
            .filter(|&i| !self.deleted[i])
            .map(|i| self.list_item(i, uidl))
            .collect()
    }

    fn list_item(&self, i: usize, uidl: bool) -> Vec<u8> {
        if uidl {
            format!("{} {:08x}{:08x}", i + 1, i + 1, 1234).into_bytes()
        } else {
            let size = octets(&normalized(MESSAGES[i], self.settings & NUL_KEEP != 0));
            format!("{} {size}", i + 1).into_bytes()
        }
    }

    /// Whether a login with these credentials must work.
    fn credentials_ok(user: &[u8], password: &[u8]) -> bool {
        user == USER && password == PASSWORD
    }
}

/// What a reply line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Err,
    Continue,
}

fn status(line: &[u8]) -> Result<Status, String> {
    let text_ok = |text: &[u8]| text.is_empty() || (text[0] == b' ');
    let status = if let Some(text) = line.strip_prefix(b"+OK") {
        text_ok(text).then_some(Status::Ok)
    } else if let Some(text) = line.strip_prefix(b"-ERR") {
        text_ok(text).then_some(Status::Err)
    } else if line.starts_with(b"+ ") {
        Some(Status::Continue)
    } else {
        None
    };
    match status {
        Some(_) if line.iter().any(|&b| is_control(b)) => {
            Err(format!("control character in reply {}", show(line)))
        }
        Some(status) => Ok(status),
        None => Err(format!("not a POP3 reply: {}", show(line))),
    }
}

/// Runs one session input and checks its transcript.
pub fn run_session(input: &[u8]) -> Result<(), String> {
    let (settings, client) = input.split_first().map_or((0, &[][..]), |(s, c)| (*s, c));
    let mut opener = MemoryOpener::new("alice", "secret pw", messages());
    if settings & GONE != 0 {
        opener.gone = vec![3];
    }
    if settings & DIE_AFTER != 0 {
        opener.die_after = Some(10);
    }
    opener.chunk = if settings & SMALL_CHUNKS != 0 { 1 } else { 7 };
    let config = Config {
        auth_failure_delay: Duration::ZERO,
        nul_bytes: if settings & NUL_KEEP != 0 {
            NulBytes::Keep
        } else {
            NulBytes::Replace
        },
        ..Config::default()
    };
    let read_size = READ_SIZES[usize::from(settings >> 4) % READ_SIZES.len()];
    let reader = BufReader::with_capacity(read_size.min(client.len().max(1)), client);
    let mut out = Vec::new();
    Session::new(reader, &mut out, &mut opener, config).run();
    check_transcript(settings, client, &out)
}

fn messages() -> Vec<Vec<u8>> {
    MESSAGES.iter().map(|m| m.to_vec()).collect()
}

/// The transcript oracle: one reply per line, replies well-formed, success only for what
/// must succeed.
fn check_transcript(settings: u8, client: &[u8], out: &[u8]) -> Result<(), String> {
    // A backend failure mid-message ends the session mid-line, on purpose: without the
    // final "." the client knows the message is incomplete.
    let complete = out.len() - out.rsplit(|&b| b == b'\n').next().map_or(0, <[u8]>::len);
    let (out, partial) = if settings & DIE_AFTER != 0 {
        (&out[..complete], complete < out.len())
    } else {
        (out, false)
    };
    let lines = output_lines(out)?;
    let mut model = Model {
        logged_in: false,
        user: None,
        deleted: [false; MESSAGES.len()],
        errors: 0,
        auth_errors: 0,
        settings,
        cut_mid_message: false,
    };
    walk(&mut model, client, &lines)?;
    if partial && !model.cut_mid_message {
        return Err("output ends without CRLF".into());
    }
    Ok(())
}

/// Reads the replies in step with the client's lines.
fn walk(model: &mut Model, client: &[u8], lines: &[&[u8]]) -> Result<(), String> {
    let mut replies = lines.iter().copied().peekable();
    match replies.next() {
        Some(greeting) if status(greeting)? == Status::Ok => {}
        other => return Err(format!("no +OK greeting: {:?}", other.map(show))),
    }
    let commands = client_lines(client, MAX_LINE);
    let mut i = 0;
    while i < commands.len() {
        let command = commands[i];
        i += 1;
        let Some(reply) = replies.next() else {
            return Err(format!("no reply to line {i} {}", describe(command)));
        };
        let status = status(reply)?;
        if status == Status::Err {
            model.errors += 1;
        }
        let more = i < commands.len();
        if reply.starts_with(b"-ERR [AUTH]") {
            model.auth_errors += 1;
        }
        let line_number = i;
        let context = || {
            format!(
                "line {line_number} {} got {}",
                describe(command),
                show(reply)
            )
        };
        let ClientLine::Line(line) = command else {
            if status == Status::Ok || status == Status::Continue {
                return Err(format!("{}: success for an overlong line", context()));
            }
            if ends_after_error(model, reply, more, &mut replies)? {
                return Ok(());
            }
            continue;
        };
        if status != Status::Err
            && let Some(why) = syntax_junk(line)
        {
            return Err(format!("{}: success for a line with {why}", context()));
        }
        let (verb, rest) = keyword(line);
        let args = words(rest.unwrap_or_default());
        match (status, verb.as_slice()) {
            (Status::Err, b"QUIT") if args.is_empty() => {
                return no_more(&mut replies, "after QUIT");
            }
            (Status::Err, _) => {
                // A PASS the session read uses up the USER; one the parser refused does not.
                if verb == b"PASS" && syntax_junk(line).is_none() {
                    model.user = None;
                }
                if ends_after_error(model, reply, more, &mut replies)? {
                    return Ok(());
                }
            }
            (Status::Continue, b"AUTH")
                if !model.logged_in
                    && args.len() == 1
                    && args[0].eq_ignore_ascii_case(b"PLAIN") =>
            {
                // The next line is the SASL response, answered once.
                let Some(response) = commands.get(i).copied() else {
                    return no_more(&mut replies, "after the client left mid-AUTH");
                };
                i += 1;
                let Some(reply) = replies.next() else {
                    return Err(format!("{}: no reply to the SASL response", context()));
                };
                match self::status(reply)? {
                    Status::Ok => {
                        let ClientLine::Line(response) = response else {
                            return Err(format!(
                                "{}: AUTH succeeded with an overlong response",
                                context()
                            ));
                        };
                        if !plain_ok(response) {
                            return Err(format!(
                                "{}: AUTH PLAIN succeeded with the response {}",
                                context(),
                                show(response)
                            ));
                        }
                        model.logged_in = true;
                        hit("pop3 logins");
                    }
                    Status::Err => {
                        model.errors += 1;
                        if reply.starts_with(b"-ERR [AUTH]") {
                            model.auth_errors += 1;
                        }
                        let more = i < commands.len();
                        if ends_after_error(model, reply, more, &mut replies)? {
                            return Ok(());
                        }
                    }
                    Status::Continue => {
                        return Err(format!("{}: a second SASL challenge for PLAIN", context()));
                    }
                }
            }
            (Status::Continue, _) => {
                return Err(format!("{}: a SASL challenge out of place", context()));
            }
            (Status::Ok, _) => {
                if let Some(end) = model
                    .ok(reply, &verb, rest.unwrap_or_default(), &args, &mut replies)
                    .map_err(|why| format!("{}: {why}", context()))?
                {
                    return end;
                }
            }
        }
    }
    no_more(&mut replies, "after the last client line")
}

type Replies<'a, 'b> = std::iter::Peekable<std::iter::Copied<std::slice::Iter<'b, &'a [u8]>>>;

/// After an error reply: whether the session may end here (too many bad commands or
/// failed logins), and if it did, that nothing follows.
fn ends_after_error(
    model: &Model,
    reply: &[u8],
    more_lines: bool,
    replies: &mut Replies,
) -> Result<bool, String> {
    if !more_lines || replies.peek().is_some() {
        return Ok(false);
    }
    let closing = reply.windows(8).any(|w| w == b"Too many");
    if (closing && model.errors >= 20) || model.auth_errors >= 3 {
        hit("pop3 sessions closed for errors");
        return Ok(true);
    }
    Err(format!(
        "the session ended after {} without cause ({} errors, {} failed logins)",
        show(reply),
        model.errors,
        model.auth_errors
    ))
}

fn no_more(replies: &mut Replies, when: &str) -> Result<(), String> {
    match replies.next() {
        None => Ok(()),
        Some(extra) => Err(format!("output {when}: {}", show(extra))),
    }
}

fn describe(line: ClientLine) -> String {
    match line {
        ClientLine::Line(line) => show(line),
        ClientLine::TooLong => "(overlong)".into(),
    }
}

/// An AUTH PLAIN response (RFC 4616) that must log in.
fn plain_ok(response: &[u8]) -> bool {
    let decoded = if response == b"=" {
        Some(Vec::new())
    } else {
        unbase64(response)
    };
    let Some(decoded) = decoded else {
        return false;
    };
    let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
    matches!(parts.as_slice(), [authz, user, password]
        if (authz.is_empty() || authz == user) && Model::credentials_ok(user, password))
}

impl Model {
    /// Checks a `+OK` and reads the rest of a multi-line reply. `Some(result)` when the
    /// session must end here.
    fn ok(
        &mut self,
        reply: &[u8],
        verb: &[u8],
        rest: &[u8],
        args: &[&[u8]],
        replies: &mut Replies,
    ) -> Result<Option<Result<(), String>>, String> {
        let transaction = matches!(
            verb,
            b"STAT" | b"LIST" | b"UIDL" | b"RETR" | b"TOP" | b"DELE" | b"RSET" | b"NOOP"
        );
        if transaction && !self.logged_in {
            return Err("success before login".into());
        }
        if matches!(verb, b"USER" | b"PASS" | b"AUTH") && self.logged_in {
            return Err("a second login succeeded".into());
        }
        if verb != b"USER" && verb != b"PASS" && !rest.is_ascii() {
            return Err("success for non-ASCII arguments".into());
        }
        let keep_nul = self.settings & NUL_KEEP != 0;
        match verb {
            b"USER" => self.user = Some(rest.to_vec()),
            b"PASS" => {
                let user = self.user.take();
                if !user.is_some_and(|u| Model::credentials_ok(&u, rest)) {
                    return Err("login with wrong credentials".into());
                }
                self.logged_in = true;
                hit("pop3 logins");
            }
            b"AUTH" if args.is_empty() => {
                let block = block(replies)?.ok_or("mechanism list without its end")?;
                if block != [b"PLAIN".to_vec()] {
                    return Err(format!("mechanism list {block:?}"));
                }
            }
            b"AUTH" => {
                if args.len() != 2 || !plain_ok(args[1]) {
                    return Err("AUTH PLAIN succeeded with a bad response".into());
                }
                self.logged_in = true;
                hit("pop3 logins");
            }
            b"CAPA" => {
                let block = block(replies)?.ok_or("CAPA without its end")?;
                if block
                    .iter()
                    .any(|l| l.is_empty() || l.iter().any(|&b| is_control(b)))
                {
                    return Err("a malformed capability line".into());
                }
            }
            b"STAT" => {
                let count = self.listing(false).len();
                let size: usize = (0..MESSAGES.len())
                    .filter(|&i| !self.deleted[i])
                    .map(|i| octets(&normalized(MESSAGES[i], keep_nul)))
                    .sum();
                if reply != format!("+OK {count} {size}").as_bytes() {
                    return Err(format!("STAT should say {count} {size}"));
                }
            }
            b"LIST" | b"UIDL" => {
                let uidl = verb == b"UIDL";
                match args {
                    [] => {
                        let block = block(replies)?.ok_or("listing without its end")?;
                        if block != self.listing(uidl) {
                            return Err(format!("wrong listing {block:?}"));
                        }
                    }
                    [n] => {
                        let index = self.message(n)?;
                        let mut expected = b"+OK ".to_vec();
                        expected.extend(self.list_item(index, uidl));
                        if reply != expected {
                            return Err(format!("expected {}", show(&expected)));
                        }
                    }
                    _ => return Err("listing with two arguments".into()),
                }
            }
            b"RETR" | b"TOP" => {
                let index = self.message(args[0])?;
                let expected = normalized(MESSAGES[index], keep_nul);
                let status = format!("+OK {} octets", octets(&expected));
                if verb == b"RETR" && reply != status.as_bytes() {
                    return Err(format!("RETR status line should be {status}"));
                }
                let Some(block) = block(replies)? else {
                    // Only a backend failure mid-message may end the session here.
                    return if self.settings & DIE_AFTER != 0 {
                        self.cut_mid_message = true;
                        Ok(Some(Ok(())))
                    } else {
                        Err("message without its end".into())
                    };
                };
                let wanted = if verb == b"TOP" {
                    let lines = args.get(1).ok_or("TOP without a line count")?;
                    if !lines.iter().all(u8::is_ascii_digit) || lines.is_empty() {
                        return Err("TOP with a bad line count".into());
                    }
                    let lines: usize = std::str::from_utf8(lines)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(usize::MAX);
                    match expected.iter().position(|l| l.is_empty()) {
                        Some(blank) => (blank + 1).saturating_add(lines).min(expected.len()),
                        None => expected.len(),
                    }
                } else {
                    expected.len()
                };
                hit(if verb == b"TOP" {
                    "pop3 TOPs"
                } else {
                    "pop3 RETRs"
                });
                if block.as_slice() != &expected[..wanted] {
                    return Err(format!(
                        "message {} sent as {:?}, expected {:?}",
                        index + 1,
                        block.iter().map(|l| show(l)).collect::<Vec<_>>(),
                        expected[..wanted]
                            .iter()
                            .map(|l| show(l))
                            .collect::<Vec<_>>()
                    ));
                }
            }
            b"DELE" => {
                let index = self.message(args[0])?;
                self.deleted[index] = true;
                hit("pop3 DELEs");
            }
            b"RSET" => self.deleted = [false; MESSAGES.len()],
            b"NOOP" => {}
            b"QUIT" => {
                hit("pop3 QUITs");
                return Ok(Some(no_more(replies, "after QUIT")));
            }
            _ => return Err("success for an unknown command".into()),
        }
        Ok(None)
    }
}

/// The lines of a multi-line block up to its terminating ".", unstuffed; `None` when the
/// output ends first.
fn block(replies: &mut Replies) -> Result<Option<Vec<Vec<u8>>>, String> {
    let mut lines = Vec::new();
    for line in replies.by_ref() {
        match line {
            b"." => return Ok(Some(lines)),
            [b'.', rest @ ..] if rest.first() == Some(&b'.') => lines.push(rest.to_vec()),
            [b'.', ..] => return Err(format!("unstuffed dot line {}", show(line))),
            _ => lines.push(line.to_vec()),
        }
    }
    Ok(None)
}

/// Forged transcripts that break one property each: the oracle must reject every one.
pub fn self_check() -> Result<(), String> {
    const G: &str = "+OK ready\r\n";
    let forged: [(&str, &[u8], String); 9] = [
        (
            "an extra reply",
            b"NOOP\r\n",
            format!("{G}-ERR no\r\n-ERR extra\r\n"),
        ),
        (
            "a missing reply",
            b"NOOP\r\nNOOP\r\n",
            format!("{G}-ERR no\r\n"),
        ),
        ("+OK for a NUL", b"USER a\0b\r\n", format!("{G}+OK\r\n")),
        ("a bare LF", b"NOOP\r\n", format!("{G}-ERR no\n")),
        ("+OK before login", b"STAT\r\n", format!("{G}+OK 5 100\r\n")),
        (
            "a wrong password",
            b"USER alice\r\nPASS nope\r\n",
            format!("{G}+OK\r\n+OK Logged in.\r\n"),
        ),
        ("+OK for junk", b"NOOPX\r\n", format!("{G}+OK\r\n")),
        ("no greeting", b"", String::new()),
        (
            "an unstuffed dot",
            b"USER alice\r\nPASS secret pw\r\nRETR 1\r\n",
            format!(
                "{G}+OK\r\n+OK\r\n+OK 56 octets\r\nFrom: a@example.test\r\nSubject: one\r\n\r\nHello\r\n.dot line\r\n.\r\n"
            ),
        ),
    ];
    for (what, client, out) in forged {
        if check_transcript(0, client, out.as_bytes()).is_ok() {
            return Err(format!("POP3 oracle accepted {what}"));
        }
    }
    let mut rng = Rng::new(1);
    for _ in 0..50 {
        let input = generate_session(&mut rng);
        run_session(&input).map_err(|e| format!("POP3 oracle refused a valid session: {e}"))?;
    }
    Ok(())
}
