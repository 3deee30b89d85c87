//! A submission server's replies as values, and the EHLO reply read into the extensions
//! the client uses.
//!
//! RFC 5321 §4.2 (reply lines `ddd-text` / `ddd text`, one code for every line of a
//! multi-line reply), §4.1.1.1 (the EHLO keywords, one per line after the first), RFC 3463
//! (the enhanced status code that starts the text once ENHANCEDSTATUSCODES is offered).

use std::fmt;

/// One reply: a three-digit code and its text lines (code and separator removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Never empty; a line that carried only the code is an empty string.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2yz: the command succeeded.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3yz: the server waits for more (354 to DATA, 334 during AUTH).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// The enhanced status code (`5.1.1`) at the start of the first line, if it has one
    /// of the reply's class (RFC 3463 §2: class, then 1–3 digits twice).
    pub fn enhanced(&self) -> Option<&str> {
        let word = self.lines[0].split(' ').next()?;
        let mut parts = word.split('.');
        let class = parts.next()?;
        let well_formed = class.len() == 1
            && class.as_bytes()[0] == b'0' + (self.code / 100) as u8
            && parts.clone().count() == 2
            && parts.all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
        well_formed.then_some(word)
    }

    /// The first line's text, for error messages.
    pub fn first_line(&self) -> &str {
        &self.lines[0]
    }
}

impl fmt::Display for Reply {
    /// `550 5.1.1 unknown` (the first line only: enough for a log line).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.lines[0].as_str() {
            "" => write!(f, "{}", self.code),
            text => write!(f, "{} {text}", self.code),
        }
    }
}

/// Reads the lines of one reply as they arrive. Returns `Ok(None)` while more lines
/// follow, the reply once its last line came.
#[derive(Debug, Default)]
pub(crate) struct ReplyBuilder {
    code: Option<u16>,
    lines: Vec<String>,
}

/// Bounds for a reply: RFC 5321 §4.5.3.1.5 allows 512 octets a line; servers exceed it in
/// practice (long EHLO AUTH lists, Microsoft's error texts), so the bound is looser, but
/// still keeps a broken server from filling memory.
pub(crate) const MAX_REPLY_LINE: usize = 8192;
const MAX_REPLY_LINES: usize = 1000;

impl ReplyBuilder {
    /// Takes one line without its line ending.
    pub(crate) fn line(&mut self, line: &[u8]) -> Result<Option<Reply>, String> {
        let shown = || String::from_utf8_lossy(line).escape_debug().to_string();
        let digits = line.get(..3).filter(|d| d.iter().all(u8::is_ascii_digit));
        let Some(digits) = digits else {
            return Err(format!("not an SMTP reply line: \"{}\"", shown()));
        };
        let code = digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        if !(200..600).contains(&code) {
            return Err(format!("reply code out of range: \"{}\"", shown()));
        }
        if self.code.is_some_and(|first| first != code) {
            return Err(format!(
                "a multi-line reply changed its code: \"{}\"",
                shown()
            ));
        }
        let (last, text) = match line.get(3) {
            None => (true, &[][..]),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return Err(format!("not an SMTP reply line: \"{}\"", shown())),
        };
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(format!("a reply of more than {MAX_REPLY_LINES} lines"));
        }
        self.code = Some(code);
        self.lines.push(String::from_utf8_lossy(text).into_owned());
        if !last {
            return Ok(None);
        }
        self.code = None;
        Ok(Some(Reply {
            code,
            lines: std::mem::take(&mut self.lines),
        }))
    }
}

/// What the server's EHLO reply offers (RFC 5321 §4.1.1.1), read once per EHLO.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// RFC 2920: commands may be sent in groups.
    pub pipelining: bool,
    /// RFC 3030: BDAT instead of DATA.
    pub chunking: bool,
    /// RFC 1870: the server's message size limit (`None`: no SIZE; `Some(0)`: no limit).
    pub size: Option<u64>,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 3207.
    pub starttls: bool,
    /// RFC 2034.
    pub enhanced_status_codes: bool,
    /// RFC 4954 AUTH mechanisms, upper case (also from the old `AUTH=` form).
    pub auth: Vec<String>,
}

impl Extensions {
    /// Reads the EHLO reply's lines after the first (which is the server's name).
    pub fn parse(reply: &Reply) -> Extensions {
        let mut offered = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => offered.pipelining = true,
                "CHUNKING" => offered.chunking = true,
                "SIZE" => {
                    offered.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0))
                }
                "8BITMIME" => offered.eight_bit_mime = true,
                "SMTPUTF8" => offered.smtputf8 = true,
                "STARTTLS" => offered.starttls = true,
                "ENHANCEDSTATUSCODES" => offered.enhanced_status_codes = true,
                _ => {}
            }
            let mechanisms = match keyword.strip_prefix("AUTH=") {
                Some(first) => Some(std::iter::once(first.to_string())),
                None if keyword == "AUTH" => Some(std::iter::once(String::new())),
                None => None,
            };
            if let Some(first) = mechanisms {
                let all = first
                    .chain(words.map(str::to_ascii_uppercase))
                    .filter(|m| !m.is_empty());
                for mechanism in all {
                    if !offered.auth.contains(&mechanism) {
                        offered.auth.push(mechanism);
                    }
                }
            }
        }
        offered
    }

    /// Whether AUTH `mechanism` (upper case) is offered.
    pub fn offers_auth(&self, mechanism: &str) -> bool {
        self.auth.iter().any(|m| m == mechanism)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(lines: &[&str]) -> Result<Vec<Reply>, String> {
        let mut builder = ReplyBuilder::default();
        let mut replies = Vec::new();
        for line in lines {
            replies.extend(builder.line(line.as_bytes())?);
        }
        Ok(replies)
    }

    #[test]
    fn multi_line_replies_keep_every_line_and_the_enhanced_code() {
        let replies = read(&[
            "550-5.1.1 The email account that you tried to reach does not exist.",
            "550-5.1.1 Please try double-checking the recipient's email address",
            "550 5.1.1 https://support.google.com/mail/?p=NoSuchUser",
            "250",
        ])
        .unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].code, 550);
        assert_eq!(replies[0].lines.len(), 3);
        assert_eq!(replies[0].enhanced(), Some("5.1.1"));
        assert_eq!(replies[1].lines, [""]);
        assert_eq!(replies[1].enhanced(), None);
        assert_eq!(replies[1].to_string(), "250");
    }

    #[test]
    fn lines_that_are_not_replies_are_errors() {
        for bad in [
            &["25 ok"][..],
            &["abc ok"],
            &["250x ok"],
            &["150 ok"],
            &["250-a", "251 b"],
        ] {
            assert!(read(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_enhanced_code_must_be_of_the_reply_class() {
        let reply = |code, text: &str| Reply {
            code,
            lines: vec![text.into()],
        };
        assert_eq!(reply(250, "2.1.0 Ok").enhanced(), Some("2.1.0"));
        assert_eq!(reply(250, "5.1.0 Ok").enhanced(), None);
        assert_eq!(reply(250, "2.1 Ok").enhanced(), None);
        assert_eq!(reply(250, "2.1.1000 Ok").enhanced(), None);
    }

    #[test]
    fn ehlo_keywords_are_read_once() {
        let reply = read(&[
            "250-smtp.example.com at your service",
            "250-SIZE 35882577",
            "250-8BITMIME",
            "250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH",
            "250-AUTH=login",
            "250-ENHANCEDSTATUSCODES",
            "250-pipelining",
            "250-CHUNKING",
            "250 SMTPUTF8",
        ])
        .unwrap()
        .remove(0);
        let offered = Extensions::parse(&reply);
        assert!(offered.pipelining && offered.chunking && offered.eight_bit_mime);
        assert!(offered.smtputf8 && offered.enhanced_status_codes && !offered.starttls);
        assert_eq!(offered.size, Some(35882577));
        assert_eq!(
            offered.auth,
            [
                "LOGIN",
                "PLAIN",
                "XOAUTH2",
                "PLAIN-CLIENTTOKEN",
                "OAUTHBEARER",
                "XOAUTH"
            ]
        );
        let bare = read(&["250-mx", "250 STARTTLS"]).unwrap().remove(0);
        let offered = Extensions::parse(&bare);
        assert!(offered.starttls && !offered.pipelining && !offered.chunking);
        assert_eq!(offered.size, None);
        // The first line is the server's name, never a keyword.
        let named = read(&["250 PIPELINING"]).unwrap().remove(0);
        assert_eq!(Extensions::parse(&named), Extensions::default());
    }
}
