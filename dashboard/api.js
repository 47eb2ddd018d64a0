// Talking to the gradwatch server: JSON over fetch with the read token, the
// token prompt shown when the server answers 401, the live WebSocket URL.
'use strict';

const TOKEN_KEY = 'gradwatch.readToken';

export class ApiError extends Error {
  constructor(status, detail, path) {
    super(`${path}: ${status} ${detail}`);
    this.status = status;
    this.detail = detail;
    this.path = path;
  }
}

export function readToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  } catch {
    return '';
  }
}

function storeToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // Storage disabled: the token lasts for this page only.
  }
  memoryToken = token;
}

let memoryToken = '';

export function currentToken() {
  return readToken() || memoryToken;
}

/** A `?token=` in the page address is stored, then removed from the address bar. */
export function adoptTokenFromAddress() {
  const url = new URL(window.location.href);
  const token = url.searchParams.get('token');
  if (token) {
    storeToken(token);
    url.searchParams.delete('token');
    window.history.replaceState(window.history.state, '', url.toString());
  }
}

// One prompt at a time; every request that got a 401 waits for the same answer.
let pendingPrompt = null;

export function askForToken(reason) {
  if (pendingPrompt) return pendingPrompt;
  const dialog = document.getElementById('token-dialog');
  const form = document.getElementById('token-form');
  const input = document.getElementById('token-input');
  const message = document.getElementById('token-message');
  message.textContent = reason;
  input.value = '';
  pendingPrompt = new Promise((resolve) => {
    const onSubmit = (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      form.removeEventListener('submit', onSubmit);
      storeToken(token);
      dialog.close();
      pendingPrompt = null;
      resolve(token);
    };
    form.addEventListener('submit', onSubmit);
  });
  // Escape would close the dialog and leave every request waiting: the page needs the token.
  if (!dialog.dataset.guarded) {
    dialog.dataset.guarded = 'yes';
    dialog.addEventListener('cancel', (event) => event.preventDefault());
  }
  if (!dialog.open) dialog.showModal();
  input.focus();
  return pendingPrompt;
}

export function authHeaders() {
  const token = currentToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** `GET path?params` as JSON; asks for the read token on 401 and retries. */
export async function getJSON(path, params = {}, { signal } = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== '') query.set(key, String(value));
  }
  const url = query.toString() ? `${path}?${query}` : path;
  for (;;) {
    const sentToken = currentToken();
    const response = await fetch(url, {
      headers: { Accept: 'application/json', ...authHeaders() },
      cache: 'no-store',
      signal,
    });
    if (response.status === 401 || response.status === 403) {
      // Another request may have got the token from the user meanwhile: just retry with it.
      if (currentToken() !== sentToken) continue;
      await askForToken(sentToken
        ? 'The server refused this token. Enter the read token (gradwatch serve --read-token).'
        : 'This server needs a read token (gradwatch serve --read-token).');
      continue;
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const body = await response.json();
        detail = typeof body.detail === 'string' ? body.detail : describeDetail(body.detail ?? body);
      } catch {
        // Not JSON: keep the status text.
      }
      throw new ApiError(response.status, detail, path);
    }
    return response.json();
  }
}

// Words for FastAPI's validation errors: {type, loc, ctx, input} → what the limit is.
const LIMITS = {
  greater_than_equal: (ctx) => `must be at least ${ctx.ge}`,
  greater_than: (ctx) => `must be above ${ctx.gt}`,
  less_than_equal: (ctx) => `must be at most ${ctx.le}`,
  less_than: (ctx) => `must be below ${ctx.lt}`,
  int_parsing: () => 'must be a whole number',
  int_from_float: () => 'must be a whole number',
  float_parsing: () => 'must be a number',
  finite_number: () => 'must be a finite number',
  missing: () => 'is required',
  literal_error: (ctx) => `must be one of ${ctx.expected}`,
};

/**
 * A 422 `detail` as one sentence per problem, naming the field and the limit:
 * `[{"type": "greater_than_equal", "loc": ["query", "window"], "ctx": {"ge": 100}, "input": "50"}]`
 * → "The window must be at least 100 (got 50)." Anything else: its text.
 */
export function describeDetail(detail) {
  if (typeof detail === 'string') return detail;
  if (!Array.isArray(detail)) return detail && typeof detail.message === 'string' ? detail.message : JSON.stringify(detail);
  return detail.map((item) => {
    if (!item || typeof item !== 'object') return String(item);
    const loc = Array.isArray(item.loc) ? item.loc.filter((part) => !['query', 'path', 'body'].includes(part)) : [];
    const field = loc.length ? loc.join('.').replace(/_/g, ' ') : 'value';
    const rule = LIMITS[item.type];
    const limit = rule ? rule(item.ctx || {}) : String(item.msg || 'is not valid').replace(/^Input should be/, 'should be');
    const got = item.input !== undefined && item.input !== null && typeof item.input !== 'object' ? ` (got ${item.input})` : '';
    return `The ${field} ${limit}${got}.`;
  }).join(' ');
}

export function runPath(run, tail = '') {
  return `/api/runs/${encodeURIComponent(run)}${tail}`;
}

/** `/ws/live/{run}`; `since` asks for the points stored after that step first. */
export function liveSocketURL(run, since = null) {
  const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  const query = new URLSearchParams();
  const token = currentToken();
  if (token) query.set('token', token);
  if (since !== null && since !== undefined) query.set('since', String(since));
  const text = query.toString();
  return `${scheme}//${window.location.host}/ws/live/${encodeURIComponent(run)}${text ? `?${text}` : ''}`;
}

/** WebSocket close codes that mean "wrong or missing token". */
export const AUTH_CLOSE_CODES = new Set([4401, 4403, 1008]);
