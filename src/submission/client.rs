//! The SMTP client over any [`Transport`]: commands as values with one wire form, replies
//! read from our own buffer, pipelined groups, AUTH, and the message sent as DATA or BDAT.
//!
//! RFC 5321 §3.3 and §4.1 (MAIL, RCPT, DATA, RSET, NOOP, QUIT), RFC 2920 (a group of
//! commands in one write, their replies read in order), RFC 3030 (`BDAT n LAST`), RFC 4954
//! (AUTH, its initial response and `334` challenges), RFC 3207 §4.2 (nothing may be left
//! buffered when TLS starts).

use super::dot::DotStuffer;
use super::reply::{Extensions, Reply};
use crate::oauth2::sasl::Mechanism as OAuth2Mechanism;
use crate::smtp_wire::{MAX_REPLY_LINE, ReplyBuilder};
use std::fmt;
use std::io::{self, Read, Write};
use std::time::Duration;

/// A connection a client can run on: a byte stream whose socket it owns.
pub trait Transport: Read + Write {
    /// Sets the socket's read and write timeouts (the TCP socket under any TLS).
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()>;
    /// Shuts the socket down both ways, under any TLS layer, so that nothing more reaches
    /// the server: used when a message cannot be sent whole.
    fn cut(&mut self);
    /// Whether nothing has arrived unasked and the peer has not closed: a connection left
    /// idle is still worth using. Answered without waiting.
    fn is_quiet(&self) -> bool;
    /// Asks the kernel to acknowledge what arrives next at once instead of after the
    /// delayed-ACK timer (TCP_QUICKACK on Linux; it lapses by itself, so it is asked before
    /// every wait for a reply). A server with Nagle's algorithm on (Postfix's smtpd) that
    /// sent part of its replies early holds the rest until that part is acknowledged: up
    /// to 40 ms per pipelined message otherwise.
    fn ack_at_once(&mut self) {}
}

/// Why an exchange failed. A refusal by the server is not an error: it is a [`Reply`].
#[derive(Debug)]
pub enum Error {
    /// The connection broke, closed or timed out.
    Io(io::Error),
    /// The server sent something that is not an SMTP reply.
    Malformed(String),
    /// A command we were asked to send cannot be a command line (CR or LF in it).
    Unsendable(&'static str),
}

impl Error {
    /// A socket timeout (Linux reports it as `WouldBlock`).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) if self.is_timeout() => write!(f, "no answer in time ({e})"),
            Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("the server closed the connection")
            }
            Error::Io(e) => write!(f, "{e}"),
            Error::Malformed(why) => write!(f, "protocol error: {why}"),
            Error::Unsendable(why) => write!(f, "cannot send: {why}"),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

/// Why sending a message failed.
#[derive(Debug)]
pub enum SendError {
    /// The message could not be read after `sent` bytes. The socket has been cut before
    /// the end of data, so the server never completes a truncated message.
    Source { error: io::Error, sent: u64 },
    /// The connection failed while the message was being sent.
    Connection(Error),
}

/// One command, displayed as its exact wire line.
#[derive(Debug, Clone, Copy)]
pub enum Command<'a> {
    Ehlo(&'a str),
    Helo(&'a str),
    StartTls,
    /// `MAIL FROM:<from>`, with ` BODY=8BITMIME` when asked (RFC 6152).
    Mail {
        from: &'a str,
        eight_bit: bool,
    },
    Rcpt(&'a str),
    Data,
    Rset,
    Noop,
    Quit,
}

impl fmt::Display for Command<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Ehlo(name) => write!(f, "EHLO {name}\r\n"),
            Command::Helo(name) => write!(f, "HELO {name}\r\n"),
            Command::StartTls => f.write_str("STARTTLS\r\n"),
            Command::Mail { from, eight_bit } => {
                write!(f, "MAIL FROM:<{from}>")?;
                if *eight_bit {
                    f.write_str(" BODY=8BITMIME")?;
                }
                f.write_str("\r\n")
            }
            Command::Rcpt(to) => write!(f, "RCPT TO:<{to}>\r\n"),
            Command::Data => f.write_str("DATA\r\n"),
            Command::Rset => f.write_str("RSET\r\n"),
            Command::Noop => f.write_str("NOOP\r\n"),
            Command::Quit => f.write_str("QUIT\r\n"),
        }
    }
}

impl Command<'_> {
    /// The wire line, or an error if an argument holds CR or LF (which would smuggle a
    /// second command).
    fn line(&self) -> Result<String, Error> {
        let argument = match self {
            Command::Ehlo(s) | Command::Helo(s) | Command::Rcpt(s) => s,
            Command::Mail { from, .. } => from,
            _ => "",
        };
        if argument.contains(['\r', '\n']) {
            return Err(Error::Unsendable("a line break in a command argument"));
        }
        Ok(self.to_string())
    }
}

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF.
const MAX_COMMAND_LINE: usize = 512;

/// How much of the message is read and written at a time.
const MESSAGE_PIECE: usize = 256 * 1024;

/// The read buffer: replies are small, but a pipelined group's come together.
const READ_BUFFER: usize = 16 * 1024;

/// An SMTP client on one connection. It owns the stream; there is no other reader.
pub struct Client<S> {
    stream: S,
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
    extensions: Extensions,
}

impl<S: Transport> Client<S> {
    /// A client on a fresh connection; the greeting is read with [`Client::greeting`].
    pub fn new(stream: S) -> Client<S> {
        Client {
            stream,
            buffer: vec![0; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            extensions: Extensions::default(),
        }
    }

    /// The extensions of the last EHLO.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// Whether the server has been silent since its last reply and has not closed the
    /// connection (see [`Transport::is_quiet`]): a server that drops an idle client
    /// says `421` or just closes, and either shows here without a round trip.
    pub fn is_quiet(&self) -> bool {
        self.start == self.end && self.stream.is_quiet()
    }

    /// Shuts the connection down under any TLS (see [`Transport::cut`]).
    pub fn cut(&mut self) {
        self.stream.cut();
    }

    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.stream.set_timeout(timeout)
    }

    /// The server's greeting (`220`, or a refusal such as `554`).
    pub fn greeting(&mut self) -> Result<Reply, Error> {
        self.read_reply()
    }

    /// EHLO, falling back to HELO if the server refuses it (RFC 5321 §4.1.4); the
    /// extensions are read from the reply once. Returns the reply that counts.
    pub fn hello(&mut self, name: &str) -> Result<Reply, Error> {
        let reply = self.command(Command::Ehlo(name))?;
        if reply.is_positive() {
            self.extensions = Extensions::parse(&reply);
            return Ok(reply);
        }
        self.extensions = Extensions::default();
        if reply.code == 421 {
            return Ok(reply);
        }
        self.command(Command::Helo(name))
    }

    /// STARTTLS (RFC 3207). On `220` the stream is handed back for the TLS handshake: no
    /// byte may be buffered past the reply (§4.2: what came before TLS is not to be
    /// trusted, and a server that sends more is answering commands nobody sent).
    pub fn starttls(mut self) -> Result<Result<S, Reply>, Error> {
        let reply = self.command(Command::StartTls)?;
        if reply.code != 220 {
            return Ok(Err(reply));
        }
        if self.start != self.end {
            return Err(Error::Malformed(
                "the server sent more after its STARTTLS reply".into(),
            ));
        }
        Ok(Ok(self.stream))
    }

    /// Sends one command and reads its reply.
    pub fn command(&mut self, command: Command<'_>) -> Result<Reply, Error> {
        self.send(&[command])?;
        self.read_reply()
    }

    /// Sends commands in one write (a pipelined group, RFC 2920 §3.1); their replies are
    /// then read one by one with [`Client::read_reply`].
    pub fn send(&mut self, commands: &[Command<'_>]) -> Result<(), Error> {
        let mut group = String::new();
        for command in commands {
            group.push_str(&command.line()?);
        }
        self.write(group.as_bytes())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.stream.write_all(bytes)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Reads the next reply, however the server's bytes are split.
    pub fn read_reply(&mut self) -> Result<Reply, Error> {
        let mut builder = ReplyBuilder::default();
        loop {
            let line = self.read_line()?;
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            match builder.line(line) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(why) => return Err(Error::Malformed(why)),
            }
        }
    }

    /// One line without its LF.
    fn read_line(&mut self) -> Result<Vec<u8>, Error> {
        loop {
            let waiting = &self.buffer[self.start..self.end];
            if let Some(at) = memchr::memchr(b'\n', waiting) {
                let line = waiting[..at].to_vec();
                self.start += at + 1;
                return Ok(line);
            }
            if waiting.len() > MAX_REPLY_LINE {
                // Dropped, so that reading on (a fuzzer does) moves past it.
                (self.start, self.end) = (0, 0);
                return Err(Error::Malformed(format!(
                    "a reply line longer than {MAX_REPLY_LINE} bytes"
                )));
            }
            if self.start > 0 {
                self.buffer.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buffer.len() {
                let mut bigger = vec![0; self.buffer.len() * 2];
                bigger[..self.end].copy_from_slice(&self.buffer[..self.end]);
                self.buffer = bigger.into_boxed_slice();
            }
            self.stream.ack_at_once();
            let n = loop {
                match self.stream.read(&mut self.buffer[self.end..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            if n == 0 {
                return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            self.end += n;
        }
    }

    /// AUTH PLAIN (RFC 4616), or LOGIN for servers such as Exchange that lack PLAIN.
    /// Returns the final reply (`235`, or a refusal); a server that asks for more than
    /// the mechanism has steps gets its reply back as it is, for the caller to judge.
    pub fn login(&mut self, user: &str, password: &str) -> Result<Reply, Error> {
        use crate::base64::encode;
        if self.extensions.offers_auth("PLAIN") {
            let message = format!("\0{user}\0{password}");
            return self.sasl("PLAIN", &encode(message.as_bytes()), &mut |_| None);
        }
        if !self.extensions.offers_auth("LOGIN") {
            return Err(Error::Unsendable(
                "the server offers neither AUTH PLAIN nor AUTH LOGIN (often: only after TLS)",
            ));
        }
        let mut answers = [encode(user.as_bytes()), encode(password.as_bytes())].into_iter();
        let mut reply = self.command_line("AUTH LOGIN")?;
        // Two challenges (user name, password); a server that asks for more is broken.
        for _ in 0..2 {
            if reply.code != 334 {
                break;
            }
            reply = self.command_line(&answers.next().unwrap_or_default())?;
        }
        Ok(reply)
    }

    /// AUTH with an OAuth2 mechanism (through [`crate::oauth2::sasl`]). Returns the final
    /// reply and the decoded error challenge, if the server sent one (RFC 7628 §3.2.2);
    /// the challenge is answered with the mechanism's error response before the server's
    /// final failure is read.
    pub fn login_oauth2(
        &mut self,
        mechanism: OAuth2Mechanism,
        initial: &[u8],
    ) -> Result<(Reply, Option<Vec<u8>>), Error> {
        let encoded = crate::base64::encode(initial);
        let mut challenge = None;
        let reply = self.sasl(mechanism.name(), &encoded, &mut |reply| {
            let text = reply.first_line().trim();
            challenge = Some(crate::base64::decode(text.as_bytes()).unwrap_or_default());
            Some(crate::base64::encode(mechanism.error_response()))
        })?;
        Ok((reply, challenge))
    }

    /// `AUTH mechanism initial`: the initial response on the AUTH line when the line fits
    /// 512 octets (RFC 4954 §4 forbids it otherwise), else as the answer to an empty
    /// `334`. A later `334` is handed to `challenge`, whose answer is sent once.
    fn sasl(
        &mut self,
        mechanism: &str,
        initial: &str,
        challenge: &mut dyn FnMut(&Reply) -> Option<String>,
    ) -> Result<Reply, Error> {
        let with_initial = format!("AUTH {mechanism} {initial}");
        let mut reply = if with_initial.len() + 2 <= MAX_COMMAND_LINE {
            self.command_line(&with_initial)?
        } else {
            match self.command_line(&format!("AUTH {mechanism}"))? {
                reply if reply.code == 334 => self.command_line(initial)?,
                other => other,
            }
        };
        if reply.code == 334
            && let Some(answer) = challenge(&reply)
        {
            reply = self.command_line(&answer)?;
        }
        Ok(reply)
    }

    /// A line of a SASL exchange (base64 only, or an AUTH line built here).
    fn command_line(&mut self, line: &str) -> Result<Reply, Error> {
        if line.contains(['\r', '\n']) {
            return Err(Error::Unsendable("a line break in an AUTH argument"));
        }
        self.write(format!("{line}\r\n").as_bytes())?;
        self.read_reply()
    }

    /// After DATA's `354`: the message (`len` bytes, CRLF lines, not yet stuffed),
    /// dot-stuffed, then the final dot. The reply to the dot is left for the caller, who
    /// waits longer for it. If `message` fails, the socket is cut before the dot.
    pub fn send_data(&mut self, message: &mut dyn Read, len: u64) -> Result<(), SendError> {
        let mut stuffer = DotStuffer::default();
        let mut piece = vec![0; MESSAGE_PIECE];
        let mut out = Vec::with_capacity(MESSAGE_PIECE + MESSAGE_PIECE / 8);
        let mut sent = 0;
        while sent < len {
            let want = (len - sent).min(MESSAGE_PIECE as u64) as usize;
            if let Err(error) = message.read_exact(&mut piece[..want]) {
                return Err(self.abandon(error, sent));
            }
            out.clear();
            stuffer.stuff(&piece[..want], &mut out);
            sent += want as u64;
            if sent == len {
                // The dot goes out with the last piece: one write fewer.
                stuffer.finish(&mut out);
            }
            self.write(&out).map_err(SendError::Connection)?;
        }
        if len == 0 {
            out.clear();
            stuffer.finish(&mut out);
            self.write(&out).map_err(SendError::Connection)?;
        }
        Ok(())
    }

    /// `BDAT len LAST` and the message as it is (RFC 3030 §2: no stuffing, no final dot),
    /// after the commands of `group` (pipelined before it, RFC 2920), the commands, the BDAT
    /// line and the first piece of the message in one write. The replies are left for the
    /// caller. If `message` fails, the socket is cut, so the server never has `len` bytes
    /// and never completes the message.
    pub fn send_bdat_last(
        &mut self,
        group: &[Command<'_>],
        message: &mut dyn Read,
        len: u64,
    ) -> Result<(), SendError> {
        let mut head = String::new();
        for command in group {
            head.push_str(&command.line().map_err(SendError::Connection)?);
        }
        head.push_str(&format!("BDAT {len} LAST\r\n"));
        // One buffer for the whole message, the BDAT line at its start the first time.
        let mut buffer = vec![0; head.len() + MESSAGE_PIECE];
        buffer[..head.len()].copy_from_slice(head.as_bytes());
        let mut start = head.len();
        let mut sent = 0;
        loop {
            let want = (len - sent).min(MESSAGE_PIECE as u64) as usize;
            if let Err(error) = message.read_exact(&mut buffer[start..start + want]) {
                return Err(self.abandon(error, sent));
            }
            sent += want as u64;
            self.write(&buffer[..start + want])
                .map_err(SendError::Connection)?;
            start = 0;
            if sent == len {
                return Ok(());
            }
        }
    }

    /// Cuts the connection after a failed read of the message.
    fn abandon(&mut self, error: io::Error, sent: u64) -> SendError {
        self.stream.cut();
        SendError::Source { error, sent }
    }

    /// Sends QUIT without waiting for the reply: for a connection that was never used.
    pub fn quit_without_waiting(&mut self) {
        let _ = self.write(Command::Quit.to_string().as_bytes());
    }

    /// The stream, for tests.
    #[cfg(test)]
    pub(crate) fn stream(&self) -> &S {
        &self.stream
    }

    #[cfg(test)]
    pub(crate) fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}
