//! Client commands, parsed once from a line into typed values.
//!
//! RFC 5321 §4.1.1 (verbs), §4.1.2 (paths; source routes are accepted and dropped as §4.1.2
//! and appendix C allow), §4.1.1.11 (`555` for unknown MAIL/RCPT parameters),
//! §4.5.3.1 (size limits), RFC 1870 §3 (SIZE=), RFC 6152 (BODY=8BITMIME), RFC 4954 §4–5
//! (AUTH and its AUTH= MAIL parameter), RFC 6531 §3.4 (no SMTPUTF8 here: `553 5.6.7`).
//!
//! Parsing is deliberately a little lenient where old clients are sloppy and harmless
//! (a space after `FROM:`, a path without angle brackets), and strict wherever bytes would
//! be passed upstream: an address can never carry a control character, space or `<>`.

use super::reply::{Enhanced, Reply};

/// RFC 5321 §4.5.3.1.4: 512 octets with CRLF.
pub const COMMAND_LINE_MAX: usize = 510;
/// RFC 1870 §3 allows MAIL 26 more octets for SIZE=, RFC 4954 §5 500 more for AUTH=.
pub const MAIL_LINE_MAX: usize = COMMAND_LINE_MAX + 26 + 500;
/// RFC 4954 §4: AUTH lines and SASL responses may be 12288 octets long.
pub const AUTH_LINE_MAX: usize = 12288;
/// RFC 5321 §4.5.3.1.3: a path is at most 256 octets with its angle brackets.
const PATH_MAX: usize = 254;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The client's name; empty when it gave none (old devices send a bare `HELO`).
    Ehlo(String),
    Helo(String),
    Mail(MailFrom),
    Rcpt(RcptTo),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    Auth(AuthStart),
    /// RFC 3207: switch to TLS (answered `502` when client TLS is not configured).
    StartTls,
    /// Known verbs this proxy does not offer (BDAT, ETRN, TURN…): `502`.
    NotImplemented(String),
}

/// `MAIL FROM:<reverse-path> [SIZE=n] [BODY=7BIT|8BITMIME] [AUTH=…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    /// Empty for the null reverse-path `<>` (bounces).
    pub address: String,
    pub size: Option<u64>,
    pub body: Option<Body>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// `RCPT TO:<forward-path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptTo {
    pub address: String,
}

/// `AUTH mechanism [initial-response]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthStart {
    pub mechanism: Mechanism,
    /// Still base64; `=` stands for an empty response (RFC 4954 §4).
    pub initial: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
    Other(String),
}

/// Why a line is not a usable command. Each maps to its own reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Unrecognized,
    LineTooLong,
    Syntax(&'static str),
    BadAddress(&'static str),
    NonAscii,
    UnsupportedParameter(String),
}

impl ParseError {
    pub fn reply(&self) -> Reply {
        match self {
            ParseError::Unrecognized => {
                Reply::new(500, Enhanced::new(5, 5, 2), "Command not recognized")
            }
            ParseError::LineTooLong => Reply::new(500, Enhanced::new(5, 5, 2), "Line too long"),
            ParseError::Syntax(usage) => Reply::new(501, Enhanced::new(5, 5, 4), *usage),
            ParseError::BadAddress(why) => Reply::new(501, Enhanced::new(5, 1, 3), *why),
            ParseError::NonAscii => Reply::new(
                553,
                Enhanced::new(5, 6, 7),
                "Non-ASCII addresses need SMTPUTF8, which is not offered",
            ),
            ParseError::UnsupportedParameter(p) => Reply::new(
                555,
                Enhanced::new(5, 5, 4),
                format!("Unsupported parameter {p}"),
            ),
        }
    }
}

/// The longest line each verb may send, so that limits are checked per command.
pub fn line_limit(line: &[u8]) -> usize {
    let verb = line.split(|&b| b == b' ').next().unwrap_or_default();
    if verb.eq_ignore_ascii_case(b"AUTH") {
        AUTH_LINE_MAX
    } else if verb.eq_ignore_ascii_case(b"MAIL") {
        MAIL_LINE_MAX
    } else {
        COMMAND_LINE_MAX
    }
}

/// Parses one command line (without its CRLF).
pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
    if line.len() > line_limit(line) {
        return Err(ParseError::LineTooLong);
    }
    // Non-ASCII can only be in an argument; the verb check below rejects it elsewhere.
    let text = String::from_utf8_lossy(line);
    let (verb, rest) = match text.find(' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (&text[..], ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |cmd: Command| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(ParseError::Syntax("This command takes no argument"))
        }
    };
    let command = match verb.as_str() {
        "EHLO" => hello(rest).map(Command::Ehlo),
        "HELO" => hello(rest).map(Command::Helo),
        "MAIL" => mail(rest, line).map(Command::Mail),
        "RCPT" => rcpt(rest, line).map(Command::Rcpt),
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        "QUIT" => no_args(Command::Quit),
        // RFC 5321 §4.1.1.9: NOOP may carry a string, which is ignored.
        "NOOP" => Ok(Command::Noop),
        "VRFY" if !rest.trim().is_empty() => Ok(Command::Vrfy),
        "VRFY" => Err(ParseError::Syntax("Syntax: VRFY address")),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "AUTH" => auth(rest).map(Command::Auth),
        "STARTTLS" => no_args(Command::StartTls),
        "BDAT" | "ETRN" | "TURN" | "ATRN" | "SEND" | "SOML" | "SAML" => {
            Ok(Command::NotImplemented(verb))
        }
        _ => Err(ParseError::Unrecognized),
    }?;
    // RFC 5321 §2.3.8: CR only in CRLF; commands are text. A bare CR, a NUL or another
    // control character was read as white space or ignored with the rest of the line, so
    // `EHLO x\rMAIL …` and `NOOP \0` succeeded (found by the fuzzer): refuse the line.
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(ParseError::Syntax(
            "Control characters are not allowed in commands",
        ));
    }
    Ok(command)
}

fn hello(rest: &str) -> Result<String, ParseError> {
    // Only logged; many devices send odd names (an unbracketed IP address, no name at
    // all), so any printable first word, or none, will do. The session decides whether a
    // missing name is refused (--require-helo).
    match rest.split_whitespace().next() {
        None => Ok(String::new()),
        Some(name) if name.bytes().all(|b| b.is_ascii_graphic()) => Ok(name.to_string()),
        _ => Err(ParseError::Syntax("Syntax: EHLO hostname")),
    }
}

/// Splits `KEYWORD:` off the argument, case-insensitively, allowing spaces after the colon.
fn after_keyword<'a>(rest: &'a str, keyword: &str) -> Option<&'a str> {
    let head = rest.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| rest[keyword.len()..].trim_start_matches(' '))
}

fn mail(rest: &str, raw: &[u8]) -> Result<MailFrom, ParseError> {
    const USAGE: &str = "Syntax: MAIL FROM:<address>";
    let arg = after_keyword(rest, "FROM:").ok_or(ParseError::Syntax(USAGE))?;
    if !raw.is_ascii() {
        return Err(ParseError::NonAscii);
    }
    let (address, params) = path(arg, true)?;
    let mut mail = MailFrom {
        address,
        size: None,
        body: None,
    };
    for param in params.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match key.to_ascii_uppercase().as_str() {
            // RFC 1870 §3: `SIZE=` 1*20DIGIT; anything else (empty included) is a syntax
            // error, never an unknown parameter.
            "SIZE" => {
                let n = (!value.is_empty()
                    && value.len() <= 20
                    && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| value.parse().ok());
                mail.size = Some(n.flatten().ok_or(ParseError::Syntax("Bad SIZE value"))?);
            }
            "BODY" => {
                mail.body = Some(match value.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    _ => return Err(ParseError::Syntax("BODY must be 7BIT or 8BITMIME")),
                })
            }
            // RFC 4954 §5: the submitter's identity; only meaningful between trusted MTAs.
            "AUTH" if !value.is_empty() => {}
            _ => return Err(ParseError::UnsupportedParameter(key.to_string())),
        }
    }
    Ok(mail)
}

fn rcpt(rest: &str, raw: &[u8]) -> Result<RcptTo, ParseError> {
    const USAGE: &str = "Syntax: RCPT TO:<address>";
    let arg = after_keyword(rest, "TO:").ok_or(ParseError::Syntax(USAGE))?;
    if !raw.is_ascii() {
        return Err(ParseError::NonAscii);
    }
    let (address, params) = path(arg, false)?;
    if let Some(p) = params.split(' ').find(|p| !p.is_empty()) {
        let key = p.split('=').next().unwrap_or(p);
        return Err(ParseError::UnsupportedParameter(key.to_string()));
    }
    Ok(RcptTo { address })
}

/// Parses `<path>` (or a bare address) and returns the address and the parameter text.
fn path(arg: &str, reverse: bool) -> Result<(String, &str), ParseError> {
    let (inner, params) = if let Some(after) = arg.strip_prefix('<') {
        let end = closing_bracket(after).ok_or(ParseError::BadAddress("Missing '>'"))?;
        (&after[..end], &after[end + 1..])
    } else {
        // Without brackets (old clients): the address ends at the first space.
        let end = arg.find(' ').unwrap_or(arg.len());
        (&arg[..end], &arg[end..])
    };
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(ParseError::BadAddress("Junk after the address"));
    }
    // RFC 5321 §4.1.2 / appendix C: `@relay1,@relay2:user@domain`; the route is ignored,
    // but only when it is one: unchecked, it hid spaces and parameters (found by the fuzzer).
    let address = match inner.strip_prefix('@') {
        Some(_) => match inner.find(':') {
            Some(i) if is_source_route(&inner[..i]) => &inner[i + 1..],
            _ => return Err(ParseError::BadAddress("Bad source route")),
        },
        None => inner,
    };
    if address.is_empty() {
        return if reverse {
            Ok((String::new(), params))
        } else {
            Err(ParseError::BadAddress("Empty recipient"))
        };
    }
    if reverse && !address.contains('@') {
        // A bare local part (`MAIL FROM:<scanner>`, as devices send): checked like a full
        // address, and the session completes it (--sender-domain) or refuses it.
        check_address(&format!("{address}@x"), false)?;
    } else {
        check_address(address, !reverse)?;
    }
    Ok((address.to_string(), params))
}

/// `@domain` hops separated by ',' (RFC 5321 §4.1.2 `A-d-l`), domains as names or
/// address literals.
fn is_source_route(route: &str) -> bool {
    route.split(',').all(|hop| {
        hop.strip_prefix('@').is_some_and(|domain| {
            !domain.is_empty()
                && domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']'))
        })
    })
}

/// Finds the `>` that closes a path, skipping quoted local parts such as `"a>b"@c`.
fn closing_bracket(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// Checks that an address can be written upstream as is: printable ASCII, spaces only
/// inside a quoted local part, one `@` with a non-empty domain. `postmaster` alone is a
/// valid recipient (RFC 5321 §4.1.1.3).
pub fn check_address(address: &str, allow_postmaster: bool) -> Result<(), ParseError> {
    if address.len() > PATH_MAX {
        return Err(ParseError::BadAddress("Address too long"));
    }
    if !address.is_ascii() {
        return Err(ParseError::NonAscii);
    }
    if allow_postmaster && address.eq_ignore_ascii_case("postmaster") {
        return Ok(());
    }
    let mut quoted = false;
    let mut escaped = false;
    for b in address.bytes() {
        if b < 0x20 || b == 0x7f {
            return Err(ParseError::BadAddress("Control character in address"));
        }
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b' ' | b'<' | b'>' | b'(' | b')' | b',' | b';' | b'[' if !quoted => {
                // A domain literal `[1.2.3.4]` is fine after the `@`.
                if b == b'[' && address.contains("@[") {
                    continue;
                }
                return Err(ParseError::BadAddress("Bad character in address"));
            }
            _ => {}
        }
    }
    if quoted {
        return Err(ParseError::BadAddress("Unbalanced quote in address"));
    }
    match address.rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => Ok(()),
        _ => Err(ParseError::BadAddress("Address needs user@domain")),
    }
}

fn auth(rest: &str) -> Result<AuthStart, ParseError> {
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let mechanism = match words.next() {
        Some(m) if m.eq_ignore_ascii_case("PLAIN") => Mechanism::Plain,
        Some(m) if m.eq_ignore_ascii_case("LOGIN") => Mechanism::Login,
        Some(m) => Mechanism::Other(m.chars().take(40).collect()),
        None => {
            return Err(ParseError::Syntax(
                "Syntax: AUTH mechanism [initial-response]",
            ));
        }
    };
    let initial = words.next().map(str::to_string);
    if words.next().is_some() {
        return Err(ParseError::Syntax(
            "Syntax: AUTH mechanism [initial-response]",
        ));
    }
    Ok(AuthStart { mechanism, initial })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail_of(line: &str) -> Result<MailFrom, ParseError> {
        match parse(line.as_bytes())? {
            Command::Mail(m) => Ok(m),
            other => panic!("{other:?}"),
        }
    }

    fn rcpt_of(line: &str) -> Result<String, ParseError> {
        match parse(line.as_bytes())? {
            Command::Rcpt(r) => Ok(r.address),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn verbs_are_case_insensitive_and_unknown_ones_are_500() {
        assert_eq!(parse(b"noop"), Ok(Command::Noop));
        assert_eq!(parse(b"NOOP anything"), Ok(Command::Noop));
        assert_eq!(parse(b"qUiT"), Ok(Command::Quit));
        assert_eq!(
            parse(b"QUIT now"),
            Err(ParseError::Syntax("This command takes no argument"))
        );
        assert_eq!(parse(b"FOO"), Err(ParseError::Unrecognized));
        assert_eq!(parse(b""), Err(ParseError::Unrecognized));
        assert_eq!(parse(b"GET / HTTP/1.0"), Err(ParseError::Unrecognized));
        assert_eq!(parse(b"starttls"), Ok(Command::StartTls));
        assert_eq!(
            parse(b"STARTTLS now"),
            Err(ParseError::Syntax("This command takes no argument"))
        );
        assert_eq!(
            parse(b"EHLO client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(parse(b"EHLO"), Ok(Command::Ehlo(String::new())));
        assert_eq!(parse(b"HELO  "), Ok(Command::Helo(String::new())));
        assert_eq!(
            parse(b"EHLO 192.168.1.20"),
            Ok(Command::Ehlo("192.168.1.20".into()))
        );
        assert!(parse(b"EHLO \x01").is_err());
    }

    #[test]
    fn mail_paths_and_parameters() {
        let m = mail_of("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME").unwrap();
        assert_eq!(m.address, "a@b.example");
        assert_eq!(m.size, Some(1000));
        assert_eq!(m.body, Some(Body::EightBitMime));
        assert_eq!(mail_of("mail from:<>").unwrap().address, "");
        assert_eq!(mail_of("MAIL FROM: <a@b>").unwrap().address, "a@b");
        assert_eq!(mail_of("MAIL FROM:a@b").unwrap().address, "a@b");
        assert_eq!(mail_of("MAIL FROM:<@r1,@r2:a@b>").unwrap().address, "a@b");
        assert_eq!(
            mail_of("MAIL FROM:<\"a >b\"@c>").unwrap().address,
            "\"a >b\"@c"
        );
        assert_eq!(
            mail_of("MAIL FROM:<a@b> AUTH=<>").unwrap().address,
            "a@b",
            "RFC 4954 AUTH= is accepted"
        );
        assert_eq!(
            mail_of("MAIL FROM:<a@b> SMTPUTF8"),
            Err(ParseError::UnsupportedParameter("SMTPUTF8".into()))
        );
        for bad in [
            "SIZE=x",
            "SIZE=",
            "SIZE",
            "SIZE=123456789012345678901",
            "SIZE=-1",
        ] {
            assert_eq!(
                mail_of(&format!("MAIL FROM:<a@b> {bad}")),
                Err(ParseError::Syntax("Bad SIZE value")),
                "{bad}"
            );
        }
        assert_eq!(
            ParseError::Syntax("Bad SIZE value").reply().code,
            501,
            "RFC 1870 §6.1"
        );
        assert!(matches!(
            mail_of("MAIL FROM:<a@b> BODY=BINARYMIME"),
            Err(ParseError::Syntax(_))
        ));
        assert!(matches!(
            mail_of("MAIL FROM:<a@b"),
            Err(ParseError::BadAddress(_))
        ));
        assert!(matches!(
            mail_of("MAIL FROM:<a@b>x"),
            Err(ParseError::BadAddress(_))
        ));
        assert!(matches!(
            mail_of("MAIL TO:<a@b>"),
            Err(ParseError::Syntax(_))
        ));
        assert_eq!(mail_of("MAIL FROM:<jö@b>"), Err(ParseError::NonAscii));
        // A bare local part is left for the session to complete or refuse; it is checked
        // like any address.
        assert_eq!(mail_of("MAIL FROM:<scanner>").unwrap().address, "scanner");
        assert_eq!(mail_of("MAIL FROM:scanner").unwrap().address, "scanner");
        assert!(matches!(
            mail_of("MAIL FROM:<scan ner>"),
            Err(ParseError::BadAddress(_))
        ));
    }

    #[test]
    fn addresses_can_never_carry_bytes_that_would_break_the_upstream_line() {
        for bad in [
            "RCPT TO:<a b@c>",
            "RCPT TO:<a\rb@c>",
            "RCPT TO:<a@b\r>",
            "RCPT TO:<a\x00@b>",
            "RCPT TO:<a<@b>",
            "RCPT TO:<@b>",
            "RCPT TO:<a@>",
            "RCPT TO:<ab>",
            "RCPT TO:<>",
            "RCPT TO:<\"a@b>",
        ] {
            assert!(rcpt_of(bad).is_err(), "{bad:?}");
        }
        assert_eq!(rcpt_of("RCPT TO:<Postmaster>").unwrap(), "Postmaster");
        assert_eq!(rcpt_of("RCPT TO: <a@b>").unwrap(), "a@b");
        assert_eq!(rcpt_of("RCPT TO:<\"a b\"@c>").unwrap(), "\"a b\"@c");
        assert_eq!(rcpt_of("RCPT TO:<a@[127.0.0.1]>").unwrap(), "a@[127.0.0.1]");
        assert_eq!(
            rcpt_of("RCPT TO:<a@b> NOTIFY=NEVER"),
            Err(ParseError::UnsupportedParameter("NOTIFY".into()))
        );
        let long = format!("RCPT TO:<{}@b>", "x".repeat(300));
        assert_eq!(
            rcpt_of(&long),
            Err(ParseError::BadAddress("Address too long"))
        );
    }

    #[test]
    fn line_limits_depend_on_the_verb() {
        let noop = format!("NOOP {}", "x".repeat(COMMAND_LINE_MAX - 5));
        assert_eq!(parse(noop.as_bytes()), Ok(Command::Noop));
        let noop = format!("NOOP {}", "x".repeat(COMMAND_LINE_MAX - 4));
        assert_eq!(parse(noop.as_bytes()), Err(ParseError::LineTooLong));
        let auth = format!("AUTH PLAIN {}", "A".repeat(4000));
        assert!(matches!(parse(auth.as_bytes()), Ok(Command::Auth(_))));
    }

    #[test]
    fn auth_mechanisms() {
        assert_eq!(
            parse(b"AUTH plain AGEAYg=="),
            Ok(Command::Auth(AuthStart {
                mechanism: Mechanism::Plain,
                initial: Some("AGEAYg==".into())
            }))
        );
        assert_eq!(
            parse(b"AUTH LOGIN"),
            Ok(Command::Auth(AuthStart {
                mechanism: Mechanism::Login,
                initial: None
            }))
        );
        assert!(matches!(
            parse(b"AUTH CRAM-MD5"),
            Ok(Command::Auth(AuthStart {
                mechanism: Mechanism::Other(_),
                ..
            }))
        ));
        assert!(parse(b"AUTH").is_err());
    }
}
