//! An IMAP client connection of our own (RFC 3501 §6, RFC 9051 §6), generic over
//! `Read + Write` the way rust-imap's `Client<T>` is, so that byte transcripts drive it in
//! tests. It imports nothing from the POP3, SMTP or command-line modules.
//!
//! One [`Connection`] owns one backend connection: its stream, the one [`Reader`] that reads
//! it, and the tags of the commands sent and not yet answered. Commands may be pipelined
//! (RFC 3501 §5.5): [`Connection::send`] queues a command, [`Connection::flush`] writes the
//! queue in one piece, and the answers are read strictly in the order sent with
//! [`Connection::read_to`], which hands untagged responses and literals to the caller, so
//! message bodies stream. [`selected`] reads what SELECT and EXAMINE say about a mailbox.
//!
//! It replaces the `imap` crate (3.0.0-alpha.15), which the design named. The crate served
//! only the greeting, CAPABILITY, LOGIN, AUTHENTICATE and LOGOUT: every response with data
//! was already read with [`crate::imap_wire`], because the crate holds a whole response in
//! memory and re-parses it per line, drops response codes it does not know (`MAILBOXID`,
//! RFC 5530's), and cannot pipeline. Keeping it for those few commands cost two readers on
//! one socket through an `Rc<RefCell>` and a hand-over of unread bytes; these commands are
//! each a few lines on top of `imap_wire`.

pub mod connect;
pub mod selected;

use crate::imap_wire::{
    self, KeepAll, Literals, MessageData, Reader, Response, Status, StatusKind, Value,
};
use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};

/// Read buffer of a connection: large reads for bodies, few system calls.
const BUFFER: usize = 64 * 1024;

/// Why a command could not be completed.
#[derive(Debug)]
pub enum Error {
    /// The server closed the connection (after `* BYE`, or without a word).
    Closed,
    /// The connection is unusable: cut, timed out, out of step with its commands, or its
    /// bytes broke the grammar. The text says which.
    Broken(String),
    /// The literal handler failed (the client went away): the rest of the response is
    /// still on the wire, so the connection is out of step too.
    Handler(io::Error),
    /// A command argument that cannot be sent (CR, LF or NUL in a quoted string).
    Unsendable(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Closed => f.write_str(CLOSED),
            Error::Broken(why) => f.write_str(why),
            Error::Handler(e) => write!(f, "{e}"),
            Error::Unsendable(what) => write!(f, "{what} contains CR, LF or NUL"),
        }
    }
}

/// How [`Error::Closed`] reads.
pub const CLOSED: &str = "the IMAP server closed the connection";

impl From<imap_wire::Error> for Error {
    fn from(error: imap_wire::Error) -> Error {
        match error {
            imap_wire::Error::Closed => Error::Closed,
            imap_wire::Error::Handler(e) => Error::Handler(e),
            other => Error::Broken(other.to_string()),
        }
    }
}

fn write_error(error: io::Error) -> Error {
    Error::Broken(imap_wire::Error::Io(error).to_string())
}

/// One IMAP connection and the commands in flight on it.
pub struct Connection<S> {
    reader: Reader<BufReader<S>>,
    /// Commands queued by [`Connection::send`] and not yet written.
    outgoing: Vec<u8>,
    prefix: &'static str,
    next_tag: u32,
    /// Tags of the commands written or queued whose answers nobody has asked for yet,
    /// oldest first.
    pending: VecDeque<String>,
    /// Tagged answers that came while another command's answer was read.
    answered: Vec<(String, Status)>,
    /// Message numbers of `* n EXPUNGE` responses, in the order received, until taken.
    expunged: Vec<u32>,
}

impl<S: Read + Write> Connection<S> {
    /// A connection whose tags are `a1`, `a2`…
    pub fn new(stream: S) -> Connection<S> {
        Connection::with_tags(stream, "a", 1)
    }

    /// A connection whose first tag is `{prefix}{first}`.
    pub fn with_tags(stream: S, prefix: &'static str, first: u32) -> Connection<S> {
        Connection {
            reader: Reader::new(BufReader::with_capacity(BUFFER, stream)),
            outgoing: Vec::new(),
            prefix,
            next_tag: first,
            pending: VecDeque::new(),
            answered: Vec::new(),
            expunged: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        self.reader.get_ref().get_ref()
    }

    /// How many commands are sent or queued and their answers not yet read.
    pub fn pending(&self) -> usize {
        self.pending.len() + self.answered.len()
    }

    /// Reads the greeting (RFC 3501 §7.1): `* OK`, `* PREAUTH` or `* BYE`, as sent.
    pub fn greeting(&mut self) -> Result<Status, Error> {
        match self.reader.next(&mut KeepAll)? {
            Response::Condition(status) => Ok(status),
            other => Err(Error::Broken(format!("not a greeting: {other:?}"))),
        }
    }

    /// Queues `command` (without tag and CRLF) and returns its tag. Nothing is written
    /// before [`Connection::flush`] or a read, so that a flight of commands goes out in one
    /// write (one TLS record, one packet where it fits).
    pub fn send(&mut self, command: &str) -> String {
        let tag = format!("{}{}", self.prefix, self.next_tag);
        self.next_tag += 1;
        self.outgoing.extend_from_slice(tag.as_bytes());
        self.outgoing.push(b' ');
        self.outgoing.extend_from_slice(command.as_bytes());
        self.outgoing.extend_from_slice(b"\r\n");
        self.pending.push_back(tag.clone());
        tag
    }

    /// Writes the queued commands.
    pub fn flush(&mut self) -> Result<(), Error> {
        if self.outgoing.is_empty() {
            return Ok(());
        }
        let stream = self.reader.get_mut().get_mut();
        stream.write_all(&self.outgoing).map_err(write_error)?;
        stream.flush().map_err(write_error)?;
        self.outgoing.clear();
        Ok(())
    }

    /// Reads responses up to the tagged one of `tag` and returns its status. Untagged
    /// responses go to `each`, literals of FETCH attributes are offered to `literals`;
    /// unsolicited responses may come anywhere. `* BYE` is logged; the server closes the
    /// connection next, which a later read finds.
    ///
    /// A server may run pipelined commands at once (RFC 3501 §5.5; Dovecot does for
    /// FETCHes) and so send untagged data of later commands, and even their tagged
    /// answers, before this one's: those answers are kept for their own `read_to`, and the
    /// caller tells untagged data apart by its content (the UID of a FETCH).
    pub fn read_to<L: Literals>(
        &mut self,
        tag: &str,
        literals: &mut L,
        mut each: impl FnMut(&mut L, Response),
    ) -> Result<Status, Error> {
        self.flush()?;
        if let Some(at) = self.answered.iter().position(|(t, _)| t == tag) {
            return Ok(self.answered.swap_remove(at).1);
        }
        let Some(at) = self.pending.iter().position(|t| t == tag) else {
            return Err(Error::Broken(format!("{tag} was never sent")));
        };
        self.pending.remove(at);
        loop {
            match self.reader.next(literals)? {
                Response::Tagged { tag: got, status } if got == tag => return Ok(status),
                Response::Tagged { tag: got, status } => {
                    let Some(at) = self.pending.iter().position(|t| *t == got) else {
                        return Err(Error::Broken(format!(
                            "an answer to a command never sent ({got} {status})"
                        )));
                    };
                    self.pending.remove(at);
                    self.answered.push((got, status));
                }
                Response::Continuation(text) => {
                    return Err(Error::Broken(format!(
                        "an unexpected continuation request ({text})"
                    )));
                }
                Response::Condition(status) if status.kind == StatusKind::Bye => {
                    log::info!("the IMAP server ends the session: {status}");
                }
                response => {
                    if let Response::Message {
                        number,
                        data: MessageData::Expunge,
                    } = &response
                    {
                        self.expunged.push(*number);
                    }
                    each(literals, response)
                }
            }
        }
    }

    /// The message numbers of the `* n EXPUNGE` responses read since the last call, in
    /// order (each renumbers the messages after it, RFC 3501 §7.4.1).
    pub fn take_expunged(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.expunged)
    }

    /// Whether the tagged answer to `tag` has already arrived (kept by [`Connection::read_to`]
    /// while it read another command's answer).
    pub fn is_answered(&self, tag: &str) -> bool {
        self.answered.iter().any(|(t, _)| t == tag)
    }

    /// Sends `command` and reads its answer, ignoring untagged data.
    pub fn run(&mut self, command: &str) -> Result<Status, Error> {
        let tag = self.send(command);
        self.read_to(&tag, &mut KeepAll, |_, _| {})
    }

    /// `CAPABILITY` (RFC 3501 §6.1.1): the names, as the server spelled them.
    pub fn capability(&mut self) -> Result<(Vec<String>, Status), Error> {
        let tag = self.send("CAPABILITY");
        let mut names = Vec::new();
        let status = self.read_to(&tag, &mut KeepAll, |_, response| {
            if let Response::Data { name, values } = response
                && name == "CAPABILITY"
            {
                names.extend(values.iter().filter_map(Value::bytes).map(text));
            }
        })?;
        Ok((names, status))
    }

    /// `LOGIN user password` (RFC 3501 §6.2.3), both as quoted strings. UTF-8 is sent as
    /// it is (servers take it; RFC 9051 allows it); CR, LF and NUL cannot be sent at all.
    pub fn login(&mut self, user: &str, password: &str) -> Result<Status, Error> {
        let user = quoted(user).ok_or(Error::Unsendable("the user name"))?;
        let password = quoted(password).ok_or(Error::Unsendable("the password"))?;
        self.run(&format!("LOGIN {user} {password}"))
    }

    /// `AUTHENTICATE arguments` (RFC 3501 §6.2.2): each continuation request's decoded
    /// challenge goes to `respond`, whose answer is sent base64-encoded.
    pub fn authenticate(
        &mut self,
        arguments: &str,
        mut respond: impl FnMut(&[u8]) -> Vec<u8>,
    ) -> Result<Status, Error> {
        let tag = self.send(&format!("AUTHENTICATE {arguments}"));
        self.flush()?;
        loop {
            match self.reader.next(&mut KeepAll)? {
                Response::Tagged { tag: got, status } if got == tag => {
                    self.pending.retain(|t| *t != tag);
                    return Ok(status);
                }
                Response::Continuation(challenge) => {
                    let challenge = crate::base64::decode(challenge.trim().as_bytes())
                        .unwrap_or_else(|| challenge.into_bytes());
                    let mut answer = crate::base64::encode(&respond(&challenge)).into_bytes();
                    answer.extend_from_slice(b"\r\n");
                    let stream = self.reader.get_mut().get_mut();
                    stream.write_all(&answer).map_err(write_error)?;
                    stream.flush().map_err(write_error)?;
                }
                Response::Tagged { tag: got, status } => {
                    return Err(Error::Broken(format!(
                        "an answer to a command never sent ({got} {status})"
                    )));
                }
                _ => {}
            }
        }
    }

    /// `LOGOUT` (RFC 3501 §6.1.3): the server's `* BYE` and tagged OK.
    pub fn logout(&mut self) -> Result<Status, Error> {
        self.run("LOGOUT")
    }

    /// Reads and throws away the answers to every command in flight (their untagged data
    /// and literals included, without holding them).
    pub fn discard_pending(&mut self) -> Result<(), Error> {
        self.answered.clear();
        while let Some(tag) = self.pending.back().cloned() {
            self.read_to(&tag, &mut KeepAll, |_, _| {})?;
            self.answered.clear();
        }
        Ok(())
    }
}

/// `text` as an IMAP quoted string, `None` when it holds CR, LF or NUL, which no quoted
/// string can carry (RFC 3501 §9 `QUOTED-CHAR`).
pub fn quoted(text: &str) -> Option<String> {
    if text.contains(['\r', '\n', '\0']) {
        return None;
    }
    Some(format!(
        "\"{}\"",
        text.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether `names` holds `wanted`, compared without case (RFC 3501 §9: atoms are
/// case-insensitive).
pub fn has_capability(names: &[String], wanted: &str) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(wanted))
}

/// The capability names of a status's `[CAPABILITY …]` code (a greeting's or LOGIN's OK),
/// `None` when it has none.
pub fn capability_code(status: &Status) -> Option<Vec<String>> {
    let code = status.code.as_ref().filter(|c| c.name == "CAPABILITY")?;
    Some(
        code.arguments
            .split_ascii_whitespace()
            .map(String::from)
            .collect(),
    )
}

#[cfg(test)]
pub(crate) mod tests;
