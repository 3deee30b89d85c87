//! The accounts file: smtpproxy's documented example read unchanged, and each bad file
//! refused with its file, line and key.

use super::*;
use std::os::unix::fs::PermissionsExt;

/// smtpproxy's README, section by section: `[config]`, `[logging]`, two accounts and a
/// `use=` alias.
pub const SMTPPROXY_INI: &str = "\
[config]
port=25
sleeptime=30
debuglevel=0
waitafterpop=5
deleteonerror=true

[logging]
file=smtpproxy.log
size=1000000
count=10
level=INFO

[foo@localdomain.com]
localhostname=localdomain.com
smtphost=smtp.example.com
smtpsecurity=ssl
smtpusername=username
smtppassword=password
popbeforesmtp=true
pophost=pop.example.com
popport=995
popssl=true
popusername=username
poppassword=password
popcheckdelay=60
returnpath=me@example.com
replyto=me@example.com

[bar@Other.Example]
smtphost=mail.other.example
smtpport=587
smtpsecurity=tls

[baz@localdomain.com]
use=foo@localdomain.com
";

fn parse(text: &str) -> Result<Accounts, FileError> {
    Accounts::parse(Path::new("/etc/smtpproxy.ini"), text)
}

#[test]
fn smtpproxys_documented_file_is_read_unchanged() {
    let accounts = parse(SMTPPROXY_INI).unwrap();
    assert_eq!(accounts.accounts.len(), 2);
    assert_eq!(accounts.wait_after_pop, Duration::from_secs(5));
    assert!(!accounts.debug);
    let foo = &accounts.accounts[0];
    assert_eq!(foo.name, "foo@localdomain.com");
    assert_eq!((foo.smtp_tls, foo.smtp_port), (TlsMode::Implicit, 465));
    assert_eq!(foo.hello.as_deref(), Some("localdomain.com"));
    let (user, password) = foo.smtp_login.as_ref().unwrap();
    assert_eq!(
        (user.as_str(), password.value.as_str()),
        ("username", "password")
    );
    let pop = foo.pop.as_ref().unwrap();
    assert_eq!(
        (pop.host.as_str(), pop.port, pop.tls),
        ("pop.example.com", 995, TlsMode::Implicit)
    );
    assert_eq!(pop.check_delay, Duration::from_secs(60));
    assert_eq!(foo.return_path.as_deref(), Some("me@example.com"));
    assert_eq!(foo.reply_to.as_deref(), Some("me@example.com"));
    let bar = &accounts.accounts[1];
    assert_eq!((bar.smtp_tls, bar.smtp_port), (TlsMode::Starttls, 587));
    assert!(bar.smtp_login.is_none() && bar.pop.is_none());
    // Every [config] and [logging] key is either mapped or noted, never refused.
    for key in [
        "[config] port",
        "[config] sleeptime",
        "[config] deleteonerror",
        "[logging] file",
        "[logging] size",
        "[logging] count",
        "[logging] level",
    ] {
        assert!(
            accounts.ignored.iter().any(|n| n.starts_with(key)),
            "{key}: {:?}",
            accounts.ignored
        );
    }
}

#[test]
fn senders_are_found_by_address_alias_and_domain_case() {
    let accounts = parse(SMTPPROXY_INI).unwrap();
    let name = |a: &str| accounts.find(a).map(|f| f.account().name.clone());
    assert_eq!(
        name("foo@localdomain.com").as_deref(),
        Some("foo@localdomain.com")
    );
    assert_eq!(
        name("foo@LocalDomain.COM").as_deref(),
        Some("foo@localdomain.com")
    );
    assert_eq!(
        name("bar@other.example").as_deref(),
        Some("bar@Other.Example")
    );
    assert!(
        matches!(accounts.find("baz@localdomain.com"), Some(Found::Alias(_, a)) if a.name == "foo@localdomain.com")
    );
    // The local part is compared exactly (RFC 5321 §2.4).
    assert!(accounts.find("Foo@localdomain.com").is_none());
    assert!(accounts.find("nobody@localdomain.com").is_none());
    assert!(accounts.find("").is_none());
}

#[test]
fn defaults_follow_smtpproxy() {
    let accounts = parse("[a@x.example]\nsmtphost=h\n[b@x.example]\nsmtphost=h\nsmtpsecurity=none\npopbeforesmtp=yes\npophost=p\npopusername=u\npoppassword=pw\npopssl=false\n").unwrap();
    let a = &accounts.accounts[0];
    // smtpproxy's default security is none, on port 25.
    assert_eq!((a.smtp_tls, a.smtp_port), (TlsMode::None, 25));
    let pop = accounts.accounts[1].pop.as_ref().unwrap();
    assert_eq!((pop.tls, pop.port), (TlsMode::None, 110));
    assert_eq!(pop.check_delay, POP_CHECK_DELAY);
    assert_eq!(accounts.wait_after_pop, WAIT_AFTER_POP);
    assert!(!accounts.debug);
    let accounts = parse("[config]\ndebuglevel=1\nwaitafterpop=0\n").unwrap();
    assert!(accounts.debug);
    assert_eq!(accounts.wait_after_pop, Duration::ZERO);
    assert!(accounts.ignored.is_empty(), "{:?}", accounts.ignored);
}

#[test]
fn each_bad_file_names_its_line_and_key() {
    for (text, line, key, says) in [
        (
            "[a@x]\nsmtphost=h\nsmtpserver=h\n",
            3,
            Some("smtpserver"),
            "unknown key",
        ),
        ("[a@x]\nsmtpport=25\n", 1, Some("smtphost"), "no smtphost"),
        ("[a@x]\nsmtphost=\n", 1, Some("smtphost"), "no smtphost"),
        (
            "[a@x]\nsmtphost=h\nsmtpport=99999\n",
            3,
            Some("smtpport"),
            "not a port",
        ),
        (
            "[a@x]\nsmtphost=h\nsmtpport=0\n",
            3,
            Some("smtpport"),
            "not a port",
        ),
        (
            "[a@x]\nsmtphost=h\nsmtpport=twenty\n",
            3,
            Some("smtpport"),
            "not a port",
        ),
        (
            "[a@x]\nsmtphost=h\nsmtpsecurity=starttls\n",
            3,
            Some("smtpsecurity"),
            "not ssl, tls or none",
        ),
        ("[a@x]\nuse=b@x\n", 2, Some("use"), "not a section"),
        (
            "[a@x]\nuse=b@x\n[b@x]\nuse=a@x\n",
            2,
            Some("use"),
            "loop: a@x -> b@x -> a@x",
        ),
        ("[a@x]\nuse=a@x\n", 2, Some("use"), "loop"),
        (
            "[a@x]\nuse=config\n[config]\nport=1\n",
            2,
            Some("use"),
            "not a section",
        ),
        (
            "[a@x]\nuse=b@x\nsmtphost=h\n[b@x]\nsmtphost=h\n",
            3,
            Some("smtphost"),
            "only key",
        ),
        (
            "[a@x]\nsmtphost=h\nsmtpusername=u\n",
            3,
            Some("smtpusername"),
            "no smtppassword",
        ),
        (
            "[a@x]\nsmtphost=h\nsmtppassword=p\n",
            3,
            Some("smtppassword"),
            "without smtpusername",
        ),
        (
            "[a@x]\nsmtphost=h\nsmtpusername=u\nsmtppassword=p\nsmtppassword_file=f\n",
            5,
            Some("smtppassword_file"),
            "both",
        ),
        (
            "[a@x]\nsmtphost=h\nsmtpusername=u\nsmtppassword_file=/nonexistent/pw\n",
            4,
            Some("smtppassword_file"),
            "cannot read",
        ),
        (
            "[a@x]\nsmtphost=h\noauth2account=w\nsmtpusername=u\nsmtppassword=p\n",
            3,
            Some("oauth2account"),
            "two logins",
        ),
        (
            "[a@x]\nsmtphost=h\npopbeforesmtp=true\npopusername=u\npoppassword=p\n",
            1,
            Some("pophost"),
            "no pophost",
        ),
        (
            "[a@x]\nsmtphost=h\npopbeforesmtp=true\npophost=p\npopusername=u\n",
            1,
            Some("poppassword"),
            "no poppassword",
        ),
        (
            "[a@x]\nsmtphost=h\npopbeforesmtp=maybe\n",
            3,
            Some("popbeforesmtp"),
            "not true or false",
        ),
        (
            "[a@x]\nsmtphost=h\npopbeforesmtp=1\npophost=p\npopusername=u\npoppassword=p\npopcheckdelay=-1\n",
            7,
            Some("popcheckdelay"),
            "whole number",
        ),
        (
            "[a@x]\nsmtphost=h\nreturnpath=not an address\n",
            3,
            Some("returnpath"),
            "",
        ),
        (
            "[a@x]\nsmtphost=h\nallowedrecipients=a@b, @\n",
            3,
            Some("allowedrecipients"),
            "not an address",
        ),
        (
            "[a@x]\nsmtphost=h\ncafile=/nonexistent.pem\n",
            3,
            Some("cafile"),
            "not a file",
        ),
        (
            "[a@x]\nsmtphost=h\nhandler=/bin/true, sh\n",
            3,
            Some("handler"),
            "not an absolute path",
        ),
        (
            "[a@x]\nsmtphost=h\nhandler=/etc/passwd\n",
            3,
            Some("handler"),
            "not an executable",
        ),
        (
            "[config]\nwaitafterpop=soon\n",
            2,
            Some("waitafterpop"),
            "whole number",
        ),
        (
            "[a@x]\nsmtphost=h\n[a@X]\nsmtphost=h\n",
            3,
            None,
            "same sender",
        ),
        ("smtphost=h\n", 1, None, "before any [section]"),
    ] {
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, Some(line), "{text:?}: {err}");
        assert_eq!(err.key.as_deref(), key, "{text:?}: {err}");
        assert!(err.to_string().contains(says), "{text:?}: {err}");
        assert!(
            err.to_string()
                .starts_with("accounts file /etc/smtpproxy.ini:"),
            "{err}"
        );
    }
}

/// A directory of files removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("lmp-accounts-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_file_others_may_read_is_refused_unless_allowed() {
    let dir = TempDir::new("perm");
    for mode in [0o644, 0o640, 0o604, 0o620] {
        let path = dir.write("smtpproxy.ini", SMTPPROXY_INI, mode);
        let err = Accounts::load(&path, false).unwrap_err();
        assert!(
            err.message.contains("--accounts-insecure-permissions"),
            "{err}"
        );
        assert_eq!(err.line, None);
        assert!(Accounts::load(&path, true).is_ok(), "{mode:o}");
    }
    let path = dir.write("smtpproxy.ini", SMTPPROXY_INI, 0o600);
    assert!(Accounts::load(&path, false).is_ok());
    let path = dir.write("latin1.ini", "[a@x]\nsmtphost=h\nsmtppassword=\u{0}", 0o600);
    std::fs::write(&path, b"[a@x]\nsmtphost=h\nsmtppassword=\xe9\n").unwrap();
    let err = Accounts::load(&path, false).unwrap_err();
    assert_eq!(
        (err.line, err.message.as_str()),
        (Some(3), "not UTF-8 text")
    );
    let err = Accounts::load(&dir.0.join("missing.ini"), false).unwrap_err();
    assert!(err.message.contains("cannot read"), "{err}");
}

#[test]
fn passwords_come_from_files_next_to_the_accounts_file() {
    let dir = TempDir::new("pwfile");
    dir.write("smtp.pw", "s3cret\n", 0o600);
    let path = dir.write(
        "smtpproxy.ini",
        "[a@x]\nsmtphost=h\nsmtpusername=u\nsmtppassword_file=smtp.pw\nclientpassword=dev\n",
        0o600,
    );
    let accounts = Accounts::load(&path, false).unwrap();
    let (_, password) = accounts.accounts[0].smtp_login.as_ref().unwrap();
    assert_eq!(password.value, "s3cret");
    assert_eq!(
        password.file.as_deref(),
        Some(dir.0.join("smtp.pw").as_path())
    );
    let described = accounts.describe();
    assert!(described.contains("password from"), "{described}");
    assert!(
        !described.contains("s3cret") && !described.contains("dev\n"),
        "{described}"
    );
    assert!(!format!("{accounts:?}").contains("s3cret"));
}

#[test]
fn check_output_shows_every_account_and_no_password() {
    let accounts = parse(SMTPPROXY_INI).unwrap();
    let out = accounts.describe();
    for expected in [
        "2 account(s), 1 alias(es)",
        "[foo@localdomain.com] (line 14)",
        "smtp: smtp.example.com:465 (implicit TLS)",
        "login: username, password in the accounts file",
        "pop-before-smtp: pop.example.com:995 (POP3S) as username",
        "[baz@localdomain.com] (line 35) sends through [foo@localdomain.com]",
        "smtp: mail.other.example:587 (STARTTLS)",
        "[config] port",
    ] {
        assert!(out.contains(expected), "{expected}:\n{out}");
    }
    assert!(!out.contains("=password"), "{out}");
}

/// smtpproxy's own `smtpproxy.ini.example`, as shipped (older than its README: `smtptls`,
/// and an alias section whose name ends in a stray `>`).
const SMTPPROXY_INI_EXAMPLE: &str = "[config]\nport=25\nsleeptime=30\nwaitafterpop=5\n\
debuglevel=0\ndeleteonerror=true\n\n[logging]\nfile=smtpproxy.log\nsize=1000000\ncount=10\n\
level=INFO\n\n[foo@localdomain.com]\nlocalhostname=localdomain.com\nsmtphost=smtp.example.com\n\
smtpport=25\nsmtptls=true\nsmtpusername=username\nsmtppassword=password\npopbeforesmtp=true\n\
pophost=pop.example.com\npopport=995\npopssl=true\npopusername=username\npoppassword=password\n\
popcheckdelay=60\n\n[bar@localdomain.com>]\nuse=foo@localdomain.com\n";

#[test]
fn smtpproxys_shipped_example_file_is_read_too() {
    let accounts = parse(SMTPPROXY_INI_EXAMPLE).unwrap();
    let foo = &accounts.accounts[0];
    // smtptls=true (smtpproxy before 1.5) is STARTTLS; smtpsecurity would win over it.
    assert_eq!((foo.smtp_tls, foo.smtp_port), (TlsMode::Starttls, 25));
    assert_eq!(accounts.aliases[0].name, "bar@localdomain.com>");
    let accounts = parse("[a@x]\nsmtphost=h\nsmtptls=true\nsmtpsecurity=ssl\n").unwrap();
    assert_eq!(accounts.accounts[0].smtp_tls, TlsMode::Implicit);
    let accounts = parse("[a@x]\nsmtphost=h\nsmtptls=false\n").unwrap();
    assert_eq!(accounts.accounts[0].smtp_tls, TlsMode::None);
}

#[test]
fn default_keys_and_percent_references_work_as_in_pythons_configparser() {
    let text = "[DEFAULT]\nsmtphost=mail.example\nsmtpsecurity=ssl\ndomain=example\n\
                [a@x.example]\nsmtpusername=a@%(domain)s\nsmtppassword=100%%(%(smtphost)s)\n\
                [b@x.example]\nsmtphost=other.example\n[c@x.example]\nuse=a@x.example\n";
    let err = parse(text).unwrap_err();
    // `domain` is no key of ours: an error, at its line in [DEFAULT].
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(4), Some("domain")),
        "{err}"
    );
    let text = text
        .replace("domain=example\n", "localhostname=example\n")
        .replace("%(domain)s", "%(localhostname)s");
    let accounts = parse(&text).unwrap();
    let a = &accounts.accounts[0];
    assert_eq!(
        (a.smtp_host.as_str(), a.smtp_tls),
        ("mail.example", TlsMode::Implicit)
    );
    let (user, password) = a.smtp_login.as_ref().unwrap();
    assert_eq!(
        (user.as_str(), password.value.as_str()),
        ("a@example", "100%(mail.example)")
    );
    assert_eq!(accounts.accounts[1].smtp_host, "other.example");
    // A use= section takes nothing from [DEFAULT], so use= stays its only key.
    assert_eq!(accounts.aliases[0].account, "a@x.example");
    let err = parse("[a@x]\nsmtphost=h\nsmtppassword=%(nothing)s\nsmtpusername=u\n").unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(3), Some("smtppassword")),
        "{err}"
    );
}
