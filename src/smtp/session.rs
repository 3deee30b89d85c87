//! The SMTP server core: one session with one client, generic over `BufRead + Write`.
//!
//! RFC 5321 §3 (transactions), §4.1.1 (commands), §4.1.4 (order: HELO/EHLO first, though
//! like Postfix by default MAIL without it is accepted unless `require_helo`; EHLO and
//! RSET clear the transaction), §4.2 (reply codes), §4.5.3.1 (limits), §4.5.3.2 (timeouts);
//! RFC 2920 (pipelining: replies strictly in command order), RFC 1870 (SIZE), RFC 6152
//! (8BITMIME), RFC 2034 (enhanced status codes), RFC 4954 (AUTH).
//!
//! Each command is checked first (state, limits, policy), with the proxy's own reply when
//! it fails, and only then proceeds to the relay, whose reply is passed through. The relay
//! is asked for nothing until MAIL (or AUTH in passthrough mode), so a session that only
//! says EHLO/QUIT, as monitoring probes do, never touches the backend.

use super::auth::{AllowedSenders, ClientAuth};
use super::command::{self, AUTH_LINE_MAX, AuthStart, Command, Mechanism};
use super::data::DataDecoder;
use super::handler::{self, Handlers, Verdict};
use super::headers::{self, HeaderEdits, HeaderError};
use super::relay::{Relay, RelayError, Stage};
use super::reply::{Enhanced, Reply};
use super::spool::{HEAD_MAX, Spool};
use crate::client_tls::{NoTls, StartTls, login_allowed};
use crate::frontend::idle::{Idle, Tick};
use crate::frontend::login::{AfterFailure, FailedLogins, decode_plain};
use crate::lines::{LineBuffer, LineStatus};
use crate::smtp::queue::{Locked, NewMessage, QueueMode, StoreError, deliver};
use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Everything a session needs to know, fixed at startup.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our name in the greeting and EHLO reply.
    pub hostname: String,
    /// The client's address, for log lines.
    pub client: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub auth: ClientAuth,
    pub allowed_senders: AllowedSenders,
    /// Envelope sender used upstream instead of the client's.
    pub force_sender: Option<String>,
    /// Completes a sender without a domain (`MAIL FROM:<scanner>`) as `scanner@domain`.
    pub sender_domain: Option<String>,
    /// HELO/EHLO, with a name, before MAIL (Postfix's `smtpd_helo_required = yes`).
    /// Off by default, as in Postfix: devices skip HELO or send it bare.
    pub require_helo: bool,
    pub edits: HeaderEdits,
    /// RFC 5321 §4.5.3.2.7: at least 5 minutes without a command or data.
    pub idle_timeout: Duration,
    /// How long each `TimedOut` read error of the input stands for.
    pub tick: Duration,
    /// How often an open transaction's backend connection is kept alive with NOOP while
    /// the client is slow (scanners send pages as they scan them), below the backend's own
    /// idle limit (Postfix's smtpd_timeout: 300 s, 10 s under stress).
    pub keepalive: Duration,
    pub auth_failure_delay: Duration,
    pub max_auth_failures: u32,
    pub spool_dir: PathBuf,
    /// Bytes of a message kept in memory (the rest is spooled to a file).
    pub head_max: usize,
    /// Programs run on each complete message before it is relayed.
    pub handlers: Handlers,
    /// `--queue-dir`: store-and-forward. The final dot is answered `250` once the message
    /// is durable in the queue; a backend that is down or defers at MAIL, RCPT or DATA no
    /// longer gets the client a `4yz`.
    pub queue: Option<QueueMode>,
}

impl Config {
    /// Defaults matching the command line's, for tests and embedding.
    pub fn new(hostname: &str) -> Self {
        Config {
            hostname: hostname.to_string(),
            client: "local".into(),
            max_message_size: 35 * 1024 * 1024,
            max_recipients: 100,
            auth: ClientAuth::None,
            allowed_senders: AllowedSenders::default(),
            force_sender: None,
            sender_domain: None,
            require_helo: false,
            edits: HeaderEdits {
                id_domain: hostname.to_string(),
                ..HeaderEdits::default()
            },
            idle_timeout: Duration::from_secs(300),
            tick: Duration::from_secs(1),
            keepalive: Duration::from_secs(60),
            auth_failure_delay: Duration::from_secs(2),
            max_auth_failures: 3,
            spool_dir: std::env::temp_dir(),
            head_max: HEAD_MAX,
            handlers: Handlers {
                timeout: Duration::from_secs(60),
                ..Handlers::default()
            },
            queue: None,
        }
    }
}

/// Errors tolerated before the session is closed, like Postfix's smtpd_hard_error_limit:
/// unknown or misplaced commands, refused senders and recipients. A confused or hostile
/// peer can then neither keep a process busy forever nor probe recipients through the
/// proxy's account without end. Delivering a message starts the count again.
const MAX_ERRORS: u32 = 20;

/// NOOP, RSET, VRFY, HELP and EXPN tolerated before each further one counts as an error,
/// like Postfix's smtpd_junk_command_limit. Delivering a message starts the count again.
const MAX_JUNK_COMMANDS: u32 = 100;

/// Where the session is, RFC 5321 §3.3 and §4.1.4.
#[derive(Debug)]
enum State {
    /// Greeting sent; no HELO/EHLO yet.
    Fresh,
    /// Greeted, no transaction.
    Ready,
    /// MAIL accepted by the backend.
    Mail(Transaction),
}

#[derive(Debug)]
struct Transaction {
    /// The reverse-path the client gave (before --force-sender), for logs.
    from: String,
    /// The reverse-path sent upstream (after --force-sender), kept for the queue.
    upstream_from: String,
    /// Accepted recipients (by the backend, or in queue mode by the proxy for the queue).
    to: Vec<String>,
    accepted: usize,
    /// Recipients the backend refused with 4yz (the client may try them again).
    deferred: usize,
    /// Recipients the backend refused with 5yz.
    refused: usize,
    /// The backend connection died mid-transaction; DATA is refused at once.
    broken: bool,
    /// Queue mode only: the backend could not take part (down, deferring, lost), so the
    /// proxy accepts for the queue, and `queue run` delivers. The reason, for the envelope.
    offline: Option<String>,
}

impl Transaction {
    fn new(from: String, upstream_from: String) -> Self {
        Transaction {
            from,
            upstream_from,
            to: Vec::new(),
            accepted: 0,
            deferred: 0,
            refused: 0,
            broken: false,
            offline: None,
        }
    }
}

/// How a message ended, for its log line and the session's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The backend accepted it.
    Sent,
    /// Stored durably in the queue (queue mode), to be delivered from there.
    Queued,
    /// Refused for now (4yz): the client keeps it and retries.
    Deferred,
    /// Refused for good (5yz), by the backend or by the proxy's own limits.
    Refused,
    /// The client left before its final dot.
    Aborted,
}

impl Outcome {
    fn of(reply: &Reply) -> Outcome {
        if reply.is_positive() {
            Outcome::Sent
        } else if reply.is_transient() {
            Outcome::Deferred
        } else {
            Outcome::Refused
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Queued => "queued",
            Outcome::Deferred => "deferred",
            Outcome::Refused => "refused",
            Outcome::Aborted => "aborted",
        }
    }
}

/// Whether the session goes on after a command.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Close(&'static str),
}

/// What reading a line gave.
enum Input {
    Line,
    TooLong,
    End(&'static str),
}

/// Counts for the session's closing log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub messages: u32,
    pub sent: u32,
    pub failed: u32,
    /// The session broke off (the client's connection or TLS failed) rather than ran its
    /// course: the process's exit status says so (`frontend::Ending`).
    pub broken: bool,
}

/// The ends of a session that broke off.
const CLIENT_WRITE_FAILED: &str = "client write failed";
const CLIENT_READ_FAILED: &str = "client read failed";
const CLIENT_READ_FAILED_IN_DATA: &str = "client read failed during DATA";
const TLS_FAILED: &str = "TLS handshake failed";

pub struct Session<'a, R: BufRead, W: Write> {
    input: R,
    output: W,
    relay: &'a mut dyn Relay,
    config: &'a Config,
    tls: Box<dyn StartTls + 'a>,
    lines: LineBuffer,
    state: State,
    helo: String,
    user: Option<String>,
    /// The client's silence, and the backend's in the open transaction.
    idle: Idle,
    errors: u32,
    junk_commands: u32,
    failed_logins: FailedLogins,
    spool: Option<Spool>,
    stats: Stats,
    /// Runs once the client has had its last reply, before the backend is left.
    client_done: Option<Box<dyn FnOnce() + 'a>>,
    /// Says whether the client has closed its side of the connection.
    client_closed: Box<dyn FnMut() -> bool + 'a>,
}

impl<'a, R: BufRead, W: Write> Session<'a, R, W> {
    pub fn new(input: R, output: W, relay: &'a mut dyn Relay, config: &'a Config) -> Self {
        Session {
            input,
            output,
            relay,
            config,
            tls: Box::new(NoTls),
            lines: LineBuffer::new(AUTH_LINE_MAX),
            state: State::Fresh,
            helo: String::new(),
            user: None,
            idle: Idle::new(config.tick, config.idle_timeout, config.keepalive),
            errors: 0,
            junk_commands: 0,
            failed_logins: FailedLogins::new(config.auth_failure_delay, config.max_auth_failures),
            spool: None,
            stats: Stats::default(),
            client_done: None,
            client_closed: Box::new(|| false),
        }
    }

    /// Offers STARTTLS (or, after implicit TLS, knows the connection is encrypted) through
    /// the front end's client TLS.
    pub fn with_tls(mut self, tls: impl StartTls + 'a) -> Self {
        self.tls = Box::new(tls);
        self
    }

    /// `f` runs when the client has had its last reply (221 or 421), before the QUIT to
    /// the backend: `serve` closes the client's side there, so the client does not wait
    /// on the backend's answer to QUIT.
    pub fn on_client_done(mut self, f: impl FnOnce() + 'a) -> Self {
        self.client_done = Some(Box::new(f));
        self
    }

    /// `f` tells whether the client has closed its side of the connection; asked when the
    /// backend has answered a message, so that the log says when the client may never see
    /// that answer. Without it the client is taken to be there.
    pub fn client_closed_check(mut self, f: impl FnMut() -> bool + 'a) -> Self {
        self.client_closed = Box::new(f);
        self
    }

    /// Serves the client until QUIT, end of input, timeout or a write error.
    pub fn run(mut self) -> Stats {
        let started = std::time::Instant::now();
        let greeting = Reply::plain(220, format!("{} ESMTP ready", self.config.hostname));
        let reason = match self.send(&greeting) {
            Ok(()) => self.serve(),
            Err(_) => CLIENT_WRITE_FAILED,
        };
        if let Some(done) = self.client_done.take() {
            done();
        }
        // QUIT also ends an open transaction (RFC 5321 §4.1.1.10): no RSET first.
        self.relay.quit();
        log::info!(
            "smtp session end: client={} helo={} user={} messages={} sent={} failed={} end={} seconds={}",
            self.config.client,
            if self.helo.is_empty() {
                "-"
            } else {
                &self.helo
            },
            self.user.as_deref().unwrap_or("-"),
            self.stats.messages,
            self.stats.sent,
            self.stats.failed,
            reason,
            started.elapsed().as_secs()
        );
        self.stats.broken = [
            CLIENT_WRITE_FAILED,
            CLIENT_READ_FAILED,
            CLIENT_READ_FAILED_IN_DATA,
            TLS_FAILED,
        ]
        .contains(&reason);
        self.stats
    }

    fn serve(&mut self) -> &'static str {
        loop {
            let flow = match self.read_line() {
                Input::End(reason) => return reason,
                Input::TooLong => self.bad(&command::ParseError::LineTooLong.reply()),
                Input::Line => match command::parse(self.lines.line()) {
                    Ok(cmd) => self.dispatch(cmd),
                    Err(e) => self.bad(&e.reply()),
                },
            };
            match flow {
                Ok(Flow::Continue) => {}
                Ok(Flow::Close(reason)) => return reason,
                Err(_) => return "client write failed",
            }
        }
    }

    fn dispatch(&mut self, cmd: Command) -> io::Result<Flow> {
        match cmd {
            Command::Ehlo(name) => self.hello(name, true),
            Command::Helo(name) => self.hello(name, false),
            Command::Mail(mail) => self.mail(mail),
            Command::Rcpt(rcpt) => self.rcpt(&rcpt.address),
            Command::Data => self.data(),
            Command::Rset => {
                self.end_transaction();
                self.junk(Reply::new(250, Enhanced::new(2, 0, 0), "Ok"))
            }
            Command::Noop => self.junk(Reply::new(250, Enhanced::new(2, 0, 0), "Ok")),
            Command::Quit => {
                self.send(&Reply::new(221, Enhanced::new(2, 0, 0), "Bye"))?;
                Ok(Flow::Close("quit"))
            }
            // RFC 5321 §3.5.3: 252 when the server will not verify but will try to deliver.
            Command::Vrfy => self.junk(Reply::new(
                252,
                Enhanced::new(2, 5, 0),
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => self.junk(Reply::new(
                502,
                Enhanced::new(5, 5, 1),
                "EXPN not available",
            )),
            Command::Help => {
                let mut verbs = "EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP".to_string();
                if self.config.auth.enabled() {
                    verbs.push_str(" AUTH");
                }
                self.junk(Reply::new(
                    214,
                    Enhanced::new(2, 0, 0),
                    format!("Commands: {verbs}"),
                ))
            }
            Command::Auth(start) => self.auth(start),
            Command::StartTls => self.starttls(),
            Command::NotImplemented(verb) => self.bad(&Reply::new(
                502,
                Enhanced::new(5, 5, 1),
                format!("{verb} not implemented"),
            )),
        }
    }

    // ---- HELO / EHLO -------------------------------------------------------------------

    fn hello(&mut self, name: String, extended: bool) -> io::Result<Flow> {
        if name.is_empty() && self.config.require_helo {
            // Postfix's answer to a bare HELO; with --require-helo MAIL then gets 503.
            let verb = if extended { "EHLO" } else { "HELO" };
            return self.bad(&Reply::new(
                501,
                Enhanced::new(5, 5, 4),
                format!("Syntax: {verb} hostname"),
            ));
        }
        // RFC 5321 §4.1.4: EHLO/HELO in a transaction aborts it, like RSET.
        self.end_transaction();
        self.state = State::Ready;
        self.helo = name;
        let host = &self.config.hostname;
        if !extended {
            return self.ok(Reply::plain(250, host.clone()));
        }
        // Only extensions the relay honours: no DSN, CHUNKING or SMTPUTF8 (the session
        // passes none of them on). STARTTLS when client TLS is configured and not on.
        let greets = match self.helo.as_str() {
            "" => host.clone(),
            helo => format!("{host} greets {helo}"),
        };
        let mut lines = vec![
            greets,
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.tls.offered() {
            lines.push("STARTTLS".to_string());
        }
        // Like Postfix's smtpd_tls_auth_only: no AUTH offered where it would be refused.
        if self.config.auth.enabled() && login_allowed(self.tls.as_ref()) {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        self.ok(Reply::multi(250, lines))
    }

    // ---- STARTTLS (RFC 3207) -----------------------------------------------------------

    /// RFC 3207 §4: `220`, then the handshake. Whatever the client pipelined after
    /// STARTTLS is thrown away by the front end; afterwards the session starts over as if
    /// just connected (§4.2: no HELO, no AUTH carried over; the client sends EHLO again).
    fn starttls(&mut self) -> io::Result<Flow> {
        if self.tls.active() {
            return self.bad(&Reply::new(
                503,
                Enhanced::new(5, 5, 1),
                "TLS already active",
            ));
        }
        if !self.tls.offered() {
            return self.bad(&Reply::new(
                502,
                Enhanced::new(5, 5, 1),
                "STARTTLS not implemented",
            ));
        }
        if let State::Mail(_) = self.state {
            return self.bad(&need("STARTTLS not allowed during a mail transaction"));
        }
        self.send(&Reply::new(
            220,
            Enhanced::new(2, 0, 0),
            "Ready to start TLS",
        ))?;
        if self.tls.start().is_err() {
            return Ok(Flow::Close(TLS_FAILED));
        }
        self.state = State::Fresh;
        self.helo.clear();
        self.user = None;
        self.lines = LineBuffer::new(AUTH_LINE_MAX);
        self.idle.client_active();
        Ok(Flow::Continue)
    }

    /// RFC 3207 §4: with TLS required, only NOOP, EHLO, STARTTLS and QUIT before it.
    fn tls_needed(&mut self) -> Option<io::Result<Flow>> {
        if login_allowed(self.tls.as_ref()) {
            return None;
        }
        Some(self.bad(&Reply::new(
            530,
            Enhanced::new(5, 7, 0),
            "Must issue a STARTTLS command first",
        )))
    }

    // ---- MAIL --------------------------------------------------------------------------

    fn mail(&mut self, mut mail: command::MailFrom) -> io::Result<Flow> {
        if let Some(refused) = self.tls_needed() {
            return refused;
        }
        match self.state {
            // Postfix's default (smtpd_helo_required = no): scanners skip HELO.
            State::Fresh if self.config.require_helo => {
                return self.bad(&need("Send HELO/EHLO first"));
            }
            State::Mail(_) => return self.bad(&need("Nested MAIL command")),
            State::Fresh | State::Ready => {}
        }
        if self.config.auth.enabled() && self.user.is_none() {
            return self.ok(Reply::new(
                530,
                Enhanced::new(5, 7, 0),
                "Authentication required",
            ));
        }
        if mail.size.is_some_and(|s| s > self.config.max_message_size) {
            return self.ok(too_big());
        }
        if !mail.address.is_empty() && !mail.address.contains('@') {
            match (&self.config.sender_domain, &self.config.force_sender) {
                (Some(domain), _) => mail.address = format!("{}@{domain}", mail.address),
                // Replaced upstream anyway; the bare name is kept for the logs.
                (None, Some(_)) => {}
                (None, None) => {
                    log::warn!(
                        "smtp: client={} sender <{}> has no domain: set --sender-domain to \
                         complete it, or --force-sender to replace it",
                        self.config.client,
                        mail.address
                    );
                    return self.bad(&Reply::new(
                        501,
                        Enhanced::new(5, 1, 3),
                        format!(
                            "<{}>: sender needs a domain; the gateway's admin can set \
                             --sender-domain or --force-sender",
                            mail.address
                        ),
                    ));
                }
            }
        }
        if !self.config.allowed_senders.allows(&mail.address) {
            log::warn!(
                "smtp: client={} sender <{}> refused: not in --allowed-senders",
                self.config.client,
                mail.address
            );
            return self.bad(&Reply::new(
                550,
                Enhanced::new(5, 7, 1),
                format!("Sender address <{}> not allowed", mail.address),
            ));
        }
        let upstream = self
            .config
            .force_sender
            .clone()
            .unwrap_or_else(|| mail.address.clone());
        self.idle.backend_used();
        let result = self.relay.mail(&upstream);
        let queueing = self.config.queue.is_some();
        match result {
            Ok(reply) if reply.is_positive() => {
                self.state = State::Mail(Transaction::new(mail.address, upstream));
                self.ok(reply.relayed())
            }
            Ok(reply) if queueing && reply.is_transient() => {
                self.accept_offline(mail.address, upstream, reply.summary())
            }
            Ok(reply) => self.bad(&reply.relayed()),
            Err(e) if queueing => {
                // Logged as in relay mode; the client's reply is the queue's.
                let _ = self.relay_failure(&e, Stage::Mail);
                self.accept_offline(mail.address, upstream, e.to_string())
            }
            Err(e) => {
                let reply = self.relay_failure(&e, Stage::Mail);
                self.ok(reply)
            }
        }
    }

    // ---- RCPT --------------------------------------------------------------------------

    fn rcpt(&mut self, to: &str) -> io::Result<Flow> {
        let State::Mail(tx) = &mut self.state else {
            return self.bad(&need("Need MAIL command"));
        };
        if tx.accepted >= self.config.max_recipients {
            // RFC 5321 §4.5.3.1.10: 452, and the client sends the rest in a new transaction.
            return self.ok(Reply::new(
                452,
                Enhanced::new(4, 5, 3),
                "Too many recipients",
            ));
        }
        if tx.broken {
            return self.ok(lost_backend());
        }
        if tx.offline.is_some() {
            return self.queue_recipient(to);
        }
        self.idle.backend_used();
        let queueing = self.config.queue.is_some();
        match self.relay.rcpt(to) {
            Ok(reply) if reply.is_positive() => {
                tx.accepted += 1;
                tx.to.push(to.to_string());
                self.ok(reply.relayed())
            }
            Ok(reply) if queueing && reply.is_transient() => {
                tx.offline = Some(reply.summary());
                self.queue_recipient(to)
            }
            Err(e) if queueing => {
                tx.offline = Some(e.to_string());
                let _ = self.relay_failure(&e, Stage::Rcpt);
                self.queue_recipient(to)
            }
            Ok(reply) => {
                if reply.code == 421 {
                    // The backend closed the connection (RFC 5321 §3.8): the transaction
                    // is gone, so DATA is refused at once instead of after the upload.
                    tx.broken = true;
                }
                if reply.is_transient() {
                    tx.deferred += 1;
                } else {
                    tx.refused += 1;
                }
                self.bad(&reply.relayed())
            }
            Err(e) => {
                tx.broken = true;
                let reply = self.relay_failure(&e, Stage::Rcpt);
                self.ok(reply)
            }
        }
    }

    // ---- DATA --------------------------------------------------------------------------

    fn data(&mut self) -> io::Result<Flow> {
        let State::Mail(tx) = &self.state else {
            return self.bad(&need("Need MAIL command"));
        };
        if tx.accepted == 0 {
            // RFC 5321 §3.3: 554 when every RCPT was refused, 503 when none was given. When
            // some were only refused for now, 451 lets the client try again later.
            let reply = if tx.deferred > 0 {
                Reply::new(
                    451,
                    Enhanced::new(4, 5, 0),
                    "No recipient accepted yet; try again later",
                )
            } else if tx.refused > 0 {
                Reply::new(554, Enhanced::new(5, 5, 1), "No valid recipients")
            } else {
                need("Need RCPT command")
            };
            return self.bad(&reply);
        }
        if tx.broken {
            self.end_transaction();
            return self.ok(lost_backend());
        }
        if let Some(refusal) = self.relay.refusal_before_data() {
            // A recipient the client was told was fine has been refused since
            // (`--recipient-check with-message`): the message would go to no one, so the
            // client is stopped before it sends it, and no handler runs.
            log::info!(
                "smtp: client={} DATA refused, the backend refused a recipient answered 250: {}",
                self.config.client,
                refusal.summary()
            );
            self.end_transaction();
            return self.bad(&refusal.relayed());
        }
        let mut spool = self.spool.take().unwrap_or_else(|| {
            Spool::with_head_max(
                &self.config.spool_dir,
                self.config.max_message_size,
                self.config.head_max,
            )
        });
        spool.clear();
        self.send(&Reply::plain(354, "End data with <CR><LF>.<CR><LF>"))?;
        if let Err(reason) = self.receive(&mut spool) {
            // The client is gone mid-message: nothing was sent upstream, so nothing is lost
            // beyond what the client knows it did not finish.
            self.log_message(&spool, Outcome::Aborted, reason);
            return Ok(Flow::Close(reason));
        }
        let (reply, queued) = self.relay_message(&mut spool);
        if (self.client_closed)() {
            self.log_fate_unseen(&reply);
        }
        self.spool = Some(spool);
        let live = matches!(&self.state, State::Mail(tx) if tx.offline.is_none());
        // RFC 5321 §4.1.1.4: after the reply to the final dot the transaction is over.
        self.state = State::Ready;
        if reply.is_positive() {
            self.errors = 0;
            self.junk_commands = 0;
        }
        let flow = self.ok(reply);
        if let Some(locked) = queued {
            self.deliver_queued(locked, live);
        }
        flow
    }

    /// Reads the message up to its final dot into `spool`, with idle ticks.
    fn receive(&mut self, spool: &mut Spool) -> Result<(), &'static str> {
        let mut decoder = DataDecoder::new();
        let mut out = Vec::with_capacity(16 * 1024);
        loop {
            let chunk = match self.input.fill_buf() {
                Ok([]) => return Err("client closed during DATA"),
                Ok(chunk) => chunk,
                Err(e) if is_tick(&e) => {
                    if !self.tick() {
                        let _ = self.send(&timeout_reply(&self.config.hostname));
                        return Err("timeout during DATA");
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(CLIENT_READ_FAILED_IN_DATA),
            };
            self.idle.client_active();
            out.clear();
            let used = decoder.decode(chunk, &mut out);
            self.input.consume(used);
            spool.write(&out);
            if decoder.is_done() {
                return Ok(());
            }
        }
    }

    /// Decides the reply to the final dot: the proxy's own refusal, or the backend's answer;
    /// in queue mode the queue's, with the stored message still locked for its delivery.
    fn relay_message(&mut self, spool: &mut Spool) -> (Reply, Option<Locked>) {
        let mut queued = None;
        let reply = self.relay_or_queue(spool, &mut queued);
        (reply, queued)
    }

    fn relay_or_queue(&mut self, spool: &mut Spool, queued: &mut Option<Locked>) -> Reply {
        if let State::Mail(tx) = &self.state
            && tx.broken
        {
            // The backend connection was lost while the client was sending.
            self.relay.reset();
            let reply = lost_backend();
            self.log_message(spool, Outcome::Deferred, &reply.summary());
            return reply;
        }
        if let Some(e) = spool.take_error() {
            log::error!(
                "smtp: client={} cannot spool message: {e}",
                self.config.client
            );
            self.relay.reset();
            let reply = local_error();
            self.log_message(spool, Outcome::Deferred, &reply.summary());
            return reply;
        }
        if spool.oversized() {
            self.relay.reset();
            let reply = too_big();
            self.log_message(spool, Outcome::Refused, &reply.summary());
            return reply;
        }
        if let Some(reply) = self.run_handlers(spool) {
            self.relay.reset();
            self.log_message(spool, Outcome::of(&reply), &reply.summary());
            return reply;
        }
        let account_edits = self.relay.header_edits(&self.config.edits);
        let edited = headers::edit(
            spool.head(),
            spool.complete_in_head(),
            account_edits.as_ref().unwrap_or(&self.config.edits),
            SystemTime::now(),
        );
        let (head, changes) = match edited {
            Ok(ok) => ok,
            Err(HeaderError::TooLarge) => {
                self.relay.reset();
                let reply = Reply::new(552, Enhanced::new(5, 3, 4), "Header block too large");
                self.log_message(spool, Outcome::Refused, &reply.summary());
                return reply;
            }
        };
        if !changes.is_empty() {
            log::debug!(
                "smtp: client={} header edits: {}",
                self.config.client,
                changes.join(",")
            );
        }
        let result = match spool.tail() {
            Ok((tail, tail_len)) => {
                let len = head.len() as u64 + tail_len;
                let mut message = io::Cursor::new(head).chain(tail);
                if self.config.queue.is_some() {
                    // Instead of relaying now: the message goes to the queue first.
                    let (reply, locked) = self.queue_message(&mut message, len);
                    *queued = locked;
                    Ok(reply)
                } else {
                    self.relay.data(&mut message, len)
                }
            }
            Err(e) => Err(RelayError::Local(format!("cannot read the spool: {e}"))),
        };
        let reply = match result {
            Ok(reply) if self.config.queue.is_some() => {
                let outcome = match queued {
                    Some(_) => Outcome::Queued,
                    None => Outcome::Deferred,
                };
                self.log_message(spool, outcome, &reply.summary());
                return reply;
            }
            Ok(reply) => reply.relayed(),
            Err(e) => self.relay_failure(&e, Stage::EndOfData),
        };
        self.log_message(spool, Outcome::of(&reply), &reply.summary());
        reply
    }

    /// Runs the message handlers (`handler.rs`) in order on the complete message. `Some`
    /// is the reply that ends the transaction here (discarded, refused, handler failed);
    /// `None` goes on, with `spool` replaced by a handler's output if one wrote any.
    fn run_handlers(&mut self, spool: &mut Spool) -> Option<Reply> {
        let account = self.relay.account();
        let programs = self.config.handlers.for_account(account);
        let State::Mail(tx) = &self.state else {
            return None;
        };
        if programs.is_empty() {
            return None;
        }
        let envelope = handler::Envelope {
            sender: &tx.from,
            recipients: &tx.to,
            account,
            client: &self.config.client,
            helo: &self.helo,
            user: self.user.as_deref(),
        };
        let client = &self.config.client;
        let mut output = Spool::with_head_max(
            &self.config.spool_dir,
            self.config.max_message_size,
            self.config.head_max,
        );
        for program in &programs {
            let name = program.display();
            let verdict = handler::run(
                program,
                &envelope,
                self.config.handlers.timeout,
                spool,
                &mut output,
            );
            match verdict {
                Ok(Verdict::Continue { replaced: false }) => {}
                Ok(Verdict::Continue { replaced: true }) => {
                    if output.oversized() {
                        log::warn!(
                            "smtp: client={client} handler {name} made the message {} bytes, \
                             over --max-message-size",
                            output.size()
                        );
                        return Some(too_big());
                    }
                    log::info!(
                        "smtp: client={client} handler {name} replaced the message ({} -> {} bytes)",
                        spool.size(),
                        output.size()
                    );
                    std::mem::swap(spool, &mut output);
                }
                Ok(Verdict::Discard) => {
                    log::info!("smtp: client={client} handler {name} discarded the message");
                    return Some(Reply::new(
                        250,
                        Enhanced::new(2, 0, 0),
                        "Ok: accepted and discarded by a message handler",
                    ));
                }
                Ok(Verdict::Refuse(reply)) => {
                    log::info!(
                        "smtp: client={client} handler {name} refused the message: {}",
                        reply.summary()
                    );
                    return Some(reply);
                }
                Err(handler::Failure(why)) => {
                    log::error!("smtp: client={client} handler failed: {why}");
                    return Some(local_error());
                }
            }
        }
        None
    }

    /// Queue mode: a transient backend failure at MAIL does not reach the client; the
    /// transaction goes on without the backend, for the queue.
    fn accept_offline(&mut self, from: String, upstream: String, why: String) -> io::Result<Flow> {
        log::warn!(
            "smtp: client={} backend cannot take <{from}> now ({why}): accepting for the queue",
            self.config.client
        );
        self.relay.reset();
        let mut tx = Transaction::new(from, upstream);
        tx.offline = Some(why);
        self.state = State::Mail(tx);
        self.ok(Reply::new(250, Enhanced::new(2, 1, 0), "Ok"))
    }

    /// Queue mode: a recipient accepted by the proxy for the queue (the backend is not
    /// part of this transaction any more, or deferred this recipient).
    fn queue_recipient(&mut self, to: &str) -> io::Result<Flow> {
        let State::Mail(tx) = &mut self.state else {
            return self.bad(&need("Need MAIL command"));
        };
        tx.accepted += 1;
        tx.to.push(to.to_string());
        self.ok(Reply::new(250, Enhanced::new(2, 1, 5), "Ok"))
    }

    /// Stores the complete message in the queue. `250` naming the queue id only once it is
    /// durable; `452 4.3.1` when the queue or the disk is full, `451 4.3.0` when the queue
    /// cannot be written. The backend's half-open transaction is kept for the immediate
    /// delivery, or dropped when the message is not queued.
    fn queue_message(&mut self, message: &mut dyn Read, len: u64) -> (Reply, Option<Locked>) {
        let (Some(mode), State::Mail(tx)) = (&self.config.queue, &self.state) else {
            return (local_error(), None);
        };
        let new = NewMessage {
            from: tx.upstream_from.clone(),
            to: tx.to.clone(),
            account: self.relay.account().map(str::to_string),
            client: self.config.client.clone(),
            last_error: tx.offline.clone(),
        };
        match mode.queue.store(new, message, len) {
            Ok(locked) => {
                let e = &locked.envelope;
                log::info!(
                    "queue {}: queued client={} from=<{}> to={} size={} account={}",
                    e.id,
                    e.client,
                    e.from,
                    e.to.iter()
                        .map(|t| format!("<{t}>"))
                        .collect::<Vec<_>>()
                        .join(","),
                    e.size,
                    e.account.as_deref().unwrap_or("-")
                );
                let reply = Reply::new(
                    250,
                    Enhanced::new(2, 0, 0),
                    format!("Ok: queued as {}", e.id),
                );
                (reply, Some(locked))
            }
            Err(e) => {
                self.relay.reset();
                let reply = match &e {
                    StoreError::Full { .. } | StoreError::NoSpace(_) => Reply::new(
                        452,
                        Enhanced::new(4, 3, 1),
                        "Insufficient system storage: mail queue full; try again later",
                    ),
                    StoreError::Io(_) => Reply::new(
                        451,
                        Enhanced::new(4, 3, 0),
                        "Local error: cannot queue the message; try again later",
                    ),
                };
                log::error!(
                    "smtp: client={} message not queued in {}: {e}",
                    self.config.client,
                    mode.queue.dir.display()
                );
                (reply, None)
            }
        }
    }

    /// Delivers a just-queued message at once, after its client had its `250` (the client
    /// may hang up meanwhile). When the backend took part in the whole transaction only
    /// DATA is left; otherwise (it was down or deferring moments ago) the message is left
    /// for `queue run` rather than kept waiting on a second failure here.
    fn deliver_queued(&mut self, locked: Locked, live: bool) {
        let Some(mode) = &self.config.queue else {
            return;
        };
        if !live {
            self.relay.reset();
            log::info!(
                "queue {}: the backend was not available during the session; left for \
                 queue run",
                locked.id()
            );
            return;
        }
        let id = locked.id().to_string();
        if let Err(e) = deliver::attempt(&mode.queue, self.relay, locked, &mode.policy, true) {
            log::error!("queue {id}: {e}");
        }
    }

    /// Says what became of a message whose client closed the connection while the backend
    /// had it (a device that gave up waiting: its socket is in CLOSE-WAIT here). The reply
    /// is still sent, for a client that only half-closed, but it may never be read.
    fn log_fate_unseen(&self, reply: &Reply) {
        let fate = if reply.is_positive() {
            "the backend accepted it; the client may not know, and may send it again"
        } else if reply.is_transient() {
            "the backend deferred it; the client may never learn of it"
        } else {
            "the backend refused it; the client may never learn of it"
        };
        log::warn!(
            "smtp: client={} gone before the reply to its message: {fate}: {}",
            self.config.client,
            reply.summary()
        );
    }

    /// The one log line per message (the session line is in `run`).
    fn log_message(&mut self, spool: &Spool, outcome: Outcome, reply: &str) {
        let State::Mail(tx) = &self.state else {
            return;
        };
        self.stats.messages += 1;
        if matches!(outcome, Outcome::Sent | Outcome::Queued) {
            self.stats.sent += 1;
        } else {
            self.stats.failed += 1;
        }
        let account = match self.relay.account() {
            Some(name) => format!(" account=[{name}]"),
            None => String::new(),
        };
        let line = format!(
            "smtp message: client={} from=<{}>{account} rcpts={} size={} result={} reply=\"{}\"",
            self.config.client,
            tx.from,
            tx.accepted,
            spool.size(),
            outcome.as_str(),
            reply.replace('"', "'")
        );
        if matches!(outcome, Outcome::Sent | Outcome::Queued) {
            log::info!("{line}");
        } else {
            log::warn!("{line}");
        }
    }

    // ---- AUTH --------------------------------------------------------------------------

    fn auth(&mut self, start: AuthStart) -> io::Result<Flow> {
        if let Some(refused) = self.tls_needed() {
            return refused;
        }
        if !self.config.auth.enabled() {
            return self.bad(&need("Authentication not enabled"));
        }
        match self.state {
            State::Fresh => return self.bad(&need("Send EHLO first")),
            State::Mail(_) => return self.bad(&need("AUTH not allowed during a mail transaction")),
            State::Ready => {}
        }
        if self.user.is_some() {
            return self.bad(&need("Already authenticated"));
        }
        let mechanism = match &start.mechanism {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::Other(_) => {
                return self.bad(&Reply::new(
                    504,
                    Enhanced::new(5, 5, 4),
                    "Unrecognized authentication type",
                ));
            }
        };
        let credentials = match start.mechanism {
            Mechanism::Plain => match self.sasl_step(start.initial, "")? {
                Err(flow) => return Ok(flow),
                Ok(message) => decode_plain(&message).ok(),
            },
            _ => {
                let user = match self.sasl_step(start.initial, "VXNlcm5hbWU6")? {
                    Err(flow) => return Ok(flow),
                    Ok(user) => user,
                };
                let password = match self.sasl_step(None, "UGFzc3dvcmQ6")? {
                    Err(flow) => return Ok(flow),
                    Ok(password) => password,
                };
                String::from_utf8(user)
                    .ok()
                    .zip(String::from_utf8(password).ok())
            }
        };
        let Some((user, password)) = credentials else {
            return self.auth_failed(
                mechanism,
                Reply::new(
                    535,
                    Enhanced::new(5, 7, 8),
                    "Authentication credentials invalid",
                ),
            );
        };
        let reply = match &self.config.auth {
            ClientAuth::Passthrough => match self.relay.login(&user, &password) {
                Ok(reply) => reply.relayed(),
                Err(e) => {
                    log::warn!("smtp: client={} AUTH {mechanism}: {e}", self.config.client);
                    // Not a failed login (no password was judged), but each attempt costs
                    // a backend connection: an error, so that it cannot go on forever.
                    return self.bad(&Reply::new(
                        454,
                        Enhanced::new(4, 7, 0),
                        "Temporary authentication failure",
                    ));
                }
            },
            auth => {
                if auth.check_local(&user, &password) {
                    Reply::new(235, Enhanced::new(2, 7, 0), "Authentication successful")
                } else {
                    Reply::new(
                        535,
                        Enhanced::new(5, 7, 8),
                        "Authentication credentials invalid",
                    )
                }
            }
        };
        if reply.code == 235 {
            log::info!(
                "smtp: client={} authenticated as {user} (AUTH {mechanism})",
                self.config.client
            );
            if !matches!(self.config.auth, ClientAuth::Passthrough) {
                self.relay.authenticated(&user);
            }
            self.user = Some(user);
            return self.ok(reply);
        }
        if reply.is_transient() {
            return self.ok(reply);
        }
        self.auth_failed(mechanism, reply)
    }

    /// One SASL round: the initial response if the client gave one, else a `334` challenge
    /// and the client's line. `Err(flow)` when the exchange ended (cancelled, bad base64,
    /// client gone); the reply has been sent.
    fn sasl_step(
        &mut self,
        initial: Option<String>,
        challenge: &str,
    ) -> io::Result<Result<Vec<u8>, Flow>> {
        let encoded = match initial {
            Some(text) => text.into_bytes(),
            None => {
                self.send(&Reply::plain(334, challenge))?;
                match self.read_line() {
                    Input::Line => self.lines.line().to_vec(),
                    Input::TooLong => {
                        return self.bad(&command::ParseError::LineTooLong.reply()).map(Err);
                    }
                    Input::End(reason) => return Ok(Err(Flow::Close(reason))),
                }
            }
        };
        if encoded == b"*" {
            // RFC 4954 §4: the client cancelled; 501. Counted as an error, like bad base64,
            // or a client could repeat it until the idle timeout.
            return self
                .bad(&Reply::new(
                    501,
                    Enhanced::new(5, 0, 0),
                    "Authentication cancelled",
                ))
                .map(Err);
        }
        // RFC 4954 §4: `=` is an empty initial response.
        let decoded = if encoded == b"=" {
            Some(Vec::new())
        } else {
            crate::base64::decode(&encoded)
        };
        match decoded {
            Some(bytes) => Ok(Ok(bytes)),
            None => self
                .bad(&Reply::new(
                    501,
                    Enhanced::new(5, 5, 2),
                    "Invalid base64 data",
                ))
                .map(Err),
        }
    }

    fn auth_failed(&mut self, mechanism: &str, reply: Reply) -> io::Result<Flow> {
        let after = self.failed_logins.record();
        // The user name is left out on purpose: people type passwords into it.
        log::warn!(
            "smtp: client={} AUTH {mechanism} failed ({} of {}): {}",
            self.config.client,
            self.failed_logins.count(),
            self.failed_logins.max(),
            reply.summary()
        );
        self.send(&reply)?;
        if after == AfterFailure::Close {
            return self.close(
                "Too many failed authentications",
                "too many failed authentications",
            );
        }
        Ok(Flow::Continue)
    }

    // ---- helpers -----------------------------------------------------------------------

    /// Leaves any transaction, here and at the backend.
    fn end_transaction(&mut self) {
        if let State::Mail(_) = self.state {
            self.relay.reset();
            self.state = State::Ready;
        }
    }

    /// The reply and log line for a relay failure that has no backend reply.
    fn relay_failure(&self, error: &RelayError, during: Stage) -> Reply {
        match error {
            RelayError::LoginRefused(why) => {
                if matches!(self.config.auth, ClientAuth::Passthrough) {
                    // The client's credentials worked at AUTH; the backend refused them
                    // when they were used again on a new connection.
                    log::warn!(
                        "smtp: client={} logging in again with the client's credentials \
                         (--client-auth passthrough) on a new backend connection was \
                         refused: {why}",
                        self.config.client
                    );
                } else {
                    log::error!(
                        "smtp: client={} the backend refused the proxy's login (--smtp-user \
                         and its password): {why}",
                        self.config.client
                    );
                }
                Reply::new(
                    451,
                    Enhanced::new(4, 3, 5),
                    "Relay login failed; try again later",
                )
            }
            RelayError::Unavailable(_) | RelayError::Lost(_) | RelayError::Protocol(_) => {
                log::warn!(
                    "smtp: client={} backend failed at {during}: {error}",
                    self.config.client
                );
                match (during, error) {
                    // RFC 3463 X.4.1: no answer from the host.
                    (Stage::Mail, RelayError::Unavailable(_)) => Reply::new(
                        451,
                        Enhanced::new(4, 4, 1),
                        "Backend unavailable; try again later",
                    ),
                    // X.4.2: the connection was made, then broke (at MAIL: while the
                    // relay logged in, or a kept connection found dead).
                    (Stage::Mail, _) => Reply::new(
                        451,
                        Enhanced::new(4, 4, 2),
                        "Backend unavailable: connection lost; try again later",
                    ),
                    _ => lost_backend(),
                }
            }
            RelayError::Local(why) => {
                log::error!("smtp: client={} {during}: {why}", self.config.client);
                local_error()
            }
            RelayError::OAuth2(why) => {
                log::error!("smtp: client={} {why}", self.config.client);
                // RFC 4954 §6: the proxy's own authentication failed for now; the client's
                // credentials are not in question.
                Reply::new(
                    454,
                    Enhanced::new(4, 7, 0),
                    "Temporary authentication failure; try again later",
                )
            }
        }
    }

    /// Reads one line, counting idle ticks against the RFC 5321 §4.5.3.2.7 timeout.
    fn read_line(&mut self) -> Input {
        loop {
            match self.lines.read_from(&mut self.input) {
                Ok(LineStatus::Complete) => {
                    self.idle.client_active();
                    return Input::Line;
                }
                Ok(LineStatus::TooLong) => {
                    self.idle.client_active();
                    return Input::TooLong;
                }
                Ok(LineStatus::Eof) => return Input::End("client closed"),
                Err(e) if is_tick(&e) => {
                    if !self.tick() {
                        let _ = self.send(&timeout_reply(&self.config.hostname));
                        return Input::End("timeout");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Input::End(CLIENT_READ_FAILED),
            }
        }
    }

    /// One tick of idle time: counts towards the client's idle limit (RFC 5321
    /// §4.5.3.2.7; data resets it) and keeps an open transaction's backend connection
    /// alive. False when the client has been idle too long.
    fn tick(&mut self) -> bool {
        // The backend's silence is counted whether or not the client sends: it hears
        // nothing from us while a message is being received.
        match self.idle.tick() {
            Tick::Expired => return false,
            Tick::Wait => {}
            Tick::KeepAlive => {
                if let State::Mail(tx) = &mut self.state
                    && !tx.broken
                    && tx.offline.is_none()
                    && let Err(e) = self.relay.keepalive()
                {
                    log::warn!(
                        "smtp: client={} backend keepalive failed; the transaction is lost: {e}",
                        self.config.client
                    );
                    if self.config.queue.is_some() {
                        tx.offline = Some(e.to_string());
                    } else {
                        tx.broken = true;
                    }
                }
            }
        }
        true
    }

    /// Writes a reply and flushes it: replies go out in command order (RFC 2920 §3), and a
    /// pipelining client may be waiting for exactly this one.
    fn send(&mut self, reply: &Reply) -> io::Result<()> {
        reply.write_to(&mut self.output)?;
        self.output.flush()
    }

    fn ok(&mut self, reply: Reply) -> io::Result<Flow> {
        self.send(&reply)?;
        Ok(Flow::Continue)
    }

    /// Sends the reply to a bad or misplaced command, or a refusal, and closes after too
    /// many.
    fn bad(&mut self, reply: &Reply) -> io::Result<Flow> {
        self.send(reply)?;
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            return self.close("Too many errors", "too many errors");
        }
        Ok(Flow::Continue)
    }

    /// Sends the reply to a command that moves no mail; past the junk limit each one is
    /// an error.
    fn junk(&mut self, reply: Reply) -> io::Result<Flow> {
        self.junk_commands += 1;
        if self.junk_commands > MAX_JUNK_COMMANDS {
            return self.bad(&reply);
        }
        self.ok(reply)
    }

    /// Ends the session with `421` (RFC 5321 §3.8): the client may come back later.
    fn close(&mut self, text: &str, reason: &'static str) -> io::Result<Flow> {
        let host = &self.config.hostname;
        self.send(&Reply::new(
            421,
            Enhanced::new(4, 7, 0),
            format!("{host} {text}"),
        ))?;
        Ok(Flow::Close(reason))
    }
}

fn is_tick(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

fn need(text: &str) -> Reply {
    Reply::new(503, Enhanced::new(5, 5, 1), text)
}

fn too_big() -> Reply {
    Reply::new(
        552,
        Enhanced::new(5, 3, 4),
        "Message size exceeds fixed maximum message size",
    )
}

fn lost_backend() -> Reply {
    Reply::new(
        451,
        Enhanced::new(4, 4, 2),
        "Connection to the backend lost; try again later",
    )
}

fn local_error() -> Reply {
    Reply::new(
        451,
        Enhanced::new(4, 3, 0),
        "Local error in processing; try again later",
    )
}

fn timeout_reply(hostname: &str) -> Reply {
    Reply::new(
        421,
        Enhanced::new(4, 4, 2),
        format!("{hostname} Timeout exceeded, closing connection"),
    )
}
