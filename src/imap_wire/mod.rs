//! An IMAP response reader that follows the grammar of RFC 3501 §7 / RFC 9051 §7 (formal
//! syntax: RFC 3501 §9, RFC 9051 §9) for the responses this proxy reads, generic over
//! `BufRead` and with no knowledge of POP3 or of the command line.
//!
//! It reads one response at a time: tagged (`tag OK|NO|BAD resp-text`), untagged (`* …`)
//! or a continuation request (`+ …`). Inside data responses, quoted strings and literals
//! (`{n}`, the non-synchronizing `{n+}` of RFC 7888 and the binary `~{n}` of RFC 3516) may
//! stand wherever a value may, nested lists are balanced by the grammar rather than by
//! counting parentheses in the text, and FETCH attributes come in any order.
//!
//! Message bodies are not held: a literal that is the value of a FETCH attribute is first
//! offered to a [`Literals`] handler, which may take its bytes as they arrive from the
//! input's buffer (memory independent of the message's size); other literals are kept when
//! short and skipped when long. Free text (`resp-text`: after OK/NO/BAD/BYE/PREAUTH and after
//! `+`) can hold no literal, so `* OK [ALERT] quota {5}` is text and nothing is skipped.
//! Response codes (`[TRYCREATE]`, `[UNAVAILABLE]`…) are read from the wire into [`Code`].

use std::io::{self, BufRead, Read};

#[cfg(test)]
mod tests;

/// The longest response line read outside literals; message data only comes in literals.
pub const MAX_LINE: usize = 64 * 1024;

/// Literals not taken by a [`Literals`] handler are kept up to this size (a header, a
/// mailbox name), and skipped beyond it.
pub const MAX_KEPT_LITERAL: u64 = 64 * 1024;

/// How deep lists may nest (BODYSTRUCTURE is the deepest in practice): a bound on recursion.
const MAX_DEPTH: usize = 64;

/// Why a response could not be read. After any of these but [`Error::Handler`] the
/// connection is out of step with its commands.
#[derive(Debug)]
pub enum Error {
    /// The server closed the connection.
    Closed,
    /// Reading failed (a timeout surfaces as `WouldBlock`).
    Io(io::Error),
    /// The bytes do not follow the grammar; the text says where.
    Syntax(String),
    /// The literal handler failed (the client went away): the rest of the response is
    /// still on the wire.
    Handler(io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Closed => write!(f, "the IMAP server closed the connection"),
            Error::Io(e) if e.kind() == io::ErrorKind::WouldBlock => {
                write!(f, "timed out waiting for the IMAP server")
            }
            Error::Io(e) if e.kind() == io::ErrorKind::TimedOut => {
                write!(f, "timed out waiting for the IMAP server")
            }
            Error::Io(e) => write!(f, "IMAP connection failed: {e}"),
            Error::Syntax(why) => write!(f, "IMAP protocol error: {why}"),
            Error::Handler(e) => write!(f, "{e}"),
        }
    }
}

/// One server response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `tag OK|NO|BAD resp-text`: the end of the command with that tag.
    Tagged { tag: String, status: Status },
    /// `* OK|NO|BAD|BYE|PREAUTH resp-text`.
    Condition(Status),
    /// `* n EXISTS`, `* n EXPUNGE`, `* n FETCH (…)`… (RFC 3501 §7.3, §7.4).
    Message { number: u32, data: MessageData },
    /// Any other untagged data (`* CAPABILITY …`, `* STATUS …`, `* LIST …`): its name in
    /// upper case and its values.
    Data { name: String, values: Vec<Value> },
    /// `+ text`: the server waits for more of the command.
    Continuation(String),
}

/// What a `* n …` response says about message `n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageData {
    Exists,
    Recent,
    Expunge,
    Fetch(Fetch),
    /// A message-data response this reader does not know, with its values.
    Other(String, Vec<Value>),
}

/// The attributes of one FETCH response in the order sent: names in upper case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetch(pub Vec<(String, Value)>);

impl Fetch {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// A numeric attribute (`UID`, `RFC822.SIZE`).
    pub fn number(&self, name: &str) -> Option<u64> {
        self.get(name)?.number()
    }

    pub fn uid(&self) -> Option<u32> {
        u32::try_from(self.number("UID")?).ok()
    }

    /// `FLAGS (…)`, `None` when the response has none.
    pub fn flags(&self) -> Option<Vec<&[u8]>> {
        match self.get("FLAGS")? {
            Value::List(items) => Some(items.iter().filter_map(Value::bytes).collect()),
            _ => None,
        }
    }
}

/// A value in a data response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// An atom, a number or NIL (`NIL` is left to the reader of the value), as sent.
    Atom(Vec<u8>),
    /// A quoted string (unescaped) or a literal short enough to keep.
    String(Vec<u8>),
    /// A literal of this many octets that was skipped, being longer than
    /// [`MAX_KEPT_LITERAL`].
    Skipped(u64),
    /// A literal of this many octets that a [`Literals`] handler took.
    Taken(u64),
    List(Vec<Value>),
}

impl Value {
    pub fn number(&self) -> Option<u64> {
        match self {
            Value::Atom(a)
                if !a.is_empty() && a.len() <= 20 && a.iter().all(u8::is_ascii_digit) =>
            {
                std::str::from_utf8(a).ok()?.parse().ok()
            }
            _ => None,
        }
    }

    /// The bytes of an atom or a string.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Atom(b) | Value::String(b) => Some(b),
            _ => None,
        }
    }
}

/// OK, NO, BAD, BYE or PREAUTH with its response code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub kind: StatusKind,
    pub code: Option<Code>,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    Ok,
    No,
    Bad,
    Bye,
    Preauth,
}

/// A response code: `[NAME arguments]` (RFC 3501 §7.1, RFC 5530).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    /// In upper case.
    pub name: String,
    /// The rest up to `]`, as sent.
    pub arguments: String,
}

impl Status {
    /// Whether the response code is `name` (in upper case).
    pub fn has_code(&self, name: &str) -> bool {
        self.code.as_ref().is_some_and(|c| c.name == name)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            StatusKind::Ok => "OK",
            StatusKind::No => "NO",
            StatusKind::Bad => "BAD",
            StatusKind::Bye => "BYE",
            StatusKind::Preauth => "PREAUTH",
        };
        write!(f, "{kind}")?;
        if let Some(code) = &self.code {
            match code.arguments.is_empty() {
                true => write!(f, " [{}]", code.name)?,
                false => write!(f, " [{} {}]", code.name, code.arguments)?,
            }
        }
        if !self.text.is_empty() {
            write!(f, " {}", self.text)?;
        }
        Ok(())
    }
}

/// Decides what happens to a literal that is the value of a FETCH attribute.
pub trait Literals {
    /// A literal of `length` octets is the value of attribute `name` (upper case) in the
    /// FETCH response about message `number`; `before` holds the attributes that preceded
    /// it. `Ok(true)` takes it: its bytes then go to [`Literals::data`] as they arrive.
    /// An `Err` ends the read with [`Error::Handler`].
    fn offer(&mut self, number: u32, name: &str, before: &Fetch, length: u64) -> io::Result<bool>;

    /// Consecutive pieces of a taken literal.
    fn data(&mut self, bytes: &[u8]) -> io::Result<()>;
}

/// Takes no literal.
pub struct KeepAll;

impl Literals for KeepAll {
    fn offer(&mut self, _: u32, _: &str, _: &Fetch, _: u64) -> io::Result<bool> {
        Ok(false)
    }
    fn data(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

/// Reads responses from `input`, one at a time.
pub struct Reader<R> {
    input: R,
    /// The current line, CRLF removed, and the position in it.
    line: Vec<u8>,
    at: usize,
}

impl<R: BufRead> Reader<R> {
    pub fn new(input: R) -> Reader<R> {
        Reader {
            input,
            line: Vec::new(),
            at: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.input
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.input
    }

    pub fn into_inner(self) -> R {
        self.input
    }

    /// Reads the next whole response; literals of FETCH attributes are offered to
    /// `literals`.
    pub fn next(&mut self, literals: &mut dyn Literals) -> Result<Response, Error> {
        self.read_line()?;
        let response = match self.peek() {
            Some(b'*') => {
                self.at += 1;
                self.space()?;
                self.untagged(literals)?
            }
            Some(b'+') => {
                self.at += 1;
                // RFC 3501 requires a space; some servers send a bare "+".
                if self.peek() == Some(b' ') {
                    self.at += 1;
                }
                Response::Continuation(self.rest_as_text())
            }
            _ => {
                let tag = self.tag()?;
                self.space()?;
                let status = self.status()?;
                if matches!(status.kind, StatusKind::Bye | StatusKind::Preauth) {
                    return Err(self.syntax("BYE or PREAUTH with a tag"));
                }
                Response::Tagged { tag, status }
            }
        };
        Ok(response)
    }

    fn untagged(&mut self, literals: &mut dyn Literals) -> Result<Response, Error> {
        if self.peek().is_some_and(|b| b.is_ascii_digit()) {
            let number = self.number()?;
            self.space()?;
            let name = self.atom()?;
            let is = |word: &str| name.eq_ignore_ascii_case(word.as_bytes());
            let data = if is("FETCH") {
                self.space()?;
                MessageData::Fetch(self.fetch(number, literals)?)
            } else if is("EXISTS") {
                MessageData::Exists
            } else if is("EXPUNGE") {
                MessageData::Expunge
            } else if is("RECENT") {
                MessageData::Recent
            } else {
                let name = String::from_utf8_lossy(name).to_ascii_uppercase();
                MessageData::Other(name, self.values_to_end()?)
            };
            self.end()?;
            return Ok(Response::Message { number, data });
        }
        let name = self.atom_upper()?;
        if status_kind(&name).is_some() {
            self.at -= name.len();
            return Ok(Response::Condition(self.status()?));
        }
        let values = self.values_to_end()?;
        Ok(Response::Data { name, values })
    }

    /// `resp-cond-*`: the status word, then optional `[code]` and text.
    fn status(&mut self) -> Result<Status, Error> {
        let word = self.atom_upper()?;
        let Some(kind) = status_kind(&word) else {
            return Err(self.syntax("a status word (OK, NO, BAD…) expected"));
        };
        // RFC 3501 requires a space and text; servers send "a1 OK" too.
        if self.peek() == Some(b' ') {
            self.at += 1;
        }
        let mut code = None;
        if self.peek() == Some(b'[') {
            let rest = &self.line[self.at + 1..];
            // resp-text-code arguments hold no "]" (RFC 3501 §9); without one, it is text.
            if let Some(close) = rest.iter().position(|&b| b == b']') {
                let inside = String::from_utf8_lossy(&rest[..close]).into_owned();
                let (name, arguments) = inside.split_once(' ').unwrap_or((&inside, ""));
                code = Some(Code {
                    name: name.to_ascii_uppercase(),
                    arguments: arguments.to_string(),
                });
                self.at += close + 2;
                if self.peek() == Some(b' ') {
                    self.at += 1;
                }
            }
        }
        Ok(Status {
            kind,
            code,
            text: self.rest_as_text(),
        })
    }

    /// `msg-att`: `(name value name value …)`. A literal in the place of a value is offered
    /// to `literals`.
    fn fetch(&mut self, number: u32, literals: &mut dyn Literals) -> Result<Fetch, Error> {
        self.expect(b'(')?;
        // Room for the listing's three attributes and a server's usual extra one.
        let mut fetch = Fetch(Vec::with_capacity(4));
        loop {
            match self.peek() {
                Some(b')') => {
                    self.at += 1;
                    return Ok(fetch);
                }
                Some(b' ') if !fetch.0.is_empty() => self.at += 1,
                _ if !fetch.0.is_empty() => return Err(self.syntax("space or ) expected")),
                _ => {}
            }
            let name = self.atom_upper()?;
            self.space()?;
            let value = match self.literal_start()? {
                Some(length) => {
                    if literals
                        .offer(number, &name, &fetch, length)
                        .map_err(Error::Handler)?
                    {
                        self.stream(length, literals)?;
                        self.read_line()?;
                        Value::Taken(length)
                    } else {
                        self.literal(length)?
                    }
                }
                None => self.value(0)?,
            };
            fetch.0.push((name, value));
        }
    }

    /// Values separated by spaces to the end of the line (and past literals).
    fn values_to_end(&mut self) -> Result<Vec<Value>, Error> {
        let mut values = Vec::new();
        while self.peek().is_some() {
            self.space()?;
            // A trailing space before CRLF, as some servers send after CAPABILITY.
            if self.peek().is_none() {
                break;
            }
            values.push(self.value(0)?);
        }
        Ok(values)
    }

    fn value(&mut self, depth: usize) -> Result<Value, Error> {
        if depth > MAX_DEPTH {
            return Err(self.syntax("lists nested too deep"));
        }
        if let Some(length) = self.literal_start()? {
            return self.literal(length);
        }
        match self.peek() {
            Some(b'(') => {
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    match self.peek() {
                        Some(b')') => {
                            self.at += 1;
                            return Ok(Value::List(items));
                        }
                        Some(b' ') if !items.is_empty() => self.at += 1,
                        _ if !items.is_empty() => return Err(self.syntax("space or ) expected")),
                        _ => {}
                    }
                    items.push(self.value(depth + 1)?);
                }
            }
            Some(b'"') => self.quoted(),
            _ => Ok(Value::Atom(self.atom()?.to_vec())),
        }
    }

    /// `{n}`, `{n+}` or `~{n}` at the end of the line: the literal's length. The line then
    /// holds nothing more; the literal's bytes are next on the input.
    fn literal_start(&mut self) -> Result<Option<u64>, Error> {
        let rest = &self.line[self.at..];
        let open = match rest {
            [b'{', ..] => 1,
            [b'~', b'{', ..] => 2,
            _ => return Ok(None),
        };
        let inner = &rest[open..];
        let Some(inner) = inner.strip_suffix(b"}") else {
            return Err(self.syntax("a literal's {length} must end the line"));
        };
        let digits = inner.strip_suffix(b"+").unwrap_or(inner);
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(self.syntax("bad literal length"));
        }
        let length = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| self.syntax("bad literal length"))?;
        self.at = self.line.len();
        Ok(Some(length))
    }

    /// A literal not taken by a handler: kept when short, else skipped. Then the line that
    /// continues the response.
    fn literal(&mut self, length: u64) -> Result<Value, Error> {
        let value = if length <= MAX_KEPT_LITERAL {
            let mut bytes = Vec::with_capacity(length as usize);
            let read = (&mut self.input)
                .take(length)
                .read_to_end(&mut bytes)
                .map_err(Error::Io)?;
            if read as u64 != length {
                return Err(Error::Closed);
            }
            Value::String(bytes)
        } else {
            let copied = io::copy(&mut (&mut self.input).take(length), &mut io::sink())
                .map_err(Error::Io)?;
            if copied != length {
                return Err(Error::Closed);
            }
            Value::Skipped(length)
        };
        self.read_line()?;
        Ok(value)
    }

    /// Hands a taken literal to the handler straight from the input's buffer.
    fn stream(&mut self, mut length: u64, literals: &mut dyn Literals) -> Result<(), Error> {
        while length > 0 {
            let available = self.input.fill_buf().map_err(Error::Io)?;
            if available.is_empty() {
                return Err(Error::Closed);
            }
            let n = available
                .len()
                .min(usize::try_from(length).unwrap_or(usize::MAX));
            literals.data(&available[..n]).map_err(Error::Handler)?;
            self.input.consume(n);
            length -= n as u64;
        }
        Ok(())
    }

    fn quoted(&mut self) -> Result<Value, Error> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.syntax("unterminated quoted string")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(Value::String(out));
                }
                Some(b'\\') => {
                    let escaped = self.line.get(self.at + 1).copied();
                    match escaped {
                        Some(b @ (b'\\' | b'"')) => out.push(b),
                        _ => return Err(self.syntax("bad escape in a quoted string")),
                    }
                    self.at += 2;
                }
                Some(b) => {
                    out.push(b);
                    self.at += 1;
                }
            }
        }
    }

    /// An atom in the wide sense of the fetch grammar: stops at space, parentheses, quote
    /// and brace, except inside `[…]` (`BODY[HEADER.FIELDS (SUBJECT)]<0>`).
    fn atom(&mut self) -> Result<&[u8], Error> {
        let start = self.at;
        let mut in_section = false;
        // A scan over the slice, not peek() per octet: the listing reads three atoms per
        // message, and debug builds (the test suite's) do not inline.
        let length = self.line[start..]
            .iter()
            .position(|&b| {
                match b {
                    b'[' => in_section = true,
                    b']' => in_section = false,
                    b' ' | b'(' | b')' | b'"' | b'{' if !in_section => return true,
                    0x00..=0x1f | 0x7f => return true,
                    _ => {}
                }
                false
            })
            .unwrap_or(self.line.len() - start);
        self.at = start + length;
        if length == 0 || in_section {
            return Err(self.syntax("an atom expected"));
        }
        Ok(&self.line[start..self.at])
    }

    fn atom_upper(&mut self) -> Result<String, Error> {
        let atom = self.atom()?;
        // One allocation on the common path: attribute names are ASCII.
        Ok(match std::str::from_utf8(atom) {
            Ok(atom) => atom.to_ascii_uppercase(),
            Err(_) => String::from_utf8_lossy(atom).to_ascii_uppercase(),
        })
    }

    fn number(&mut self) -> Result<u32, Error> {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        std::str::from_utf8(&self.line[start..self.at])
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| self.syntax("a number expected"))
    }

    fn tag(&mut self) -> Result<String, Error> {
        let start = self.at;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b))
        {
            self.at += 1;
        }
        if self.at == start {
            return Err(self.syntax("a tag, * or + expected"));
        }
        Ok(String::from_utf8_lossy(&self.line[start..self.at]).into_owned())
    }

    fn rest_as_text(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.line[self.at..]).into_owned();
        self.at = self.line.len();
        text
    }

    fn peek(&self) -> Option<u8> {
        self.line.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Result<(), Error> {
        if self.peek() != Some(byte) {
            return Err(self.syntax(&format!("{:?} expected", byte as char)));
        }
        self.at += 1;
        Ok(())
    }

    fn space(&mut self) -> Result<(), Error> {
        self.expect(b' ')
    }

    fn end(&mut self) -> Result<(), Error> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.syntax("end of line expected")),
        }
    }

    fn syntax(&self, what: &str) -> Error {
        let line = String::from_utf8_lossy(&self.line);
        let shown: String = line.chars().take(120).collect();
        Error::Syntax(format!(
            "{what} at octet {} of {:?}",
            self.at,
            shown.escape_debug().to_string()
        ))
    }

    /// Reads one line into `self.line` without its CRLF.
    fn read_line(&mut self) -> Result<(), Error> {
        self.line.clear();
        self.at = 0;
        let mut limited = (&mut self.input).take(MAX_LINE as u64);
        match limited.read_until(b'\n', &mut self.line) {
            Ok(0) => Err(Error::Closed),
            Ok(_) if self.line.ends_with(b"\r\n") => {
                self.line.truncate(self.line.len() - 2);
                Ok(())
            }
            // RFC 3501 §2.2: lines end in CRLF. After a bare LF it would be a guess where
            // a literal announced on that line starts.
            Ok(_) if self.line.ends_with(b"\n") => Err(Error::Syntax(
                "a response line ends in LF without CR".into(),
            )),
            Ok(_) if self.line.len() >= MAX_LINE => {
                Err(Error::Syntax("response line too long".into()))
            }
            Ok(_) => Err(Error::Closed),
            Err(e) => Err(Error::Io(e)),
        }
    }
}

fn status_kind(word: &str) -> Option<StatusKind> {
    Some(match word {
        "OK" => StatusKind::Ok,
        "NO" => StatusKind::No,
        "BAD" => StatusKind::Bad,
        "BYE" => StatusKind::Bye,
        "PREAUTH" => StatusKind::Preauth,
        _ => return None,
    })
}

/// The response code and text of a status line's `resp-text` as sent (`[UNAVAILABLE] try
/// later`): for texts other code passed on, such as the `imap` crate's `information`,
/// which keeps codes it does not know inside the text.
pub fn parse_resp_text(text: &str) -> (Option<Code>, String) {
    let mut reader = Reader::new(io::Cursor::new(Vec::new()));
    reader.line = format!("OK {text}").into_bytes();
    match reader.status() {
        Ok(status) => (status.code, status.text),
        Err(_) => (None, text.to_string()),
    }
}
