//! RFC 1939 §8 exclusive access: one session per maildrop, across processes.
//!
//! Each session is its own process, so the lock is an advisory `flock` on a file named
//! after the mailbox the server opened ([`key`]). The kernel releases it when the process exits, however it exits, so a
//! crash never leaves a stale lock. All instances must share one lock directory: under
//! systemd `Accept=yes` a per-instance `RuntimeDirectory` or `PrivateTmp` would give each
//! connection its own and break this.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct MailboxLock {
    _file: File,
}

#[derive(Debug)]
pub enum LockError {
    /// Another process holds it.
    Held,
    /// The lock file could not be created or locked.
    Io(std::io::Error),
}

/// What a lock key does with the domain of a user name (`alice@example.org`), when the
/// server gives no mailbox id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserDomain {
    /// Part of the key: right for servers where `alice@a` and `alice@b` are two accounts.
    Keep,
    /// Cut at the first `@`, as Dovecot's `%n` does: right for servers that ignore the
    /// domain, where otherwise each spelling of it would get its own lock.
    Strip,
}

/// What identifies the mailbox a session opened.
#[derive(Debug, Clone, Copy)]
pub enum Mailbox<'a> {
    /// The server's own id for the mailbox: the same mailbox has the same id however the
    /// user name or the mailbox name was spelled. `kind` names where the id came from
    /// (`mailboxid` for RFC 8474, `x-guid` for Dovecot's mailbox GUID): ids of two kinds
    /// never share a key.
    Id { kind: &'a str, id: &'a str },
    /// No id from the server: the user name as logged in, and the mailbox name.
    Named {
        user: &'a str,
        mailbox: &'a str,
        domain: UserDomain,
    },
}

/// The lock key for `mailbox` on the server `host`. Lower case and without the port: the
/// same server reached through 993 and 143 holds the same mailboxes. A user name is
/// lower-cased because servers commonly treat user names case-insensitively, and "Alice"
/// and "alice" must not get two sessions on one mailbox.
pub fn key(host: &str, mailbox: Mailbox) -> String {
    let host = host.to_lowercase();
    match mailbox {
        // A host name has no ":" before a "/", so this never names a user's lock.
        Mailbox::Id { kind, id } => format!("{kind}:{host}/{id}"),
        Mailbox::Named {
            user,
            mailbox,
            domain,
        } => {
            let user = user.to_lowercase();
            let user = match domain {
                UserDomain::Keep => user.as_str(),
                UserDomain::Strip => user.split('@').next().unwrap_or_default(),
            };
            format!("{host}/{user}/{mailbox}")
        }
    }
}

/// Takes the lock for `key` in `dir` without waiting.
pub fn acquire(dir: &Path, key: &str) -> Result<MailboxLock, LockError> {
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(LockError::Io)?;
    }
    let file = open_lock_file(&dir.join(file_name(key))).map_err(LockError::Io)?;
    match file.try_lock() {
        Ok(()) => Ok(MailboxLock { _file: file }),
        Err(TryLockError::WouldBlock) => Err(LockError::Held),
        Err(TryLockError::Error(e)) => Err(LockError::Io(e)),
    }
}

/// Opens (creating if need be) a file to `flock`. flock needs no write access: opening an
/// existing file read-only, and creating it readable by all, means a lock file left behind
/// by another user (an admin testing by hand as root, say) does not lock the service out.
pub fn open_lock_file(path: &Path) -> std::io::Result<File> {
    match OpenOptions::new().read(true).open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o644)
                .open(path)
        }
        other => other,
    }
}

/// A readable, collision-free file name: safe bytes kept, every other byte as `%XX`. A
/// name too long for the file system (255 bytes) keeps its start and gets a hash of the
/// whole key instead of the rest.
pub(crate) fn file_name(key: &str) -> String {
    let name = escaped(key);
    if name.len() <= 200 {
        return name;
    }
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same key gives the same name in every process.
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    let mut cut = 150;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{:016x}.lock", &name[..cut], hasher.finish())
}

fn escaped(key: &str) -> String {
    let mut name = String::with_capacity(key.len() + 5);
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.@".contains(&b) {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name.push_str(".lock");
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_the_same_key_is_refused_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("lmp-lock-{}", std::process::id()));
        let first = acquire(&dir, "imap.example:993/alice").unwrap();
        assert!(matches!(
            acquire(&dir, "imap.example:993/alice"),
            Err(LockError::Held)
        ));
        let other = acquire(&dir, "imap.example:993/bob").unwrap();
        drop(first);
        let again = acquire(&dir, "imap.example:993/alice").unwrap();
        drop((other, again));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_name_the_mailbox_id_when_there_is_one() {
        let named = |user, domain| {
            key(
                "IMAP.Example.org",
                Mailbox::Named {
                    user,
                    mailbox: "INBOX",
                    domain,
                },
            )
        };
        // The server's id wins over every spelling of the user.
        let id = |kind, id| key("IMAP.Example.org", Mailbox::Id { kind, id });
        assert_eq!(
            id("mailboxid", "F2212ea8"),
            "mailboxid:imap.example.org/F2212ea8"
        );
        assert_ne!(id("mailboxid", "F2212ea8"), id("x-guid", "F2212ea8"));
        // Without one: lower case, and the domain only as configured.
        assert_eq!(
            named("Alice", UserDomain::Keep),
            "imap.example.org/alice/INBOX"
        );
        assert_eq!(
            named("ALICE@Other.test", UserDomain::Keep),
            "imap.example.org/alice@other.test/INBOX"
        );
        for spelling in ["alice", "ALICE@other.test", "alice@example.test"] {
            assert_eq!(
                named(spelling, UserDomain::Strip),
                "imap.example.org/alice/INBOX"
            );
        }
    }

    #[test]
    fn file_names_cannot_escape_the_directory_or_collide() {
        assert_eq!(file_name("h:1/../x"), "h%3A1%2F..%2Fx.lock");
        assert_ne!(file_name("a/b"), file_name("a%2Fb"));
        let long = "x".repeat(300);
        let longer = format!("{long}y");
        assert!(file_name(&long).len() < 255);
        assert_ne!(file_name(&long), file_name(&longer));
        assert_eq!(file_name(&long), file_name(&long));
    }
}
