// The live page of a peerd daemon or local cluster: polls api/status and api/rounds
// (docs/WEB.md) and draws the cluster, the windows, the curves and the last warnings.
// Everything is drawn here, with no library and nothing fetched from elsewhere.
"use strict";

const POLL_MS = 1000;
const MAX_BACKOFF_MS = 10000;
const MAX_RECORDS = 20000; // per series, as the server's replies
const MAX_DRAWN_POINTS = 1200; // per line: longer runs are thinned when drawn
const ASSEMBLED = "assembled";
const ASSEMBLED_COLOR = "#111827";
// Tableau 10: distinct hues that stay apart for the colour-blind.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
  "#ff9da7", "#9c755f", "#bab0ac"];
const SVG = "http://www.w3.org/2000/svg";

const page = { status: null, series: new Map(), axis: "round", failures: 0 };

function element(tag, attributes = {}, text = null, namespace = null) {
  const node = namespace ? document.createElementNS(namespace, tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

function color(peerId) {
  if (peerId === ASSEMBLED) return ASSEMBLED_COLOR;
  const ids = page.status ? page.status.members.map((m) => m.peer_id) : [];
  const index = ids.indexOf(peerId);
  return PALETTE[(index < 0 ? 0 : index) % PALETTE.length];
}

function si(value, digits = 3) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  const magnitude = Math.abs(value);
  const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [scale, unit] of units) {
    if (magnitude >= scale) return `${+(value / scale).toPrecision(digits)}${unit}`;
  }
  if (magnitude > 0 && magnitude < 0.01) return value.toExponential(1);
  return `${+value.toPrecision(digits)}`;
}

function bytes(value) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let shown = Number(value);
  let unit = 0;
  while (shown >= 1024 && unit < units.length - 1) { shown /= 1024; unit += 1; }
  return `${unit ? shown.toFixed(1) : shown} ${units[unit]}`;
}

// ---- polling --------------------------------------------------------------------------------

async function getJSON(path) {
  const reply = await fetch(path, { cache: "no-store" });
  if (!reply.ok) throw new Error(`${path}: HTTP ${reply.status}`);
  return reply.json();
}

function merge(series, reply) {
  if (reply.last_round < series.last) { // the log was rewound: read it again
    series.records = [];
    series.last = 0;
    return false;
  }
  for (const record of reply.records) {
    while (series.records.length && series.records[series.records.length - 1].round >= record.round) {
      series.records.pop();
    }
    series.records.push(record);
  }
  if (series.records.length > MAX_RECORDS) series.records.splice(0, series.records.length - MAX_RECORDS);
  if (series.records.length) series.last = series.records[series.records.length - 1].round;
  return true;
}

async function poll() {
  try {
    const status = await getJSON("api/status");
    page.status = status;
    for (const id of status.series) {
      if (!page.series.has(id)) page.series.set(id, { records: [], last: 0 });
      const series = page.series.get(id);
      const query = `api/rounds?peer=${encodeURIComponent(id)}&since=${series.last}`;
      if (!merge(series, await getJSON(query))) merge(series, await getJSON(query.replace(/since=\d+/, "since=0")));
    }
    for (const id of [...page.series.keys()]) if (!status.series.includes(id)) page.series.delete(id);
    render();
    page.failures = 0;
    setConnection("live", "live");
  } catch (error) {
    page.failures += 1;
    setConnection("lost", "no answer: retrying");
  }
  const wait = Math.min(MAX_BACKOFF_MS, POLL_MS * 2 ** Math.min(page.failures, 4));
  setTimeout(poll, page.failures ? wait : POLL_MS);
}

function setConnection(state, text) {
  const badge = document.getElementById("connection");
  badge.dataset.state = state;
  badge.textContent = text;
}

// ---- drawing --------------------------------------------------------------------------------

function render() {
  const status = page.status;
  document.title = status.kind === "cluster" ? "peerd · local cluster" : `peerd · ${status.peer_id}`;
  renderHeadline(status);
  renderTopology(status);
  renderMembers(status);
  renderWindows(status);
  renderCurves(status);
  renderWarnings(status);
  // Milliseconds from navigation to the first page drawn with data (measured by the tests).
  if (!document.body.dataset.ready) document.body.dataset.firstRenderMs = performance.now().toFixed(0);
  document.body.dataset.ready = "true";
}

function renderHeadline(status) {
  const headline = document.getElementById("headline");
  headline.dataset.round = status.round;
  const members = status.members.filter((m) => m.position >= 0).length;
  const who = status.kind === "cluster" ? "local cluster" : status.peer_id;
  const of = status.last_round ? ` of ${status.last_round}` : "";
  headline.innerHTML = "";
  headline.append(element("b", {}, who), ` · cluster ${status.cluster} · round `,
    element("b", { id: "round" }, String(status.round)), `${of} · ${members} members · `,
    `${status.method} on ${status.task}`);
  document.getElementById("topology-name").textContent = `${status.topology} topology`;
}

function renderTopology(status) {
  const svg = document.getElementById("topology");
  svg.innerHTML = "";
  const members = status.members;
  const count = members.length;
  const center = 150;
  const orbit = count > 1 ? 105 : 0;
  const radius = Math.max(10, Math.min(24, 150 / Math.max(count, 1)));
  const at = new Map();
  members.forEach((member, index) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * index) / Math.max(count, 1);
    at.set(member.peer_id, [center + orbit * Math.cos(angle), center + orbit * Math.sin(angle)]);
  });
  for (const [a, b] of status.edges) {
    if (!at.has(a) || !at.has(b)) continue;
    const [x1, y1] = at.get(a);
    const [x2, y2] = at.get(b);
    svg.append(element("line", { class: "edge", x1, y1, x2, y2 }, null, SVG));
  }
  for (const member of members) {
    const [x, y] = at.get(member.peer_id);
    const group = element("g", { "data-peer": member.peer_id, "data-state": member.state }, null, SVG);
    const ring = getComputedStyle(document.documentElement).getPropertyValue(`--${member.state}`);
    group.append(element("circle", {
      cx: x, cy: y, r: radius, fill: color(member.peer_id), stroke: ring.trim(), "stroke-width": 4,
      "stroke-dasharray": member.state === "gone" ? "4 3" : "none",
    }, null, SVG));
    group.append(element("text", { x, y: y + 4, fill: "#fff", "font-weight": 600 },
      String(member.round), SVG));
    const below = y > center + 1 || orbit === 0;
    group.append(element("text", { x, y: below ? y + radius + 14 : y - radius - 6 },
      member.peer_id + (member.straggler ? " ⚠" : ""), SVG));
    svg.append(group);
  }
}

function renderMembers(status) {
  const body = document.querySelector("#members tbody");
  body.innerHTML = "";
  for (const member of status.members) {
    const row = element("tr", {
      "data-peer": member.peer_id, "data-round": member.round, "data-state": member.state,
      "data-straggler": member.straggler, "data-position": member.position,
    });
    const swatch = element("span", { class: "swatch" });
    swatch.style.background = color(member.peer_id);
    const self = status.kind === "daemon" && member.peer_id === status.peer_id;
    const seen = self ? "self" : `${Math.max(0, status.now_unix - member.last_seen_unix).toFixed(1)} s ago`;
    const depth = member.depth ? `${member.depth}` : "all";
    const stateCell = element("td");
    stateCell.append(element("span", { class: `state ${member.state}` }, member.state));
    if (member.straggler) stateCell.append(element("span", { class: "straggler", title: "straggler" }, "straggler"));
    const page_ = status.pages && status.pages[member.peer_id];
    const name = page_ ? element("a", { href: page_ }, member.peer_id) : member.peer_id;
    const cells = [
      [swatch], [name], [member.position >= 0 ? String(member.position) : "–", "num"],
      [member.mu.toFixed(3), "num"], [member.frozen_blocks ? `${depth} (${member.frozen_blocks} frozen)` : depth, "num"],
      [String(member.round), "num"], [seen, "num"],
    ];
    for (const [content, cls] of cells) {
      const cell = element("td", cls ? { class: cls } : {});
      cell.append(content);
      row.append(cell);
    }
    row.append(stateCell);
    row.append(element("td", { class: "num" }, `${bytes(member.bytes_sent)} / ${bytes(member.bytes_received)}`));
    body.append(row);
  }
}

function renderWindows(status) {
  const windows = status.windows;
  document.getElementById("windows-round").textContent = `round ${windows.round}`;
  const holder = document.getElementById("windows");
  const wanted = windows.groups.map((g) => g.name);
  for (const old of [...holder.children]) if (!wanted.includes(old.dataset.group)) old.remove();
  if (!windows.groups.length) {
    holder.append(element("p", { class: "muted" }, "no view committed yet: no windows"));
    return;
  }
  for (const group of windows.groups) {
    let box = holder.querySelector(`.group[data-group="${CSS.escape(group.name)}"]`);
    if (!box) {
      box = element("div", { class: "group", "data-group": group.name });
      const heldRow = element("div", { class: "lane-row held-row" });
      heldRow.append(element("span", { class: "lane-label" }, "held"),
        element("canvas", { class: "held", height: 1 }));
      box.append(element("div", { class: "group-title" }), element("div", { class: "lanes" }), heldRow);
      holder.append(box);
    }
    const title = box.querySelector(".group-title");
    title.innerHTML = "";
    const name = element("span");
    name.append(element("b", {}, group.name), ` · ${group.units} units`);
    title.append(name, element("span", { class: "coverage" },
      `units held so far ${(100 * group.coverage).toFixed(1)}%`));
    renderLanes(box.querySelector(".lanes"), group);
    renderHeld(box.querySelector("canvas"), group.held_rounds);
  }
}

function renderLanes(lanes, group) {
  // Elements are kept from poll to poll so that a window glides to its next place.
  const peers = group.windows.map((w) => w.peer_id);
  for (const old of [...lanes.children]) if (!peers.includes(old.dataset.peer)) old.remove();
  group.windows.forEach((window_, index) => {
    let row = lanes.querySelector(`.lane-row[data-peer="${CSS.escape(window_.peer_id)}"]`);
    if (!row) {
      row = element("div", { class: "lane-row", "data-peer": window_.peer_id });
      row.append(element("span", { class: "lane-label" }, window_.peer_id),
        element("div", { class: "lane", "data-peer": window_.peer_id }));
    }
    if (lanes.children[index] !== row) lanes.insertBefore(row, lanes.children[index] || null);
    const lane = row.querySelector(".lane");
    lane.dataset.width = window_.width;
    while (lane.children.length > window_.runs.length) lane.lastChild.remove();
    while (lane.children.length < window_.runs.length) {
      lane.append(element("div", { class: "window", "data-peer": window_.peer_id, "data-group": group.name }));
    }
    window_.runs.forEach(([start, length], run) => {
      const bar = lane.children[run];
      bar.style.left = `${(100 * start) / group.units}%`;
      bar.style.width = `${(100 * length) / group.units}%`;
      bar.style.background = color(window_.peer_id);
      bar.dataset.start = start;
      bar.dataset.length = length;
    });
  });
}

function renderHeld(canvas, held) {
  canvas.width = held.length;
  const context = canvas.getContext("2d");
  const most = Math.max(1, ...held);
  held.forEach((count, unit) => {
    // Never held: red; then from pale to deep blue with the rounds held.
    const share = count / most;
    context.fillStyle = count === 0 ? "#fca5a5"
      : `rgb(${Math.round(219 - 189 * share)}, ${Math.round(234 - 170 * share)}, ${Math.round(254 - 79 * share)})`;
    context.fillRect(unit, 0, 1, 1);
  });
}

// ---- curves ---------------------------------------------------------------------------------

function metricOf(status) {
  return status.metric === "perplexity" ? "perplexity" : "accuracy";
}

function perRound(field) {
  return (record, previous) => record[field] - (previous ? previous[field] : 0);
}

function charts(status) {
  const perplexity = metricOf(status) === "perplexity";
  return [
    { key: "train_loss", title: "training loss", peer: (r) => r.train_loss, assembled: (r) => r.train_loss_mean },
    {
      key: "local_metric", title: `local ${metricOf(status)} (own test split)`,
      peer: (r) => (perplexity ? r.local_ppl : r.local_acc),
    },
    {
      key: "assembled_metric", title: `assembled model ${metricOf(status)}`, optional: true,
      assembled: (r) => (perplexity ? r.global_ppl : r.global_acc),
    },
    { key: "bytes_sent", title: "bytes sent per round", peer: perRound("bytes_sent_cum"), assembled: (r) => r.bytes_sent_peer_mean, unit: "B" },
    { key: "bytes_received", title: "bytes received per round", peer: perRound("bytes_received_cum"), unit: "B" },
    { key: "round_time", title: "round time (s)", peer: (r) => r.round_s },
  ];
}

function xValues(id, records) {
  if (page.axis === "round") return records.map((r) => r.round);
  if (id === ASSEMBLED) return records.map((r) => r.train_flops_cum_peer_mean);
  let total = 0;
  return records.map((r) => { total += r.train_flops; return total; });
}

function lines(chart) {
  const drawn = [];
  for (const [id, series] of page.series) {
    const value = id === ASSEMBLED ? chart.assembled : chart.peer;
    if (!value) continue;
    const xs = xValues(id, series.records);
    const points = [];
    series.records.forEach((record, index) => {
      const y = value(record, series.records[index - 1]);
      if (y !== null && y !== undefined && Number.isFinite(y) && Number.isFinite(xs[index])) points.push([xs[index], y]);
    });
    drawn.push({ id, points });
  }
  return drawn;
}

function niceTicks(low, high, count = 4) {
  if (!(high > low)) { high = low + 1; }
  const raw = (high - low) / count;
  const step = 10 ** Math.floor(Math.log10(raw));
  const scaled = raw / step;
  const nice = (scaled >= 5 ? 10 : scaled >= 2 ? 5 : scaled >= 1 ? 2 : 1) * step;
  const ticks = [];
  for (let t = Math.ceil(low / nice) * nice; t <= high + nice * 1e-9; t += nice) ticks.push(t);
  return ticks;
}

function renderCurves(status) {
  const holder = document.getElementById("curves");
  const legend = document.getElementById("legend");
  legend.innerHTML = "";
  for (const id of page.series.keys()) {
    const swatch = element("span", { class: "swatch" });
    swatch.style.background = color(id);
    const item = element("span", { "data-series": id });
    item.append(swatch, id === ASSEMBLED ? "assembled model" : id);
    legend.append(item);
  }
  holder.innerHTML = "";
  for (const chart of charts(status)) {
    const drawn = lines(chart);
    const total = drawn.reduce((sum, line) => sum + line.points.length, 0);
    if (chart.optional && total === 0) continue;
    const box = element("div", { class: "chart", "data-chart": chart.key, "data-points": total });
    box.append(element("h3", {}, chart.title));
    box.append(plot(drawn, chart));
    holder.append(box);
  }
}

function plot(drawn, chart) {
  const width = 340, height = 170, left = 46, right = 10, top = 8, bottom = 24;
  const svg = element("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" }, null, SVG);
  const all = drawn.flatMap((line) => line.points);
  if (!all.length) {
    svg.append(element("text", { class: "empty", x: width / 2, y: height / 2 }, "no rounds yet", SVG));
    return svg;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  let [xLow, xHigh] = [Math.min(...xs), Math.max(...xs)];
  let [yLow, yHigh] = [Math.min(...ys), Math.max(...ys)];
  if (xHigh === xLow) { xLow -= 1; xHigh += 1; }
  if (yHigh === yLow) { const pad = Math.abs(yHigh) * 0.1 || 1; yLow -= pad; yHigh += pad; }
  if (yLow > 0 && yLow < 0.25 * yHigh) yLow = 0;
  const xTicks = niceTicks(xLow, xHigh);
  const yTicks = niceTicks(yLow, yHigh);
  yLow = Math.min(yLow, yTicks[0]);
  yHigh = Math.max(yHigh, yTicks[yTicks.length - 1]);
  const sx = (x) => left + ((x - xLow) / (xHigh - xLow)) * (width - left - right);
  const sy = (y) => height - bottom - ((y - yLow) / (yHigh - yLow)) * (height - top - bottom);
  for (const t of yTicks) {
    svg.append(element("line", { class: "grid", x1: left, x2: width - right, y1: sy(t), y2: sy(t) }, null, SVG));
    svg.append(element("text", { class: "tick", x: left - 4, y: sy(t) + 3, "text-anchor": "end" },
      chart.unit === "B" ? bytes(t).replace(".0 ", " ") : si(t), SVG));
  }
  for (const t of xTicks) {
    if (sx(t) < left - 0.5 || sx(t) > width - right + 0.5) continue;
    svg.append(element("text", { class: "tick", x: sx(t), y: height - 8, "text-anchor": "middle" },
      page.axis === "round" ? String(Math.round(t)) : si(t), SVG));
  }
  svg.append(element("line", { class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom }, null, SVG));
  svg.append(element("line", { class: "axis", x1: left, x2: left, y1: top, y2: height - bottom }, null, SVG));
  for (const line of drawn) {
    if (!line.points.length) continue;
    const step = Math.ceil(line.points.length / MAX_DRAWN_POINTS);
    const shown = line.points.filter((_, i) => i % step === 0 || i === line.points.length - 1);
    const path = element("polyline", {
      class: "line", stroke: color(line.id), "data-series": line.id, "data-points": line.points.length,
      "data-last": line.points[line.points.length - 1][1],
      points: shown.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
    }, null, SVG);
    if (line.points.length === 1) {
      const [x, y] = line.points[0];
      svg.append(element("circle", { cx: sx(x), cy: sy(y), r: 2.5, fill: color(line.id) }, null, SVG));
    }
    svg.append(path);
  }
  return svg;
}

function renderWarnings(status) {
  const list = document.getElementById("warnings");
  list.innerHTML = "";
  if (!status.warnings.length) {
    list.append(element("li", { class: "muted" }, "none"));
    return;
  }
  for (const warning of status.warnings) {
    const item = element("li");
    const time = new Date(warning.time_unix * 1000).toLocaleTimeString([], { hour12: false });
    item.append(element("span", { class: "time" }, time),
      element("span", { class: `level ${warning.level}` }, warning.level.toLowerCase()),
      `${warning.source}: ${warning.message}`);
    list.append(item);
  }
}

document.querySelectorAll("#axis-toggle button").forEach((button) => {
  button.addEventListener("click", () => {
    page.axis = button.dataset.axis;
    document.querySelectorAll("#axis-toggle button").forEach((b) => b.classList.toggle("on", b === button));
    if (page.status) renderCurves(page.status);
  });
});

poll();
