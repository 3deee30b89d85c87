//! The real [`Relay`]: a submission server reached through our own client
//! ([`crate::submission`]).
//!
//! RFC 5321 §3.3 (one MAIL, RCPT per recipient, then the message), RFC 8314 §3 (implicit
//! TLS, port 465), RFC 3207 (STARTTLS, port 587), RFC 4954 (AUTH PLAIN, or LOGIN for servers
//! such as Exchange that lack PLAIN; OAUTHBEARER / XOAUTH2 with an OAuth2 account), RFC 6152
//! (BODY=8BITMIME), RFC 2920 (PIPELINING), RFC 3030 (CHUNKING).
//!
//! Round trips to the backend per message are the fewest a sequential client allows: each
//! RCPT must be answered with the backend's own verdict before the client sends the next
//! command, so the floor is one round trip per recipient plus one for the message.
//! - MAIL is answered here and sent with the first RCPT in one write when the backend
//!   offers PIPELINING; without it, MAIL costs a round trip of its own.
//! - With CHUNKING the message goes as `BDAT n LAST` with its first bytes, answered once;
//!   without it, DATA waits for `354` first: one round trip more.
//!
//! The connection is opened when the process starts ([`SmtpRelay::warm_up`]), in parallel
//! with the client's EHLO and AUTH: TCP, TLS, greeting, EHLO and, with the proxy's own
//! password, AUTH. It is kept for the session's later transactions. When a kept connection
//! turns out dead at the next MAIL or its first RCPT (servers drop idle clients after a few
//! minutes), it is opened again once. Inside a transaction it is kept alive with NOOP
//! (RFC 5321 §4.1.1.9) while the client is slow.
//!
//! Every reply is judged for its exchange (`relay::check`); one that does not fit drops the
//! connection. The reply to the end of data is waited for 10 minutes (§4.5.3.2.6). If the
//! spooled message cannot be read while it is sent, the client cuts the socket before the
//! final dot (or before the bytes BDAT announced), so the backend never completes a
//! truncated message.

use super::relay::{Relay, RelayError, RelayResult, Stage, check};
use super::reply::{Enhanced, Reply};
use crate::net::{Stream, Timeouts, TlsMode};
use crate::oauth2::AccessToken;
use crate::oauth2::login::{Account, Failure, Refusal};
use crate::oauth2::sasl::{self, Mechanism as OAuth2Mechanism, Target, Verdict};
use crate::submission::{self, Client, Command, Endpoint, Security, SendError};
use std::fmt;
use std::io::Read;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// RFC 5321 §4.5.3.2.6: a client waits 10 minutes for the reply to the final dot. The
/// server may be scanning the message; giving up earlier turns a message it queued into a
/// 4xx for our client, which then sends it again.
pub const END_OF_DATA_TIMEOUT: Duration = Duration::from_secs(600);

/// When a recipient is checked with the submission server (`--recipient-check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientCheck {
    /// Every RCPT is answered with the server's own verdict: one backend round trip per
    /// recipient, and the client learns of each refusal at its RCPT.
    AtRcpt,
    /// A transaction's first RCPT is answered here (to a server that offers PIPELINING)
    /// and sent with what follows it: the next RCPT, or MAIL + RCPT + `BDAT LAST` + the
    /// message in one write, so a one-recipient message costs one round trip. The server's
    /// refusal of that recipient (or of the sender) becomes the reply to DATA (when the
    /// next RCPT brought it) or to the final dot, and the message goes to no one: the
    /// client was told that recipient was fine.
    WithMessage,
}

crate::options::value_enum!(RecipientCheck {
    RecipientCheck::WithMessage => "with-message":
        "The first recipient is checked together with the next RCPT or the message itself \
         (one backend round trip for a one-recipient message); a refusal of it refuses the \
         whole message",
    RecipientCheck::AtRcpt => "at-rcpt":
        "Every RCPT gets the server's own answer at once; one round trip more per message",
});

/// How long a kept connection may have been silent and still carry a whole transaction in
/// one write: one that died without a word (a NAT or firewall forgetting it) would only be
/// noticed after the long end-of-data wait, so after a quiet spell MAIL and RCPT go first,
/// under the normal timeout, and a dead connection is replaced at once.
const ONE_FLIGHT_QUIET_MAX: Duration = Duration::from_secs(30);

/// The largest message sent in the same write as its MAIL and RCPT under
/// [`RecipientCheck::WithMessage`]: if the server then refuses the recipient, the upload was
/// for nothing. A bigger message waits for the verdict first, one round trip that its own
/// upload dwarfs.
const ONE_FLIGHT_MAX: u64 = 1024 * 1024;

/// Where and how to reach the submission server.
pub struct Backend {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// Required unless `tls` is `None`; carries the trust (`--ca-file` or system roots).
    pub tls_connector: Option<native_tls::TlsConnector>,
    pub timeouts: Timeouts,
    /// How long to wait for the reply to the final dot (see [`END_OF_DATA_TIMEOUT`]).
    pub end_of_data_timeout: Duration,
    /// Our name in EHLO.
    pub hello: String,
    /// The proxy's own login (`--smtp-user`), unless clients log in with theirs.
    pub credentials: Option<(String, String)>,
    /// The proxy's own OAuth2 login (`--smtp-oauth2-account`), instead of `credentials`.
    pub oauth2: Option<Account>,
    pub recipient_check: RecipientCheck,
}

impl Backend {
    /// The longest the connection step (TCP, TLS handshake, greeting, EHLO) can wait in
    /// all, or `None` when the configured timeouts are too large to add up.
    pub fn open_limit(&self) -> Option<Duration> {
        Self::open_limit_of(self.timeouts)
    }

    /// [`Backend::open_limit`] for any backend with these timeouts (accounts' backends
    /// are built later, at their first use).
    pub fn open_limit_of(timeouts: Timeouts) -> Option<Duration> {
        let greeting = timeouts.io.max(timeouts.connect);
        timeouts.connect.checked_add(greeting.checked_mul(3)?)
    }

    fn endpoint(&self) -> Result<Endpoint, RelayError> {
        let connector = || {
            self.tls_connector.clone().ok_or_else(|| {
                RelayError::Unavailable(format!("{}: no TLS configuration", self.host))
            })
        };
        let security = match self.tls {
            TlsMode::Implicit => Security::Implicit(connector()?),
            TlsMode::Starttls => Security::StartTls(connector()?),
            TlsMode::None => Security::None,
        };
        Ok(Endpoint {
            host: self.host.clone(),
            port: self.port,
            security,
            timeouts: self.timeouts,
            hello: self.hello.clone(),
        })
    }

    fn at(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Written by hand: the password must never reach a log line through `{:?}`.
impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("timeouts", &self.timeouts)
            .field("end_of_data_timeout", &self.end_of_data_timeout)
            .field("hello", &self.hello)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .field("oauth2_account", &self.oauth2.as_ref().map(Account::name))
            .field("recipient_check", &self.recipient_check)
            .finish_non_exhaustive()
    }
}

type Connection = Client<Stream>;

/// A user name and password (a passthrough client's); no `Debug`, it holds the password.
#[derive(Clone)]
struct Login {
    user: String,
    password: String,
}

/// A connection opened ahead of use, and whether the proxy's own login is done on it.
struct Warm {
    conn: Connection,
    logged_in: bool,
}

pub struct SmtpRelay {
    backend: Backend,
    conn: Option<Connection>,
    /// The connection being opened since the process started ([`SmtpRelay::warm_up`]).
    warming: Option<JoinHandle<Result<Warm, LoginError>>>,
    /// A warm connection without login, for the first login to use.
    spare: Option<Connection>,
    /// Credentials a passthrough client logged in with.
    client_login: Option<Login>,
    /// A MAIL answered here and held for the first RCPT, so that both reach a pipelining
    /// backend in one write: one backend round trip per message fewer (see [`Relay::mail`]).
    pending_mail: Option<PendingMail>,
    /// The server's refusal of a recipient (or sender) the client was told was fine
    /// ([`RecipientCheck::WithMessage`]): the reply to the final dot, and the message is
    /// then not sent.
    unconfirmed: Option<Reply>,
    in_transaction: bool,
    /// When the server last answered on the current connection (or it was taken into use).
    last_heard: Option<Instant>,
}

struct PendingMail {
    from: String,
    /// The backend's refusal of this sender, given to every later RCPT of the transaction
    /// without asking again (repeated refusals count against the client at the backend:
    /// Postfix's smtpd_hard_error_limit).
    refused: Option<Reply>,
    /// The first recipient, answered here and not yet sent ([`RecipientCheck::WithMessage`]).
    held: Option<String>,
}

/// Why a backend connection could not be opened and logged in, as the relay judges it.
/// Not [`submission::OpenError`], which says only why the connection itself failed (and
/// becomes [`LoginError::Failed`] here): the relay also needs the AUTH refusal as a reply.
#[derive(Debug)]
enum LoginError {
    Failed(RelayError),
    /// The backend answered AUTH with this reply.
    AuthRefused(Reply),
}

impl SmtpRelay {
    pub fn new(backend: Backend) -> Self {
        SmtpRelay {
            backend,
            conn: None,
            warming: None,
            spare: None,
            client_login: None,
            pending_mail: None,
            unconfirmed: None,
            in_transaction: false,
            last_heard: None,
        }
    }

    /// Starts opening the connection now, in a thread, while the client is still busy
    /// with its greeting, EHLO and AUTH: TCP, TLS, greeting, EHLO, and the proxy's own
    /// password login. The first MAIL (or a passthrough login) takes it over; a client
    /// that leaves first leaves it unused. An OAuth2 login and a passthrough client's
    /// credentials still wait for first use: the token source lives in this thread, and
    /// the client's password is not known yet.
    pub fn warm_up(&mut self) {
        let Ok(endpoint) = self.backend.endpoint() else {
            return;
        };
        let login = match (&self.backend.credentials, &self.backend.oauth2) {
            (Some((user, password)), None) => Some(Login {
                user: user.clone(),
                password: password.clone(),
            }),
            _ => None,
        };
        let at = self.backend.at();
        let thread = std::thread::Builder::new()
            .name("smtp-warm-up".into())
            .spawn(move || {
                let mut conn = open(&endpoint)?;
                if let Some(login) = &login {
                    authenticate(&mut conn, &at, &login.user, login)?;
                }
                Ok(Warm {
                    conn,
                    logged_in: login.is_some(),
                })
            });
        // Without a thread the connection is simply opened at first use, as before.
        self.warming = thread.ok();
    }

    /// The warm-up's result, once it is needed: a connection the server has closed
    /// meanwhile (idle limits, a 421 sent while the client typed) is thrown away.
    fn take_warm(&mut self) -> Option<Result<Warm, LoginError>> {
        let result = self.warming.take()?.join().unwrap_or_else(|_| {
            Err(LoginError::Failed(RelayError::Local(
                "the connection thread failed".into(),
            )))
        });
        match result {
            Ok(warm) if !warm.conn.is_quiet() => {
                log::info!("smtp: the backend closed the early connection; reconnecting");
                None
            }
            other => Some(other),
        }
    }

    /// A connection without login: the warm one if there is one, else a new one.
    fn connect(&mut self) -> Result<Connection, LoginError> {
        if let Some(warm) = self.take_warm() {
            match warm {
                Ok(warm) if !warm.logged_in => return Ok(warm.conn),
                // Logged in with the proxy's password, but a different login is wanted.
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(spare) = self.spare.take()
            && spare.is_quiet()
        {
            return Ok(spare);
        }
        let endpoint = self.backend.endpoint().map_err(LoginError::Failed)?;
        open(&endpoint)
    }

    /// Connects and logs in with `login` (or none). Returns the connection and the reply
    /// to AUTH.
    fn open_with(
        &mut self,
        login: Option<&Login>,
    ) -> Result<(Connection, Option<Reply>), LoginError> {
        let mut conn = self.connect()?;
        let Some(login) = login else {
            return Ok((conn, None));
        };
        let reply = authenticate(&mut conn, &self.backend.at(), &self.login_name(), login)?;
        Ok((conn, Some(reply)))
    }

    /// Connects and logs in with the OAuth2 account: one token, and after a rejection one
    /// renewal and one retry, on the same connection (RFC 4954 §4 allows a new AUTH after
    /// a failed one) or on a new one if the server closed it.
    fn open_with_oauth2(&mut self) -> Result<Connection, RelayError> {
        let Some(mut account) = self.backend.oauth2.take() else {
            return Err(RelayError::OAuth2("no OAuth2 account configured".into()));
        };
        let mut kept: Option<Connection> = None;
        let result = account.login(|user, token| {
            let reused = kept.is_some();
            let mut conn = match kept.take() {
                Some(conn) => conn,
                None => self.connect().map_err(open_failure)?,
            };
            match self.oauth2_authenticate(&mut conn, user, token) {
                Ok(()) => Ok(conn),
                Err(Refusal::Rejected(why)) => {
                    kept = Some(conn);
                    Err(Refusal::Rejected(why))
                }
                // The server closed the connection after rejecting the first token.
                Err(Refusal::Failed(RelayError::Lost(_))) if reused => {
                    let mut conn = self.connect().map_err(open_failure)?;
                    self.oauth2_authenticate(&mut conn, user, token)?;
                    Ok(conn)
                }
                Err(failed) => Err(failed),
            }
        });
        let result = result.map_err(|failure| match failure {
            Failure::Token(e) => RelayError::OAuth2(account.advice(&e)),
            Failure::Failed(e) => e,
        });
        self.backend.oauth2 = Some(account);
        result
    }

    /// `AUTH OAUTHBEARER` or `AUTH XOAUTH2`, whichever the server's EHLO listed (OAUTHBEARER
    /// first, see [`OAuth2Mechanism::choose`]). The client puts the initial response on
    /// the AUTH line when it fits, and answers an error challenge (RFC 7628 §3.2.2) before
    /// the server's final failure; the challenge says whether renewing the token may help.
    fn oauth2_authenticate(
        &self,
        conn: &mut Connection,
        user: &str,
        token: &AccessToken,
    ) -> Result<(), Refusal<RelayError>> {
        let b = &self.backend;
        let at = b.at();
        let offered = conn.extensions();
        let Some(mechanism) = OAuth2Mechanism::choose(|m| offered.offers_auth(m)) else {
            return Err(Refusal::Failed(RelayError::Protocol(format!(
                "{at} offers neither AUTH OAUTHBEARER nor AUTH XOAUTH2 (often: only after TLS)"
            ))));
        };
        let target = Target {
            host: &b.host,
            port: b.port,
        };
        let initial = mechanism
            .initial_response(user, token, target)
            .map_err(|e| Refusal::Failed(RelayError::OAuth2(format!("AUTH {mechanism}: {e}"))))?;
        let (reply, challenge) = conn.login_oauth2(mechanism, &initial).map_err(|e| {
            Refusal::Failed(RelayError::Lost(format!(
                "{at}: AUTH {mechanism} as {user}: {e}"
            )))
        })?;
        let reply = reply.with_enhanced_default();
        let said = format!("{at}: AUTH {mechanism} as {user}: {}", reply.summary());
        match (reply.code, challenge.as_deref().map(sasl::judge_challenge)) {
            (235, _) => Ok(()),
            (_, Some(Verdict::TokenRejected)) | (535, None) => Err(Refusal::Rejected(said)),
            (_, Some(Verdict::InsufficientScope { scope })) => {
                Err(Refusal::Failed(RelayError::OAuth2(format!(
                    "{said}: the token lacks the scope the server wants ({}); authorize the \
                     account with the provider's SMTP scope",
                    scope.as_deref().unwrap_or("not named").escape_debug()
                ))))
            }
            // The server could not check the token now (Dovecot answers 454 when its
            // identity provider is down): a temporary failure of the proxy's own login,
            // told to the client as such (454 4.7.0), not as an unreachable backend.
            (code, _) if (400..500).contains(&code) => Err(Refusal::Failed(RelayError::OAuth2(
                format!("login deferred: {said}"),
            ))),
            // 334 again, 534 (mechanism too weak), 538, 530…: a setup problem.
            _ => Err(Refusal::Failed(RelayError::Protocol(said))),
        }
    }

    /// Opens a connection with the credentials in force, for a transaction. Returns whether
    /// it was opened ahead of time (and so may have been closed by the server meanwhile).
    fn connect_for_mail(&mut self) -> Result<bool, RelayError> {
        if self.client_login.is_none() && self.backend.oauth2.is_some() {
            let early = self.warming.is_some();
            self.conn = Some(self.open_with_oauth2()?);
            return Ok(early);
        }
        let login = match (&self.client_login, &self.backend.credentials) {
            (Some(login), _) => Some(login.clone()),
            (None, Some((user, password))) => Some(Login {
                user: user.clone(),
                password: password.clone(),
            }),
            (None, None) => None,
        };
        let early = self.warming.is_some();
        let opened = match self
            .client_login
            .is_none()
            .then(|| self.take_warm())
            .flatten()
        {
            Some(Ok(warm)) if warm.logged_in || login.is_none() => Ok((warm.conn, None)),
            Some(Ok(warm)) => {
                self.spare = Some(warm.conn);
                self.open_with(login.as_ref())
            }
            Some(Err(e)) => Err(e),
            None => self.open_with(login.as_ref()),
        };
        match opened {
            Ok((conn, _)) => {
                self.conn = Some(conn);
                self.last_heard = Some(Instant::now());
                Ok(early)
            }
            Err(e) => Err(self.login_error(e)),
        }
    }

    /// The relay error for a connection that could not be opened and logged in.
    fn login_error(&self, error: LoginError) -> RelayError {
        match error {
            LoginError::Failed(e) => e,
            LoginError::AuthRefused(reply) if reply.is_transient() => {
                RelayError::Unavailable(format!("login deferred: {}", reply.summary()))
            }
            // RFC 4954 §6: only 535 says the credentials are wrong.
            LoginError::AuthRefused(reply) if reply.code == 535 => {
                RelayError::LoginRefused(format!(
                    "{} user {}: {}",
                    self.backend.at(),
                    self.login_name(),
                    reply.summary()
                ))
            }
            // 534 (mechanism too weak), 538 (encryption required), 530…: a setup problem.
            LoginError::AuthRefused(reply) => RelayError::Protocol(format!(
                "{} refused the login of user {} for a reason other than the password: {}",
                self.backend.at(),
                self.login_name(),
                reply.summary()
            )),
        }
    }

    fn login_name(&self) -> String {
        match &self.backend.credentials {
            Some((user, _)) if self.client_login.is_none() => user.clone(),
            _ => "(the client's, from AUTH)".into(),
        }
    }

    /// Sends one command and judges the reply for `stage` (see [`check`]).
    fn command(&mut self, command: Command<'_>, stage: Stage) -> RelayResult {
        let Some(conn) = self.conn.as_mut() else {
            return Err(RelayError::Unavailable("no backend connection".into()));
        };
        let result = conn.command(command);
        self.judge(result, stage)
    }

    /// Sends a pipelined group (RFC 2920) and judges the first reply for `stage`; the
    /// others are read with [`Self::pipelined_reply`].
    fn send_group(&mut self, commands: &[Command<'_>], stage: Stage) -> RelayResult {
        let Some(conn) = self.conn.as_mut() else {
            return Err(RelayError::Unavailable("no backend connection".into()));
        };
        let result = conn.send(commands).and_then(|()| conn.read_reply());
        self.judge(result, stage)
    }

    /// Reads the reply to a command sent earlier in the same write.
    fn pipelined_reply(&mut self, stage: Stage) -> RelayResult {
        let Some(conn) = self.conn.as_mut() else {
            return Err(RelayError::Lost("backend connection lost".into()));
        };
        let result = conn.read_reply();
        self.judge(result, stage)
    }

    /// MAIL, then RCPT for each of `to`: in one write if the backend pipelines. Returns
    /// the MAIL reply and, if MAIL was accepted, one RCPT reply per recipient. A kept
    /// connection that turns out dead (servers drop idle clients after a few minutes) is
    /// opened again once.
    fn open_transaction(
        &mut self,
        from: &str,
        to: &[&str],
        reused: bool,
    ) -> (RelayResult, Vec<RelayResult>) {
        let mut sent = self.mail_and_rcpts(from, to);
        let dead = match &sent.0 {
            Err(RelayError::Unavailable(_) | RelayError::Lost(_)) => true,
            Ok(reply) => reply.code == 421,
            Err(_) => false,
        };
        if reused && dead {
            log::info!("smtp: the kept backend connection was closed while idle; reconnecting");
            self.drop_connection();
            if let Err(e) = self.connect_for_mail() {
                return (Err(e), Vec::new());
            }
            sent = self.mail_and_rcpts(from, to);
        }
        self.in_transaction = self.conn.is_some() && matches!(&sent.0, Ok(r) if r.is_positive());
        sent
    }

    fn mail_and_rcpts(&mut self, from: &str, to: &[&str]) -> (RelayResult, Vec<RelayResult>) {
        let mail = Command::Mail {
            from,
            eight_bit: self.offered(|e| e.eight_bit_mime),
        };
        // The current connection's: one opened again may have lost PIPELINING.
        if to.is_empty() || !self.offered(|e| e.pipelining) {
            let mail_reply = self.command(mail, Stage::Mail);
            if !matches!(&mail_reply, Ok(reply) if reply.is_positive()) {
                return (mail_reply, Vec::new());
            }
            let rcpt_replies = to
                .iter()
                .map(|to| self.command(Command::Rcpt(to), Stage::Rcpt))
                .collect();
            return (mail_reply, rcpt_replies);
        }
        let mut group = vec![mail];
        group.extend(to.iter().map(|to| Command::Rcpt(to)));
        let mail_reply = self.send_group(&group, Stage::Mail);
        // The RCPT replies come even when MAIL was refused (then 503s that mean nothing to
        // our client); they are read either way to keep the dialogue in step.
        let rcpt_replies = match &mail_reply {
            Ok(reply) if reply.code != 421 => self.pipelined_replies(to.len(), Stage::Rcpt),
            _ => Vec::new(),
        };
        match &mail_reply {
            Ok(reply) if reply.is_positive() => (mail_reply, rcpt_replies),
            _ => (mail_reply, Vec::new()),
        }
    }

    /// Reads `n` replies to commands sent earlier in the same write. Once one cannot be
    /// read, or says the server is closing (421), the rest are errors too.
    fn pipelined_replies(&mut self, n: usize, stage: Stage) -> Vec<RelayResult> {
        let mut replies = Vec::with_capacity(n);
        while replies.len() < n {
            let reply = match replies.last() {
                Some(Err(_)) | Some(Ok(Reply { code: 421, .. })) => {
                    Err(RelayError::Lost("backend connection lost".into()))
                }
                _ => self.pipelined_reply(stage),
            };
            replies.push(reply);
        }
        replies
    }

    /// Turns the client's result into a reply judged for `stage`. No reply, or a reply
    /// that does not fit, loses the connection.
    fn judge(&mut self, result: Result<Reply, submission::Error>, stage: Stage) -> RelayResult {
        let reply = match result {
            Ok(reply) => {
                self.last_heard = Some(Instant::now());
                reply.with_enhanced_default()
            }
            Err(e) => {
                let why = format!("{}: {stage}: {e}", self.backend.at());
                self.drop_connection();
                return Err(RelayError::Lost(why));
            }
        };
        if reply.code == 421 {
            // RFC 5321 §3.8: the server is closing this connection.
            self.drop_connection();
        }
        let checked = check(stage, reply);
        if checked.is_err() {
            self.drop_connection();
        }
        checked
    }

    /// Closes without QUIT: used when the connection is broken, where QUIT could only wait
    /// for the timeout, or no longer trusted.
    fn drop_connection(&mut self) {
        self.conn = None;
        self.in_transaction = false;
    }

    /// Whether the current connection's server offers what `has` asks for.
    fn offered(&self, has: impl Fn(&submission::Extensions) -> bool) -> bool {
        self.conn.as_ref().is_some_and(|c| has(c.extensions()))
    }

    /// Sends the message (after the transaction's RCPTs) and returns the reply to its end:
    /// `BDAT n LAST` when the server offers CHUNKING, else DATA, `354`, and the
    /// dot-stuffed message.
    fn send_message(&mut self, message: &mut dyn Read, len: u64) -> RelayResult {
        let chunking = self.offered(|e| e.chunking);
        if !chunking {
            let reply = self.command(Command::Data, Stage::Data)?;
            if reply.code != 354 {
                // A refusal of DATA leaves the transaction open at the backend: Postfix
                // answers the next MAIL with `503 5.5.1 Error: nested MAIL command`. RSET
                // closes it and keeps the connection for the next transaction.
                self.reset();
                return Ok(reply);
            }
        }
        self.write_message(&[], chunking, message, len)?;
        let (_, end) = self.end_of_data_replies(&[], chunking)?;
        Ok(end)
    }

    /// Sends a transaction whose only recipient was answered here
    /// ([`RecipientCheck::WithMessage`]) and returns the reply the client gets for its
    /// final dot: the server's refusal of the sender or the recipient, or its reply to the
    /// message. To a pipelining server with CHUNKING, MAIL, RCPT, `BDAT n LAST` and the
    /// message go in one write (one round trip); without CHUNKING, MAIL, RCPT and DATA go
    /// in one write, then the message (two). A message over [`ONE_FLIGHT_MAX`], or on a
    /// connection quiet for over [`ONE_FLIGHT_QUIET_MAX`], waits for the verdict on MAIL
    /// and RCPT first.
    fn send_held(&mut self, from: &str, to: &str, message: &mut dyn Read, len: u64) -> RelayResult {
        // A connection the server closed while the client sent its message is replaced
        // now: once the message is written it cannot be read again.
        if !self.conn.as_ref().is_some_and(Connection::is_quiet) {
            if self.conn.is_some() {
                log::info!("smtp: the backend closed the connection meanwhile; reconnecting");
            }
            self.drop_connection();
            self.connect_for_mail()?;
        }
        let chunking = self.offered(|e| e.chunking);
        let quiet_for = self.last_heard.map_or(Duration::MAX, |at| at.elapsed());
        if !self.offered(|e| e.pipelining)
            || (chunking && len > ONE_FLIGHT_MAX)
            || quiet_for > ONE_FLIGHT_QUIET_MAX
        {
            // A kept connection found dead here is replaced once: nothing is open yet.
            let (mail, rcpts) = self.open_transaction(from, &[to], true);
            let verdict = rcpts.into_iter().next().unwrap_or(mail)?;
            if !verdict.is_positive() {
                self.reset();
                return Ok(verdict);
            }
            return self.send_message(message, len);
        }
        let envelope = [
            Command::Mail {
                from,
                eight_bit: self.offered(|e| e.eight_bit_mime),
            },
            Command::Rcpt(to),
        ];
        if !chunking {
            return self.send_held_with_data(&envelope, message, len);
        }
        self.write_message(&envelope, true, message, len)?;
        let (envelope, end) = self.end_of_data_replies(&[Stage::Mail, Stage::Rcpt], true)?;
        match envelope.into_iter().find(|reply| !reply.is_positive()) {
            Some(refusal) => {
                if end.is_positive() {
                    // A server that takes a message without a recipient: nobody gets it.
                    log::warn!(
                        "smtp: {}: accepted a message after refusing its envelope ({}): {}",
                        self.backend.at(),
                        refusal.summary(),
                        end.summary()
                    );
                }
                Ok(refusal)
            }
            None => Ok(end),
        }
    }

    /// [`Self::send_held`] to a pipelining server without CHUNKING: MAIL, RCPT and DATA in
    /// one write (RFC 2920 §3.1: DATA may end a group), then the message after `354`.
    fn send_held_with_data(
        &mut self,
        envelope: &[Command<'_>],
        message: &mut dyn Read,
        len: u64,
    ) -> RelayResult {
        let mut group = envelope.to_vec();
        group.push(Command::Data);
        let mut replies = vec![self.send_group(&group, Stage::Mail)?];
        for stage in [Stage::Rcpt, Stage::Data] {
            if replies.last().is_some_and(|r| r.code == 421) {
                return Ok(replies.pop().expect("just seen"));
            }
            replies.push(self.pipelined_reply(stage)?);
        }
        let data = replies.pop().expect("three replies");
        self.in_transaction = replies[0].is_positive();
        let refusal = replies.into_iter().find(|reply| !reply.is_positive());
        match (refusal, data.code == 354) {
            (None, true) => {
                self.write_message(&[], false, message, len)?;
                let (_, end) = self.end_of_data_replies(&[], false)?;
                Ok(end)
            }
            (None, false) => {
                // As in send_message: RSET closes what the refused DATA left open.
                self.reset();
                Ok(data)
            }
            (Some(refusal), false) => {
                self.reset();
                Ok(refusal)
            }
            (Some(refusal), true) => {
                // A server that wants a message for no recipient: it gets none, and the
                // connection ends mid-DATA so that nothing is completed.
                log::warn!(
                    "smtp: {}: answered DATA with 354 after refusing its envelope ({})",
                    self.backend.at(),
                    refusal.summary()
                );
                self.drop_connection();
                Ok(refusal)
            }
        }
    }

    /// Writes the message: after DATA's `354`, dot-stuffed with the final dot; with
    /// CHUNKING, `BDAT len LAST` and the message as it is, after the commands in `group`
    /// in the same write. The transaction is no longer open for RSET once this starts.
    fn write_message(
        &mut self,
        group: &[Command<'_>],
        chunking: bool,
        message: &mut dyn Read,
        len: u64,
    ) -> Result<(), RelayError> {
        self.in_transaction = false;
        let at = self.backend.at();
        let Some(conn) = self.conn.as_mut() else {
            return Err(RelayError::Lost("backend connection lost".into()));
        };
        let sent = match chunking {
            true => conn.send_bdat_last(group, message, len),
            false => conn.send_data(message, len),
        };
        match sent {
            Ok(()) => Ok(()),
            Err(SendError::Source { error, sent }) => {
                // The socket was cut before the end of data: the backend saw the
                // connection end mid-message and discards it.
                self.drop_connection();
                Err(RelayError::Local(format!(
                    "reading the spooled message failed after {sent} of {len} bytes: {error}; \
                     the backend connection was cut before the end of data"
                )))
            }
            Err(SendError::Connection(e)) => {
                self.drop_connection();
                Err(RelayError::Lost(format!("{at}: sending the message: {e}")))
            }
        }
    }

    /// Reads the replies owed for a message just written: one per stage in `envelope`
    /// (MAIL and RCPT sent in the same write), then the reply to its end, all with the
    /// long end-of-data wait (a pipelining server may hold the first ones until it has
    /// taken the message). A `421` ends the reading early and is the end reply.
    fn end_of_data_replies(
        &mut self,
        envelope: &[Stage],
        chunking: bool,
    ) -> Result<(Vec<Reply>, Reply), RelayError> {
        let io_timeout = self.backend.timeouts.io;
        // The reply to the end of data is waited for in full even if the client has gone,
        // so that the session can log the message's fate. Nothing is locked meanwhile:
        // the SMTP side takes no lock file (the mailbox lock is POP3's), and the session's
        // StdoutLock only guards this process's own stdout. Held are the two sockets and
        // the spool file (unlinked, in --spool-dir), which the process gives back when it
        // ends.
        let wait = self.backend.end_of_data_timeout.max(io_timeout);
        let at = self.backend.at();
        let mut replies = Vec::with_capacity(envelope.len() + 1);
        for &stage in envelope.iter().chain([&Stage::EndOfData]) {
            let Some(conn) = self.conn.as_mut() else {
                return Err(RelayError::Lost("backend connection lost".into()));
            };
            if let Err(e) = conn.set_timeout(wait) {
                self.drop_connection();
                return Err(RelayError::Lost(format!("setting a timeout: {e}")));
            }
            let result = conn.read_reply();
            if let Err(e) = &result
                && e.is_timeout()
            {
                let why = format!(
                    "no reply to the end of data within {}s: the backend may have accepted the \
                     message, and the client, told to retry, may send it again (a duplicate)",
                    wait.as_secs()
                );
                log::warn!("smtp: {at}: {why}");
                self.drop_connection();
                return Err(RelayError::Lost(why));
            }
            let reply = self.judge(result, stage)?;
            let closing = reply.code == 421;
            replies.push(reply);
            if closing {
                break;
            }
        }
        if let Some(conn) = self.conn.as_mut()
            && conn.set_timeout(io_timeout).is_err()
        {
            self.drop_connection();
        }
        let end = replies.pop().expect("at least the end reply was read");
        if chunking && end.is_refusal() && end.code != 421 {
            // RFC 3030 §2: the transaction failed; RSET makes sure the server agrees
            // before the next MAIL.
            self.in_transaction = true;
            self.reset();
        }
        Ok((replies, end))
    }
}

/// Connects, secures and says EHLO.
fn open(endpoint: &Endpoint) -> Result<Connection, LoginError> {
    endpoint
        .open()
        .map_err(|e| LoginError::Failed(RelayError::Unavailable(e.to_string())))
}

/// AUTH PLAIN, or LOGIN for servers such as Exchange that lack PLAIN (RFC 4954). A coded
/// refusal is [`LoginError::AuthRefused`]; a cut or a stall is [`RelayError::Lost`], never a
/// wrong password; a server that offers neither mechanism is a setup problem.
fn authenticate(
    conn: &mut Connection,
    at: &str,
    shown_user: &str,
    login: &Login,
) -> Result<Reply, LoginError> {
    let reply = match conn.login(&login.user, &login.password) {
        Ok(reply) => reply.with_enhanced_default(),
        Err(e @ submission::Error::Unsendable(_)) => {
            return Err(LoginError::Failed(RelayError::Protocol(format!(
                "{at}: {e}"
            ))));
        }
        Err(e) => {
            return Err(LoginError::Failed(RelayError::Lost(format!(
                "{at}: logging in as {shown_user}: {e}"
            ))));
        }
    };
    match reply.code {
        235 => Ok(reply),
        _ if reply.is_refusal() => Err(LoginError::AuthRefused(reply)),
        _ => Err(LoginError::Failed(RelayError::Protocol(format!(
            "{at}: AUTH answered {}",
            reply.summary()
        )))),
    }
}

impl Relay for SmtpRelay {
    fn login(&mut self, user: &str, password: &str) -> RelayResult {
        self.quit_backend();
        let login = Login {
            user: user.to_string(),
            password: password.to_string(),
        };
        let early = self.warming.is_some();
        let mut opened = self.open_with(Some(&login));
        if early && matches!(&opened, Err(LoginError::Failed(RelayError::Lost(_)))) {
            // The early connection died while the client typed: once more, anew.
            opened = self.open_with(Some(&login));
        }
        match opened {
            Ok((conn, reply)) => {
                self.conn = Some(conn);
                self.client_login = Some(login);
                Ok(reply.unwrap_or_else(|| Reply::from_backend(235, &["2.7.0 Authenticated"])))
            }
            Err(LoginError::AuthRefused(reply)) => Ok(reply),
            Err(LoginError::Failed(e)) => Err(e),
        }
    }

    fn mail(&mut self, from: &str) -> RelayResult {
        self.pending_mail = None;
        self.unconfirmed = None;
        let mut reused = self.conn.is_some();
        if !reused {
            // Connecting now, not at RCPT: an unreachable backend is reported at MAIL.
            reused = self.connect_for_mail()?;
        }
        if self.offered(|e| e.pipelining) {
            self.pending_mail = Some(PendingMail {
                from: from.to_string(),
                refused: None,
                held: None,
            });
            return Ok(Reply::new(250, Enhanced::new(2, 1, 0), "Ok"));
        }
        self.open_transaction(from, &[], reused).0
    }

    fn rcpt(&mut self, to: &str) -> RelayResult {
        let Some(pending) = &mut self.pending_mail else {
            return self.command(Command::Rcpt(to), Stage::Rcpt);
        };
        if let Some(refusal) = &pending.refused {
            // The sender was refused: so is every recipient, each with that reply (as
            // from a server that checks senders at RCPT time, like Postfix).
            return Ok(refusal.clone());
        }
        if pending.held.is_none() && self.backend.recipient_check == RecipientCheck::WithMessage {
            pending.held = Some(to.to_string());
            return Ok(Reply::new(
                250,
                Enhanced::new(2, 1, 5),
                "Ok, checked when the message is sent",
            ));
        }
        let from = pending.from.clone();
        let held = pending.held.take();
        let recipients: Vec<&str> = held.iter().map(String::as_str).chain([to]).collect();
        // Nothing is open at the backend yet, so a connection found dead here (idle since
        // an earlier transaction, or since this MAIL) can always be replaced, once.
        let (mail_reply, mut rcpt_replies) = self.open_transaction(&from, &recipients, true);
        if rcpt_replies.is_empty() {
            // MAIL was refused, or the connection failed.
            if let Ok(refusal) = &mail_reply
                && refusal.code != 421
                && held.is_some()
            {
                // Also when the connection broke after the refusal: the client was told
                // the first recipient was fine, and must hear otherwise before DATA.
                self.unconfirmed = Some(refusal.clone());
            }
            match (&mail_reply, &mut self.pending_mail) {
                (Ok(refusal), Some(pending)) if refusal.code != 421 && self.conn.is_some() => {
                    pending.refused = Some(refusal.clone());
                }
                _ => self.pending_mail = None,
            }
            return mail_reply;
        }
        self.pending_mail = None;
        let reply = rcpt_replies.pop().expect("one reply per recipient");
        if let (Some(held), Some(Ok(verdict))) = (&held, rcpt_replies.pop())
            && !verdict.is_positive()
        {
            log::info!(
                "smtp: <{held}>, answered 250 here, was refused by the backend: {}; the \
                 message will be refused as a whole",
                verdict.summary()
            );
            self.unconfirmed = Some(verdict);
        }
        reply
    }

    fn refusal_before_data(&self) -> Option<Reply> {
        self.unconfirmed.clone()
    }

    fn data(&mut self, message: &mut dyn Read, len: u64) -> RelayResult {
        if let Some(refusal) = self.unconfirmed.take() {
            // The client believes every recipient was accepted: sending to the others only
            // would lose the message for this one without anyone knowing.
            self.reset();
            return Ok(refusal);
        }
        if let Some(PendingMail {
            from,
            held: Some(to),
            ..
        }) = self.pending_mail.take()
        {
            return self.send_held(&from, &to, message, len);
        }
        if self.conn.is_none() {
            return Err(RelayError::Lost("backend connection lost".into()));
        }
        self.send_message(message, len)
    }

    fn keepalive(&mut self) -> Result<(), RelayError> {
        if self.in_transaction {
            return self.command(Command::Noop, Stage::Noop).map(drop);
        }
        if self.pending_mail.is_some() && self.conn.is_some() {
            // Nothing is open at the backend yet: if the connection is lost anyway, the
            // first RCPT opens another, so the transaction is not lost.
            let _ = self.command(Command::Noop, Stage::Noop);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.pending_mail = None;
        self.unconfirmed = None;
        if self.in_transaction {
            self.in_transaction = false;
            // A failed RSET has already dropped the connection; the next MAIL reconnects.
            let _ = self.command(Command::Rset, Stage::Rset);
        }
    }

    fn quit(&mut self) {
        self.quit_backend();
        // A connection opened early and never used: QUIT without waiting, or if it is
        // still being opened, leave it to end with the process.
        if self.warming.as_ref().is_some_and(JoinHandle::is_finished)
            && let Some(Ok(mut warm)) = self.take_warm()
        {
            warm.conn.quit_without_waiting();
        }
        if let Some(mut spare) = self.spare.take() {
            spare.quit_without_waiting();
        }
    }
}

impl SmtpRelay {
    /// QUIT on the connection in use, waiting for the reply (the server logs a clean end).
    fn quit_backend(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = conn.command(Command::Quit);
        }
        self.pending_mail = None;
        self.unconfirmed = None;
        self.in_transaction = false;
    }
}

/// The relay error of a failed connection attempt (no AUTH was tried yet).
fn open_failure<E>(error: LoginError) -> Refusal<E>
where
    E: From<RelayError>,
{
    match error {
        LoginError::Failed(e) => Refusal::Failed(e.into()),
        LoginError::AuthRefused(reply) => Refusal::Failed(
            RelayError::Protocol(format!("AUTH answered {}", reply.summary())).into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::oauth2::login::testing::Tokens;
    use crate::smtp::fake_backend::{FakeSmtp, Journal, Script};
    use crate::submission::transcript::FailingSpool;
    use std::time::Instant;

    fn relay_to(fake: &FakeSmtp) -> SmtpRelay {
        SmtpRelay::new(Backend {
            host: "127.0.0.1".into(),
            port: fake.port,
            tls: TlsMode::None,
            tls_connector: None,
            timeouts: Timeouts {
                connect: Duration::from_secs(5),
                io: Duration::from_secs(5),
            },
            end_of_data_timeout: END_OF_DATA_TIMEOUT,
            hello: "proxy.test".into(),
            credentials: None,
            oauth2: None,
            recipient_check: RecipientCheck::AtRcpt,
        })
    }

    /// Waits until the fake server's journal satisfies `done` (its threads run apart).
    fn journal_when(fake: &FakeSmtp, done: impl Fn(&Journal) -> bool) -> Journal {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let journal = fake.journal();
            if done(&journal) || Instant::now() > deadline {
                return journal;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn send(relay: &mut SmtpRelay, message: &[u8]) -> RelayResult {
        relay.data(&mut &message[..], message.len() as u64)
    }

    /// How many connections the fake server saw.
    fn connects(commands: &[String]) -> usize {
        commands.iter().filter(|c| *c == "*CONNECT").count()
    }

    fn open_transaction(relay: &mut SmtpRelay) {
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("b@d.test").unwrap().code, 250);
    }

    #[test]
    fn a_spool_read_error_cuts_the_connection_before_the_end_of_data() {
        // DATA (before the final dot) and BDAT (before the announced bytes are all sent).
        for script in [Script::default(), chunking(Script::default())] {
            let fake = FakeSmtp::start(script);
            let mut relay = relay_to(&fake);
            open_transaction(&mut relay);
            let result = relay.data(&mut FailingSpool { good: 300_000 }, 400_000);
            assert!(
                matches!(&result, Err(RelayError::Local(why)) if why.contains("cut")),
                "{result:?}"
            );
            let journal = journal_when(&fake, |j| {
                !j.incomplete.is_empty() || !j.messages.is_empty()
            });
            assert!(
                journal.messages.is_empty(),
                "a truncated message was completed"
            );
            assert_eq!(journal.incomplete.len(), 1);
            assert!(journal.incomplete[0].len() <= 300_000);
            // The next message goes out on a new connection.
            open_transaction(&mut relay);
            assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        }
    }

    #[test]
    fn a_refused_data_command_is_followed_by_rset_and_the_next_message_goes_through() {
        let fake = FakeSmtp::start(Script {
            data: vec!["554 5.5.1 Error: no valid recipients".into()],
            ..Script::default()
        });
        let mut relay = relay_to(&fake);
        open_transaction(&mut relay);
        let reply = send(&mut relay, b"Subject: 1\r\n\r\none\r\n").unwrap();
        assert_eq!(reply.summary(), "554 5.5.1 Error: no valid recipients");
        open_transaction(&mut relay);
        let reply = send(&mut relay, b"Subject: 2\r\n\r\ntwo\r\n").unwrap();
        assert_eq!(reply.summary(), "250 2.0.0 Ok: queued as F1");
        let commands = fake.commands();
        assert_eq!(
            commands,
            [
                "*CONNECT",
                "EHLO proxy.test",
                "MAIL FROM:<a@c.test>",
                "RCPT TO:<b@d.test>",
                "DATA",
                "RSET",
                "MAIL FROM:<a@c.test>",
                "RCPT TO:<b@d.test>",
                "DATA"
            ]
        );
    }

    #[test]
    fn replies_that_do_not_fit_the_exchange_are_errors_and_drop_the_connection() {
        for (script, expected) in [
            (
                Script {
                    data: vec!["250 2.0.0 Ok".into()],
                    ..Script::default()
                },
                "DATA answered 250",
            ),
            (
                Script {
                    end_of_data: vec!["354 go ahead".into()],
                    ..Script::default()
                },
                "end of data answered 354",
            ),
        ] {
            let fake = FakeSmtp::start(script);
            let mut relay = relay_to(&fake);
            open_transaction(&mut relay);
            let result = send(&mut relay, b"x\r\n");
            assert!(
                matches!(&result, Err(RelayError::Protocol(why)) if why.contains(expected)),
                "{result:?}"
            );
            assert!(relay.conn.is_none());
            // The next transaction starts on a new connection.
            open_transaction(&mut relay);
            assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
            let connects = fake.commands().iter().filter(|c| *c == "*CONNECT").count();
            assert_eq!(connects, 2);
        }
    }

    #[test]
    fn the_end_of_data_reply_may_take_longer_than_the_backend_timeout() {
        let fake = FakeSmtp::start(Script {
            end_of_data_delay: Duration::from_millis(2500),
            ..Script::default()
        });
        let mut relay = relay_to(&fake);
        relay.backend.timeouts.io = Duration::from_secs(1);
        open_transaction(&mut relay);
        let reply = send(&mut relay, b"x\r\n").unwrap();
        assert_eq!(reply.code, 250, "{reply}");
        // The backend timeout is back in force for the next commands.
        assert!(relay.keepalive().is_ok());
        // Past the end-of-data limit the error says the message may have gone.
        relay.backend.end_of_data_timeout = Duration::from_secs(1);
        open_transaction(&mut relay);
        let result = send(&mut relay, b"x\r\n");
        assert!(
            matches!(&result, Err(RelayError::Lost(why)) if why.contains("may have accepted")),
            "{result:?}"
        );
    }

    #[test]
    fn a_backend_without_plain_gets_auth_login() {
        let fake = FakeSmtp::start(Script {
            extensions: vec!["AUTH LOGIN".into()],
            account: Some((
                crate::base64::encode(b"gw"),
                crate::base64::encode(b"pass word"),
            )),
            ..Script::default()
        });
        let mut relay = relay_to(&fake);
        relay.backend.credentials = Some(("gw".into(), "pass word".into()));
        open_transaction(&mut relay);
        assert!(fake.commands().contains(&"AUTH LOGIN".to_string()));
        relay.backend.credentials = Some(("gw".into(), "wrong".into()));
        relay.quit();
        let result = relay.mail("a@c.test");
        assert!(
            matches!(&result, Err(RelayError::LoginRefused(why)) if why.contains("535 5.7.8")),
            "{result:?}"
        );
    }

    #[test]
    fn keepalive_sends_noop_only_inside_a_transaction_and_reports_a_lost_connection() {
        let fake = FakeSmtp::start(Script::default());
        let mut relay = relay_to(&fake);
        assert!(relay.keepalive().is_ok());
        open_transaction(&mut relay);
        relay.keepalive().unwrap();
        assert_eq!(fake.commands().last().map(String::as_str), Some("NOOP"));
        relay.reset();
        relay.keepalive().unwrap();
        assert_eq!(fake.commands().last().map(String::as_str), Some("RSET"));
        open_transaction(&mut relay);
        relay.conn.as_mut().unwrap().cut();
        assert!(relay.keepalive().is_err());
    }

    fn pipelining(script: Script) -> Script {
        Script {
            extensions: vec!["PIPELINING".into()],
            ..script
        }
    }

    #[test]
    fn a_pipelining_backend_gets_mail_and_the_first_rcpt_in_one_write() {
        let fake = FakeSmtp::start(pipelining(Script::default()));
        let mut relay = relay_to(&fake);
        assert_eq!(relay.mail("a@c.test").unwrap().summary(), "250 2.1.0 Ok");
        assert!(
            !fake.commands().iter().any(|c| c.starts_with("MAIL")),
            "MAIL waits for the first RCPT"
        );
        assert_eq!(relay.rcpt("b@d.test").unwrap().summary(), "250 2.1.5 Ok");
        assert_eq!(relay.rcpt("e@d.test").unwrap().code, 250);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        let journal = fake.journal();
        assert_eq!(
            journal.commands[2..],
            [
                "MAIL FROM:<a@c.test>",
                "RCPT TO:<b@d.test>",
                "RCPT TO:<e@d.test>",
                "DATA"
            ]
        );
        assert_eq!(journal.pipelined, ["RCPT TO:<b@d.test>"]);
        assert_eq!(journal.messages, [b"x\r\n".to_vec()]);
    }

    #[test]
    fn a_sender_refused_by_a_pipelining_backend_is_the_reply_to_each_recipient() {
        let refusal = "553 5.7.1 <a@c.test>: Sender address rejected: not owned by user gw";
        let fake = FakeSmtp::start(pipelining(Script {
            mail: vec![refusal.into()],
            ..Script::default()
        }));
        let mut relay = relay_to(&fake);
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("b@d.test").unwrap().summary(), refusal);
        assert_eq!(relay.rcpt("e@d.test").unwrap().summary(), refusal);
        assert!(!relay.in_transaction);
        // A new transaction, with the backend now accepting the sender.
        relay.reset();
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("b@d.test").unwrap().code, 250);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        // The refusal was asked for once, not once per recipient.
        let mails = fake
            .commands()
            .iter()
            .filter(|c| c.starts_with("MAIL"))
            .count();
        assert_eq!(mails, 2);
        assert_eq!(fake.journal().messages.len(), 1);
    }

    #[test]
    fn a_kept_connection_closed_while_idle_is_opened_again_at_the_first_rcpt() {
        for script in [Script::default(), pipelining(Script::default())] {
            let fake = FakeSmtp::start(Script {
                idle_limit: Some(Duration::from_millis(300)),
                ..script
            });
            let mut relay = relay_to(&fake);
            open_transaction(&mut relay);
            assert_eq!(send(&mut relay, b"1\r\n").unwrap().code, 250);
            std::thread::sleep(Duration::from_millis(700));
            open_transaction(&mut relay);
            assert_eq!(send(&mut relay, b"2\r\n").unwrap().code, 250);
            let journal = fake.journal();
            assert!(journal.commands.contains(&"*TIMEOUT".to_string()));
            assert_eq!(connects(&journal.commands), 2);
            assert_eq!(journal.messages, [b"1\r\n".to_vec(), b"2\r\n".to_vec()]);
        }
    }

    #[test]
    fn a_held_mail_is_kept_alive_and_survives_a_lost_connection() {
        let idle = |script| Script {
            idle_limit: Some(Duration::from_millis(300)),
            ..pipelining(script)
        };
        // A slow client between MAIL and RCPT: NOOPs keep the connection.
        let fake = FakeSmtp::start(idle(Script::default()));
        let mut relay = relay_to(&fake);
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        for _ in 0..7 {
            std::thread::sleep(Duration::from_millis(100));
            relay.keepalive().unwrap();
        }
        assert_eq!(relay.rcpt("b@d.test").unwrap().code, 250);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        let journal = fake.journal();
        assert_eq!(connects(&journal.commands), 1);
        assert!(journal.commands.contains(&"NOOP".to_string()));
        // Without keepalives the connection opened at MAIL dies; RCPT opens another.
        let fake = FakeSmtp::start(idle(Script::default()));
        let mut relay = relay_to(&fake);
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(relay.rcpt("b@d.test").unwrap().code, 250);
        assert!(relay.in_transaction);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        let journal = fake.journal();
        assert_eq!(connects(&journal.commands), 2);
        assert_eq!(journal.messages.len(), 1);
    }

    #[test]
    fn a_broken_rcpt_reply_leaves_no_transaction_behind() {
        let fake = FakeSmtp::start(pipelining(Script {
            rcpt: vec![("b@d.test".into(), "334 what".into())],
            ..Script::default()
        }));
        let mut relay = relay_to(&fake);
        relay.mail("a@c.test").unwrap();
        let result = relay.rcpt("b@d.test");
        assert!(matches!(result, Err(RelayError::Protocol(_))), "{result:?}");
        assert!(relay.conn.is_none());
        assert!(!relay.in_transaction);
    }

    /// A relay whose own login is the OAuth2 account of `tokens`, to a server offering
    /// `auth` and accepting `accepted`.
    fn oauth2_relay(
        auth: &str,
        accepted: &[&str],
        tokens: &crate::oauth2::login::testing::Tokens,
        script: Script,
    ) -> (FakeSmtp, SmtpRelay) {
        let fake = FakeSmtp::start(Script {
            extensions: vec!["PIPELINING".into(), auth.into()],
            bearer_tokens: accepted.iter().map(|t| t.to_string()).collect(),
            ..script
        });
        let mut relay = relay_to(&fake);
        relay.backend.oauth2 = Some(tokens.account());
        (fake, relay)
    }

    fn bearer(fake: &FakeSmtp) -> Vec<(String, bool)> {
        fake.journal().bearer
    }

    #[test]
    fn oauth2_login_once_per_connection_with_the_initial_response_on_the_auth_line() {
        let tokens = Tokens::new("gw@example.com", &["t1"]);
        let (fake, mut relay) = oauth2_relay(
            "AUTH PLAIN XOAUTH2 OAUTHBEARER",
            &["t1"],
            &tokens,
            Script::default(),
        );
        for _ in 0..2 {
            open_transaction(&mut relay);
            assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        }
        assert_eq!(bearer(&fake), [("t1".to_string(), true)]);
        let journal = fake.journal();
        assert!(journal.commands.contains(&"AUTH OAUTHBEARER".to_string()));
        assert_eq!(journal.messages.len(), 2);
        assert_eq!(journal.pipelined.len(), 2, "pipelining still works");
        assert_eq!(tokens.renewals(), 0);
    }

    #[test]
    fn a_rejected_token_is_renewed_once_and_retried_on_the_same_connection() {
        let tokens = Tokens::new("gw@example.com", &["expired", "fresh"]);
        let (fake, mut relay) =
            oauth2_relay("AUTH OAUTHBEARER", &["fresh"], &tokens, Script::default());
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        assert_eq!(
            bearer(&fake),
            [("expired".to_string(), true), ("fresh".to_string(), true)]
        );
        let commands = fake.commands();
        assert!(
            commands.contains(&"*ERROR RESPONSE AQ==".to_string()),
            "{commands:?}"
        );
        assert_eq!(connects(&commands), 1);
        assert_eq!(tokens.renewals(), 1);
    }

    #[test]
    fn a_server_that_closes_after_a_rejection_gets_the_renewed_token_on_a_new_connection() {
        let tokens = Tokens::new("gw@example.com", &["expired", "fresh"]);
        let script = Script {
            close_after_refused_token: true,
            ..Script::default()
        };
        let (fake, mut relay) = oauth2_relay("AUTH XOAUTH2", &["fresh"], &tokens, script);
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        let commands = fake.commands();
        // XOAUTH2's answer to the error challenge is an empty line.
        assert!(
            commands.contains(&"*ERROR RESPONSE ".to_string()),
            "{commands:?}"
        );
        assert_eq!(connects(&commands), 2);
        assert_eq!(tokens.renewals(), 1);
    }

    #[test]
    fn a_renewed_token_rejected_too_or_no_token_is_an_oauth2_error_not_a_login_refusal() {
        let tokens = Tokens::new("gw@example.com", &["bad1", "bad2"]);
        let (_fake, mut relay) =
            oauth2_relay("AUTH OAUTHBEARER", &["good"], &tokens, Script::default());
        let result = relay.mail("a@c.test");
        assert!(
            matches!(&result, Err(RelayError::OAuth2(why))
                if why.contains("legacy-mail-proxy oauth2 authorize work")),
            "{result:?}"
        );
        assert_eq!(tokens.renewals(), 1);
        tokens.state.borrow_mut().fail = Some(crate::oauth2::TokenError::Unavailable(
            "connection refused".into(),
        ));
        let result = relay.mail("a@c.test");
        assert!(
            matches!(&result, Err(RelayError::OAuth2(why)) if why.contains("unavailable")),
            "{result:?}"
        );
        assert!(relay.conn.is_none());
    }

    #[test]
    fn a_server_that_cannot_check_tokens_now_is_an_oauth2_failure_without_renewal() {
        let tokens = Tokens::new("gw@example.com", &["t1", "t2"]);
        let script = Script {
            bearer_unavailable: true,
            ..Script::default()
        };
        let (_fake, mut relay) = oauth2_relay("AUTH XOAUTH2", &["t1"], &tokens, script);
        let result = relay.mail("a@c.test");
        assert!(
            matches!(&result, Err(RelayError::OAuth2(why)) if why.contains("454 4.7.0")),
            "{result:?}"
        );
        assert_eq!(tokens.renewals(), 0);
    }

    #[test]
    fn a_token_too_long_for_the_auth_line_answers_an_empty_334() {
        let long = "x".repeat(600);
        let tokens = Tokens::new("gw@example.com", &[&long]);
        let (fake, mut relay) = oauth2_relay("AUTH XOAUTH2", &[&long], &tokens, Script::default());
        open_transaction(&mut relay);
        assert_eq!(bearer(&fake), [(long, false)]);
    }

    fn chunking(script: Script) -> Script {
        Script {
            extensions: vec!["PIPELINING".into(), "CHUNKING".into(), "8BITMIME".into()],
            ..script
        }
    }

    #[test]
    fn a_chunking_backend_gets_bdat_last_and_no_data_command() {
        let fake = FakeSmtp::start(chunking(Script {
            rcpt: vec![("x@d.test".into(), "550 5.1.1 <x@d.test>: unknown".into())],
            ..Script::default()
        }));
        let mut relay = relay_to(&fake);
        let message = b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n";
        for _ in 0..2 {
            assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
            assert_eq!(relay.rcpt("b@d.test").unwrap().code, 250);
            // A refused recipient among accepted ones keeps its own reply.
            assert_eq!(relay.rcpt("x@d.test").unwrap().code, 550);
            assert_eq!(relay.rcpt("e@d.test").unwrap().code, 250);
            assert_eq!(send(&mut relay, message).unwrap().code, 250);
        }
        let journal = fake.journal();
        let bdat = format!("BDAT {} LAST", message.len());
        assert_eq!(
            journal.commands,
            [
                "*CONNECT",
                "EHLO proxy.test",
                "MAIL FROM:<a@c.test> BODY=8BITMIME",
                "RCPT TO:<b@d.test>",
                "RCPT TO:<x@d.test>",
                "RCPT TO:<e@d.test>",
                &bdat,
                "MAIL FROM:<a@c.test> BODY=8BITMIME",
                "RCPT TO:<b@d.test>",
                "RCPT TO:<x@d.test>",
                "RCPT TO:<e@d.test>",
                &bdat,
            ]
        );
        assert_eq!(journal.messages, [message.to_vec(), message.to_vec()]);
    }

    #[test]
    fn a_refused_bdat_is_the_reply_and_the_next_message_goes_through() {
        let fake = FakeSmtp::start(chunking(Script {
            end_of_data: vec!["554 5.7.1 spam".into()],
            ..Script::default()
        }));
        let mut relay = relay_to(&fake);
        open_transaction(&mut relay);
        assert_eq!(
            send(&mut relay, b"1\r\n").unwrap().summary(),
            "554 5.7.1 spam"
        );
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"2\r\n").unwrap().code, 250);
        let journal = fake.journal();
        assert!(journal.commands.contains(&"RSET".to_string()));
        assert_eq!(journal.messages, [b"1\r\n".to_vec(), b"2\r\n".to_vec()]);
    }

    #[test]
    fn warm_up_connects_and_logs_in_before_the_first_mail() {
        let fake = FakeSmtp::start(Script {
            extensions: vec!["PIPELINING".into(), "AUTH LOGIN".into()],
            account: Some((crate::base64::encode(b"gw"), crate::base64::encode(b"pw"))),
            ..Script::default()
        });
        let mut relay = relay_to(&fake);
        relay.backend.credentials = Some(("gw".into(), "pw".into()));
        relay.warm_up();
        let journal = journal_when(&fake, |j| j.commands.len() >= 3);
        assert_eq!(
            journal.commands,
            ["*CONNECT", "EHLO proxy.test", "AUTH LOGIN"]
        );
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        let commands = fake.commands();
        assert_eq!(connects(&commands), 1);
        assert_eq!(commands.iter().filter(|c| *c == "AUTH LOGIN").count(), 1);
    }

    #[test]
    fn a_warm_connection_the_server_closed_meanwhile_is_replaced() {
        for script in [Script::default(), pipelining(Script::default())] {
            let fake = FakeSmtp::start(Script {
                idle_limit: Some(Duration::from_millis(200)),
                ..script
            });
            let mut relay = relay_to(&fake);
            relay.warm_up();
            journal_when(&fake, |j| j.commands.contains(&"*TIMEOUT".to_string()));
            open_transaction(&mut relay);
            assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
            let journal = fake.journal();
            assert_eq!(connects(&journal.commands), 2);
            assert_eq!(journal.messages.len(), 1);
        }
    }

    #[test]
    fn a_passthrough_login_uses_the_warm_connection() {
        let fake = FakeSmtp::start(Script {
            extensions: vec!["AUTH LOGIN".into()],
            account: Some((crate::base64::encode(b"u"), crate::base64::encode(b"p"))),
            ..Script::default()
        });
        let mut relay = relay_to(&fake);
        relay.warm_up();
        journal_when(&fake, |j| j.commands.len() >= 2);
        assert_eq!(relay.login("u", "p").unwrap().code, 235);
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        let commands = fake.commands();
        assert_eq!(connects(&commands), 1);
    }

    #[test]
    fn a_client_that_leaves_leaves_the_warm_connection_unused() {
        let fake = FakeSmtp::start(Script::default());
        let mut relay = relay_to(&fake);
        relay.warm_up();
        journal_when(&fake, |j| j.commands.len() >= 2);
        relay.quit();
        let journal = journal_when(&fake, |j| j.commands.len() >= 3);
        assert_eq!(journal.commands, ["*CONNECT", "EHLO proxy.test", "QUIT"]);
    }

    // ---- RecipientCheck::WithMessage --------------------------------------------------

    fn checking_with_message(fake: &FakeSmtp) -> SmtpRelay {
        let mut relay = relay_to(fake);
        relay.backend.recipient_check = RecipientCheck::WithMessage;
        relay
    }

    fn unknown(script: Script) -> Script {
        Script {
            rcpt: vec![("x@d.test".into(), "550 5.1.1 <x@d.test>: unknown".into())],
            ..script
        }
    }

    /// The commands of each transaction after EHLO, the message's bytes left out.
    fn after_ehlo(fake: &FakeSmtp) -> Vec<String> {
        let commands = fake.commands();
        let at = commands.iter().position(|c| c.starts_with("EHLO")).unwrap();
        commands[at + 1..].to_vec()
    }

    #[test]
    fn one_recipient_goes_with_mail_and_the_message_in_one_write() {
        let fake = FakeSmtp::start(chunking(Script::default()));
        let mut relay = checking_with_message(&fake);
        for message in [&b"1\r\n"[..], b"2\r\n"] {
            assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
            assert_eq!(
                relay.rcpt("b@d.test").unwrap().summary(),
                "250 2.1.5 Ok, checked when the message is sent"
            );
            let reply = send(&mut relay, message).unwrap();
            assert!(
                reply.summary().starts_with("250 2.0.0 Ok: queued"),
                "{reply:?}"
            );
        }
        let journal = fake.journal();
        assert_eq!(
            after_ehlo(&fake),
            [
                "MAIL FROM:<a@c.test> BODY=8BITMIME",
                "RCPT TO:<b@d.test>",
                "BDAT 3 LAST",
                "MAIL FROM:<a@c.test> BODY=8BITMIME",
                "RCPT TO:<b@d.test>",
                "BDAT 3 LAST",
            ]
        );
        // RCPT and BDAT were waiting behind MAIL: one write each time.
        assert_eq!(
            journal.pipelined,
            [
                "RCPT TO:<b@d.test>",
                "BDAT 3 LAST",
                "RCPT TO:<b@d.test>",
                "BDAT 3 LAST"
            ]
        );
        assert_eq!(journal.messages, [b"1\r\n".to_vec(), b"2\r\n".to_vec()]);
    }

    #[test]
    fn a_refused_only_recipient_is_the_reply_to_the_message_and_nothing_is_delivered() {
        for script in [
            chunking(unknown(Script::default())),
            pipelining(unknown(Script::default())),
        ] {
            let fake = FakeSmtp::start(script);
            let mut relay = checking_with_message(&fake);
            assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
            assert_eq!(relay.rcpt("x@d.test").unwrap().code, 250);
            assert_eq!(
                send(&mut relay, b"lost?\r\n").unwrap().summary(),
                "550 5.1.1 <x@d.test>: unknown"
            );
            assert!(fake.journal().messages.is_empty());
            // The connection is in step for the next transaction.
            open_transaction(&mut relay);
            assert_eq!(send(&mut relay, b"next\r\n").unwrap().code, 250);
            let journal = fake.journal();
            assert_eq!(journal.messages, [b"next\r\n".to_vec()]);
            assert_eq!(connects(&journal.commands), 1);
        }
    }

    #[test]
    fn a_refused_sender_is_the_reply_to_the_message() {
        let refusal = "553 5.7.1 <a@c.test>: Sender address rejected: not owned by user gw";
        for script in [chunking(Script::default()), pipelining(Script::default())] {
            let fake = FakeSmtp::start(Script {
                mail: vec![refusal.into()],
                ..script
            });
            let mut relay = checking_with_message(&fake);
            open_transaction(&mut relay);
            assert_eq!(send(&mut relay, b"1\r\n").unwrap().summary(), refusal);
            open_transaction(&mut relay);
            assert_eq!(send(&mut relay, b"2\r\n").unwrap().code, 250);
            assert_eq!(fake.journal().messages, [b"2\r\n".to_vec()]);
        }
    }

    #[test]
    fn with_several_recipients_the_first_goes_with_the_second_and_each_refusal_counts() {
        let fake = FakeSmtp::start(chunking(unknown(Script::default())));
        let mut relay = checking_with_message(&fake);
        // A refused second recipient: its own reply, and the others get the message.
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("b@d.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("x@d.test").unwrap().code, 550);
        assert_eq!(relay.rcpt("e@d.test").unwrap().code, 250);
        assert_eq!(relay.refusal_before_data(), None);
        assert_eq!(send(&mut relay, b"1\r\n").unwrap().code, 250);
        assert_eq!(
            after_ehlo(&fake),
            [
                "MAIL FROM:<a@c.test> BODY=8BITMIME",
                "RCPT TO:<b@d.test>",
                "RCPT TO:<x@d.test>",
                "RCPT TO:<e@d.test>",
                "BDAT 3 LAST",
            ]
        );
        assert!(
            fake.journal()
                .pipelined
                .contains(&"RCPT TO:<x@d.test>".to_string())
        );
        // A refused first recipient, told 250 here: the message goes to no one, and the
        // client hears the refusal at DATA (or, if it sends the message anyway, at its end).
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("x@d.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("b@d.test").unwrap().code, 250);
        let refusal = relay.refusal_before_data().expect("known before DATA");
        assert_eq!(refusal.summary(), "550 5.1.1 <x@d.test>: unknown");
        assert_eq!(
            send(&mut relay, b"2\r\n").unwrap().summary(),
            "550 5.1.1 <x@d.test>: unknown"
        );
        let journal = fake.journal();
        assert_eq!(journal.messages, [b"1\r\n".to_vec()]);
        assert_eq!(journal.commands.last().unwrap(), "RSET");
        // And the connection goes on.
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"3\r\n").unwrap().code, 250);
        assert_eq!(fake.journal().messages.len(), 2);
    }

    #[test]
    fn a_big_message_waits_for_the_verdict_on_its_recipient() {
        let fake = FakeSmtp::start(chunking(unknown(Script::default())));
        let mut relay = checking_with_message(&fake);
        let big = vec![b'x'; ONE_FLIGHT_MAX as usize + 1];
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("x@d.test").unwrap().code, 250);
        assert_eq!(send(&mut relay, &big).unwrap().code, 550);
        assert!(
            !fake.commands().iter().any(|c| c.starts_with("BDAT")),
            "not uploaded for nothing"
        );
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, &big).unwrap().code, 250);
        let journal = fake.journal();
        assert!(!journal.pipelined.iter().any(|c| c.starts_with("BDAT")));
        assert_eq!(journal.messages.len(), 1);
    }

    #[test]
    fn without_chunking_mail_rcpt_and_data_go_in_one_write() {
        let fake = FakeSmtp::start(pipelining(Script::default()));
        let mut relay = checking_with_message(&fake);
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        let journal = fake.journal();
        assert_eq!(
            after_ehlo(&fake),
            ["MAIL FROM:<a@c.test>", "RCPT TO:<b@d.test>", "DATA"]
        );
        assert_eq!(journal.pipelined, ["RCPT TO:<b@d.test>", "DATA"]);
        assert_eq!(journal.messages, [b"x\r\n".to_vec()]);
        // A refused DATA is the reply, and RSET closes the transaction.
        let fake = FakeSmtp::start(pipelining(Script {
            data: vec!["451 4.3.0 busy".into()],
            ..Script::default()
        }));
        let mut relay = checking_with_message(&fake);
        open_transaction(&mut relay);
        assert_eq!(
            send(&mut relay, b"x\r\n").unwrap().summary(),
            "451 4.3.0 busy"
        );
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"y\r\n").unwrap().code, 250);
        assert!(fake.commands().contains(&"RSET".to_string()));
        assert_eq!(fake.journal().messages, [b"y\r\n".to_vec()]);
    }

    #[test]
    fn a_connection_the_server_closed_while_the_client_typed_is_replaced_before_the_message() {
        let fake = FakeSmtp::start(chunking(Script {
            idle_limit: Some(Duration::from_millis(200)),
            ..Script::default()
        }));
        let mut relay = checking_with_message(&fake);
        open_transaction(&mut relay);
        journal_when(&fake, |j| j.commands.contains(&"*TIMEOUT".to_string()));
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        let journal = fake.journal();
        assert_eq!(connects(&journal.commands), 2);
        assert_eq!(journal.messages, [b"x\r\n".to_vec()]);
    }

    #[test]
    fn the_setting_leaves_a_server_without_pipelining_one_command_at_a_time() {
        let fake = FakeSmtp::start(unknown(Script::default()));
        let mut relay = checking_with_message(&fake);
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        // Without PIPELINING nothing can be held: RCPT gets the server's own answer.
        assert_eq!(relay.rcpt("x@d.test").unwrap().code, 550);
        assert_eq!(relay.rcpt("b@d.test").unwrap().code, 250);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        assert!(fake.journal().pipelined.is_empty());
    }

    #[test]
    fn a_refused_sender_with_two_recipients_is_known_before_data_and_reset_forgets_it() {
        let refusal = "553 5.7.1 <a@c.test>: Sender address rejected: not owned by user gw";
        let fake = FakeSmtp::start(chunking(Script {
            mail: vec![refusal.into()],
            ..Script::default()
        }));
        let mut relay = checking_with_message(&fake);
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("b@d.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("e@d.test").unwrap().summary(), refusal);
        assert_eq!(relay.refusal_before_data().unwrap().summary(), refusal);
        // The client gives up (RSET): nothing of it is left for the next transaction.
        relay.reset();
        assert_eq!(relay.refusal_before_data(), None);
        open_transaction(&mut relay);
        assert_eq!(relay.rcpt("e@d.test").unwrap().code, 250);
        assert_eq!(relay.refusal_before_data(), None);
        assert_eq!(send(&mut relay, b"x\r\n").unwrap().code, 250);
        assert_eq!(fake.journal().messages, [b"x\r\n".to_vec()]);
    }

    #[test]
    fn a_connection_quiet_for_long_gets_mail_and_rcpt_first() {
        let fake = FakeSmtp::start(chunking(Script::default()));
        let mut relay = checking_with_message(&fake);
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"1\r\n").unwrap().code, 250);
        // As if the connection had been idle since: it might have died without a word.
        relay.last_heard = Some(Instant::now() - ONE_FLIGHT_QUIET_MAX - Duration::from_secs(1));
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"2\r\n").unwrap().code, 250);
        let journal = fake.journal();
        // The first message in one write, the second after the verdict on MAIL and RCPT.
        assert_eq!(
            journal.pipelined,
            ["RCPT TO:<b@d.test>", "BDAT 3 LAST", "RCPT TO:<b@d.test>"]
        );
        assert_eq!(journal.messages.len(), 2);
    }

    #[test]
    fn a_server_closing_at_the_held_rcpt_is_the_reply_and_the_next_message_reconnects() {
        let fake = FakeSmtp::start(chunking(Script {
            rcpt: vec![("x@d.test".into(), "421 4.3.2 shutting down".into())],
            ..Script::default()
        }));
        let mut relay = checking_with_message(&fake);
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("x@d.test").unwrap().code, 250);
        assert_eq!(
            send(&mut relay, b"1\r\n").unwrap().summary(),
            "421 4.3.2 shutting down"
        );
        open_transaction(&mut relay);
        assert_eq!(send(&mut relay, b"2\r\n").unwrap().code, 250);
        let journal = fake.journal();
        assert_eq!(connects(&journal.commands), 2);
        assert_eq!(journal.messages, [b"2\r\n".to_vec()]);
    }
}
