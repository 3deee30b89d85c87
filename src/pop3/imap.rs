//! The real maildrop: one mailbox on an IMAP server (RFC 3501), read with UID commands over
//! one [`Connection`] (the crate's own IMAP client layer, `src/imap`).
//!
//! The server is connected to as soon as the process starts ([`ImapOpener::connect_early`]),
//! while the client is still sending USER and PASS. Right after LOGIN (or AUTHENTICATE)
//! one flight selects the mailbox and lists UIDs, sizes and flags, and asks what the lock
//! and the delete policy need; that list is the session's snapshot. Listing and bodies are
//! read response by response with [`crate::imap_wire`], bodies streamed to the client as
//! they arrive.
//!
//! RETR is one `UID FETCH … BODY.PEEK[]`; TOP fetches growing partial ranges. A sequential
//! client is served from a read-ahead ([`Prefetch`]): while it reads message n, the fetches
//! of n+1 and further, up to a byte window, are already on the wire, so the next RETR (or
//! TOP) costs no round trip to the server. Deletes happen only in UPDATE, by UID, the way
//! the configured policy says; a plain EXPUNGE is never sent, because it would also remove
//! messages other clients flagged `\Deleted`.

use super::DeletePolicy;
use super::imap_oauth2::{self, Offers};
use super::maildrop::{
    BackendError, Credentials, Extent, FetchError, Maildrop, MessageInfo, MessageSink, OpenError,
    Opener, Update,
};
use crate::imap::connect::Connected;
pub use crate::imap::connect::Server;
use crate::imap::selected::{Selected, status_guid};
use crate::imap::{self, CLOSED, Connection, capability_code, has_capability, quoted};
use crate::imap_wire::{
    Fetch, KeepAll, Literals, MessageData, Response, Status, StatusKind, Value,
};
use crate::lock::{self, LockError, MailboxLock};
use crate::net::Stream;
use crate::oauth2::login::{Account, Failure, Refusal};
use crate::oauth2::sasl::Target;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::rc::Rc;
use std::thread::JoinHandle;

/// The largest partial fetch for TOP: what is fetched, the client does not always need.
pub const FETCH_CHUNK: usize = 1 << 20;

/// The first fetch for TOP: most headers fit.
const HEAD_CHUNK: usize = 16 << 10;

/// The default read-ahead window (`--prefetch-window`).
pub const DEFAULT_PREFETCH_WINDOW: u64 = 4 << 20;

/// At most this many read-ahead fetches are in flight, however small the messages: the
/// server has them all queued, and more would only lengthen the flight of commands.
const MAX_AHEAD: usize = 256;

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
    /// Bytes of messages fetched ahead of a sequential client; 0 turns read-ahead off.
    pub prefetch_window: u64,
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
    /// The connection begun at start-up by [`ImapOpener::connect_early`].
    pub early: Option<JoinHandle<Result<Connected, OpenError>>>,
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

impl ImapOpener {
    /// Starts TCP, TLS, the greeting and (on a plain connection) CAPABILITY in a thread of
    /// its own, while the client sends USER and PASS: over a WAN those are several round
    /// trips the client no longer waits for. Logging in still waits for the client's
    /// credentials. If the client leaves first, the process ends and the connection with it.
    pub fn connect_early(&mut self) {
        let server = self.server.clone();
        let spawned = std::thread::Builder::new()
            .name("imap-connect".into())
            .spawn(move || connect(&server));
        // Without a thread the connection is simply made at login, as before.
        self.early = spawned.ok();
    }

    /// The early connection if there is one (its failure is this login's failure: it is
    /// as fresh as a new one would be), else a new connection.
    fn connection(&mut self) -> (Result<Connected, OpenError>, bool) {
        match self.early.take() {
            Some(handle) => match handle.join() {
                Ok(connected) => (connected, true),
                Err(_) => (connect(&self.server), false),
            },
            None => (connect(&self.server), false),
        }
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
                let early = self.early.take();
                let (connection, user) =
                    oauth2_session(&self.server, &mut account.borrow_mut(), early)?;
                let server = self.server.clone();
                let relogin: Relogin<Stream> = Box::new(move || {
                    oauth2_session(&server, &mut account.borrow_mut(), None).map(|(c, _)| c)
                });
                return self.select(connection, None, &user, Some(relogin));
            }
        };
        let (user, password) = (user.to_string(), password.to_string());
        let (connected, early) = self.connection();
        let (mut connection, _) = connected?;
        log::debug!(
            "connected to {}:{} ({:?}), logging in as {}",
            self.server.host,
            self.server.port,
            self.server.tls,
            user.escape_debug()
        );
        let mut status = connection.login(&user, &password);
        if early && status.as_ref().is_err_and(closed_while_waiting) {
            // The early connection waited for a slow typist longer than the server's
            // pre-login timeout: once more on a new one.
            log::debug!("the early IMAP connection was closed; connecting again");
            let (fresh, _) = connect(&self.server)?;
            connection = fresh;
            status = connection.login(&user, &password);
        }
        match status {
            Ok(status) if status.kind == StatusKind::Ok => {
                self.select(connection, Some(status), &user, None)
            }
            Ok(status) => Err(refused("LOGIN", &status)),
            Err(imap::Error::Unsendable(_)) => {
                Err(OpenError::Auth("credentials contain CR or LF".into()))
            }
            Err(e) => Err(OpenError::Temporary(format!("LOGIN: {e}"))),
        }
    }
}

/// What the server said in a status response, without its OK/NO/BAD: `[CODE] text`.
pub(super) fn said(status: &Status) -> String {
    let whole = status.to_string();
    match whole.split_once(' ') {
        Some((_, said)) => said.to_string(),
        None => whole,
    }
}

/// Whether the server closed an idle connection (its pre-login timeout): not a timeout of
/// ours, which must cost the client one `--backend-timeout`, not two.
fn closed_while_waiting(error: &imap::Error) -> bool {
    match error {
        imap::Error::Closed => true,
        imap::Error::Broken(why) => why.contains("reset") || why.contains("roken pipe"),
        _ => false,
    }
}

/// How a maildrop logs in again with the OAuth2 account: a new connection, authenticated.
type Relogin<S> = Box<dyn FnMut() -> Result<Connection<S>, OpenError>>;

impl ImapOpener {
    /// Opens the maildrop on a logged-in connection of `user`.
    fn select(
        &self,
        connection: Connection<Stream>,
        login: Option<Status>,
        user: &str,
        relogin: Option<Relogin<Stream>>,
    ) -> Result<Box<dyn Maildrop>, OpenError> {
        let lock = self.settings.lock_dir.as_ref().map(|dir| LockPlan {
            dir: dir.clone(),
            host: self.server.host.clone(),
            user: user.to_string(),
        });
        let maildrop = ImapMaildrop::open(connection, login, self.settings.clone(), lock, relogin)?;
        Ok(Box::new(maildrop))
    }
}

/// Why the server refused LOGIN or AUTHENTICATE (`command`), by the response code of its
/// NO (RFC 5530) or its BAD.
pub(super) fn refused(command: &str, status: &Status) -> OpenError {
    let why = format!("{command}: {}", said(status));
    if status.kind != StatusKind::No {
        // The server did not understand us: not the user's password at fault.
        return OpenError::Permanent(why);
    }
    match status.code.as_ref().map_or("", |code| code.name.as_str()) {
        "UNAVAILABLE" | "SERVERBUG" | "LIMIT" | "INUSE" => OpenError::Temporary(why),
        "PRIVACYREQUIRED" | "CONTACTADMIN" | "EXPIRED" => OpenError::Permanent(why),
        _ => OpenError::Auth(why),
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
    early: Option<JoinHandle<Result<Connected, OpenError>>>,
) -> Result<(Connection<Stream>, String), OpenError> {
    let target = Target {
        host: &server.host,
        port: server.port,
    };
    let mut early = early;
    let mut kept: Option<(Connection<Stream>, Offers)> = None;
    let result = account.login(|user, token| {
        let reused = kept.is_some();
        let (mut connection, offers) = match kept.take() {
            Some(connection) => connection,
            None => connect_for_oauth2(server, early.take()).map_err(Refusal::Failed)?,
        };
        match imap_oauth2::authenticate(&mut connection, &offers, user, token, target) {
            Ok(()) => Ok((connection, user.to_string())),
            Err((refusal, true)) => {
                kept = Some((connection, offers));
                Err(refusal)
            }
            // The server closed the connection after rejecting the first token.
            Err((Refusal::Failed(_), false)) if reused => {
                let (mut connection, offers) =
                    connect_for_oauth2(server, None).map_err(Refusal::Failed)?;
                imap_oauth2::authenticate(&mut connection, &offers, user, token, target)
                    .map(|()| (connection, user.to_string()))
                    .map_err(|(refusal, _)| refusal)
            }
            Err((refusal, false)) => Err(refusal),
        }
    });
    let error = match result {
        Ok(done) => return Ok(done),
        Err(Failure::Failed(e)) => e,
        Err(Failure::Token(e)) => OpenError::Temporary(account.advice(&e)),
    };
    Err(error)
}

/// Connects (or takes the early connection), and learns from the greeting or a CAPABILITY
/// command which OAuth2 mechanism the server takes and whether it has SASL-IR.
fn connect_for_oauth2(
    server: &Server,
    early: Option<JoinHandle<Result<Connected, OpenError>>>,
) -> Result<(Connection<Stream>, Offers), OpenError> {
    let connected = match early.map(JoinHandle::join) {
        Some(Ok(connected)) => connected,
        _ => connect(server),
    };
    let (mut connection, greeting) = connected?;
    let offers = match greeting.as_ref().and_then(Offers::from_greeting) {
        Some(offers) => offers,
        None => {
            let (names, _) = connection.capability().map_err(|e| {
                OpenError::Temporary(format!(
                    "CAPABILITY failed at {}:{}: {e}",
                    server.host, server.port
                ))
            })?;
            Offers::from_names(&names)
        }
    };
    Ok((connection, offers))
}

/// Connects and reads the greeting ([`crate::imap::connect`]), in the maildrop's terms.
fn connect(server: &Server) -> Result<Connected, OpenError> {
    imap::connect::connect(server).map_err(|e| match e {
        imap::connect::Error::Temporary(why) => OpenError::Temporary(why),
        imap::connect::Error::Permanent(why) => OpenError::Permanent(why),
    })
}

/// An open IMAP session on the selected mailbox, with the snapshot taken at login.
/// Generic over the stream only so that transcript tests can drive it.
pub struct ImapMaildrop<S: Read + Write = Stream> {
    connection: Connection<S>,
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
    relogin: Option<Relogin<S>>,
    uid_validity: u32,
    prefetch: Prefetch,
    _lock: Option<MailboxLock>,
}

impl<S: Read + Write> ImapMaildrop<S> {
    /// Selects the mailbox on a logged-in connection and takes the snapshot: one flight of
    /// commands (CAPABILITY when the policy needs it and LOGIN's answer did not tell,
    /// SELECT or EXAMINE, STATUS for the lock, the listing), read in order.
    fn open(
        mut connection: Connection<S>,
        login: Option<Status>,
        settings: Settings,
        lock: Option<LockPlan>,
        relogin: Option<Relogin<S>>,
    ) -> Result<Self, OpenError> {
        let temporary = |e: imap::Error| OpenError::Temporary(e.to_string());
        // Only moving and expunging depend on extensions; keep and hide (the default) need
        // no capabilities at all.
        let needs_capabilities =
            matches!(settings.policy, DeletePolicy::Trash | DeletePolicy::Expunge);
        let mut capabilities = login.as_ref().and_then(capability_code);
        let asked =
            (needs_capabilities && capabilities.is_none()).then(|| connection.send("CAPABILITY"));
        let select = connection.send(&select_command(&settings));
        // Only needed when SELECT names no MAILBOXID, but asked in the same flight rather
        // than a round trip later. Dovecot adds [CLIENTBUG] to its OK (a STATUS on the
        // selected mailbox), which changes nothing; servers without X-GUID answer BAD.
        let status = lock.is_some().then(|| {
            connection.send(&format!(
                "STATUS {} (X-GUID)",
                quoted_mailbox(&settings.mailbox)
            ))
        });
        let listing = connection.send(LISTING);
        // Read in the order sent, but the server may run the commands after SELECT at
        // once, so every answer's data is taken by its kind wherever it comes.
        let hide =
            (settings.policy == DeletePolicy::Hide).then_some(settings.deleted_keyword.as_str());
        let mut snapshot = Snapshot {
            hide,
            ..Snapshot::default()
        };
        if let Some(tag) = asked {
            connection
                .read_to(&tag, &mut KeepAll, |_, r| snapshot.take(r, false))
                .map_err(temporary)?;
            capabilities = Some(std::mem::take(&mut snapshot.capabilities));
        }
        let capabilities = capabilities.unwrap_or_default();
        let (has_uidplus, has_move) = (
            has_capability(&capabilities, "UIDPLUS"),
            has_capability(&capabilities, "MOVE"),
        );
        let selected = connection
            .read_to(&select, &mut KeepAll, |_, r| snapshot.take(r, true))
            .map_err(temporary)?;
        snapshot.mailbox.apply(&Response::Tagged {
            tag: select.clone(),
            status: selected.clone(),
        });
        if let Some(tag) = status {
            connection
                .read_to(&tag, &mut KeepAll, |_, r| snapshot.take(r, false))
                .map_err(temporary)?;
        }
        let listed_status = connection
            .read_to(&listing, &mut KeepAll, |_, r| snapshot.take(r, false))
            .map_err(temporary)?;
        let (mailbox, guid, sequence) = (snapshot.mailbox, snapshot.guid, snapshot.sequence);
        // Expunges during the flight are in the listing already.
        connection.take_expunged();
        let listed = match listed_status.kind {
            StatusKind::Ok => Ok(snapshot.listed),
            _ => Err(format!("UID FETCH: {listed_status}")),
        };
        if selected.kind != StatusKind::Ok {
            return Err(OpenError::Permanent(format!(
                "cannot open mailbox {:?}: {selected}",
                settings.mailbox
            )));
        }
        log::debug!(
            "selected {:?}: {} messages, read-only {}, permanent flags {:?}, mailbox id {:?}",
            settings.mailbox,
            mailbox.exists,
            mailbox.read_only,
            mailbox.permanent_flags,
            mailbox.mailbox_id
        );
        // Taken before anything the session reads reaches the client or anything changes:
        // the session answers no command on this mailbox without it.
        let lock = match lock {
            None => None,
            Some(plan) => match lock_selected(&plan, &mailbox, guid, &settings) {
                Ok(lock) => Some(lock),
                Err(e) => {
                    let _ = connection.logout();
                    return Err(e);
                }
            },
        };
        let Some(uid_validity) = mailbox.uid_validity else {
            return Err(OpenError::Permanent("server sent no UIDVALIDITY".into()));
        };
        // An empty mailbox may answer `UID FETCH 1:*` with NO or BAD: nothing to list.
        let mut listed = match (listed, mailbox.exists) {
            (_, 0) => Vec::new(),
            (listed, _) => listed.map_err(OpenError::Temporary)?,
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
        let mut prefetch = Prefetch::new(settings.prefetch_window);
        prefetch.sequence = sequence;
        Ok(ImapMaildrop {
            connection,
            settings,
            uids,
            messages,
            cannot_delete,
            has_move,
            broken: None,
            ended_by_server: false,
            relogin,
            uid_validity,
            prefetch,
            _lock: lock,
        })
    }

    fn uid_set(&self, indexes: &[usize]) -> String {
        let mut uids: Vec<u32> = indexes.iter().map(|&i| self.uids[i]).collect();
        uids.sort_unstable();
        uid_set(&uids)
    }
}

/// What the answers to the login's flight of commands tell.
#[derive(Default)]
struct Snapshot<'a> {
    hide: Option<&'a str>,
    capabilities: Vec<String>,
    mailbox: Selected,
    guid: Option<String>,
    listed: Vec<(u32, u64)>,
    /// UID by message number, hidden messages included.
    sequence: Vec<u32>,
}

impl Snapshot<'_> {
    /// Takes in one untagged response; `selecting` while SELECT's answer is read.
    fn take(&mut self, response: Response, selecting: bool) {
        match response {
            Response::Data { name, values } if name == "CAPABILITY" => self.capabilities.extend(
                values
                    .iter()
                    .filter_map(Value::bytes)
                    .map(|b| String::from_utf8_lossy(b).into_owned()),
            ),
            Response::Data { name, values } if name == "STATUS" && self.guid.is_none() => {
                self.guid = status_guid(&values);
            }
            // FETCH responses without both numbers are unsolicited (a flag change).
            Response::Message {
                number,
                data: MessageData::Fetch(fetch),
            } => {
                if let (Some(uid), Ok(at)) = (fetch.uid(), usize::try_from(number)) {
                    if self.sequence.len() < at {
                        self.sequence.resize(at, 0);
                    }
                    if at > 0 {
                        self.sequence[at - 1] = uid;
                    }
                }
                self.listed.extend(listing_item(&fetch, self.hide));
            }
            other if selecting => self.mailbox.apply(&other),
            _ => {}
        }
    }
}

/// The listing: UID, size and flags of every message, in one command.
const LISTING: &str = "UID FETCH 1:* (UID RFC822.SIZE FLAGS)";

/// SELECT, or EXAMINE when the session will change nothing.
fn select_command(settings: &Settings) -> String {
    let read_only = settings.policy == DeletePolicy::Keep && !settings.mark_seen;
    let verb = if read_only { "EXAMINE" } else { "SELECT" };
    format!("{verb} {}", quoted_mailbox(&settings.mailbox))
}

/// SELECT (or EXAMINE) alone, read to its end: for logging in again.
fn select_mailbox<S: Read + Write>(
    connection: &mut Connection<S>,
    settings: &Settings,
) -> Result<Selected, OpenError> {
    let tag = connection.send(&select_command(settings));
    let mut mailbox = Selected::default();
    let status = connection
        .read_to(&tag, &mut KeepAll, |_, response| mailbox.apply(&response))
        .map_err(|e| OpenError::Temporary(e.to_string()))?;
    match status.kind {
        StatusKind::Ok => Ok(mailbox),
        _ => Err(OpenError::Permanent(format!(
            "cannot open mailbox {:?}: {status}",
            settings.mailbox
        ))),
    }
}

/// How reading the listing failed.
enum Listing {
    /// The server answered NO or BAD: the connection is in step.
    Refused(String),
    Broken(imap::Error),
}

/// Reads the answer to the listing (tag `tag`): (UID, size) of every message without the
/// keyword `hide`, in the server's order. Each response is parsed as it comes: one round
/// trip, and no memory or time spent on a whole parsed response.
fn read_listing_of<S: Read + Write>(
    connection: &mut Connection<S>,
    tag: &str,
    hide: Option<&str>,
) -> Result<Vec<(u32, u64)>, Listing> {
    let mut listed = Vec::new();
    let status = connection
        .read_to(tag, &mut KeepAll, |_, response| {
            // FETCH responses without both numbers are unsolicited (a flag change).
            if let Response::Message {
                data: MessageData::Fetch(fetch),
                ..
            } = response
            {
                listed.extend(listing_item(&fetch, hide));
            }
        })
        .map_err(Listing::Broken)?;
    match status.kind {
        StatusKind::Ok => Ok(listed),
        _ => Err(Listing::Refused(format!("UID FETCH: {status}"))),
    }
}

/// Locks the mailbox the server selected: by its MAILBOXID where the server has one, else by
/// its Dovecot GUID, else by the user name as the admin chose to normalise it. Either way
/// after a successful login and SELECT, so lock files exist only for mailboxes that exist.
fn lock_selected(
    plan: &LockPlan,
    selected: &Selected,
    guid: Option<String>,
    settings: &Settings,
) -> Result<MailboxLock, OpenError> {
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

/// A UID set built from numbers only ("3:5,9").
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

/// The read-ahead for sequential clients: fetches sent before the client asks, and what
/// was read of them before it asked.
///
/// Its memory is bounded by the window: the sizes of the messages in flight (which the
/// kernel's socket buffers and the network hold, not this process, until they are read)
/// plus the bodies held. A fetch in flight is read only when its message is asked for, or
/// when a command sent after it needs its answer (TOP of another message, DELE's update,
/// a keepalive): then it is read into memory and held, so that the next command the client
/// actually sends is answered at once and no answer goes to the wrong command.
struct Prefetch {
    window: u64,
    /// Fetches sent and not yet read, in the order sent.
    ahead: VecDeque<Ahead>,
    /// Messages read ahead, by index.
    held: std::collections::BTreeMap<usize, Held>,
    /// UID by message number as the server numbers them now (0: unknown), kept up to date
    /// with `* n EXPUNGE`, so that a message read ahead and expunged by another client
    /// before the client asks for it is answered as expunged, not from memory.
    sequence: Vec<u32>,
    /// UIDs the server reported expunged since the listing.
    expunged: std::collections::HashSet<u32>,
}

/// A read-ahead fetch on the wire.
struct Ahead {
    index: usize,
    uid: u32,
    tag: String,
    extent: Extent,
    cost: u64,
    /// Its body, when it came while another command's answer was read (a server that runs
    /// pipelined FETCHes at once); `Err` when it was larger than the listing said, and
    /// was not kept.
    early: Option<Result<Vec<u8>, ()>>,
}

impl Ahead {
    /// The most a body read ahead may have: its listed size, and a little for a server
    /// whose sizes are not quite the octets it sends.
    fn limit(&self) -> usize {
        (self.cost + self.cost / 16 + 1024) as usize
    }
}

/// A message read ahead: all of it (`Extent::Whole`) or its first [`HEAD_CHUNK`] octets.
struct Held {
    extent: Extent,
    /// `None`: the server sent no body, the message was expunged by another client.
    body: Option<Vec<u8>>,
}

impl Held {
    /// Whether the whole message is held.
    fn is_whole(&self) -> bool {
        match (&self.body, self.extent) {
            (None, _) | (_, Extent::Whole) => true,
            (Some(body), Extent::Head) => body.len() < HEAD_CHUNK,
        }
    }
}

impl Prefetch {
    fn new(window: u64) -> Prefetch {
        Prefetch {
            window,
            ahead: VecDeque::new(),
            held: Default::default(),
            sequence: Vec::new(),
            expunged: Default::default(),
        }
    }

    fn used(&self) -> u64 {
        let ahead: u64 = self.ahead.iter().map(|a| a.cost).sum();
        let held: u64 = self
            .held
            .values()
            .map(|h| h.body.as_ref().map_or(0, |b| b.len() as u64))
            .sum();
        ahead + held
    }
}

/// The partial range a fetch of `extent` asks for first.
fn first_range(extent: Extent) -> Option<usize> {
    match extent {
        Extent::Whole => None,
        Extent::Head => Some(HEAD_CHUNK),
    }
}

/// `UID FETCH uid (UID BODY.PEEK[])`, or the partial range `<offset.length>`. UID first: a
/// server that answers in the order asked names the message before its body, so a wrong
/// one is refused before any of it reaches the client. PEEK: never sets `\Seen`.
fn fetch_command(uid: u32, offset: usize, range: Option<usize>) -> String {
    match range {
        None => format!("UID FETCH {uid} (UID BODY.PEEK[])"),
        Some(length) => format!("UID FETCH {uid} (UID BODY.PEEK[]<{offset}.{length}>)"),
    }
}

/// Holds a body read ahead, up to `limit` octets.
struct Holder {
    body: Vec<u8>,
    limit: usize,
    over: bool,
}

impl MessageSink for Holder {
    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn data(&mut self, bytes: &[u8]) -> io::Result<bool> {
        if self.body.len() + bytes.len() > self.limit {
            // The server sent more than the listing said: not held, fetched again when
            // asked. The rest of its answer is still read, to stay in step.
            self.over = true;
            self.body = Vec::new();
        }
        if !self.over {
            self.body.extend_from_slice(bytes);
        }
        Ok(true)
    }
}

/// How a message served from memory went.
enum FromMemory {
    /// The sink has all it wants.
    Done,
    /// The held head was not enough for TOP: go on fetching from this offset.
    From(usize),
}

impl<S: Read + Write> Maildrop for ImapMaildrop<S> {
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
        let mut sink = Watched {
            sink,
            started: false,
        };
        // A read-ahead fetch of this message on the wire: what was sent before it is read
        // into memory first; then its answer streams to the client, if it serves.
        let mut on_the_wire = None;
        if let Some(position) = self.prefetch.ahead.iter().position(|a| a.index == index) {
            self.drain(position).map_err(|e| self.failed(e))?;
            let front = &self.prefetch.ahead[0];
            // Streamed straight to the client when it is what was asked for. A body that
            // already came is in memory; a whole message asked for by TOP is read into
            // memory and kept for the RETR that often follows; a head asked for by RETR
            // may be the whole message.
            let serves = front.early.is_none() && front.extent == extent;
            match serves {
                true => on_the_wire = self.prefetch.ahead.pop_front(),
                false => self.drain(1).map_err(|e| self.failed(e))?,
            }
        }
        let mut offset = 0usize;
        let mut chunk = first_range(extent);
        if on_the_wire.is_none() {
            match self.serve_held(index, extent, &mut sink) {
                None => {}
                Some(Err(e)) => return Err(e),
                Some(Ok(FromMemory::Done)) => {
                    self.top_up(index, extent);
                    // Sent now, while the client reads this one.
                    if let Err(e) = self.connection.flush() {
                        self.lose(e);
                    }
                    return Ok(());
                }
                Some(Ok(FromMemory::From(held))) => {
                    offset = held;
                    chunk = Some((HEAD_CHUNK * 2).min(FETCH_CHUNK));
                }
            }
        }
        let mut logged_in_again = false;
        loop {
            let tag = match on_the_wire.take() {
                Some(ahead) => {
                    chunk = first_range(ahead.extent);
                    self.top_up(index, extent);
                    ahead.tag
                }
                None => {
                    let tag = self.connection.send(&fetch_command(uid, offset, chunk));
                    let before = self.prefetch.ahead.len();
                    if offset == 0 {
                        self.top_up(index, extent);
                    }
                    // Answers to fetches sent earlier come first on the wire.
                    self.drain(before).map_err(|e| self.failed(e))?;
                    tag
                }
            };
            let others = &mut self.prefetch.ahead;
            let result = read_fetch(
                &mut self.connection,
                &tag,
                uid,
                offset,
                chunk,
                &mut sink,
                others,
            );
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
                    self.ended_by_server = why == CLOSED;
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
            // Waiting for LOGOUT's answer would mean first reading up to the window of
            // read-ahead the client never asked for, across the WAN, with the mailbox lock
            // still held: the connection is simply closed.
            None if !self.prefetch.ahead.is_empty() => {
                log::debug!(
                    "no LOGOUT: read-ahead of messages the client did not ask for is in flight"
                );
            }
            None => {
                self.connection.send("LOGOUT");
                let _ = self.connection.discard_pending();
            }
        }
    }
}

impl<S: Read + Write> ImapMaildrop<S> {
    /// Serves message `index` from a body read ahead, if one is held that serves `extent`;
    /// `None` when none is. A held head serves RETR only if it is the whole message.
    fn serve_held(
        &mut self,
        index: usize,
        extent: Extent,
        sink: &mut dyn MessageSink,
    ) -> Option<Result<FromMemory, FetchError>> {
        self.note_expunges();
        if self.prefetch.expunged.contains(&self.uids[index]) {
            self.prefetch.held.remove(&index);
            return Some(Err(FetchError::Gone));
        }
        let held = self.prefetch.held.get(&index)?;
        if extent == Extent::Whole && !held.is_whole() {
            return None;
        }
        // RETR takes it, and so does TOP when it is only the head; TOP leaves a whole
        // message for the RETR that often follows.
        let held = match extent == Extent::Whole || held.extent == Extent::Head {
            true => self.prefetch.held.remove(&index)?,
            false => Held {
                extent: held.extent,
                body: held.body.clone(),
            },
        };
        let Some(body) = held.body else {
            return Some(Err(FetchError::Gone));
        };
        let served = (|| {
            sink.start()?;
            for piece in body.chunks(64 << 10) {
                if !sink.data(piece)? {
                    return Ok(FromMemory::Done);
                }
            }
            Ok(
                match held.extent == Extent::Head && body.len() == HEAD_CHUNK {
                    true => FromMemory::From(body.len()),
                    false => FromMemory::Done,
                },
            )
        })();
        Some(served.map_err(FetchError::Client))
    }

    /// Takes in the `* n EXPUNGE` responses read so far.
    fn note_expunges(&mut self) {
        for number in self.connection.take_expunged() {
            let at = number as usize;
            if at >= 1 && at <= self.prefetch.sequence.len() {
                let uid = self.prefetch.sequence.remove(at - 1);
                self.prefetch.expunged.insert(uid);
            }
        }
    }

    /// Sends read-ahead fetches for the messages after `index`, as many as the window
    /// holds, in the extent the client is reading (TOP sweeps get heads). They are only
    /// queued: the next write or read sends them. A message larger than what is left of
    /// the window stops the read-ahead there, and is streamed when asked for.
    fn top_up(&mut self, index: usize, extent: Extent) {
        if self.prefetch.window == 0 || self.broken.is_some() {
            return;
        }
        let mut used = self.prefetch.used();
        let mut next = match self.prefetch.ahead.back() {
            Some(last) if last.index > index => last.index + 1,
            _ => index + 1,
        };
        while next < self.uids.len() && self.prefetch.ahead.len() < MAX_AHEAD {
            if self.prefetch.held.contains_key(&next) {
                next += 1;
                continue;
            }
            let size = self.messages[next].size;
            let cost = match extent {
                Extent::Whole => size,
                Extent::Head => size.min(HEAD_CHUNK as u64),
            };
            if used + cost > self.prefetch.window {
                // Held messages before this one are behind a sequential client: their
                // room goes to the messages ahead of it.
                let before = self.prefetch.held.len();
                self.prefetch.held.retain(|&i, _| i >= index);
                if self.prefetch.held.len() == before {
                    break;
                }
                used = self.prefetch.used();
                continue;
            }
            let tag = self
                .connection
                .send(&fetch_command(self.uids[next], 0, first_range(extent)));
            self.prefetch.ahead.push_back(Ahead {
                index: next,
                uid: self.uids[next],
                tag,
                extent,
                cost,
                early: None,
            });
            used += cost;
            next += 1;
        }
    }

    /// Reads the answers to the first `count` read-ahead fetches into memory.
    fn drain(&mut self, count: usize) -> Result<(), Chunk> {
        for _ in 0..count {
            let Some(ahead) = self.prefetch.ahead.pop_front() else {
                break;
            };
            let mut holder = Holder {
                body: Vec::new(),
                limit: ahead.limit(),
                over: false,
            };
            let range = first_range(ahead.extent);
            let others = &mut self.prefetch.ahead;
            let read = read_fetch(
                &mut self.connection,
                &ahead.tag,
                ahead.uid,
                0,
                range,
                &mut holder,
                others,
            );
            let body = match (read, ahead.early) {
                (Ok(None), Some(Ok(body))) => Some(body),
                (Ok(None), Some(Err(()))) => continue,
                (Ok(Some(_)), _) if holder.over => continue,
                (Ok(Some(_)), _) => Some(holder.body),
                // Expunged by another client since the listing.
                (Ok(None), None) | (Err(Chunk::No(..)), _) => None,
                (Err(Chunk::Client(e)), _) => return Err(Chunk::Backend(e.to_string())),
                (Err(e), _) => return Err(e),
            };
            let held = Held {
                extent: ahead.extent,
                body,
            };
            self.prefetch.held.insert(ahead.index, held);
        }
        Ok(())
    }

    /// A read-ahead failure met while serving a command: the connection is unusable.
    fn failed(&mut self, error: Chunk) -> FetchError {
        FetchError::Backend(self.lost_raw(error))
    }

    fn lose(&mut self, error: imap::Error) {
        let _ = self.lost_raw(chunk(error));
    }

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
        let (Some(why), true, Some(relogin)) =
            (&self.broken, self.ended_by_server, &mut self.relogin)
        else {
            return false;
        };
        let why = why.clone();
        self.ended_by_server = false;
        let again = relogin().and_then(|mut connection| {
            let selected = select_mailbox(&mut connection, &self.settings)?;
            match selected.uid_validity == Some(self.uid_validity) {
                true => Ok(connection),
                false => Err(OpenError::Permanent(
                    "the mailbox's UIDVALIDITY changed, so the session's messages are \
                     no longer the same"
                        .into(),
                )),
            }
        });
        match again {
            Ok(connection) => {
                log::info!(
                    "the IMAP server ended the session ({why}); logged in again with the OAuth2 account"
                );
                self.connection = connection;
                // Those fetches were on the old connection; what was read of them holds.
                self.prefetch.ahead.clear();
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

    /// Applies the delete policy to the UIDs in `set` (UPDATE state, RFC 1939 §6), so that
    /// `[TRYCREATE]` is read from the wire.
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
                let trash = quoted_mailbox(&self.settings.trash_mailbox);
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

    /// Runs `command` (one whose untagged data we do not use): `Ok` for OK, [`Chunk::No`]
    /// when the server refused it (NO or BAD: the connection goes on). Read-ahead answers
    /// on the wire before it are read into memory first.
    fn run(&mut self, command: &str) -> Result<(), Chunk> {
        let tag = self.connection.send(command);
        self.drain(self.prefetch.ahead.len())?;
        let status = self
            .connection
            .read_to(&tag, &mut KeepAll, |_, _| {})
            .map_err(chunk)?;
        match status.kind {
            StatusKind::Ok => Ok(()),
            _ => {
                let verb = command.split(' ').take(2).collect::<Vec<_>>().join(" ");
                Err(Chunk::No(format!("{verb}: {status}"), status))
            }
        }
    }

    /// The error of a command; unless the server answered it, the connection is now
    /// unusable.
    fn lost_raw(&mut self, error: Chunk) -> BackendError {
        if let Chunk::Backend(why) = &error {
            self.broken = Some(why.clone());
            self.ended_by_server = why == CLOSED;
        }
        BackendError(error.into_text())
    }
}

/// A mailbox name as an IMAP quoted string. Names with CR, LF or NUL are refused when the
/// options are read, so the fallback never applies.
fn quoted_mailbox(mailbox: &str) -> String {
    quoted(mailbox).unwrap_or_else(|| "\"\"".into())
}

/// How a command failed.
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

fn chunk(error: imap::Error) -> Chunk {
    match error {
        imap::Error::Handler(e) => Chunk::Client(e),
        other => Chunk::Backend(other.to_string()),
    }
}

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

/// Reads the answer to a body fetch (tag `tag`, of `uid` from `offset`, `range` octets or
/// all) to its tagged response. Returns the body's length and whether the sink wants
/// more, or `None` when no body came. The body goes to `sink` as it arrives, but only the
/// body of `uid`: see [`BodyTaker`].
///
/// Bodies of read-ahead fetches in `others` that come first (a server that runs pipelined
/// FETCHes at once, as Dovecot does) are told apart by the UID sent before them and kept
/// with their fetch.
fn read_fetch<S: Read + Write>(
    connection: &mut Connection<S>,
    tag: &str,
    uid: u32,
    offset: usize,
    range: Option<usize>,
    sink: &mut dyn MessageSink,
    others: &mut VecDeque<Ahead>,
) -> Result<Option<(usize, bool)>, Chunk> {
    let body = BodyTaker {
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
    let mut demux = Demux {
        body,
        others,
        routed: None,
    };
    let status = connection
        .read_to(tag, &mut demux, |demux, response| {
            if let Response::Message {
                number,
                data: MessageData::Fetch(fetch),
            } = response
            {
                demux.body.check_uid(number, &fetch);
            }
        })
        .map_err(chunk)?;
    let body = demux.body;
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

/// Sends each body literal to the fetch it answers: one of `others` when the UID before it
/// names one of theirs, else the fetch being read.
struct Demux<'a, 'b> {
    body: BodyTaker<'a>,
    others: &'b mut VecDeque<Ahead>,
    /// Which of `others` takes the literal being read.
    routed: Option<usize>,
}

impl Literals for Demux<'_, '_> {
    fn offer(&mut self, number: u32, name: &str, before: &Fetch, length: u64) -> io::Result<bool> {
        self.routed = None;
        let whole_from_start = matches!(body_origin(name), Some(None | Some(0)));
        if let Some(uid) = before
            .uid()
            .filter(|&uid| uid != self.body.uid && whole_from_start)
            && let Some(at) = self
                .others
                .iter()
                .position(|a| a.uid == uid && a.early.is_none())
        {
            let ahead = &mut self.others[at];
            ahead.early = match length as usize <= ahead.limit() {
                true => Some(Ok(Vec::with_capacity(length as usize))),
                false => Some(Err(())),
            };
            self.routed = Some(at);
            return Ok(true);
        }
        self.body.offer(number, name, before, length)
    }

    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.routed {
            Some(at) => {
                if let Some(Ok(body)) = &mut self.others[at].early {
                    body.extend_from_slice(bytes);
                }
                Ok(())
            }
            None => self.body.data(bytes),
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

/// A server's side of the connection as bytes: what the client writes is dropped.
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
    let mut connection = Connection::with_tags(Recorded(response), "L", 0);
    let tag = connection.send(LISTING);
    read_listing_of(&mut connection, &tag, hide).map_err(|e| match e {
        Listing::Refused(why) => why,
        Listing::Broken(e) => e.to_string(),
    })
}

/// What one body fetch of UID 1 (tag `L1`) makes of `response`: the body's length and
/// whether `sink` wants more, `None` when no body came. `range` is the partial fetch's
/// length (from offset 0). For the fuzzer (tests/fuzz), which has no server.
pub fn read_body(
    response: impl Read,
    range: Option<usize>,
    sink: &mut dyn MessageSink,
) -> Result<Option<(usize, bool)>, FetchError> {
    let mut connection = Connection::with_tags(Recorded(response), "L", 1);
    let tag = connection.send(&fetch_command(1, 0, range));
    let mut others = VecDeque::new();
    read_fetch(&mut connection, &tag, 1, 0, range, sink, &mut others).map_err(|e| match e {
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

#[cfg(test)]
mod oauth2_tests {
    //! The OAuth2 login against a scripted IMAP server: the retry on the same or a new
    //! connection, and what the session is told.

    use super::*;
    use crate::net::{Timeouts, TlsMode};
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
                prefetch_window: DEFAULT_PREFETCH_WINDOW,
            },
            oauth2: Some(Rc::new(RefCell::new(tokens.account()))),
            early: None,
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
    fn the_early_connection_is_made_before_the_login_and_used_by_it() {
        let fake = FakeImap::start(script(&ALL, &["t1"]));
        let tokens = Tokens::new("alice@example.com", &["t1"]);
        let mut opener = opener(&fake, &tokens);
        opener.connect_early();
        // Polled: the server sees the connection before any credentials exist.
        let started = std::time::Instant::now();
        while fake.journal().connects == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no early connection"
            );
            std::thread::yield_now();
        }
        assert!(fake.journal().commands.is_empty());
        open(&mut opener, "alice", "pw").unwrap();
        let journal = fake.journal();
        assert_eq!(journal.connects, 1, "the login used the early connection");
        assert_eq!(journal.commands[0], "AUTHENTICATE");
    }

    #[test]
    fn a_valid_token_logs_in_with_sasl_ir_in_one_round_trip() {
        let fake = FakeImap::start(script(&ALL, &["t1"]));
        let tokens = Tokens::new("alice@example.com", &["t1"]);
        open(&mut opener(&fake, &tokens), "alice", "pw").unwrap();
        assert_eq!(presented(&fake), [("t1".to_string(), true)]);
        let journal = fake.journal();
        // No CAPABILITY: the greeting told what the LOGINDISABLED check and SASL-IR need.
        // EXAMINE and the listing go in one flight.
        assert_eq!(
            journal.commands,
            ["AUTHENTICATE", "EXAMINE", "UID", "LOGOUT"]
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

    // The first session's commands: AUTHENTICATE, EXAMINE, UID FETCH 1:*; the fourth is
    // the one the server ends the session at.

    #[test]
    fn a_session_the_server_ends_when_its_token_expires_logs_in_again_for_retr() {
        let (fake, _tokens, mut maildrop) = ending_session(4, &["t1"]);
        assert_eq!(retr(&mut maildrop).unwrap(), MESSAGE.as_bytes());
        let journal = fake.journal();
        assert_eq!(journal.connects, 2);
        assert!(journal.commands.contains(&"*BYE".to_string()));
        maildrop.close();
    }

    #[test]
    fn a_session_the_server_ends_during_a_keepalive_goes_on_with_the_next_command() {
        let (fake, _tokens, mut maildrop) = ending_session(4, &["t1"]);
        maildrop.keepalive().unwrap();
        assert_eq!(retr(&mut maildrop).unwrap(), MESSAGE.as_bytes());
        assert_eq!(fake.journal().connects, 2);
        maildrop.close();
    }

    #[test]
    fn logging_in_again_is_tried_once_per_loss_and_its_failure_is_an_error() {
        // The token the new session gets is refused, and so is the renewed one.
        let (fake, tokens, mut maildrop) = ending_session(4, &["t1", "t2", "t3"]);
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

#[cfg(test)]
#[path = "prefetch_tests.rs"]
mod prefetch_tests;
