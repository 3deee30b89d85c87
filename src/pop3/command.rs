//! Parsing one POP3 command line into a typed command (RFC 1939 §3-§7, RFC 2449 CAPA,
//! RFC 5034 AUTH). Message numbers stay text here: only the session knows which exist.

/// A parsed command. Arguments borrow from the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// RFC 1939 §7; the name is the rest of the line.
    User(&'a [u8]),
    /// RFC 1939 §7; the password is the rest of the line, spaces included.
    Pass(&'a [u8]),
    /// RFC 5034: mechanism and optional initial response. `AUTH` alone lists mechanisms,
    /// as Outlook and other clients probe with it.
    Auth {
        mechanism: Option<&'a str>,
        initial: Option<&'a [u8]>,
    },
    Capa,
    /// RFC 2595 §4: switch to TLS.
    Stls,
    Stat,
    List(Option<&'a str>),
    Uidl(Option<&'a str>),
    Retr(&'a str),
    Top(&'a str, &'a str),
    Dele(&'a str),
    Rset,
    Noop,
    Quit,
}

/// Why a line is not a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The keyword is not one we implement (APOP included).
    Unknown,
    /// The keyword is known but its arguments are wrong.
    Syntax(&'static str),
}

pub fn parse(line: &[u8]) -> Result<Command<'_>, ParseError> {
    let (keyword, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    // Numeric arguments are words; extra spaces between them are forgiven.
    let words: Vec<&str> = match rest {
        Some(rest) => match std::str::from_utf8(rest) {
            Ok(text) => text.split_ascii_whitespace().collect(),
            Err(_) => vec!["\u{fffd}"],
        },
        None => Vec::new(),
    };
    let keyword = keyword.to_ascii_uppercase();
    let command = match (keyword.as_slice(), words.as_slice()) {
        (b"USER", _) => match rest {
            Some(name) if !name.is_empty() => Command::User(name),
            _ => return Err(ParseError::Syntax("USER needs a user name")),
        },
        (b"PASS", _) => match rest {
            Some(password) => Command::Pass(password),
            None => return Err(ParseError::Syntax("PASS needs a password")),
        },
        (b"AUTH", []) => Command::Auth {
            mechanism: None,
            initial: None,
        },
        (b"AUTH", [mechanism]) => Command::Auth {
            mechanism: Some(mechanism),
            initial: None,
        },
        (b"AUTH", [mechanism, initial]) => Command::Auth {
            mechanism: Some(mechanism),
            initial: Some(initial.as_bytes()),
        },
        (b"AUTH", _) => {
            return Err(ParseError::Syntax(
                "AUTH takes a mechanism and one response",
            ));
        }
        (b"CAPA", []) => Command::Capa,
        (b"STLS", []) => Command::Stls,
        (b"STAT", []) => Command::Stat,
        (b"LIST", []) => Command::List(None),
        (b"LIST", [n]) => Command::List(Some(n)),
        (b"UIDL", []) => Command::Uidl(None),
        (b"UIDL", [n]) => Command::Uidl(Some(n)),
        (b"RETR", [n]) => Command::Retr(n),
        (b"TOP", [n, lines]) => Command::Top(n, lines),
        (b"DELE", [n]) => Command::Dele(n),
        (b"RSET", []) => Command::Rset,
        (b"NOOP", []) => Command::Noop,
        (b"QUIT", []) => Command::Quit,
        (b"CAPA" | b"STLS" | b"STAT" | b"RSET" | b"NOOP" | b"QUIT", _) => {
            return Err(ParseError::Syntax("this command takes no arguments"));
        }
        (b"LIST" | b"UIDL", _) => {
            return Err(ParseError::Syntax("expected at most one message number"));
        }
        (b"RETR" | b"DELE", _) => return Err(ParseError::Syntax("expected one message number")),
        (b"TOP", _) => {
            return Err(ParseError::Syntax(
                "expected a message number and a line count",
            ));
        }
        _ => return Err(ParseError::Unknown),
    };
    // A NUL, a bare CR or another control character is never part of a command: it would
    // be read as a separator or passed on inside an argument. User names and passwords
    // are opaque text, but a NUL cannot be in one either (the fuzzer found all of these).
    let control = |b: &u8| (*b < 0x20 && *b != b'\t') || *b == 0x7f;
    let opaque = matches!(command, Command::User(_) | Command::Pass(_));
    if line.contains(&0) || (!opaque && line.iter().any(control)) {
        return Err(ParseError::Syntax(
            "Control characters are not allowed in commands",
        ));
    }
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_are_case_insensitive_and_arguments_are_split() {
        assert_eq!(parse(b"stat"), Ok(Command::Stat));
        assert_eq!(parse(b"Top 1 10"), Ok(Command::Top("1", "10")));
        assert_eq!(parse(b"LIST"), Ok(Command::List(None)));
        assert_eq!(parse(b"uidl 3"), Ok(Command::Uidl(Some("3"))));
        assert_eq!(parse(b"RETR  2 "), Ok(Command::Retr("2")));
    }

    #[test]
    fn user_and_pass_keep_the_rest_of_the_line_verbatim() {
        assert_eq!(parse(b"USER a b"), Ok(Command::User(b"a b")));
        assert_eq!(parse(b"PASS  p \"\\ w "), Ok(Command::Pass(b" p \"\\ w ")));
        assert_eq!(parse(b"PASS \xc3\xa9"), Ok(Command::Pass(b"\xc3\xa9")));
        assert_eq!(parse(b"PASS "), Ok(Command::Pass(b"")));
        assert!(matches!(parse(b"USER"), Err(ParseError::Syntax(_))));
        assert!(matches!(parse(b"PASS"), Err(ParseError::Syntax(_))));
    }

    #[test]
    fn auth_forms() {
        assert_eq!(
            parse(b"AUTH"),
            Ok(Command::Auth {
                mechanism: None,
                initial: None
            })
        );
        assert_eq!(
            parse(b"AUTH PLAIN AGEAYg=="),
            Ok(Command::Auth {
                mechanism: Some("PLAIN"),
                initial: Some(b"AGEAYg==")
            })
        );
    }

    #[test]
    fn unknown_and_malformed() {
        assert_eq!(parse(b"APOP a b"), Err(ParseError::Unknown));
        assert_eq!(parse(b"stls"), Ok(Command::Stls));
        assert!(matches!(parse(b"STLS x"), Err(ParseError::Syntax(_))));
        assert_eq!(parse(b""), Err(ParseError::Unknown));
        assert_eq!(parse(b"\xff\xfe"), Err(ParseError::Unknown));
        assert!(matches!(parse(b"STAT 1"), Err(ParseError::Syntax(_))));
        assert!(matches!(parse(b"RETR"), Err(ParseError::Syntax(_))));
        assert!(matches!(parse(b"TOP 1"), Err(ParseError::Syntax(_))));
        assert!(matches!(parse(b"LIST 1 2"), Err(ParseError::Syntax(_))));
    }
}
