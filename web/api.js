// The only module that talks to the server: REST calls with the signed-in token, errors as ApiError, and live
// streams (Server-Sent Events). Every path is relative to the origin that served the page: no CDN, no other host.

const API = "/api/v1";
const TOKEN_KEY = "stagewatch.token";

// --- the token -------------------------------------------------------------------------------------------------

// sessionStorage forgets the token with the tab; "remember" puts it in localStorage for the next visit.
export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token, remember) {
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
  if (token) (remember ? localStorage : sessionStorage).setItem(TOKEN_KEY, token);
  window.dispatchEvent(new CustomEvent("stagewatch:token"));
}

// --- REST ------------------------------------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, detail, code) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.code = code;
  }
}

function authHeaders() {
  const token = getToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

export function apiUrl(path, params) {
  const query = params ? `?${toQuery(params)}` : "";
  return `${API}${path}${query}`;
}

// {key: ["a", "b"], min_step: 3} -> "key=a&key=b&min_step=3"; undefined and "" are left out.
export function toQuery(params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") query.append(name, String(item));
    }
  }
  return query.toString();
}

// Requests a page started before its modules loaded (an inline script in run.html): used once, by the first
// identical GET.
function takeEarly(url) {
  const early = window.__stagewatchEarly;
  if (!early || !early.has(url)) return null;
  const response = early.get(url);
  early.delete(url);
  return response;
}

export async function api(path, { method = "GET", body, params, signal } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const url = apiUrl(path, params);
  let response;
  try {
    const early = method === "GET" ? takeEarly(url) : null;
    response = await (early || fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    }));
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "The server cannot be reached.", "network");
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    let code = `http_${response.status}`;
    try {
      const problem = await response.json();
      detail = typeof problem.detail === "string" ? problem.detail : JSON.stringify(problem.detail);
      code = problem.code || code;
    } catch {
      // not JSON: keep the status line
    }
    const error = new ApiError(response.status, detail, code);
    if (response.status === 401) window.dispatchEvent(new CustomEvent("stagewatch:unauthorized", { detail: error }));
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

// A sentence a person can act on.
export function explain(error) {
  if (!(error instanceof ApiError)) return String(error && error.message ? error.message : error);
  if (error.status === 401) return `Sign in with a token to do this (${error.detail}).`;
  if (error.status === 403) return `Your token is not allowed to do this: ${error.detail}.`;
  if (error.status === 0) return error.detail;
  return error.detail;
}

// Full-resolution CSV download. A plain link lets the browser stream it straight to disk; a link cannot send an
// Authorization header, so with a token the file is fetched and handed over as a blob instead.
export async function download(path, params, filename, onProgress) {
  const url = apiUrl(path, params);
  if (!getToken()) {
    const link = Object.assign(document.createElement("a"), { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    return;
  }
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw new ApiError(response.status, `${response.status} ${response.statusText}`, "export");
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    if (onProgress) onProgress(received);
  }
  const href = URL.createObjectURL(new Blob(chunks, { type: "text/csv" }));
  const link = Object.assign(document.createElement("a"), { href, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10_000);
}

// --- who am I ---------------------------------------------------------------------------------------------------

// {role, name, auth} of the current token (role null: no token on a server that wants one); an ApiError(401) for a
// token the server does not know. One request per token: pages ask before they offer controls.
let whoamiCache = null;
export function whoami() {
  const token = getToken();
  if (!whoamiCache || whoamiCache.token !== token) {
    const entry = { token, answer: api("/whoami") };
    // A server that was down is asked again next time; a refused token stays refused until it changes.
    entry.answer.catch((error) => {
      if (error.status !== 401 && whoamiCache === entry) whoamiCache = null;
    });
    whoamiCache = entry;
  }
  return whoamiCache.answer;
}

// Whether `answer` (of whoami) may do what needs `role`: viewer < worker < operator, as server/auth.py ranks them.
const ROLE_RANK = { viewer: 0, worker: 1, operator: 2 };
export function mayAct(answer, role = "operator") {
  return Boolean(answer && answer.role && ROLE_RANK[answer.role] >= ROLE_RANK[role]);
}

// --- live events ---------------------------------------------------------------------------------------------

// Opens an EventSource on `path` and calls handlers[eventName](data, id). EventSource reconnects by itself and
// resends the last id (Last-Event-ID), so the server resumes right after it: nothing is missed across a drop.
// It cannot send headers, hence `?token=`. `onState("live" | "connecting" | "down")` drives the indicator.
export function subscribe(path, handlers, onState = () => {}) {
  let source = null;
  let closed = false;
  let lastId = null; // resumes a stream we reopen ourselves (new token, or after the server refused it)
  let retry = null;

  function open() {
    const token = getToken();
    source = new EventSource(apiUrl(path, { token: token || undefined, after: lastId ?? undefined }));
    onState("connecting");
    source.onopen = () => onState("live");
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED) {
        onState("connecting"); // a dropped connection: EventSource retries by itself, with Last-Event-ID
        return;
      }
      // Refused (401/403, a proxy's 502, a server that is down): EventSource gives up for good. EventSource does
      // not say why, so ask whoami: without a usable token, retrying only piles up 401s; wait for a sign-in (the
      // "stagewatch:token" event reopens). Otherwise try again a little later.
      clearTimeout(retry);
      whoami().then((me) => (me.auth && !me.role ? "signin" : "down"), (error) =>
        (error instanceof ApiError && error.status === 401 ? "signin" : "down"))
        .then((why) => {
          if (closed || source.readyState !== EventSource.CLOSED) return;
          onState(why);
          if (why === "down") retry = setTimeout(reopen, 10_000);
        });
    };
    for (const [name, handler] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => {
        if (event.lastEventId) lastId = event.lastEventId;
        handler(JSON.parse(event.data), Number(event.lastEventId));
      });
    }
  }

  function reopen() {
    if (closed) return;
    clearTimeout(retry);
    if (source) source.close();
    open();
  }

  open();
  window.addEventListener("stagewatch:token", reopen);
  return {
    close() {
      closed = true;
      clearTimeout(retry);
      window.removeEventListener("stagewatch:token", reopen);
      if (source) source.close();
    },
  };
}
