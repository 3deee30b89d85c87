//! SMTP replies as values, and the one reader that turns a server's reply lines into them.
//!
//! RFC 5321 §4.2 (reply lines `ddd-text` / `ddd text`, one code for every line of a
//! multi-line reply), RFC 3463 §2 and RFC 2034 §3 (the enhanced status code that starts the
//! text once ENHANCEDSTATUSCODES is offered).
//!
//! Why a module of its own: three layers read SMTP replies, the submission client
//! ([`crate::submission`]), the SMTP front end relaying the backend's replies
//! ([`crate::smtp`]) and the tunnel's STARTTLS exchange ([`crate::starttls`]). They share
//! this one type and this one reader, so a reply line is judged the same way everywhere.
//! It imports nothing from the protocol cores or the command line. What only the front
//! end needs (its serializer with the 512-octet line limit, the generic `X.0.0` for a
//! backend that sent no enhanced code, `421` relayed as `451`) lives in `smtp::reply` as
//! methods on this same type.

use std::fmt;

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl Enhanced {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Enhanced {
            class,
            subject,
            detail,
        }
    }

    /// Parses `2.1.0`: class 2, 4 or 5; subject and detail of 1 to 3 digits (RFC 3463 §2).
    pub fn parse(word: &str) -> Option<Self> {
        let mut parts = word.split('.');
        let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let digits = |s: &str, max: usize| {
            (1..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
        };
        if !(digits(class, 1) && digits(subject, 3) && digits(detail, 3)) {
            return None;
        }
        let class: u8 = class.parse().ok()?;
        if !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(Enhanced::new(
            class,
            subject.parse().ok()?,
            detail.parse().ok()?,
        ))
    }
}

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One SMTP reply: a code, an optional enhanced code, and one or more text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    /// Text lines without code, separator or enhanced code; never empty. A line that
    /// carried only the code is an empty string.
    pub lines: Vec<String>,
}

impl Reply {
    /// Builds a reply from its code and text lines as a server sent them. The enhanced code
    /// is taken from the first word of the first line when it is of the reply's class, and
    /// its repetitions at the start of later lines are dropped (the serializer writes it on
    /// every line again).
    pub fn from_lines<S: AsRef<str>>(code: u16, text: &[S]) -> Self {
        let mut lines: Vec<String> = text.iter().map(|l| l.as_ref().to_string()).collect();
        if lines.is_empty() {
            lines.push(String::new());
        }
        let class = (code / 100) as u8;
        let enhanced = lines[0]
            .split(' ')
            .next()
            .and_then(Enhanced::parse)
            .filter(|e| e.class == class);
        if let Some(e) = enhanced {
            let prefix = e.to_string();
            for line in &mut lines {
                if let Some(rest) = line.strip_prefix(prefix.as_str())
                    && (rest.is_empty() || rest.starts_with(' '))
                {
                    *line = rest.trim_start_matches(' ').to_string();
                }
            }
        }
        Reply {
            code,
            enhanced,
            lines,
        }
    }

    /// A positive completion reply (2yz, RFC 5321 §4.2.1). 3yz is only an intermediate
    /// step (354 to DATA, 334 to AUTH) and never means a command succeeded.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3yz: the server waits for more (354 to DATA, 334 during AUTH).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// A refusal: 4yz (transient) or 5yz (permanent).
    pub fn is_refusal(&self) -> bool {
        (400..600).contains(&self.code)
    }

    /// The first line's text (without the enhanced code): an AUTH challenge, or the gist
    /// of an error.
    pub fn first_line(&self) -> &str {
        &self.lines[0]
    }

    /// One line for logs: `550 5.1.1 text more text`.
    pub fn summary(&self) -> String {
        let mut s = self.code.to_string();
        if let Some(e) = self.enhanced {
            s.push(' ');
            s.push_str(&e.to_string());
        }
        for line in &self.lines {
            if !line.is_empty() {
                s.push(' ');
                s.push_str(line);
            }
        }
        s
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Reads the lines of one reply as they arrive. Returns `Ok(None)` while more lines
/// follow, the reply once its last line came. The caller reads the lines (buffered or a
/// byte at a time, as STARTTLS must) and bounds their length with [`MAX_REPLY_LINE`].
#[derive(Debug, Default)]
pub struct ReplyBuilder {
    code: Option<u16>,
    lines: Vec<String>,
}

/// Bounds for a reply: RFC 5321 §4.5.3.1.5 allows 512 octets a line; servers exceed it in
/// practice (long EHLO AUTH lists, Microsoft's error texts), so the bound is looser, but
/// still keeps a broken server from filling memory.
pub const MAX_REPLY_LINE: usize = 8192;
const MAX_REPLY_LINES: usize = 1000;

impl ReplyBuilder {
    /// Takes one line without its line ending.
    pub fn line(&mut self, line: &[u8]) -> Result<Option<Reply>, String> {
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
                "a multi-line reply changes its code mid-way: \"{}\"",
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
        Ok(Some(Reply::from_lines(
            code,
            &std::mem::take(&mut self.lines),
        )))
    }
}

/// Reads whole lines (without line endings) into replies: for the tests of every layer.
#[cfg(test)]
pub(crate) fn read_lines(lines: &[&str]) -> Result<Vec<Reply>, String> {
    let mut builder = ReplyBuilder::default();
    let mut replies = Vec::new();
    for line in lines {
        replies.extend(builder.line(line.as_bytes())?);
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    use read_lines as read;

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
        assert_eq!(replies[0].enhanced, Some(Enhanced::new(5, 1, 1)));
        assert_eq!(
            replies[0].lines[2],
            "https://support.google.com/mail/?p=NoSuchUser"
        );
        assert_eq!(replies[1].lines, [""]);
        assert_eq!(replies[1].enhanced, None);
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
        let enhanced = |code, text: &str| Reply::from_lines(code, &[text]).enhanced;
        assert_eq!(enhanced(250, "2.1.0 Ok"), Some(Enhanced::new(2, 1, 0)));
        assert_eq!(enhanced(250, "5.1.0 Ok"), None);
        assert_eq!(enhanced(250, "2.1 Ok"), None);
        assert_eq!(enhanced(250, "2.1.1000 Ok"), None);
        // 3yz has no enhanced code class: an AUTH challenge stays as it came.
        assert_eq!(Reply::from_lines(334, &["3.0.0"]).first_line(), "3.0.0");
    }

    #[test]
    fn enhanced_code_syntax() {
        assert_eq!(Enhanced::parse("5.7.1"), Some(Enhanced::new(5, 7, 1)));
        assert_eq!(
            Enhanced::parse("2.100.999"),
            Some(Enhanced::new(2, 100, 999))
        );
        for bad in ["3.0.0", "5.1", "5.1.1.1", "5.1000.1", "a.b.c", "5..1", ""] {
            assert_eq!(Enhanced::parse(bad), None, "{bad}");
        }
    }
}
