//! Integration-test harness: real Dovecot 2.3 and Postfix 3.7 servers, started once per
//! test process, plus independent reference clients.
//!
//! - [`servers()`] starts, on first use, a private Dovecot under a fresh directory
//!   `/tmp/lmp-test.<pid>.<n>` with a private CA. It serves IMAP (STARTTLS and implicit
//!   TLS), Dovecot's own POP3 (the UIDL reference), LMTP, and "untrusted" IMAP listeners on
//!   127.0.0.2 whose certificate comes from another CA.
//! - [`postfix()`] starts Postfix on first use: submission with implicit TLS and with
//!   STARTTLS, SASL via Dovecot, delivery of `@example.test` into Dovecot over LMTP.
//! - The rest of issue 13's server matrix, each started on first use from Debian packages
//!   that tests/setup.sh unpacks (not installs: they conflict with Dovecot/Postfix) into
//!   /var/cache/legacy-mail-proxy-test/servers: [`exim()`] (a second submission server,
//!   AUTH through Dovecot, delivery into the same Maildirs), [`cyrus()`] and [`courier()`]
//!   (IMAP servers with their own stores, seeded by APPEND; Courier in a private mount
//!   namespace, plain IMAP only). OpenSMTPD is absent: Debian 12's 6.8.0p2 cannot do TLS
//!   with OpenSSL 3 (upstream issues #1171, #1239).
//! - Tests run in parallel threads against the same servers; each test makes its own
//!   accounts with [`Servers::new_user`].
//! - [`oauth2()`] starts, on first use, the OAuth2 world (see `oauth2.rs`): a real
//!   authorization server (oidc-provider on Node.js) and a second Dovecot and Postfix that
//!   accept its tokens (XOAUTH2, OAUTHBEARER), on the same accounts and Maildirs.
//! - [`LatencyRelay`] (`latency.rs`) puts a wide-area link between a client and a server:
//!   a delay each way, no bandwidth limit, and a count of the link's round trips (issue 14).
//! - Cleanup: every server runs under a wrapper that kills its process group when this
//!   process exits (see `process.rs`); a last helper then removes the directory. Set
//!   `LMP_TEST_KEEP=1` to keep the directory (and its logs) for debugging.
//!
//! Needs root (Dovecot and Postfix switch users). `sudo ./tests/run-all` installs
//! everything needed and runs all tests.
#![allow(dead_code)]

mod clients;
mod courier;
mod cyrus;
mod dovecot;
mod exim;
mod fault;
mod gateway;
mod inetd;
mod latency;
mod oauth2;
mod opensmtpd;
mod pop3_transcript;
mod postfix;
mod process;
mod tls;
mod users;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

// Each test binary uses a subset of these.
#[allow(unused_imports)]
pub use clients::{
    dovecot_pop3_list, dovecot_pop3_uidl, imap_append_at, imap_fetch_all, imap_fetch_all_at,
    imap_fetch_all_in, imap_flags, imap_flags_at, imap_mailbox_list, missing_program_message,
    proxy_bin, python, python_ok, require_client, run_fetchmail, run_proxy, server_env,
    wait_for_messages, wait_until, which,
};
#[allow(unused_imports)]
pub use courier::{Courier, courier};
#[allow(unused_imports)]
pub use cyrus::{Cyrus, cyrus};
#[allow(unused_imports)]
pub use exim::{Exim, exim};
#[allow(unused_imports)]
pub use fault::{FaultProxy, line_filter, without_capability};
#[allow(unused_imports)]
pub use gateway::{Gateway, gateway};
#[allow(unused_imports)]
pub use inetd::Inetd;
#[allow(unused_imports)]
pub use latency::{LatencyRelay, LinkStats};
#[allow(unused_imports)]
pub use oauth2::{
    CONFIDENTIAL_CLIENT_ID, GrantLogEntry, Idp, OAuth2World, PUBLIC_CLIENT_ID, REDIRECT_URI,
    SCOPES, TokenResponse, curl, json_num, json_str, oauth2, unix_now,
};
#[allow(unused_imports)]
pub use opensmtpd::{OpenSmtpd, opensmtpd};
#[allow(unused_imports)]
pub use pop3_transcript::{corpus, message_to_cut, normalized, pop3_proxy_args, responses};
#[allow(unused_imports)]
pub use postfix::{Postfix, postfix, postfix_if_started};
#[allow(unused_imports)]
pub use process::{
    address_in_use, live_process_group_members, run_child_test, start_on_free_ports,
};
#[allow(unused_imports)]
pub use users::{User, lmtp_deliver};

/// How to get everything the tests need.
pub const INSTALL_HINT: &str = "Or run `sudo ./tests/run-all`, which installs all of it: \
     apt-get install -y --no-install-recommends dovecot-imapd dovecot-pop3d dovecot-lmtpd \
     postfix xinetd swaks libnet-ssleay-perl libio-socket-ssl-perl fetchmail curl openssl python3";

/// The unprivileged system user that owns all Maildirs (created if missing).
pub const MAIL_USER: &str = "lmp-test";

/// The domain Postfix delivers into Dovecot.
pub const MAIL_DOMAIN: &str = "example.test";

/// The running Dovecot and everything about it. Fields are read-only facts.
pub struct Servers {
    /// The temporary directory holding all state, configs and logs (`log/`).
    pub dir: PathBuf,
    /// "127.0.0.1": every trusted listener.
    pub host: &'static str,
    /// "localhost": the name in the certificates, for clients that check host names
    /// (fetchmail ignores IP SANs). Connect to `host`, verify against `tls_host`.
    pub tls_host: &'static str,
    /// IMAP without TLS; STARTTLS offered. Plaintext LOGIN allowed from 127.0.0.1.
    pub imap_port: u16,
    /// IMAP over implicit TLS.
    pub imaps_port: u16,
    /// Dovecot's own POP3 (plain, STLS offered): the reference for UIDLs and sizes.
    pub pop3_port: u16,
    /// Dovecot's POP3 over implicit TLS.
    pub pop3s_port: u16,
    /// "127.0.0.2": the listeners whose certificate is signed by the untrusted CA (the
    /// certificate names localhost, 127.0.0.1 and 127.0.0.2, so only the CA is wrong).
    pub untrusted_host: &'static str,
    /// IMAP with STARTTLS on `untrusted_host` (LOGINDISABLED before STARTTLS).
    pub untrusted_imap_port: u16,
    /// IMAP over implicit TLS on `untrusted_host`.
    pub untrusted_imaps_port: u16,
    /// Our CA certificate (PEM): trust this to accept the servers.
    pub ca_file: PathBuf,
    /// The other CA (PEM), which signed the untrusted endpoints' certificate.
    pub untrusted_ca_file: PathBuf,
    /// `example.test`.
    pub mail_domain: &'static str,
    pub dovecot_conf: PathBuf,
    pub lmtp_socket: PathBuf,
    /// Dovecot auth socket used by Postfix SASL.
    pub auth_socket: PathBuf,
    pub mail_uid: u32,
    pub mail_gid: u32,
    pub(crate) tls: tls::TlsFiles,
    passwd_dir: PathBuf,
    dovecot: process::ServerProcess,
    /// Lower-case e-mail addresses of all accounts (served to Postfix).
    addresses: Arc<Mutex<BTreeSet<String>>>,
    counter: AtomicU64,
    _reaper: process::Lifeline,
}

static SERVERS: OnceLock<Result<Servers, String>> = OnceLock::new();

/// The process-wide servers, started on first call. Panics (never skips) with the
/// server logs or the install command if they cannot run.
pub fn servers() -> &'static Servers {
    match SERVERS.get_or_init(start) {
        Ok(s) => s,
        Err(e) => panic!("test servers could not be started: {e}"),
    }
}

/// Adds a proxy's log (its stderr, captured by a test) to `log/proxies.log` of the running
/// servers, so that tests/sweep-secrets also looks for secrets in it after the suite. Does
/// nothing before the servers run: such a proxy never met a real token or password.
pub fn keep_proxy_log(stderr: &[u8]) {
    use std::io::Write;
    let Some(Ok(s)) = SERVERS.get() else { return };
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.dir.join("log").join("proxies.log"));
    if let Ok(mut file) = file {
        let _ = file.write_all(stderr);
    }
}

impl Servers {
    /// A fresh account `<prefix>-<n>` with a random ASCII password.
    pub fn new_user(&self, prefix: &str) -> User {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let password = format!("pw{:08x}{n}", nanos ^ std::process::id().rotate_left(16));
        self.create_user(prefix, n, password)
    }

    /// A fresh account with the given password. Anything but ':', CR, LF and NUL is
    /// allowed (non-ASCII, quotes, backslashes, spaces…): Dovecot's passwd-file has no
    /// escaping for its ':' separator.
    pub fn new_user_with_password(&self, prefix: &str, password: &str) -> User {
        assert!(
            !password.contains([':', '\r', '\n', '\0']),
            "test passwords cannot contain ':', CR, LF or NUL (passwd-file format)"
        );
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        self.create_user(prefix, n, password.to_string())
    }

    fn create_user(&self, prefix: &str, n: u64, password: String) -> User {
        let prefix: String = prefix
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(40)
            .collect();
        let prefix = if prefix.is_empty() { "user" } else { &prefix };
        let name = format!("{prefix}-{n}");
        let email = format!("{name}@{MAIL_DOMAIN}");
        let home = self.dir.join("mail").join(&name);
        let user = User::create(
            name.clone(),
            password.clone(),
            email.clone(),
            home,
            self.mail_uid,
            self.mail_gid,
        )
        .unwrap_or_else(|e| panic!("cannot create account {name}: {e}"));
        // Written to a temporary name and renamed, so Dovecot never reads half a line.
        let line = format!("{name}:{{PLAIN}}{password}::::::\n");
        let tmp = self.passwd_dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, line).expect("write passwd-file");
        fs::rename(&tmp, self.passwd_dir.join(&name)).expect("rename passwd-file");
        self.addresses.lock().unwrap().insert(email.to_lowercase());
        user
    }

    /// Every account so far: (name, password), from the passwd-files.
    pub(crate) fn accounts(&self) -> Vec<(String, String)> {
        let mut accounts = Vec::new();
        for entry in fs::read_dir(&self.passwd_dir).expect("read the passwd-file directory") {
            let path = entry.expect("passwd-file entry").path();
            let Ok(line) = fs::read_to_string(&path) else {
                continue; // renamed away meanwhile (a temporary file)
            };
            if let Some((name, rest)) = line.split_once(':')
                && let Some(password) = rest.strip_prefix("{PLAIN}")
                && !name.starts_with('.')
            {
                let password = password.split(':').next().unwrap_or_default();
                accounts.push((name.to_string(), password.to_string()));
            }
        }
        accounts
    }

    pub(crate) fn registered_addresses(&self) -> Arc<Mutex<BTreeSet<String>>> {
        Arc::clone(&self.addresses)
    }

    /// Runs `doveadm -c <our config> ARGS…` (e.g. `["mailbox", "list", "-u", name]`).
    pub fn doveadm(&self, args: &[&str]) -> Output {
        dovecot::doveadm(&self.dovecot_conf, args)
    }

    /// Dovecot's log and stdout/stderr so far, for assertion messages.
    pub fn dovecot_logs(&self) -> String {
        self.dovecot.logs()
    }

    /// Pid (and process group id) of the Dovecot master.
    pub fn dovecot_pid(&self) -> u32 {
        self.dovecot.pid
    }
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The absolute path of a server program, or the install instructions.
/// SHA-512 crypt of `password` (`openssl passwd -6`, the password on stdin), for servers
/// with their own password tables (Courier, OpenSMTPD).
pub(crate) fn crypt_sha512(password: &str) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("openssl")
        .args(["passwd", "-6", "-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl passwd");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl passwd failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub(crate) fn find_binary(program: &str) -> Result<PathBuf, String> {
    which(program).ok_or_else(|| missing_program_message(program))
}

/// The root of a server that tests/setup.sh unpacked (not installed: it conflicts with
/// Dovecot or Postfix) under `$LMP_SERVER_CACHE/servers/NAME`, default
/// /var/cache/legacy-mail-proxy-test; or how to get it. Keep in sync with tests/setup.sh.
pub(crate) fn extracted_server_root(name: &str) -> Result<PathBuf, String> {
    let cache = std::env::var_os("LMP_SERVER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/legacy-mail-proxy-test"));
    let root = cache.join("servers").join(name);
    if root.join(".lmp-extracted").exists() {
        Ok(root)
    } else {
        Err(format!(
            "{name} is not unpacked in {}: run `sudo ./tests/setup.sh` (or `sudo ./tests/run-all`), \
             which downloads Debian's packages with apt-get download and unpacks them there \
             (they conflict with the installed Dovecot/Postfix, so they are not installed)",
            root.display()
        ))
    }
}

/// For a server that drops privileges to `uid`/`gid` (Exim, Cyrus): creates `dir` and
/// its `subdirs` owned by it, and gives it its own copies of the harness server certificate
/// and key (`dir/server.crt`, `dir/server.key`), which it reads after dropping root.
pub(crate) fn owned_state_dir(
    s: &Servers,
    dir: &Path,
    subdirs: &[&str],
    (uid, gid): (u32, u32),
) -> Result<(PathBuf, PathBuf), String> {
    let chown = |p: &Path| {
        std::os::unix::fs::chown(p, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", p.display()))
    };
    for sub in std::iter::once(&"").chain(subdirs) {
        let d = dir.join(sub);
        fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        chown(&d)?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o750))
            .map_err(|e| format!("chmod {}: {e}", d.display()))?;
    }
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    for (from, to) in [(&s.tls.server_cert, &cert), (&s.tls.server_key, &key)] {
        fs::copy(from, to).map_err(|e| format!("copy {}: {e}", from.display()))?;
        chown(to)?;
    }
    Ok((cert, key))
}

/// `getent DB NAME`: (uid, gid) for "passwd", (gid, gid) for "group".
pub(crate) fn getent_ids(db: &str, name: &str) -> Option<(u32, u32)> {
    let out = Command::new("getent").args([db, name]).output().ok()?;
    let line = String::from_utf8(out.stdout).ok()?;
    let f: Vec<&str> = line.trim().split(':').collect();
    let first: u32 = f.get(2)?.parse().ok()?;
    let second = if db == "group" {
        first
    } else {
        f.get(3)?.parse().ok()?
    };
    Some((first, second))
}

/// uid and gid of the mail user, creating it (system user, no login) if missing.
fn ensure_mail_user() -> Result<(u32, u32), String> {
    let lookup = || getent_ids("passwd", MAIL_USER);
    if let Some(ids) = lookup() {
        return Ok(ids);
    }
    let useradd = find_binary("useradd")?;
    let out = Command::new(useradd)
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            MAIL_USER,
        ])
        .output()
        .map_err(|e| format!("cannot run useradd: {e}"))?;
    // Another test process may have created it at the same moment: look again.
    lookup().ok_or_else(|| {
        format!(
            "cannot create system user {MAIL_USER}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Removes directories left by test processes that no longer exist (kept with
/// LMP_TEST_KEEP, or whose cleanup was SIGKILLed), after killing any server still running
/// from them (its command line names the directory, so a reused pid is never hit).
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("lmp-test.")) else {
            continue;
        };
        let Some(pid) = rest.split('.').next() else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let dir = e.path();
        for pidfile in fs::read_dir(dir.join("pids"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(server) = fs::read_to_string(pidfile.path()) else {
                continue;
            };
            let server = server.trim();
            let cmdline = fs::read(format!("/proc/{server}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(dir.to_str().unwrap_or("?")) {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{server}")])
                    .status();
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<(), String> {
    fs::create_dir(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

fn start() -> Result<Servers, String> {
    if !is_root() {
        return Err(
            "the test servers need root (Dovecot and Postfix switch users). \
             Run `sudo ./tests/run-all`."
                .into(),
        );
    }
    let dovecot_bin = find_binary("dovecot")?;
    for program in ["doveadm", "openssl", "setsid", "bash"] {
        find_binary(program)?;
    }
    let (mail_uid, mail_gid) = ensure_mail_user()?;

    remove_stale_dirs();
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = PathBuf::from(format!(
        "/tmp/lmp-test.{}.{:x}",
        std::process::id(),
        stamp & 0xffff_ffff
    ));
    make_dir(&dir, 0o755)?;
    for sub in ["log", "pids", "tls", "mail", "passwd", "dovecot-state"] {
        make_dir(&dir.join(sub), 0o755)?;
    }
    // From here on the directory disappears when this process exits.
    let reaper = process::spawn_reaper(&dir)?;

    let tls = tls::generate(&dir.join("tls"))?;
    let paths = dovecot::DovecotPaths::new(&dir);
    fs::write(dir.join("clients.py"), clients::CLIENTS_PY)
        .map_err(|e| format!("write clients.py: {e}"))?;
    let (ports, dovecot) = process::start_on_free_ports(4, process::address_in_use, |p| {
        // The untrusted listeners are on 127.0.0.2; picked afresh with every attempt too.
        let u = process::free_ports("127.0.0.2", 2)?;
        let ports = dovecot::DovecotPorts {
            imap: p[0],
            imaps: p[1],
            pop3: p[2],
            pop3s: p[3],
            untrusted_imap: u[0],
            untrusted_imaps: u[1],
        };
        fs::write(
            &paths.conf,
            dovecot::config(&dir, &paths, &ports, &tls, MAIL_USER),
        )
        .map_err(|e| format!("write dovecot.conf: {e}"))?;
        let dovecot = dovecot::start(&dir, &dovecot_bin, &paths, &ports)?;
        Ok((ports, dovecot))
    })?;
    Ok(Servers {
        host: "127.0.0.1",
        tls_host: "localhost",
        imap_port: ports.imap,
        imaps_port: ports.imaps,
        pop3_port: ports.pop3,
        pop3s_port: ports.pop3s,
        untrusted_host: "127.0.0.2",
        untrusted_imap_port: ports.untrusted_imap,
        untrusted_imaps_port: ports.untrusted_imaps,
        ca_file: tls.ca_cert.clone(),
        untrusted_ca_file: tls.untrusted_ca_cert.clone(),
        mail_domain: MAIL_DOMAIN,
        dovecot_conf: paths.conf.clone(),
        lmtp_socket: paths.lmtp_socket(),
        auth_socket: paths.auth_socket(),
        mail_uid,
        mail_gid,
        tls,
        passwd_dir: paths.passwd_dir.clone(),
        dovecot,
        addresses: Arc::new(Mutex::new(BTreeSet::new())),
        counter: AtomicU64::new(0),
        _reaper: reaper,
        dir,
    })
}
