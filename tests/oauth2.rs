//! `legacy-mail-proxy oauth2 …` and the token store against the real authorization server
//! of the harness (oidc-provider, rotating refresh tokens, access tokens of a few seconds):
//! each flow end to end with the approval done through the harness's scripted browser,
//! `status`, `refresh` with rotation, `remove`, a revoked grant, the server down, a
//! corrupted and an unreadable token file, and 20 processes refreshing at once.
//!
//! Every test holds the authorization server [`Idp::shared`]ly; the ones that count its
//! grant log or stop it hold it exclusively, so no other test's grants mix in.

mod common;

use common::{CONFIDENTIAL_CLIENT_ID, Idp, PUBLIC_CLIENT_ID, REDIRECT_URI, SCOPES, oauth2};
use common::{MAIL_USER, User, servers};
use legacy_mail_proxy::oauth2::store::{Store, StoredAccount};
use legacy_mail_proxy::oauth2::{TokenError, TokenSource};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_legacy-mail-proxy");

/// A token store of its own for each test.
fn store_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lmp-oauth2-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `legacy-mail-proxy oauth2 ACTION ARGS… --oauth2-dir DIR --ca-file CA`.
fn admin(action: &str, dir: &Path, args: &[&str]) -> Command {
    let idp = &oauth2().idp;
    let mut cmd = Command::new(BIN);
    cmd.args(["--log", "stderr", "oauth2", action])
        .args(args)
        .arg("--oauth2-dir")
        .arg(dir)
        .arg("--ca-file")
        .arg(&idp.ca_file)
        .args(["--connect-timeout", "5", "--backend-timeout", "10"]);
    cmd
}

fn run(mut cmd: Command) -> Output {
    let output = cmd.stdin(Stdio::null()).output().expect("run the gateway");
    common::keep_proxy_log(&output.stderr);
    no_token_in(&output);
    output
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// What the admin commands print must never contain a token: compare with every token in
/// every store file this test binary has written so far.
fn no_token_in(output: &Output) {
    let all = text(output);
    for token in stored_tokens() {
        assert!(!all.contains(&token), "a token was printed:\n{all}");
    }
}

fn stored_tokens() -> Vec<String> {
    let mut tokens = Vec::new();
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return tokens;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = format!("-{}", std::process::id());
        if !name.starts_with("lmp-oauth2-it-") || !name.ends_with(&ours) {
            continue;
        }
        for file in std::fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let body = std::fs::read(file.path()).unwrap_or_default();
            let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
                continue;
            };
            for key in ["access_token", "refresh_token"] {
                if let Some(value) = json[key].as_str() {
                    tokens.push(value.to_string());
                }
            }
        }
    }
    tokens
}

fn custom_provider(idp: &Idp) -> Vec<String> {
    [
        "--provider",
        "custom",
        "--token-url",
        &idp.token_endpoint,
        "--device-url",
        &idp.device_authorization_endpoint,
        "--authorization-url",
        &idp.authorization_endpoint,
        "--scope",
        SCOPES,
    ]
    .map(str::to_string)
    .to_vec()
}

/// Reads the child's stdout until a line satisfies `find`, and returns what it extracted.
fn read_until<T>(child: &mut Child, mut find: impl FnMut(&str) -> Option<T>) -> T {
    let stdout = child.stdout.as_mut().expect("piped stdout");
    let mut reader = BufReader::new(stdout);
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .expect("read the gateway's stdout");
        assert!(n > 0, "the gateway ended before printing it:\n{seen}");
        seen.push_str(&line);
        if let Some(found) = find(line.trim_end()) {
            return found;
        }
    }
}

/// Starts `oauth2 authorize ACCOUNT` with the device flow and returns it with the user code
/// it printed.
fn start_device(dir: &Path, account: &str, user: &User, extra: &[&str]) -> (Child, String) {
    let idp = &oauth2().idp;
    let mut cmd = admin(
        "authorize",
        dir,
        &[account, "--client-id", PUBLIC_CLIENT_ID],
    );
    cmd.args(custom_provider(idp))
        .args(["--user", &user.name])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start oauth2 authorize");
    let code = read_until(&mut child, |line| {
        line.split_once("enter the code ")
            .map(|(_, code)| code.trim().to_string())
    });
    (child, code)
}

/// `oauth2 authorize ACCOUNT` with the device flow, approved as `user` in the harness's
/// browser.
fn authorize_device(dir: &Path, account: &str, user: &User, extra: &[&str]) -> Output {
    let (child, code) = start_device(dir, account, user, extra);
    oauth2().idp.approve_device(&code, user);
    let output = child.wait_with_output().unwrap();
    common::keep_proxy_log(&output.stderr);
    no_token_in(&output);
    assert!(output.status.success(), "{}", text(&output));
    output
}

/// Starts `oauth2 authorize ACCOUNT --flow code` and returns it with the authorization URL
/// it printed; it then waits for the redirect URL on its stdin.
fn start_code_flow(dir: &Path, account: &str, user: &User) -> (Child, String) {
    let mut cmd = admin(
        "authorize",
        dir,
        &[
            account,
            "--flow",
            "code",
            "--client-id",
            PUBLIC_CLIENT_ID,
            "--redirect-url",
            REDIRECT_URI,
            "--user",
            &user.name,
        ],
    );
    cmd.args(custom_provider(&oauth2().idp))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let url = read_until(&mut child, |line| {
        line.starts_with("https://").then(|| line.to_string())
    });
    (child, url)
}

fn stored(dir: &Path, account: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{account}.json"))).expect("the account file")
}

fn stored_token(dir: &Path, account: &str, key: &str) -> Option<String> {
    let data = Store::new(dir).read(account).expect("a readable account");
    let token = match key {
        "access_token" => data.access_token,
        "refresh_token" => data.refresh_token,
        _ => panic!("{key}"),
    };
    token.map(|t| t.0)
}

fn tls() -> legacy_mail_proxy::tls::TlsOptions {
    legacy_mail_proxy::tls::TlsOptions {
        ca_file: Some(oauth2().idp.ca_file.clone()),
        danger_accept_invalid_certs: false,
    }
}

fn timeouts() -> legacy_mail_proxy::net::Timeouts {
    legacy_mail_proxy::net::Timeouts {
        connect: Duration::from_secs(5),
        io: Duration::from_secs(10),
    }
}

/// Makes the stored access token look expired to the store (the server still honours it):
/// the moment of expiry, without waiting for it.
fn expire(dir: &Path, account: &str) {
    let store = Store::new(dir);
    let mut data = store.read(account).unwrap();
    data.expires_at = Some(1);
    store.write(account, &data).unwrap();
}

#[test]
fn device_flow_then_status_refresh_with_rotation_and_remove() {
    let world = oauth2();
    let _up = world.idp.shared();
    let user = servers().new_user("o2dev");
    let dir = store_dir("device");
    let out = authorize_device(&dir, "dev", &user, &[]);
    assert!(
        text(&out).contains("Account dev authorized"),
        "{}",
        text(&out)
    );

    // The file: private, with both tokens, and a token the server accepts.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("dev.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let access = stored_token(&dir, "dev", "access_token").expect("an access token");
    let refresh = stored_token(&dir, "dev", "refresh_token").expect("a refresh token");
    assert!(world.idp.is_active(&access));

    let status = run(admin("status", &dir, &[]));
    let shown = text(&status);
    assert!(status.status.success(), "{shown}");
    for expected in [
        "dev\n",
        &format!("user:         {}", user.name),
        "provider:     custom",
        "flow:         device",
        "expires ",
        "refresh token: stored",
    ] {
        assert!(shown.contains(expected), "{expected:?} missing:\n{shown}");
    }

    // A forced refresh rotates the refresh token: the old one is dead at the server.
    let out = run(admin("refresh", &dir, &["dev"]));
    assert!(out.status.success(), "{}", text(&out));
    let new_refresh = stored_token(&dir, "dev", "refresh_token").unwrap();
    let new_access = stored_token(&dir, "dev", "access_token").unwrap();
    assert_ne!(new_refresh, refresh, "rotated");
    assert_ne!(new_access, access);
    assert!(world.idp.is_active(&new_access));
    let replay = world.idp.refresh(PUBLIC_CLIENT_ID, &refresh);
    assert_eq!(replay.error.as_deref(), Some("invalid_grant"), "{replay:?}");

    let out = run(admin("remove", &dir, &["dev"]));
    assert!(out.status.success(), "{}", text(&out));
    assert!(!dir.join("dev.json").exists());
    let status = run(admin("status", &dir, &[]));
    assert!(
        text(&status).contains("No OAuth2 accounts"),
        "{}",
        text(&status)
    );
    let out = run(admin("remove", &dir, &["dev"]));
    assert!(!out.status.success());
}

#[test]
fn a_declined_device_sign_in_stores_nothing() {
    let world = oauth2();
    let _up = world.idp.shared();
    let user = servers().new_user("o2deny");
    let dir = store_dir("deny");
    let (child, code) = start_device(&dir, "deny", &user, &[]);
    world.idp.deny_device(&code, &user);
    let output = child.wait_with_output().unwrap();
    common::keep_proxy_log(&output.stderr);
    assert!(!output.status.success());
    assert!(text(&output).contains("access_denied"), "{}", text(&output));
    assert!(!dir.join("deny.json").exists());
}

#[test]
fn authorization_code_flow_with_pkce_and_a_pasted_redirect() {
    let world = oauth2();
    let _up = world.idp.shared();
    let user = servers().new_user("o2code");
    let dir = store_dir("code");
    let (mut child, url) = start_code_flow(&dir, "code", &user);
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    let redirected = world.idp.approve_authorization(&url, &user);
    assert!(redirected.contains("code="), "{redirected}");
    writeln!(child.stdin.as_mut().unwrap(), "{redirected}").unwrap();
    let output = child.wait_with_output().unwrap();
    common::keep_proxy_log(&output.stderr);
    no_token_in(&output);
    assert!(output.status.success(), "{}", text(&output));
    let access = stored_token(&dir, "code", "access_token").unwrap();
    assert!(world.idp.is_active(&access));
    assert!(stored_token(&dir, "code", "refresh_token").is_some());
    assert!(stored(&dir, "code").contains("\"flow\": \"code\""));
}

#[test]
fn a_redirect_from_another_sign_in_is_refused() {
    let world = oauth2();
    let _up = world.idp.shared();
    let user = servers().new_user("o2state");
    let dir = store_dir("state");
    let (mut child, url) = start_code_flow(&dir, "state", &user);
    let redirected = world.idp.approve_authorization(&url, &user);
    let forged = redirected.replace("state=", "state=x");
    writeln!(child.stdin.as_mut().unwrap(), "{forged}").unwrap();
    let output = child.wait_with_output().unwrap();
    common::keep_proxy_log(&output.stderr);
    assert!(!output.status.success());
    assert!(text(&output).contains("state differs"), "{}", text(&output));
    assert!(!dir.join("state.json").exists());
}

#[test]
fn client_credentials_fetch_a_token_at_once_and_again_when_due() {
    let world = oauth2();
    let _up = world.idp.shared();
    let dir = store_dir("cc");
    let secret_file = world.idp.client_secret_file.display().to_string();
    let mut cmd = admin(
        "authorize",
        &dir,
        &[
            "app",
            "--provider",
            "custom",
            "--token-url",
            &world.idp.token_endpoint,
            "--flow",
            "client-credentials",
            "--client-id",
            CONFIDENTIAL_CLIENT_ID,
            "--client-secret-file",
            &secret_file,
            "--scope",
            "mail",
            "--user",
            &world.app_mailbox.name,
        ],
    );
    cmd.stdin(Stdio::null());
    let output = run(cmd);
    assert!(output.status.success(), "{}", text(&output));
    let body = stored(&dir, "app");
    assert!(
        !body.contains(&world.idp.client_secret()),
        "the secret is never stored"
    );
    assert_eq!(stored_token(&dir, "app", "refresh_token"), None);
    let first = stored_token(&dir, "app", "access_token").unwrap();
    assert!(world.idp.is_active(&first));

    expire(&dir, "app");
    let mut source = StoredAccount::open(&dir, "app", tls(), timeouts()).unwrap();
    assert_eq!(source.user(), world.app_mailbox.name);
    let second = source.token().unwrap();
    assert_ne!(second.secret(), first);
    assert!(world.idp.is_active(second.secret()));
}

#[test]
fn a_revoked_grant_is_reported_by_refresh_and_status() {
    let world = oauth2();
    let _up = world.idp.shared();
    let user = servers().new_user("o2rev");
    let dir = store_dir("revoked");
    authorize_device(&dir, "rev", &user, &[]);
    let refresh = stored_token(&dir, "rev", "refresh_token").unwrap();
    assert_eq!(world.idp.revoke(PUBLIC_CLIENT_ID, &refresh), 200);

    let out = run(admin("refresh", &dir, &["rev"]));
    assert!(!out.status.success());
    let shown = text(&out);
    assert!(shown.contains("invalid_grant"), "{shown}");
    assert!(shown.contains("oauth2 authorize rev"), "{shown}");

    expire(&dir, "rev");
    let mut source = StoredAccount::open(&dir, "rev", tls(), timeouts()).unwrap();
    assert!(matches!(source.token(), Err(TokenError::Revoked(_))));

    let status = run(admin("status", &dir, &["rev"]));
    assert!(!status.status.success());
    let shown = text(&status);
    assert!(
        shown.contains("last error:") && shown.contains("invalid_grant"),
        "{shown}"
    );
}

#[test]
fn the_authorization_server_down_leaves_the_valid_token_in_use() {
    let world = oauth2();
    let user = servers().new_user("o2down");
    let dir = store_dir("down");
    {
        let _up = world.idp.shared();
        authorize_device(&dir, "down", &user, &[]);
    }
    let access = stored_token(&dir, "down", "access_token").unwrap();
    let refresh = stored_token(&dir, "down", "refresh_token").unwrap();
    let _alone = world.idp.exclusive();
    world.idp.stop();
    // Inside the refresh margin but not expired: a refresh is due, and fails.
    let store = Store::new(&dir);
    let mut data = store.read("down").unwrap();
    data.expires_at = Some(legacy_mail_proxy::oauth2::store::now() + 60);
    data.last_refresh = Some(1);
    store.write("down", &data).unwrap();
    let mut source = StoredAccount::open(&dir, "down", tls(), timeouts()).unwrap();
    let result = source.token();
    let status = run(admin("status", &dir, &["down"]));
    // Expired and still down: a temporary error, not a revoked grant.
    expire(&dir, "down");
    let expired = source.token();
    world.idp.start();

    assert_eq!(result.expect("the stored token").secret(), access);
    let shown = text(&status);
    assert!(
        shown.contains("last error:") && shown.contains("unavailable"),
        "{shown}"
    );
    assert!(
        matches!(expired, Err(TokenError::Unavailable(_))),
        "{expired:?}"
    );
    assert_eq!(
        stored_token(&dir, "down", "refresh_token").unwrap(),
        refresh,
        "the refresh token is kept"
    );
    // Back up: the next token() refreshes with the same refresh token.
    let fresh = source.token().unwrap();
    assert_ne!(fresh.secret(), access);
    assert!(world.idp.is_active(fresh.secret()));
}

#[test]
fn a_corrupted_token_file_is_reported_with_what_to_run() {
    let world = oauth2();
    let _up = world.idp.shared();
    let dir = store_dir("corrupt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bad.json"), "{\"user\": \"x\", \"access_tok").unwrap();
    let status = run(admin("status", &dir, &[]));
    assert!(!status.status.success());
    let shown = text(&status);
    assert!(
        shown.contains("corrupted") && shown.contains("oauth2 authorize bad"),
        "{shown}"
    );
    let out = run(admin("refresh", &dir, &["bad"]));
    assert!(!out.status.success());
    assert!(text(&out).contains("corrupted"), "{}", text(&out));
    assert!(matches!(
        StoredAccount::open(&dir, "bad", tls(), timeouts()),
        Err(TokenError::Broken(_))
    ));
}

#[test]
fn a_token_file_the_service_user_cannot_read_is_reported() {
    let world = oauth2();
    let _up = world.idp.shared();
    let user = servers().new_user("o2perm");
    let dir = store_dir("perm");
    authorize_device(&dir, "perm", &user, &[]);
    // Authorized as root and left root's: the service user (lmp-test) cannot read it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        MAIL_USER,
        "--regid",
        MAIL_USER,
        "--clear-groups",
        BIN,
        "--log",
        "stderr",
        "oauth2",
        "status",
        "perm",
        "--oauth2-dir",
    ])
    .arg(&dir);
    let out = run(cmd);
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(
        shown.contains("cannot read") && shown.contains("Permission denied"),
        "{shown}"
    );
    assert!(shown.contains("service user"), "{shown}");
}

/// The child side of [`twenty_processes_at_expiry_make_one_refresh`].
#[test]
#[ignore = "run by twenty_processes_at_expiry_make_one_refresh"]
fn child_gets_a_token() {
    let (Some(dir), Some(ca)) = (
        std::env::var_os("LMP_O2_CHILD_DIR"),
        std::env::var_os("LMP_O2_CHILD_CA"),
    ) else {
        return;
    };
    let tls = legacy_mail_proxy::tls::TlsOptions {
        ca_file: Some(ca.into()),
        danger_accept_invalid_certs: false,
    };
    let mut source = StoredAccount::open(Path::new(&dir), "many", tls, timeouts()).unwrap();
    let token = source.token().unwrap();
    // Compared, never shown: a hash of the token.
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    token.secret().hash(&mut hasher);
    println!("CHILD-TOKEN-HASH={:x}", hasher.finish());
}

#[test]
fn twenty_processes_at_expiry_make_one_refresh() {
    let world = oauth2();
    let user = servers().new_user("o2many");
    let dir = store_dir("many");
    {
        let _up = world.idp.shared();
        authorize_device(&dir, "many", &user, &[]);
    }
    let _alone = world.idp.exclusive();
    expire(&dir, "many");
    let before = world.idp.token_calls("refresh_token");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..20)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", "child_gets_a_token", "--ignored", "--nocapture"])
                .env("LMP_O2_CHILD_DIR", &dir)
                .env("LMP_O2_CHILD_CA", &world.idp.ca_file)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut hashes = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        common::keep_proxy_log(&out.stderr);
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let hash = stdout
            .lines()
            .find_map(|l| l.strip_prefix("CHILD-TOKEN-HASH="))
            .unwrap_or_else(|| panic!("no token: {stdout}"))
            .to_string();
        hashes.push(hash);
    }
    let refreshes = world.idp.token_calls("refresh_token") - before;
    assert_eq!(
        refreshes,
        1,
        "the authorization server's grant log:\n{}",
        world.idp.grant_log_text()
    );
    hashes.dedup();
    assert_eq!(hashes.len(), 1, "all 20 got the same token");
    let access = stored_token(&dir, "many", "access_token").unwrap();
    assert!(world.idp.is_active(&access));
    eprintln!(
        "grant log (last lines):\n{}",
        world
            .idp
            .grant_log_text()
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
