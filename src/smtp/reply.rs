//! The SMTP front end's side of the one reply type ([`crate::smtp_wire::Reply`]): the one
//! serializer that knows the wire format our client sees, and the rules for relaying a
//! backend's reply. The type and its reader live in `smtp_wire`, shared with the submission
//! client and STARTTLS; what only the front end needs is here, as methods on that type.
//!
//! RFC 5321 §4.2 (reply lines, multi-line replies with `-`), §4.5.3.1.5 (a reply line is at
//! most 512 octets), RFC 2034 §3 and RFC 3463 (the enhanced status code that prefixes the
//! text once ENHANCEDSTATUSCODES is advertised). Backend replies are parsed into the same
//! type, so what the client sees is the backend's own code, enhanced code and text.

use std::io::{self, Write};

pub use crate::smtp_wire::{Enhanced, Reply};

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

    /// Builds a reply from a backend's code and text lines (see [`Reply::from_lines`]). A
    /// backend without ENHANCEDSTATUSCODES gets the generic `X.0.0` of its class, because we
    /// advertise the extension and every reply must then carry one.
    pub fn from_backend<S: AsRef<str>>(code: u16, text: &[S]) -> Self {
        Reply::from_lines(code, text).with_enhanced_default()
    }

    /// The reply with the generic `X.0.0` of its class when the server sent no enhanced
    /// code: what a reply read by the submission client needs before our client sees it.
    pub fn with_enhanced_default(mut self) -> Self {
        let class = (self.code / 100) as u8;
        if self.enhanced.is_none() && matches!(class, 2 | 4 | 5) {
            self.enhanced = Some(Enhanced::new(class, 0, 0));
        }
        self
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
}
