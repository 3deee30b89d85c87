// The OAuth 2.0 / OpenID Connect authorization server of the tests and the demo: the real
// `oidc-provider` package (panva, pinned in package.json / package-lock.json next to this
// file) on Node.js, over HTTPS on 127.0.0.1 with a certificate from the harness's private CA.
// This file only configures it; every grant, token, rotation and introspection is the
// library's own code. Started by tests/common/oauth2.rs; see README "OAuth2 test/demo servers".
//
// What it serves (oidc-provider's default paths under the issuer https://127.0.0.1:PORT):
// - device authorization grant (RFC 8628): /device/auth, user page /device;
// - authorization code + PKCE: /auth, redirect URI http://127.0.0.1/callback;
// - client credentials (confidential client);
// - refresh_token grant with ROTATING refresh tokens (a used refresh token is refused);
// - token introspection (RFC 7662, used by Dovecot) and revocation (RFC 7009).
// Accounts are the test mail users: a login is accepted when the Dovecot passwd-file
// LMP_IDP_ACCOUNTS_DIR/<login> exists and holds the given {PLAIN} password.
// State (grants, tokens, signing keys) lives in LMP_IDP_STATE_DIR, so a restart (the
// "authorization server down and back" tests) keeps every issued token valid.
// Every call of the token, device authorization, introspection and revocation endpoints
// appends one JSON line to LMP_IDP_GRANT_LOG: never a token value, code or secret.
//
// Environment (all set by the harness or the demo):
//   LMP_IDP_MODULES        node_modules directory holding oidc-provider (the npm ci cache)
//   LMP_IDP_PORT           port on 127.0.0.1
//   LMP_IDP_CERT/KEY       PEM certificate chain and key
//   LMP_IDP_STATE_DIR      persistent state
//   LMP_IDP_ACCOUNTS_DIR   Dovecot passwd-file directory (one file per user)
//   LMP_IDP_GRANT_LOG      grant log file (JSON lines)
//   LMP_IDP_SECRETS_DIR    client secrets, one file per confidential client id
//   LMP_IDP_APP_MAILBOX    the one mailbox the client-credentials app may open
//   LMP_IDP_ACCESS_TTL     access token lifetime in seconds (default 3600)
//   LMP_IDP_REFRESH_TTL    refresh token lifetime in seconds (default 14 days)

import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import crypto from 'node:crypto';
import { pathToFileURL } from 'node:url';

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) {
    console.error(`idp: ${name} is not set`);
    process.exit(2);
  }
  return value;
};

const modules = env('LMP_IDP_MODULES');
const { default: Provider, errors } = await import(
  pathToFileURL(path.join(modules, 'oidc-provider', 'lib', 'index.js')).href
);

const port = Number(env('LMP_IDP_PORT'));
const issuer = `https://127.0.0.1:${port}`;
const stateDir = env('LMP_IDP_STATE_DIR');
const accountsDir = env('LMP_IDP_ACCOUNTS_DIR');
const grantLog = env('LMP_IDP_GRANT_LOG');
const secretsDir = env('LMP_IDP_SECRETS_DIR');
const appMailbox = env('LMP_IDP_APP_MAILBOX', '');
const accessTtl = Number(env('LMP_IDP_ACCESS_TTL', '3600'));
const refreshTtl = Number(env('LMP_IDP_REFRESH_TTL', String(14 * 24 * 3600)));

// The client ids are fixed so that the harness, the demo and the README can name them.
const PUBLIC_CLIENT = 'lmp-public';
const CONFIDENTIAL_CLIENT = 'lmp-confidential';
const INTROSPECTION_CLIENT = 'dovecot';
const REDIRECT_URI = 'http://127.0.0.1/callback';
const USER_GRANTS = [
  'authorization_code',
  'refresh_token',
  'urn:ietf:params:oauth:grant-type:device_code',
];

const secret = (clientId) =>
  fs.readFileSync(path.join(secretsDir, clientId), 'utf8').trim();

// ---------------------------------------------------------------------------------------
// Persistent storage: oidc-provider's adapter interface over one JSON file, rewritten
// atomically (temp file + rename) on each change. Small and slow, which is fine here.
const stateFile = path.join(stateDir, 'state.json');
const store = fs.existsSync(stateFile)
  ? JSON.parse(fs.readFileSync(stateFile, 'utf8'))
  : {};
const now = () => Math.floor(Date.now() / 1000);
// Rewrites the whole file, dropping what has expired, so it stays small during a long run.
const save = () => {
  for (const items of Object.values(store)) {
    for (const [id, entry] of Object.entries(items)) {
      if (entry.expiresAt !== null && entry.expiresAt <= now()) delete items[id];
    }
  }
  const tmp = `${stateFile}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(store), { mode: 0o600 });
  fs.renameSync(tmp, stateFile);
};

class FileAdapter {
  constructor(model) {
    this.model = model;
    store[model] ??= {};
    this.items = store[model];
  }

  async upsert(id, payload, expiresIn) {
    this.items[id] = { payload, expiresAt: expiresIn ? now() + expiresIn : null };
    save();
  }

  live(entry) {
    return entry && (entry.expiresAt === null || entry.expiresAt > now()) ? entry.payload : undefined;
  }

  async find(id) {
    return this.live(this.items[id]);
  }

  async findBy(field, value) {
    const entry = Object.values(this.items).find((e) => e.payload[field] === value);
    return this.live(entry);
  }

  async findByUserCode(userCode) {
    return this.findBy('userCode', userCode);
  }

  async findByUid(uid) {
    return this.findBy('uid', uid);
  }

  async consume(id) {
    if (this.items[id]) {
      this.items[id].payload.consumed = now();
      save();
    }
  }

  async destroy(id) {
    delete this.items[id];
    save();
  }

  async revokeByGrantId(grantId) {
    for (const [id, entry] of Object.entries(this.items)) {
      if (entry.payload.grantId === grantId) delete this.items[id];
    }
    save();
  }
}

// Signing keys and cookie keys survive restarts too.
const keysFile = path.join(stateDir, 'keys.json');
if (!fs.existsSync(keysFile)) {
  const { privateKey } = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwk = { ...privateKey.export({ format: 'jwk' }), alg: 'ES256', use: 'sig', kid: 'test-1' };
  const cookieKey = crypto.randomBytes(32).toString('base64url');
  fs.writeFileSync(keysFile, JSON.stringify({ jwks: { keys: [jwk] }, cookies: [cookieKey] }), {
    mode: 0o600,
  });
}
const keys = JSON.parse(fs.readFileSync(keysFile, 'utf8'));

// ---------------------------------------------------------------------------------------
// Accounts: the test mail users (Dovecot passwd-file lines `name:{PLAIN}password::::::`).
const accountPassword = (login) => {
  if (!/^[A-Za-z0-9_.@-]+$/.test(login)) return undefined;
  try {
    const line = fs.readFileSync(path.join(accountsDir, login), 'utf8').split('\n')[0];
    const field = line.split(':')[1] ?? '';
    return field.startsWith('{PLAIN}') ? field.slice('{PLAIN}'.length) : undefined;
  } catch {
    return undefined;
  }
};

const findAccount = async (ctx, id) => {
  if (accountPassword(id) === undefined) return undefined;
  return {
    accountId: id,
    async claims() {
      return { sub: id, email: `${id}@example.test`, email_verified: true };
    },
  };
};

// ---------------------------------------------------------------------------------------
const provider = new Provider(issuer, {
  adapter: FileAdapter,
  // The one signing key is EC P-256 (generated in milliseconds).
  clientDefaults: { id_token_signed_response_alg: 'ES256' },
  findAccount,
  jwks: keys.jwks,
  cookies: { keys: keys.cookies },
  clients: [
    {
      // Like an Entra ID / Google "public client" (native app): no secret, PKCE required.
      client_id: PUBLIC_CLIENT,
      client_name: 'legacy-mail-proxy (public)',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: USER_GRANTS,
      response_types: ['code'],
      redirect_uris: [REDIRECT_URI],
    },
    {
      // Confidential: the same user flows with a client secret (as Google's installed-app
      // and TV clients have), and app-only client credentials (as Entra ID's IMAP.AccessAsApp).
      client_id: CONFIDENTIAL_CLIENT,
      client_name: 'legacy-mail-proxy (confidential)',
      application_type: 'native',
      client_secret: secret(CONFIDENTIAL_CLIENT),
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: [...USER_GRANTS, 'client_credentials'],
      response_types: ['code'],
      redirect_uris: [REDIRECT_URI],
    },
    {
      // The resource server: Dovecot's oauth2 passdb introspects tokens with it.
      client_id: INTROSPECTION_CLIENT,
      client_secret: secret(INTROSPECTION_CLIENT),
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: [],
      response_types: [],
      redirect_uris: [],
    },
  ],
  scopes: ['openid', 'offline_access', 'email', 'mail'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true,
      userCodeInputSource: async (ctx, form, out, err) => {
        const message = err ? `<p class="error">${escapeHtml(err.name)}: ${escapeHtml(out?.error_description ?? err.message)}</p>` : '';
        ctx.body = page('Enter the code', `${message}
<p>Enter the code shown by the device.</p>${form}
<button type="submit" form="op.deviceInputForm">Continue</button>`);
      },
      userCodeConfirmSource: async (ctx, form, client, deviceInfo, userCode) => {
        ctx.body = page('Confirm the device', `<p>${escapeHtml(client.clientName ?? client.clientId)} shows the code <code>${escapeHtml(userCode)}</code>.</p>
${form}<button type="submit" form="op.deviceConfirmForm">Continue</button>
<button type="submit" form="op.deviceConfirmForm" name="abort" value="yes">Abort</button>`);
      },
      successSource: async (ctx) => {
        ctx.body = page('Sign-in Success', '<p>The device is authorized. You can close this page.</p>');
      },
    },
    clientCredentials: { enabled: true },
    introspection: {
      enabled: true,
      // Only the resource server (Dovecot) and a token's own client may introspect it.
      allowedPolicy: async (ctx, client, token) =>
        client.clientId === INTROSPECTION_CLIENT || client.clientId === token.clientId,
    },
    revocation: { enabled: true },
    // Opaque access tokens, checked by introspection (Dovecot's introspection_mode = post).
    resourceIndicators: { enabled: false },
  },
  // Every refresh token is used once: the next refresh must present the new one, and the
  // old one gets invalid_grant (as Microsoft does).
  rotateRefreshToken: () => true,
  // Refresh tokens for every user flow of a client that may refresh, whether or not
  // offline_access was asked for (Microsoft and Google decide by scope or access_type;
  // the gateway always wants one).
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // Dovecot's username_attribute: only access tokens carry it, so a refresh token presented
  // as an IMAP password is refused although introspection calls it active.
  extraTokenClaims: async (ctx, token) => {
    if (token.kind === 'ClientCredentials') {
      return appMailbox ? { username: appMailbox } : undefined;
    }
    return token.accountId ? { username: token.accountId } : undefined;
  },
  ttl: {
    AccessToken: accessTtl,
    ClientCredentials: accessTtl,
    RefreshToken: refreshTtl,
    DeviceCode: 600,
    AuthorizationCode: 120,
    Interaction: 600,
    Session: 3600,
    Grant: refreshTtl,
    IdToken: 3600,
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  pkce: { required: (ctx, client) => client.clientAuthMethod === 'none' },
  renderError: async (ctx, out) => {
    ctx.type = 'html';
    ctx.body = `<!DOCTYPE html><title>Error</title><h1>${out.error}</h1><p>${escapeHtml(
      out.error_description ?? '',
    )}</p>`;
  },
});

// ---------------------------------------------------------------------------------------
// The grant log: one JSON line per call of the endpoints that hand out or check tokens.
const LOGGED = {
  '/token': 'token',
  '/device/auth': 'device_authorization',
  '/token/introspection': 'introspection',
  '/token/revocation': 'revocation',
};
provider.use(async (ctx, next) => {
  await next();
  const endpoint = LOGGED[ctx.path];
  if (!endpoint || ctx.method !== 'POST') return;
  const params = ctx.oidc?.params ?? {};
  const body = typeof ctx.body === 'object' && ctx.body !== null ? ctx.body : {};
  const entry = {
    time: new Date().toISOString(),
    endpoint,
    grant_type: params.grant_type ?? undefined,
    client: ctx.oidc?.client?.clientId ?? null,
    status: ctx.status,
    outcome: ctx.status === 200 ? 'ok' : body.error ?? 'error',
  };
  if (endpoint === 'introspection' && ctx.status === 200) entry.active = body.active === true;
  if (endpoint === 'token' && ctx.status === 200) {
    entry.refresh_token_issued = typeof body.refresh_token === 'string';
    entry.expires_in = body.expires_in;
  }
  fs.appendFileSync(grantLog, `${JSON.stringify(entry)}\n`);
  // Every secret value handed out, for tests/sweep-secrets to look for in every log once
  // the whole suite has run. In the secrets directory (0700), never in a log.
  const issued = ['access_token', 'refresh_token', 'id_token', 'device_code']
    .map((key) => body[key])
    .filter((value) => typeof value === 'string');
  if (ctx.status === 200 && issued.length > 0) {
    fs.appendFileSync(path.join(secretsDir, 'issued-tokens'), `${issued.join('\n')}\n`, {
      mode: 0o600,
    });
  }
});

// ---------------------------------------------------------------------------------------
// Interactions: one page that signs in a mail user and grants what the client asked for
// (no separate consent page), or denies. Plain forms, so tests drive them with any HTTP client.
function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(title, body) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head><body>
<h1>${escapeHtml(title)}</h1>
${body}
<p><small>legacy-mail-proxy test authorization server (oidc-provider)</small></p>
</body></html>`;
}

const loginPage = (uid, clientId, message) => page('Sign in', `
<p>${escapeHtml(clientId)} asks for access to your mailbox.</p>
${message ? `<p class="error">${escapeHtml(message)}</p>` : ''}
<form method="post" action="/interaction/${escapeHtml(uid)}">
<label>Mail user <input name="login" autofocus></label>
<label>Password <input name="password" type="password"></label>
<button type="submit" name="approve" value="yes">Approve</button>
<button type="submit" name="deny" value="yes">Deny</button>
</form>`);

const readForm = (req) =>
  new Promise((resolve, reject) => {
    let data = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => {
      data += chunk;
      if (data.length > 65536) reject(new Error('form too large'));
    });
    req.on('end', () => resolve(new URLSearchParams(data)));
    req.on('error', reject);
  });

async function interaction(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new errors.SessionNotFound('interaction mismatch');
  const clientId = details.params.client_id;
  if (req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(loginPage(uid, clientId));
    return;
  }
  const form = await readForm(req);
  if (form.get('deny')) {
    await provider.interactionFinished(
      req,
      res,
      { error: 'access_denied', error_description: 'the user denied the request' },
      { mergeWithLastSubmission: false },
    );
    return;
  }
  const login = form.get('login') ?? '';
  const password = accountPassword(login);
  if (password === undefined || password !== (form.get('password') ?? '')) {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(loginPage(uid, clientId, 'Unknown mail user or wrong password.'));
    return;
  }
  const grant = new provider.Grant({ accountId: login, clientId });
  const missing = details.prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  const scope = details.params.scope;
  if (scope) grant.addOIDCScope(scope);
  const grantId = await grant.save();
  await provider.interactionFinished(
    req,
    res,
    { login: { accountId: login }, consent: { grantId } },
    { mergeWithLastSubmission: false },
  );
}

const callback = provider.callback();
const server = https.createServer(
  {
    cert: fs.readFileSync(env('LMP_IDP_CERT')),
    key: fs.readFileSync(env('LMP_IDP_KEY')),
  },
  (req, res) => {
    const match = /^\/interaction\/([A-Za-z0-9_-]+)$/.exec(req.url.split('?')[0]);
    if (!match) {
      callback(req, res);
      return;
    }
    interaction(req, res, match[1]).catch((err) => {
      res.writeHead(400, { 'content-type': 'text/plain; charset=utf-8' });
      res.end(`interaction failed: ${err.message}\n`);
    });
  },
);
server.listen(port, '127.0.0.1', () => {
  // The harness polls the discovery document; this line is for people reading the log.
  console.log(`idp: oidc-provider listening, issuer ${issuer}`);
});
process.on('SIGTERM', () => process.exit(0));
