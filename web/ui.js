// Shared page furniture: the header (navigation, live indicator, sign-in), element building, number and time
// formatting, and the polite live region that screen readers announce.

import { explain, getToken, setToken, whoami } from "./api.js";

// h("a", {href: "x", class: "y"}, "text", child) -> element. Strings become text nodes (never HTML).
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

// --- run colours -------------------------------------------------------------------------------------------------

// A run's colour comes from its id, never from its place in a list: run 5 is the same colour on the runs page, its
// own page and every comparison. Ten colours, so two runs side by side clash only when their ids end alike; the
// compare page then moves the later one to the next free colour (see runColors).
export const PALETTE = ["#0b5cad", "#e8590c", "#2b8a3e", "#862e9c", "#c92a2a", "#1098ad", "#5c940d", "#a61e4d",
  "#495057", "#d9480f"];

export function runColor(id) {
  return PALETTE[((Number(id) % PALETTE.length) + PALETTE.length) % PALETTE.length];
}

// id -> colour for runs drawn together: each run's own colour unless an earlier run already has it.
export function runColors(ids) {
  const used = new Set();
  const colors = new Map();
  for (const id of ids) {
    let i = PALETTE.indexOf(runColor(id));
    for (let tries = 0; used.has(PALETTE[i]) && tries < PALETTE.length; tries++) i = (i + 1) % PALETTE.length;
    used.add(PALETTE[i]);
    colors.set(id, PALETTE[i]);
  }
  return colors;
}

// --- theme --------------------------------------------------------------------------------------------------------

// Dark or light: the system's choice (prefers-color-scheme, in app.css) unless the user picked one with the toggle,
// kept in localStorage. The choice is an attribute on <html>; the charts read their colours from the CSS variables.
const THEME_KEY = "stagewatch.theme";
const systemDark = window.matchMedia("(prefers-color-scheme: dark)");

export function currentTheme() {
  const chosen = localStorage.getItem(THEME_KEY);
  return chosen === "dark" || chosen === "light" ? chosen : systemDark.matches ? "dark" : "light";
}

function applyTheme() {
  document.documentElement.dataset.theme = currentTheme();
  window.dispatchEvent(new CustomEvent("stagewatch:theme"));
}
applyTheme(); // as the module loads, before the first chart
systemDark.addEventListener("change", applyTheme);

function themeToggle() {
  const button = h("button", { type: "button", id: "theme-toggle", class: "theme-toggle" });
  const label = () => {
    const dark = currentTheme() === "dark";
    button.textContent = dark ? "☀ Light" : "☾ Dark";
    button.setAttribute("aria-label", dark ? "Switch to the light theme" : "Switch to the dark theme");
  };
  button.addEventListener("click", () => {
    localStorage.setItem(THEME_KEY, currentTheme() === "dark" ? "light" : "dark");
    applyTheme();
    label();
  });
  label();
  return button;
}

// --- formatting ------------------------------------------------------------------------------------------------

// Values arrive as numbers or as "NaN" / "Infinity" / "-Infinity" (JSON has no non-finite numbers).
export function toNumber(value) {
  if (typeof value === "number") return value;
  if (value === "NaN") return NaN;
  if (value === "Infinity") return Infinity;
  if (value === "-Infinity") return -Infinity;
  if (value === null || value === undefined) return null;
  return Number(value);
}

export function fmtValue(value) {
  const x = toNumber(value);
  if (x === null) return "–";
  if (Number.isNaN(x)) return "NaN";
  if (!Number.isFinite(x)) return x > 0 ? "∞" : "−∞";
  if (x === 0) return "0";
  const abs = Math.abs(x);
  if (abs >= 1e5 || abs < 1e-3) return x.toExponential(2);
  return Number(x.toPrecision(4)).toString();
}

export function fmtLr(value) {
  const x = toNumber(value);
  if (x === null || !Number.isFinite(x)) return fmtValue(x);
  return Number(x.toPrecision(3)).toString();
}

export function fmtInt(value) {
  return value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US");
}

export function fmtPercent(value) {
  const x = toNumber(value);
  return x === null || !Number.isFinite(x) ? fmtValue(x) : `${(100 * x).toFixed(2)}%`;
}

export function fmtEpoch(value) {
  const x = toNumber(value);
  return x === null || !Number.isFinite(x) ? "–" : Number(x.toFixed(2)).toString();
}

// "12 s ago", "3 min ago": for a glance; the exact time is in the element's title.
export function ago(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

export function timeElement(iso) {
  const date = new Date(iso);
  return h("time", { datetime: date.toISOString(), title: date.toString() }, date.toLocaleString());
}

export function seconds(iso) {
  return iso ? Date.parse(iso) / 1000 : null;
}

// plotly.js: the page's own async <script id="plotly-js"> (compiled while it downloads), or one added now.
let plotly = null;
export function loadPlotly() {
  if (!plotly) {
    plotly = new Promise((resolve, reject) => {
      const failed = () => reject(new Error("plotly.js could not be loaded from /ui/vendor/."));
      if (window.Plotly) return resolve(window.Plotly);
      if (window.__plotlyFailed) return failed();
      const existing = document.getElementById("plotly-js");
      const script = existing || h("script", { src: "vendor/plotly.min.js", id: "plotly-js" });
      script.addEventListener("load", () => resolve(window.Plotly));
      script.addEventListener("error", failed);
      if (!existing) document.head.append(script);
    });
  }
  return plotly;
}

// --- the live region ---------------------------------------------------------------------------------------------

export function announce(message) {
  const region = document.getElementById("announce");
  if (!region) return;
  region.textContent = "";
  // A new text node in a separate task, so that the same message twice is announced twice.
  setTimeout(() => {
    region.textContent = message;
  }, 30);
}

// --- header -------------------------------------------------------------------------------------------------------

// Fills <header id="top"> with the navigation, the live indicator and the sign-in form. Returns setLive(state).
export function renderHeader(current) {
  const header = document.getElementById("top");
  const live = h("span", { class: "live-state", id: "live-state", role: "status", "data-state": "connecting" },
    "connecting");
  const nav = h("nav", { "aria-label": "Pages" }, h("ul", {},
    h("li", {}, h("a", { href: "/ui/", "aria-current": current === "runs" ? "page" : undefined }, "Runs")),
    h("li", {}, h("a", { href: "/ui/compare.html", "aria-current": current === "compare" ? "page" : undefined },
      "Compare")),
    h("li", {}, h("a", { href: "/docs" }, "API")),
  ));
  header.replaceChildren(
    h("a", { class: "skip", href: "#main" }, "Skip to content"),
    h("a", { class: "brand", href: "/ui/" }, "Stagewatch"),
    nav,
    h("span", { class: "spacer" }),
    live,
    themeToggle(),
    signInWidget(),
  );
  return (state) => {
    live.dataset.state = state;
    live.textContent = {
      live: "live",
      connecting: "connecting…",
      down: "Server unreachable: live updates stopped, retrying every 10 s",
      signin: "Sign in for live updates",
    }[state] || state;
  };
}

function signInWidget() {
  const details = h("details", { class: "signin", id: "signin" });
  const summary = h("summary", {});
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off",
    placeholder: "paste a token", required: true });
  const remember = h("input", { id: "remember", type: "checkbox" });
  const message = h("p", { id: "signin-message", class: "small muted", role: "status" });
  const signOut = h("button", { type: "button", id: "sign-out" }, "Sign out");
  const form = h("form", { "aria-label": "Sign in" },
    h("label", { for: "token" }, "Token (viewer to watch, operator to decide)"),
    input,
    h("label", { for: "remember", class: "row" }, remember, "Remember on this device"),
    h("div", { class: "row" }, h("button", { type: "submit", class: "primary" }, "Sign in"), signOut),
    message,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim(), remember.checked);
    input.value = "";
    details.open = false;
  });
  signOut.addEventListener("click", () => {
    setToken("", false);
    details.open = false;
  });

  // What the summary says comes from the server (whoami), not from having typed something: a wrong token is
  // named as wrong, a right one by its name and role.
  function refresh() {
    const token = getToken();
    details.dataset.signedIn = "pending";
    summary.textContent = token ? "Checking the token…" : "Sign in";
    signOut.hidden = !token;
    whoami().then((me) => {
      if (token !== getToken()) return;
      if (!me.auth) {
        details.dataset.signedIn = "true";
        summary.textContent = "No sign-in needed";
        message.textContent = "This server was started with --no-auth: everyone may act.";
      } else if (me.role) {
        details.dataset.signedIn = "true";
        summary.textContent = `Signed in · ${me.name} (${me.role})`;
        message.textContent = me.role === "operator" ? "This token may decide and act on runs."
          : `A ${me.role} token watches; deciding and acting need an operator token.`;
      } else {
        details.dataset.signedIn = "false";
        summary.textContent = "Sign in";
        message.textContent = "This server needs a token to show runs.";
      }
    }, (error) => {
      if (token !== getToken()) return;
      details.dataset.signedIn = "wrong";
      summary.textContent = error.status === 401 ? "Token refused · sign in again" : "Sign in";
      message.textContent = error.status === 401 ? `The server refused this token: ${error.detail}.` : explain(error);
    });
  }
  window.addEventListener("stagewatch:token", refresh);
  // Any 401 opens the form with the server's reason.
  window.addEventListener("stagewatch:unauthorized", (event) => {
    details.open = true;
    message.textContent = `The server wants a token: ${event.detail.detail}`;
    input.focus();
  });
  refresh();
  details.append(summary, form);
  return details;
}

// A throttle that runs `fn` at most once per animation frame and at least `minMs` apart: live events can come
// in bursts, the screen needs at most one redraw per batch.
export function throttled(fn, minMs = 0) {
  let scheduled = false;
  let last = 0;
  return () => {
    if (scheduled) return;
    scheduled = true;
    const wait = Math.max(0, last + minMs - performance.now());
    setTimeout(() => requestAnimationFrame(() => {
      scheduled = false;
      last = performance.now();
      fn();
    }), wait);
  };
}
