//! The Debian package and what it is made from: `--version` naming the commit, the man
//! pages and completions generated from the clap definitions, and the `.deb` built by
//! `packaging/build-deb` (its files, conffiles, maintainer scripts and lintian).

mod deb;

use clap::CommandFactory;
use deb::repo;
use legacy_mail_proxy::cli::Cli;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn version_names_the_git_commit() {
    let head = run(Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo()));
    let version = run(Command::new(env!("CARGO_BIN_EXE_legacy-mail-proxy")).arg("--version"));
    assert_eq!(
        version.trim(),
        format!(
            "legacy-mail-proxy {} (git {})",
            env!("CARGO_PKG_VERSION"),
            head.trim()
        )
    );
    // Every subcommand says the same (propagate_version).
    let pop3 =
        run(Command::new(env!("CARGO_BIN_EXE_legacy-mail-proxy")).args(["pop3", "--version"]));
    assert!(pop3.contains(head.trim()), "{pop3}");
}

/// The package unpacked: its files under `root/`, its control files under `DEBIAN/`.
struct Unpacked {
    dir: PathBuf,
}

impl Unpacked {
    fn new() -> Unpacked {
        let deb = deb::package("package");
        let dir = deb.with_extension("unpacked");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(dir.join("root")));
        run(Command::new("dpkg-deb")
            .arg("-e")
            .arg(deb)
            .arg(dir.join("DEBIAN")));
        Unpacked { dir }
    }
    fn path(&self, path: &str) -> PathBuf {
        self.dir.join("root").join(path.trim_start_matches('/'))
    }
    fn read(&self, path: &str) -> String {
        fs::read_to_string(self.path(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }
    fn control(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join("DEBIAN").join(name))
            .unwrap_or_else(|e| panic!("DEBIAN/{name}: {e}"))
    }
    fn man_page(&self, name: &str) -> String {
        let path = self.path(&format!("usr/share/man/man8/{name}.8.gz"));
        // `\-` is roff's hyphen; the pages spell every option with it.
        run(Command::new("zcat").arg(&path)).replace("\\-", "-")
    }
}

fn unpacked() -> &'static Unpacked {
    static UNPACKED: OnceLock<Unpacked> = OnceLock::new();
    UNPACKED.get_or_init(Unpacked::new)
}

/// The names of the repository's files in `dir` whose name ends in one of `suffixes`.
fn shipped_files(dir: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| keep(name))
        .collect();
    names.sort();
    names
}

fn is_unit(name: &str) -> bool {
    [".service", ".socket", ".timer", ".path"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

#[test]
fn package_ships_the_stripped_binary_and_every_unit() {
    let deb = unpacked();
    let binary = deb.path("usr/bin/legacy-mail-proxy");
    let sections = run(Command::new("readelf").arg("-S").arg(&binary));
    assert!(!sections.contains(".symtab"), "not stripped: {sections}");
    let version = run(Command::new(&binary).arg("--version"));
    assert!(version.contains("(git "), "{version}");

    // Every unit in systemd/, whatever its name: a unit added there joins the package.
    let units = shipped_files("systemd", is_unit);
    assert!(units.len() >= 6, "{units:?}");
    for unit in &units {
        let text = deb.read(&format!("lib/systemd/system/{unit}"));
        assert!(
            !text.contains("/usr/local/bin"),
            "{unit} names /usr/local/bin"
        );
        if text.contains("ExecStart=") {
            assert!(
                text.contains("ExecStart=/usr/bin/legacy-mail-proxy "),
                "{unit}: {text}"
            );
        }
        assert!(
            text.contains("\nDocumentation=man:legacy-mail-proxy"),
            "{unit}"
        );
    }
    assert_eq!(
        deb.read("usr/lib/sysusers.d/legacy-mail-proxy.conf"),
        fs::read_to_string(repo().join("systemd/legacy-mail-proxy.sysusers")).unwrap()
    );
    assert_eq!(
        deb.read("usr/lib/tmpfiles.d/legacy-mail-proxy.conf"),
        fs::read_to_string(repo().join("systemd/legacy-mail-proxy.tmpfiles")).unwrap()
    );
    for doc in [
        "README.md.gz",
        "copyright",
        "examples/systemd/legacy-mail-proxy-pop3-work.socket",
        "examples/xinetd/legacy-mail-proxy-several-backends",
        "examples/xinetd/legacy-mail-proxy-queue.cron",
    ] {
        let path = deb.path(&format!("usr/share/doc/legacy-mail-proxy/{doc}"));
        assert!(path.is_file(), "{} is missing", path.display());
    }
    assert!(
        deb.read("usr/share/doc/legacy-mail-proxy/copyright")
            .contains("License: MIT")
    );
    let cron =
        deb.read("usr/share/doc/legacy-mail-proxy/examples/xinetd/legacy-mail-proxy-queue.cron");
    assert!(
        cron.contains(" /usr/bin/legacy-mail-proxy queue run") && !cron.contains("/usr/local/"),
        "{cron}"
    );
    assert!(
        !deb.path("etc/cron.d").exists(),
        "the package starts no queue runs by itself"
    );
}

#[test]
fn package_conffiles_are_the_env_files_and_disabled_xinetd_services() {
    let deb = unpacked();
    let mut expected: Vec<String> = shipped_files("systemd", |n| n.ends_with(".env"))
        .into_iter()
        .map(|name| format!("/etc/legacy-mail-proxy/{name}"))
        .collect();
    // The queue runner's cron file is an example (see the next test), not a service.
    let services = shipped_files("xinetd", |n| {
        n.starts_with("legacy-mail-proxy-") && !n.ends_with(".cron")
    });
    expected.extend(services.iter().map(|name| format!("/etc/xinetd.d/{name}")));
    expected.sort();
    let conffiles: Vec<String> = deb.control("conffiles").lines().map(String::from).collect();
    assert_eq!(conffiles, expected);
    for name in &services {
        let text = deb.read(&format!("etc/xinetd.d/{name}"));
        let disable: Vec<&str> = text
            .lines()
            .filter(|line| line.trim_start().starts_with("disable"))
            .collect();
        assert_eq!(disable.len(), 1, "{name}: {disable:?}");
        assert!(
            disable[0].trim_end().ends_with("= yes"),
            "{name}: {disable:?}"
        );
        assert!(
            text.contains("server\t\t= /usr/bin/legacy-mail-proxy\n"),
            "{name}"
        );
    }
}

#[test]
fn package_scripts_enable_nothing_stop_sockets_on_remove_and_purge_state() {
    let deb = unpacked();
    let postinst = deb.control("postinst");
    assert!(postinst.contains("systemd-sysusers"), "{postinst}");
    assert!(postinst.contains("systemd-tmpfiles"), "{postinst}");
    // Enabling happens only for a unit the admin had enabled before (an upgrade).
    for line in postinst
        .lines()
        .filter(|l| l.contains("deb-systemd-helper enable"))
    {
        assert!(
            line.trim_start().starts_with("deb-systemd-helper enable '"),
            "{line}"
        );
    }
    let enables = postinst.matches("deb-systemd-helper enable").count();
    let guarded = postinst.matches("--quiet was-enabled").count();
    assert_eq!(enables, guarded, "{postinst}");
    let prerm = deb.control("prerm");
    let stop = prerm
        .lines()
        .find(|line| line.contains("deb-systemd-invoke stop"))
        .unwrap_or_else(|| panic!("prerm stops nothing:\n{prerm}"));
    assert!(prerm.contains("\"$1\" = remove"), "{prerm}");
    for socket in ["pop3", "smtp", "tunnel"] {
        assert!(
            stop.contains(&format!("'legacy-mail-proxy-{socket}.socket'")),
            "{stop}"
        );
    }
    let postrm = deb.control("postrm");
    assert!(
        postrm.contains("rm -rf /var/lib/legacy-mail-proxy /run/lock/legacy-mail-proxy"),
        "{postrm}"
    );
}

#[test]
fn man_pages_and_completions_cover_every_subcommand_and_option() {
    let deb = unpacked();
    // As packaging/gen-docs.rs builds it: `help` is no subcommand with a page of its own.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut commands = vec![&cmd];
    let mut pages = 0;
    while let Some(command) = commands.pop() {
        commands.extend(command.get_subcommands());
        let name = command
            .get_display_name()
            .unwrap_or(command.get_name())
            .to_owned();
        let page = deb.man_page(&name);
        pages += 1;
        for arg in command.get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(
                    page.contains(&format!("--{long}")),
                    "{name}(8) lacks --{long}"
                );
            }
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy();
                assert!(page.contains(&*env), "{name}(8) lacks {env}");
            }
        }
    }
    assert!(pages >= 5, "{pages} pages");
    for (path, needle) in [
        (
            "usr/share/bash-completion/completions/legacy-mail-proxy",
            "--imap-host",
        ),
        (
            "usr/share/zsh/vendor-completions/_legacy-mail-proxy",
            "--imap-host",
        ),
        (
            "usr/share/fish/vendor_completions.d/legacy-mail-proxy.fish",
            "imap-host",
        ),
    ] {
        assert!(deb.read(path).contains(needle), "{path}");
    }
}

#[test]
fn package_is_lintian_clean() {
    let deb = deb::package("package");
    let out = Command::new("lintian")
        .args(["--pedantic", "--display-info", "--fail-on", "none"])
        .arg(deb.with_extension("changes"))
        .output()
        .expect("lintian is not installed: apt-get install -y --no-install-recommends lintian");
    let report = String::from_utf8_lossy(&out.stdout);
    let tags: Vec<&str> = report
        .lines()
        .filter(|line| line.len() > 2 && line.as_bytes()[1] == b':')
        .collect();
    assert!(
        out.status.success(),
        "lintian failed: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Tags that cannot be fixed are overridden, each with its reason, in
    // debian/legacy-mail-proxy.lintian-overrides.
    assert!(tags.is_empty(), "lintian:\n{}", tags.join("\n"));
}
