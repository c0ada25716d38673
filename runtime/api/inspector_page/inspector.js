// The Outbound inspector: recent runs, one run's deliveries, destination health, live.
//
// Reads the API it is served by, through relative URLs (so it works under any mount
// prefix): GET runs (the list), runs/<id> (a run), healthz, stats, and the SSE stream
// inspector/events (notices: a run started or ended, a delivery became final), on which
// it reloads what it shows; health also every few seconds (circuits open without a
// notice). With OUTBOUND_API_TOKEN it asks for the token once, keeps it in
// sessionStorage (this tab only) and sends it as a bearer header (the EventSource as
// ?token=, since EventSource cannot set headers). Everything is built with textContent:
// no data ever becomes HTML.
"use strict";

(() => {
  const TOKEN_KEY = "outbound-inspector-token";
  const PAGE_SIZE = 50;
  const REFRESH_DELAY = 250; // ms notices gather before the view reloads once
  const HEALTH_EVERY = 2000; // ms: health and counters reload at most this often
  // ms: and at least this often while the list is shown: a circuit opens or a batch starts
  // failing without any run ending, so no notice would tell.
  const HEALTH_POLL = 5000;
  const RECONNECT_AFTER = 3000; // ms after the stream was refused or closed

  const state = {
    route: {},
    cursors: [], // the `before` of each page shown before this one
    shownRuns: new Set(),
    dirty: false,
    refreshTimer: null,
    healthTimer: null,
    healthLoadedAt: 0,
    healthPoll: null,
    source: null,
    reconnectTimer: null,
    lastListHash: "#",
    // Bumped by each load of the list or a run: a load that a later one overtook (a
    // refresh still in flight when the route changed) must not draw over it.
    loads: 0,
  };

  const $ = (id) => document.getElementById(id);

  class Unauthorized extends Error {}

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function api(path, acceptStatuses = []) {
    const headers = { Accept: "application/json" };
    const current = token();
    if (current) headers.Authorization = "Bearer " + current;
    const response = await fetch(path, { headers, cache: "no-store" });
    if (response.status === 401) throw new Unauthorized("the API token was refused");
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok && !acceptStatuses.includes(response.status)) {
      const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  // -- small DOM helpers -------------------------------------------------------------------

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function pad(number) {
    return String(number).padStart(2, "0");
  }

  function formatTime(seconds) {
    if (!seconds) return "—";
    const d = new Date(seconds * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function timeElement(seconds) {
    if (!seconds) return el("span", { text: "—" });
    return el("time", { datetime: new Date(seconds * 1000).toISOString(), text: formatTime(seconds) });
  }

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 1) return `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1)} ms`;
    if (seconds < 120) return `${seconds.toFixed(2)} s`;
    return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  }

  function badge(status, extraClass = "") {
    return el("span", { className: `badge status-${status} ${extraClass}`.trim(), text: status });
  }

  function showProblem(message) {
    const box = $("problem");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function setLive(text, live) {
    const box = $("live");
    box.textContent = text;
    box.classList.toggle("on", Boolean(live));
  }

  // -- the token -----------------------------------------------------------------------------

  function askForToken(refused) {
    for (const id of ["health-section", "list-section", "run-section"]) $(id).hidden = true;
    $("token-section").hidden = false;
    $("forget-token").hidden = true;
    $("token-problem").textContent = refused ? "That token was refused; try again." : "";
    setLive("Waiting for the token", false);
    if (state.source) state.source.close();
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    $("token-section").hidden = true;
    start();
  });

  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken(false);
  });

  function handle(error) {
    if (error instanceof Unauthorized) {
      const hadToken = Boolean(token());
      sessionStorage.removeItem(TOKEN_KEY);
      askForToken(hadToken);
      return;
    }
    showProblem(`Could not load: ${error.message}`);
  }

  // -- routes: #run=<id> for a run, else the list with its filters -------------------------

  function parseRoute() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    const route = {};
    for (const [name, value] of params) if (value) route[name] = value;
    return route;
  }

  function listHash(filters) {
    const params = new URLSearchParams();
    for (const name of ["workflow", "status", "destination", "delivery", "before"]) {
      if (filters[name]) params.set(name, filters[name]);
    }
    const text = params.toString();
    return text ? `#${text}` : "#";
  }

  async function render() {
    state.route = parseRoute();
    showProblem("");
    try {
      if (state.route.run) await showRun(state.route.run, true);
      else await showList(true);
    } catch (error) {
      handle(error);
    }
  }

  window.addEventListener("hashchange", render);

  // -- the list ----------------------------------------------------------------------------------

  function fillSelect(select, values) {
    const chosen = select.value;
    const known = new Set([...select.options].map((option) => option.value));
    for (const value of values) {
      if (!known.has(value)) select.append(el("option", { text: value }));
    }
    select.value = chosen;
  }

  function deliveryChips(destinations) {
    const chips = el("div", { className: "chips" });
    const cell = el("td", {}, chips);
    const names = Object.keys(destinations).sort();
    if (!names.length) chips.append(el("span", { className: "note", text: "no sends" }));
    for (const name of names) {
      const counts = destinations[name];
      const words = [];
      const chip = el("span", { className: "chip" }, el("span", { className: "dname", text: name }));
      for (const [status, mark] of [["delivered", "✓"], ["retrying", "↻"], ["failed", "✗"], ["pending", "…"]]) {
        if (!counts[status]) continue;
        words.push(`${counts[status]} ${status}`);
        chip.append(el("span", { className: `count count-${status}`, title: status, text: `${mark}${counts[status]}` }));
      }
      chip.setAttribute("aria-label", `${name}: ${words.join(", ")}`);
      chips.append(chip);
    }
    return cell;
  }

  function runRow(run) {
    const link = el("a", { href: `#run=${encodeURIComponent(run.run_id)}`, className: "run-link" },
      el("code", { text: run.run_id }));
    const running = run.status === "running";
    const status = el("td", {}, badge(run.status, running ? "in-progress" : ""));
    if (run.error) status.append(el("div", { className: "error-line", text: run.error }));
    // A run in progress: when it started, and its sends are told when it ends.
    return el("tr", { "data-run-id": run.run_id, "data-status": run.status, className: running ? "in-progress" : null },
      el("td", { className: "when" }, timeElement(running ? run.started_at : run.started_at + run.duration)),
      el("td", {}, link),
      el("td", { text: run.workflow_id }),
      status,
      running ? el("td", { className: "note", text: "sends are told when it ends" }) : deliveryChips(run.destinations),
      running
        ? el("td", { className: "num when elapsed", "data-since": String(run.started_at), text: `for ${formatDuration(run.duration)}` })
        : el("td", { className: "num when", text: formatDuration(run.duration) }));
  }

  // Runs in progress show how long they have been running: counted here, not asked for.
  setInterval(() => {
    for (const cell of document.querySelectorAll("#runs .elapsed")) {
      cell.textContent = `for ${formatDuration(Math.max(0, Date.now() / 1000 - Number(cell.dataset.since)))}`;
    }
  }, 1000);

  async function showList(fresh) {
    const route = state.route;
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    for (const name of ["workflow", "status", "destination", "delivery", "before"]) {
      if (route[name]) query.set(name, route[name]);
    }
    const load = ++state.loads;
    const page = await api(`runs?${query}`);
    if (load !== state.loads) return;
    $("run-section").hidden = true;
    $("list-section").hidden = false;
    // Health as last loaded, at once: appearing later above the list, it would move the
    // rows under the pointer (it reloads below: loadHealth).
    if ($("counters").children.length) $("health-section").hidden = false;
    fillSelect($("f-workflow"), page.workflows || []);
    for (const name of ["workflow", "status", "destination", "delivery"]) {
      $(`f-${name}`).value = route[name] || "";
    }
    state.lastListHash = listHash(route);
    const body = $("runs");
    const running = page.running || [];
    body.replaceChildren(...running.map(runRow), ...page.runs.map(runRow));
    state.shownRuns = new Set([...running, ...page.runs].map((run) => run.run_id));
    $("empty").hidden = page.runs.length + running.length > 0;
    $("scope").textContent =
      (page.scope === "cluster"
        ? `The runs of every node of the cluster (seen from ${page.node || "this node"}), newest first: `
        : `The runs of this node${page.node ? ` (${page.node})` : ""}, newest first: `) +
      `${page.kept} kept (OUTBOUND_RUN_HISTORY). Updates live.` +
      (page.running_total
        ? ` ${page.running_total} in progress on this node` +
          (page.running_total > running.length ? ` (the newest ${running.length} shown).` : ".")
        : "");
    $("older").disabled = !page.next;
    $("older").dataset.next = page.next || "";
    $("newer").disabled = !route.before;
    const number = state.cursors.length + 1;
    $("page-label").textContent = `Page ${route.before ? number : 1}`;
    if (!route.before) {
      state.cursors = [];
      $("newer-notice").hidden = true;
    }
    if (fresh) loadHealth();
  }

  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const filters = {};
    for (const name of ["workflow", "status", "destination", "delivery"]) filters[name] = $(`f-${name}`).value;
    state.cursors = [];
    location.hash = listHash(filters);
  });

  $("clear-filters").addEventListener("click", () => {
    state.cursors = [];
    location.hash = "#";
  });

  $("older").addEventListener("click", () => {
    const next = $("older").dataset.next;
    if (!next) return;
    state.cursors.push(state.route.before || "");
    location.hash = listHash({ ...state.route, before: next });
  });

  $("newer").addEventListener("click", () => {
    const before = state.cursors.pop() || "";
    location.hash = listHash({ ...state.route, before });
  });

  $("show-newest").addEventListener("click", () => {
    state.cursors = [];
    location.hash = listHash({ ...state.route, before: "" });
  });

  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const runId = $("run-id").value.trim();
    if (runId) location.hash = `#run=${encodeURIComponent(runId)}`;
  });

  $("runs").addEventListener("click", (event) => {
    // The whole row opens the run (the run id is the keyboard-reachable link).
    if (event.target.closest("a")) return;
    const row = event.target.closest("tr[data-run-id]");
    if (row) location.hash = `#run=${encodeURIComponent(row.dataset.runId)}`;
  });

  // -- one run -----------------------------------------------------------------------------------

  function fact(list, name, ...value) {
    list.append(el("dt", { text: name }), el("dd", {}, ...value));
  }

  function jsonText(value) {
    return typeof value === "string" ? value : JSON.stringify(value, null, 2);
  }

  const DETAIL_LABELS = {
    status_code: "HTTP status",
    url: "URL",
    latency_ms: "Attempt latency",
    response: "Response",
    bucket: "Bucket",
    key: "Key",
    object_bytes: "Object bytes",
    object_events: "Events in object",
    table: "Table",
    recipients: "Recipients",
    message_id: "Message-ID",
    smtp_code: "SMTP code",
    smtp_reply: "SMTP reply",
    refused: "Refused recipients",
    channel: "Channel",
    event_id: "Event id",
    subscribers: "Subscribers",
    listener_runs: "Listener runs",
    depth: "Emit depth",
    replayed_from: "Replayed from",
  };

  function utcSecond(seconds) {
    return new Date(seconds * 1000).toISOString().replace(/\.\d+Z$/, "Z");
  }

  function replayCommand(delivery) {
    // The second it was dead-lettered (when it became final): `--since`/`--until` bound it.
    const failedAt = Math.floor(delivery.finished_at || delivery.accepted_at || 0);
    return `outbound replay --destination ${delivery.destination} ` +
      `--since ${utcSecond(failedAt)} --until ${utcSecond(failedAt + 1)}`;
  }

  function detailCell(delivery) {
    const cell = el("td", { className: "detail" });
    const detail = delivery.detail || {};
    const list = el("dl", { className: "detail-list" });
    if (detail.bucket && detail.key) {
      fact(list, "Object", el("code", { text: `s3://${detail.bucket}/${detail.key}` }));
    }
    for (const [name, value] of Object.entries(detail)) {
      if (name === "dead_letter" || name === "dead_letter_error") continue;
      if ((name === "bucket" || name === "key") && detail.bucket && detail.key) continue;
      const label = DETAIL_LABELS[name] || name;
      if (name === "listener_runs") {
        const runs = el("ul", { className: "plain" });
        for (const run of value || []) {
          runs.append(el("li", {}, el("a", { href: `#run=${encodeURIComponent(run.run_id)}` },
            el("code", { text: run.run_id })), ` (${run.workflow_id})`));
        }
        if (!runs.children.length) runs.append(el("li", { text: "none (no listener)" }));
        fact(list, label, runs);
      } else if (name === "response") {
        fact(list, label, el("pre", { className: "excerpt", text: jsonText(value) }));
      } else if (name === "latency_ms") {
        fact(list, label, `${value} ms`);
      } else if (Array.isArray(value)) {
        fact(list, label, value.join(", "));
      } else if (value !== null && typeof value === "object") {
        fact(list, label, el("pre", { className: "excerpt", text: jsonText(value) }));
      } else {
        fact(list, label, String(value));
      }
    }
    if (delivery.error) fact(list, "Error", el("span", { className: "error-line", text: delivery.error }));
    if (delivery.status === "retrying" && delivery.next_try_at) {
      fact(list, "Next try", timeElement(delivery.next_try_at));
    }
    if (list.children.length) cell.append(list);
    if (detail.dead_letter || detail.dead_letter_error) {
      const box = el("div", { className: "dead-letter" });
      if (detail.dead_letter) {
        box.append(el("p", {}, "Dead-lettered to ", el("code", { text: detail.dead_letter })));
        box.append(el("p", { text: "Once the cause is fixed, send it again with its delivery id:" }));
        box.append(el("pre", { className: "command", text: replayCommand(delivery) }));
      }
      if (detail.dead_letter_error) {
        box.append(el("p", { className: "error-line", text: `Dead-lettering failed: ${detail.dead_letter_error}` }));
      }
      cell.append(box);
    }
    if (!cell.children.length) cell.append(el("span", { className: "note", text: "—" }));
    return cell;
  }

  function deliveryRow(delivery) {
    const latency = delivery.finished_at ? delivery.finished_at - delivery.accepted_at : null;
    return el("tr", { "data-delivery-id": delivery.id, "data-status": delivery.status },
      el("th", { scope: "row" }, delivery.destination, el("div", {}, el("code", { className: "small", text: delivery.id }))),
      el("td", {}, badge(delivery.status)),
      el("td", { className: "num", text: String(delivery.attempts) }),
      el("td", { className: "num when", title: "from the send call until final", text: latency === null ? "not final" : formatDuration(latency) }),
      detailCell(delivery));
  }

  async function showRun(runId, fresh) {
    let run;
    const load = ++state.loads;
    try {
      run = await api(`runs/${encodeURIComponent(runId)}`);
    } catch (error) {
      if (load !== state.loads) return;
      if (error.status === 404) {
        $("list-section").hidden = true;
        $("health-section").hidden = true;
        $("run-section").hidden = false;
        $("run-title").textContent = `Run ${runId}`;
        $("run-facts").replaceChildren();
        $("run-error").hidden = true;
        $("deliveries").replaceChildren();
        $("no-deliveries").hidden = true;
        showProblem(`No run ${runId}: ${(error.message || "").replace(/^no run '[^']*' \((.*)\)$/, "$1") || "unknown"}.`);
        return;
      }
      throw error;
    }
    if (load !== state.loads) return;
    $("list-section").hidden = true;
    $("health-section").hidden = true; // the run first; the list shows health
    $("run-section").hidden = false;
    $("run-title").textContent = `Run ${run.run_id}`;
    const facts = $("run-facts");
    facts.replaceChildren();
    if (run.status === "running") {
      fact(facts, "Status", badge("running"));
    } else {
      fact(facts, "Workflow", run.workflow_id);
      fact(facts, "Status", badge(run.status));
      fact(facts, "Started", timeElement(run.started_at));
      fact(facts, "Duration", formatDuration(run.duration));
      fact(facts, "Sends", `${run.delivered} of ${run.sends} delivered`);
      if (run.value !== null && run.value !== undefined) {
        fact(facts, "Result", el("code", { text: jsonText(run.value) }));
      }
    }
    showEvent(run);
    $("run-error").hidden = !run.error;
    $("run-error-text").textContent = run.error || "";
    $("run-traceback-box").hidden = !run.traceback;
    $("run-traceback").textContent = run.traceback || "";
    const deliveries = run.deliveries || [];
    $("deliveries").replaceChildren(...deliveries.map(deliveryRow));
    $("no-deliveries").hidden = deliveries.length > 0 || run.status === "running";
    if (fresh) $("run-title").focus();
  }

  function showEvent(run) {
    // The event as the run kept it: JSON text cut to OUTBOUND_RUN_EVENT_EXCERPT characters.
    const box = $("run-event");
    const note = $("run-event-note");
    const text = run.event;
    box.hidden = text === null || text === undefined;
    if (box.hidden) {
      box.textContent = "";
      note.textContent = run.status === "running"
        ? "Shown once the run has ended."
        : "Not kept (OUTBOUND_RUN_EVENT_EXCERPT is 0, or the run ended before it was kept).";
      return;
    }
    let shown = text;
    try {
      shown = JSON.stringify(JSON.parse(text), null, 2);
    } catch (_) {
      shown = text; // cut short, or a Python repr: shown as it is
    }
    box.textContent = shown;
    note.textContent = text.endsWith("…")
      ? "Cut to OUTBOUND_RUN_EVENT_EXCERPT characters."
      : "";
  }

  // -- health and counters -------------------------------------------------------------------

  async function loadHealth() {
    state.healthLoadedAt = Date.now();
    const [health, stats] = await Promise.all([api("healthz", [503]), api("stats")]);
    $("health-section").hidden = Boolean(state.route.run) || !$("token-section").hidden;
    const status = $("health-status");
    status.textContent = health.status;
    status.className = `badge status-${health.status === "ok" ? "delivered" : "failed"}`;
    const counters = $("counters");
    counters.replaceChildren();
    const runs = stats.runs || {};
    fact(counters, "State", health.state);
    fact(counters, "Runs succeeded", String(runs.succeeded || 0));
    fact(counters, "Runs ended early", String(runs.ended || 0));
    fact(counters, "Runs failed", String(runs.failed || 0));
    fact(counters, "Runs in flight", String(stats.runs_in_flight || 0));
    fact(counters, "Sends not final", String(stats.unfinished || 0));
    if (stats.admission) {
      fact(counters, "Admission", `${stats.admission.in_flight} of ${stats.admission.limit}` +
        (stats.admission.waiting ? `, ${stats.admission.waiting} waiting` : ""));
    }
    if (stats.journal) fact(counters, "Journal", stats.journal.connected ? "connected" : "disconnected");
    const actors = health.destinations || {};
    const openCircuits = Object.keys((actors.http || {}).open_circuits || {}).length;
    const retryingBatches = Object.values(actors).reduce((sum, actor) => sum + (actor.retrying_batches || 0), 0);
    fact(counters, "Open circuits", String(openCircuits));
    fact(counters, "Batches retrying", String(retryingBatches));
    if (health.error) fact(counters, "Supervisor", el("span", { className: "error-line", text: health.error }));
    const counts = stats.destinations || {};
    const names = [...new Set([...Object.keys(actors), ...Object.keys(counts)])].sort();
    fillSelect($("f-destination"), names);
    $("f-destination").value = state.route.destination || "";
    $("destinations").replaceChildren(...names.map((name) => {
      const actor = actors[name] || {};
      const count = counts[name] || {};
      const actorCell = el("td", {}, actor.status ? badge(actor.status === "running" ? "running" : actor.status) : "—");
      if (actor.last_error) actorCell.append(el("div", { className: "error-line", text: actor.last_error }));
      return el("tr", {},
        el("th", { scope: "row", text: name }),
        actorCell,
        el("td", { className: "num", text: String(count.delivered || 0) }),
        el("td", { className: "num", text: String(count.retrying || 0) }),
        el("td", { className: "num", text: String(count.failed || 0) }),
        el("td", { className: "num", text: String(count.pending || 0) }),
        el("td", { className: "num", text: String(count.retries || 0) }),
        troubleCell(actor));
    }));
  }

  function troubleCell(actor) {
    // What needs a look now: open circuits (by host), gone endpoints, batches retrying.
    const items = el("ul");
    for (const [host, circuit] of Object.entries(actor.open_circuits || {})) {
      const item = el("li", {}, "circuit open to ", el("code", { text: host }),
        ` after ${circuit.failures} failures; ${circuit.probing ? "probing now" : "next probe"} `,
        circuit.probing ? "" : timeElement(circuit.next_probe_at));
      if (circuit.last_error) item.append(el("div", { className: "error-line", text: circuit.last_error }));
      items.append(item);
    }
    if (actor.gone_endpoints) {
      items.append(el("li", { text: `${actor.gone_endpoints} endpoint(s) gone (410): rt.enable_endpoint(url)` }));
    }
    if (actor.retrying_batches) {
      const item = el("li", { text: `${actor.retrying_batches} batch${actor.retrying_batches === 1 ? "" : "es"} retrying` +
        (actor.retrying_for ? ` for ${formatDuration(actor.retrying_for)}` : "") });
      items.append(item);
    }
    const cell = el("td", { className: "trouble" });
    if (items.children.length) cell.append(items);
    else cell.append(el("span", { className: "note", text: "—" }));
    return cell;
  }

  function scheduleHealth() {
    if (state.healthTimer) return;
    const wait = Math.max(0, HEALTH_EVERY - (Date.now() - state.healthLoadedAt));
    state.healthTimer = setTimeout(() => {
      state.healthTimer = null;
      loadHealth().catch(handle);
    }, wait);
  }

  // -- live: the notices stream ------------------------------------------------------------------

  function scheduleRefresh() {
    state.dirty = true;
    if (state.refreshTimer) return;
    state.refreshTimer = setTimeout(async () => {
      try {
        while (state.dirty) {
          state.dirty = false;
          if (state.route.run) await showRun(state.route.run, false);
          else await showList(false);
        }
      } catch (error) {
        handle(error);
      } finally {
        state.refreshTimer = null;
      }
    }, REFRESH_DELAY);
  }

  function matchesFilters(run) {
    const route = state.route;
    if (route.workflow && run.workflow_id !== route.workflow) return false;
    if (route.status && run.status !== route.status) return false;
    return true;
  }

  function onNotice(kind, notice) {
    scheduleHealth();
    const route = state.route;
    if (route.run) {
      if (notice.run_id === route.run) scheduleRefresh();
      return;
    }
    if (kind === "run") {
      if (!matchesFilters(notice)) return;
      if (route.before) {
        $("newer-notice").hidden = false;
      } else {
        state.shownRuns.add(notice.run_id); // its deliveries may end before the list reloads
        scheduleRefresh();
      }
    } else if (state.shownRuns.has(notice.run_id)) {
      scheduleRefresh();
    }
  }

  function connectLive() {
    clearTimeout(state.reconnectTimer);
    if (state.source) state.source.close();
    const current = token();
    const source = new EventSource("inspector/events" + (current ? `?token=${encodeURIComponent(current)}` : ""));
    state.source = source;
    source.addEventListener("open", () => {
      setLive("Live", true);
      scheduleRefresh(); // whatever happened while it was not connected
      scheduleHealth();
    });
    for (const kind of ["run", "delivery"]) {
      source.addEventListener(kind, (event) => onNotice(kind, JSON.parse(event.data)));
    }
    source.addEventListener("overflow", () => {
      scheduleRefresh();
      scheduleHealth();
    });
    source.addEventListener("error", () => {
      if (source !== state.source) return;
      if (source.readyState === EventSource.CLOSED) {
        // Refused (a stopped runtime, a token changed elsewhere) or cut off: try again soon.
        setLive("Not live: reconnecting…", false);
        state.reconnectTimer = setTimeout(connectLive, RECONNECT_AFTER);
      } else {
        setLive("Reconnecting…", false);
      }
    });
  }

  // -- start ---------------------------------------------------------------------------------------

  async function start() {
    $("forget-token").hidden = !token();
    try {
      await render();
    } catch (error) {
      handle(error);
      return;
    }
    if (!$("token-section").hidden) return;
    connectLive();
    if (!state.healthPoll) {
      state.healthPoll = setInterval(() => {
        if (!document.hidden && !state.route.run && $("token-section").hidden) scheduleHealth();
      }, HEALTH_POLL);
    }
  }

  $("home").addEventListener("click", (event) => {
    event.preventDefault();
    state.cursors = [];
    location.hash = "#";
    if (!location.hash || location.hash === "#") render();
  });
  $("back").addEventListener("click", (event) => {
    event.preventDefault();
    location.hash = state.lastListHash || "#";
  });

  start();
})();
