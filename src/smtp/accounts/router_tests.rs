//! Transcripts of the SMTP core through the account router, each account's backend an
//! in-memory relay whose exchanges land in one shared log as `[account] EXCHANGE`.

use super::*;
use crate::smtp::auth::ClientAuth;
use crate::smtp::memory::MemoryRelay;
use crate::smtp::session::{Config, Session};
use std::cell::RefCell;
use std::io::{self, BufReader};
use std::path::Path;
use std::rc::Rc;

const INI: &str = "\
[config]
port=25

[foo@localdomain.com]
smtphost=smtp.one.example
smtpsecurity=ssl
smtpusername=one
smtppassword=pw1
returnpath=bounces@one.example
replyto=desk@one.example
clientpassword=foo-secret

[bar@other.example]
smtphost=smtp.two.example
smtpusername=two
smtppassword=pw2
allowedrecipients=@example.test
rewritefrom=office@two.example

[baz@localdomain.com]
use=foo@localdomain.com

[pop@localdomain.com]
smtphost=smtp.three.example
popbeforesmtp=true
pophost=pop.three.example
popusername=three
poppassword=pw3
";

/// What all backends saw, in order.
#[derive(Default)]
struct World {
    log: Vec<String>,
    /// (account, from, to, message)
    delivered: Vec<(String, String, Vec<String>, String)>,
    pop_logins: usize,
}

/// An in-memory relay that copies what it sees into the shared [`World`].
struct Tagged {
    name: String,
    inner: MemoryRelay,
    world: Rc<RefCell<World>>,
}

impl Tagged {
    fn sync<T>(&mut self, result: T) -> T {
        let mut world = self.world.borrow_mut();
        for entry in self.inner.log.drain(..) {
            world.log.push(format!("[{}] {entry}", self.name));
        }
        for d in self.inner.delivered.drain(..) {
            let text = String::from_utf8(d.data).unwrap();
            world
                .delivered
                .push((self.name.clone(), d.from, d.to, text));
        }
        result
    }
}

impl Relay for Tagged {
    fn login(&mut self, user: &str, password: &str) -> RelayResult {
        let r = self.inner.login(user, password);
        self.sync(r)
    }
    fn mail(&mut self, from: &str) -> RelayResult {
        let r = self.inner.mail(from);
        self.sync(r)
    }
    fn rcpt(&mut self, to: &str) -> RelayResult {
        let r = self.inner.rcpt(to);
        self.sync(r)
    }
    fn data(&mut self, message: &mut dyn Read, len: u64) -> RelayResult {
        let r = self.inner.data(message, len);
        self.sync(r)
    }
    fn keepalive(&mut self) -> Result<(), RelayError> {
        let r = self.inner.keepalive();
        self.sync(r)
    }
    fn reset(&mut self) {
        self.inner.reset();
        self.sync(())
    }
    fn quit(&mut self) {
        self.inner.quit();
        self.sync(())
    }
}

/// Reads its input `chunk` bytes at a time.
struct Chunked {
    data: Vec<u8>,
    at: usize,
    chunk: usize,
}

impl Read for Chunked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.chunk.min(buf.len()).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

struct Setup {
    config: Config,
    /// Relays that cannot be reached, by account name.
    down: Vec<&'static str>,
    pop_fails: bool,
    with_default: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            config: Config::new("gw.test"),
            down: Vec::new(),
            pop_fails: false,
            with_default: false,
        }
    }
}

/// The router of `setup` over in-memory relays that report to `world`; POP-before-SMTP
/// stamps go to `dir`.
fn router(setup: &Setup, world: &Rc<RefCell<World>>, dir: &Path) -> AccountRouter {
    let accounts = Accounts::parse(Path::new("/etc/smtpproxy.ini"), INI).unwrap();
    let for_connect = world.clone();
    let down = setup.down.clone();
    let connect: Connect = Box::new(move |account| {
        let mut inner = MemoryRelay::default();
        inner.down = down.contains(&account.name.as_str());
        Ok(Box::new(Tagged {
            name: account.name.clone(),
            inner,
            world: for_connect.clone(),
        }))
    });
    let default: Option<Box<dyn Relay>> = setup.with_default.then(|| {
        Box::new(Tagged {
            name: "command line".into(),
            inner: MemoryRelay::default(),
            world: world.clone(),
        }) as Box<dyn Relay>
    });
    let for_pop = world.clone();
    let pop_fails = setup.pop_fails;
    let pop = PopGate::new(
        dir.to_path_buf(),
        Box::new(move |_, _| {
            for_pop.borrow_mut().pop_logins += 1;
            if pop_fails {
                Err("PASS answered \"-ERR\"".into())
            } else {
                Ok(())
            }
        }),
        |_| {},
    );
    AccountRouter::new(accounts, connect, default, pop)
}

/// A fresh directory for one test's POP-before-SMTP stamps.
fn stamp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "lmp-router-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn run_once(setup: &Setup, input: &[u8], chunk: usize) -> (String, World) {
    let world = Rc::new(RefCell::new(World::default()));
    let dir = stamp_dir();
    let mut router = router(setup, &world, &dir);
    let mut out = Vec::new();
    let input = BufReader::new(Chunked {
        data: input.to_vec(),
        at: 0,
        chunk,
    });
    Session::new(input, &mut out, &mut router, &setup.config).run();
    drop(router);
    let _ = std::fs::remove_dir_all(&dir);
    let world = Rc::try_unwrap(world).ok().unwrap().into_inner();
    (String::from_utf8(out).unwrap(), world)
}

/// Runs `input` whole and a byte at a time; both must agree.
fn run(setup: &Setup, input: &str) -> (String, World) {
    let (out, world) = run_once(setup, input.as_bytes(), input.len());
    for chunk in [1, 7] {
        let (other, other_world) = run_once(setup, input.as_bytes(), chunk);
        assert_eq!(other, out, "chunks of {chunk}");
        assert_eq!(other_world.log, world.log, "chunks of {chunk}");
    }
    (out, world)
}

fn message(from: &str, to: &str) -> String {
    format!(
        "MAIL FROM:<{from}>\r\nRCPT TO:<{to}>\r\nDATA\r\nFrom: <{from}>\r\nDate: Thu, 3 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@x>\r\n\r\nhi\r\n.\r\n"
    )
}

fn replies(out: &str) -> Vec<&str> {
    out.lines().map(|l| &l[..l.len().min(9)]).collect()
}

#[test]
fn three_senders_in_one_session_reach_their_own_backends() {
    let input = format!(
        "EHLO dev\r\n{}{}{}QUIT\r\n",
        message("foo@LOCALDOMAIN.com", "a@example.test"),
        message("bar@other.example", "b@example.test"),
        message("baz@localdomain.com", "c@example.test")
    );
    let (out, world) = run(&Setup::default(), &input);
    assert_eq!(out.matches("250 2.0.0 Ok: queued").count(), 3, "{out}");
    assert_eq!(
        world.log,
        [
            "[foo@localdomain.com] CONNECT",
            "[foo@localdomain.com] MAIL FROM:<bounces@one.example>",
            "[foo@localdomain.com] RCPT TO:<a@example.test>",
            "[foo@localdomain.com] DATA",
            "[foo@localdomain.com] MESSAGE 120",
            "[bar@other.example] CONNECT",
            "[bar@other.example] MAIL FROM:<bar@other.example>",
            "[bar@other.example] RCPT TO:<b@example.test>",
            "[bar@other.example] DATA",
            "[bar@other.example] MESSAGE 91",
            // The alias reuses its account's connection.
            "[foo@localdomain.com] MAIL FROM:<bounces@one.example>",
            "[foo@localdomain.com] RCPT TO:<c@example.test>",
            "[foo@localdomain.com] DATA",
            "[foo@localdomain.com] MESSAGE 120",
            "[foo@localdomain.com] QUIT",
            "[bar@other.example] QUIT",
        ]
    );
    // replyto= applies to its account's messages only.
    let (_, _, _, text) = &world.delivered[0];
    assert!(
        text.contains("\r\nReply-To: desk@one.example\r\n"),
        "{text}"
    );
    assert!(
        text.starts_with("From: <foo@LOCALDOMAIN.com>\r\n"),
        "{text}"
    );
    // rewritefrom= likewise.
    let (account, _, _, text) = &world.delivered[1];
    assert_eq!(account, "bar@other.example");
    assert!(!text.contains("Reply-To"), "{text}");
    assert!(text.starts_with("From: <office@two.example>\r\n"), "{text}");
}

#[test]
fn a_sender_without_an_account_is_refused_or_goes_to_the_command_line_backend() {
    let input = format!(
        "HELO dev\r\n{}QUIT\r\n",
        message("nobody@localdomain.com", "a@example.test")
    );
    let (out, world) = run(&Setup::default(), &input);
    assert!(
        out.contains("550 5.7.1 Sender address <nobody@localdomain.com> has no account"),
        "{out}"
    );
    assert!(world.log.is_empty(), "{:?}", world.log);
    // The local part is compared exactly.
    let input = format!(
        "HELO dev\r\n{}QUIT\r\n",
        message("Foo@localdomain.com", "a@example.test")
    );
    let (out, _) = run(&Setup::default(), &input);
    assert!(out.contains("550 5.7.1"), "{out}");

    let setup = Setup {
        with_default: true,
        ..Setup::default()
    };
    let input = format!(
        "HELO dev\r\n{}QUIT\r\n",
        message("nobody@localdomain.com", "a@example.test")
    );
    let (out, world) = run(&setup, &input);
    assert!(out.contains("250 2.0.0 Ok: queued"), "{out}");
    assert_eq!(world.delivered[0].0, "command line");
}

#[test]
fn the_auth_user_name_chooses_the_account_and_limits_the_senders() {
    let mut setup = Setup::default();
    setup.config.auth = ClientAuth::Users(vec![
        ("foo@localdomain.com".into(), "foo-secret".into()),
        ("baz@localdomain.com".into(), "foo-secret".into()),
        ("admin".into(), "admin-secret".into()),
    ]);
    // AUTH PLAIN foo@localdomain.com / foo-secret
    let auth = format!(
        "AUTH PLAIN {}\r\n",
        crate::base64::encode(b"\0foo@localdomain.com\0foo-secret")
    );
    let input = format!(
        "EHLO dev\r\n{auth}{}{}{}QUIT\r\n",
        message("bar@other.example", "b@example.test"),
        message("baz@localdomain.com", "c@example.test"),
        message("foo@localdomain.com", "a@example.test"),
    );
    let (out, world) = run(&setup, &input);
    assert!(out.contains("235 2.7.0"), "{out}");
    assert!(
        out.contains("550 5.7.1 Sender address <bar@other.example> not allowed for this login"),
        "{out}"
    );
    assert_eq!(out.matches("250 2.0.0 Ok: queued").count(), 2, "{out}");
    assert!(
        world
            .log
            .iter()
            .all(|l| l.starts_with("[foo@localdomain.com]")),
        "{:?}",
        world.log
    );

    // A user who is no account (--client-user) may send as any account.
    let auth = format!(
        "AUTH PLAIN {}\r\n",
        crate::base64::encode(b"\0admin\0admin-secret")
    );
    let input = format!(
        "EHLO dev\r\n{auth}{}QUIT\r\n",
        message("bar@other.example", "b@example.test")
    );
    let (out, world) = run(&setup, &input);
    assert!(out.contains("250 2.0.0 Ok: queued"), "{out}");
    assert_eq!(world.delivered[0].0, "bar@other.example");
}

#[test]
fn allowedrecipients_limits_an_accounts_recipients() {
    let input = "HELO dev\r\nMAIL FROM:<bar@other.example>\r\nRCPT TO:<x@elsewhere.example>\r\nRCPT TO:<y@example.test>\r\nQUIT\r\n";
    let (out, world) = run(&Setup::default(), input);
    assert_eq!(
        replies(&out),
        [
            "220 gw.te",
            "250 gw.te",
            "250 2.1.0",
            "550 5.7.1",
            "250 2.1.5",
            "221 2.0.0"
        ]
    );
    assert!(
        !world.log.iter().any(|l| l.contains("elsewhere")),
        "{:?}",
        world.log
    );
}

#[test]
fn pop_before_smtp_failure_is_451_and_nothing_goes_upstream() {
    let setup = Setup {
        pop_fails: true,
        ..Setup::default()
    };
    let input = format!(
        "HELO dev\r\n{}QUIT\r\n",
        message("pop@localdomain.com", "a@example.test")
    );
    let (out, world) = run(&setup, &input);
    assert!(
        out.contains("451 4.7.0 POP-before-SMTP login failed"),
        "{out}"
    );
    assert!(world.log.is_empty(), "{:?}", world.log);
    assert_eq!(world.pop_logins, 1);
    // When it works, the second message of the session is within popcheckdelay.
    let input = format!(
        "HELO dev\r\n{}{}QUIT\r\n",
        message("pop@localdomain.com", "a@example.test"),
        message("pop@localdomain.com", "b@example.test")
    );
    let (out, world) = run(&Setup::default(), &input);
    assert_eq!(out.matches("250 2.0.0 Ok: queued").count(), 2, "{out}");
    assert_eq!(world.pop_logins, 1);
}

#[test]
fn an_unreachable_account_backend_is_a_451_and_others_still_work() {
    let setup = Setup {
        down: vec!["foo@localdomain.com"],
        ..Setup::default()
    };
    let input = format!(
        "HELO dev\r\n{}RSET\r\n{}QUIT\r\n",
        message("foo@localdomain.com", "a@example.test"),
        message("bar@other.example", "b@example.test")
    );
    let (out, world) = run(&setup, &input);
    assert!(out.contains("451 4.4.1 Backend unavailable"), "{out}");
    assert_eq!(out.matches("250 2.0.0 Ok: queued").count(), 1, "{out}");
    assert_eq!(world.delivered.len(), 1);
}

#[test]
fn an_accounts_backend_takes_the_command_line_only_where_the_file_is_silent() {
    let accounts = Accounts::parse(Path::new("/etc/smtpproxy.ini"), INI).unwrap();
    let defaults = Defaults {
        tls: crate::tls::TlsOptions::default(),
        timeouts: crate::net::Timeouts {
            connect: std::time::Duration::from_secs(5),
            io: std::time::Duration::from_secs(30),
        },
        hello: "gw.test".into(),
        oauth2_dir: "/nonexistent".into(),
        recipient_check: crate::smtp::backend::RecipientCheck::WithMessage,
    };
    let foo = defaults.backend(&accounts.accounts[0]).unwrap();
    assert_eq!((foo.host.as_str(), foo.port), ("smtp.one.example", 465));
    assert_eq!(foo.tls, crate::net::TlsMode::Implicit);
    assert!(foo.tls_connector.is_some());
    assert_eq!(foo.credentials, Some(("one".into(), "pw1".into())));
    assert_eq!(foo.hello, "gw.test");
    assert!(foo.oauth2.is_none());
    let bar = defaults.backend(&accounts.accounts[1]).unwrap();
    // smtpproxy's default security is none: no TLS parameters, port 25.
    assert_eq!((bar.tls, bar.port), (crate::net::TlsMode::None, 25));
    assert!(bar.tls_connector.is_none());
    assert!(!format!("{foo:?}").contains("pw1"));
}

/// The queue stores the account a message was accepted for, also when that account's
/// backend was down at MAIL (the session then resets the transaction).
#[test]
fn the_account_of_the_last_mail_is_known_even_when_its_backend_is_down() {
    let setup = Setup {
        down: vec!["foo@localdomain.com"],
        ..Setup::default()
    };
    let world = Rc::new(RefCell::new(World::default()));
    let dir = stamp_dir();
    let mut router = router(&setup, &world, &dir);
    assert!(router.mail("baz@localdomain.com").is_err());
    router.reset();
    assert_eq!(router.account(), Some("foo@localdomain.com"));
    assert!(router.mail("bar@other.example").unwrap().is_positive());
    assert_eq!(router.account(), Some("bar@other.example"));
    assert!(router.mail("nobody@nowhere.example").unwrap().is_refusal());
    assert_eq!(router.account(), None);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `queue run` and the queue's DSNs: the next MAIL goes through the given account
/// whatever its sender, the null sender stays null (no returnpath for a bounce), and the
/// MAIL after it is routed by its sender again.
#[test]
fn route_to_sends_the_next_mail_through_the_account_and_keeps_the_null_sender() {
    let setup = Setup {
        with_default: true,
        ..Setup::default()
    };
    let world = Rc::new(RefCell::new(World::default()));
    let dir = stamp_dir();
    let mut router = router(&setup, &world, &dir);
    router.route_to(Some("foo@localdomain.com"));
    assert!(router.mail("").unwrap().is_positive());
    assert_eq!(router.account(), Some("foo@localdomain.com"));
    router.reset();
    router.route_to(Some("foo@localdomain.com"));
    assert!(router.mail("bar@other.example").unwrap().is_positive());
    router.reset();
    router.route_to(None);
    assert!(router.mail("foo@localdomain.com").unwrap().is_positive());
    router.reset();
    assert!(router.mail("bar@other.example").unwrap().is_positive());
    router.reset();
    router.route_to(Some("gone@localdomain.com"));
    let gone = router.mail("foo@localdomain.com").unwrap_err();
    assert!(
        gone.to_string()
            .contains("account [gone@localdomain.com] is no longer in"),
        "{gone}"
    );
    let log = world.borrow().log.join("\n");
    let mails: Vec<&str> = log.lines().filter(|l| l.contains("MAIL FROM")).collect();
    assert_eq!(
        mails,
        [
            "[foo@localdomain.com] MAIL FROM:<>",
            "[foo@localdomain.com] MAIL FROM:<bounces@one.example>",
            "[command line] MAIL FROM:<foo@localdomain.com>",
            "[bar@other.example] MAIL FROM:<bar@other.example>",
        ],
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
