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
use crate::imap_wire::{
    self, Fetch, KeepAll, Literals, MessageData, Reader, Response, Status, StatusKind, Value,
};
use crate::lock::{self, LockError, MailboxLock};
use crate::net::{self, Stream, Timeouts, TlsMode};
use crate::oauth2::login::{Account, Failure, Refusal};
use crate::oauth2::sasl::Target;
use crate::starttls::Protocol;
use std::cell::RefCell;
use std::io::{self, BufReader, Read, Write};
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
    let expected = (client_user.as_str(), client_password.as_str());
    match crate::frontend::login::client_matches(expected, credentials.user, credentials.password) {
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
            // The imap crate keeps the codes it does not know, RFC 5530's among them, in
            // the text as the server sent it: read the code from there by the grammar.
            let (code, _) = imap_wire::parse_resp_text(&no.information);
            let why = format!("LOGIN: {}", no.information);
            match code.as_ref().map_or("", |code| code.name.as_str()) {
                "UNAVAILABLE" | "SERVERBUG" | "LIMIT" | "INUSE" => OpenError::Temporary(why),
                "PRIVACYREQUIRED" | "CONTACTADMIN" | "EXPIRED" => OpenError::Permanent(why),
                _ => OpenError::Auth(why),
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
            let mut reader = RawCommand::new(&self.raw, tag);
            let result = reader.fetch(uid, offset, chunk, &mut sink);
            reader.finish();
            let (length, more) = match result {
                Ok(Some(body)) => body,
                // Dovecot answers OK with no data for a UID expunged elsewhere.
                Ok(None) | Err(Chunk::No(..)) if offset == 0 => return Err(FetchError::Gone),
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
                Err(Chunk::No(why, _)) => return Err(FetchError::Backend(BackendError(why))),
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
        let stored = self.run(&format!("UID STORE {set} +FLAGS.SILENT (\\Seen)"));
        stored.map_err(|e| self.lost_raw(e))
    }

    fn check_delete(&self) -> Result<(), String> {
        match &self.cannot_delete {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    fn keepalive(&mut self) -> Result<(), BackendError> {
        self.usable()?;
        let noop = self.run("NOOP");
        match noop.map_err(|e| self.lost_raw(e)) {
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
        let mut applied = self.apply_delete(&set).map_err(|e| self.lost_raw(e));
        if applied.is_err() && self.log_in_again() {
            // The server ended the session before acting on the command (a `* BYE` in
            // its place); the policy's commands act by UID and may be sent again.
            applied = self.apply_delete(&set).map_err(|e| self.lost_raw(e));
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

    /// Applies the delete policy to the UIDs in `set` (UPDATE state, RFC 1939 §6), on the
    /// raw connection, so that `[TRYCREATE]` is read from the wire.
    fn apply_delete(&mut self, set: &str) -> Result<(), Chunk> {
        match self.settings.policy {
            DeletePolicy::Keep => {}
            DeletePolicy::Hide => {
                let keyword = self.settings.deleted_keyword.clone();
                self.run(&format!("UID STORE {set} +FLAGS.SILENT ({keyword})"))?;
            }
            DeletePolicy::Expunge => {
                self.run(&format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"))?;
                self.run(&format!("UID EXPUNGE {set}"))?;
            }
            DeletePolicy::Trash => {
                let trash = quoted(&self.settings.trash_mailbox);
                match self.move_to(set, &trash) {
                    // RFC 3501 §6.4.7: the trash mailbox does not exist yet. Only then is
                    // a retry safe: after another NO, a COPY may already have happened.
                    Err(Chunk::No(_, status)) if status.has_code("TRYCREATE") => {
                        self.run(&format!("CREATE {trash}"))?;
                        self.move_to(set, &trash)?;
                    }
                    other => other?,
                }
            }
        }
        Ok(())
    }

    /// UID MOVE (RFC 6851) where offered, else UID COPY + \Deleted + UID EXPUNGE (RFC 4315).
    fn move_to(&mut self, set: &str, quoted_mailbox: &str) -> Result<(), Chunk> {
        if self.has_move {
            return self.run(&format!("UID MOVE {set} {quoted_mailbox}"));
        }
        self.run(&format!("UID COPY {set} {quoted_mailbox}"))?;
        self.run(&format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"))?;
        self.run(&format!("UID EXPUNGE {set}"))
    }

    /// Runs `command` on the raw connection: `Ok` for OK, [`Chunk::No`] when the server
    /// refused it (NO or BAD: the connection goes on).
    fn run(&mut self, command: &str) -> Result<(), Chunk> {
        self.fetches += 1;
        let mut raw = RawCommand::new(&self.raw, format!("L{}", self.fetches));
        let result = raw.simple(command);
        raw.finish();
        let status = result?;
        match status.kind {
            StatusKind::Ok => Ok(()),
            _ => {
                let verb = command.split(' ').take(2).collect::<Vec<_>>().join(" ");
                Err(Chunk::No(format!("{verb}: {status}"), status))
            }
        }
    }

    /// The error of a raw command; unless the server answered it, the connection is now
    /// unusable.
    fn lost_raw(&mut self, error: Chunk) -> BackendError {
        if let Chunk::Backend(why) = &error {
            self.broken = Some(why.clone());
            self.ended_by_server = why == SERVER_CLOSED;
        }
        BackendError(error.into_text())
    }
}

/// A mailbox name as an IMAP quoted string. The imap crate quotes the mailbox for UID MOVE
/// and CREATE but not for UID COPY, where "Deleted Items" would otherwise name "Deleted".
fn quoted(mailbox: &str) -> String {
    format!("\"{}\"", mailbox.replace('\\', "\\\\").replace('"', "\\\""))
}

/// How a raw command failed.
enum Chunk {
    /// The server answered NO (or, to a delete command, BAD): the connection is in step.
    No(String, Status),
    /// The connection is unusable: cut, timed out, out of step, or not to be trusted.
    Backend(String),
    Client(io::Error),
}

impl Chunk {
    fn into_text(self) -> String {
        match self {
            Chunk::No(why, _) | Chunk::Backend(why) => why,
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

/// One command run on the raw connection and read with [`imap_wire::Reader`], not the
/// `imap` crate: a body fetch, streamed, the message list, parsed response by response, and
/// the commands whose response codes matter (`[TRYCREATE]`). Generic over the stream only
/// so that [`read_listing`] and [`read_body`] can run it over bytes.
struct RawCommand<S = Shared> {
    reader: Reader<BufReader<S>>,
    tag: String,
}

impl RawCommand {
    fn new(raw: &Shared, tag: String) -> RawCommand {
        RawCommand {
            reader: Reader::new(BufReader::with_capacity(64 * 1024, raw.clone())),
            tag,
        }
    }

    /// Hands bytes read past the tagged response back to the connection.
    fn finish(self) {
        let input = self.reader.into_inner();
        let rest = input.buffer().to_vec();
        if !rest.is_empty() {
            let raw = input.into_inner();
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
        let stream = self.reader.get_mut().get_mut();
        stream
            .write_all(format!("{} {command}\r\n", self.tag).as_bytes())
            .map_err(backend)?;
        stream.flush().map_err(backend)
    }

    /// Reads responses up to this command's tagged one and returns its status. Each
    /// untagged response goes to `each` with `state`, which also decides about literals.
    /// Unsolicited responses (EXISTS, EXPUNGE, a flag change, an ALERT) may come anywhere.
    fn read_to_tagged<L: Literals>(
        &mut self,
        command: &str,
        state: &mut L,
        mut each: impl FnMut(&mut L, Response),
    ) -> Result<Status, Chunk> {
        loop {
            match self.reader.next(state) {
                Ok(Response::Tagged { tag, status }) if tag == self.tag => return Ok(status),
                Ok(Response::Tagged { tag, status }) => {
                    return Err(Chunk::Backend(format!(
                        "{command}: an answer to a command never sent ({tag} {status})"
                    )));
                }
                Ok(Response::Continuation(text)) => {
                    return Err(Chunk::Backend(format!(
                        "{command}: an unexpected continuation request ({text})"
                    )));
                }
                // The server closes the connection next; reading on finds that.
                Ok(Response::Condition(status)) if status.kind == StatusKind::Bye => {
                    log::info!("the IMAP server ends the session: {status}");
                }
                Ok(response) => each(state, response),
                Err(imap_wire::Error::Handler(e)) => return Err(Chunk::Client(e)),
                Err(imap_wire::Error::Closed) => return Err(Chunk::Backend(SERVER_CLOSED.into())),
                Err(imap_wire::Error::Io(e)) => return Err(Chunk::Backend(describe_io(&e))),
                Err(e) => return Err(Chunk::Backend(format!("{command}: {e}"))),
            }
        }
    }

    /// Runs a command whose untagged data we do not use (UID STORE, UID EXPUNGE, UID COPY,
    /// UID MOVE, CREATE, NOOP): its tagged status, code and all.
    fn simple(&mut self, command: &str) -> Result<Status, Chunk> {
        self.send(command)?;
        let verb = command.split(' ').take(2).collect::<Vec<_>>().join(" ");
        self.read_to_tagged(&verb, &mut KeepAll, |_, _| {})
    }

    /// `UID FETCH 1:* (UID RFC822.SIZE FLAGS)`: (UID, size) of every message without the
    /// keyword `hide`, in the server's order. Each response is parsed as it comes: one
    /// round trip, and no memory or time spent on a whole parsed response (through the
    /// crate, 20,000 messages took 55 MiB at once, or 20 round trips in batches, and most
    /// of the login's CPU time went to imap-proto's parser and malloc).
    fn list(&mut self, hide: Option<&str>) -> Result<Vec<(u32, u64)>, String> {
        let text = Chunk::into_text;
        self.send("UID FETCH 1:* (UID RFC822.SIZE FLAGS)")
            .map_err(text)?;
        let mut listed = Vec::new();
        let status = self
            .read_to_tagged("UID FETCH", &mut KeepAll, |_, response| {
                // FETCH responses without both numbers are unsolicited (a flag change).
                if let Response::Message {
                    data: MessageData::Fetch(fetch),
                    ..
                } = response
                {
                    listed.extend(listing_item(&fetch, hide));
                }
            })
            .map_err(text)?;
        match status.kind {
            StatusKind::Ok => Ok(listed),
            _ => Err(format!("UID FETCH: {status}")),
        }
    }

    /// Dovecot's GUID of `mailbox` (`STATUS mailbox (X-GUID)`), `None` from a server that
    /// does not know the item (it answers BAD, and the connection goes on).
    fn mailbox_guid(&mut self, mailbox: &str) -> Result<Option<String>, String> {
        let text = Chunk::into_text;
        self.send(&format!("STATUS {} (X-GUID)", quoted(mailbox)))
            .map_err(text)?;
        let mut guid = None;
        self.read_to_tagged("STATUS", &mut KeepAll, |_, response| {
            if let Response::Data { name, values } = response
                && name == "STATUS"
                && guid.is_none()
            {
                guid = status_guid(&values);
            }
        })
        .map_err(text)?;
        Ok(guid)
    }

    /// `UID FETCH uid (UID BODY.PEEK[])`, or the partial range `<offset.length>`, read to
    /// its tagged response. Returns the body's length and whether the sink wants more, or
    /// `None` when no body came. The body goes to `sink` as it arrives, but only the body
    /// of `uid`: see [`BodyTaker`].
    fn fetch(
        &mut self,
        uid: u32,
        offset: usize,
        range: Option<usize>,
        sink: &mut dyn MessageSink,
    ) -> Result<Option<(usize, bool)>, Chunk> {
        let section = match range {
            None => "BODY.PEEK[]".to_string(),
            Some(length) => format!("BODY.PEEK[]<{offset}.{length}>"),
        };
        // UID first: a server that answers in the order asked names the message before
        // its body, so a wrong one is refused before any of it reaches the client.
        self.send(&format!("UID FETCH {uid} (UID {section})"))?;
        let mut body = BodyTaker {
            uid,
            offset: offset as u64,
            range: range.map(|r| r as u64),
            first: offset == 0,
            sink,
            taken: None,
            checked: false,
            more: true,
            wrong: None,
        };
        let status = self.read_to_tagged("UID FETCH", &mut body, |body, response| {
            if let Response::Message {
                number,
                data: MessageData::Fetch(fetch),
            } = response
            {
                body.check_uid(number, &fetch);
            }
        })?;
        if let Some(why) = body.wrong {
            log::error!(
                "IMAP protocol error in the answer to UID FETCH {uid}: {why}; the message is \
                 not passed on (a message already begun is cut, without its final \".\")"
            );
            return Err(Chunk::Backend(why));
        }
        match status.kind {
            StatusKind::Ok => Ok(body.taken.map(|(length, _)| (length as usize, body.more))),
            StatusKind::No => Err(Chunk::No(format!("UID FETCH: {status}"), status)),
            _ => Err(Chunk::Backend(format!("UID FETCH: {status}"))),
        }
    }
}

/// Decides which literal of a body fetch's answer is the message, and checks that it is
/// the message asked for.
///
/// The UID is checked against the one asked for in every FETCH response that carries the
/// body. When the UID comes before the body (Dovecot, Gmail, and anyone answering in the
/// order asked), a wrong one is found before any byte is passed on. When it comes after
/// (Microsoft 365 sends `BODY[]` before `UID`), only the sequence number is known at the
/// body's start; holding the body back until the UID arrives would cost memory as large
/// as the message, so it is streamed and checked at the end: a mismatch, or no UID at all,
/// then fails the fetch before the POP3 response gets its final ".", and a client never
/// takes a cut response for a whole message. Either way it is an error with a log line.
struct BodyTaker<'a> {
    uid: u32,
    offset: u64,
    range: Option<u64>,
    /// Whether this is the message's first fetch (the sink is started at its body).
    first: bool,
    sink: &'a mut dyn MessageSink,
    /// The body taken: its length and the number of the message it came with.
    taken: Option<(u64, u32)>,
    /// Whether the UID of the FETCH response with the body was checked.
    checked: bool,
    /// Whether the sink wants more.
    more: bool,
    /// Why the answer cannot be trusted. Found while reading, reported after the tagged
    /// response, so that the connection stays in step with its commands.
    wrong: Option<String>,
}

impl Literals for BodyTaker<'_> {
    fn offer(&mut self, number: u32, name: &str, before: &Fetch, length: u64) -> io::Result<bool> {
        let Some(origin) = body_origin(name) else {
            return Ok(false);
        };
        if self.wrong.is_some() {
            return Ok(false);
        }
        let wrong = if self.taken.is_some() {
            Some(format!("a second message body (with message {number})"))
        } else if let Some(uid) = before.uid().filter(|&uid| uid != self.uid) {
            Some(format!(
                "the server sent the body of UID {uid} (message {number}) for UID {}",
                self.uid
            ))
        } else if origin.unwrap_or(0) != self.offset {
            Some(format!(
                "the server sent octets from {} for a fetch from {}",
                origin.unwrap_or(0),
                self.offset
            ))
        } else {
            // Sending it on would repeat the message from the next offset.
            self.range.filter(|&range| length > range).map(|range| {
                format!("server ignored the partial fetch range (sent {length} octets for {range})")
            })
        };
        if wrong.is_some() {
            self.wrong = wrong;
            return Ok(false);
        }
        if self.first {
            self.sink.start()?;
        }
        self.taken = Some((length, number));
        Ok(true)
    }

    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.more {
            self.more = self.sink.data(bytes)?;
        }
        Ok(())
    }
}

impl BodyTaker<'_> {
    /// Checks the UID of a whole FETCH response, if it is the one that carried the body.
    fn check_uid(&mut self, number: u32, fetch: &Fetch) {
        let carried_body = fetch.0.iter().any(|(_, v)| matches!(v, Value::Taken(_)));
        if self.checked || !carried_body || self.taken.is_none_or(|(_, n)| n != number) {
            return;
        }
        self.checked = true;
        let wrong = match fetch.uid() {
            Some(uid) if uid == self.uid => return,
            Some(uid) => format!(
                "the server sent the body of UID {uid} (message {number}) for UID {}",
                self.uid
            ),
            None => format!("no UID in the FETCH response with the body (message {number})"),
        };
        self.wrong.get_or_insert(wrong);
    }
}

/// `Some(origin)` when `name` is `BODY[]` (origin `None`) or `BODY[]<origin>`: the only
/// fetch item with a message body we ask for.
fn body_origin(name: &str) -> Option<Option<u64>> {
    let rest = name.strip_prefix("BODY[]")?;
    if rest.is_empty() {
        return Some(None);
    }
    let digits = rest.strip_prefix('<')?.strip_suffix('>')?;
    match digits.parse() {
        Ok(origin) => Some(Some(origin)),
        // "BODY[]<x>" is no body item of ours.
        Err(_) => None,
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
        reader: Reader::new(BufReader::new(Recorded(response))),
        tag: "L0".into(),
    }
    .list(hide)
}

/// What one body fetch of UID 1 (tag `L1`) makes of `response`: the body's length and
/// whether `sink` wants more, `None` when no body came. `range` is the partial fetch's
/// length (from offset 0). For the fuzzer (tests/fuzz), which has no server.
pub fn read_body(
    response: impl Read,
    range: Option<usize>,
    sink: &mut dyn MessageSink,
) -> Result<Option<(usize, bool)>, FetchError> {
    let mut command = RawCommand {
        reader: Reader::new(BufReader::new(Recorded(response))),
        tag: "L1".into(),
    };
    command.fetch(1, 0, range, sink).map_err(|e| match e {
        Chunk::Client(e) => FetchError::Client(e),
        Chunk::No(why, _) | Chunk::Backend(why) => FetchError::Backend(BackendError(why)),
    })
}

/// (UID, size) from a FETCH response, `None` for a message carrying the keyword `hide` or
/// a response without both numbers (an unsolicited flag change). Items may come in any
/// order (RFC 3501 §7.4.2).
fn listing_item(fetch: &Fetch, hide: Option<&str>) -> Option<(u32, u64)> {
    let (uid, size) = (fetch.uid()?, fetch.number("RFC822.SIZE")?);
    let hidden = hide.is_some_and(|keyword| {
        fetch.flags().is_some_and(|flags| {
            flags
                .iter()
                .any(|flag| flag.eq_ignore_ascii_case(keyword.as_bytes()))
        })
    });
    (!hidden).then_some((uid, size))
}

fn describe_io(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "timed out waiting for the IMAP server".into()
        }
        _ => format!("IMAP connection failed: {error}"),
    }
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

    /// A logged-in maildrop on a server that answers body fetches with UID `body_uid`,
    /// before or after the body.
    fn answering_with_uid(body_uid: u32, uid_after_body: bool) -> (FakeImap, Box<dyn Maildrop>) {
        let fake = FakeImap::start(Script {
            message: Some(MESSAGE.into()),
            body_uid: Some(body_uid),
            uid_after_body,
            ..script(&ALL, &["t1"])
        });
        let tokens = Tokens::new("alice@example.com", &["t1"]);
        let credentials = Credentials {
            user: "alice",
            password: "pw",
        };
        let maildrop = opener(&fake, &tokens).open(&credentials).unwrap();
        (fake, maildrop)
    }

    #[test]
    fn the_body_of_the_right_uid_is_passed_on_in_either_order() {
        for uid_after_body in [false, true] {
            let (_fake, mut maildrop) = answering_with_uid(5, uid_after_body);
            assert_eq!(retr(&mut maildrop).unwrap(), MESSAGE.as_bytes());
            maildrop.close();
        }
    }

    #[test]
    fn a_body_of_another_uid_fails_the_fetch_and_the_connection_is_not_trusted_again() {
        // UID before the body: nothing reaches the sink.
        let (_fake, mut maildrop) = answering_with_uid(6, false);
        let mut sink = Collect::default();
        let result = maildrop.fetch(0, Extent::Whole, &mut sink);
        assert!(
            matches!(&result, Err(FetchError::Backend(e)) if e.0.contains("UID 6")),
            "{result:?}"
        );
        assert!(sink.0.is_empty());
        assert!(maildrop.keepalive().is_err());
        maildrop.close();
        // UID after the body (Microsoft 365's order): the fetch fails before it completes,
        // so the session never sends the final "." of the wrong message.
        let (_fake, mut maildrop) = answering_with_uid(6, true);
        let result = retr(&mut maildrop);
        assert!(
            matches!(&result, Err(FetchError::Backend(e)) if e.0.contains("UID 6")),
            "{result:?}"
        );
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
    use super::uid_set;

    #[test]
    fn uid_sets_compress_runs() {
        assert_eq!(uid_set(&[1]), "1");
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[4294967295]), "4294967295");
    }
}

#[cfg(test)]
mod reader_tests {
    //! The listing and the body fetch over server transcripts (tag `L0` and `L1`, UID 1
    //! asked for): the response styles of Gmail and Microsoft 365, and unsolicited
    //! responses at every position.

    use super::{read_body, read_listing};
    use crate::pop3::maildrop::{FetchError, MessageSink};
    use std::io;

    #[derive(Default)]
    struct Collect(Vec<u8>, usize);

    impl MessageSink for Collect {
        fn start(&mut self) -> io::Result<()> {
            self.1 += 1;
            Ok(())
        }
        fn data(&mut self, bytes: &[u8]) -> io::Result<bool> {
            self.0.extend_from_slice(bytes);
            Ok(true)
        }
    }

    fn body(response: &[u8]) -> Result<Vec<u8>, String> {
        let mut sink = Collect::default();
        match read_body(response, None, &mut sink) {
            Ok(Some((length, true))) if length == sink.0.len() && sink.1 == 1 => Ok(sink.0),
            Ok(other) => Err(format!("{other:?}")),
            Err(FetchError::Backend(e)) => Err(e.0),
            Err(e) => Err(format!("{e:?}")),
        }
    }

    const UNSOLICITED: [&str; 5] = [
        "* 5 EXISTS\r\n",
        "* 2 EXPUNGE\r\n",
        "* 3 FETCH (FLAGS (\\Seen) UID 3)\r\n",
        "* OK [ALERT] Mailbox almost full {5}\r\n",
        "* 4 FETCH (X-GM-LABELS (\"a (b)\") UID 4 FLAGS ())\r\n",
    ];

    /// `parts` joined, with `extra` inserted before part `at` (after all when `at` is the
    /// number of parts).
    fn with(parts: &[&str], extra: &str, at: usize) -> Vec<u8> {
        let mut out = String::new();
        for (i, part) in parts.iter().enumerate() {
            if i == at {
                out.push_str(extra);
            }
            out.push_str(part);
        }
        if at == parts.len() {
            out.push_str(extra);
        }
        out.into_bytes()
    }

    #[test]
    fn the_body_survives_unsolicited_responses_at_every_position() {
        let styles: [&[&str]; 3] = [
            // Dovecot and Gmail: UID first.
            &[
                "* 1 FETCH (UID 1 BODY[] {5}\r\n",
                "hello",
                ")\r\n",
                "L1 OK done\r\n",
            ],
            // Microsoft 365: the body first, the UID after it.
            &[
                "* 1 FETCH (BODY[] {5}\r\n",
                "hello",
                " UID 1)\r\n",
                "L1 OK done\r\n",
            ],
            // Gmail with its attributes around the body.
            &[
                "* 1 FETCH (X-GM-MSGID 17 X-GM-LABELS (\"\\\\Inbox\" \"a (b)\") UID 1 BODY[] {5}\r\n",
                "hello",
                " FLAGS (\\Seen))\r\n",
                "L1 OK Success\r\n",
            ],
        ];
        for parts in styles {
            // Between the lines of the response, never inside one.
            for at in [0, 3, 4] {
                for extra in UNSOLICITED {
                    let response = with(parts, extra, at);
                    assert_eq!(
                        body(&response).as_deref(),
                        Ok(&b"hello"[..]),
                        "{}",
                        String::from_utf8_lossy(&response)
                    );
                }
            }
        }
    }

    #[test]
    fn a_brace_at_the_end_of_an_alert_skips_nothing() {
        let response =
            b"* OK [ALERT] Quota {5}\r\n* 1 FETCH (UID 1 BODY[] {5}\r\nhello)\r\nL1 OK done\r\n";
        assert_eq!(body(response).as_deref(), Ok(&b"hello"[..]));
    }

    #[test]
    fn the_body_may_follow_another_literal_of_its_response() {
        let response =
            b"* 1 FETCH (BODY[HEADER] {3}\r\nabc BODY[] {5}\r\nhello UID 1)\r\nL1 OK done\r\n";
        assert_eq!(body(response).as_deref(), Ok(&b"hello"[..]));
    }

    #[test]
    fn the_body_of_another_uid_is_never_passed_on() {
        // The UID before the body: nothing reaches the client.
        let mut sink = Collect::default();
        let response = b"* 2 FETCH (UID 2 BODY[] {5}\r\nwrong)\r\nL1 OK done\r\n";
        let result = read_body(&response[..], None, &mut sink);
        assert!(
            matches!(&result, Err(FetchError::Backend(e)) if e.0.contains("UID 2")),
            "{result:?}"
        );
        assert_eq!((sink.0.len(), sink.1), (0, 0));
        // The UID after the body (Microsoft 365's order), or none at all: an error before
        // the fetch completes, so the client never gets the final "." of a wrong message.
        for response in [
            &b"* 2 FETCH (BODY[] {5}\r\nwrong UID 2)\r\nL1 OK done\r\n"[..],
            b"* 1 FETCH (BODY[] {5}\r\nwhose)\r\nL1 OK done\r\n",
        ] {
            let result = body(response);
            assert!(
                result.as_ref().is_err_and(|e| e.contains("UID")),
                "{result:?}"
            );
        }
    }

    #[test]
    fn the_listing_reads_gmail_labels_and_unsolicited_responses() {
        let parts = [
            "* 1 FETCH (X-GM-LABELS (\"a (b)\" Work) UID 7 RFC822.SIZE 120 FLAGS (\\Seen))\r\n",
            "* 2 FETCH (UID 9 X-GM-LABELS (\"x) y\") RFC822.SIZE 5 FLAGS ())\r\n",
            "L0 OK done\r\n",
        ];
        for at in 0..=parts.len() {
            for extra in UNSOLICITED {
                let response = with(&parts, extra, at);
                assert_eq!(
                    read_listing(&response[..], None),
                    Ok(vec![(7, 120), (9, 5)]),
                    "{}",
                    String::from_utf8_lossy(&response)
                );
            }
        }
    }
}
