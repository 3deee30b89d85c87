//! The POP3 session: RFC 1939's AUTHORIZATION, TRANSACTION and UPDATE states over any
//! `BufRead` + `Write`, with a [`Opener`] as the backend.
//!
//! One line is read, parsed once into a [`Command`], and `(state, command)` decides the
//! reply. Replies go out in command order, flushed before each read, so pipelined commands
//! (RFC 2449 §6.6) are answered correctly.

use super::NulBytes;
use super::command::{self, Command, ParseError};
use super::encode::Encoder;
use super::maildrop::{
    Credentials, Extent, FetchError, Maildrop, MessageSink, OpenError, Opener, Update,
};
use super::reply::{Code, END, Reply};
use crate::client_tls::{NoTls, StartTls, login_allowed};
use crate::frontend::idle::{Idle, Tick};
use crate::frontend::login::{AfterFailure, FailedLogins, PlainError, decode_plain};
use crate::lines::{LineBuffer, LineStatus};
use std::fmt;
use std::io::{self, BufRead, Write};
use std::time::Duration;

/// RFC 2449 §4 lets commands be 255 octets; SASL responses (RFC 5034 §4) can be longer.
const MAX_LINE: usize = 2048;
/// Dovecot's limit too: a client this confused is not a mail client.
const MAX_BAD_COMMANDS: u32 = 20;

/// Session settings that are not about the backend.
#[derive(Debug, Clone)]
pub struct Config {
    pub idle_timeout: Duration,
    /// How long each `TimedOut` read error of the input stands for.
    pub tick: Duration,
    /// How often the IMAP connection hears a NOOP while the client is idle.
    pub keepalive: Duration,
    pub auth_failure_delay: Duration,
    pub max_auth_failures: u32,
    pub nul_bytes: NulBytes,
    /// RFC 2449 EXPIRE value to advertise, if the backend's policy is known.
    pub capa_expire: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            idle_timeout: Duration::from_secs(600),
            tick: Duration::from_secs(120),
            keepalive: Duration::from_secs(120),
            auth_failure_delay: Duration::from_secs(2),
            max_auth_failures: 3,
            nul_bytes: NulBytes::Replace,
            capa_expire: None,
        }
    }
}

/// How the session ended, for the summary log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Quit,
    ClientClosed,
    IdleTimeout,
    TooManyBadCommands,
    TooManyAuthFailures,
    /// The backend failed in a way that ends the session (mid-message, for one).
    BackendFailed(String),
    /// QUIT was given but the delete policy could not be applied.
    UpdateFailed(String),
    ClientError(String),
    /// STLS was accepted but the TLS handshake failed.
    TlsFailed(String),
}

impl End {
    /// Whether the session broke off (the backend, the client's connection or TLS failed,
    /// or the deletes could not be applied) rather than ran its course, whoever ended it.
    pub fn broke_off(&self) -> bool {
        match self {
            End::Quit
            | End::ClientClosed
            | End::IdleTimeout
            | End::TooManyBadCommands
            | End::TooManyAuthFailures => false,
            End::BackendFailed(_)
            | End::UpdateFailed(_)
            | End::ClientError(_)
            | End::TlsFailed(_) => true,
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Quit => f.write_str("quit"),
            End::ClientClosed => f.write_str("client closed the connection"),
            End::IdleTimeout => f.write_str("idle timeout"),
            End::TooManyBadCommands => f.write_str("too many bad commands"),
            End::TooManyAuthFailures => f.write_str("too many authentication failures"),
            End::BackendFailed(why) => write!(f, "backend failed: {why}"),
            End::UpdateFailed(why) => write!(f, "quit, but deleting failed: {why}"),
            End::ClientError(why) => write!(f, "client connection error: {why}"),
            End::TlsFailed(why) => write!(f, "TLS handshake failed: {why}"),
        }
    }
}

/// What happened in one session, for the summary log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub user: Option<String>,
    pub listed: usize,
    pub retrieved: usize,
    pub deleted: usize,
    pub bytes: u64,
    pub end: End,
}

enum State {
    Authorization {
        user: Option<String>,
    },
    Transaction {
        maildrop: Box<dyn Maildrop>,
        deleted: Vec<bool>,
    },
}

/// Serves one client from greeting to close.
pub struct Session<'a, R, W> {
    input: R,
    output: W,
    opener: &'a mut dyn Opener,
    config: Config,
    tls: Box<dyn StartTls + 'a>,
    state: State,
    line: LineBuffer,
    bad_commands: u32,
    failed_logins: FailedLogins,
    idle: Idle,
    summary: Summary,
}

/// The result of one command: go on, or end the session this way.
type Flow = Result<(), End>;

impl<'a, R: BufRead, W: Write> Session<'a, R, W> {
    pub fn new(input: R, output: W, opener: &'a mut dyn Opener, config: Config) -> Self {
        let failed_logins = FailedLogins::new(config.auth_failure_delay, config.max_auth_failures);
        let idle = Idle::new(config.tick, config.idle_timeout, config.keepalive);
        Session {
            input,
            output,
            opener,
            config,
            tls: Box::new(NoTls),
            state: State::Authorization { user: None },
            line: LineBuffer::new(MAX_LINE),
            bad_commands: 0,
            failed_logins,
            idle,
            summary: Summary {
                user: None,
                listed: 0,
                retrieved: 0,
                deleted: 0,
                bytes: 0,
                end: End::ClientClosed,
            },
        }
    }

    /// Offers STLS (or, after implicit TLS, knows the connection is encrypted) through the
    /// front end's client TLS.
    pub fn with_tls(mut self, tls: impl StartTls + 'a) -> Self {
        self.tls = Box::new(tls);
        self
    }

    /// Runs the session to its end. Deletes happen only after QUIT; any other end leaves
    /// the maildrop untouched (RFC 1939 §6).
    pub fn run(mut self) -> Summary {
        let end = match self.serve() {
            Ok(()) => End::Quit,
            Err(end) => end,
        };
        let _ = self.output.flush();
        if let State::Transaction { maildrop, .. } = &mut self.state {
            maildrop.close();
        }
        self.summary.end = end;
        self.summary
    }

    fn serve(&mut self) -> Flow {
        self.reply(Reply::ok("legacy-mail-proxy POP3 ready."))?;
        loop {
            let line = match self.next_line()? {
                Some(line) => line,
                None => {
                    self.bad_command(Reply::err("Line too long"))?;
                    continue;
                }
            };
            if log::log_enabled!(log::Level::Debug) {
                log::debug!("command: {}", redacted(&line));
            }
            match command::parse(&line) {
                Ok(Command::Quit) => return self.quit(),
                Ok(command) => self.dispatch(command)?,
                Err(ParseError::Unknown) => self.bad_command(Reply::err("Unknown command"))?,
                Err(ParseError::Syntax(why)) => self.bad_command(Reply::err(why))?,
            }
        }
    }

    /// Waits for the next line, keeping the backend alive while the client is idle.
    /// `None` means the line was too long and has been skipped.
    fn next_line(&mut self) -> Result<Option<Vec<u8>>, End> {
        loop {
            self.output
                .flush()
                .map_err(|e| End::ClientError(e.to_string()))?;
            match self.line.read_from(&mut self.input) {
                Ok(LineStatus::Complete) => {
                    self.idle.client_active();
                    return Ok(Some(self.line.line().to_vec()));
                }
                Ok(LineStatus::TooLong) => {
                    self.idle.client_active();
                    return Ok(None);
                }
                Ok(LineStatus::Eof) => return Err(End::ClientClosed),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) =>
                {
                    self.idle_tick()?
                }
                Err(e) => return Err(End::ClientError(e.to_string())),
            }
        }
    }

    fn idle_tick(&mut self) -> Flow {
        match self.idle.tick() {
            Tick::Expired => {
                self.reply(Reply::err("Disconnected for inactivity."))?;
                return Err(End::IdleTimeout);
            }
            Tick::Wait => return Ok(()),
            Tick::KeepAlive => {}
        }
        if let State::Transaction { maildrop, .. } = &mut self.state
            && let Err(e) = maildrop.keepalive()
        {
            // The next command will meet the failure and report it; QUIT then
            // deletes nothing.
            log::warn!("IMAP keepalive failed: {e}");
        }
        Ok(())
    }

    fn reply(&mut self, reply: Reply) -> Flow {
        reply
            .write_to(&mut self.output)
            .map_err(|e| End::ClientError(e.to_string()))
    }

    fn write(&mut self, bytes: &[u8]) -> Flow {
        self.output
            .write_all(bytes)
            .map_err(|e| End::ClientError(e.to_string()))
    }

    fn bad_command(&mut self, reply: Reply) -> Flow {
        self.bad_commands += 1;
        if self.bad_commands >= MAX_BAD_COMMANDS {
            self.reply(Reply::err("Too many bad commands, closing."))?;
            return Err(End::TooManyBadCommands);
        }
        self.reply(reply)
    }

    fn dispatch(&mut self, command: Command) -> Flow {
        let logged_in = matches!(self.state, State::Transaction { .. });
        match (logged_in, command) {
            (_, Command::Capa) => self.capa(),
            (false, Command::Stls) => self.stls(),
            (true, Command::Stls) => {
                self.bad_command(Reply::err("STLS is only allowed before logging in"))
            }
            (false, Command::User(_) | Command::Pass(_) | Command::Auth { .. })
                if !login_allowed(self.tls.as_ref()) =>
            {
                // RFC 2595 §2.1 leaves it to the server; RFC 3206 [AUTH] tells the client
                // that logging in is what failed, not the server.
                self.bad_command(Reply::err_code(
                    Code::Auth,
                    "Plain-text logins are disabled: use STLS (or port 995) first",
                ))
            }
            (false, Command::User(name)) => self.user(name),
            (false, Command::Pass(password)) => self.pass(password),
            (false, Command::Auth { mechanism, initial }) => self.auth(mechanism, initial),
            (true, Command::User(_) | Command::Pass(_) | Command::Auth { .. }) => {
                self.bad_command(Reply::err("Already logged in"))
            }
            (false, _) => self.bad_command(Reply::err("Log in first (USER/PASS or AUTH)")),
            (true, Command::Stat) => self.stat(),
            (true, Command::List(arg)) => self.list(arg, false),
            (true, Command::Uidl(arg)) => self.list(arg, true),
            (true, Command::Retr(arg)) => self.retrieve(arg, None),
            (true, Command::Top(arg, lines)) => match parse_line_count(lines) {
                Some(lines) => self.retrieve(arg, Some(lines)),
                None => self.reply(Reply::err("Invalid number of lines")),
            },
            (true, Command::Dele(arg)) => self.dele(arg),
            (true, Command::Rset) => self.rset(),
            (true, Command::Noop) => self.reply(Reply::ok("")),
            (true, Command::Quit) => unreachable!("QUIT is handled by serve"),
        }
    }

    fn capa(&mut self) -> Flow {
        let logged_in = matches!(self.state, State::Transaction { .. });
        let mut text = String::from("+OK Capability list follows\r\nTOP\r\nUIDL\r\n");
        if !logged_in {
            text.push_str("USER\r\nSASL PLAIN\r\n");
            if self.tls.offered() {
                text.push_str("STLS\r\n");
            }
        }
        text.push_str("RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n");
        if let Some(expire) = &self.config.capa_expire {
            text.push_str(&format!("EXPIRE {expire}\r\n"));
        }
        text.push_str(concat!(
            "IMPLEMENTATION legacy-mail-proxy-",
            env!("CARGO_PKG_VERSION"),
            "\r\n.\r\n"
        ));
        self.write(text.as_bytes())
    }

    // ---- AUTHORIZATION (RFC 1939 §7, RFC 5034) ----

    /// RFC 2595 §4: `+OK`, then the handshake. Whatever the client pipelined after STLS is
    /// thrown away by the front end, and everything learnt before it (USER) is forgotten.
    fn stls(&mut self) -> Flow {
        if self.tls.active() {
            return self.bad_command(Reply::err("TLS is already active"));
        }
        if !self.tls.offered() {
            return self.bad_command(Reply::err("Unknown command"));
        }
        self.reply(Reply::ok("Begin TLS negotiation"))?;
        self.output
            .flush()
            .map_err(|e| End::ClientError(e.to_string()))?;
        self.tls.start().map_err(End::TlsFailed)?;
        self.state = State::Authorization { user: None };
        self.line = LineBuffer::new(MAX_LINE);
        self.idle.client_active();
        Ok(())
    }

    fn user(&mut self, name: &[u8]) -> Flow {
        self.state = State::Authorization {
            user: Some(text(name)),
        };
        self.reply(Reply::ok(""))
    }

    fn pass(&mut self, password: &[u8]) -> Flow {
        let State::Authorization { user } = &mut self.state else {
            unreachable!("dispatch checked the state");
        };
        let Some(user) = user.take() else {
            return self.bad_command(Reply::err("Give USER first"));
        };
        self.login(&user, &text(password))
    }

    fn auth(&mut self, mechanism: Option<&str>, initial: Option<&[u8]>) -> Flow {
        let Some(mechanism) = mechanism else {
            return self.write(b"+OK\r\nPLAIN\r\n.\r\n");
        };
        if !mechanism.eq_ignore_ascii_case("PLAIN") {
            return self.bad_command(Reply::err("Unsupported authentication mechanism"));
        }
        let response = match initial {
            // RFC 5034 §4: "=" is an empty initial response.
            Some(b"=") => Vec::new(),
            Some(initial) => initial.to_vec(),
            None => {
                self.write(b"+ \r\n")?;
                match self.next_line()? {
                    Some(line) => line,
                    None => {
                        return self.bad_command(Reply::err("Authentication response too long"));
                    }
                }
            }
        };
        if response == b"*" {
            return self.bad_command(Reply::err("Authentication cancelled"));
        }
        let Some(decoded) = crate::base64::decode(&response) else {
            return self.bad_command(Reply::err("Invalid base64 in authentication response"));
        };
        match decode_plain(&decoded) {
            Ok((user, password)) => self.login(&user, &password),
            Err(PlainError::Malformed) => self.bad_command(Reply::err("Malformed PLAIN response")),
            Err(why) => self.auth_failed(&why.to_string()),
        }
    }

    /// Every way of logging in ends here, so each failure costs the same delay and counts
    /// toward the same limit. A malformed attempt that never reaches the backend counts as
    /// a bad command instead: a client cannot repeat it for free.
    fn login(&mut self, user: &str, password: &str) -> Flow {
        // No IMAP server accepts NUL in LOGIN (RFC 3501 quoted strings cannot hold it), and
        // one that is sent gets BAD, which would read as the server's fault.
        if user.contains('\0') || password.contains('\0') {
            return self.bad_command(Reply::err("NUL is not allowed in a user name or password"));
        }
        self.summary.user = Some(user.to_string());
        let credentials = Credentials { user, password };
        match self.opener.open(&credentials) {
            Ok(maildrop) => {
                let count = maildrop.messages().len();
                self.summary.listed = count;
                log::info!("user={} logged in, {count} messages", user.escape_debug());
                self.state = State::Transaction {
                    maildrop,
                    deleted: vec![false; count],
                };
                self.reply(Reply::ok("Logged in."))
            }
            Err(OpenError::Auth(why)) => self.auth_failed(&why),
            Err(OpenError::InUse) => {
                log::info!("user={} refused: maildrop in use", user.escape_debug());
                self.reply(Reply::err_code(
                    Code::InUse,
                    "Mailbox is locked by another POP3 session",
                ))
            }
            Err(OpenError::Temporary(why)) => {
                log::warn!("user={} backend unavailable: {why}", user.escape_debug());
                self.reply(Reply::err_code(
                    Code::SysTemp,
                    "Mail server temporarily unavailable, try again later",
                ))
            }
            Err(OpenError::Permanent(why)) => {
                log::error!("user={} backend unusable: {why}", user.escape_debug());
                self.reply(Reply::err_code(
                    Code::SysPerm,
                    "Mail server cannot serve this mailbox",
                ))
            }
        }
    }

    fn auth_failed(&mut self, why: &str) -> Flow {
        // Delay before answering, so guessing passwords costs time.
        let _ = self.output.flush();
        let after = self.failed_logins.record();
        log::info!(
            "user={} authentication failed ({} of {}): {why}",
            self.summary.user.as_deref().unwrap_or("-").escape_debug(),
            self.failed_logins.count(),
            self.failed_logins.max()
        );
        self.reply(Reply::err_code(Code::Auth, "Authentication failed."))?;
        match after {
            AfterFailure::Close => Err(End::TooManyAuthFailures),
            AfterFailure::TryAgain => Ok(()),
        }
    }

    // ---- TRANSACTION (RFC 1939 §5) ----

    fn transaction(&mut self) -> (&mut Box<dyn Maildrop>, &mut Vec<bool>) {
        match &mut self.state {
            State::Transaction { maildrop, deleted } => (maildrop, deleted),
            State::Authorization { .. } => unreachable!("dispatch checked the state"),
        }
    }

    /// Resolves a message-number argument, with a distinct reply for each way it can be
    /// wrong (as Dovecot does).
    fn message(&mut self, arg: &str) -> Result<usize, Reply> {
        let (maildrop, deleted) = self.transaction();
        if arg.is_empty() || !arg.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Reply::err("Invalid message number"));
        }
        let number: usize = arg.parse().map_err(|_| Reply::err("No such message"))?;
        if number == 0 || number > maildrop.messages().len() {
            return Err(Reply::err("No such message"));
        }
        if deleted[number - 1] {
            return Err(Reply::err("Message is deleted"));
        }
        Ok(number - 1)
    }

    fn stat(&mut self) -> Flow {
        let (maildrop, deleted) = self.transaction();
        let (count, size) = maildrop
            .messages()
            .iter()
            .zip(deleted.iter())
            .filter(|(_, deleted)| !**deleted)
            .fold((0u64, 0u64), |(n, s), (m, _)| (n + 1, s + m.size));
        self.reply(Reply::ok(format!("{count} {size}")))
    }

    /// LIST or UIDL, for one message or all.
    fn list(&mut self, arg: Option<&str>, uidl: bool) -> Flow {
        let value = |m: &super::maildrop::MessageInfo| {
            if uidl {
                m.uidl.clone()
            } else {
                m.size.to_string()
            }
        };
        if let Some(arg) = arg {
            return match self.message(arg) {
                Ok(index) => {
                    let (maildrop, _) = self.transaction();
                    let text = format!("{} {}", index + 1, value(&maildrop.messages()[index]));
                    self.reply(Reply::ok(text))
                }
                Err(reply) => self.reply(reply),
            };
        }
        let (maildrop, deleted) = self.transaction();
        let mut text = Vec::with_capacity(maildrop.messages().len() * 16 + 16);
        text.extend_from_slice(b"+OK\r\n");
        for (index, (message, deleted)) in
            maildrop.messages().iter().zip(deleted.iter()).enumerate()
        {
            if !deleted {
                text.extend_from_slice(format!("{} {}\r\n", index + 1, value(message)).as_bytes());
            }
        }
        text.extend_from_slice(END);
        self.write(&text)
    }

    /// RETR (`top_lines` is `None`) or TOP.
    fn retrieve(&mut self, arg: &str, top_lines: Option<u64>) -> Flow {
        let index = match self.message(arg) {
            Ok(index) => index,
            Err(reply) => return self.reply(reply),
        };
        let nul = self.config.nul_bytes;
        let (maildrop, _) = match &mut self.state {
            State::Transaction { maildrop, deleted } => (maildrop, deleted),
            State::Authorization { .. } => unreachable!(),
        };
        let size = maildrop.messages()[index].size;
        let status = match top_lines {
            None => format!("+OK {size} octets\r\n"),
            Some(_) => "+OK\r\n".to_string(),
        };
        let mut sink = ClientSink {
            output: &mut self.output,
            status: status.into_bytes(),
            started: false,
            encoder: Some(match top_lines {
                None => Encoder::whole(nul),
                Some(lines) => Encoder::top(nul, lines),
            }),
            buffer: Vec::new(),
            bytes: 0,
        };
        let extent = match top_lines {
            None => Extent::Whole,
            Some(_) => Extent::Head,
        };
        let result = maildrop
            .fetch(index, extent, &mut sink)
            .and_then(|()| sink.finish());
        let started = sink.started;
        self.summary.bytes += sink.bytes;
        match result {
            Ok(()) => {
                if top_lines.is_none() {
                    self.summary.retrieved += 1;
                    let (maildrop, _) = self.transaction();
                    if let Err(e) = maildrop.mark_retrieved(index) {
                        log::warn!("could not mark message {} as seen: {e}", index + 1);
                    }
                }
                Ok(())
            }
            Err(FetchError::Client(e)) => Err(End::ClientError(e.to_string())),
            Err(FetchError::Gone) if !started => {
                self.reply(Reply::err("Message was deleted by another client"))
            }
            Err(FetchError::Gone) => Err(End::BackendFailed(
                "message vanished while being sent".into(),
            )),
            Err(FetchError::Backend(e)) if !started => {
                log::warn!("fetching message {} failed: {e}", index + 1);
                self.reply(Reply::err_code(
                    Code::SysTemp,
                    "Mail server failed to send the message, try again later",
                ))
            }
            // Part of the message is out: closing without the final "." tells the client
            // the message is incomplete, where an -ERR now would be read as message text.
            Err(FetchError::Backend(e)) => Err(End::BackendFailed(format!(
                "while sending message {}: {e}",
                index + 1
            ))),
        }
    }

    fn dele(&mut self, arg: &str) -> Flow {
        let index = match self.message(arg) {
            Ok(index) => index,
            Err(reply) => return self.reply(reply),
        };
        let (maildrop, deleted) = self.transaction();
        if let Err(why) = maildrop.check_delete() {
            log::error!("DELE refused: {why}");
            return self.reply(Reply::err_code(
                Code::SysPerm,
                format!("Cannot delete: {why}"),
            ));
        }
        deleted[index] = true;
        self.reply(Reply::ok("Marked to be deleted."))
    }

    fn rset(&mut self) -> Flow {
        let (_, deleted) = self.transaction();
        deleted.iter_mut().for_each(|d| *d = false);
        self.reply(Reply::ok(""))
    }

    // ---- UPDATE (RFC 1939 §6) ----

    fn quit(&mut self) -> Flow {
        let State::Transaction { maildrop, deleted } = &mut self.state else {
            self.reply(Reply::ok("Bye."))?;
            return Ok(());
        };
        let indexes: Vec<usize> = deleted
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.then_some(i))
            .collect();
        if indexes.is_empty() {
            return self.reply(Reply::ok("Bye."));
        }
        match maildrop.delete(&indexes) {
            Ok(Update::Applied) => {
                self.summary.deleted = indexes.len();
                self.reply(Reply::ok(format!(
                    "Bye, {} messages deleted.",
                    indexes.len()
                )))
            }
            Ok(Update::Kept) => self.reply(Reply::ok(format!(
                "Bye, {} messages kept on the server (delete policy keep).",
                indexes.len()
            ))),
            Err(e) => {
                log::error!("deleting {} messages at QUIT failed: {e}", indexes.len());
                self.reply(Reply::err_code(
                    Code::SysTemp,
                    "Some deleted messages were not removed",
                ))?;
                Err(End::UpdateFailed(e.to_string()))
            }
        }
    }
}

/// A command line for the debug log, without passwords or SASL data.
fn redacted(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut words = text.splitn(3, ' ');
    let keyword = words.next().unwrap_or("").to_ascii_uppercase();
    match keyword.as_str() {
        "PASS" => "PASS ********".into(),
        "AUTH" => match words.next() {
            Some(mechanism) if words.next().is_some() => format!("AUTH {mechanism} ********"),
            _ => text.escape_debug().to_string(),
        },
        _ => text.escape_debug().to_string(),
    }
}

#[cfg(test)]
pub(crate) fn redacted_for_tests(line: &[u8]) -> String {
    redacted(line)
}

/// USER and PASS arguments as text. Old clients send Latin-1 or CP1252 rather than UTF-8:
/// bytes that are not UTF-8 are read as Latin-1, the usual meaning of such a password,
/// rather than refusing the login without asking the server. (SASL PLAIN is UTF-8 by
/// definition, RFC 4616, and is decoded by `frontend::login` as in `smtp`.)
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

/// The TOP line count: digits only; a count beyond u64 means "all of it".
fn parse_line_count(arg: &str) -> Option<u64> {
    if arg.is_empty() || !arg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(arg.parse().unwrap_or(u64::MAX))
}

/// Writes a message to the client as the backend streams it.
struct ClientSink<'o, W> {
    output: &'o mut W,
    status: Vec<u8>,
    started: bool,
    encoder: Option<Encoder>,
    buffer: Vec<u8>,
    bytes: u64,
}

impl<W: Write> ClientSink<'_, W> {
    /// Sends the final line break and the terminating ".".
    fn finish(&mut self) -> Result<(), FetchError> {
        if !self.started {
            // A backend that produced no data still proved the message exists.
            self.start().map_err(FetchError::Client)?;
        }
        self.buffer.clear();
        if let Some(encoder) = self.encoder.take() {
            encoder.finish(&mut self.buffer);
        }
        self.output
            .write_all(&self.buffer)
            .map_err(FetchError::Client)?;
        self.bytes += self.buffer.len() as u64;
        Ok(())
    }
}

impl<W: Write> MessageSink for ClientSink<'_, W> {
    fn start(&mut self) -> io::Result<()> {
        self.started = true;
        self.output.write_all(&self.status)
    }

    fn data(&mut self, bytes: &[u8]) -> io::Result<bool> {
        let Some(encoder) = self.encoder.as_mut() else {
            return Ok(false);
        };
        self.buffer.clear();
        let more = encoder.feed(bytes, &mut self.buffer);
        self.output.write_all(&self.buffer)?;
        self.bytes += self.buffer.len() as u64;
        // Keep the buffer from holding on to an unusually large chunk's worth of memory
        // (a normal chunk's worth is reused from one chunk to the next).
        if self.buffer.capacity() > 4 << 20 {
            self.buffer = Vec::new();
        }
        Ok(more)
    }
}
