//! POP3 replies: the one place that knows the wire format of a status line.
//!
//! RFC 1939 §3 status indicators, RFC 2449 §8 extended response codes, and the RFC 3206
//! codes `[SYS/TEMP]`, `[SYS/PERM]` and `[AUTH]`.

use std::io::{self, Write};

/// An RFC 2449/3206 extended response code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// RFC 2449 §8.1.1: the maildrop is locked by another session.
    InUse,
    /// RFC 3206 §4: a temporary system problem; retry later, the password is fine.
    SysTemp,
    /// RFC 3206 §4: a permanent system problem.
    SysPerm,
    /// RFC 3206 §5: the credentials are wrong.
    Auth,
}

impl Code {
    fn as_str(self) -> &'static str {
        match self {
            Code::InUse => "IN-USE",
            Code::SysTemp => "SYS/TEMP",
            Code::SysPerm => "SYS/PERM",
            Code::Auth => "AUTH",
        }
    }
}

/// A single-line reply. Multi-line replies are this status line, then the body lines, then
/// [`END`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok(String),
    Err(Option<Code>, String),
}

/// The line that ends a multi-line reply (RFC 1939 §3).
pub const END: &[u8] = b".\r\n";

impl Reply {
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply::Ok(text.into())
    }

    pub fn err(text: impl Into<String>) -> Reply {
        Reply::Err(None, text.into())
    }

    pub fn err_code(code: Code, text: impl Into<String>) -> Reply {
        Reply::Err(Some(code), text.into())
    }

    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let (status, code, text) = match self {
            Reply::Ok(text) => ("+OK", None, text),
            Reply::Err(code, text) => ("-ERR", *code, text),
        };
        let mut line = String::with_capacity(text.len() + 20);
        line.push_str(status);
        if let Some(code) = code {
            line.push_str(" [");
            line.push_str(code.as_str());
            line.push(']');
        }
        if !text.is_empty() {
            line.push(' ');
            // A CR or LF inside the text would end the line early and desynchronise the
            // client; backend error texts are not trusted to be clean.
            line.extend(text.chars().map(|c| if c.is_control() { ' ' } else { c }));
        }
        line.push_str("\r\n");
        out.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(reply: Reply) -> String {
        let mut out = Vec::new();
        reply.write_to(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn formats_status_code_and_text() {
        assert_eq!(wire(Reply::ok("2 320")), "+OK 2 320\r\n");
        assert_eq!(wire(Reply::ok("")), "+OK\r\n");
        assert_eq!(
            wire(Reply::err("No such message")),
            "-ERR No such message\r\n"
        );
        assert_eq!(
            wire(Reply::err_code(Code::SysTemp, "try later")),
            "-ERR [SYS/TEMP] try later\r\n"
        );
        assert_eq!(wire(Reply::err_code(Code::InUse, "")), "-ERR [IN-USE]\r\n");
    }

    #[test]
    fn control_characters_in_text_cannot_break_the_line() {
        assert_eq!(
            wire(Reply::err("bad\r\n+OK fake")),
            "-ERR bad  +OK fake\r\n"
        );
    }
}
