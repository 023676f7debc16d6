// llmarket node dashboard: reads the node's JSON API (/api/node, /api/market, /api/jobs,
// /api/payments, /api/series) and keeps up to date from the /api/events stream.
// Plain browser JavaScript, no build step; uPlot (global `uPlot`) draws the charts.
"use strict";
(() => {
  const KEY_STORE = "llmarket.apiKey";
  const MAX_JOBS = 200;          // rows kept in the jobs table
  const POLL_MS = 10000;         // node, payments, series and market refresh
  const CHART_HEIGHT = 170;

  const state = {
    node: null,
    symbol: "",                  // token symbol, "" when unknown (free node)
    decimals: null,              // token decimals; null when unknown (amounts then show in base units)
    skew: 0,                     // server clock minus browser clock, seconds
    market: null,
    marketAt: 0,                 // browser time (s) the market snapshot arrived
    jobs: new Map(),             // id -> job
    authNeeded: false,
  };
  const app = (window.llmarket = { charts: {}, ready: false, state });

  // ------------------------------------------------------------------ helpers
  const $ = (sel) => document.querySelector(sel);
  const nowBrowser = () => Date.now() / 1000;
  const nowServer = () => nowBrowser() + state.skew;

  // Builds an element; text children are always inserted as text (peer-supplied
  // strings such as hardware or model names never become markup).
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid != null && kid !== false) el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }

  const intFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const int = (n) => (n == null ? "—" : intFmt.format(Math.round(n)));
  const dec = (n, d = 1) => (n == null ? "—" : n.toFixed(d));
  // Amounts come as decimal strings of base units (they outgrow JavaScript numbers): BigInt here.
  const big = (s) => { try { return BigInt(s ?? 0); } catch { return 0n; } };
  // An amount in whole tokens when the token's decimals are known ("0.000612"), else in base units;
  // the fraction is cut at 6 significant digits (the exact base units are in the data-value).
  function tokens(s) {
    if (s == null) return "—";
    const n = big(s), d = state.decimals;
    if (d == null) return intFmt.format(n);
    const a = n < 0n ? -n : n, scale = 10n ** BigInt(d);
    let frac = (a % scale).toString().padStart(d, "0").replace(/0+$/, "");
    if (frac) frac = frac.slice(0, frac.match(/^0*/)[0].length + 6);
    return `${n < 0n ? "-" : ""}${intFmt.format(a / scale)}${frac ? "." + frac : ""}`;
  }
  const perToken = (x) => (state.decimals == null ? x : x / 10 ** state.decimals);  // plots: floats suffice
  // An amount with its symbol as a quieter suffix, for the stat cards.
  const amountNode = (n) =>
    n == null ? "—" : [tokens(n), state.symbol ? h("span", { class: "unit" }, " " + state.symbol) : null];
  const withUnit = (label) => (state.symbol ? `${label} (${state.symbol})` : label);
  const shortId = (id) => (!id ? "—" : id.length > 14 ? `${id.slice(0, 6)}…${id.slice(-4)}` : id);
  const plural = (n, word) => `${int(n)} ${word}${n === 1 ? "" : "s"}`;
  // A model's friendly name; a model fetched by CID is named by its CID, so the market's name for it wins.
  const marketName = (cid) => (state.market?.models || []).find((m) => m.cid === cid && m.name !== cid)?.name;
  const modelLabel = (name, cid) => {
    const best = name && name !== cid ? name : marketName(cid) || name;
    return best && best !== cid ? best.replace(/\.gguf$/i, "") : shortId(cid);
  };

  function duration(s) {
    s = Math.max(0, Math.floor(s));
    const pad = (x) => String(x).padStart(2, "0");
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }
  const clock = (t) => new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false });
  const fullDate = (t) => new Date(t * 1000).toString();

  function setText(sel, content, value) {
    const el = $(sel);
    if (!el) return;
    el.replaceChildren(...[content].flat().filter((x) => x != null));
    if (value !== undefined) el.setAttribute("data-value", value == null ? "" : String(value));
  }

  const badge = (text, kind, title) => h("span", { class: `badge ${kind || text}`, title }, text);
  // Status cells (job state, reachability, payment status) hold their text directly, so the
  // cell's own text is exactly the value; CSS adds a coloured dot before it.
  const peerCode = (id) => h("code", { class: "mono peer", title: id || null }, shortId(id));

  async function copyText(text, btn) {
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      // Not a secure context (plain http on a LAN address): fall back to a selection copy.
      const ta = h("textarea", { readonly: true, class: "offscreen" });
      ta.value = text;
      document.body.append(ta);
      ta.select();
      document.execCommand("copy");
      ta.remove();
    }
    btn.classList.add("copied");
    setTimeout(() => btn.classList.remove("copied"), 1200);
  }
  const cidButton = (cid) =>
    h("button", { class: "cid mono", type: "button", title: `${cid}\nclick to copy`, onclick: (e) => copyText(cid, e.currentTarget) },
      shortId(cid));

  // ---------------------------------------------------------------------- API
  class AuthError extends Error {}
  const apiKey = () => localStorage.getItem(KEY_STORE) || "";

  async function api(path) {
    const key = apiKey();
    const resp = await fetch(path, { headers: key ? { Authorization: `Bearer ${key}` } : {}, cache: "no-store" });
    if (resp.status === 401) {
      if (key === apiKey()) showAuth(true);   // not for an answer to a key already replaced
      throw new AuthError(path);
    }
    if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
    return resp.json();
  }

  function showAuth(needed) {
    state.authNeeded = needed;
    $("#auth").hidden = !needed;
    document.body.classList.toggle("locked", needed);
    if (needed) $("#api-key").focus();
  }

  // ------------------------------------------------------------- node / header
  function renderNode(node) {
    state.node = node;
    state.skew = node.now - nowBrowser();
    const w = node.wallet;
    const worker = node.role === "worker";
    state.symbol = (w && w.token_symbol) || "";
    state.decimals = w && w.token_decimals != null ? w.token_decimals : null;
    document.body.dataset.role = worker ? "worker" : "gateway";
    document.body.classList.toggle("no-wallet", !w);

    const role = $("#role");
    role.textContent = worker ? "Worker" : "Gateway";
    role.setAttribute("data-role", node.role);
    const peer = $("#peer");
    peer.textContent = shortId(node.peer_id);
    peer.title = [node.peer_id, ...(node.addrs || [])].join("\n");
    $("#version").textContent = node.version || "—";
    document.title = `llmarket · ${role.textContent} ${shortId(node.peer_id)}`;

    setText("#balance", w ? amountNode(w.token_balance) : "—", w ? w.token_balance : null);
    const address = $("#address");
    address.textContent = w ? shortId(w.address) : "";
    address.title = w ? w.address : "";
    setText("#earned", w ? amountNode(w.claimed) : "—", w ? w.claimed : 0);
    const unclaimed = w && w.receipted != null ? String(big(w.receipted) - big(w.claimed)) : null;
    setText("#unclaimed", w ? amountNode(unclaimed) : "—", unclaimed);
    setText("#receipted", w ? amountNode(w.receipted) : "—", w ? w.receipted : null);
    setText("#signed", w ? amountNode(w.signed) : "—", w ? w.signed : null);
    setText("#deposit", w ? amountNode(w.deposit) : "—", w ? w.deposit : null);
    setText("#reserve", w && w.reserve_total != null
      ? `${tokens(w.reserve_left)} left of ${tokens(w.reserve_total)}, ${int(w.slots_used || 0)}/${int(w.slots || 0)} slots used`
      : "—", w ? w.reserve_left : null);
    setText("#unlock", !w || !w.unlock_at ? "not unlocking"
      : w.unlock_at > nowServer() ? `unlocking: withdraw in ${duration(w.unlock_at - nowServer())}` : "unlocked: can withdraw",
      w ? w.unlock_at : null);

    const t = node.totals || {};
    setText("#spent", amountNode(t.spent || "0"), t.spent || "0");
    setText("#run-earned", amountNode(t.earned || "0"), t.earned || "0");
    setText("#jobs-total", int(t.jobs || 0), t.jobs || 0);
    setText("#tokens-total", int(t.tokens || 0), t.tokens || 0);
    setText("#failovers-total", plural(t.failovers || 0, "failover"), t.failovers || 0);
    setText("#checks-total", [`${plural(t.checks || 0, "verification check")}`,
      t.checks_failed ? h("span", { class: "bad" }, `, ${int(t.checks_failed)} failed`) : null], t.checks || 0);

    const s = node.worker;
    if (s) {
      $("#serving-name").textContent = modelLabel(s.model.name, s.model.cid);
      $("#serving-name").title = s.model.name || s.model.cid;
      const cid = $("#serving-cid");
      if (cid.dataset.cid !== s.model.cid) cid.replaceChildren(cidButton(s.model.cid));
      cid.dataset.cid = s.model.cid;
      setText("#serving-slots", `${s.slots_free} / ${s.slots_total}`, s.slots_free);
      setText("#serving-tps", dec(s.tokens_per_s), s.tokens_per_s);
      setText("#serving-price", amountNode(s.price_per_1k), s.price_per_1k);
      setText("#serving-verify", amountNode(s.verify_price_per_1k), s.verify_price_per_1k);
      setText("#serving-repro", s.reproducible ? "yes" : "no");
      $("#serving-repro").title = s.numerics ? `numerics ${s.numerics}` : "";
    }
    $("#cost-head").textContent = withUnit("Cost");
    $("#amount-title").textContent = worker ? "Earned per minute" : "Spent per minute";
    tick();
  }

  // -------------------------------------------------------------------- market
  function marketRow(model, w) {
    const cls = [w.self && "self", w.banned && "banned"].filter(Boolean).join(" ") || null;
    const rep = w.reputation;
    const repClass = rep == null ? "" : rep >= 0.8 ? "good" : rep >= 0.5 ? "warn" : "bad";
    const td = (field, content, extra = {}) => h("td", { "data-field": field, ...extra }, content);
    return h("tr", { "data-peer": w.peer_id, "data-model": model.cid, class: cls },
      td("peer", [peerCode(w.peer_id), w.self && badge("this node", "self"), w.banned && badge("banned", "banned",
        "caught returning output that did not match the model; not routed to")]),
      td("price_per_1k", tokens(w.price_per_1k), { class: "num", "data-value": w.price_per_1k,
        title: `${w.price_per_1k} base units; verification: ${tokens(w.verify_price_per_1k)} per 1k tokens` }),
      td("slots", `${w.slots_free} / ${w.slots_total}`, { class: "num", "data-value": w.slots_free,
        "data-total": w.slots_total }),
      td("tokens_per_s", dec(w.tokens_per_s), { class: "num", "data-value": w.tokens_per_s,
        title: w.first_token_ms != null ? `first token in ${dec(w.first_token_ms, 0)} ms` : null }),
      td("latency_ms", w.latency_ms == null ? "—" : `${dec(w.latency_ms)} ms`, { class: "num",
        "data-value": w.latency_ms, title: w.latency_ms == null ? "not measured yet" : "round trip from this node" }),
      td("reputation", rep == null ? h("span", { class: "muted" }, "—") : h("span", { class: `rep ${repClass}` },
        h("span", { class: "bar" }, h("span", { style: `width:${Math.round(Math.min(1, Math.max(0, rep)) * 100)}%` })),
        dec(rep, 2)), { class: "num", "data-value": rep }),
      td("reachability", w.reachability || "unknown", { class: `status reach-${w.reachability || "unknown"}` }),
      td("hardware", w.hardware || "—", { class: "hardware", title: w.hardware || null }),
      td("age", duration(w.age_s), { class: "num", "data-age": w.age_s }),
      td("reproducible", w.reproducible ? "yes" : "no", { class: w.reproducible ? "" : "muted" }),
    );
  }

  function renderMarket(market) {
    state.market = market;
    state.marketAt = nowBrowser();
    const models = (market.models || []).filter((m) => (m.workers || []).length);
    const offers = models.reduce((n, m) => n + m.workers.length, 0);
    $("#market-count").textContent = models.length ? `${plural(models.length, "model")} · ${plural(offers, "offer")}` : "";
    $("#market-empty").hidden = models.length > 0;
    $("#price-head").textContent = withUnit("Price / 1k");
    const table = $("#market");
    table.hidden = !models.length;
    table.querySelectorAll("tbody").forEach((tb) => tb.remove());
    // One table, one tbody per model (so columns line up across models), headed by a model row.
    for (const m of models) {
      // Cheapest first, banned offers last.
      const rows = [...m.workers].sort((a, b) => (a.banned - b.banned) || (big(a.price_per_1k) < big(b.price_per_1k) ? -1 : big(a.price_per_1k) > big(b.price_per_1k) ? 1 : 0));
      table.append(h("tbody", { "data-model": m.cid },
        h("tr", { class: "model-row" }, h("th", { colspan: 10, scope: "rowgroup" }, h("div", { class: "model-head" },
          h("span", { class: "model-name", title: m.name || m.cid }, modelLabel(m.name, m.cid)),
          m.quantization && h("span", { class: "tag" }, m.quantization),
          m.context && h("span", { class: "tag" }, `${int(m.context)} ctx`),
          cidButton(m.cid),
          h("span", { class: "spacer" }),
          h("span", { class: "muted small" }, plural(rows.length, "worker"))))),
        rows.map((w) => marketRow(m, w))));
    }
    tick();
  }

  // ---------------------------------------------------------------------- jobs
  // A snapshot fetched before an event may arrive after it: never let a job go backwards.
  function newer(old, j) {
    if (!old) return j;
    if (old.state !== "running" && j.state === "running") return old;
    if (old.state === "running" && j.state === "running" && (old.tokens || 0) > (j.tokens || 0)) return old;
    return j;
  }

  function fillJobRow(tr, j) {
    const td = (field, content, extra = {}) => h("td", { "data-field": field, ...extra }, content);
    const v = j.verification;
    const dur = Math.max(0, (j.ended_at || nowServer()) - j.started_at);
    tr.className = `state-${j.state}`;
    tr.replaceChildren(
      td("time", clock(j.started_at), { class: "mono-num", title: `${fullDate(j.started_at)}\nran ${dec(dur, 1)} s` }),
      td("kind", h("span", { class: `kind kind-${j.kind}` }, j.kind)),
      td("model", modelLabel(j.model_name, j.model), { title: j.model, class: "model" }),
      td("peer", peerCode(j.peer)),
      td("prompt_tokens", String(j.prompt_tokens ?? 0), { class: "num", "data-value": j.prompt_tokens ?? 0 }),
      td("tokens", String(j.tokens ?? 0), { class: "num", "data-value": j.tokens ?? 0 }),
      td("tokens_per_s", dec(j.tokens_per_s), { class: "num", "data-value": j.tokens_per_s }),
      td("state", j.state, { class: `status state-${j.state}`, title: j.detail || null, "data-value": j.state }),
      td("cost", tokens(j.cost || "0"), { class: "num", "data-value": j.cost || "0", title: `${j.cost || 0} base units` }),
      td("failovers", String((j.failovers || []).length), { class: `num ${(j.failovers || []).length ? "warn-text" : "muted"}`,
        title: (j.failovers || []).length ? `tried before:\n${j.failovers.join("\n")}` : null,
        "data-value": (j.failovers || []).length }),
      td("verification", v == null ? h("span", { class: "muted" }, "—") : v.ok
        ? h("span", { class: "ok", title: `verified (${v.how})` }, "✓")
        : h("span", { class: "fail", title: `check failed (${v.how})${v.reason ? `: ${v.reason}` : ""}` }, "✗"),
      { class: "center", "data-value": v == null ? "" : String(v.ok) }),
    );
  }

  function upsertJob(j) {
    const tbody = $("#jobs tbody");
    const keep = newer(state.jobs.get(j.id), j);
    state.jobs.set(j.id, keep);
    let tr = tbody.querySelector(`tr[data-job="${CSS.escape(j.id)}"]`);
    if (!tr) {
      tr = h("tr", { "data-job": j.id });
      // Newest first: insert before the first row that started earlier.
      const after = [...tbody.rows].find((r) => (state.jobs.get(r.dataset.job) || {}).started_at < keep.started_at);
      tbody.insertBefore(tr, after || null);
      while (tbody.rows.length > MAX_JOBS) {
        const last = tbody.rows[tbody.rows.length - 1];
        state.jobs.delete(last.dataset.job);
        last.remove();
      }
    }
    fillJobRow(tr, keep);
    $("#jobs-empty").hidden = true;
  }

  function renderJobs(jobs) {
    // Oldest first so each insert lands on top; rows for jobs already shown are updated in place.
    [...jobs].sort((a, b) => a.started_at - b.started_at).forEach(upsertJob);
    $("#jobs-empty").hidden = state.jobs.size > 0;
  }

  // ------------------------------------------------------------------ payments
  function renderPayments(data) {
    const worker = data.role === "worker";
    $("#signed-head").textContent = withUnit(worker ? "Receipted" : "Signed");
    $("#claimed-head").textContent = withUnit("Claimed");
    $("#pending-head").textContent = withUnit("Pending");
    const td = (field, content, extra = {}) => h("td", { "data-field": field, ...extra }, content);
    const amountCell = (field, n) => td(field, tokens(n), { class: `num ${n == null ? "muted" : ""}`, "data-value": n });
    const rows = (data.pairs || []).map((p) =>
      h("tr", { "data-counterparty": p.counterparty },
        td("counterparty", [h("code", { class: "mono", title: p.counterparty }, shortId(p.counterparty)),
          p.peer_id && h("span", { class: "muted small" }, " · ", peerCode(p.peer_id))]),
        amountCell("signed", p.signed), amountCell("claimed", p.claimed), amountCell("pending", p.pending),
        td("slot", p.slot ? "held" : "none", { class: p.slot ? "" : "muted" }),
        td("status", p.status, { class: `status pay-${p.status}`, title: p.error || "" })));
    $("#payments tbody").replaceChildren(...rows);
    $("#payments").hidden = !rows.length;
    $("#payments-empty").hidden = rows.length > 0;
  }

  // -------------------------------------------------------------------- charts
  const chartDefs = {
    tokens: { color: "#2563eb", fmt: (v) => dec(v), unit: "tok/s" },
    jobs: { color: "#7c3aed", fmt: (v) => dec(v), unit: "jobs/min" },
    amount: { color: "#059669", fmt: (v) => +v.toPrecision(4), unit: "" },
  };
  const summaries = {};   // what each chart's readout shows when the cursor is not on it

  function makeChart(name) {
    const def = chartDefs[name];
    const el = $(`#chart-${name}`);
    const readout = $(`#readout-${name}`);
    const axis = { stroke: "#6b7280", font: "11px system-ui, sans-serif", ticks: { show: false },
      grid: { stroke: "#eef1f5", width: 1 } };
    const chart = new uPlot({
      width: Math.max(200, el.clientWidth), height: CHART_HEIGHT,
      legend: { show: false },
      padding: [8, 20, 0, 0],  // room on the right for the last time label
      cursor: { y: false, drag: { x: false, y: false }, points: { size: 7, fill: def.color } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] } },
      axes: [{ ...axis, space: 64, size: 30, values: (u, ticks) => ticks.map((t) => clock(t).slice(0, 5)) },
        { ...axis, size: 46, values: (u, vals) => vals.map((v) => (Math.abs(v) >= 1000 ? int(v) : +v.toPrecision(3))) }],
      series: [{}, { stroke: def.color, fill: `${def.color}1f`, width: 1.5, points: { show: false },
        paths: uPlot.paths.stepped({ align: 1 }) }],
      hooks: { setCursor: [(u) => {
        const i = u.cursor.idx;
        readout.textContent = i == null || u.data[0][i] == null ? summaries[name] || ""
          : `${def.fmt(u.data[1][i])} ${def.unit || amountUnit()} · ${clock(u.data[0][i])}`;
      }] },
    }, [[], []], el);
    new ResizeObserver(() => {
      const width = Math.max(200, el.clientWidth);
      if (width !== chart.width) chart.setSize({ width, height: CHART_HEIGHT });
    }).observe(el);
    return chart;
  }
  const amountUnit = () => (state.symbol ? `${state.symbol}/min` : "/min");

  function renderSeries(s) {
    const perBucket = (perMin) => perMin.reduce((a, b) => a + b, 0) * s.bucket_s / 60;
    const peak = Math.max(0, ...s.tokens_per_s);
    summaries.tokens = peak ? `peak ${dec(peak)} tok/s` : "idle this hour";
    const jobs = Math.round(perBucket(s.jobs_per_min));
    summaries.jobs = `${int(jobs)} job${jobs === 1 ? "" : "s"} in the last hour`;
    const amount = s.amount_per_min.map(perToken);
    summaries.amount = `${+perBucket(amount).toPrecision(4)}${state.symbol ? ` ${state.symbol}` : ""} in the last hour`;
    $("#amount-title").textContent = `${s.amount_label === "spent" ? "Spent" : "Earned"} per minute`;
    const series = { tokens: s.tokens_per_s, jobs: s.jobs_per_min, amount };
    for (const [name, chart] of Object.entries(app.charts)) {
      chart.setData([s.t, series[name]]);
      if (chart.cursor.idx == null) $(`#readout-${name}`).textContent = summaries[name];
    }
  }

  // ------------------------------------------------------------------- loading
  const loaders = {
    node: () => api("/api/node").then(renderNode),
    market: () => api("/api/market").then(renderMarket),
    jobs: () => api("/api/jobs?limit=100").then((d) => renderJobs(d.jobs || [])),
    payments: () => api("/api/payments").then(renderPayments),
    series: () => api("/api/series").then(renderSeries),
  };

  // Node first (it sets the role and token symbol the others are labelled with).
  async function load(names) {
    const results = [];
    if (names.includes("node")) results.push(await loaders.node().then(() => null, (e) => e));
    if (results[0] instanceof AuthError) return false;
    const rest = names.filter((n) => n !== "node");
    results.push(...(await Promise.all(rest.map((n) => loaders[n]().then(() => null, (e) => e)))));
    const failures = results.filter(Boolean);
    if (failures.some((e) => e instanceof AuthError)) return false;
    failures.forEach((e) => console.warn("llmarket:", e.message));
    if (!failures.length) showAuth(false);
    return !failures.length;
  }

  async function loadAll() {
    const ok = await load(["node", "market", "jobs", "payments", "series"]);
    if (ok || state.node) app.ready = true;
  }

  let seriesTimer = null;
  function refreshSeriesSoon() {
    clearTimeout(seriesTimer);
    seriesTimer = setTimeout(() => load(["series", "node"]), 700);
  }

  // -------------------------------------------------------------------- events
  let source = null;
  let opened = false;
  let retryTimer = null;

  function setLive(live) {
    const el = $("#live");
    el.textContent = live ? "live" : "reconnecting…";
    el.classList.toggle("on", live);
  }

  function openEvents() {
    clearTimeout(retryTimer);
    if (source) source.close();
    const key = apiKey();
    const es = (source = new EventSource("/api/events" + (key ? "?key=" + encodeURIComponent(key) : "")));
    const parse = (fn) => (e) => {
      try { fn(JSON.parse(e.data)); } catch (err) { console.warn("llmarket: bad event", err); }
    };
    es.addEventListener("open", () => {
      setLive(true);
      if (opened) loadAll();        // catch up on whatever happened while disconnected
      opened = true;
    });
    es.addEventListener("error", () => {
      setLive(false);
      // EventSource retries by itself after a dropped stream, but gives up for good on an
      // HTTP error answer (such as 401): then retry here, and probe for a missing key.
      if (es.readyState === EventSource.CLOSED && !state.authNeeded) {
        const retry = () => { if (source === es) retryTimer = setTimeout(openEvents, 5000); };
        loaders.node().then(retry, (e) => { if (!(e instanceof AuthError)) retry(); });
      }
    });
    es.addEventListener("job", parse((j) => {
      upsertJob(j);
      if (j.state !== "running") refreshSeriesSoon();
    }));
    es.addEventListener("market", parse(renderMarket));
    es.addEventListener("node", parse((node) => {
      // Receipts or claims moved: the payments table follows at once, not at the next poll.
      const wallet = JSON.stringify(node.wallet && { ...node.wallet, token_balance: null });
      if (state.node && wallet !== JSON.stringify(state.node.wallet && { ...state.node.wallet, token_balance: null })) {
        load(["payments"]);
      }
      renderNode(node);
    }));
  }

  // Once a second: offer ages and uptime move on without a new snapshot.
  function tick() {
    const since = nowBrowser() - state.marketAt;
    for (const cell of document.querySelectorAll('#market td[data-field="age"]')) {
      cell.textContent = duration(parseFloat(cell.dataset.age) + since);
    }
    if (state.node) $("#uptime").textContent = duration(nowServer() - state.node.started_at);
  }

  // ---------------------------------------------------------------------- start
  function start() {
    for (const name of Object.keys(chartDefs)) {
      if (typeof uPlot !== "undefined") app.charts[name] = makeChart(name);
      else $(`#chart-${name}`).textContent = "The chart library is missing: run scripts/setup (it copies uPlot from npm).";
    }
    $("#auth-form").addEventListener("submit", (e) => {
      e.preventDefault();
      localStorage.setItem(KEY_STORE, $("#api-key").value.trim());
      showAuth(false);
      loadAll();
      openEvents();
    });
    setInterval(tick, 1000);
    setInterval(() => { if (!state.authNeeded) load(["node", "market", "payments", "series"]); }, POLL_MS);
    loadAll();
    openEvents();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
