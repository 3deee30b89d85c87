//! A private Cyrus IMAP 3.6 (Debian's `cyrus-imapd` + `cyrus-common`, unpacked by
//! tests/setup.sh into a cache and never installed, because it conflicts with Dovecot): an
//! IMAP server of the POP3 matrix (issue 13). `master` in the foreground with its own
//! imapd.conf/cyrus.conf, IMAP (STARTTLS offered, plaintext login allowed) and IMAPS on
//! 127.0.0.1, its own mail spool. Started on first use of [`cyrus()`].
//!
//! Accounts: the harness users, added on demand by [`Cyrus::account`] to Cyrus's own
//! sasldb (`saslpasswd2`) with the same password; INBOX is created at the first login
//! (`autocreate_quota`). Seeding is by IMAP APPEND, so messages are stored as sent.
//!
//! Traps seen here: `cmd=` in cyrus.conf needs absolute paths (the compiled-in
//! /usr/lib/cyrus/bin does not exist); the libcyrus* libraries come from the unpacked tree
//! through LD_LIBRARY_PATH (nothing is setuid); the processes run as the compiled-in user
//! `cyrus`; Cyrus logs only to syslog, and there is no syslog here, so a failed start
//! shows nothing but its exit status.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::process::{ServerProcess, start_on_free_ports};
use super::{
    Servers, User, extracted_server_root, find_binary, getent_ids, owned_state_dir, servers,
};

pub struct Cyrus {
    pub host: &'static str,
    /// IMAP, STARTTLS offered, plaintext LOGIN allowed (as with the harness Dovecot).
    pub imap_port: u16,
    /// IMAP over implicit TLS, the harness CA's certificate.
    pub imaps_port: u16,
    pub dir: PathBuf,
    sasldb: PathBuf,
    known: Mutex<BTreeSet<String>>,
    seeding: Mutex<()>,
    master: ServerProcess,
}

static CYRUS: OnceLock<Result<Cyrus, String>> = OnceLock::new();

/// The process-wide Cyrus, started on first call. Panics with the setup command if the
/// unpacked Cyrus is missing.
pub fn cyrus() -> &'static Cyrus {
    let s = servers();
    match CYRUS.get_or_init(|| start(s)) {
        Ok(c) => c,
        Err(e) => panic!("test Cyrus IMAP could not be started: {e}"),
    }
}

impl Cyrus {
    /// Makes `user` (a harness account) known to Cyrus with the same password; idempotent.
    pub fn account(&self, user: &User) {
        let mut known = self.known.lock().unwrap();
        if known.contains(&user.name) {
            return;
        }
        sasl_set_password(&self.sasldb, &user.name, &user.password)
            .unwrap_or_else(|e| panic!("{e}"));
        known.insert(user.name.clone());
    }

    /// `user` (made known to Cyrus) with `messages` appended to INBOX, in order.
    pub fn seed(&self, user: &User, messages: &[Vec<u8>]) {
        // One seeding at a time: two new users' first logins at once (INBOX autocreate)
        // ended up sharing one INBOX (15 messages of two 8-message seeds in both).
        let _one_at_a_time = self.seeding.lock().unwrap();
        self.account(user);
        super::imap_append_at(user, self.imap_port, messages);
    }

    pub fn logs(&self) -> String {
        self.master.logs()
    }
}

/// `saslpasswd2 -c`: creates or replaces `name` in `sasldb` (realm `localhost`, Cyrus's
/// servername) with `password` (`-p`: read from stdin, no newline; never on the command line).
fn sasl_set_password(sasldb: &Path, name: &str, password: &str) -> Result<(), String> {
    let mut child = Command::new(find_binary("saslpasswd2")?)
        .args(["-p", "-c", "-u", "localhost", "-f"])
        .arg(sasldb)
        .arg(name)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run saslpasswd2: {e}"))?;
    let written = child.stdin.take().unwrap().write_all(password.as_bytes());
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if written.is_err() || !out.status.success() {
        return Err(format!(
            "saslpasswd2 for {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

fn start(s: &Servers) -> Result<Cyrus, String> {
    let root = extracted_server_root("cyrus")?;
    find_binary("saslpasswd2")?;
    let bin = root.join("usr/lib/cyrus/bin");
    let libs = root.join("usr/lib/x86_64-linux-gnu");
    let (uid, gid) = getent_ids("passwd", "cyrus")
        .ok_or("system user `cyrus` is missing (Cyrus runs as it): run `sudo ./tests/setup.sh`")?;
    let dir = s.dir.join("cyrus");
    let (cert, key) = owned_state_dir(s, &dir, &["conf", "spool", "run"], (uid, gid))?;
    let sasldb = dir.join("sasldb2");
    let imapd_conf = dir.join("imapd.conf");
    let d = dir.display();
    write(
        &imapd_conf,
        &format!(
            r#"# Generated by tests/common/cyrus.rs
configdirectory: {d}/conf
partition-default: {d}/spool
sievedir: {d}/conf/sieve
servername: localhost
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {sasldb}
sasl_mech_list: PLAIN LOGIN
allowplaintext: yes
unixhierarchysep: yes
autocreate_quota: 0
# Byte-exact: keep 8-bit header bytes as they are (the default replaces them with X).
munge8bit: no
tls_server_cert: {cert}
tls_server_key: {key}
idlesocket: {d}/run/idle
lmtpsocket: {d}/run/lmtp
notifysocket: {d}/run/notify
mboxname_lockpath: {d}/run/lock
proc_path: {d}/run/proc
"#,
            sasldb = sasldb.display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )?;
    // saslpasswd2 creates the sasldb as root; Cyrus (as `cyrus`) must read it. An account
    // nobody logs in to creates it now.
    let placeholder = format!("unused-{:?}", Instant::now());
    sasl_set_password(&sasldb, "lmp-cyrus-placeholder", &placeholder)?;
    std::os::unix::fs::chown(&sasldb, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", sasldb.display()))?;
    let imapd = |extra: &str| {
        format!(
            "{} {extra}-C {}",
            bin.join("imapd").display(),
            imapd_conf.display()
        )
    };
    // Cyrus logs only to syslog, so a bind failure is not visible: any failed start may be a
    // port clash and is retried with new ports.
    start_on_free_ports(
        2,
        |_| true,
        |ports| {
            write(
                &dir.join("cyrus.conf"),
                &format!(
                    r#"# Generated by tests/common/cyrus.rs
START {{
  recover cmd="{recover} -r -C {conf}"
}}
SERVICES {{
  imap cmd="{imap}" listen="127.0.0.1:{p0}" prefork=0
  imaps cmd="{imaps}" listen="127.0.0.1:{p1}" prefork=0
}}
EVENTS {{
}}
"#,
                    recover = bin.join("ctl_cyrusdb").display(),
                    conf = imapd_conf.display(),
                    imap = imapd(""),
                    imaps = imapd("-s "),
                    p0 = ports[0],
                    p1 = ports[1],
                ),
            )?;
            let master = ServerProcess::spawn(
                &s.dir,
                "cyrus",
                &[
                    &"env",
                    &format!("LD_LIBRARY_PATH={}", libs.display()),
                    &bin.join("master"),
                    &"-C",
                    &imapd_conf,
                    &"-M",
                    &dir.join("cyrus.conf"),
                    &"-p",
                    &dir.join("run/master.pid"),
                ],
                vec![],
            )?;
            let deadline = Instant::now() + Duration::from_secs(30);
            let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
            master.wait_for_port(addr(ports[0]), Some("* OK"), deadline)?;
            master.wait_for_port(addr(ports[1]), None, deadline)?;
            Ok(Cyrus {
                host: "127.0.0.1",
                imap_port: ports[0],
                imaps_port: ports[1],
                dir: dir.clone(),
                sasldb: sasldb.clone(),
                known: Mutex::new(BTreeSet::new()),
                seeding: Mutex::new(()),
                master,
            })
        },
    )
}
