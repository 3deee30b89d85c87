//! The real maildrop: one mailbox on an IMAP server (RFC 3501), read with UID commands.
//!
//! At login the proxy selects the mailbox and lists UIDs, sizes and flags in one round
//! trip; that list is the session's snapshot. That listing and every message body are read
//! straight off the connection ([`RawCommand`]), bodies streamed to the client as they
//! arrive, never through the `imap` crate: it holds a whole response in memory and, for a
//! literal, re-parses the response from its start after every line (half the proxy's CPU
//! time in a download; most of the login's CPU time for a 20,000-message list).
//! RETR is one `UID FETCH … BODY.PEEK[]`; TOP fetches growing partial ranges. Deletes
//! happen only in UPDATE, by UID, the way the configured policy says; a plain EXPUNGE is
//! never sent, because it would also remove messages other clients flagged `\Deleted`.

use super::DeletePolicy;
use super::imap_oauth2::{self, Offers};
use super::maildrop::{
    BackendError, Credentials, Extent, FetchError, Maildrop, MessageInfo, MessageSink, OpenError,
    Opener, Update,
};
use super::selected::{Selected, status_guid};
use crate::lock::{self, LockError, MailboxLock};
use crate::net::{self, Stream, Timeouts, TlsMode};
use crate::oauth2::login::{Account, Failure, Refusal};
use crate::oauth2::sasl::Target;
use crate::starttls::Protocol;
use std::cell::RefCell;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::rc::Rc;

/// The largest partial fetch for TOP: what is fetched, the client does not always need.
pub const FETCH_CHUNK: usize = 1 << 20;

/// The first fetch for TOP: most headers fit.
const HEAD_CHUNK: usize = 16 << 10;

/// Where and how to reach the IMAP server.
#[derive(Clone)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// `Err` holds why TLS could not be set up (a bad CA file): every login then fails
    /// with `[SYS/PERM]` rather than the process dying silently.
    pub connector: Result<native_tls::TlsConnector, String>,
    pub timeouts: Timeouts,
}

/// Who logs in to IMAP.
#[derive(Clone)]
pub enum Login {
    /// The client's own credentials.
    Passthrough,
    /// A configured account. `client` is what clients must present, `None` to accept any.
    Fixed {
        user: String,
        password: String,
        client: Option<(String, String)>,
    },
    /// The OAuth2 account in [`ImapOpener::oauth2`], with `AUTHENTICATE OAUTHBEARER` or
    /// `XOAUTH2`. `client` is what clients must present, `None` to accept any.
    OAuth2 { client: Option<(String, String)> },
}

/// Everything the IMAP maildrop needs besides the server.
#[derive(Clone)]
pub struct Settings {
    pub login: Login,
    pub mailbox: String,
    pub policy: DeletePolicy,
    pub deleted_keyword: String,
    pub trash_mailbox: String,
    pub mark_seen: bool,
    /// `None` turns the RFC 1939 exclusive-access lock off.
    pub lock_dir: Option<PathBuf>,
    /// How the lock key treats the user's domain when the server has no MAILBOXID.
    pub lock_user_domain: lock::UserDomain,
}

/// Where and for whom the session's lock is taken, once the mailbox is selected.
struct LockPlan {
    dir: PathBuf,
    host: String,
    /// The user name that logged in to IMAP.
    user: String,
}

pub struct ImapOpener {
    pub server: Server,
    pub settings: Settings,
    /// The account of [`Login::OAuth2`], shared with the open maildrop so that it can log
    /// in again (see [`ImapMaildrop::log_in_again`]).
    pub oauth2: Option<Rc<RefCell<Account>>>,
}

/// What a maildrop needs to log in again with the OAuth2 account.
struct Relogin {
    server: Server,
    account: Rc<RefCell<Account>>,
}

type ImapSession = imap::Session<Shared>;

/// The IMAP connection, shared by the `imap` crate and [`RawCommand`] (the message list and
/// body fetches). They take turns, a whole command and response at a time. Bytes a
/// `RawCommand` read past its own response are handed back through `unread`, so the crate
/// never misses any (servers send nothing between responses, but that is not relied on).
#[derive(Clone)]
struct Shared(Rc<RefCell<SharedInner>>);

struct SharedInner {
    stream: Stream,
    unread: Vec<u8>,
}

impl Shared {
    fn new(stream: Stream) -> Shared {
        Shared(Rc::new(RefCell::new(SharedInner {
            stream,
            unread: Vec::new(),
        })))
    }
}

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut inner = self.0.borrow_mut();
        if inner.unread.is_empty() {
            return inner.stream.read(buf);
        }
        let n = buf.len().min(inner.unread.len());
        buf[..n].copy_from_slice(&inner.unread[..n]);
        inner.unread.drain(..n);
        Ok(n)
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().stream.flush()
    }
}

/// With a configured login, the client must present the configured client credentials
/// (`None`: anyone may log in).
fn check_client(
    expected: &Option<(String, String)>,
    credentials: &Credentials,
) -> Result<(), OpenError> {
    let Some((client_user, client_password)) = expected else {
        return Ok(());
    };
    // Both compared, always, so timing tells nothing about which was wrong.
    let user_ok = crate::secret::equal(client_user.as_bytes(), credentials.user.as_bytes());
    let password_ok =
        crate::secret::equal(client_password.as_bytes(), credentials.password.as_bytes());
    match user_ok & password_ok {
        true => Ok(()),
        false => Err(OpenError::Auth("client credentials do not match".into())),
    }
}

impl Opener for ImapOpener {
    fn open(&mut self, credentials: &Credentials) -> Result<Box<dyn Maildrop>, OpenError> {
        let (user, password) = match &self.settings.login {
            Login::Passthrough => (credentials.user, credentials.password),
            Login::Fixed {
                user,
                password,
                client,
            } => {
                check_client(client, credentials)?;
                (user.as_str(), password.as_str())
            }
            Login::OAuth2 { client } => {
                check_client(client, credentials)?;
                let Some(account) = self.oauth2.clone() else {
                    return Err(OpenError::Permanent("no OAuth2 account configured".into()));
                };
                let (session, raw, user) = oauth2_session(&self.server, &mut account.borrow_mut())?;
                let relogin = Relogin {
                    server: self.server.clone(),
                    account,
                };
                return self.select(session, raw, &user, Some(relogin));
            }
        };
        let (client, raw, _) = connect(&self.server)?;
        log::debug!(
            "connected to {}:{} ({:?}), logging in as {}",
            self.server.host,
            self.server.port,
            self.server.tls,
            user.escape_debug()
        );
        let session = match client.login(user, password) {
            Ok(session) => session,
            Err((error, _client)) => return Err(login_error(error)),
        };
        self.select(session, raw, user, None)
    }
}

/// A connection ready for LOGIN, and its greeting (`None` after STARTTLS).
type Connected = (imap::Client<Shared>, Shared, Option<Vec<u8>>);

/// A connection ready for AUTHENTICATE, and what its server offers.
type Unauthenticated = (imap::Client<Shared>, Shared, Offers);

impl ImapOpener {
    /// Opens the maildrop on a logged-in session of `user`.
    fn select(
        &self,
        session: ImapSession,
        raw: Shared,
        user: &str,
        relogin: Option<Relogin>,
    ) -> Result<Box<dyn Maildrop>, OpenError> {
        let lock = self.settings.lock_dir.as_ref().map(|dir| LockPlan {
            dir: dir.clone(),
            host: self.server.host.clone(),
            user: user.to_string(),
        });
        match ImapMaildrop::open(session, raw, self.settings.clone(), lock, relogin) {
            Ok(maildrop) => Ok(Box::new(maildrop)),
            Err(e) => Err(e),
        }
    }
}

/// Logs in with the OAuth2 account: one token, and after a rejection one renewal and one
/// retry, on the same connection when the server keeps it open (RFC 3501 allows another
/// AUTHENTICATE after NO), else on a new one. A token that cannot be had, or a renewed one
/// rejected too, is `[SYS/TEMP]` for the client (its own password was right) and the
/// session's one log line tells the admin what to run.
fn oauth2_session(
    server: &Server,
    account: &mut Account,
) -> Result<(ImapSession, Shared, String), OpenError> {
    let target = Target {
        host: &server.host,
        port: server.port,
    };
    let mut kept: Option<Unauthenticated> = None;
    let result = account.login(|user, token| {
        let reused = kept.is_some();
        let (client, raw, offers) = match kept.take() {
            Some(connection) => connection,
            None => connect_for_oauth2(server).map_err(Refusal::Failed)?,
        };
        match imap_oauth2::authenticate(client, &offers, user, token, target) {
            Ok(session) => Ok((session, raw, user.to_string())),
            Err((refusal, Some(client))) => {
                kept = Some((client, raw, offers));
                Err(refusal)
            }
            // The server closed the connection after rejecting the first token.
            Err((Refusal::Failed(_), None)) if reused => {
                let (client, raw, offers) = connect_for_oauth2(server).map_err(Refusal::Failed)?;
                imap_oauth2::authenticate(client, &offers, user, token, target)
                    .map(|session| (session, raw, user.to_string()))
                    .map_err(|(refusal, _)| refusal)
            }
            Err((refusal, None)) => Err(refusal),
        }
    });
    let error = match result {
        Ok(done) => return Ok(done),
        Err(Failure::Failed(e)) => e,
        Err(Failure::Token(e)) => OpenError::Temporary(account.advice(&e)),
    };
    Err(error)
}

/// Connects, and learns from the greeting or a CAPABILITY command which OAuth2 mechanism
/// the server takes and whether it has SASL-IR.
fn connect_for_oauth2(server: &Server) -> Result<Unauthenticated, OpenError> {
    let (mut client, raw, greeting) = connect(server)?;
    let offers = match greeting.as_deref().and_then(Offers::from_greeting) {
        Some(offers) => offers,
        None => {
            let capabilities = client.capabilities().map_err(|e| {
                OpenError::Temporary(format!(
                    "CAPABILITY failed at {}:{}: {}",
                    server.host,
                    server.port,
                    describe(&e)
                ))
            })?;
            let names: Vec<String> = ["AUTH=OAUTHBEARER", "AUTH=XOAUTH2", "SASL-IR"]
                .into_iter()
                .filter(|name| capabilities.has_str(name))
                .map(String::from)
                .collect();
            Offers::from_names(&names)
        }
    };
    Ok((client, raw, offers))
}

/// Connects and reads the greeting; after this the client is ready for LOGIN. Returns the
/// greeting too, unless STARTTLS made it obsolete (RFC 3501 §6.2.1: capabilities must be
/// asked again after TLS).
fn connect(server: &Server) -> Result<Connected, OpenError> {
    let temporary = |what: &str, e: &dyn std::fmt::Display| {
        OpenError::Temporary(format!(
            "{what} {}:{}: {e}{}",
            server.host,
            server.port,
            mode_hint(server.tls, &e.to_string())
        ))
    };
    let connector = match (&server.connector, server.tls) {
        (_, TlsMode::None) => None,
        (Ok(connector), _) => Some(connector),
        (Err(why), _) => return Err(OpenError::Permanent(why.clone())),
    };
    let mut tcp = net::connect_tcp(&server.host, server.port, server.timeouts)
        .map_err(|e| temporary("cannot connect to", &e))?;
    let stream = match (server.tls, connector) {
        (TlsMode::Starttls, Some(connector)) => {
            // Read a byte at a time, so nothing after the OK is consumed: the next bytes
            // belong to the TLS handshake (and injected plain text fails it).
            crate::starttls::negotiate(Protocol::Imap, &mut tcp)
                .map_err(|e| temporary("STARTTLS failed with", &format!("{e:#}")))?;
            let tls = net::wrap_tls(connector, &server.host, tcp)
                .map_err(|e| temporary("TLS failed with", &e))?;
            // No greeting follows STARTTLS (RFC 3501 §6.2.1).
            let raw = Shared::new(tls);
            return Ok((imap::Client::new(raw.clone()), raw, None));
        }
        (TlsMode::Implicit, Some(connector)) => net::wrap_tls(connector, &server.host, tcp)
            .map_err(|e| temporary("TLS failed with", &e))?,
        _ => Stream::Plain(tcp),
    };
    let raw = Shared::new(stream);
    let mut client = imap::Client::new(raw.clone());
    let greeting = client
        .read_greeting()
        .map_err(|e| temporary("no greeting from", &e))?;
    if !greeting.starts_with(b"* OK") {
        return Err(temporary(
            "refused by",
            &String::from_utf8_lossy(&greeting).trim_end(),
        ));
    }
    if server.tls == TlsMode::None {
        let capabilities = client
            .capabilities()
            .map_err(|e| temporary("CAPABILITY failed at", &e))?;
        if capabilities.has_str("LOGINDISABLED") {
            return Err(OpenError::Permanent(format!(
                "{}:{} refuses LOGIN without TLS (LOGINDISABLED); use --imap-tls starttls",
                server.host, server.port
            )));
        }
    }
    Ok((client, raw, Some(greeting)))
}

/// The usual cause of two puzzling failures: a TLS mode that does not fit the port.
fn mode_hint(mode: TlsMode, error: &str) -> &'static str {
    let timed_out = error.contains("temporarily unavailable") || error.contains("timed out");
    match mode {
        TlsMode::Implicit if error.contains("wrong version number") => {
            " (the server did not start TLS: a plain port? try --imap-tls starttls)"
        }
        TlsMode::Starttls | TlsMode::None if timed_out => {
            " (timed out: if this port speaks TLS from the start, use --imap-tls implicit)"
        }
        _ => "",
    }
}

/// Sorts a failed LOGIN into "wrong password" and "server trouble" (RFC 5530 codes).
///
/// Only a plain NO, or one with `[AUTHENTICATIONFAILED]`, means the password is wrong:
/// anything else must not reach the client as `[AUTH]`, or it would ask the user for a new
/// password while the fault is elsewhere (RFC 3206 §5).
pub(super) fn login_error(error: imap::Error) -> OpenError {
    match error {
        imap::Error::No(no) => {
            // The imap crate keeps codes it does not know inside the text.
            let text = format!("{:?} {}", no.code, no.information).to_ascii_uppercase();
            let has = |code: &str| text.contains(&format!("[{code}]")) || text.contains(code);
            let why = format!("LOGIN: {}", no.information);
            if ["UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE"]
                .iter()
                .any(|c| has(c))
            {
                OpenError::Temporary(why)
            } else if ["PRIVACYREQUIRED", "CONTACTADMIN", "EXPIRED"]
                .iter()
                .any(|c| has(c))
            {
                OpenError::Permanent(why)
            } else {
                OpenError::Auth(why)
            }
        }
        // LOGIN refuses CR and LF in credentials: no server would accept them either.
        imap::Error::Validate(_) => OpenError::Auth("credentials contain CR or LF".into()),
        // The server did not understand our LOGIN: not the user's password at fault.
        imap::Error::Bad(bad) => OpenError::Permanent(format!("LOGIN: {}", bad.information)),
        other => OpenError::Temporary(format!("LOGIN: {}", describe(&other))),
    }
}

pub(super) fn describe(error: &imap::Error) -> String {
    match error {
        imap::Error::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            "timed out waiting for the IMAP server".into()
        }
        other => other.to_string(),
    }
}

/// An open IMAP session on the selected mailbox, with the snapshot taken at login.
pub struct ImapMaildrop {
    session: ImapSession,
    /// The same connection, for body fetches.
    raw: Shared,
    /// Tags of body fetches: `L1`, `L2`… (the listing's is `L0`, the crate's `a1`, `a2`…).
    fetches: u32,
    settings: Settings,
    uids: Vec<u32>,
    messages: Vec<MessageInfo>,
    /// Why the delete policy cannot work on this server, found at login.
    cannot_delete: Option<String>,
    has_move: bool,
    /// Why the connection cannot be used any more (a timeout or a cut, possibly in the
    /// middle of a response): later commands fail at once, and close sends no LOGOUT.
    broken: Option<String>,
    /// Whether the server ended the connection (`* BYE`, or it closed it): then, with an
    /// OAuth2 account, the session can log in again.
    ended_by_server: bool,
    relogin: Option<Relogin>,
    uid_validity: u32,
    _lock: Option<MailboxLock>,
}

impl ImapMaildrop {
    fn open(
        mut session: ImapSession,
        raw: Shared,
        settings: Settings,
        lock: Option<LockPlan>,
        relogin: Option<Relogin>,
    ) -> Result<Self, OpenError> {
        let temporary = |e: imap::Error| OpenError::Temporary(describe(&e));
        // Only moving and expunging depend on extensions; keep and hide (the default) skip
        // the round trip, which is a noticeable part of a short session.
        let (has_uidplus, has_move) = match settings.policy {
            DeletePolicy::Trash | DeletePolicy::Expunge => {
                let capabilities = session.capabilities().map_err(temporary)?;
                (
                    capabilities.has_str("UIDPLUS"),
                    capabilities.has_str("MOVE"),
                )
            }
            DeletePolicy::Keep | DeletePolicy::Hide => (false, false),
        };
        let mailbox = select_mailbox(&mut session, &settings)?;
        log::debug!(
            "selected {:?}: {} messages, read-only {}, permanent flags {:?}, mailbox id {:?}",
            settings.mailbox,
            mailbox.exists,
            mailbox.read_only,
            mailbox.permanent_flags,
            mailbox.mailbox_id
        );
        // Taken before anything is read or changed: the session answers no command on
        // this mailbox without it.
        let lock = match lock {
            None => None,
            Some(plan) => match lock_selected(&plan, &raw, &mailbox, &settings) {
                Ok(lock) => Some(lock),
                Err(e) => {
                    let _ = session.logout();
                    return Err(e);
                }
            },
        };
        let Some(uid_validity) = mailbox.uid_validity else {
            return Err(OpenError::Permanent("server sent no UIDVALIDITY".into()));
        };
        let keyword_allowed = mailbox.allows_keyword(&settings.deleted_keyword);
        let cannot_delete = match settings.policy {
            DeletePolicy::Keep => None,
            DeletePolicy::Hide if !keyword_allowed => Some(format!(
                "the server does not allow keyword {} on {} (PERMANENTFLAGS)",
                settings.deleted_keyword, settings.mailbox
            )),
            DeletePolicy::Trash if !has_move && !has_uidplus => Some(
                "the server has neither MOVE nor UIDPLUS, so messages cannot be moved to trash \
                 without touching other clients' \\Deleted messages"
                    .into(),
            ),
            DeletePolicy::Expunge if !has_uidplus => Some(
                "the server lacks UIDPLUS (UID EXPUNGE); a plain EXPUNGE would also remove \
                 other clients' \\Deleted messages"
                    .into(),
            ),
            _ if mailbox.read_only => Some(format!("mailbox {} is read-only", settings.mailbox)),
            _ => None,
        };
        let mut listed = Vec::new();
        if mailbox.exists > 0 {
            let hide = (settings.policy == DeletePolicy::Hide)
                .then_some(settings.deleted_keyword.as_str());
            let mut command = RawCommand::new(&raw, "L0".into());
            let result = command.list(hide);
            command.finish();
            listed = result.map_err(OpenError::Temporary)?;
        }
        listed.sort_unstable();
        listed.dedup_by_key(|(uid, _)| *uid);
        let uids = listed.iter().map(|(uid, _)| *uid).collect();
        let messages = listed
            .iter()
            .map(|&(uid, size)| MessageInfo {
                size,
                // Dovecot's default pop3_uidl_format `%08Xu%08Xv`, which Dovecot prints in
                // lower case: a client moving between Dovecot's POP3 and this proxy then
                // does not download everything again.
                uidl: format!("{uid:08x}{uid_validity:08x}"),
            })
            .collect();
        Ok(ImapMaildrop {
            session,
            raw,
            fetches: 0,
            settings,
            uids,
            messages,
            cannot_delete,
            has_move,
            broken: None,
            ended_by_server: false,
            relogin,
            uid_validity,
            _lock: lock,
        })
    }

    fn uid_set(&self, indexes: &[usize]) -> String {
        let mut uids: Vec<u32> = indexes.iter().map(|&i| self.uids[i]).collect();
        uids.sort_unstable();
        uid_set(&uids)
    }
}

/// SELECT, or EXAMINE when the session will change nothing.
fn select_mailbox(session: &mut ImapSession, settings: &Settings) -> Result<Selected, OpenError> {
    let read_only = settings.policy == DeletePolicy::Keep && !settings.mark_seen;
    let verb = if read_only { "EXAMINE" } else { "SELECT" };
    match session.run(format!("{verb} {}", quoted(&settings.mailbox))) {
        Ok((response, _)) => Ok(Selected::parse(&response)),
        Err(imap::Error::No(no)) => Err(OpenError::Permanent(format!(
            "cannot open mailbox {:?}: {}",
            settings.mailbox, no.information
        ))),
        Err(e) => Err(OpenError::Temporary(describe(&e))),
    }
}

/// Locks the mailbox the server selected: by its MAILBOXID where the server has one, else by
/// its Dovecot GUID, else by the user name as the admin chose to normalise it. Either way
/// after a successful login and SELECT, so lock files exist only for mailboxes that exist.
fn lock_selected(
    plan: &LockPlan,
    raw: &Shared,
    selected: &Selected,
    settings: &Settings,
) -> Result<MailboxLock, OpenError> {
    // Asked after SELECT, and only when SELECT named no MAILBOXID, so servers with
    // OBJECTID pay no round trip. Dovecot then adds [CLIENTBUG] to its OK (a STATUS on the
    // selected mailbox), which changes nothing.
    let guid = match &selected.mailbox_id {
        Some(_) => None,
        None => {
            let mut status = RawCommand::new(raw, "G0".into());
            let guid = status.mailbox_guid(&settings.mailbox);
            status.finish();
            guid.map_err(OpenError::Temporary)?
        }
    };
    let mailbox = match (&selected.mailbox_id, &guid) {
        (Some(id), _) => lock::Mailbox::Id {
            kind: "mailboxid",
            id,
        },
        (None, Some(id)) => lock::Mailbox::Id { kind: "x-guid", id },
        (None, None) => lock::Mailbox::Named {
            user: &plan.user,
            mailbox: &settings.mailbox,
            domain: settings.lock_user_domain,
        },
    };
    let key = lock::key(&plan.host, mailbox);
    log::debug!("mailbox lock {}", key.escape_debug());
    match lock::acquire(&plan.dir, &key) {
        Ok(lock) => Ok(lock),
        Err(LockError::Held) => Err(OpenError::InUse),
        Err(LockError::Io(e)) => Err(OpenError::Permanent(format!(
            "cannot create lock in {}: {e}",
            plan.dir.display()
        ))),
    }
}

/// A UID set built from numbers only ("3:5,9"): the `imap` crate does not validate sets.
fn uid_set(sorted: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

impl Maildrop for ImapMaildrop {
    fn messages(&self) -> &[MessageInfo] {
        &self.messages
    }

    fn fetch(
        &mut self,
        index: usize,
        extent: Extent,
        sink: &mut dyn MessageSink,
    ) -> Result<(), FetchError> {
        self.usable().map_err(FetchError::Backend)?;
        let uid = self.uids[index];
        let mut offset = 0usize;
        // TOP usually needs only the header: start small and grow, so header downloads
        // over a mailbox of large messages do not pull a megabyte each. RETR takes the
        // whole message in one command: streaming bounds the memory, not the range.
        let mut chunk = match extent {
            Extent::Whole => None,
            Extent::Head => Some(HEAD_CHUNK),
        };
        let mut sink = Watched {
            sink,
            started: false,
        };
        let mut logged_in_again = false;
        loop {
            self.fetches += 1;
            let tag = format!("L{}", self.fetches);
            let section = match chunk {
                None => "BODY.PEEK[]".to_string(),
                Some(chunk) => format!("BODY.PEEK[]<{offset}.{chunk}>"),
            };
            let command = format!("UID FETCH {uid} ({section})");
            let mut reader = RawCommand::new(&self.raw, tag);
            let result = reader.fetch(&command, offset == 0, chunk, &mut sink);
            reader.finish();
            let (length, more) = match result {
                Ok(Some(body)) => body,
                // Dovecot answers OK with no data for a UID expunged elsewhere.
                Ok(None) | Err(Chunk::No(_)) if offset == 0 => return Err(FetchError::Gone),
                Ok(None) => {
                    return Err(FetchError::Backend(BackendError(
                        "message vanished while being fetched".into(),
                    )));
                }
                Err(Chunk::Client(e)) => {
                    // The rest of the response is still coming: the connection is out of
                    // step with its commands.
                    self.broken = Some("the client failed in the middle of a message".into());
                    return Err(FetchError::Client(e));
                }
                Err(Chunk::No(why)) => return Err(FetchError::Backend(BackendError(why))),
                Err(Chunk::Backend(why)) => {
                    self.ended_by_server = why == SERVER_CLOSED;
                    self.broken = Some(why.clone());
                    // Nothing reached the client yet: the fetch can start over on a new
                    // session, once.
                    if !sink.started && !logged_in_again && self.log_in_again() {
                        logged_in_again = true;
                        continue;
                    }
                    return Err(FetchError::Backend(BackendError(why)));
                }
            };
            offset += length;
            match chunk {
                Some(size) if more && length == size => chunk = Some((size * 2).min(FETCH_CHUNK)),
                _ => return Ok(()),
            }
        }
    }

    fn mark_retrieved(&mut self, index: usize) -> Result<(), BackendError> {
        if !self.settings.mark_seen {
            return Ok(());
        }
        self.usable()?;
        let set = self.uids[index].to_string();
        let stored = self.session.uid_store(set, "+FLAGS.SILENT (\\Seen)");
        stored.map(drop).map_err(|e| self.lost(e))
    }

    fn check_delete(&self) -> Result<(), String> {
        match &self.cannot_delete {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    fn keepalive(&mut self) -> Result<(), BackendError> {
        self.usable()?;
        let noop = self.session.noop();
        match noop.map_err(|e| self.lost(e)) {
            Err(_) if self.log_in_again() => Ok(()),
            other => other,
        }
    }

    fn delete(&mut self, indexes: &[usize]) -> Result<Update, BackendError> {
        if let Some(why) = &self.cannot_delete {
            return Err(BackendError(why.clone()));
        }
        if self.settings.policy == DeletePolicy::Keep {
            return Ok(Update::Kept);
        }
        self.usable()?;
        let set = self.uid_set(indexes);
        let mut applied = self.apply_delete(&set).map_err(|e| self.lost(e));
        if applied.is_err() && self.log_in_again() {
            // The server ended the session before acting on the command (a `* BYE` in
            // its place); the policy's commands act by UID and may be sent again.
            applied = self.apply_delete(&set).map_err(|e| self.lost(e));
        }
        applied.map(|()| Update::Applied)
    }

    fn close(&mut self) {
        match &self.broken {
            // LOGOUT's answer would be waited for in vain, for another --backend-timeout.
            Some(why) => log::debug!("no LOGOUT: the IMAP connection is unusable ({why})"),
            None => {
                let _ = self.session.logout();
            }
        }
    }
}

impl ImapMaildrop {
    /// Fails at once when an earlier command left the connection unusable, unless the
    /// session could log in again.
    fn usable(&mut self) -> Result<(), BackendError> {
        if self.broken.is_some() {
            self.log_in_again();
        }
        match &self.broken {
            Some(why) => Err(BackendError(format!("IMAP connection lost earlier: {why}"))),
            None => Ok(()),
        }
    }

    /// The error of a command; unless the server answered it (NO, BAD), the connection is
    /// now unusable: timed out, cut, or stopped in the middle of a response.
    fn lost(&mut self, error: imap::Error) -> BackendError {
        let why = describe(&error);
        if !matches!(error, imap::Error::No(_) | imap::Error::Bad(_)) {
            self.broken = Some(why.clone());
            self.ended_by_server =
                matches!(error, imap::Error::Bye(_) | imap::Error::ConnectionLost);
        }
        BackendError(why)
    }

    /// Logs in again with the OAuth2 account after the server ended the session, and
    /// selects the mailbox again; `true` when the session can go on. Exchange Online ends
    /// an OAuth2 IMAP session when its token expires (`* BYE Session invalidated -
    /// AccessTokenExpired`), which would otherwise cut a long POP3 session. The snapshot
    /// (message numbers, UIDLs) still holds only if UIDVALIDITY is unchanged; the mailbox
    /// lock is this process's and stays held. Tried once per loss: a timeout or a cut the
    /// server did not make is not retried, and neither is a failed attempt.
    fn log_in_again(&mut self) -> bool {
        let (Some(why), true, Some(relogin)) = (&self.broken, self.ended_by_server, &self.relogin)
        else {
            return false;
        };
        let why = why.clone();
        self.ended_by_server = false;
        let again = oauth2_session(&relogin.server, &mut relogin.account.borrow_mut()).and_then(
            |(mut session, raw, _)| {
                let selected = select_mailbox(&mut session, &self.settings)?;
                match selected.uid_validity == Some(self.uid_validity) {
                    true => Ok((session, raw)),
                    false => Err(OpenError::Permanent(
                        "the mailbox's UIDVALIDITY changed, so the session's messages are \
                         no longer the same"
                            .into(),
                    )),
                }
            },
        );
        match again {
            Ok((session, raw)) => {
                log::info!(
                    "the IMAP server ended the session ({why}); logged in again with the OAuth2 account"
                );
                self.session = session;
                self.raw = raw;
                self.broken = None;
                true
            }
            Err(e) => {
                log::warn!(
                    "the IMAP server ended the session ({why}); logging in again failed: {e}"
                );
                false
            }
        }
    }

    /// Applies the delete policy to the UIDs in `set` (UPDATE state, RFC 1939 §6).
    fn apply_delete(&mut self, set: &str) -> imap::Result<()> {
        let session = &mut self.session;
        match self.settings.policy {
            DeletePolicy::Keep => {}
            DeletePolicy::Hide => {
                let flags = format!("+FLAGS.SILENT ({})", self.settings.deleted_keyword);
                session.uid_store(set, flags)?;
            }
            DeletePolicy::Expunge => {
                session.uid_store(set, "+FLAGS.SILENT (\\Deleted)")?;
                session.uid_expunge(set)?;
            }
            DeletePolicy::Trash => {
                let trash = self.settings.trash_mailbox.as_str();
                match move_to(session, set, trash, self.has_move) {
                    // RFC 3501 §6.4.7: the trash mailbox does not exist yet. Only then is
                    // a retry safe: after another NO, a COPY may already have happened.
                    Err(imap::Error::No(no)) if is_trycreate(&no) => {
                        session.create(trash)?;
                        move_to(session, set, trash, self.has_move)?;
                    }
                    other => other?,
                }
            }
        }
        Ok(())
    }
}

/// Whether a NO carries `[TRYCREATE]`. The imap crate parses the code into a type of
/// imap-proto's, which we do not depend on directly; its debug form names it.
fn is_trycreate(no: &imap::error::No) -> bool {
    format!("{:?}", no.code).contains("TryCreate") || no.information.contains("[TRYCREATE]")
}

/// A mailbox name as an IMAP quoted string. The imap crate quotes the mailbox for UID MOVE
/// and CREATE but not for UID COPY, where "Deleted Items" would otherwise name "Deleted".
fn quoted(mailbox: &str) -> String {
    format!("\"{}\"", mailbox.replace('\\', "\\\\").replace('"', "\\\""))
}

/// How a body fetch failed.
enum Chunk {
    /// The server answered NO.
    No(String),
    Backend(String),
    Client(io::Error),
}

impl Chunk {
    fn into_text(self) -> String {
        match self {
            Chunk::No(why) | Chunk::Backend(why) => why,
            Chunk::Client(e) => e.to_string(),
        }
    }
}

/// Why a raw command failed when the server closed the connection (after `* BYE`).
const SERVER_CLOSED: &str = "the IMAP server closed the connection";

/// Records whether any of a message reached the sink, which decides whether a failed
/// fetch may start over.
struct Watched<'a> {
    sink: &'a mut dyn MessageSink,
    started: bool,
}

impl MessageSink for Watched<'_> {
    fn start(&mut self) -> io::Result<()> {
        self.started = true;
        self.sink.start()
    }
    fn data(&mut self, bytes: &[u8]) -> io::Result<bool> {
        self.sink.data(bytes)
    }
}

/// Longest response line accepted outside literals; message data only comes in literals.
const MAX_RESPONSE_LINE: usize = 64 * 1024;

/// One command run on the raw connection and read without the `imap` crate: a body fetch,
/// streamed, or the message list, parsed line by line. Generic over the stream only so
/// that [`read_listing`] and [`read_body`] can run it over bytes.
struct RawCommand<S = Shared> {
    input: BufReader<S>,
    tag: String,
}

impl RawCommand {
    fn new(raw: &Shared, tag: String) -> RawCommand {
        RawCommand {
            input: BufReader::with_capacity(64 * 1024, raw.clone()),
            tag,
        }
    }

    /// Hands bytes read past the tagged response back to the connection.
    fn finish(self) {
        let rest = self.input.buffer().to_vec();
        if !rest.is_empty() {
            let raw = self.input.into_inner();
            let mut inner = raw.0.borrow_mut();
            let mut unread = rest;
            unread.append(&mut inner.unread);
            inner.unread = unread;
        }
    }
}

impl<S: Read + Write> RawCommand<S> {
    fn send(&mut self, command: &str) -> Result<(), Chunk> {
        let backend = |e: io::Error| Chunk::Backend(describe_io(&e));
        let stream = self.input.get_mut();
        stream
            .write_all(format!("{} {command}\r\n", self.tag).as_bytes())
            .map_err(backend)?;
        stream.flush().map_err(backend)
    }

    /// `Some(status)` when `line` is this command's tagged response: `Ok` for OK, else the
    /// error.
    fn status(&self, line: &[u8], command: &str) -> Option<Result<(), Chunk>> {
        let tagged = line.len() > self.tag.len()
            && line.starts_with(self.tag.as_bytes())
            && line[self.tag.len()] == b' ';
        if !tagged {
            return None;
        }
        let status = String::from_utf8_lossy(&line[self.tag.len() + 1..])
            .trim_end()
            .to_string();
        let word = status.split(' ').next().unwrap_or("").to_ascii_uppercase();
        Some(match word.as_str() {
            "OK" => Ok(()),
            "NO" => Err(Chunk::No(format!("{command}: {status}"))),
            _ => Err(Chunk::Backend(format!("{command}: {status}"))),
        })
    }

    /// `UID FETCH 1:* (UID RFC822.SIZE FLAGS)`: (UID, size) of every message without the
    /// keyword `hide`, in the server's order. Each response line is parsed as it comes:
    /// one round trip, and no memory or time spent on a whole parsed response (through the
    /// crate, 20,000 messages took 55 MiB at once, or 20 round trips in batches, and most
    /// of the login's CPU time went to imap-proto's parser and malloc).
    fn list(&mut self, hide: Option<&str>) -> Result<Vec<(u32, u64)>, String> {
        let text = Chunk::into_text;
        self.send("UID FETCH 1:* (UID RFC822.SIZE FLAGS)")
            .map_err(text)?;
        let mut listed = Vec::new();
        let mut line = Vec::new();
        loop {
            if let Err(e) = self.read_line(&mut line) {
                break Err(text(e));
            }
            if let Some(status) = self.status(&line, "UID FETCH") {
                break status.map(|()| listed).map_err(text);
            }
            if let Some(length) = literal_length(&line) {
                // Not in answer to these items; skip it and the rest of its response.
                if let Err(e) = self.skip(length) {
                    break Err(text(e));
                }
                continue;
            }
            // Lines without both numbers are unsolicited (EXISTS, a flag change…).
            if let Some(item) = listing_item(&line, hide) {
                listed.extend(item);
            }
        }
    }

    /// Dovecot's GUID of `mailbox` (`STATUS mailbox (X-GUID)`), `None` from a server that
    /// does not know the item (it answers BAD, and the connection goes on).
    fn mailbox_guid(&mut self, mailbox: &str) -> Result<Option<String>, String> {
        let text = Chunk::into_text;
        self.send(&format!("STATUS {} (X-GUID)", quoted(mailbox)))
            .map_err(text)?;
        let mut guid = None;
        let mut line = Vec::new();
        loop {
            if let Err(e) = self.read_line(&mut line) {
                break Err(text(e));
            }
            if self.status(&line, "STATUS").is_some() {
                break Ok(guid);
            }
            if let Some(length) = literal_length(&line) {
                if let Err(e) = self.skip(length) {
                    break Err(text(e));
                }
                continue;
            }
            guid = guid.or_else(|| status_guid(&line));
        }
    }

    /// Sends `command`, then reads to its tagged response. Returns the body's length and
    /// whether the sink wants more, or `None` when no body came. `range` is the partial
    /// fetch's length, which the body must not exceed.
    fn fetch(
        &mut self,
        command: &str,
        first: bool,
        range: Option<usize>,
        sink: &mut dyn MessageSink,
    ) -> Result<Option<(usize, bool)>, Chunk> {
        self.send(command)?;
        let mut body = None;
        let mut line = Vec::new();
        loop {
            self.read_line(&mut line)?;
            if let Some(status) = self.status(&line, "UID FETCH") {
                return status.map(|()| body);
            }
            // An untagged line; each literal in it is followed by more of the line.
            while let Some(length) = literal_length(&line) {
                let is_body =
                    body.is_none() && line.starts_with(b"* ") && ends_with_body_item(&line);
                if !is_body {
                    self.skip(length)?;
                } else if range.is_some_and(|range| length > range) {
                    // Sending it on would repeat the message from the next offset.
                    return Err(Chunk::Backend(format!(
                        "server ignored the partial fetch range (sent {length} octets for {})",
                        range.unwrap_or_default()
                    )));
                } else {
                    if first {
                        sink.start().map_err(Chunk::Client)?;
                    }
                    let more = self.stream_literal(length, sink)?;
                    body = Some((length, more));
                }
                self.read_line(&mut line)?;
            }
        }
    }

    /// Reads one line (to LF) into `line`.
    fn read_line(&mut self, line: &mut Vec<u8>) -> Result<(), Chunk> {
        line.clear();
        let mut limited = (&mut self.input).take(MAX_RESPONSE_LINE as u64);
        match limited.read_until(b'\n', line) {
            Ok(0) => Err(Chunk::Backend(SERVER_CLOSED.into())),
            Ok(_) if line.ends_with(b"\n") => Ok(()),
            Ok(_) => Err(Chunk::Backend("IMAP response line too long".into())),
            Err(e) => Err(Chunk::Backend(describe_io(&e))),
        }
    }

    /// Passes `length` octets to the sink; once it wants no more, reads and drops the rest.
    fn stream_literal(
        &mut self,
        mut length: usize,
        sink: &mut dyn MessageSink,
    ) -> Result<bool, Chunk> {
        let mut more = true;
        while length > 0 {
            let available = self
                .input
                .fill_buf()
                .map_err(|e| Chunk::Backend(describe_io(&e)))?;
            if available.is_empty() {
                return Err(Chunk::Backend(SERVER_CLOSED.into()));
            }
            let n = available.len().min(length);
            if more {
                more = sink.data(&available[..n]).map_err(Chunk::Client)?;
            }
            self.input.consume(n);
            length -= n;
        }
        Ok(more)
    }

    fn skip(&mut self, length: usize) -> Result<(), Chunk> {
        let copied = io::copy(&mut (&mut self.input).take(length as u64), &mut io::sink())
            .map_err(|e| Chunk::Backend(describe_io(&e)))?;
        if copied < length as u64 {
            return Err(Chunk::Backend(SERVER_CLOSED.into()));
        }
        Ok(())
    }
}

/// A server's side of the connection as bytes: what [`RawCommand`] writes is dropped.
struct Recorded<R>(R);

impl<R: Read> Read for Recorded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R> Write for Recorded<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the login's message listing (tag `L0`) makes of `response`, the server's bytes
/// after the command: (UID, size) per listed message, or why it failed. For the fuzzer
/// (tests/fuzz), which has no server.
pub fn read_listing(response: impl Read, hide: Option<&str>) -> Result<Vec<(u32, u64)>, String> {
    RawCommand {
        input: BufReader::new(Recorded(response)),
        tag: "L0".into(),
    }
    .list(hide)
}

/// What one body fetch (tag `L1`) makes of `response`: the body's length and whether
/// `sink` wants more, `None` when no body came. `range` is the partial fetch's length.
/// For the fuzzer (tests/fuzz), which has no server.
pub fn read_body(
    response: impl Read,
    range: Option<usize>,
    sink: &mut dyn MessageSink,
) -> Result<Option<(usize, bool)>, FetchError> {
    let mut command = RawCommand {
        input: BufReader::new(Recorded(response)),
        tag: "L1".into(),
    };
    command
        .fetch("UID FETCH 1 (BODY.PEEK[])", true, range, sink)
        .map_err(|e| match e {
            Chunk::Client(e) => FetchError::Client(e),
            Chunk::No(why) | Chunk::Backend(why) => FetchError::Backend(BackendError(why)),
        })
}

/// (UID, size) from one `* n FETCH (…)` line, or `Some(None)` for a message carrying the
/// keyword `hide`; `None` when the line is not a FETCH with both numbers. Items may come in
/// any order (RFC 3501 §7.4.2).
fn listing_item(line: &[u8], hide: Option<&str>) -> Option<Option<(u32, u64)>> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    let mut words = text.splitn(3, ' ');
    let (Some("*"), Some(_), Some(rest)) = (words.next(), words.next(), words.next()) else {
        return None;
    };
    let rest = rest.strip_prefix("FETCH (").or_else(|| {
        rest.get(..7)
            .filter(|p| p.eq_ignore_ascii_case("FETCH ("))
            .map(|_| &rest[7..])
    })?;
    let mut items = rest.strip_suffix(')')?;
    let (mut uid, mut size, mut hidden) = (None, None, false);
    while !items.is_empty() {
        let (name, after) = items.split_once(' ')?;
        let (value, next) = if after.starts_with('(') {
            let end = after.find(')')?;
            (&after[1..end], after[end + 1..].trim_start())
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (&after[..end], after[end..].trim_start())
        };
        match name.to_ascii_uppercase().as_str() {
            "UID" => uid = value.parse::<u32>().ok(),
            "RFC822.SIZE" => size = value.parse::<u64>().ok(),
            "FLAGS" => {
                hidden = hide.is_some_and(|k| value.split(' ').any(|f| f.eq_ignore_ascii_case(k)));
            }
            _ => {}
        }
        items = next;
    }
    let (uid, size) = (uid?, size?);
    Some((!hidden).then_some((uid, size)))
}

/// `n` when the line ends with a literal announcement `{n}` CRLF (RFC 3501 §4.3).
fn literal_length(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"}\r\n")?;
    let open = line.iter().rposition(|&b| b == b'{')?;
    let digits = &line[open + 1..];
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Whether the literal that ends `line` is the value of `BODY[]` or `BODY[]<origin>`: the
/// only fetch item with a message body we ask for, in the only FETCH response with one.
fn ends_with_body_item(line: &[u8]) -> bool {
    let Some(open) = line.iter().rposition(|&b| b == b'{') else {
        return false;
    };
    let mut item = line[..open].trim_ascii_end();
    if item.ends_with(b">") {
        let Some(lt) = item.iter().rposition(|&b| b == b'<') else {
            return false;
        };
        item = &item[..lt];
    }
    item.len() >= 6 && item[item.len() - 6..].eq_ignore_ascii_case(b"BODY[]")
}

fn describe_io(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "timed out waiting for the IMAP server".into()
        }
        _ => format!("IMAP connection failed: {error}"),
    }
}

/// UID MOVE (RFC 6851) where offered, else UID COPY + \Deleted + UID EXPUNGE (RFC 4315).
fn move_to(
    session: &mut ImapSession,
    set: &str,
    mailbox: &str,
    has_move: bool,
) -> imap::Result<()> {
    if has_move {
        return session.uid_mv(set, mailbox);
    }
    session.uid_copy(set, quoted(mailbox))?;
    session.uid_store(set, "+FLAGS.SILENT (\\Deleted)")?;
    session.uid_expunge(set).map(drop)
}

#[cfg(test)]
mod oauth2_tests {
    //! The OAuth2 login against a scripted IMAP server: the retry on the same or a new
    //! connection, and what the session is told.

    use super::*;
    use crate::oauth2::TokenError;
    use crate::oauth2::login::testing::Tokens;
    use crate::pop3::fake_imap::{FakeImap, Script};
    use crate::pop3::maildrop::{Extent, FetchError};
    use std::time::Duration;

    const ALL: [&str; 3] = ["SASL-IR", "AUTH=XOAUTH2", "AUTH=OAUTHBEARER"];

    fn script(capabilities: &[&str], tokens: &[&str]) -> Script {
        Script {
            in_greeting: true,
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            ..Script::default()
        }
    }

    fn opener(fake: &FakeImap, tokens: &Tokens) -> ImapOpener {
        ImapOpener {
            server: Server {
                host: "127.0.0.1".into(),
                port: fake.port,
                tls: TlsMode::None,
                connector: Err("no TLS".into()),
                timeouts: Timeouts {
                    connect: Duration::from_secs(5),
                    io: Duration::from_secs(5),
                },
            },
            settings: Settings {
                login: Login::OAuth2 {
                    client: Some(("alice".into(), "pw".into())),
                },
                mailbox: "INBOX".into(),
                policy: DeletePolicy::Keep,
                deleted_keyword: "$POP3Deleted".into(),
                trash_mailbox: "Trash".into(),
                mark_seen: false,
                lock_dir: None,
                lock_user_domain: lock::UserDomain::Keep,
            },
            oauth2: Some(Rc::new(RefCell::new(tokens.account()))),
        }
    }

    fn open(opener: &mut ImapOpener, user: &str, password: &str) -> Result<(), OpenError> {
        let credentials = Credentials { user, password };
        opener
            .open(&credentials)
            .map(|mut maildrop| maildrop.close())
    }

    fn presented(fake: &FakeImap) -> Vec<(String, bool)> {
        fake.journal().presented
    }

    #[test]
    fn a_valid_token_logs_in_with_sasl_ir_in_one_round_trip() {
        let fake = FakeImap::start(script(&ALL, &["t1"]));
        let tokens = Tokens::new("alice@example.com", &["t1"]);
        open(&mut opener(&fake, &tokens), "alice", "pw").unwrap();
        assert_eq!(presented(&fake), [("t1".to_string(), true)]);
        let journal = fake.journal();
        // CAPABILITY only for the LOGINDISABLED check of a plain connection.
        assert_eq!(
            journal.commands,
            ["CAPABILITY", "AUTHENTICATE", "EXAMINE", "LOGOUT"]
        );
        assert_eq!(tokens.renewals(), 0);
    }

    #[test]
    fn without_sasl_ir_or_greeting_capabilities_the_token_follows_the_continuation() {
        let mut script = script(&["AUTH=XOAUTH2"], &["t1"]);
        script.in_greeting = false;
        let fake = FakeImap::start(script);
        let tokens = Tokens::new("alice@example.com", &["t1"]);
        open(&mut opener(&fake, &tokens), "alice", "pw").unwrap();
        assert_eq!(presented(&fake), [("t1".to_string(), false)]);
    }

    #[test]
    fn a_rejected_token_is_renewed_once_and_retried_on_the_same_connection() {
        let fake = FakeImap::start(script(&ALL, &["fresh"]));
        let tokens = Tokens::new("alice@example.com", &["expired", "fresh"]);
        open(&mut opener(&fake, &tokens), "alice", "pw").unwrap();
        let journal = fake.journal();
        assert_eq!(
            journal.presented,
            [("expired".to_string(), true), ("fresh".to_string(), true)]
        );
        assert_eq!(journal.error_responses, ["AQ=="]);
        assert_eq!(journal.connects, 1);
        assert_eq!(tokens.renewals(), 1);
    }

    #[test]
    fn a_server_that_closes_after_a_rejection_gets_the_renewed_token_on_a_new_connection() {
        let mut script = script(&["AUTH=XOAUTH2"], &["fresh"]);
        script.close_after_refusal = true;
        let fake = FakeImap::start(script);
        let tokens = Tokens::new("alice@example.com", &["expired", "fresh"]);
        open(&mut opener(&fake, &tokens), "alice", "pw").unwrap();
        let journal = fake.journal();
        assert_eq!(journal.connects, 2);
        // XOAUTH2's answer to the error challenge is empty.
        assert_eq!(journal.error_responses, [""]);
        assert_eq!(tokens.renewals(), 1);
    }

    #[test]
    fn token_failures_are_temporary_with_the_admins_command_never_auth() {
        let fake = FakeImap::start(script(&ALL, &["good"]));
        let tokens = Tokens::new("alice@example.com", &["bad1", "bad2"]);
        let mut opener = opener(&fake, &tokens);
        let result = open(&mut opener, "alice", "pw");
        assert!(
            matches!(&result, Err(OpenError::Temporary(why))
                if why.contains("legacy-mail-proxy oauth2 authorize work")),
            "{result:?}"
        );
        assert_eq!((tokens.renewals(), presented(&fake).len()), (1, 2));

        // The provider down and no valid token: no IMAP connection at all.
        tokens.state.borrow_mut().fail = Some(TokenError::Unavailable("refused".into()));
        let connects = fake.journal().connects;
        let result = open(&mut opener, "alice", "pw");
        assert!(
            matches!(&result, Err(OpenError::Temporary(why)) if why.contains("oauth2 status work")),
            "{result:?}"
        );
        assert_eq!(fake.journal().connects, connects);

        // An account that could not be opened (a corrupted token file).
        opener.oauth2 = Some(Rc::new(RefCell::new(Account::new(
            std::path::Path::new("/var/lib/legacy-mail-proxy/oauth2"),
            "work",
            Err(TokenError::Broken("token file is corrupted".into())),
        ))));
        let result = open(&mut opener, "alice", "pw");
        assert!(
            matches!(&result, Err(OpenError::Temporary(why)) if why.contains("corrupted")),
            "{result:?}"
        );
    }

    #[test]
    fn the_client_is_checked_before_any_token_is_used() {
        let fake = FakeImap::start(script(&ALL, &["t1"]));
        let tokens = Tokens::new("alice@example.com", &["t1"]);
        let result = open(&mut opener(&fake, &tokens), "alice", "wrong");
        assert!(matches!(result, Err(OpenError::Auth(_))), "{result:?}");
        assert_eq!(fake.journal().connects, 0);
    }

    /// Collects a streamed message.
    #[derive(Default)]
    struct Collect(Vec<u8>);

    impl MessageSink for Collect {
        fn start(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn data(&mut self, bytes: &[u8]) -> io::Result<bool> {
            self.0.extend_from_slice(bytes);
            Ok(true)
        }
    }

    const MESSAGE: &str = "Subject: long session\r\n\r\nstill here\r\n";

    /// A server with one message that ends the first session at command `bye_at`; the
    /// proxy's client is logged in.
    fn ending_session(bye_at: usize, tokens: &[&str]) -> (FakeImap, Tokens, Box<dyn Maildrop>) {
        let fake = FakeImap::start(Script {
            message: Some(MESSAGE.into()),
            bye_at_command: Some(bye_at),
            ..script(&ALL, &["t1"])
        });
        let tokens = Tokens::new("alice@example.com", tokens);
        let credentials = Credentials {
            user: "alice",
            password: "pw",
        };
        let maildrop = opener(&fake, &tokens).open(&credentials).unwrap();
        (fake, tokens, maildrop)
    }

    fn retr(maildrop: &mut Box<dyn Maildrop>) -> Result<Vec<u8>, FetchError> {
        let mut sink = Collect::default();
        maildrop.fetch(0, Extent::Whole, &mut sink).map(|()| sink.0)
    }

    // The first session's commands: CAPABILITY, AUTHENTICATE, EXAMINE, UID FETCH 1:*; the
    // fifth is the one the server ends the session at.

    #[test]
    fn a_session_the_server_ends_when_its_token_expires_logs_in_again_for_retr() {
        let (fake, _tokens, mut maildrop) = ending_session(5, &["t1"]);
        assert_eq!(retr(&mut maildrop).unwrap(), MESSAGE.as_bytes());
        let journal = fake.journal();
        assert_eq!(journal.connects, 2);
        assert!(journal.commands.contains(&"*BYE".to_string()));
        maildrop.close();
    }

    #[test]
    fn a_session_the_server_ends_during_a_keepalive_goes_on_with_the_next_command() {
        let (fake, _tokens, mut maildrop) = ending_session(5, &["t1"]);
        maildrop.keepalive().unwrap();
        assert_eq!(retr(&mut maildrop).unwrap(), MESSAGE.as_bytes());
        assert_eq!(fake.journal().connects, 2);
        maildrop.close();
    }

    #[test]
    fn logging_in_again_is_tried_once_per_loss_and_its_failure_is_an_error() {
        // The token the new session gets is refused, and so is the renewed one.
        let (fake, tokens, mut maildrop) = ending_session(5, &["t1", "t2", "t3"]);
        tokens.state.borrow_mut().current = 1;
        assert!(matches!(retr(&mut maildrop), Err(FetchError::Backend(_))));
        let connects = fake.journal().connects;
        assert_eq!(
            connects, 2,
            "one attempt (with its own retry on that connection)"
        );
        assert!(maildrop.keepalive().is_err());
        assert_eq!(fake.journal().connects, connects, "no second attempt");
        maildrop.close();
    }

    #[test]
    fn a_server_without_an_oauth2_mechanism_is_a_setup_error() {
        let fake = FakeImap::start(script(&["AUTH=PLAIN"], &["t1"]));
        let tokens = Tokens::new("alice@example.com", &["t1"]);
        let result = open(&mut opener(&fake, &tokens), "alice", "pw");
        assert!(
            matches!(&result, Err(OpenError::Permanent(why)) if why.contains("offers neither")),
            "{result:?}"
        );
        assert_eq!(tokens.renewals(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::{ends_with_body_item, listing_item, literal_length, uid_set};

    #[test]
    fn listing_lines_in_any_item_order() {
        let hide = Some("$POP3Deleted");
        let item = |line: &str| listing_item(line.as_bytes(), hide);
        assert_eq!(
            item("* 1 FETCH (UID 7 RFC822.SIZE 1234 FLAGS (\\Seen))\r\n"),
            Some(Some((7, 1234)))
        );
        assert_eq!(
            item("* 2 FETCH (FLAGS () RFC822.SIZE 5 UID 9)\r\n"),
            Some(Some((9, 5)))
        );
        assert_eq!(
            item("* 3 fetch (uid 10 rfc822.size 6 flags ($pop3deleted \\Seen))\r\n"),
            Some(None)
        );
        assert_eq!(
            item("* 4 FETCH (UID 11 MODSEQ (42) RFC822.SIZE 7 FLAGS ($POP3Deleted2))\r\n"),
            Some(Some((11, 7)))
        );
        assert_eq!(
            listing_item(
                b"* 3 FETCH (UID 10 RFC822.SIZE 6 FLAGS ($POP3Deleted))\r\n",
                None
            ),
            Some(Some((10, 6)))
        );
        // Unsolicited: no size, or not a FETCH at all.
        assert_eq!(item("* 5 FETCH (FLAGS (\\Seen) UID 12)\r\n"), None);
        assert_eq!(item("* 23 EXISTS\r\n"), None);
        assert_eq!(item("* OK [ALERT] FETCH (soon)\r\n"), None);
    }

    #[test]
    fn literal_announcements_are_recognised() {
        assert_eq!(
            literal_length(b"* 1 FETCH (UID 5 BODY[] {1234}\r\n"),
            Some(1234)
        );
        assert_eq!(literal_length(b"* 1 FETCH (BODY[]<0> {0}\r\n"), Some(0));
        assert_eq!(literal_length(b"* 1 FETCH (UID 5 FLAGS ())\r\n"), None);
        assert_eq!(literal_length(b"* OK {x}\r\n"), None);
        assert_eq!(literal_length(b"* OK {}\r\n"), None);
        assert_eq!(literal_length(b"* OK {12345678901}\r\n"), None);
    }

    #[test]
    fn only_the_body_item_is_streamed() {
        assert!(ends_with_body_item(b"* 1 FETCH (UID 5 BODY[] {12}\r\n"));
        assert!(ends_with_body_item(
            b"* 1 FETCH (UID 5 BODY[]<65536> {12}\r\n"
        ));
        assert!(ends_with_body_item(b"* 1 FETCH (body[] {12}\r\n"));
        assert!(!ends_with_body_item(b"* 1 FETCH (BODY[HEADER] {12}\r\n"));
        assert!(!ends_with_body_item(b"* 1 FETCH (X-SUBJECT {12}\r\n"));
        assert!(!ends_with_body_item(b"* 1 FETCH (UID 5 FLAGS ())\r\n"));
    }

    #[test]
    fn uid_sets_compress_runs() {
        assert_eq!(uid_set(&[1]), "1");
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[4294967295]), "4294967295");
    }
}
