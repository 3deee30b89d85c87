//! The OAuth2 world: a real OAuth 2.0 / OpenID Connect authorization server (`oidc-provider`
//! from npm on Node.js, configured by `tests/oauth2/idp.mjs`) over HTTPS with the harness's
//! CA, a second Dovecot whose `oauth2` passdb accepts its access tokens (token introspection,
//! RFC 7662) for IMAP AUTHENTICATE XOAUTH2 / OAUTHBEARER (RFC 7628), and a second Postfix
//! whose submission ports take the same tokens through that Dovecot's SASL.
//!
//! Started on the first call of [`oauth2()`], once per test binary, beside the password
//! world of [`servers()`] (same directory, CA, mail user and accounts: a user made with
//! [`Servers::new_user`] can log in to either Dovecot, and both serve the same Maildirs).
//! Tests that never call it pay nothing, and the password world's capabilities stay as
//! they were.
//!
//! The authorization server can be stopped and started again ([`Idp::stop`],
//! [`Idp::start`]) on the same port with the same state, for "authorization server down"
//! tests; such a test holds [`Idp::exclusive`] and the others [`Idp::shared`]. Its grant
//! log ([`Idp::grant_log`]) has one line per token-endpoint call (and per device
//! authorization, introspection and revocation call), without token values.
//! Access tokens live `LMP_TEST_IDP_ACCESS_TTL` seconds (default [`DEFAULT_ACCESS_TTL`]), so
//! that tests see them expire.
//!
//! Approvals are done the way an admin does them in a browser, by `tests/oauth2/browser.py`
//! over HTTPS: [`Idp::approve_device`], [`Idp::approve_authorization`].

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::dovecot::{accounts, pop3_lmtp_auth_services};
use super::postfix::{Postfix, start_instance};
use super::process::{ServerProcess, address_in_use, start_on_free_ports};
use super::{INSTALL_HINT, MAIL_USER, Servers, User, find_binary, servers};

/// Access-token lifetime in the tests, in seconds: short, so that expiry and refresh happen
/// during the suite. `LMP_TEST_IDP_ACCESS_TTL` overrides it.
pub const DEFAULT_ACCESS_TTL: u64 = 8;

/// The public client (no secret, PKCE): device flow, authorization code, refresh.
pub const PUBLIC_CLIENT_ID: &str = "lmp-public";
/// The confidential client (secret in [`Idp::client_secret_file`]): the same user flows,
/// plus client credentials for the app mailbox.
pub const CONFIDENTIAL_CLIENT_ID: &str = "lmp-confidential";
/// The client Dovecot introspects tokens with.
pub const INTROSPECTION_CLIENT_ID: &str = "dovecot";
/// The redirect URI both user-flow clients are registered with. Nothing listens there:
/// the admin pastes the URL the browser was sent to.
pub const REDIRECT_URI: &str = "http://127.0.0.1/callback";
/// The scopes a gateway asks for: `offline_access` (refresh tokens are issued for every
/// user flow anyway) and `mail`.
pub const SCOPES: &str = "openid offline_access mail";

/// The authorization server: facts and controls.
pub struct Idp {
    /// `https://127.0.0.1:PORT`; discovery at `/.well-known/openid-configuration`.
    pub issuer: String,
    pub port: u16,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub device_authorization_endpoint: String,
    /// The page where the user enters a device `user_code`.
    pub device_verification_uri: String,
    pub introspection_endpoint: String,
    pub revocation_endpoint: String,
    /// The harness CA (PEM) that signed the server certificate, the same as the mail servers'.
    pub ca_file: PathBuf,
    /// The confidential client's secret, one line, mode 0600.
    pub client_secret_file: PathBuf,
    /// Access-token lifetime in seconds.
    pub access_ttl: u64,
    /// JSON lines, see [`GrantLogEntry`].
    pub grant_log_file: PathBuf,
    dir: PathBuf,
    argv: Vec<String>,
    runs: Mutex<(u32, Option<ServerProcess>)>,
    availability: RwLock<()>,
}

/// The OAuth2-enabled mail servers and their authorization server.
pub struct OAuth2World {
    pub idp: Idp,
    /// "127.0.0.1".
    pub host: &'static str,
    /// IMAP, STARTTLS offered; AUTH=XOAUTH2 AUTH=OAUTHBEARER (and PLAIN, LOGIN) with SASL-IR.
    pub imap_port: u16,
    /// IMAP over implicit TLS, same mechanisms.
    pub imaps_port: u16,
    /// POP3 (passwords; AUTH offers the same SASL mechanisms as IMAP).
    pub pop3_port: u16,
    /// The Postfix submission ports: implicit TLS and STARTTLS, AUTH XOAUTH2 OAUTHBEARER
    /// PLAIN LOGIN after TLS, delivering `@example.test` into the same Maildirs.
    pub postfix: Postfix,
    /// The mailbox the client-credentials app may open (its tokens carry this user name),
    /// like an Entra ID application access policy restricted to one mailbox.
    pub app_mailbox: User,
    pub dovecot_conf: PathBuf,
    dovecot: ServerProcess,
}

/// One line of the grant log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantLogEntry {
    /// "token", "device_authorization", "introspection" or "revocation".
    pub endpoint: String,
    /// The token request's grant_type ("refresh_token", "client_credentials",
    /// "authorization_code", "urn:ietf:params:oauth:grant-type:device_code"), else "".
    pub grant_type: String,
    /// The authenticated client id, "" if none.
    pub client: String,
    /// "ok" or the OAuth error code ("invalid_grant", "authorization_pending", …).
    pub outcome: String,
    /// The whole line, for messages.
    pub line: String,
}

/// A token endpoint answer. Debug never shows token values.
pub struct TokenResponse {
    pub status: u16,
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
    pub expires_in: Option<u64>,
    /// The OAuth error code of a refused request.
    pub error: Option<String>,
    pub body: String,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("status", &self.status)
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires_in", &self.expires_in)
            .field("error", &self.error)
            .finish()
    }
}

impl TokenResponse {
    /// The access token of a successful answer; panics (without the token) otherwise.
    pub fn access(&self) -> &str {
        match &self.access_token {
            Some(t) if self.status == 200 => t,
            _ => panic!("the token request failed: {self:?} {}", self.error_text()),
        }
    }

    /// The refresh token of a successful answer; panics otherwise.
    pub fn refresh(&self) -> &str {
        match &self.refresh_token {
            Some(t) if self.status == 200 => t,
            _ => panic!("no refresh token in the answer: {self:?}"),
        }
    }

    fn error_text(&self) -> &str {
        if self.status == 200 { "" } else { &self.body }
    }
}

static WORLD: OnceLock<Result<OAuth2World, String>> = OnceLock::new();

/// The process-wide OAuth2 world, started on first call (after [`servers()`]). Panics
/// (never skips) with the logs or the install command if it cannot run.
pub fn oauth2() -> &'static OAuth2World {
    let s = servers();
    match WORLD.get_or_init(|| start(s)) {
        Ok(w) => w,
        Err(e) => panic!("OAuth2 test servers could not be started: {e}"),
    }
}

/// The repository's `tests/oauth2` (idp.mjs, browser.py, package.json, package-lock.json).
pub fn oauth2_source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("oauth2")
}

/// Where tests/setup.sh installs oidc-provider with `npm ci`: a directory named after the
/// hash of package.json and package-lock.json under `LMP_IDP_CACHE` (default
/// /var/cache/legacy-mail-proxy-test), shared by every checkout. Keep in sync with setup.sh.
pub fn idp_modules_dir() -> Result<PathBuf, String> {
    let src = oauth2_source_dir();
    let out = Command::new("sh")
        .arg("-c")
        .arg("cat package.json package-lock.json | sha256sum")
        .current_dir(&src)
        .output()
        .map_err(|e| format!("cannot run sha256sum: {e}"))?;
    let hash = String::from_utf8_lossy(&out.stdout);
    let hash = hash
        .get(..16)
        .filter(|_| out.status.success())
        .ok_or_else(|| {
            format!(
                "cannot hash {}/package-lock.json: {}",
                src.display(),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let cache = std::env::var("LMP_IDP_CACHE")
        .unwrap_or_else(|_| "/var/cache/legacy-mail-proxy-test".to_string());
    let modules = Path::new(&cache)
        .join(format!("idp-{hash}"))
        .join("node_modules");
    if modules.join(".lmp-installed").exists() {
        Ok(modules)
    } else {
        Err(format!(
            "oidc-provider (the tests' OAuth2 authorization server, from npm) is not installed \
             in {}. Run `sudo bash tests/setup.sh`, which installs Node.js if needed and \
             runs `npm ci` for tests/oauth2/package-lock.json there. {INSTALL_HINT}",
            modules.display()
        ))
    }
}

fn access_ttl() -> u64 {
    std::env::var("LMP_TEST_IDP_ACCESS_TTL")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(DEFAULT_ACCESS_TTL)
}

fn random_secret() -> String {
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))
}

fn start(s: &Servers) -> Result<OAuth2World, String> {
    let node = find_binary("node").map_err(|_| {
        format!(
            "`node` (Node.js) is not installed; the tests' OAuth2 authorization server runs on \
             it. Install it with:\n  apt-get install -y --no-install-recommends nodejs npm\n\
             then run `sudo bash tests/setup.sh` (npm ci of oidc-provider). {INSTALL_HINT}"
        )
    })?;
    find_binary("curl")?;
    let modules = idp_modules_dir()?;
    let dir = s.dir.join("oauth2");
    let secrets = dir.join("secrets");
    for d in [&dir, &secrets, &dir.join("idp-state")] {
        mkdir(d)?;
    }
    fs::set_permissions(&secrets, fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
    let client_secret_file = secrets.join(CONFIDENTIAL_CLIENT_ID);
    write_private(&client_secret_file, &format!("{}\n", random_secret()))?;
    let introspection_secret = random_secret();
    write_private(
        &secrets.join(INTROSPECTION_CLIENT_ID),
        &format!("{introspection_secret}\n"),
    )?;
    let app_mailbox = s.new_user("oauth2-app");

    let idp = start_idp(s, &dir, &node, &modules, &client_secret_file, &app_mailbox)?;
    let (dovecot, dovecot_conf, ports) = start_dovecot(s, &dir, &idp, &introspection_secret)?;
    let base = dir.join("dovecot");
    let postfix = start_instance(
        s,
        "postfix-oauth2",
        &base.join("lmtp"),
        &base.join("auth-postfix"),
    )?;
    Ok(OAuth2World {
        idp,
        host: "127.0.0.1",
        imap_port: ports[0],
        imaps_port: ports[1],
        pop3_port: ports[2],
        postfix,
        app_mailbox,
        dovecot_conf,
        dovecot,
    })
}

fn start_idp(
    s: &Servers,
    dir: &Path,
    node: &Path,
    modules: &Path,
    client_secret_file: &Path,
    app_mailbox: &User,
) -> Result<Idp, String> {
    let ttl = access_ttl();
    let grant_log_file = s.dir.join("log").join("idp-grants.log");
    fs::write(&grant_log_file, "").map_err(|e| format!("create grant log: {e}"))?;
    // node reports a taken port as EADDRINUSE.
    start_on_free_ports(
        1,
        |e| e.contains("EADDRINUSE"),
        |ports| {
            let port = ports[0];
            let issuer = format!("https://127.0.0.1:{port}");
            // No secret is on this command line: the secrets are files.
            let argv: Vec<String> = [
                "env".to_string(),
                format!("LMP_IDP_MODULES={}", modules.display()),
                format!("LMP_IDP_PORT={port}"),
                format!("LMP_IDP_CERT={}", s.tls.server_cert.display()),
                format!("LMP_IDP_KEY={}", s.tls.server_key.display()),
                format!("LMP_IDP_STATE_DIR={}", dir.join("idp-state").display()),
                format!("LMP_IDP_ACCOUNTS_DIR={}", s.passwd_dir.display()),
                format!("LMP_IDP_GRANT_LOG={}", grant_log_file.display()),
                format!("LMP_IDP_SECRETS_DIR={}", dir.join("secrets").display()),
                format!("LMP_IDP_APP_MAILBOX={}", app_mailbox.name),
                format!("LMP_IDP_ACCESS_TTL={ttl}"),
                node.display().to_string(),
                oauth2_source_dir().join("idp.mjs").display().to_string(),
                // Unused by the script: puts the test directory into node's command line, which
                // is how remove_stale_dirs() recognises a server left over from a killed run.
                dir.display().to_string(),
            ]
            .into();
            let idp = Idp {
                authorization_endpoint: format!("{issuer}/auth"),
                token_endpoint: format!("{issuer}/token"),
                device_authorization_endpoint: format!("{issuer}/device/auth"),
                device_verification_uri: format!("{issuer}/device"),
                introspection_endpoint: format!("{issuer}/token/introspection"),
                revocation_endpoint: format!("{issuer}/token/revocation"),
                issuer,
                port,
                ca_file: s.ca_file.clone(),
                client_secret_file: client_secret_file.to_path_buf(),
                access_ttl: ttl,
                grant_log_file: grant_log_file.clone(),
                dir: s.dir.clone(),
                argv,
                runs: Mutex::new((0, None)),
                availability: RwLock::new(()),
            };
            idp.try_start()?;
            Ok(idp)
        },
    )
}

impl Idp {
    fn try_start(&self) -> Result<(), String> {
        let mut runs = self.runs.lock().unwrap();
        if runs.1.as_ref().is_some_and(|p| p.exited().is_none()) {
            return Ok(());
        }
        runs.0 += 1;
        let argv: Vec<&dyn AsRef<std::ffi::OsStr>> = self
            .argv
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        let process = ServerProcess::spawn(&self.dir, &format!("idp-{}", runs.0), &argv, vec![])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        process.wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            None,
            deadline,
        )?;
        runs.1 = Some(process);
        Ok(())
    }

    /// Held by a test that needs the authorization server up throughout: tests in the same
    /// binary run in parallel, and one that stops the server holds [`Idp::exclusive`].
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.availability.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by a test that stops (or restarts) the authorization server, so that no test
    /// holding [`Idp::shared`] runs meanwhile. Start it again before dropping the guard.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.availability.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the authorization server again after [`Idp::stop`] (same port, same state:
    /// every token issued before is still valid). Returns once it accepts connections.
    pub fn start(&self) {
        if let Err(e) = self.try_start() {
            panic!("the authorization server did not start again: {e}");
        }
    }

    /// Stops the authorization server (its whole process group) and returns once it is gone:
    /// connections to its port are then refused.
    pub fn stop(&self) {
        if let Some(p) = self.runs.lock().unwrap().1.take() {
            p.stop();
        }
    }

    /// Stop and start.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// Pid (and process group id) of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.runs.lock().unwrap().1.as_ref().map(|p| p.pid)
    }

    pub fn is_running(&self) -> bool {
        self.runs
            .lock()
            .unwrap()
            .1
            .as_ref()
            .is_some_and(|p| p.exited().is_none())
    }

    /// The server's stdout/stderr (all runs so far), for assertion messages.
    pub fn logs(&self) -> String {
        let runs = self.runs.lock().unwrap();
        let mut out = String::new();
        for n in 1..=runs.0 {
            for ext in ["stdout", "stderr"] {
                let f = self.dir.join("log").join(format!("idp-{n}.{ext}"));
                let text = fs::read_to_string(&f).unwrap_or_default();
                out.push_str(&format!("----- {} -----\n{text}", f.display()));
            }
        }
        out
    }

    /// The confidential client's secret.
    pub fn client_secret(&self) -> String {
        fs::read_to_string(&self.client_secret_file)
            .expect("read the client secret file")
            .trim()
            .to_string()
    }

    /// Every grant log line so far, parsed.
    pub fn grant_log(&self) -> Vec<GrantLogEntry> {
        fs::read_to_string(&self.grant_log_file)
            .unwrap_or_default()
            .lines()
            .map(|line| GrantLogEntry {
                endpoint: json_str(line, "endpoint").unwrap_or_default(),
                grant_type: json_str(line, "grant_type").unwrap_or_default(),
                client: json_str(line, "client").unwrap_or_default(),
                outcome: json_str(line, "outcome").unwrap_or_default(),
                line: line.to_string(),
            })
            .collect()
    }

    /// The raw grant log, to show in test output.
    pub fn grant_log_text(&self) -> String {
        fs::read_to_string(&self.grant_log_file).unwrap_or_default()
    }

    /// Number of token-endpoint calls with this grant_type so far (any outcome).
    pub fn token_calls(&self, grant_type: &str) -> usize {
        self.grant_log()
            .iter()
            .filter(|e| e.endpoint == "token" && e.grant_type == grant_type)
            .count()
    }

    /// Approves a device code (RFC 8628) as `user`, the way an admin does it in a browser:
    /// the verification page, the code, the confirmation, the sign-in.
    pub fn approve_device(&self, user_code: &str, user: &User) {
        self.browser(
            &["device", &self.issuer, user_code, &user.name],
            user,
            false,
        );
    }

    /// Like [`Idp::approve_device`], but the user presses "Deny" at the sign-in page.
    pub fn deny_device(&self, user_code: &str, user: &User) {
        self.browser(&["device", &self.issuer, user_code, &user.name], user, true);
    }

    /// Opens `authorization_url` (built by the client under test), signs in as `user`,
    /// and returns the URL the browser was redirected to: the redirect URI with `code`
    /// and `state` (or `error`), which the admin pastes back into the gateway.
    pub fn approve_authorization(&self, authorization_url: &str, user: &User) -> String {
        self.browser(
            &["authorize", &self.issuer, authorization_url, &user.name],
            user,
            false,
        )
    }

    /// Like [`Idp::approve_authorization`], but the user denies: the URL carries
    /// `error=access_denied`.
    pub fn deny_authorization(&self, authorization_url: &str, user: &User) -> String {
        self.browser(
            &["authorize", &self.issuer, authorization_url, &user.name],
            user,
            true,
        )
    }

    fn browser(&self, args: &[&str], user: &User, deny: bool) -> String {
        let python = super::require_client("python3");
        let mut cmd = Command::new(python);
        cmd.arg(oauth2_source_dir().join("browser.py"))
            .args(args)
            .env("LMP_IDP_CA", &self.ca_file)
            .env("LMP_IDP_PASSWORD", &user.password)
            .env("PYTHONDONTWRITEBYTECODE", "1");
        if deny {
            cmd.env("LMP_IDP_DENY", "1");
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
        assert!(
            out.status.success(),
            "the scripted browser failed ({}): {}\n{}",
            args[0],
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// POSTs a form to `url` with curl (client authentication with HTTP Basic when
    /// `client_secret` is given). Everything, secrets and tokens included, goes to curl on
    /// stdin, never on its command line. Returns (HTTP status, body); status 0 with curl's
    /// error when there was no HTTP answer (e.g. the server is down).
    pub fn post_form(
        &self,
        url: &str,
        client_id: Option<&str>,
        client_secret: Option<&str>,
        form: &[(&str, &str)],
    ) -> (u16, String) {
        let mut config = format!(
            "url = \"{url}\"\ncacert = \"{}\"\nwrite-out = \"\\n%{{http_code}}\"\n",
            self.ca_file.display()
        );
        if let (Some(id), Some(secret)) = (client_id, client_secret) {
            config.push_str(&format!("user = \"{id}:{secret}\"\n"));
        } else if let Some(id) = client_id {
            config.push_str(&format!("data-urlencode = \"client_id={id}\"\n"));
        }
        for (k, v) in form {
            config.push_str(&format!("data-urlencode = \"{k}={v}\"\n"));
        }
        let out = curl(&config);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        match status.trim().parse() {
            Ok(status) if status != 0 => (status, body.to_string()),
            _ => (0, String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    /// A token request with `client_id`: the confidential client authenticates with its
    /// secret, the public one sends its id.
    pub fn token_request(&self, client_id: &str, form: &[(&str, &str)]) -> TokenResponse {
        let secret = (client_id == CONFIDENTIAL_CLIENT_ID).then(|| self.client_secret());
        let (status, body) = self.post_form(
            &self.token_endpoint,
            Some(client_id),
            secret.as_deref(),
            form,
        );
        TokenResponse {
            status,
            access_token: json_str(&body, "access_token"),
            refresh_token: json_str(&body, "refresh_token"),
            expires_in: json_num(&body, "expires_in"),
            error: json_str(&body, "error"),
            body,
        }
    }

    /// Tokens for `user` through the device authorization grant, approved by the scripted
    /// browser: a quick way for tests to get real user tokens without the gateway.
    pub fn device_flow_tokens(&self, client_id: &str, user: &User) -> TokenResponse {
        let secret = (client_id == CONFIDENTIAL_CLIENT_ID).then(|| self.client_secret());
        let (status, body) = self.post_form(
            &self.device_authorization_endpoint,
            Some(client_id),
            secret.as_deref(),
            &[("scope", SCOPES)],
        );
        assert_eq!(status, 200, "device authorization failed: {body}");
        let device_code = json_str(&body, "device_code").expect("device_code");
        let user_code = json_str(&body, "user_code").expect("user_code");
        self.approve_device(&user_code, user);
        self.token_request(
            client_id,
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", &device_code),
            ],
        )
    }

    /// A client-credentials token for the app mailbox ([`OAuth2World::app_mailbox`]).
    pub fn client_credentials_token(&self) -> TokenResponse {
        self.token_request(
            CONFIDENTIAL_CLIENT_ID,
            &[("grant_type", "client_credentials"), ("scope", "mail")],
        )
    }

    /// The refresh_token grant.
    pub fn refresh(&self, client_id: &str, refresh_token: &str) -> TokenResponse {
        self.token_request(
            client_id,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ],
        )
    }

    /// Revokes a token at the revocation endpoint (RFC 7009) as `client_id`. Revoking a
    /// refresh token ends its whole grant: its access tokens stop working too. Returns the
    /// HTTP status (200 even for unknown tokens, as the RFC says).
    pub fn revoke(&self, client_id: &str, token: &str) -> u16 {
        let secret = (client_id == CONFIDENTIAL_CLIENT_ID).then(|| self.client_secret());
        self.post_form(
            &self.revocation_endpoint,
            Some(client_id),
            secret.as_deref(),
            &[("token", token)],
        )
        .0
    }

    /// Token introspection as Dovecot does it: whether the server calls `token` active.
    pub fn is_active(&self, token: &str) -> bool {
        let secret = fs::read_to_string(
            self.client_secret_file
                .with_file_name(INTROSPECTION_CLIENT_ID),
        )
        .expect("read the introspection secret");
        let (status, body) = self.post_form(
            &self.introspection_endpoint,
            Some(INTROSPECTION_CLIENT_ID),
            Some(secret.trim()),
            &[("token", token)],
        );
        assert_eq!(status, 200, "introspection failed: {body}");
        body.contains("\"active\":true")
    }
}

impl OAuth2World {
    /// The files under the test directory's `log/` (every server's log, stdout and stderr,
    /// the grant log) that contain `needle`: for "no token or secret in any log" checks.
    pub fn log_files_containing(&self, needle: &str) -> Vec<PathBuf> {
        let log_dir = self.idp.dir.join("log");
        let mut hits: Vec<PathBuf> = fs::read_dir(&log_dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", log_dir.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                fs::read(p).is_ok_and(|b| {
                    b.windows(needle.len().max(1))
                        .any(|w| w == needle.as_bytes())
                })
            })
            .collect();
        hits.sort();
        hits
    }

    /// The secrets the servers hold (the confidential client's and Dovecot's introspection
    /// secret), for the same checks.
    pub fn secrets(&self) -> Vec<String> {
        [CONFIDENTIAL_CLIENT_ID, INTROSPECTION_CLIENT_ID]
            .iter()
            .map(|id| {
                fs::read_to_string(self.idp.client_secret_file.with_file_name(id))
                    .expect("read a client secret")
                    .trim()
                    .to_string()
            })
            .collect()
    }

    /// The OAuth2 Dovecot's log and stdout/stderr so far.
    pub fn dovecot_logs(&self) -> String {
        self.dovecot.logs()
    }

    /// Pid (and process group id) of the OAuth2 Dovecot.
    pub fn dovecot_pid(&self) -> u32 {
        self.dovecot.pid
    }

    /// Environment for scripts and the demo: LMP_OAUTH2_ISSUER, LMP_OAUTH2_TOKEN_ENDPOINT,
    /// LMP_OAUTH2_AUTHORIZATION_ENDPOINT, LMP_OAUTH2_DEVICE_ENDPOINT, LMP_OAUTH2_CA_FILE,
    /// LMP_OAUTH2_PUBLIC_CLIENT, LMP_OAUTH2_CONFIDENTIAL_CLIENT, LMP_OAUTH2_SECRET_FILE,
    /// LMP_OAUTH2_IMAP_PORT, LMP_OAUTH2_IMAPS_PORT, LMP_OAUTH2_POP3_PORT,
    /// LMP_OAUTH2_SUBMISSIONS_PORT, LMP_OAUTH2_SUBMISSION_PORT.
    pub fn env(&self) -> Vec<(String, String)> {
        let i = &self.idp;
        [
            ("LMP_OAUTH2_ISSUER", i.issuer.clone()),
            ("LMP_OAUTH2_TOKEN_ENDPOINT", i.token_endpoint.clone()),
            (
                "LMP_OAUTH2_AUTHORIZATION_ENDPOINT",
                i.authorization_endpoint.clone(),
            ),
            (
                "LMP_OAUTH2_DEVICE_ENDPOINT",
                i.device_authorization_endpoint.clone(),
            ),
            ("LMP_OAUTH2_CA_FILE", i.ca_file.display().to_string()),
            ("LMP_OAUTH2_PUBLIC_CLIENT", PUBLIC_CLIENT_ID.to_string()),
            (
                "LMP_OAUTH2_CONFIDENTIAL_CLIENT",
                CONFIDENTIAL_CLIENT_ID.to_string(),
            ),
            (
                "LMP_OAUTH2_SECRET_FILE",
                i.client_secret_file.display().to_string(),
            ),
            ("LMP_OAUTH2_IMAP_PORT", self.imap_port.to_string()),
            ("LMP_OAUTH2_IMAPS_PORT", self.imaps_port.to_string()),
            ("LMP_OAUTH2_POP3_PORT", self.pop3_port.to_string()),
            (
                "LMP_OAUTH2_SUBMISSIONS_PORT",
                self.postfix.submissions_port.to_string(),
            ),
            (
                "LMP_OAUTH2_SUBMISSION_PORT",
                self.postfix.submission_port.to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Runs curl with `config` (curl's config-file syntax: one `option = "value"` per line) on
/// its stdin, so that tokens and secrets never appear on a command line. `silent` and
/// `show-error` are added.
pub fn curl(config: &str) -> std::process::Output {
    let curl = super::require_client("curl");
    let mut child = Command::new(curl)
        .args(["--silent", "--show-error", "--config", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run curl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.as_bytes())
        .unwrap();
    child.wait_with_output().expect("wait for curl")
}

/// The value of `"key":"value"` in a flat JSON object as idp.mjs and oidc-provider write
/// them (no spaces; token values, codes, ids and error codes never hold quotes or escapes).
pub fn json_str(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_string())
}

/// The value of `"key":123` in such a JSON object.
pub fn json_num(json: &str, key: &str) -> Option<u64> {
    let start = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = json[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Seconds since the epoch, for comparing with token expiry.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The Dovecot configuration: the password world's choices (see dovecot.rs), plus an
/// `oauth2` passdb for XOAUTH2/OAUTHBEARER that introspects each token at the authorization
/// server over HTTPS, trusting the harness CA. The auth cache stays off
/// (`auth_cache_size = 0`), so an expired or revoked token is refused at once instead of
/// being remembered as good.
fn dovecot_config(s: &Servers, dir: &Path, ports: &[u16], oauth2_ext: &Path) -> String {
    let base = dir.join("dovecot");
    let state = dir.join("dovecot-state");
    let log = s.dir.join("log").join("dovecot-oauth2.log");
    format!(
        r#"# Generated by tests/common/oauth2.rs
base_dir = {base}
state_dir = {state}
instance_name = lmp-test-oauth2-{pid}
protocols = imap pop3 lmtp
listen = 127.0.0.1
log_path = {log}
auth_verbose = yes
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_dh = </usr/share/dovecot/dh.pem
auth_mechanisms = plain login xoauth2 oauthbearer
auth_cache_size = 0
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2_ext}
}}
{accounts}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
    ssl = yes
  }}
}}
{services}
"#,
        base = base.display(),
        state = state.display(),
        pid = std::process::id(),
        log = log.display(),
        cert = s.tls.server_cert.display(),
        key = s.tls.server_key.display(),
        oauth2_ext = oauth2_ext.display(),
        imap = ports[0],
        imaps = ports[1],
        accounts = accounts(&s.dir, &s.passwd_dir, MAIL_USER),
        services = pop3_lmtp_auth_services(ports[2], 0),
    )
}

/// Dovecot 2.3.19's oauth2 passdb settings (checked here): `introspection_mode = post`
/// sends `token=…` with HTTP Basic client authentication taken from the URL's user info;
/// `username_attribute = username` is the claim idp.mjs puts into access tokens only (so a
/// refresh token, which introspection also calls active, is refused); `active_attribute`
/// makes an expired or revoked token (`"active":false`) fail. Mode 0600: it holds the
/// introspection secret (the auth process reads it as root).
fn dovecot_oauth2_ext(idp: &Idp, introspection_secret: &str) -> String {
    format!(
        "# Generated by tests/common/oauth2.rs
introspection_mode = post
introspection_url = https://{INTROSPECTION_CLIENT_ID}:{introspection_secret}@127.0.0.1:{port}/token/introspection
force_introspection = yes
username_attribute = username
active_attribute = active
active_value = true
tls_ca_cert_file = {ca}
timeout_msecs = 5000
",
        port = idp.port,
        ca = idp.ca_file.display(),
    )
}

fn start_dovecot(
    s: &Servers,
    dir: &Path,
    idp: &Idp,
    introspection_secret: &str,
) -> Result<(ServerProcess, PathBuf, Vec<u16>), String> {
    let dovecot_bin = find_binary("dovecot")?;
    for d in ["dovecot", "dovecot-state"] {
        mkdir(&dir.join(d))?;
    }
    let ext = dir.join("dovecot-oauth2.conf.ext");
    write_private(&ext, &dovecot_oauth2_ext(idp, introspection_secret))?;
    let conf = dir.join("dovecot.conf");
    let log = s.dir.join("log").join("dovecot-oauth2.log");
    start_on_free_ports(3, address_in_use, |ports| {
        fs::write(&conf, dovecot_config(s, dir, ports, &ext))
            .map_err(|e| format!("write {}: {e}", conf.display()))?;
        let server = ServerProcess::spawn(
            &s.dir,
            "dovecot-oauth2",
            &[&dovecot_bin, &"-F", &"-c", &conf],
            vec![log.clone()],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        server.wait_for_port(local(ports[0]), Some("* OK"), deadline)?;
        server.wait_for_port(local(ports[2]), Some("+OK"), deadline)?;
        server.wait_for_port(local(ports[1]), None, deadline)?;
        server.wait_for_path(&dir.join("dovecot").join("lmtp"), deadline)?;
        server.wait_for_path(&dir.join("dovecot").join("auth-postfix"), deadline)?;
        Ok((server, conf.clone(), ports.to_vec()))
    })
}
