//! The queue's files: one message is a data file plus an envelope file, written so that a
//! crash at any point leaves it either fully queued or not queued at all.
//!
//! Layout of the queue directory (shared by every `smtp` process and every `queue run`):
//!
//! - `ID.msg`: the message as it goes upstream (CRLF lines, not dot-stuffed). Written once,
//!   never changed. Its `flock` is the message's lock: whoever holds it is delivering or
//!   changing the message, and nobody else touches it.
//! - `ID.env`: the envelope as JSON (sender, recipients, account, attempts, next attempt,
//!   last error, held). Its presence is what "queued" means: it is renamed into place after
//!   the data file, and removed first when the message leaves the queue.
//! - `tmp/`: files being written. A temporary file is written, fsynced, then renamed into
//!   place, and the directory is fsynced, so a rename is never lost after a `250`.
//! - `delivered/ID`: a tombstone, written (and fsynced) the moment the backend accepted
//!   the message, before the queue files are removed. If the process dies in between, the
//!   next `queue run` finds the tombstone and removes the leftover instead of sending it
//!   again. Tombstones are pruned after [`TOMBSTONE_AGE`].
//!
//! Files are created 0600 and the directories 0700: messages are private mail.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a delivered message's id is remembered (longer than any run can take).
pub const TOMBSTONE_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Files in `tmp/`, and data files without an envelope, older than this are left over
/// from a crash during a write and are removed by `queue run`.
pub const ORPHAN_AGE: Duration = Duration::from_secs(3600);

const ENVELOPE_VERSION: u32 = 1;

/// A recipient the backend refused for good, for the delivery-status notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub recipient: String,
    /// The backend's reply (`550 5.1.1 …`) or the proxy's reason (lifetime expired).
    pub reply: String,
}

/// Everything about a queued message except its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u32,
    pub id: String,
    /// The envelope sender as sent upstream (after --force-sender); empty is the null
    /// sender, which never gets a DSN.
    pub from: String,
    /// Recipients not yet delivered.
    pub to: Vec<String>,
    /// Recipients refused for good, waiting for their DSN.
    #[serde(default)]
    pub failed: Vec<Failure>,
    /// The account (accounts-file section) the message was accepted for; `None` is the
    /// command-line backend. `queue run` sends it through the same account.
    pub account: Option<String>,
    /// The client that handed it to us, for the logs.
    pub client: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub attempts: u32,
    /// Seconds since the epoch; not tried before.
    pub next_attempt: u64,
    pub last_error: Option<String>,
    /// Held by the admin: never tried until released.
    #[serde(default)]
    pub held: bool,
    /// Bytes in the data file.
    pub size: u64,
}

/// What a new message brings; the rest of its envelope starts empty.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub from: String,
    pub to: Vec<String>,
    pub account: Option<String>,
    pub client: String,
    /// Why the backend could not take it during the session, if it could not.
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub enum StoreError {
    /// --queue-max-size would be exceeded.
    Full { used: u64, max: u64 },
    /// The disk (or the file system's quota) filled up during the write.
    NoSpace(io::Error),
    /// Anything else: the directory is missing, unwritable, not a directory…
    Io(io::Error),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Full { used, max } => write!(
                f,
                "queue full: {used} bytes queued, --queue-max-size is {max}"
            ),
            StoreError::NoSpace(e) => write!(f, "no space left for the queue: {e}"),
            StoreError::Io(e) => write!(f, "cannot write to the queue: {e}"),
        }
    }
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::StorageFull || e.kind() == io::ErrorKind::QuotaExceeded {
            StoreError::NoSpace(e)
        } else {
            StoreError::Io(e)
        }
    }
}

/// The queue directory and its size limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    pub dir: PathBuf,
    /// Bytes of message data the queue may hold (`None`: as much as the disk takes).
    pub max_size: Option<u64>,
}

/// A message whose lock this process holds. Dropping it releases the lock (so does the
/// process dying, however it dies).
#[derive(Debug)]
pub struct Locked {
    pub envelope: Envelope,
    data: File,
}

impl Locked {
    /// The message bytes from the start, and their length.
    pub fn message(&mut self) -> io::Result<(&mut File, u64)> {
        self.data.rewind()?;
        let len = self.data.metadata()?.len();
        Ok((&mut self.data, len))
    }

    pub fn id(&self) -> &str {
        &self.envelope.id
    }
}

/// Whether `id` could be a queue id: only letters and digits, so that an id typed by the
/// admin can never name a file outside the queue.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A new id: microseconds, process id and a counter, in upper-case hex (like Postfix's).
/// Unique across processes on one machine; `create_new` catches the impossible rest.
fn new_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{micros:013X}{:06X}{:02X}",
        std::process::id() & 0xFF_FFFF,
        count & 0xFF
    )
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Makes renames and removals in `dir` durable (a rename lives in the directory).
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Queue {
    pub fn new(dir: impl Into<PathBuf>, max_size: Option<u64>) -> Queue {
        Queue {
            dir: dir.into(),
            max_size,
        }
    }

    fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn tombstone_dir(&self) -> PathBuf {
        self.dir.join("delivered")
    }

    fn data_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.msg"))
    }

    fn envelope_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.env"))
    }

    /// Creates the directory and its subdirectories (0700) when missing.
    pub fn create_dirs(&self) -> io::Result<()> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        builder.create(&self.dir)?;
        builder.create(self.tmp_dir())?;
        builder.create(self.tombstone_dir())
    }

    /// Bytes of message data in the queue now.
    pub fn used(&self) -> io::Result<u64> {
        let mut used = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().ends_with(".msg") {
                used += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        Ok(used)
    }

    /// Stores a message durably and returns it locked: when this returns `Ok`, the message
    /// survives a crash or a power cut, and the caller may answer `250`. On error nothing
    /// is left behind (no partial file) and the caller answers `452`/`451`.
    ///
    /// The limit is checked against what is queued when the message arrives: processes
    /// storing at the same moment can together pass it by at most their own messages.
    pub fn store(
        &self,
        new: NewMessage,
        message: &mut dyn Read,
        len: u64,
    ) -> Result<Locked, StoreError> {
        self.create_dirs()?;
        if let Some(max) = self.max_size {
            let used = self.used()?;
            if used.saturating_add(len) > max {
                return Err(StoreError::Full { used, max });
            }
        }
        let id = new_id();
        let tmp_data = self.tmp_dir().join(format!("{id}.msg"));
        let tmp_envelope = self.tmp_dir().join(format!("{id}.env"));
        let result = self.write_new(&id, new, message, len, &tmp_data, &tmp_envelope);
        if result.is_err() {
            let _ = fs::remove_file(&tmp_data);
            let _ = fs::remove_file(&tmp_envelope);
            // Renamed already if the failure was the directory sync: not queued then
            // either, since the client gets no 250.
            let _ = fs::remove_file(self.envelope_path(&id));
            let _ = fs::remove_file(self.data_path(&id));
        }
        result
    }

    fn write_new(
        &self,
        id: &str,
        new: NewMessage,
        message: &mut dyn Read,
        len: u64,
        tmp_data: &Path,
        tmp_envelope: &Path,
    ) -> Result<Locked, StoreError> {
        let mut data = create_private(tmp_data)?;
        // Locked before it has a name in the queue, so no `queue run` can take it while
        // this process delivers it right after answering the client.
        data.try_lock().map_err(|e| match e {
            TryLockError::Error(e) => e,
            TryLockError::WouldBlock => io::Error::other("new data file already locked"),
        })?;
        let copied = copy_with_crash_point(message, &mut data)?;
        if copied != len {
            return Err(StoreError::Io(io::Error::other(format!(
                "message was {copied} bytes, expected {len}"
            ))));
        }
        data.sync_all()?;
        let now = now_secs();
        let envelope = Envelope {
            version: ENVELOPE_VERSION,
            id: id.to_string(),
            from: new.from,
            to: new.to,
            failed: Vec::new(),
            account: new.account,
            client: new.client,
            created: now,
            attempts: 0,
            next_attempt: now,
            last_error: new.last_error,
            held: false,
            size: len,
        };
        write_envelope_file(tmp_envelope, &envelope)?;
        fs::rename(tmp_data, self.data_path(id))?;
        fs::rename(tmp_envelope, self.envelope_path(id))?;
        sync_dir(&self.dir)?;
        super::crash_point("after-fsync");
        Ok(Locked { envelope, data })
    }

    /// Ids of the queued messages (those with an envelope), oldest first.
    pub fn ids(&self) -> io::Result<Vec<String>> {
        let mut ids: Vec<String> = fs::read_dir(&self.dir)?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                let id = name.strip_suffix(".env")?;
                valid_id(id).then(|| id.to_string())
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The envelope of `id` as it is now (without the lock: for listing only).
    pub fn envelope(&self, id: &str) -> io::Result<Envelope> {
        let bytes = fs::read(self.envelope_path(id))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", self.envelope_path(id).display()),
            )
        })
    }

    /// Takes the lock of `id` without waiting. `Ok(None)` when another process holds it
    /// or the message is no longer queued (delivered by someone else since it was listed).
    pub fn lock(&self, id: &str) -> io::Result<Option<Locked>> {
        if !valid_id(id) {
            return Ok(None);
        }
        let data = match File::open(self.data_path(id)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match data.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => return Err(e),
        }
        // Checked under the lock: whoever removed it held the lock while doing so.
        match self.envelope(id) {
            Ok(envelope) => Ok(Some(Locked { envelope, data })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Saves a changed envelope (attempts, next attempt, error, held) atomically.
    pub fn update(&self, locked: &Locked) -> io::Result<()> {
        let id = locked.id();
        let tmp = self
            .tmp_dir()
            .join(format!("{id}.env.{}", std::process::id()));
        let result = write_envelope_file(&tmp, &locked.envelope)
            .and_then(|_| fs::rename(&tmp, self.envelope_path(id)))
            .and_then(|_| sync_dir(&self.dir));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Records that the backend accepted the message (or it was bounced): from this moment
    /// a leftover of it is never sent again. Must be called as soon as the backend's `250`
    /// has arrived: the time between the two is the one window for a duplicate.
    pub fn tombstone(&self, id: &str) -> io::Result<()> {
        let dir = self.tombstone_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        match create_private(&dir.join(id)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        sync_dir(&dir)
    }

    pub fn has_tombstone(&self, id: &str) -> bool {
        valid_id(id) && self.tombstone_dir().join(id).exists()
    }

    /// Takes the message out of the queue (the lock is released when `locked` drops),
    /// durably: the admin's `queue remove`, with no tombstone behind it.
    pub fn remove(&self, locked: Locked) -> io::Result<()> {
        self.unlink(locked, true)
    }

    /// Takes a tombstoned message out of the queue. The directory is not fsynced: should
    /// the removal be lost in a crash, the tombstone (fsynced) marks the files as a
    /// leftover that `queue run` removes without sending. One fsync fewer per delivery.
    pub fn remove_tombstoned(&self, locked: Locked) -> io::Result<()> {
        debug_assert!(self.has_tombstone(locked.id()));
        self.unlink(locked, false)
    }

    /// The envelope goes first: without it the message is no longer queued.
    fn unlink(&self, locked: Locked, durable: bool) -> io::Result<()> {
        let id = locked.id().to_string();
        match fs::remove_file(self.envelope_path(&id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let _ = fs::remove_file(self.data_path(&id));
        if durable {
            sync_dir(&self.dir)?;
        }
        drop(locked);
        Ok(())
    }

    /// Removes what crashes left: tombstones past [`TOMBSTONE_AGE`], temporary files and
    /// envelope-less data files past [`ORPHAN_AGE`] that nobody holds. Returns how many.
    pub fn clean(&self) -> io::Result<usize> {
        let mut removed = 0;
        let old = |path: &Path, age: Duration| {
            fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|elapsed| elapsed > age)
        };
        for (dir, age) in [
            (self.tombstone_dir(), TOMBSTONE_AGE),
            (self.tmp_dir(), ORPHAN_AGE),
        ] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if old(&path, age) && unlocked(&path) && fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
        }
        for entry in fs::read_dir(&self.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".msg") {
                let path = entry.path();
                if !self.envelope_path(id).exists()
                    && old(&path, ORPHAN_AGE)
                    && unlocked(&path)
                    && fs::remove_file(&path).is_ok()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Whether nobody holds the flock of `path` (so it is not being written right now).
fn unlocked(path: &Path) -> bool {
    File::open(path).is_ok_and(|f| f.try_lock().is_ok())
}

fn write_envelope_file(path: &Path, envelope: &Envelope) -> io::Result<()> {
    let mut file = create_private(path)?;
    let json = serde_json::to_vec_pretty(envelope).map_err(io::Error::other)?;
    file.write_all(&json)?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// `io::copy`, with the `spool-write` crash point after the first chunk.
fn copy_with_crash_point(from: &mut dyn Read, to: &mut File) -> io::Result<u64> {
    let mut buf = vec![0; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        if total == 0 {
            super::crash_point("spool-write");
        }
        total += n as u64;
    }
}
