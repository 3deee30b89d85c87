//! Per-test mail accounts: a passwd-file entry, a Maildir owned by the mail user, and
//! ways to put messages into it (byte-exact Maildir writes, or delivery over LMTP).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::servers;

/// A mail account in the test Dovecot (and, through Postfix, `email`).
#[derive(Clone, Debug)]
pub struct User {
    /// Login name for IMAP and POP3 (no domain part).
    pub name: String,
    pub password: String,
    /// `name@example.test`: the address Postfix accepts and delivers over LMTP.
    pub email: String,
    pub home: PathBuf,
    pub maildir: PathBuf,
    uid: u32,
    gid: u32,
    /// Counter for Maildir file names, which also fixes the order in which Dovecot
    /// assigns UIDs (it sorts new files by the time stamp in their names).
    seq: Arc<AtomicU64>,
    base_secs: u64,
}

impl User {
    pub(crate) fn create(
        name: String,
        password: String,
        email: String,
        home: PathBuf,
        uid: u32,
        gid: u32,
    ) -> Result<User, String> {
        let maildir = home.join("Maildir");
        for d in [
            home.clone(),
            maildir.clone(),
            maildir.join("cur"),
            maildir.join("new"),
            maildir.join("tmp"),
        ] {
            fs::create_dir(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
            chown(&d, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", d.display()))?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("chmod {}: {e}", d.display()))?;
        }
        let base_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        Ok(User {
            name,
            password,
            email,
            home,
            maildir,
            uid,
            gid,
            seq: Arc::new(AtomicU64::new(0)),
            base_secs,
        })
    }

    fn next_file_name(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        format!(
            "{}.M{}P{}Q{n}.lmp-test",
            self.base_secs + n / 1_000_000,
            n % 1_000_000,
            std::process::id()
        )
    }

    fn write_file(&self, message: &[u8], dest: &Path) -> PathBuf {
        let name = dest.file_name().unwrap();
        let tmp = self.maildir.join("tmp").join(name);
        fs::write(&tmp, message).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        chown(&tmp, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", tmp.display()));
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).unwrap();
        fs::rename(&tmp, dest).unwrap_or_else(|e| panic!("rename into {}: {e}", dest.display()));
        dest.to_path_buf()
    }

    /// Writes one message byte-exact into `Maildir/new` (tmp → rename). Dovecot sees it at
    /// its next sync; call [`User::resync`] to be sure. Dovecot serves bare LF as CRLF.
    /// Messages seeded in one batch get increasing UIDs in seeding order.
    pub fn seed(&self, message: &[u8]) -> PathBuf {
        let name = self.next_file_name();
        self.write_file(message, &self.maildir.join("new").join(name))
    }

    /// Writes a message into `Maildir/cur` with Maildir flags, e.g. "S" (\Seen),
    /// "F" (\Flagged), "R" (\Answered), "T" (\Deleted), "D" (\Draft).
    pub fn seed_with_flags(&self, message: &[u8], flags: &str) -> PathBuf {
        let mut flags: Vec<char> = flags.chars().collect();
        flags.sort_unstable();
        flags.dedup();
        let flags: String = flags.into_iter().collect();
        let name = format!("{}:2,{flags}", self.next_file_name());
        self.write_file(message, &self.maildir.join("cur").join(name))
    }

    /// Seeds all messages, then resyncs once: fast for tens of thousands of messages.
    /// UIDs follow the order of `messages`.
    pub fn seed_many<M: AsRef<[u8]>>(&self, messages: &[M]) {
        for m in messages {
            self.seed(m.as_ref());
        }
        self.resync();
    }

    /// `doveadm force-resync -u USER INBOX`: makes Dovecot index what was written.
    pub fn resync(&self) {
        let s = servers();
        let out = s.doveadm(&["force-resync", "-u", &self.name, "INBOX"]);
        assert!(
            out.status.success(),
            "doveadm force-resync -u {} failed: {}{}\n{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            s.dovecot_logs()
        );
    }

    /// Number of message files in `Maildir/new` and `Maildir/cur` (INBOX only).
    pub fn maildir_count(&self) -> usize {
        ["new", "cur"]
            .iter()
            .map(|d| fs::read_dir(self.maildir.join(d)).map_or(0, |r| r.count()))
            .sum()
    }

    /// Delivers over Dovecot's LMTP socket, like Postfix does. Dovecot adds Return-Path,
    /// Delivered-To and Received headers. Line ends become CRLF; dot-stuffing is done here.
    pub fn deliver_lmtp(&self, message: &[u8]) {
        let s = servers();
        if let Err(e) = lmtp_deliver(&s.lmtp_socket, "sender@example.org", &self.email, message) {
            panic!(
                "LMTP delivery to {} failed: {e}\n{}",
                self.email,
                s.dovecot_logs()
            );
        }
    }
}

fn send(w: &mut UnixStream, line: &str) -> Result<(), String> {
    w.write_all(line.as_bytes())
        .map_err(|e| format!("write {line:?}: {e}"))
}

fn lmtp_reply(r: &mut impl BufRead) -> Result<String, String> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
        if line.is_empty() {
            return Err(format!("connection closed after {all:?}"));
        }
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return Ok(all);
        }
    }
}

fn lmtp_expect(r: &mut impl BufRead, code: &str, after: &str) -> Result<(), String> {
    let reply = lmtp_reply(r)?;
    if reply.starts_with(code) {
        Ok(())
    } else {
        Err(format!("after {after}: {reply}"))
    }
}

/// A minimal LMTP client (RFC 2033) for one recipient.
pub fn lmtp_deliver(socket: &Path, from: &str, to: &str, message: &[u8]) -> Result<(), String> {
    let stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    lmtp_expect(&mut r, "220", "connect")?;
    send(&mut w, "LHLO localhost\r\n")?;
    lmtp_expect(&mut r, "250", "LHLO")?;
    send(&mut w, &format!("MAIL FROM:<{from}>\r\n"))?;
    lmtp_expect(&mut r, "250", "MAIL")?;
    send(&mut w, &format!("RCPT TO:<{to}>\r\n"))?;
    lmtp_expect(&mut r, "250", "RCPT")?;
    send(&mut w, "DATA\r\n")?;
    lmtp_expect(&mut r, "354", "DATA")?;
    let mut data = Vec::with_capacity(message.len() + 64);
    if !message.is_empty() {
        let body = message.strip_suffix(b"\n").unwrap_or(message);
        for line in body.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.starts_with(b".") {
                data.push(b'.');
            }
            data.extend_from_slice(line);
            data.extend_from_slice(b"\r\n");
        }
    }
    data.extend_from_slice(b".\r\n");
    w.write_all(&data).map_err(|e| format!("write data: {e}"))?;
    lmtp_expect(&mut r, "250", "end of data")?;
    let _ = send(&mut w, "QUIT\r\n");
    Ok(())
}
