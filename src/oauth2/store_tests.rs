//! The store's file handling and its refresh protocol, against a fake token endpoint that
//! rotates refresh tokens like Microsoft's and keeps a grant log in the store's directory,
//! so that threads and separate processes can all be checked against it. (The real
//! authorization server is exercised by tests/oauth2.rs.)

use super::*;
use crate::oauth2::provider::{Endpoints, Flow, Preset};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lmp-o2store-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn account(flow: Flow, access: Option<&str>, expires_at: Option<u64>) -> Account {
    Account {
        provider: Endpoints {
            preset: Preset::Custom,
            tenant: None,
            token_url: "https://idp.invalid/token".into(),
            device_url: None,
            authorization_url: None,
        },
        client_id: "client".into(),
        client_secret: SecretSource::None,
        client_auth: ClientAuth::Basic,
        scopes: vec!["mail".into()],
        flow,
        user: "alice@example.org".into(),
        refresh_margin: DEFAULT_REFRESH_MARGIN,
        refresh_token: (flow != Flow::ClientCredentials).then(|| Secret("r0".into())),
        access_token: access.map(|a| Secret(a.into())),
        expires_at,
        last_refresh: None,
        last_error: None,
        last_error_at: None,
        revoked: false,
    }
}

/// A token endpoint with rotating refresh tokens. Its state (the one valid refresh token
/// number) and its grant log are files in `dir`, shared by every thread and process; it
/// does no locking of its own, so two refreshes at once show as two log lines with the same
/// refresh token (and the second one fails, as at Microsoft).
struct FakeEndpoint {
    dir: PathBuf,
    /// How long a grant takes: widens the window in which a second refresh could start.
    delay: Duration,
    /// What to fail with instead of answering.
    failure: Option<TokenError>,
}

impl FakeEndpoint {
    fn new(dir: &Path) -> FakeEndpoint {
        FakeEndpoint {
            dir: dir.to_path_buf(),
            delay: Duration::ZERO,
            failure: None,
        }
    }

    fn log(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("grant.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl TokenEndpoint for FakeEndpoint {
    fn renew(&self, _name: &str, account: &Account) -> Result<Grant, TokenError> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        let state = self.dir.join("server-state");
        let current: u64 = std::fs::read_to_string(&state)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let used = match (&account.flow, &account.refresh_token) {
            (Flow::ClientCredentials, _) => "client_credentials".to_string(),
            (_, Some(refresh)) => format!("refresh_token {}", refresh.0),
            (_, None) => "no refresh token".into(),
        };
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("grant.log"))
            .unwrap();
        writeln!(log, "{used}").unwrap();
        std::thread::sleep(self.delay);
        let next = current + 1;
        if account.flow != Flow::ClientCredentials
            && account.refresh_token != Some(Secret(format!("r{current}")))
        {
            return Err(TokenError::Revoked("invalid_grant".into()));
        }
        std::fs::write(&state, next.to_string()).unwrap();
        Ok(Grant {
            access_token: format!("a{next}"),
            expires_in: Some(Duration::from_secs(3600)),
            refresh_token: (account.flow != Flow::ClientCredentials).then(|| format!("r{next}")),
        })
    }
}

/// A new directory holding `data` as account "acct".
fn stored(name: &str, data: &Account) -> (PathBuf, Store) {
    let dir = temp_dir(name);
    let store = Store::new(&dir);
    store.write("acct", data).unwrap();
    (dir, store)
}

fn timeouts() -> crate::net::Timeouts {
    crate::net::Timeouts {
        connect: Duration::from_secs(5),
        io: Duration::from_secs(10),
    }
}

fn open(dir: &Path, endpoint: FakeEndpoint) -> StoredAccount {
    StoredAccount::open(dir, "acct", Default::default(), timeouts())
        .unwrap()
        .with_endpoint(Box::new(endpoint))
}

#[test]
fn writes_are_atomic_private_and_leave_no_temporary_file() {
    let dir = temp_dir("write");
    let store = Store::new(&dir.join("sub"));
    let data = account(Flow::Device, Some("a0"), Some(now() + 3600));
    store.write("acct", &data).unwrap();
    let path = store.path("acct");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(dir.join("sub"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    // An existing file with a wider mode is replaced, not rewritten in place.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
    store.write("acct", &data).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_ne!(std::os::unix::fs::MetadataExt::ino(&meta), inode);
    assert_eq!(store.read("acct").unwrap(), data);
    let names: Vec<_> = std::fs::read_dir(dir.join("sub"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["acct.json"]);
    assert_eq!(store.list().unwrap(), ["acct"]);
    assert!(store.remove("acct").unwrap());
    assert!(!store.remove("acct").unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn account_names_cannot_leave_the_directory() {
    for bad in ["", "../x", "a/b", ".hidden", "a b", "x\n"] {
        assert!(check_name(bad).is_err(), "{bad:?}");
    }
    for good in ["alice@example.org", "m365-main", "g_1.2"] {
        assert!(check_name(good).is_ok(), "{good:?}");
    }
}

#[test]
fn a_corrupted_file_is_broken_and_its_error_shows_no_token() {
    let dir = temp_dir("corrupt");
    std::fs::write(
        dir.join("acct.json"),
        r#"{"user": "u", "access_token": "SECRET-TOKEN-VALUE", "refresh_token": 5"#,
    )
    .unwrap();
    let error = StoredAccount::open(&dir, "acct", Default::default(), timeouts())
        .err()
        .unwrap();
    let TokenError::Broken(text) = &error else {
        panic!("{error:?}")
    };
    assert!(text.contains("corrupted"), "{text}");
    assert!(text.contains("oauth2 authorize acct"), "{text}");
    assert!(!text.contains("SECRET"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreadable_or_missing_file_is_broken_with_what_to_do() {
    let dir = temp_dir("unreadable");
    let error = Store::new(&dir).read("acct").unwrap_err();
    assert!(
        matches!(&error, TokenError::Broken(t) if t.contains("oauth2 authorize acct")),
        "{error:?}"
    );
    // Root reads any file whatever its mode: a directory in its place fails for everyone.
    // (tests/oauth2.rs checks a mode-0600 file of another user, as a non-root user.)
    std::fs::create_dir(dir.join("acct.json")).unwrap();
    let error = Store::new(&dir).read("acct").unwrap_err();
    assert!(
        matches!(&error, TokenError::Broken(t) if t.contains("cannot read") && t.contains("service user")),
        "{error:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_fresh_token_is_used_without_refresh_and_one_inside_the_margin_is_refreshed() {
    let (dir, store) = stored(
        "margin",
        &account(
            Flow::Device,
            Some("a0"),
            Some(now() + DEFAULT_REFRESH_MARGIN + 60),
        ),
    );
    let mut source = open(&dir, FakeEndpoint::new(&dir));
    assert_eq!(source.user(), "alice@example.org");
    assert_eq!(source.token().unwrap().secret(), "a0");
    assert!(FakeEndpoint::log(&dir).is_empty());

    store
        .write(
            "acct",
            &account(
                Flow::Device,
                Some("a0"),
                Some(now() + DEFAULT_REFRESH_MARGIN - 60),
            ),
        )
        .unwrap();
    assert_eq!(source.token().unwrap().secret(), "a1");
    assert_eq!(FakeEndpoint::log(&dir), ["refresh_token r0"]);
    let stored = store.read("acct").unwrap();
    assert_eq!(stored.refresh_token, Some(Secret("r1".into())), "rotated");
    assert!(stored.expires_at.unwrap() >= now() + 3590);
    assert!(stored.last_refresh.is_some());
    // And now it is fresh again.
    assert_eq!(source.token().unwrap().secret(), "a1");
    assert_eq!(FakeEndpoint::log(&dir).len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_provider_down_leaves_the_unexpired_token_in_use() {
    let (dir, store) = stored("down", &account(Flow::Device, Some("a0"), Some(now() + 60)));
    let mut down = FakeEndpoint::new(&dir);
    down.failure = Some(TokenError::Unavailable("idp: connection refused".into()));
    let mut source = open(&dir, down);
    assert_eq!(source.token().unwrap().secret(), "a0");
    let stored = store.read("acct").unwrap();
    assert!(
        stored
            .last_error
            .as_deref()
            .unwrap()
            .contains("connection refused"),
        "{stored:?}"
    );
    assert_eq!(stored.refresh_token, Some(Secret("r0".into())));

    // Expired: nothing left to use.
    store
        .write("acct", &account(Flow::Device, Some("a0"), Some(now() - 1)))
        .unwrap();
    assert!(matches!(
        source.token(),
        Err(TokenError::Unavailable(t)) if t.contains("connection refused")
    ));
    // A rejected token is not offered again, even if unexpired.
    store
        .write("acct", &account(Flow::Device, Some("a0"), Some(now() + 60)))
        .unwrap();
    assert!(matches!(
        source.renew(&AccessToken::new("a0".into())),
        Err(TokenError::Unavailable(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_revoked_grant_is_reported_and_recorded() {
    let dir = temp_dir("revoked");
    let store = Store::new(&dir);
    let mut data = account(Flow::Device, Some("a0"), Some(now() - 1));
    data.refresh_token = Some(Secret("r-old".into()));
    store.write("acct", &data).unwrap();
    let mut source = open(&dir, FakeEndpoint::new(&dir));
    assert!(matches!(source.token(), Err(TokenError::Revoked(_))));
    let stored = store.read("acct").unwrap();
    assert!(stored.last_error.unwrap().contains("invalid_grant"));
    assert!(stored.revoked);
    // The next connections do not send the dead refresh token again...
    assert!(matches!(source.token(), Err(TokenError::Revoked(t)) if t.contains("invalid_grant")));
    assert!(matches!(
        source.renew(&AccessToken::new("a0".into())),
        Err(TokenError::Revoked(_))
    ));
    assert_eq!(FakeEndpoint::log(&dir).len(), 1);
    // ...but the admin's forced refresh does.
    let endpoint = FakeEndpoint::new(&dir);
    assert!(
        store
            .refresh("acct", &endpoint, None, true, Duration::ZERO)
            .is_err()
    );
    assert_eq!(FakeEndpoint::log(&dir).len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn renew_returns_a_token_another_process_stored_or_refreshes_once() {
    let (dir, _) = stored(
        "renew",
        &account(Flow::Device, Some("a0"), Some(now() + 3600)),
    );
    let mut source = open(&dir, FakeEndpoint::new(&dir));
    // The first time, a0 is still the stored token: one refresh. The second time a0 is
    // an older token than the stored a1, which is returned without a refresh.
    for _ in 0..2 {
        let renewed = source.renew(&AccessToken::new("a0".into())).unwrap();
        assert_eq!(renewed.secret(), "a1");
        assert_eq!(FakeEndpoint::log(&dir).len(), 1);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn client_credentials_ask_for_a_new_token_when_due() {
    let (dir, store) = stored(
        "cc",
        &account(Flow::ClientCredentials, Some("a0"), Some(now() + 10)),
    );
    let mut source = open(&dir, FakeEndpoint::new(&dir));
    assert_eq!(source.token().unwrap().secret(), "a1");
    assert_eq!(FakeEndpoint::log(&dir), ["client_credentials"]);
    assert_eq!(store.read("acct").unwrap().refresh_token, None);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_refresh_held_too_long_by_another_process_is_waited_for_only_so_long() {
    let (dir, store) = stored(
        "locktimeout",
        &account(Flow::Device, Some("a0"), Some(now() + 60)),
    );
    let held = store.lock("acct", Duration::ZERO).unwrap();
    let endpoint = FakeEndpoint::new(&dir);
    let started = Instant::now();
    let (_, token) = store
        .refresh("acct", &endpoint, None, false, Duration::from_millis(200))
        .unwrap();
    assert_eq!(
        token.secret(),
        "a0",
        "the unexpired token, without a refresh"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    store
        .write("acct", &account(Flow::Device, Some("a0"), Some(now() - 1)))
        .unwrap();
    assert!(matches!(
        store.refresh("acct", &endpoint, None, false, Duration::from_millis(100)),
        Err(TokenError::Unavailable(_))
    ));
    assert!(FakeEndpoint::log(&dir).is_empty());
    drop(held);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn twenty_threads_at_expiry_make_one_refresh() {
    let (dir, _) = stored(
        "threads",
        &account(Flow::Device, Some("a0"), Some(now() - 1)),
    );
    let start = Arc::new(std::sync::Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let dir = dir.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                let mut endpoint = FakeEndpoint::new(&dir);
                endpoint.delay = Duration::from_millis(100);
                // Each its own StoredAccount and lock file descriptor, as separate
                // processes have (flock locks belong to the open file description).
                let mut source = open(&dir, endpoint);
                start.wait();
                source.token().unwrap().secret().to_string()
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap(), "a1");
    }
    assert_eq!(FakeEndpoint::log(&dir), ["refresh_token r0"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The child side of [`several_processes_at_expiry_make_one_refresh`]: does nothing unless
/// started by it.
#[test]
#[ignore = "run by several_processes_at_expiry_make_one_refresh"]
fn child_process_gets_a_token() {
    let Some(dir) = std::env::var_os("LMP_O2STORE_CHILD_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut endpoint = FakeEndpoint::new(&dir);
    endpoint.delay = Duration::from_millis(100);
    let mut source = open(&dir, endpoint);
    let token = source.token().unwrap();
    println!("CHILD-TOKEN={}", token.secret());
}

#[test]
fn several_processes_at_expiry_make_one_refresh() {
    let (dir, _) = stored(
        "processes",
        &account(Flow::Device, Some("a0"), Some(now() - 1)),
    );
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..8)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "oauth2::store::tests::child_process_gets_a_token",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("LMP_O2STORE_CHILD_DIR", &dir)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("CHILD-TOKEN=a1\n"), "{stdout}");
    }
    assert_eq!(FakeEndpoint::log(&dir), ["refresh_token r0"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_token_living_less_than_the_margin_is_fresh_for_half_its_life() {
    // 8-second tokens with the default 300-second margin: found by 20 processes against
    // the test authorization server, each of which refreshed once in turn.
    let mut data = account(Flow::Device, Some("a0"), Some(now() + 8));
    data.last_refresh = Some(now());
    let (dir, store) = stored("short", &data);
    let mut source = open(&dir, FakeEndpoint::new(&dir));
    assert_eq!(source.token().unwrap().secret(), "a0");
    assert!(FakeEndpoint::log(&dir).is_empty());
    // Past half its life it is due.
    data.last_refresh = Some(now() - 10);
    store.write("acct", &data).unwrap();
    assert_eq!(source.token().unwrap().secret(), "a1");
    std::fs::remove_dir_all(&dir).unwrap();
}
