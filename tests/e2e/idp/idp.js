// A real OpenID Connect provider (npm `oidc-provider`) on loopback, for the Envoy end-to-end
// tests and the sidecar demo (envoy/README.md). It is the same library many production IdPs
// are built on; here it is configured for machine-to-machine use only:
//
// * the client_credentials grant (RFC 6749 §4.4), with resource indicators (RFC 8707) choosing
//   the API a token is for and the token's format:
//     urn:orion         RS256 JWT access token, aud "urn:orion"       (verified by the filter with
//                                                                     the IdP's JWKS)
//     urn:weather-api   RS256 JWT access token, aud "urn:weather-api" (valid, but for another API)
//     urn:orion:opaque  opaque access token                           (the filter introspects it)
//     urn:orion:opaque-short  the same, valid for 3 s                  (expiry tests)
// * token introspection (RFC 7662) at /token/introspection, for opaque tokens only (the library
//   refuses to introspect JWTs);
// * discovery at /.well-known/openid-configuration, keys at /jwks. The signing key is an RSA key
//   generated at every start (kid printed on the ready line), so no key material is committed.
//
// Clients (client_secret_basic):
//   sensor-gateway / sensor-gateway-secret   gets tokens (a device gateway writing to Orion)
//   parking-app    / parking-app-secret      gets tokens (another caller: owner / non-owner tests)
//   orion-pep      / orion-pep-secret        introspects tokens (the Envoy filter)
//   ownership-sidecar / ownership-sidecar-secret  gets opaque tokens for its own calls (the filter
//                                            authenticating itself to an ownership registry)
//
// Usage: node idp.js [--port N] [--host 127.0.0.1]
// Port 0 (the default) picks a free port. When listening, one JSON line is printed on stdout:
//   {"ready": true, "issuer": "http://127.0.0.1:PORT", "port": PORT, "kid": "..."}
// Test aids (not OIDC): GET /_e2e/requests answers the counts of the requests received, by
// path; POST /_e2e/introspection-hold parks every later introspection request unanswered, and
// POST /_e2e/introspection-release answers the parked ones and stops parking, so tests can
// check what Envoy does while the filter waits for the IdP; /_e2e/token-hold and
// /_e2e/token-release do the same for the token endpoint (/token).
// SIGTERM/SIGINT close it.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    host: { type: 'string', default: '127.0.0.1' },
  },
});

const RESOURCE_SERVERS = {
  'urn:orion': {
    scope: 'entities:read entities:write',
    accessTokenFormat: 'jwt',
    accessTokenTTL: 600,
    jwt: { sign: { alg: 'RS256' } },
  },
  'urn:weather-api': {
    scope: 'entities:read entities:write',
    accessTokenFormat: 'jwt',
    accessTokenTTL: 600,
    jwt: { sign: { alg: 'RS256' } },
  },
  'urn:orion:opaque': {
    scope: 'entities:read entities:write',
    accessTokenFormat: 'opaque',
    accessTokenTTL: 600,
  },
  // Short-lived opaque tokens: a connection authenticated with one closes at its expiry.
  'urn:orion:opaque-short': {
    scope: 'entities:read entities:write',
    accessTokenFormat: 'opaque',
    accessTokenTTL: 3,
  },
};

// Claims added to every access token (JWT payload, or the introspection answer of an opaque one).
const CLIENT_CLAIMS = {
  'sensor-gateway': { name: 'Sensor gateway 7', roles: ['device', 'entities-writer'] },
  'parking-app': { name: 'Parking app', roles: ['citizen'] },
};

function signingKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `e2e-rs256-${randomBytes(4).toString('hex')}`, alg: 'RS256', use: 'sig' };
}

const counts = new Map();
// Parked requests by held path: [answer thunk].
const held = { '/token/introspection': null, '/token': null };

const server = http.createServer();
server.listen(Number(args.port), args.host, () => {
  const { port } = server.address();
  const issuer = `http://${args.host}:${port}`;
  const key = signingKey();

  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: 'sensor-gateway',
        client_secret: 'sensor-gateway-secret',
        client_name: 'Sensor gateway 7',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
        scope: 'entities:read entities:write',
      },
      {
        // A second caller, for owner / non-owner tests.
        client_id: 'parking-app',
        client_secret: 'parking-app-secret',
        client_name: 'Parking app',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
        scope: 'entities:read entities:write',
      },
      {
        // The sidecar itself, calling the ownership registry with its own token (no resource
        // indicator: an opaque token the registry introspects).
        client_id: 'ownership-sidecar',
        client_secret: 'ownership-sidecar-secret',
        client_name: 'Envoy device-ownership filter',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      },
      {
        client_id: 'orion-pep',
        client_secret: 'orion-pep-secret',
        client_name: 'Envoy token-auth filter in front of Orion',
        grant_types: [],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      },
    ],
    jwks: { keys: [key] },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    scopes: ['entities:read', 'entities:write'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // Only the PEP may introspect, and only with its credentials.
        allowedPolicy: async (_ctx, client) => client.clientId === 'orion-pep',
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => undefined,
        useGrantedResource: async () => false,
        getResourceServerInfo: async (_ctx, resource, client) => {
          const info = RESOURCE_SERVERS[resource];
          if (!info || !(client.clientId in CLIENT_CLAIMS)) {
            throw new errors.InvalidTarget();
          }
          return info;
        },
      },
    },
    extraTokenClaims: async (_ctx, token) => CLIENT_CLAIMS[token.clientId],
  });
  provider.on('server_error', (_ctx, err) => console.error('idp: server_error', err));

  const handle = provider.callback();
  server.on('request', (req, res) => {
    const path = (req.url || '').split('?')[0];
    if (req.method === 'GET' && path === '/_e2e/requests') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(Object.fromEntries(counts)));
      return;
    }
    const aid = /^\/_e2e\/(introspection|token)-(hold|release)$/.exec(path);
    if (req.method === 'POST' && aid) {
      const heldPath = aid[1] === 'token' ? '/token' : '/token/introspection';
      const parked = held[heldPath];
      held[heldPath] = aid[2] === 'hold' ? parked || [] : null;
      if (aid[2] === 'release' && parked) {
        parked.forEach((answer) => answer());
      }
      res.writeHead(204).end();
      return;
    }
    counts.set(path, (counts.get(path) || 0) + 1);
    res.on('finish', () => {
      console.error(`idp: ${req.method} ${req.url} -> ${res.statusCode}`);
    });
    if (held[path]) {
      held[path].push(() => handle(req, res));
    } else {
      handle(req, res);
    }
  });

  console.log(JSON.stringify({ ready: true, issuer, port, kid: key.kid }));
});

function stop() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
