// The aggregator's page: plain canvas and DOM over the JSON API (/api/v1/...), no library.
'use strict';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'tcpkit-token';

class NeedsToken extends Error {}

// GET /api/v1/CALL with the filters and `extra`; the token from this tab, if given.
async function api(call, extra) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries({ ...filters(), ...extra })) {
    if (v !== '' && v !== undefined && v !== null) params.set(k, v);
  }
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: 'Bearer ' + token } : {};
  const r = await fetch('/api/v1/' + call + '?' + params, { headers });
  if (r.status === 401) throw new NeedsToken((await r.json()).error);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function filters() {
  const f = Object.fromEntries(new FormData($('filters')));
  if (f.from) delete f.since;
  return f;
}

// tcpkit_histogram::fine_lower: the smallest latency (µs) of a fine bucket.
function fineLower(index) {
  const SUB = 64;
  if (index < SUB) return index;
  const shift = Math.floor((index - SUB) / SUB);
  return (SUB + ((index - SUB) % SUB)) * 2 ** shift;
}

// Heatmap rows: half octaves of latency, from 1 µs.
const rowOf = (us) => Math.max(0, Math.floor(Math.log2(Math.max(us, 1)) * 2));
const rowLow = (row) => 2 ** (row / 2);

function ms(us) {
  if (us < 1000) return us + ' µs';
  if (us < 1e6) return (us / 1000).toFixed(us < 1e4 ? 2 : 1) + ' ms';
  return (us / 1e6).toFixed(2) + ' s';
}

function localTime(us) {
  return new Date(us / 1000).toLocaleString();
}

function say(text) {
  const m = $('message');
  m.textContent = text;
  m.hidden = !text;
}

function cellText(tr, value, cls) {
  const td = document.createElement('td');
  td.textContent = value;
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function fillTable(table, header, rows, textColumns) {
  table.replaceChildren();
  const head = document.createElement('tr');
  header.forEach((h, i) => {
    const th = document.createElement('th');
    th.textContent = h;
    if (textColumns.includes(i)) th.className = 'text';
    head.appendChild(th);
  });
  table.appendChild(head);
  for (const row of rows) {
    const tr = document.createElement('tr');
    row.cells.forEach((v, i) => cellText(tr, v, textColumns.includes(i) ? 'text' : ''));
    if (row.className) tr.className = row.className;
    table.appendChild(tr);
  }
}

// The series as a grid: counts per (column, row), and each column's p50 and p99.
function grid(reply) {
  const step = reply.step_us;
  const first = reply.from_us - (reply.from_us % step);
  const columns = Math.max(1, Math.ceil((reply.to_us - first) / step));
  const cells = new Map();
  let low = Infinity, high = -Infinity, total = 0, max = 0;
  const marks = [];
  for (const series of reply.series) {
    for (const s of series.steps) {
      const col = Math.floor((s.ts_us - first) / step);
      s.fine_index.forEach((index, k) => {
        const row = rowOf(fineLower(index));
        const key = col * 1000 + row;
        const n = (cells.get(key) || 0) + s.fine_count[k];
        cells.set(key, n);
        max = Math.max(max, n);
        low = Math.min(low, row);
        high = Math.max(high, row);
        total += s.fine_count[k];
      });
      marks.push({ col, p50: s.p50_us, p99: s.p99_us });
    }
  }
  return { first, step, columns, cells, low, high, total, max, marks };
}

let heat = null;

function drawHeatmap(reply) {
  const canvas = $('heatmap');
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  heat = grid(reply);
  canvas.dataset.total = heat.total;
  canvas.dataset.cells = heat.cells.size;
  if (heat.total === 0) {
    ctx.fillStyle = '#8892a6';
    ctx.fillText('no requests in the range', 20, 30);
    $('heatmap-axis').replaceChildren();
    return;
  }
  const left = 70;
  const rows = heat.high - heat.low + 1;
  const w = (canvas.width - left) / heat.columns;
  const h = canvas.height / rows;
  heat.geometry = { left, w, h };
  // For a reader (and the tests): where the cells are, and the slowest one.
  const slowestCol = Math.min(...[...heat.cells.keys()]
    .filter((k) => k % 1000 === heat.high).map((k) => Math.floor(k / 1000)));
  Object.assign(canvas.dataset, {
    left, cellWidth: w, cellHeight: h, slowestCol, slowestRow: heat.high,
    slowestLowUs: Math.floor(rowLow(heat.high)), slowestHighUs: Math.ceil(rowLow(heat.high + 1)),
  });
  for (const [key, n] of heat.cells) {
    const col = Math.floor(key / 1000), row = key % 1000;
    const share = Math.log1p(n) / Math.log1p(heat.max);
    ctx.fillStyle = `hsl(${230 - 180 * share}, 85%, ${18 + 45 * share}%)`;
    ctx.fillRect(left + col * w, (heat.high - row) * h, Math.ceil(w), Math.ceil(h));
  }
  for (const [colour, which] of [['#ffffff', 'p50'], ['#ff5555', 'p99']]) {
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    const points = heat.marks
      .filter((m) => m[which] > 0)
      .sort((a, b) => a.col - b.col);
    points.forEach((m, i) => {
      const y = (heat.high - Math.log2(m[which]) * 2 + 0.5) * h;
      const x = left + (m.col + 0.5) * w;
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
  ctx.fillStyle = '#8892a6';
  ctx.font = '11px system-ui';
  for (let row = heat.high; row >= heat.low; row -= 2) {
    ctx.fillText(ms(Math.round(rowLow(row))), 2, (heat.high - row + 1) * h - 2);
  }
  const axis = $('heatmap-axis');
  axis.replaceChildren();
  for (const t of [heat.first, heat.first + heat.columns * heat.step]) {
    const span = document.createElement('span');
    span.textContent = localTime(t);
    axis.appendChild(span);
  }
}

// A click on a cell: the slow requests of its time and latency.
async function showCell(event) {
  if (!heat || !heat.geometry) return;
  const rect = event.target.getBoundingClientRect();
  const scale = event.target.width / rect.width;
  const x = (event.clientX - rect.left) * scale, y = (event.clientY - rect.top) * scale;
  const { left, w, h } = heat.geometry;
  const col = Math.floor((x - left) / w);
  const row = heat.high - Math.floor(y / h);
  if (col < 0 || col >= heat.columns) return;
  await listCell(col, row);
}

async function listCell(col, row) {
  const from = heat.first + col * heat.step;
  const lowUs = Math.floor(rowLow(row)), highUs = Math.ceil(rowLow(row + 1));
  const events = await guarded(() =>
    api('slow', {
      since: '', from: '', to: '', from_us: from, to_us: from + heat.step,
      min_ms: lowUs / 1000, limit: 1000, slowest: 1,
    }));
  if (!events) return;
  const inside = events.filter((e) => e.latency_us < highUs);
  const cell = $('cell');
  cell.replaceChildren();
  const title = document.createElement('h3');
  title.textContent = `${localTime(from)} + ${ms(heat.step)}, ${ms(lowUs)} to ${ms(highUs)}: ${inside.length} slow requests`;
  cell.appendChild(title);
  const table = document.createElement('table');
  table.id = 'cell-slow';
  cell.appendChild(table);
  fillSlow(table, inside);
}

function fillSlow(table, events) {
  fillTable(
    table,
    ['agent', 'time', 'client', 'server', 'latency', 'request'],
    events.map((e) => ({
      cells: [e.agent, localTime(e.ts_us), e.client, e.server + ':' + e.port, ms(e.latency_us), e.summary],
    })),
    [0, 1, 2, 3, 5],
  );
}

function drawHistogram(h) {
  fillTable(
    $('figures'),
    ['requests', 'p50', 'p90', 'p99', 'p99.9', 'max', 'slow', 'errors', 'timeouts'],
    [{ cells: [h.count, ms(h.p50_us), ms(h.p90_us), ms(h.p99_us), ms(h.p999_us), ms(h.max_us), h.slow, h.errors, h.timeouts] }],
    [],
  );
  const canvas = $('histogram');
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const counts = h.latencies || [];
  const max = Math.max(1, ...counts);
  const w = canvas.width / Math.max(1, counts.length);
  counts.forEach((n, i) => {
    if (!n) return;
    const bar = (Math.log1p(n) / Math.log1p(max)) * (canvas.height - 20);
    ctx.fillStyle = '#88c0d0';
    ctx.fillRect(i * w + 2, canvas.height - 14 - bar, w - 4, bar);
  });
  canvas.dataset.total = counts.reduce((a, b) => a + b, 0);
}

function drawTop(rows) {
  fillTable(
    $('top'),
    ['command', 'requests', 'p50', 'p99', 'own p99', 'max', 'slow', 'errors'],
    rows.map((r) => ({
      cells: [(r.proto ? r.proto + ' ' : '') + r.key, r.count, ms(r.p50_us), ms(r.p99_us),
        r.own_count ? ms(r.own_p99_us) : '', ms(r.max_us), r.slow, r.errors],
    })),
    [0],
  );
}

function drawKeys(rows) {
  fillTable(
    $('keys'),
    ['template', 'requests', 'p99', 'request bytes', 'reply bytes'],
    rows.map((r) => ({
      cells: [(r.proto ? r.proto + ' ' : '') + r.key, r.count, ms(r.p99_us), r.req_bytes, r.rsp_bytes],
    })),
    [0],
  );
}

function drawSlots(rows) {
  fillTable(
    $('slots'),
    ['slot', 'requests', 'moved', 'ask', 'p50 ≤', 'p99 ≤', 'total'],
    rows.map((r) => ({
      cells: [r.key, r.count, r.moved, r.ask, ms(r.p50_le_us || 0), ms(r.p99_le_us || 0), ms(r.sum_us)],
    })),
    [0],
  );
}

function drawAgents(agents) {
  // The counters are keys of the agent itself, as in `tcpkit-query agents --json`.
  const lossy = (a) => ['kernel_drops', 'interface_drops', 'desyncs', 'gaps',
    'shipper_dropped_events', 'shipper_dropped_histograms'].some((k) => (a[k] || 0) > 0);
  fillTable(
    $('agents'),
    ['agent', 'hostname', 'version', 'last seen', 'events', 'kernel drops', 'gaps', 'desyncs', 'not timed', 'shipper drops'],
    agents.map((a) => {
      const u = a.untimed || {};
      const untimed = (u.request_lost || 0) + (u.reply_lost || 0) + (u.uncertain || 0) + (u.reply_before_request || 0);
      return {
        className: lossy(a) ? 'lossy' : '',
        cells: [a.id, a.hostname, a.version, localTime(a.last_seen_us), a.events, a.kernel_drops || 0,
          a.gaps || 0, a.desyncs || 0, untimed, (a.shipper_dropped_events || 0) + (a.shipper_dropped_histograms || 0)],
      };
    }),
    [0, 1, 2, 3],
  );
}

// Runs a call; a missing token shows the token form, other errors the message.
async function guarded(call) {
  try {
    return await call();
  } catch (e) {
    if (e instanceof NeedsToken) {
      say('This aggregator needs its token: ' + e.message);
      $('token-form').hidden = false;
    } else {
      say(String(e.message || e));
    }
    return null;
  }
}

async function refresh() {
  say('');
  const [series, hist, top, keys, slots, slow, agents] = await Promise.all([
    guarded(() => api('series', {})),
    guarded(() => api('hist', {})),
    guarded(() => api('top', { of: 'command', by: 'p99', limit: 10 })),
    guarded(() => api('top', { of: 'template', by: 'requests', limit: 10 })),
    guarded(() => api('top', { of: 'slot', by: 'requests', limit: 10 })),
    guarded(() => api('slow', { slowest: 1, limit: 50, grep: $('grep').value })),
    guarded(() => api('agents', {})),
  ]);
  if (series) drawHeatmap(series);
  if (hist) drawHistogram(hist);
  if (top) drawTop(top);
  if (keys) drawKeys(keys);
  if (slots) drawSlots(slots);
  if (slow) fillSlow($('slow'), slow);
  if (agents) drawAgents(agents);
  document.body.dataset.loaded = 'yes';
}

$('filters').addEventListener('submit', (e) => { e.preventDefault(); refresh(); });
$('slow-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const slow = await guarded(() => api('slow', { slowest: 1, limit: 50, grep: $('grep').value }));
  if (slow) fillSlow($('slow'), slow);
});
$('token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $('token').value);
  $('token-form').hidden = true;
  refresh();
});
$('heatmap').addEventListener('click', showCell);
// The page's first view may come from its address: ?since=6h&command=GET (never a token).
for (const [k, v] of new URLSearchParams(location.search)) {
  const input = $('filters').elements.namedItem(k);
  if (input) input.value = v;
}
refresh();
