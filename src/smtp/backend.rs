//! The real [`Relay`]: a submission server reached with lettre's `SmtpConnection`.
//!
//! RFC 5321 §3.3 (one MAIL, RCPT per recipient, DATA), RFC 8314 §3 (implicit TLS, port
//! 465), RFC 3207 (STARTTLS, port 587), RFC 4954 (AUTH PLAIN, or LOGIN for servers such as
//! Exchange that lack PLAIN), RFC 6152 (BODY=8BITMIME).
//!
//! lettre's high-level `send_raw` stops at the first refused recipient and sends QUIT, so
//! this drives the connection one command at a time, with its own small command types
//! that display as their exact wire lines. The connection is opened at the first MAIL (or
//! at AUTH in passthrough mode) and kept for the session's later transactions. When the
//! server offers PIPELINING (RFC 2920), MAIL is answered here and sent in one write with
//! the first RCPT, saving a round trip per message. When a kept connection turns out dead
//! at the next MAIL or its first RCPT (servers drop idle clients after a few minutes), it
//! is opened again once. Inside a transaction it is kept alive with NOOP
//! (RFC 5321 §4.1.1.9) while the client is slow.
//!
//! Every reply is judged for its exchange (`relay::check`); one that does not fit drops
//! the connection. The reply to the final dot is waited for 10 minutes (§4.5.3.2.6). If the
//! spooled message cannot be read while it is sent, the socket is shut down before lettre
//! can write the final dot, so the backend never completes a truncated message.

use super::relay::{Relay, RelayError, RelayResult, Stage, check};
use super::reply::{Enhanced, Reply};
use crate::net::{Timeouts, TlsMode};
use crate::oauth2::AccessToken;
use crate::oauth2::login::{Account, Failure, Refusal};
use crate::oauth2::sasl::{self, Mechanism as OAuth2Mechanism, Target, Verdict};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{SmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Auth, Data, Ehlo, Noop, Quit, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension};
use lettre::transport::smtp::response::Response;
use std::fmt;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

/// RFC 5321 §4.5.3.2.6: a client waits 10 minutes for the reply to the final dot. The
/// server may be scanning the message; giving up earlier turns a message it queued into a
/// 4xx for our client, which then sends it again.
pub const END_OF_DATA_TIMEOUT: Duration = Duration::from_secs(600);

/// Where and how to reach the submission server.
pub struct Backend {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// Required unless `tls` is `None`.
    pub tls_parameters: Option<TlsParameters>,
    pub timeouts: Timeouts,
    /// How long to wait for the reply to the final dot (see [`END_OF_DATA_TIMEOUT`]).
    pub end_of_data_timeout: Duration,
    /// Our name in EHLO.
    pub hello: String,
    /// The proxy's own login (`--smtp-user`), unless clients log in with theirs.
    pub credentials: Option<(String, String)>,
    /// The proxy's own OAuth2 login (`--smtp-oauth2-account`), instead of `credentials`.
    pub oauth2: Option<Account>,
}

impl Backend {
    /// The wait for the greeting and the EHLO reply. lettre uses one timeout for the TCP
    /// connect, the greeting and EHLO; RFC 5321 §4.5.3.2.1 allows the server 5 minutes for
    /// its greeting, so this is never shorter than the backend timeout. The TCP connect
    /// keeps its own, shorter limit through the watchdog in [`SmtpRelay::open`].
    fn greeting_timeout(&self) -> Duration {
        self.timeouts.io.max(self.timeouts.connect)
    }

    /// The bound on the whole connection step (TCP, TLS handshake, greeting, EHLO), or
    /// `None` when the configured timeouts are too large to add up.
    pub fn open_limit(&self) -> Option<Duration> {
        Self::open_limit_of(self.timeouts)
    }

    /// [`Backend::open_limit`] for any backend with these timeouts (accounts' backends
    /// are built later, at their first use).
    pub fn open_limit_of(timeouts: Timeouts) -> Option<Duration> {
        let greeting = timeouts.io.max(timeouts.connect);
        timeouts.connect.checked_add(greeting.checked_mul(3)?)
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
            .finish_non_exhaustive()
    }
}

pub struct SmtpRelay {
    backend: Backend,
    conn: Option<SmtpConnection>,
    /// The local address of `conn`'s TCP socket, which identifies it among this process's
    /// descriptors (lettre does not expose its socket).
    socket: Option<SocketAddr>,
    /// Credentials a passthrough client logged in with.
    client_login: Option<Credentials>,
    /// Whether `conn`'s server announced PIPELINING (RFC 2920).
    pipelining: bool,
    /// The OAuth2 mechanism `conn`'s server announced in its EHLO AUTH list, if any.
    oauth2_mechanism: Option<OAuth2Mechanism>,
    /// A MAIL answered here and held for the first RCPT, so that both reach a pipelining
    /// backend in one write: one backend round trip per message fewer (see [`Relay::mail`]).
    pending_mail: Option<PendingMail>,
    in_transaction: bool,
}

struct PendingMail {
    from: String,
    /// The backend's refusal of this sender, given to every later RCPT of the transaction
    /// without asking again (repeated refusals count against the client at the backend:
    /// Postfix's smtpd_hard_error_limit).
    refused: Option<Reply>,
}

/// Why opening a connection failed.
enum OpenError {
    Failed(RelayError),
    /// The backend answered AUTH with this reply.
    AuthRefused(Reply),
}

/// `MAIL FROM:<address>`, with BODY=8BITMIME whenever the backend offers it: the client may
/// send 8-bit data without declaring it, and 7-bit data is valid 8BITMIME content.
struct MailCmd<'a> {
    from: &'a str,
    eight_bit: bool,
}

impl fmt::Display for MailCmd<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MAIL FROM:<{}>", self.from)?;
        if self.eight_bit {
            f.write_str(" BODY=8BITMIME")?;
        }
        f.write_str("\r\n")
    }
}

/// `RCPT TO:<address>`.
struct RcptCmd<'a>(&'a str);

impl fmt::Display for RcptCmd<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RCPT TO:<{}>\r\n", self.0)
    }
}

/// Two commands in one write (RFC 2920); lettre reads the first reply, `read_response` the
/// second.
struct Pipelined<A, B>(A, B);

impl<A: fmt::Display, B: fmt::Display> fmt::Display for Pipelined<A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.0, self.1)
    }
}

impl SmtpRelay {
    pub fn new(backend: Backend) -> Self {
        SmtpRelay {
            backend,
            conn: None,
            socket: None,
            client_login: None,
            pipelining: false,
            oauth2_mechanism: None,
            pending_mail: None,
            in_transaction: false,
        }
    }

    fn describe(&self, e: &lettre::transport::smtp::Error) -> String {
        format!("{}:{}: {e}", self.backend.host, self.backend.port)
    }

    /// Connects, secures and logs in. Returns the connection and the reply to AUTH.
    fn open(
        &mut self,
        credentials: Option<&Credentials>,
    ) -> Result<(SmtpConnection, Option<Reply>), OpenError> {
        let mut conn = self.connect()?;
        let Some(credentials) = credentials else {
            return Ok((conn, None));
        };
        let reply = self.authenticate(&mut conn, credentials)?;
        Ok((conn, Some(reply)))
    }

    /// Connects, secures (TLS or STARTTLS) and asks for the extensions.
    fn connect(&mut self) -> Result<SmtpConnection, OpenError> {
        let b = &self.backend;
        let hello = ClientId::Domain(b.hello.clone());
        let failed = |e: lettre::transport::smtp::Error| {
            OpenError::Failed(RelayError::Unavailable(format!(
                "{}:{}: {e}",
                b.host, b.port
            )))
        };
        let implicit = match b.tls {
            TlsMode::Implicit => b.tls_parameters.as_ref(),
            _ => None,
        };
        // lettre sets socket timeouts only after it has resolved, connected and done the
        // implicit-TLS handshake, so a server that accepts but never answers the handshake
        // would hang this process: a watchdog bounds the whole step, and gives the TCP
        // connect its own --connect-timeout (lettre's single timeout is the greeting's).
        let watchdog = Watchdog {
            connect: b.timeouts.connect,
            limit: b.open_limit().unwrap_or(Duration::MAX),
            port: b.port,
            what: format!("connecting to {}:{}", b.host, b.port),
        };
        let mut conn = watchdog
            .run(|| {
                SmtpConnection::connect(
                    (b.host.as_str(), b.port),
                    Some(b.greeting_timeout()),
                    &hello,
                    implicit,
                    None,
                )
            })
            .map_err(failed)?;
        // Each process holds one backend connection: the new socket is the one to `port`.
        let socket = tcp_sockets_to(b.port).into_iter().next();
        if let Some(socket) = &socket {
            // lettre never sets TCP_NODELAY, and `message_iter` writes the message and
            // then the final `<CRLF>.<CRLF>` as separate writes before it waits for the
            // reply. With Nagle the second write waits for the ACK of the first, which the
            // server delays (about 40 ms on Linux): measured here, 20 messages/s instead
            // of 230.
            let _ = socket.set_nodelay(true);
        }
        let local = socket.and_then(|s| s.local_addr().ok());
        conn.set_timeout(Some(b.timeouts.io))
            .map_err(|e| OpenError::Failed(RelayError::Unavailable(format!("{}: {e}", b.host))))?;
        if b.tls == TlsMode::Starttls {
            let params = b
                .tls_parameters
                .as_ref()
                .expect("STARTTLS has TLS parameters");
            // Never fall back to plain text: a downgrade would expose the password.
            if !conn.can_starttls() {
                return Err(OpenError::Failed(RelayError::Unavailable(format!(
                    "{}:{} does not offer STARTTLS",
                    b.host, b.port
                ))));
            }
            conn.starttls(params, &hello).map_err(failed)?;
        }
        self.socket = local;
        let extensions = extensions(&mut conn, &hello).map_err(|e| {
            OpenError::Failed(RelayError::Lost(format!(
                "{}:{}: asking for its extensions (EHLO): {e}",
                b.host, b.port
            )))
        })?;
        self.pipelining = extensions.pipelining;
        self.oauth2_mechanism = extensions.oauth2;
        Ok(conn)
    }

    /// Connects and logs in with the OAuth2 account: one token, and after a rejection one
    /// renewal and one retry, on the same connection (RFC 4954 §4 allows a new AUTH after
    /// a failed one) or on a new one if the server closed it.
    fn open_with_oauth2(&mut self) -> Result<SmtpConnection, RelayError> {
        let Some(mut account) = self.backend.oauth2.take() else {
            return Err(RelayError::OAuth2("no OAuth2 account configured".into()));
        };
        let mut kept: Option<SmtpConnection> = None;
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
    /// first, see [`OAuth2Mechanism::choose`]), driven step by step like [`Self::authenticate`].
    /// The initial response goes on the AUTH line when the line fits SMTP's 512 octets
    /// (RFC 4954 §4 forbids it otherwise); a longer one, as Microsoft's and Google's tokens
    /// make, answers the server's empty `334`. An error challenge (`334` + base64 JSON,
    /// RFC 7628 §3.2.2) gets %x01 / an empty line, then the server's final failure.
    fn oauth2_authenticate(
        &self,
        conn: &mut SmtpConnection,
        user: &str,
        token: &AccessToken,
    ) -> Result<(), Refusal<RelayError>> {
        let b = &self.backend;
        let at = format!("{}:{}", b.host, b.port);
        let Some(mechanism) = self.oauth2_mechanism else {
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
        let encoded = crate::base64::encode(&initial);
        let lost = |e: lettre::transport::smtp::Error| {
            Refusal::Failed(RelayError::Lost(format!(
                "{at}: AUTH {mechanism} as {user}: {e}"
            )))
        };
        let with_initial = SaslLine(format!("AUTH {mechanism} {encoded}"));
        let mut result = if with_initial.0.len() + 2 <= MAX_COMMAND_LINE {
            conn.command(with_initial)
        } else {
            match conn.command(SaslLine(format!("AUTH {mechanism}"))) {
                Ok(response) if response.has_code(334) => conn.command(SaslLine(encoded)),
                other => other,
            }
        };
        let mut challenge = None;
        if let Ok(response) = &result
            && response.has_code(334)
        {
            let text = response.message().next().unwrap_or_default().trim();
            challenge = Some(crate::base64::decode(text.as_bytes()).unwrap_or_default());
            let answer = crate::base64::encode(mechanism.error_response());
            result = conn.command(SaslLine(answer));
        }
        let reply = match result {
            Ok(response) => reply_of(&response),
            Err(e) => match e.status() {
                Some(code) => Reply::from_backend(code.into(), &[error_text(&e)]),
                None => return Err(lost(e)),
            },
        };
        let said = format!("{at}: AUTH {mechanism} as {user}: {}", reply.summary());
        match (reply.code, challenge.as_deref().map(sasl::judge_challenge)) {
            (235, _) => Ok(()),
            (_, Some(Verdict::TokenRejected)) | (535, None) => Err(Refusal::Rejected(said)),
            (_, Some(Verdict::InsufficientScope { scope })) => {
                Err(Refusal::Failed(RelayError::OAuth2(format!(
                    "{said}: the token lacks the scope the server wants ({}); authorize the                      account with the provider's SMTP scope",
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

    /// AUTH PLAIN, or LOGIN for servers such as Exchange that lack PLAIN (RFC 4954).
    ///
    /// Driven here rather than by lettre's `auth`, which after a failed LOGIN step sends
    /// QUIT on the broken connection and waits for its answer: a stalled backend then
    /// held the client for twice --backend-timeout. Each step here waits once, and a
    /// connection that fails is dropped without a word.
    ///
    /// A coded refusal is [`OpenError::AuthRefused`]; a cut or a stall is
    /// [`RelayError::Lost`], never a wrong password.
    fn authenticate(
        &self,
        conn: &mut SmtpConnection,
        credentials: &Credentials,
    ) -> Result<Reply, OpenError> {
        let b = &self.backend;
        let user = self.login_name();
        // A reply with a code is the server's verdict. Anything else (a cut shows as
        // "incomplete response", a stall as a network error) loses the connection; the
        // error's text says which.
        let failed = |e: lettre::transport::smtp::Error| match e.status() {
            Some(code) => {
                OpenError::AuthRefused(Reply::from_backend(code.into(), &[error_text(&e)]))
            }
            None => OpenError::Failed(RelayError::Lost(format!(
                "{}:{}: logging in as {user}: {e}",
                b.host, b.port
            ))),
        };
        let mechanism = conn
            .server_info()
            .get_auth_mechanism(&[Mechanism::Plain, Mechanism::Login])
            .ok_or_else(|| {
                // Often: the server offers AUTH only after TLS.
                OpenError::Failed(RelayError::Protocol(format!(
                    "{}:{} offers neither AUTH PLAIN nor AUTH LOGIN",
                    b.host, b.port
                )))
            })?;
        let command = Auth::new(mechanism, credentials.clone(), None).map_err(failed)?;
        let mut response = conn.command(command).map_err(failed)?;
        // PLAIN needs no challenge, LOGIN two; a server that asks for more is broken.
        for _ in 0..2 {
            if !response.has_code(334) {
                break;
            }
            let command = Auth::new_from_response(mechanism, credentials.clone(), &response)
                .map_err(failed)?;
            response = conn.command(command).map_err(failed)?;
        }
        let reply = reply_of(&response);
        if reply.code != 235 {
            return Err(OpenError::Failed(RelayError::Protocol(format!(
                "{}:{}: AUTH answered {}",
                b.host,
                b.port,
                reply.summary()
            ))));
        }
        Ok(reply)
    }

    /// Opens a connection with the credentials in force, for a transaction.
    fn connect_for_mail(&mut self) -> Result<(), RelayError> {
        if self.client_login.is_none() && self.backend.oauth2.is_some() {
            self.conn = Some(self.open_with_oauth2()?);
            return Ok(());
        }
        let credentials = match (&self.client_login, &self.backend.credentials) {
            (Some(login), _) => Some(login.clone()),
            (None, Some((user, password))) => {
                Some(Credentials::new(user.clone(), password.clone()))
            }
            (None, None) => None,
        };
        match self.open(credentials.as_ref()) {
            Ok((conn, _)) => {
                self.conn = Some(conn);
                Ok(())
            }
            Err(OpenError::Failed(e)) => Err(e),
            Err(OpenError::AuthRefused(reply)) if reply.is_transient() => Err(
                RelayError::Unavailable(format!("login deferred: {}", reply.summary())),
            ),
            // RFC 4954 §6: only 535 says the credentials are wrong.
            Err(OpenError::AuthRefused(reply)) if reply.code == 535 => {
                Err(RelayError::LoginRefused(format!(
                    "{}:{} user {}: {}",
                    self.backend.host,
                    self.backend.port,
                    self.login_name(),
                    reply.summary()
                )))
            }
            // 534 (mechanism too weak), 538 (encryption required), 530…: a setup problem.
            Err(OpenError::AuthRefused(reply)) => Err(RelayError::Protocol(format!(
                "{}:{} refused the login of user {} for a reason other than the password: {}",
                self.backend.host,
                self.backend.port,
                self.login_name(),
                reply.summary()
            ))),
        }
    }

    fn login_name(&self) -> String {
        match &self.backend.credentials {
            Some((user, _)) if self.client_login.is_none() => user.clone(),
            _ => "(the client's, from AUTH)".into(),
        }
    }

    /// Sends one command and judges the reply for `stage` (see [`check`]).
    fn command(&mut self, command: impl fmt::Display, stage: Stage) -> RelayResult {
        let Some(conn) = self.conn.as_mut() else {
            return Err(RelayError::Unavailable("no backend connection".into()));
        };
        let result = conn.command(command);
        self.judge(result, stage)
    }

    /// Reads the reply to a command sent earlier in the same write.
    fn pipelined_reply(&mut self, stage: Stage) -> RelayResult {
        let Some(conn) = self.conn.as_mut() else {
            return Err(RelayError::Lost("backend connection lost".into()));
        };
        let result = conn.read_response();
        self.judge(result, stage)
    }

    /// MAIL, then RCPT `to` when there is one: in one write if the backend pipelines.
    /// Returns the MAIL reply and, if MAIL was accepted, the RCPT reply. A kept connection
    /// that turns out dead (servers drop idle clients after a few minutes) is opened again
    /// once.
    fn open_transaction(
        &mut self,
        from: &str,
        to: Option<&str>,
        reused: bool,
    ) -> (RelayResult, Option<RelayResult>) {
        let mut sent = self.mail_and_rcpt(from, to);
        let dead = match &sent.0 {
            Err(RelayError::Unavailable(_) | RelayError::Lost(_)) => true,
            Ok(reply) => reply.code == 421,
            Err(_) => false,
        };
        if reused && dead {
            log::info!("smtp: the kept backend connection was closed while idle; reconnecting");
            self.drop_connection();
            if let Err(e) = self.connect_for_mail() {
                return (Err(e), None);
            }
            sent = self.mail_and_rcpt(from, to);
        }
        self.in_transaction = self.conn.is_some() && matches!(&sent.0, Ok(r) if r.is_success());
        sent
    }

    fn mail_and_rcpt(
        &mut self,
        from: &str,
        to: Option<&str>,
    ) -> (RelayResult, Option<RelayResult>) {
        let mail = MailCmd {
            from,
            eight_bit: self.eight_bit(),
        };
        let Some(to) = to else {
            return (self.command(mail, Stage::Mail), None);
        };
        // `pipelining` is the current connection's: one opened again may have lost it.
        let mail_reply = match self.pipelining {
            true => self.command(Pipelined(mail, RcptCmd(to)), Stage::Mail),
            false => self.command(mail, Stage::Mail),
        };
        let accepted = matches!(&mail_reply, Ok(reply) if reply.is_success());
        let rcpt_reply = if self.pipelining {
            // The RCPT reply comes even when MAIL was refused (then a 503 that means
            // nothing to our client); it is read either way to keep the dialogue in step.
            match &mail_reply {
                Ok(reply) if reply.code != 421 => Some(self.pipelined_reply(Stage::Rcpt)),
                _ => None,
            }
        } else if accepted {
            Some(self.command(RcptCmd(to), Stage::Rcpt))
        } else {
            None
        };
        (mail_reply, rcpt_reply.filter(|_| accepted))
    }

    /// Turns lettre's result into a reply judged for `stage`. A coded refusal is a reply;
    /// no reply or a reply that does not fit loses the connection.
    fn judge(
        &mut self,
        result: Result<Response, lettre::transport::smtp::Error>,
        stage: Stage,
    ) -> RelayResult {
        let reply = match result {
            Ok(response) => reply_of(&response),
            Err(e) => match e.status() {
                Some(code) => Reply::from_backend(code.into(), &[error_text(&e)]),
                None => {
                    let why = self.describe(&e);
                    self.drop_connection();
                    return Err(RelayError::Lost(why));
                }
            },
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
        self.socket = None;
        self.in_transaction = false;
    }

    fn eight_bit(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.server_info().supports_feature(Extension::EightBitMime))
    }
}

impl Relay for SmtpRelay {
    fn login(&mut self, user: &str, password: &str) -> RelayResult {
        self.quit();
        let credentials = Credentials::new(user.to_string(), password.to_string());
        match self.open(Some(&credentials)) {
            Ok((conn, reply)) => {
                self.conn = Some(conn);
                self.client_login = Some(credentials);
                Ok(reply.unwrap_or_else(|| Reply::from_backend(235, &["2.7.0 Authenticated"])))
            }
            Err(OpenError::AuthRefused(reply)) => Ok(reply),
            Err(OpenError::Failed(e)) => Err(e),
        }
    }

    fn mail(&mut self, from: &str) -> RelayResult {
        self.pending_mail = None;
        let reused = self.conn.is_some();
        if !reused {
            // Connecting now, not at RCPT: an unreachable backend is reported at MAIL.
            self.connect_for_mail()?;
        }
        if self.pipelining {
            self.pending_mail = Some(PendingMail {
                from: from.to_string(),
                refused: None,
            });
            return Ok(Reply::new(250, Enhanced::new(2, 1, 0), "Ok"));
        }
        self.open_transaction(from, None, reused).0
    }

    fn rcpt(&mut self, to: &str) -> RelayResult {
        let Some(pending) = &self.pending_mail else {
            return self.command(RcptCmd(to), Stage::Rcpt);
        };
        if let Some(refusal) = &pending.refused {
            // The sender was refused: so is every recipient, each with that reply (as
            // from a server that checks senders at RCPT time, like Postfix).
            return Ok(refusal.clone());
        }
        let from = pending.from.clone();
        // Nothing is open at the backend yet, so a connection found dead here (idle since
        // an earlier transaction, or since this MAIL) can always be replaced, once.
        match self.open_transaction(&from, Some(to), true) {
            (Ok(refusal), None) if refusal.code != 421 && self.conn.is_some() => {
                if let Some(pending) = &mut self.pending_mail {
                    pending.refused = Some(refusal.clone());
                }
                Ok(refusal)
            }
            (mail_reply, rcpt_reply) => {
                self.pending_mail = None;
                rcpt_reply.unwrap_or(mail_reply)
            }
        }
    }

    fn data(&mut self, message: &mut dyn Read, len: u64) -> RelayResult {
        let reply = self.command(Data, Stage::Data)?;
        if reply.code != 354 {
            // A refusal of DATA leaves the transaction open at the backend: Postfix answers
            // the next MAIL with `503 5.5.1 Error: nested MAIL command`. RSET closes it and
            // keeps the connection for the next transaction.
            self.reset();
            return Ok(reply);
        }
        self.in_transaction = false;
        let io_timeout = self.backend.timeouts.io;
        // The reply to the final dot is waited for in full even if the client has gone,
        // so that the session can log the message's fate. Nothing is locked meanwhile:
        // the SMTP side takes no lock file (the mailbox lock is POP3's), the connect
        // watchdog is not running, and the session's StdoutLock only guards this process's
        // own stdout. Held are the two sockets and the spool file (unlinked, in
        // --spool-dir), which the process gives back when it ends.
        let wait = self.backend.end_of_data_timeout.max(io_timeout);
        let socket = self.socket;
        let conn = self.conn.as_mut().expect("DATA was answered");
        if let Err(e) = conn.set_timeout(Some(wait)) {
            self.drop_connection();
            return Err(RelayError::Lost(format!("setting a timeout: {e}")));
        }
        let mut chunks = Chunks {
            reader: message,
            remaining: len,
            error: None,
            on_error: &|| cut_off(socket),
        };
        let result = conn.message_iter(&mut chunks);
        if let Some(e) = chunks.error {
            // The socket was shut down before lettre could write the final dot, so the
            // backend saw the connection end mid-message and discards it.
            self.drop_connection();
            return Err(RelayError::Local(format!(
                "reading the spooled message failed after {} of {len} bytes: {e}; the \
                 backend connection was cut before the end of data",
                len - chunks.remaining
            )));
        }
        if let Err(e) = &result
            && e.status().is_none()
            && chunks.remaining == 0
            && is_timeout(e)
        {
            let why = format!(
                "no reply to the end of data within {}s: the backend may have accepted the \
                 message, and the client, told to retry, may send it again (a duplicate)",
                wait.as_secs()
            );
            log::warn!("smtp: {}:{}: {why}", self.backend.host, self.backend.port);
            self.drop_connection();
            return Err(RelayError::Lost(why));
        }
        if let Some(conn) = self.conn.as_mut()
            && conn.set_timeout(Some(io_timeout)).is_err()
        {
            self.drop_connection();
        }
        self.judge(result, Stage::EndOfData)
    }

    fn keepalive(&mut self) -> Result<(), RelayError> {
        if self.in_transaction {
            return self.command(Noop, Stage::Noop).map(drop);
        }
        if self.pending_mail.is_some() && self.conn.is_some() {
            // Nothing is open at the backend yet: if the connection is lost anyway, the
            // first RCPT opens another, so the transaction is not lost.
            let _ = self.command(Noop, Stage::Noop);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.pending_mail = None;
        if self.in_transaction {
            self.in_transaction = false;
            // A failed RSET has already dropped the connection; the next MAIL reconnects.
            let _ = self.command(Rset, Stage::Rset);
        }
    }

    fn quit(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            // Not `conn.quit()`: on a failure it sends QUIT a second time and waits again.
            let _ = conn.command(Quit);
        }
        self.socket = None;
        self.pending_mail = None;
        self.in_transaction = false;
    }
}

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF.
const MAX_COMMAND_LINE: usize = 512;

/// One line of a SASL exchange (an AUTH command or a response), CRLF added. No `Debug`: it
/// holds a token.
struct SaslLine(String);

impl fmt::Display for SaslLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\r\n", self.0)
    }
}

/// What the EHLO reply says beyond what lettre keeps.
#[derive(Debug, Default, PartialEq, Eq)]
struct Extensions {
    pipelining: bool,
    /// The OAuth2 mechanism to use from the AUTH list (lettre knows no OAUTHBEARER).
    oauth2: Option<OAuth2Mechanism>,
}

impl Extensions {
    fn parse<'a>(lines: impl Iterator<Item = &'a str>) -> Extensions {
        let mut pipelining = false;
        let mut mechanisms = Vec::new();
        for line in lines {
            let mut words = line.split_whitespace();
            match words.next() {
                Some(k) if k.eq_ignore_ascii_case("PIPELINING") => pipelining = true,
                Some(k) if k.eq_ignore_ascii_case("AUTH") => {
                    mechanisms.extend(words.map(str::to_ascii_uppercase))
                }
                _ => {}
            }
        }
        Extensions {
            pipelining,
            oauth2: OAuth2Mechanism::choose(|m| mechanisms.iter().any(|offered| offered == m)),
        }
    }
}

/// The server's PIPELINING and AUTH mechanisms from its EHLO reply. lettre keeps only the
/// extensions it uses itself, so this asks once more on a fresh connection, before AUTH,
/// where a second EHLO resets nothing (RFC 5321 §4.1.4). A refusal means no extensions; no
/// answer is an error, so that a stalled backend costs one --backend-timeout, not two.
fn extensions(
    conn: &mut SmtpConnection,
    hello: &ClientId,
) -> Result<Extensions, lettre::transport::smtp::Error> {
    match conn.command(Ehlo::new(hello.clone())) {
        Ok(response) => Ok(Extensions::parse(response.message())),
        // A refused EHLO: no extensions.
        Err(e) if e.status().is_some() => Ok(Extensions::default()),
        // A cut or a stall: going on would only wait once more, at AUTH or MAIL.
        Err(e) => Err(e),
    }
}

/// The relay error of a failed connection attempt (no AUTH was tried yet).
fn open_failure<E>(error: OpenError) -> Refusal<E>
where
    E: From<RelayError>,
{
    match error {
        OpenError::Failed(e) => Refusal::Failed(e.into()),
        OpenError::AuthRefused(reply) => Refusal::Failed(
            RelayError::Protocol(format!("AUTH answered {}", reply.summary())).into(),
        ),
    }
}

/// Yields the message in pieces for `message_iter`, without its final CRLF: lettre appends
/// `<CRLF>.<CRLF>` itself, and the CRLF before the dot is the last line's own ending.
/// lettre dot-stuffs across piece boundaries. Memory: one 64 KiB piece at a time.
///
/// An iterator cannot make lettre stop: after the last piece it always writes the final
/// dot. So on a read error `on_error` runs first, and must make sure that dot never
/// reaches the backend, or it would take a truncated message as complete.
struct Chunks<'a> {
    reader: &'a mut dyn Read,
    remaining: u64,
    error: Option<io::Error>,
    on_error: &'a dyn Fn(),
}

const CHUNK: u64 = 64 * 1024;

impl Chunks<'_> {
    fn fail(&mut self, e: io::Error) -> Option<Vec<u8>> {
        (self.on_error)();
        self.error = Some(e);
        None
    }
}

impl Iterator for Chunks<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.remaining == 0 || self.error.is_some() {
            return None;
        }
        if self.remaining <= 2 {
            let mut last = vec![0; self.remaining as usize];
            if let Err(e) = self.reader.read_exact(&mut last) {
                return self.fail(e);
            }
            self.remaining = 0;
            return (last != b"\r\n").then_some(last);
        }
        let want = CHUNK.min(self.remaining - 2) as usize;
        let mut piece = vec![0; want];
        match self.reader.read_exact(&mut piece) {
            Ok(()) => {
                self.remaining -= want as u64;
                Some(piece)
            }
            Err(e) => self.fail(e),
        }
    }
}

fn reply_of(response: &Response) -> Reply {
    let lines: Vec<&str> = response.message().collect();
    Reply::from_backend(response.code().into(), &lines)
}

/// The text of a coded error: lettre keeps the reply's lines joined in the error's source.
fn error_text(e: &lettre::transport::smtp::Error) -> String {
    use std::error::Error;
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

/// Shuts down the backend socket whose local address is `local`, so that nothing more,
/// the final dot above all, can be written to it: the backend sees the connection end in
/// the middle of the data and discards the message (RFC 5321 §4.1.1.4 makes only the final
/// dot complete it). If the socket cannot be found, the process ends instead: the dot must
/// not go out.
fn cut_off(local: Option<SocketAddr>) {
    let cut = local.is_some_and(|local| {
        process_tcp_sockets()
            .into_iter()
            .find(|s| s.local_addr().is_ok_and(|a| a == local))
            .is_some_and(|s| s.shutdown(Shutdown::Both).is_ok())
    });
    if !cut {
        give_up("cannot cut the backend connection after a spool read error");
    }
}

/// This process's TCP sockets above descriptor 2 (0–2 are the client's).
///
/// lettre gives no access to its socket, but each process serves one client and holds at
/// most one backend connection, so the socket is found among the process's descriptors
/// (Linux `/proc`).
fn process_tcp_sockets() -> Vec<ManuallyDrop<TcpStream>> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .filter_map(tcp_socket)
        .collect()
}

/// The TCP sockets of this process connected to peer port `port`.
fn tcp_sockets_to(port: u16) -> Vec<ManuallyDrop<TcpStream>> {
    process_tcp_sockets()
        .into_iter()
        .filter(|s| s.peer_addr().is_ok_and(|peer| peer.port() == port))
        .collect()
}

/// Descriptor `fd` as a TCP stream that is never closed here, if it is a socket.
fn tcp_socket(fd: std::os::fd::RawFd) -> Option<ManuallyDrop<TcpStream>> {
    use std::os::fd::FromRawFd;
    let is_socket = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
    // SAFETY: `fd` is an open socket of this process (checked just above). ManuallyDrop
    // keeps it from being closed here. Only getsockname, getpeername, setsockopt and
    // shutdown are called on it; they fail harmlessly on non-TCP sockets, and if the main
    // thread closed the descriptor meanwhile (the connect watchdog runs beside it), they
    // fail with EBADF or act on a socket that the same check would have found.
    is_socket.then(|| ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) }))
}

/// A lettre error caused by a socket timeout (a `WouldBlock` on Linux, see CRATES.md).
fn is_timeout(e: &lettre::transport::smtp::Error) -> bool {
    use std::error::Error;
    e.source()
        .and_then(|s| s.downcast_ref::<io::Error>())
        .is_some_and(|e| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        })
}

/// Bounds a connection attempt that lettre runs without timeouts of its own.
struct Watchdog {
    /// The TCP connection must be established within this.
    connect: Duration,
    /// The whole step must be done within this.
    limit: Duration,
    port: u16,
    what: String,
}

impl Watchdog {
    /// Runs `f`; ends the process (see [`give_up`]) if no TCP connection to `port` exists
    /// after `connect`, or `f` has not returned after `limit`.
    fn run<T>(self, f: impl FnOnce() -> T) -> T {
        use std::sync::mpsc::{RecvTimeoutError, channel};
        let (done, wait) = channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let timed_out = |d| matches!(wait.recv_timeout(d), Err(RecvTimeoutError::Timeout));
            if !timed_out(self.connect) {
                return;
            }
            if tcp_sockets_to(self.port).is_empty() {
                give_up(&format!(
                    "{}: no TCP connection within {}s",
                    self.what,
                    self.connect.as_secs_f64()
                ));
            }
            if timed_out(self.limit.saturating_sub(self.connect)) {
                give_up(&format!(
                    "{} took more than {}s",
                    self.what,
                    self.limit.as_secs_f64()
                ));
            }
        });
        let result = f();
        drop(done);
        let _ = watchdog.join();
        result
    }
}

/// Logs, tells the client `421` (RFC 5321 §3.8: the service is closing the channel; it
/// retries later) and ends the process. For states the session cannot be brought out of
/// by the thread that is stuck in them.
fn give_up(why: &str) -> ! {
    use std::os::fd::FromRawFd;
    log::error!("smtp: {why}; closing the session");
    // SAFETY: fd 1 is the client's connection for the whole process; ManuallyDrop keeps
    // it open. The session thread writes whole replies and flushes each one, and it is
    // inside a backend call now, so this reply cannot land in the middle of another.
    let mut out = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
    let _ = out.write_all(b"421 4.4.2 Backend not responding; closing connection\r\n");
    std::process::exit(75);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::oauth2::login::testing::Tokens;
    use crate::smtp::fake_backend::{FakeSmtp, Journal, Script};
    use std::time::Instant;

    fn pieces(message: &[u8]) -> Vec<Vec<u8>> {
        let mut reader = message;
        let chunks = Chunks {
            reader: &mut reader,
            remaining: message.len() as u64,
            error: None,
            on_error: &|| panic!("no read error expected"),
        };
        chunks.collect()
    }

    #[test]
    fn the_final_crlf_is_left_for_lettre_to_add_with_the_dot() {
        assert_eq!(pieces(b"a\r\nb\r\n").concat(), b"a\r\nb");
        assert_eq!(pieces(b"\r\n").concat(), b"");
        assert_eq!(pieces(b"x").concat(), b"x");
        let big = [b"x".repeat(200_000), b"\r\n".to_vec()].concat();
        let got = pieces(&big);
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|p| p.len() <= CHUNK as usize));
        assert_eq!(got.concat(), b"x".repeat(200_000));
    }

    #[test]
    fn a_short_read_is_an_error_not_a_shorter_message() {
        let mut reader: &[u8] = b"abc";
        let called = std::cell::Cell::new(false);
        let mut chunks = Chunks {
            reader: &mut reader,
            remaining: 10,
            error: None,
            on_error: &|| called.set(true),
        };
        assert_eq!(chunks.next(), None);
        assert!(chunks.error.is_some());
        assert!(called.get(), "the connection is cut before lettre goes on");
    }

    fn relay_to(fake: &FakeSmtp) -> SmtpRelay {
        SmtpRelay::new(Backend {
            host: "127.0.0.1".into(),
            port: fake.port,
            tls: TlsMode::None,
            tls_parameters: None,
            timeouts: Timeouts {
                connect: Duration::from_secs(5),
                io: Duration::from_secs(5),
            },
            end_of_data_timeout: END_OF_DATA_TIMEOUT,
            hello: "proxy.test".into(),
            credentials: None,
            oauth2: None,
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

    fn open_transaction(relay: &mut SmtpRelay) {
        assert_eq!(relay.mail("a@c.test").unwrap().code, 250);
        assert_eq!(relay.rcpt("b@d.test").unwrap().code, 250);
    }

    /// Gives `good` bytes, then fails.
    struct FailingReader {
        good: usize,
    }

    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.good == 0 {
                return Err(io::Error::other("spool disk error"));
            }
            let n = buf.len().min(self.good);
            buf[..n].fill(b'x');
            self.good -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_spool_read_error_cuts_the_connection_before_the_final_dot() {
        let fake = FakeSmtp::start(Script::default());
        let mut relay = relay_to(&fake);
        open_transaction(&mut relay);
        let result = relay.data(&mut FailingReader { good: 200_000 }, 300_000);
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
        assert!(journal.incomplete[0].len() <= 200_000);
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
                // The second EHLO asks for PIPELINING, which lettre does not keep.
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
        let fake_gone = relay.socket.unwrap();
        cut_off(Some(fake_gone));
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
            journal.commands[3..],
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
            assert_eq!(
                journal.commands.iter().filter(|c| *c == "*CONNECT").count(),
                2
            );
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
        assert_eq!(
            journal.commands.iter().filter(|c| *c == "*CONNECT").count(),
            1
        );
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
        assert_eq!(
            journal.commands.iter().filter(|c| *c == "*CONNECT").count(),
            2
        );
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
        assert_eq!(commands.iter().filter(|c| *c == "*CONNECT").count(), 1);
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
        assert_eq!(commands.iter().filter(|c| *c == "*CONNECT").count(), 2);
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

    #[test]
    fn ehlo_auth_lists_choose_the_oauth2_mechanism() {
        let parse = |lines: &[&str]| Extensions::parse(lines.iter().copied());
        assert_eq!(
            parse(&["fake", "PIPELINING", "AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER"]),
            Extensions {
                pipelining: true,
                oauth2: Some(OAuth2Mechanism::OAuthBearer)
            }
        );
        assert_eq!(
            parse(&["AUTH LOGIN xoauth2"]).oauth2,
            Some(OAuth2Mechanism::XOAuth2)
        );
        assert_eq!(parse(&["AUTH PLAIN", "8BITMIME"]), Extensions::default());
    }

    #[test]
    fn upstream_commands_are_exact_wire_lines() {
        assert_eq!(
            MailCmd {
                from: "a@b",
                eight_bit: true
            }
            .to_string(),
            "MAIL FROM:<a@b> BODY=8BITMIME\r\n"
        );
        assert_eq!(
            MailCmd {
                from: "",
                eight_bit: false
            }
            .to_string(),
            "MAIL FROM:<>\r\n"
        );
        assert_eq!(RcptCmd("x@y").to_string(), "RCPT TO:<x@y>\r\n");
    }
}
