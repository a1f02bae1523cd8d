// routstr-node dashboard. No dependencies; everything untrusted goes in through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const sat = (msat) => (Number(msat || 0) / 1000).toLocaleString(undefined, { maximumFractionDigits: 3 });
const when = (secs) => (secs ? new Date(secs * 1000).toLocaleString() : "");

async function api(path, body, method) {
  const opts = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    opts.method = method || "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch("/admin/api/" + path, opts);
  const data = await resp.json().catch(() => ({}));
  if (resp.status === 401 && path !== "login") {
    showLogin();
  }
  if (!resp.ok) {
    const err = new Error((data.error && data.error.message) || resp.statusText);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, numeric) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => {
    const td = c instanceof Node ? (() => { const t = el("td"); t.appendChild(c); return t; })() : el("td", c);
    if (numeric && numeric.includes(i)) td.className = "num";
    tr.appendChild(td);
  });
  return tr;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// A bar chart in SVG: points = [{label, value}].
function barChart(target, points, format) {
  const NS = "http://www.w3.org/2000/svg";
  const w = 600, h = 160, pad = 22;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("role", "img");
  const max = Math.max(0, ...points.map((p) => p.value)) || 1;
  const bw = (w - pad) / Math.max(points.length, 1);
  const base = document.createElementNS(NS, "line");
  base.setAttribute("x1", pad); base.setAttribute("x2", w); base.setAttribute("y1", h - pad); base.setAttribute("y2", h - pad);
  svg.appendChild(base);
  const top = document.createElementNS(NS, "text");
  top.setAttribute("x", 0); top.setAttribute("y", 10); top.textContent = format(max);
  svg.appendChild(top);
  points.forEach((p, i) => {
    const bh = ((h - 2 * pad) * p.value) / max;
    const r = document.createElementNS(NS, "rect");
    r.setAttribute("x", pad + i * bw + 1); r.setAttribute("width", Math.max(bw - 2, 1));
    r.setAttribute("y", h - pad - bh); r.setAttribute("height", bh);
    const title = document.createElementNS(NS, "title");
    title.textContent = `${p.label}: ${format(p.value)}`;
    r.appendChild(title);
    svg.appendChild(r);
    if (points.length <= 24 ? i % 3 === 0 : i % Math.ceil(points.length / 8) === 0) {
      const t = document.createElementNS(NS, "text");
      t.setAttribute("x", pad + i * bw); t.setAttribute("y", h - 6); t.textContent = p.label;
      svg.appendChild(t);
    }
  });
  target.replaceChildren(svg);
}

const hourLabel = (secs) => new Date(secs * 1000).getHours().toString().padStart(2, "0") + "h";

function money(m) {
  $("wallet-total").textContent = sat(m.wallet_msat) + " sat";
  $("user-balances").textContent = sat(m.user_balances_msat) + " sat";
  $("earnings").textContent = sat(m.earnings_msat) + " sat";
  $("undercovered").hidden = !m.undercovered;
}

async function loadOverview() {
  const o = await api("overview");
  $("node-name").textContent = `${o.node.name} v${o.node.version}`;
  money(o.money);
  $("requests").textContent = o.requests_since_start;
  $("errors").textContent = o.errors_since_start;
  $("in-flight").textContent = o.in_flight;
  const hours = [];
  for (let i = 0; i < 24; i++) hours.push(o.usage.since + i * 3600);
  const byHour = (f) => hours.map((hstart) => ({
    label: hourLabel(hstart),
    value: o.usage.buckets.filter((b) => b.start === hstart).reduce((s, b) => s + f(b), 0),
  }));
  barChart($("chart-revenue"), byHour((b) => b.charged_msat / 1000), (v) => v.toLocaleString(undefined, { maximumFractionDigits: 3 }));
  barChart($("chart-requests"), byHour((b) => b.charged + b.released), (v) => String(Math.round(v)));
  $("chart-errors").classList.add("errors");
  barChart($("chart-errors"), o.hours.map((h) => ({ label: hourLabel(h.start), value: h.errors })), (v) => String(v));
  const models = {};
  o.usage.buckets.forEach((b) => {
    const m = (models[b.model || "(none)"] ||= { n: 0, r: 0, msat: 0 });
    m.n += b.charged; m.r += b.released; m.msat += b.charged_msat;
  });
  fill($("models-usage"), Object.entries(models).map(([name, m]) => row([name, m.n, m.r, sat(m.msat)], [1, 2, 3])));
}

async function loadBalances() {
  const w = await api("wallet");
  money(w);
  fill($("mints"), w.mints.map((m) => row([m.mint_url, m.unit, sat(m.balance_msat), sat(m.pending_msat)], [2, 3])));
  $("bal-users").textContent = sat(w.user_balances_msat) + " sat";
  $("bal-reserved").textContent = sat(w.reserved_msat) + " sat";
  $("bal-earnings").textContent = sat(w.earnings_msat) + " sat";
  const select = $("withdraw-mint");
  const keep = select.value;
  select.replaceChildren(el("option", "the fullest"), ...w.mints.filter((m) => m.unit === "sat").map((m) => {
    const o = el("option", m.mint_url); o.value = m.mint_url; return o;
  }));
  select.firstChild.value = "";
  select.value = keep;
}

let keysQuery = "";
async function loadKeys() {
  const k = await api("keys?limit=100&q=" + encodeURIComponent(keysQuery));
  $("keys-total").textContent = k.total;
  fill($("keys-table").tBodies[0], k.keys.map((key) => {
    const open = el("button", "open", "link");
    open.addEventListener("click", () => showKey(key.key_hash));
    const tr = row([key.key_hash.slice(0, 16) + "…", key.kind, sat(key.balance_msat), sat(key.reserved_msat),
      sat(key.spent_msat), key.requests, key.revoked ? "revoked" : "active", open], [2, 3, 4, 5]);
    tr.dataset.keyHash = key.key_hash;
    tr.className = "key-row";
    return tr;
  }));
}

let currentKey = null;
async function showKey(hash) {
  const d = await api("keys/" + hash);
  currentKey = d.key;
  $("key-detail").hidden = false;
  $("kd-hash").textContent = hash;
  $("revoke-button").textContent = d.key.revoked ? "Restore" : "Revoke";
  fill($("kd-requests"), d.requests.map((r) => row([r.request_id, r.model || "", r.state, r.charged_msat, when(r.created_at)], [3])));
}

let txBefore = null;
async function loadTransactions(more) {
  if (!more) txBefore = null;
  const t = await api("transactions?limit=100" + (txBefore ? "&before=" + txBefore : ""));
  const rows = t.transactions.map((x) => row([when(x.at), x.kind, (x.key_hash || "").slice(0, 12), x.request_id || "",
    x.model || x.mint_url || x.provider || "", x.amount_msat, x.fee_msat, x.state], [5, 6]));
  if (more) rows.forEach((r) => $("tx").appendChild(r)); else fill($("tx"), rows);
  if (t.transactions.length) txBefore = t.transactions[t.transactions.length - 1].at;
}

async function loadUpstreams() {
  const u = await api("upstreams");
  fill($("up"), u.upstreams.map((x) => {
    const actions = el("span");
    const toggle = el("button", x.disabled ? "Enable" : "Disable", "link");
    toggle.addEventListener("click", () => upAction(`upstreams/${encodeURIComponent(x.name)}`, { disabled: !x.disabled }));
    actions.appendChild(toggle);
    if (x.source !== "environment") {
      const del = el("button", x.source === "admin" ? "Delete" : "Reset to environment", "link");
      del.addEventListener("click", () => upAction(`upstreams/${encodeURIComponent(x.name)}`, {}, "DELETE"));
      actions.appendChild(del);
    }
    const edit = el("button", "Edit", "link");
    edit.addEventListener("click", () => {
      $("up-name").value = x.name; $("up-url").value = x.base_url; $("up-key").value = "";
      $("up-models").value = (x.models || []).join(","); $("up-markup").value = x.markup;
      $("up-aliases").value = Object.entries(x.aliases || {}).map(([k, v]) => k + "=" + v).join(",");
    });
    actions.appendChild(edit);
    const health = x.disabled ? "disabled" : !x.health ? "" :
      x.health.cooling_down ? `cooling down (${x.health.consecutive_failures} failures)` : "up";
    return row([x.name, x.source, x.base_url, "×" + x.markup, x.has_api_key ? "set" : "none", health, actions]);
  }));
  $("up-layer").textContent = `Admin edits are saved in ${u.layers.upstreams_file} and ${u.layers.models_file}, layered on top of UPSTREAM_* / UPSTREAMS_PATH.`;
  $("up-extra").textContent = `EXCHANGE_FEE ×${u.exchange_fee} · fixed pricing ${u.fixed_pricing} · BTC/USD ${u.btc_usd ?? "unknown"}`;
  const m = await api("models");
  fill($("models"), m.data.map((x) => {
    const p = x.sats_pricing || {};
    return row([x.id, p.prompt ?? "—", p.completion ?? "—", p.request ?? "—", p.max_cost ?? "—"], [1, 2, 3, 4]);
  }));
  $("price-overrides").textContent = "Overrides: " + JSON.stringify(m.price_overrides || {}, null, 2);
}

async function upAction(path, body, method) {
  $("up-msg").textContent = "";
  try { await api(path, body, method); } catch (e) { $("up-msg").textContent = e.message; }
  loadUpstreams();
}

async function loadNostr() {
  const n = await api("nostr");
  const { providers, ...info } = n;
  $("nostr-info").textContent = JSON.stringify(info, null, 2);
  $("nostr-last-announcement").textContent = when(n.last_announcement_at) || "never";
  $("nostr-last-prices").textContent = when(n.last_price_list_at) || "never";
  fill($("providers"), (providers || []).map((p) => row([p.name || p.pubkey || "", (p.urls || [p.url]).join(" "), String(p.health ?? "")])));
}

async function loadTor() {
  $("tor-info").textContent = JSON.stringify(await api("tor"), null, 2);
}

async function loadSettings() {
  const s = await api("settings");
  fill($("settings-list"), s.settings.map((x) => row([x.name, x.value])));
  $("admin-layer").textContent = JSON.stringify(s.admin_layer, null, 2);
}

async function loadLogs() {
  const r = await api("requests?limit=100");
  fill($("recent"), r.requests.map((x) => {
    const link = el("button", x.request_id, "link");
    link.addEventListener("click", () => { $("logs-id").value = x.request_id; showLog(x.request_id); });
    return row([when(x.at), link, x.path, x.model, x.status, x.latency_ms], [4, 5]);
  }));
}

async function showLog(id) {
  try {
    $("logs-out").textContent = JSON.stringify(await api("logs?request_id=" + encodeURIComponent(id)), null, 2);
  } catch (e) {
    $("logs-out").textContent = e.message;
  }
}

const loaders = {
  overview: loadOverview, balances: loadBalances, keys: loadKeys, transactions: () => loadTransactions(false),
  upstreams: loadUpstreams, nostr: loadNostr, tor: loadTor, settings: loadSettings, logs: loadLogs,
};
let currentTab = "overview";

async function showTab(name) {
  currentTab = name;
  document.querySelectorAll("section.tab").forEach((s) => { s.hidden = s.id !== name; });
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  try { await loaders[name](); } catch (e) { if (e.status !== 401) console.error(e); }
}

function showLogin() {
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("password").focus();
}

function showApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  showTab(location.hash.slice(1) in loaders ? location.hash.slice(1) : "overview");
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    await api("login", { password: $("password").value });
    $("password").value = "";
    showApp();
  } catch (e) {
    $("login-error").textContent = e.status === 429 ? "Too many attempts; wait a minute." : "Wrong password.";
  }
});

$("logout").addEventListener("click", async () => {
  await api("logout", {}).catch(() => {});
  showLogin();
});

document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => {
  history.replaceState(null, "", "#" + b.dataset.tab);
  showTab(b.dataset.tab);
}));

$("withdraw-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("withdraw-error").textContent = "";
  try {
    const r = await api("withdraw", { amount_sat: Number($("withdraw-amount").value), mint: $("withdraw-mint").value });
    $("withdraw-token").hidden = false;
    $("withdraw-token").value = r.token;
    loadBalances();
  } catch (e) {
    $("withdraw-error").textContent = e.message;
  }
});

$("keys-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  keysQuery = $("keys-q").value.trim().toLowerCase();
  loadKeys();
});

$("adjust-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("adjust-error").textContent = "";
  try {
    await api(`keys/${currentKey.key_hash}/adjust`, { delta_msat: Number($("adjust-delta").value), note: $("adjust-note").value });
    await showKey(currentKey.key_hash);
    loadKeys();
  } catch (e) {
    $("adjust-error").textContent = e.message;
  }
});

$("revoke-button").addEventListener("click", async () => {
  await api(`keys/${currentKey.key_hash}/revoke`, { revoked: !currentKey.revoked });
  await showKey(currentKey.key_hash);
  loadKeys();
});

$("up-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = $("up-name").value.trim();
  const list = (v) => v.split(",").map((x) => x.trim()).filter(Boolean);
  const body = { name, models: list($("up-models").value) };
  if ($("up-url").value) body.base_url = $("up-url").value.trim();
  if ($("up-key").value) body.api_key = $("up-key").value;
  if ($("up-markup").value) body.markup = Number($("up-markup").value);
  body.aliases = Object.fromEntries(list($("up-aliases").value).map((a) => a.split("=").map((x) => x.trim())));
  const known = [...$("up").querySelectorAll("tr td:first-child")].some((td) => td.textContent === name);
  await upAction(known ? `upstreams/${encodeURIComponent(name)}` : "upstreams", body);
  $("up-key").value = "";
});

async function priceAction(body, method) {
  $("price-msg").textContent = "";
  const path = `models/${$("price-model").value.trim()}/price`;
  try { await api(path, body, method); } catch (e) { $("price-msg").textContent = e.message; }
  loadUpstreams();
}

$("price-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const pricing = { prompt: $("price-prompt").value.trim(), completion: $("price-completion").value.trim() };
  if ($("price-request").value) pricing.request = $("price-request").value.trim();
  priceAction({ pricing });
});
$("price-clear").addEventListener("click", () => priceAction({}, "DELETE"));

$("tx-more").addEventListener("click", () => loadTransactions(true));

$("logs-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  showLog($("logs-id").value.trim());
});

$("password-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await api("password", { current: $("pw-current").value, new: $("pw-new").value });
    $("password-msg").textContent = "Password changed; other sessions were logged out.";
  } catch (e) {
    $("password-msg").textContent = e.message;
  }
  $("pw-current").value = ""; $("pw-new").value = "";
});

// Refresh the visible tab now and then (not the forms).
setInterval(() => {
  if (!$("app").hidden && ["overview", "balances"].includes(currentTab)) loaders[currentTab]().catch(() => {});
}, 15000);

api("session").then((s) => (s.authenticated ? showApp() : showLogin())).catch(showLogin);
