//! SMTP replies as values, with the one serializer that knows the wire format.
//!
//! RFC 5321 §4.2 (reply lines, multi-line replies with `-`), §4.5.3.1.5 (a reply line is at
//! most 512 octets), RFC 2034 §3 and RFC 3463 (the enhanced status code that prefixes the
//! text once ENHANCEDSTATUSCODES is advertised). Backend replies are parsed into the same
//! type, so what the client sees is the backend's own code, enhanced code and text.

use std::fmt;
use std::io::{self, Write};

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
    /// Text lines without code or enhanced code; never empty.
    pub lines: Vec<String>,
}

/// RFC 5321 §4.5.3.1.5: 512 octets including the code and CRLF.
const MAX_LINE: usize = 512;

impl Reply {
    /// A reply of the proxy's own, with an enhanced code.
    pub fn new(code: u16, enhanced: Enhanced, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A reply without enhanced code: the greeting, EHLO/HELO, 354 and 334 (RFC 2034 §3
    /// exempts the first two; 3xx replies have no enhanced code class).
    pub fn plain(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    /// A multi-line reply without enhanced code (the EHLO reply).
    pub fn multi(code: u16, lines: Vec<String>) -> Self {
        debug_assert!(!lines.is_empty());
        Reply {
            code,
            enhanced: None,
            lines,
        }
    }

    /// Builds a reply from a backend's code and text lines. The enhanced code is taken from
    /// the first word of the first line, and its repetitions at the start of later lines are
    /// dropped. A backend without ENHANCEDSTATUSCODES gets the generic `X.0.0` of its class,
    /// because we advertise the extension and every reply must then carry one.
    pub fn from_backend<S: AsRef<str>>(code: u16, text: &[S]) -> Self {
        let mut lines: Vec<String> = text.iter().map(|l| l.as_ref().to_string()).collect();
        if lines.is_empty() {
            lines.push(String::new());
        }
        let class = (code / 100) as u8;
        let found = lines[0]
            .split(' ')
            .next()
            .and_then(Enhanced::parse)
            .filter(|e| e.class == class);
        let enhanced = match found {
            Some(e) => {
                let prefix = e.to_string();
                for line in &mut lines {
                    if let Some(rest) = line.strip_prefix(prefix.as_str())
                        && (rest.is_empty() || rest.starts_with(' '))
                    {
                        *line = rest.trim_start_matches(' ').to_string();
                    }
                }
                Some(e)
            }
            None if matches!(class, 2 | 4 | 5) => Some(Enhanced::new(class, 0, 0)),
            None => None,
        };
        Reply {
            code,
            enhanced,
            lines,
        }
    }

    /// A positive completion reply (2yz, RFC 5321 §4.2.1). 3yz is only an intermediate
    /// step (354 to DATA, 334 to AUTH) and never means a command succeeded.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// A refusal: 4yz (transient) or 5yz (permanent).
    pub fn is_refusal(&self) -> bool {
        (400..600).contains(&self.code)
    }

    /// The reply as the client gets it when it came from the backend. A backend `421` means
    /// the *backend* closed its channel (RFC 5321 §4.2.2); passed on unchanged it would tell
    /// our client that *we* are closing, so it becomes `451`, same enhanced code and text.
    pub fn relayed(mut self) -> Self {
        if self.code == 421 {
            self.code = 451;
        }
        self
    }

    /// Writes the reply: `code-` on every line but the last, `code ` on the last (§4.2.1).
    /// Control characters in the text are replaced, so a backend's text can never inject a
    /// line into our reply stream, and lines are cut to the RFC limit.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut buf = Vec::with_capacity(64 * self.lines.len());
        for (i, line) in self.lines.iter().enumerate() {
            let start = buf.len();
            let sep = if i + 1 == self.lines.len() { ' ' } else { '-' };
            write!(buf, "{}{sep}", self.code)?;
            if let Some(e) = self.enhanced {
                write!(buf, "{e}")?;
                if !line.is_empty() {
                    buf.push(b' ');
                }
            }
            for &b in line.as_bytes() {
                buf.push(if b < 0x20 || b == 0x7f { b' ' } else { b });
            }
            // Cut at a char boundary (text is UTF-8) so the limit holds with the CRLF.
            if buf.len() - start > MAX_LINE - 2 {
                let mut cut = start + MAX_LINE - 2;
                while cut > start && (buf[cut] & 0xC0) == 0x80 {
                    cut -= 1;
                }
                buf.truncate(cut);
            }
            buf.extend_from_slice(b"\r\n");
        }
        out.write_all(&buf)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn single_and_multi_line_formats() {
        assert_eq!(
            wire(&Reply::new(250, Enhanced::new(2, 0, 0), "OK")),
            "250 2.0.0 OK\r\n"
        );
        assert_eq!(
            wire(&Reply::multi(
                250,
                vec!["h".into(), "SIZE 10".into(), "8BITMIME".into()]
            )),
            "250-h\r\n250-SIZE 10\r\n250 8BITMIME\r\n"
        );
        assert_eq!(wire(&Reply::plain(334, "")), "334 \r\n");
    }

    #[test]
    fn backend_text_keeps_its_enhanced_code_and_loses_repetitions() {
        let r = Reply::from_backend(
            550,
            &["5.1.1 <x@y>: Recipient address rejected", "5.1.1 more"],
        );
        assert_eq!(r.enhanced, Some(Enhanced::new(5, 1, 1)));
        assert_eq!(
            wire(&r),
            "550-5.1.1 <x@y>: Recipient address rejected\r\n550 5.1.1 more\r\n"
        );
        let r = Reply::from_backend(250, &["Ok: queued as ABC"]);
        assert_eq!(wire(&r), "250 2.0.0 Ok: queued as ABC\r\n");
        // A code whose class disagrees with the reply is text, not an enhanced code.
        let r = Reply::from_backend(451, &["5.1.1 odd"]);
        assert_eq!(wire(&r), "451 4.0.0 5.1.1 odd\r\n");
    }

    #[test]
    fn backend_text_cannot_inject_lines_or_exceed_the_limit() {
        let r = Reply::from_backend(250, &["2.0.0 a\r\n250 fake"]);
        assert_eq!(wire(&r), "250 2.0.0 a  250 fake\r\n");
        let long = "é".repeat(600);
        let w = wire(&Reply::from_backend(250, &[long]));
        assert!(w.len() <= 512, "{}", w.len());
        assert!(w.ends_with("\r\n"));
    }

    #[test]
    fn backend_421_reaches_the_client_as_451() {
        let r = Reply::from_backend(421, &["4.4.2 timeout"]).relayed();
        assert_eq!(wire(&r), "451 4.4.2 timeout\r\n");
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
