// A real OpenID provider for Steward's sign-on tests (tests/support/oidc.py starts it).
//
//   node provider.mjs [port]            configuration: JSON in OIDC_PROVIDER_CONFIG (or argv[3])
//
// Configuration keys (all optional):
//   port             listen port on 127.0.0.1 (argv[2] wins; 0 or absent: any free port)
//   clients          oidc-provider client metadata, as is
//   accounts         {"<account id>": {"email", "name", "groups": [...]}}; any other id signs in too, its
//                    groups read from the id itself: "carol~ops~audit" is in groups ops and audit
//   resources        resource indicators (API audiences) client_credentials may ask for; JWT access tokens
//   clientGroups     {"<client id>": [...]}: a `groups` claim put into that client's client_credentials tokens
//   extraKeys        public-and-private JWKs published in the JWKS next to the fresh signing key (tests sign
//                    their own tokens with them); the provider itself signs with the fresh key only
//
// A fresh RSA key (random kid) signs everything on every start: restarting the provider rotates keys.
// Prints one line `READY <issuer>` on stdout once it listens.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import process from 'node:process';

import Provider from 'oidc-provider';

const config = JSON.parse(process.argv[3] || process.env.OIDC_PROVIDER_CONFIG || '{}');
const port = Number(process.argv[2] ?? config.port ?? 0);
const accounts = config.accounts || {};
const resources = new Set(config.resources || []);
const clientGroups = config.clientGroups || {};

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };

const server = createServer();
await new Promise((resolve) => { server.listen(port, '127.0.0.1', resolve); });
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: config.clients || [],
  // oidc-provider signs with the first key of a matching type: the fresh one.
  jwks: { keys: [signingKey, ...(config.extraKeys || [])] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  pkce: { required: () => true },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups', 'api'],
  claims: {
    openid: ['sub'],
    profile: ['name'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  // Scope-requested claims (groups, email, name) go into the ID token itself.
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    rpInitiatedLogout: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (_ctx, _client, oneOf) => oneOf,
      useGrantedResource: async () => false,
      getResourceServerInfo: async (_ctx, resource) => {
        if (!resources.has(resource)) throw new Provider.errors.InvalidTarget();
        return { scope: 'api', audience: resource, accessTokenFormat: 'jwt', accessTokenTTL: 600, jwt: { sign: { alg: 'RS256' } } };
      },
    },
  },
  extraTokenClaims: async (_ctx, token) => {
    const groups = token.kind === 'ClientCredentials' ? clientGroups[token.clientId] : undefined;
    return groups ? { groups } : undefined;
  },
  findAccount: async (_ctx, id) => ({
    accountId: id,
    claims: async () => {
      const [name, ...groups] = id.split('~');
      const account = accounts[id] || { email: `${name}@example.test`, name, groups };
      return { sub: id, email: account.email, email_verified: Boolean(account.email), name: account.name, groups: account.groups || [] };
    },
  }),
  // Keep the logs free of "you should change this" notices about the built-in pages.
  renderError: async (ctx, out) => { ctx.type = 'json'; ctx.body = out; },
});
provider.proxy = false;

server.on('request', provider.callback());
// Nothing to flush: exit at once rather than wait for idle keep-alive connections.
const stop = () => process.exit(0);
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdout.write(`READY ${issuer}\n`);
