//! POP-before-SMTP: before relaying for an account with `popbeforesmtp=true`, log in to its
//! POP3 server (RFC 1939 USER/PASS, STAT, QUIT), so that a provider that opens its SMTP
//! server to recent POP users lets the message through.
//!
//! The connection is secured like every backend: POP3S (implicit TLS, RFC 8314) or STLS
//! (RFC 2595 §4), the certificate verified against the account's `cafile`, --ca-file or the
//! system roots; plain text only when the file says so, with a warning in the log.
//!
//! A successful login is good for `popcheckdelay` seconds, across processes: its time is
//! the modification time of a stamp file per account in --pop-before-smtp-dir, checked and
//! renewed under an exclusive `flock`, so that concurrent connections log in once between
//! them. After a real login the gateway waits `[config] waitafterpop` seconds, as
//! smtpproxy does, for the provider to open its door.

use super::{Account, PopBeforeSmtp};
use crate::net::{self, Stream, Timeouts, TlsMode};
use crate::tls::TlsOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Logs in to an account's POP3 server once (the real one: [`login`]; tests use others).
pub type Login = Box<dyn FnMut(&Account, &PopBeforeSmtp) -> Result<(), String>>;

/// Decides when to log in, and remembers across processes when it last worked.
pub struct PopGate {
    /// Where the stamp files live.
    dir: PathBuf,
    login: Login,
    wait: fn(Duration),
}

impl PopGate {
    pub fn new(dir: PathBuf, login: Login, wait: fn(Duration)) -> PopGate {
        PopGate { dir, login, wait }
    }

    /// Logs in to `account`'s POP3 server unless that worked less than `popcheckdelay`
    /// ago (here or in another process); then waits `wait_after_pop`. Accounts without
    /// POP-before-SMTP pass at once.
    pub fn before_smtp(
        &mut self,
        account: &Account,
        wait_after_pop: Duration,
    ) -> Result<(), String> {
        let Some(pop) = &account.pop else {
            return Ok(());
        };
        let dir = &self.dir;
        create_private_dir(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let base = crate::lock::file_name(&format!("pop-before-smtp:{}", account.name));
        let lock_path = dir.join(&base);
        let stamp = dir.join(format!("{base}.stamp"));
        let lock = crate::lock::open_lock_file(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        // Waits while another process logs in for the same account; it then finds the
        // fresh stamp and skips its own login.
        lock.lock()
            .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        let age = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        if let Some(age) = age
            && age < pop.check_delay
        {
            log::debug!(
                "smtp: account [{}]: POP login {} s ago, within popcheckdelay {} s",
                account.name,
                age.as_secs(),
                pop.check_delay.as_secs()
            );
            return Ok(());
        }
        (self.login)(account, pop)?;
        log::info!(
            "smtp: account [{}]: POP-before-SMTP login as {} at {}:{} succeeded",
            account.name,
            pop.user,
            pop.host,
            pop.port
        );
        (self.wait)(wait_after_pop);
        std::fs::File::create(&stamp)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
        Ok(())
    }
}

fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The real login: connects with the account's TLS settings (its `cafile`, else
/// `defaults`'), then [`session`].
pub fn login(
    account: &Account,
    pop: &PopBeforeSmtp,
    defaults: &TlsOptions,
    timeouts: Timeouts,
) -> Result<(), String> {
    let tls = TlsOptions {
        ca_file: account.ca_file.clone().or(defaults.ca_file.clone()),
        ..defaults.clone()
    };
    let at = format!("{}:{}", pop.host, pop.port);
    let mut tcp = net::connect_tcp(&pop.host, pop.port, timeouts)
        .map_err(|e| format!("cannot connect to {at}: {e}"))?;
    let connector = || tls.connector().map_err(|e| format!("{e:#}"));
    let (mut stream, greeted) = match pop.tls {
        TlsMode::Implicit => (
            net::wrap_tls(&connector()?, &pop.host, tcp).map_err(|e| format!("{at}: {e}"))?,
            false,
        ),
        TlsMode::Starttls => {
            crate::starttls::negotiate(crate::starttls::Protocol::Pop3, &mut tcp)
                .map_err(|e| format!("{at}: {e:#}"))?;
            (
                net::wrap_tls(&connector()?, &pop.host, tcp).map_err(|e| format!("{at}: {e}"))?,
                true,
            )
        }
        TlsMode::None => {
            log::warn!(
                "smtp: account [{}]: popssl=false: the POP password for {} crosses the \
                 network to {at} unencrypted",
                account.name,
                pop.user
            );
            (Stream::Plain(tcp), false)
        }
    };
    session(&mut stream, greeted, &pop.user, &pop.password.value).map_err(|e| format!("{at}: {e}"))
}

/// One POP3 session (RFC 1939): greeting (unless already read before STLS), USER, PASS,
/// STAT, QUIT. Nothing is deleted: QUIT without DELE leaves the mailbox as it was.
pub fn session<S: Read + Write>(
    stream: &mut S,
    greeted: bool,
    user: &str,
    password: &str,
) -> Result<(), String> {
    if [user, password].iter().any(|s| s.contains(['\r', '\n'])) {
        return Err("user name or password holds a line break".into());
    }
    let mut conn = BufReader::new(stream);
    if !greeted {
        expect_ok(&mut conn, "greeting")?;
    }
    send(&mut conn, &format!("USER {user}\r\n"))?;
    expect_ok(&mut conn, "USER")?;
    send(&mut conn, &format!("PASS {password}\r\n"))?;
    expect_ok(&mut conn, "PASS")?;
    send(&mut conn, "STAT\r\n")?;
    expect_ok(&mut conn, "STAT")?;
    send(&mut conn, "QUIT\r\n")?;
    expect_ok(&mut conn, "QUIT")?;
    Ok(())
}

fn send<S: Read + Write>(conn: &mut BufReader<&mut S>, line: &str) -> Result<(), String> {
    let stream = conn.get_mut();
    stream
        .write_all(line.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| format!("write failed: {e}"))
}

/// Reads one status line; `-ERR` or anything else is an error quoting the server.
fn expect_ok<S: Read + Write>(conn: &mut BufReader<&mut S>, what: &str) -> Result<(), String> {
    let mut line = Vec::new();
    conn.by_ref()
        .take(512)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("{what}: read failed: {e}"))?;
    if line.is_empty() {
        return Err(format!("{what}: connection closed"));
    }
    if line.starts_with(b"+OK") {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&line);
    Err(format!("{what} answered {:?}", text.trim_end()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io;
    use std::rc::Rc;

    /// A POP3 server's side: reads what the client writes, answers from a script.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // One byte at a time: the client must not depend on how replies are chunked.
            let n = buf.len().min(1);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn script(replies: &str) -> Script {
        Script {
            input: io::Cursor::new(replies.as_bytes().to_vec()),
            written: Vec::new(),
        }
    }

    #[test]
    fn logs_in_asks_stat_and_quits_without_deleting() {
        let mut server = script("+OK ready\r\n+OK\r\n+OK logged in\r\n+OK 2 320\r\n+OK bye\r\n");
        session(&mut server, false, "u@x", "p w").unwrap();
        assert_eq!(
            String::from_utf8(server.written).unwrap(),
            "USER u@x\r\nPASS p w\r\nSTAT\r\nQUIT\r\n"
        );
    }

    #[test]
    fn a_refusal_stops_at_once_and_names_the_step() {
        let mut server = script("+OK ready\r\n+OK\r\n-ERR [AUTH] Authentication failed.\r\n");
        let err = session(&mut server, false, "u", "wrong").unwrap_err();
        assert!(err.starts_with("PASS answered \"-ERR [AUTH]"), "{err}");
        assert!(!err.contains("wrong"));
        assert!(!String::from_utf8(server.written).unwrap().contains("STAT"));
        let err = session(&mut script(""), false, "u", "p").unwrap_err();
        assert_eq!(err, "greeting: connection closed");
        let err = session(&mut script("+OK\r\n"), false, "u", "p\r\nDELE 1").unwrap_err();
        assert!(err.contains("line break"), "{err}");
    }

    fn account(delay: u64) -> Account {
        let text = format!(
            "[a@x.example]\nsmtphost=h\npopbeforesmtp=true\npophost=p\npopusername=u\n\
             poppassword=pw\npopcheckdelay={delay}\n"
        );
        super::super::Accounts::parse(std::path::Path::new("/x.ini"), &text)
            .unwrap()
            .accounts
            .remove(0)
    }

    #[test]
    fn a_login_is_good_for_popcheckdelay_in_every_process() {
        let dir = std::env::temp_dir().join(format!("lmp-pop-gate-{}", std::process::id()));
        let logins = Rc::new(RefCell::new(0));
        // Two gates on one directory stand for two processes.
        let gate = |ok: bool| {
            let logins = logins.clone();
            PopGate::new(
                dir.clone(),
                Box::new(move |_, _| {
                    *logins.borrow_mut() += 1;
                    if ok { Ok(()) } else { Err("-ERR".into()) }
                }),
                |_| {},
            )
        };
        let fresh = account(3600);
        let (mut first, mut second) = (gate(true), gate(true));
        first.before_smtp(&fresh, Duration::ZERO).unwrap();
        second.before_smtp(&fresh, Duration::ZERO).unwrap();
        assert_eq!(
            *logins.borrow(),
            1,
            "the second process used the first's login"
        );
        // popcheckdelay=0: every message logs in again.
        let always = account(0);
        let _ = std::fs::remove_dir_all(&dir);
        first.before_smtp(&always, Duration::ZERO).unwrap();
        second.before_smtp(&always, Duration::ZERO).unwrap();
        assert_eq!(*logins.borrow(), 3);
        // A failed login leaves no stamp: the next message tries again.
        let _ = std::fs::remove_dir_all(&dir);
        assert!(gate(false).before_smtp(&fresh, Duration::ZERO).is_err());
        assert!(gate(false).before_smtp(&fresh, Duration::ZERO).is_err());
        assert_eq!(*logins.borrow(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
