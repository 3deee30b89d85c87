//! A private Courier IMAP 5.0 (Debian's `courier-imap` with `courier-authlib`, unpacked by
//! tests/setup.sh and never installed, because it conflicts with Dovecot): the third IMAP
//! server of the POP3 matrix (issue 13). Plain IMAP on 127.0.0.1 (`couriertcpd` running
//! `imaplogin` then `imapd`), accounts in Courier's userdb checked by its `authdaemond`.
//! Started on first use of [`courier()`].
//!
//! Courier-authlib's paths are compiled in and machine-wide: the config
//! /etc/courier/authdaemonrc, the account database /etc/courier/userdb.dat, the daemon's
//! socket /run/courier/authdaemon/socket and its modules in /usr/lib/courier-authlib. So
//! the whole server runs in a private mount namespace (`unshare --mount`) in which this
//! test process's own directories are bind-mounted there; tests/setup.sh creates the three
//! empty mount points on the host. Nothing of the host's /etc or /run is written.
//!
//! Accounts: the harness users, added on demand by [`Courier::account`] with the same
//! password (SHA-512 crypt) and their own Maildir under `courier/home/`; seeding is by IMAP
//! APPEND. TLS as Debian's imapd-ssl sets it up: implicit TLS through couriertls on a second
//! port, and STARTTLS offered on the plain port (`IMAP_STARTTLS=YES`, from Debian's
//! `IMAPDSTARTTLS=YES`; `IMAP_TLS_REQUIRED=0`, so LOGIN without TLS still works there).
//!
//! STARTTLS needs the user `courier`. imaplogin answers `OK Begin SSL/TLS negotiation now.`,
//! then forks a child that drops to Courier's compiled-in mail user `courier` (created by
//! Debian's packages, absent on this machine) before it runs couriertls. Without that user
//! the child exits ("getpwnam: Success" in couriertcpd.log) and imaplogin writes
//! `NO STARTTLS failed: 500 Error starting couriertls.` in plain text after its OK; every
//! client (openssl s_client, Python's imaplib, our proxy) then fails its handshake with
//! "wrong version number". So the namespace also binds copies of /etc/passwd and /etc/group
//! that name `courier` (the harness mail user's uid and gid), and imapd.pem belongs to that
//! user, because couriertls runs as it and reads the file (see [`courier_user_files`]). The
//! host's own files are not changed. This was a harness gap, not a client bug: our STARTTLS
//! reads the plain-text exchange byte by byte and stops at the tagged OK, as it must.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::process::{ServerProcess, address_in_use, start_on_free_ports};
use super::{Servers, User, extracted_server_root, find_binary, servers};

/// The compiled-in paths that are bind-mounted in Courier's namespace (see the module
/// header); tests/setup.sh creates them. Keep in sync with tests/setup.sh.
const MOUNT_POINTS: [&str; 3] = ["/etc/courier", "/run/courier", "/usr/lib/courier-authlib"];

pub struct Courier {
    pub host: &'static str,
    /// Plain IMAP, LOGIN allowed.
    pub imap_port: u16,
    /// Implicit TLS (couriertls), like port 993.
    pub imaps_port: u16,
    dir: PathBuf,
    /// userdb lines of every account so far (the file is rewritten as a whole).
    accounts: Mutex<Vec<String>>,
    server: ServerProcess,
}

static COURIER: OnceLock<Result<Courier, String>> = OnceLock::new();

/// The process-wide Courier IMAP, started on first call. Panics with the setup command if
/// the unpacked Courier or its mount points are missing.
pub fn courier() -> &'static Courier {
    let s = servers();
    match COURIER.get_or_init(|| start(s)) {
        Ok(c) => c,
        Err(e) => panic!("test Courier IMAP could not be started: {e}"),
    }
}

impl Courier {
    /// Makes `user` known to Courier (same password, own Maildir); idempotent. Accounts
    /// are added one at a time: makeuserdb rewrites the whole database.
    pub fn account(&self, user: &User) {
        let mut accounts = self.accounts.lock().unwrap();
        let prefix = format!("{}\t", user.name);
        if accounts.iter().any(|l| l.starts_with(&prefix)) {
            return;
        }
        let s = servers();
        let home = self.dir.join("home").join(&user.name);
        for sub in ["", "Maildir", "Maildir/cur", "Maildir/new", "Maildir/tmp"] {
            let d = home.join(sub);
            fs::create_dir_all(&d).unwrap();
            std::os::unix::fs::chown(&d, Some(s.mail_uid), Some(s.mail_gid)).unwrap();
        }
        accounts.push(format!(
            "{}\tuid={}|gid={}|home={}|mail={}|systempw={}",
            user.name,
            s.mail_uid,
            s.mail_gid,
            home.display(),
            home.join("Maildir").display(),
            super::crypt_sha512(&user.password)
        ));
        let mut text = accounts.join("\n");
        text.push('\n');
        let userdb = self.dir.join("etc/userdb");
        fs::write(&userdb, text).unwrap();
        // makeuserdb refuses a userdb others can read (it holds password hashes).
        fs::set_permissions(&userdb, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let out = Command::new("perl")
            .arg(self.dir.join("makeuserdb"))
            .output()
            .expect("run makeuserdb");
        assert!(
            out.status.success(),
            "makeuserdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `user` (made known to Courier) with `messages` appended to INBOX, in order.
    pub fn seed(&self, user: &User, messages: &[Vec<u8>]) {
        self.account(user);
        super::imap_append_at(user, self.imap_port, messages);
    }

    pub fn logs(&self) -> String {
        self.server.logs()
    }
}

/// Runs in the private mount namespace: binds our directories over the compiled-in paths,
/// starts authdaemond, waits for its socket, then becomes couriertcpd.
const NAMESPACE_SCRIPT: &str = r#"
set -eu
dir=$1 root=$2 port=$3 tls_port=$4
mount --bind "$dir/etc" /etc/courier
mount --bind "$dir/run" /run/courier
mount --bind "$root/usr/lib/courier-authlib" /usr/lib/courier-authlib
# imaplogin drops to the user `courier` before it runs couriertls for STARTTLS: our copies
# of passwd and group name it (see courier_user_files).
mount --bind "$dir/users/passwd" /etc/passwd
mount --bind "$dir/users/group" /etc/group
mkdir -p /run/courier/authdaemon
export LD_LIBRARY_PATH=$root/usr/lib:$root/usr/lib/courier-authlib
"$root/usr/lib/courier/courier-authlib/authdaemond" >"$dir/authdaemond.log" 2>&1 &
i=0
while [ ! -S /run/courier/authdaemon/socket ]; do
  i=$((i+1)); [ "$i" -lt 300 ] || { echo "authdaemond did not start" >&2; exit 1; }
  sleep 0.01
done
export IMAP_CAPABILITY="IMAP4rev1 UIDPLUS CHILDREN NAMESPACE SORT QUOTA IDLE"
export IMAP_CAPABILITY_ORIG="$IMAP_CAPABILITY" MAILDIRPATH=Maildir IMAP_MOVE_EXPUNGE_TO_TRASH=0
export IMAP_MAXDAEMONS=200 MAXPERIP=1000
# As Debian's /etc/courier/imapd: keywords allowed (PERMANENTFLAGS \*).
export IMAP_KEYWORDS=1
# TLS as Debian's imapd-ssl sets it up: couriertls (GnuTLS) with one PEM of certificate and
# key. Implicit TLS on its own port; STARTTLS offered on the plain port (Debian's
# IMAPDSTARTTLS=YES becomes IMAP_STARTTLS for the plain imapd), LOGIN without TLS still
# allowed (IMAP_TLS_REQUIRED=0) because the seeding logs in in plain text.
export COURIERTLS="$root/usr/bin/couriertls" TLS_CERTFILE="$dir/imapd.pem" TLS_VERIFYPEER=NONE
export IMAP_STARTTLS=YES IMAP_TLS_REQUIRED=0
"$root/usr/sbin/couriertcpd" -address=127.0.0.1 -nodnslookup -noidentlookup \
  -maxprocs=200 -maxperip=1000 -stderr="$dir/couriertcpd-tls.log" "$tls_port" \
  "$COURIERTLS" -server -tcpd \
  "$root/usr/lib/courier/courier/imaplogin" "$root/usr/bin/imapd" Maildir &
exec "$root/usr/sbin/couriertcpd" -address=127.0.0.1 -nodnslookup -noidentlookup \
  -maxprocs=200 -maxperip=1000 -stderr="$dir/couriertcpd.log" "$port" \
  "$root/usr/lib/courier/courier/imaplogin" "$root/usr/bin/imapd" Maildir
"#;

/// Writes `users_dir/passwd` and `users_dir/group`: the host's, with a user and group
/// `courier` (uid/gid of the harness mail user) in place of any the host has. They are bound
/// over /etc/passwd and /etc/group inside Courier's namespace only: imaplogin's STARTTLS
/// forks, drops to the compiled-in mail user `courier` (Debian's packages create it) and only
/// then runs couriertls. Without that user the child dies ("getpwnam: Success" in
/// couriertcpd.log) after imaplogin has already sent its tagged OK, and the plain-text
/// `NO STARTTLS failed: 500 Error starting couriertls.` that follows reaches the client's
/// TLS handshake ("wrong version number").
fn courier_user_files(users_dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    fs::create_dir_all(users_dir).map_err(|e| format!("mkdir {}: {e}", users_dir.display()))?;
    let entries = [
        (
            "passwd",
            format!("courier:x:{uid}:{gid}:Courier mail server:/nonexistent:/usr/sbin/nologin\n"),
        ),
        ("group", format!("courier:x:{gid}:\n")),
    ];
    for (name, courier_line) in entries {
        let host = fs::read_to_string(Path::new("/etc").join(name))
            .map_err(|e| format!("read /etc/{name}: {e}"))?;
        let mut text: String = host
            .lines()
            .filter(|l| !l.starts_with("courier:"))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&courier_line);
        fs::write(users_dir.join(name), text).map_err(|e| format!("write {name}: {e}"))?;
    }
    Ok(())
}

fn start(s: &Servers) -> Result<Courier, String> {
    let root = extracted_server_root("courier")?;
    for program in ["unshare", "perl", "openssl"] {
        find_binary(program)?;
    }
    for m in MOUNT_POINTS {
        if !Path::new(m).is_dir() {
            return Err(format!(
                "the mount point {m} is missing (Courier's compiled-in paths are bind-mounted \
                 there in a private namespace): run `sudo ./tests/setup.sh`"
            ));
        }
    }
    let dir = s.dir.join("courier");
    for sub in ["etc", "run", "home"] {
        fs::create_dir_all(dir.join(sub)).map_err(|e| format!("mkdir courier/{sub}: {e}"))?;
    }
    fs::write(
        dir.join("etc/authdaemonrc"),
        "authmodulelist=\"authuserdb\"\nauthmodulelistorig=\"authuserdb\"\ndaemons=5\n\
         authdaemonvar=/run/courier/authdaemon\nDEBUG_LOGIN=0\nDEFAULTOPTIONS=\"\"\nLOGGEROPTS=\"\"\n",
    )
    .map_err(|e| format!("write authdaemonrc: {e}"))?;
    // makeuserdb with our paths instead of the compiled-in ones, run outside the namespace.
    let makeuserdb = fs::read_to_string(root.join("usr/sbin/makeuserdb"))
        .map_err(|e| format!("read makeuserdb: {e}"))?
        .replace(
            "/usr/lib/courier/courier-authlib/makedatprog",
            &root
                .join("usr/lib/courier/courier-authlib/makedatprog")
                .display()
                .to_string(),
        )
        .replace(
            "/etc/courier/userdb",
            &dir.join("etc/userdb").display().to_string(),
        );
    fs::write(dir.join("makeuserdb"), makeuserdb).map_err(|e| format!("write makeuserdb: {e}"))?;
    fs::write(dir.join("etc/userdb"), "").map_err(|e| format!("write userdb: {e}"))?;
    fs::set_permissions(
        dir.join("etc/userdb"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(|e| format!("chmod userdb: {e}"))?;
    let made = Command::new("perl")
        .arg(dir.join("makeuserdb"))
        .output()
        .map_err(|e| format!("run makeuserdb: {e}"))?;
    if !made.status.success() {
        return Err(format!(
            "makeuserdb: {}",
            String::from_utf8_lossy(&made.stderr)
        ));
    }
    // couriertls reads certificate and key from one file. For STARTTLS it runs as the user
    // `courier`, so that user must be able to read it (Debian's mkimapdcert chowns it so).
    let mut pem = fs::read(&s.tls.server_cert).map_err(|e| format!("read certificate: {e}"))?;
    pem.extend(fs::read(&s.tls.server_key).map_err(|e| format!("read key: {e}"))?);
    let pem_path = dir.join("imapd.pem");
    fs::write(&pem_path, pem).map_err(|e| format!("write imapd.pem: {e}"))?;
    std::os::unix::fs::chown(&pem_path, Some(s.mail_uid), Some(s.mail_gid))
        .map_err(|e| format!("chown imapd.pem: {e}"))?;
    courier_user_files(&dir.join("users"), s.mail_uid, s.mail_gid)?;
    start_on_free_ports(2, address_in_use, |ports| {
        let (port, tls_port) = (ports[0], ports[1]);
        let server = ServerProcess::spawn(
            &s.dir,
            "courier",
            &[
                &"unshare",
                &"--mount",
                &"--propagation",
                &"private",
                &"bash",
                &"-c",
                &NAMESPACE_SCRIPT,
                &"courier-namespace",
                &dir,
                &root,
                &port.to_string(),
                &tls_port.to_string(),
            ],
            vec![
                dir.join("authdaemond.log"),
                dir.join("couriertcpd.log"),
                dir.join("couriertcpd-tls.log"),
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let tls_addr = SocketAddr::from(([127, 0, 0, 1], tls_port));
        server
            .wait_for_port(addr, Some("* OK"), deadline)
            .and_then(|()| server.wait_for_port(tls_addr, None, deadline))?;
        Ok(Courier {
            host: "127.0.0.1",
            imap_port: port,
            imaps_port: tls_port,
            dir: dir.clone(),
            accounts: Mutex::new(Vec::new()),
            server,
        })
    })
}
