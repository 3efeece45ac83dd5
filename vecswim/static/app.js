// vecswim live page: plain JS, no framework, no build step, nothing loaded from elsewhere.
//
// Everything it knows about the run comes from the server it is served by:
//   GET  tables        every SQL table and its columns (agent types, links, ticks, metrics)
//   GET  live/schema   agent types (key, state and emitted columns, links) and links
//   POST sql           the counts by status, the top N and the parent lists, every second
//   WS   live          the pulse lane (run figures) and, for a clicked parent, its children's
//                      map lane and its own value lanes
// With ?token=T in the page URL, fetches send "Authorization: Bearer T" and the WebSocket
// URL gets ?token=T. ?refresh=MS changes the SQL refresh period (default 1000).
// Every panel shows the tick its numbers are from.
'use strict';

(() => {
  const params = new URLSearchParams(location.search);
  const TOKEN = params.get('token');
  const REFRESH_MS = Math.min(Math.max(Number(params.get('refresh')) || 1000, 200), 60000);
  const PULSE = { node: 'swimos:meta:mesh', lane: 'pulse' };
  const PULSE_STALE_MS = 3000; // no pulse for this long: the figures come from SQL
  const PARENTS_LIMIT = 50;
  const HISTORY = 60;
  const PALETTE = ['#16a34a', '#dc2626', '#f59e0b', '#2563eb', '#7c3aed', '#0891b2', '#db2777', '#65a30d'];

  const $ = (sel, root = document) => root.querySelector(sel);

  function h(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k.startsWith('data-')) e.dataset[camel(k.slice(5))] = v;
      else e.setAttribute(k, v);
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
    return e;
  }
  const camel = (s) => s.replace(/-([a-z])/g, (_, c) => c.toUpperCase());

  // ---- JSON with exact 64-bit integers ---------------------------------------------------
  // Agent keys are often int64 beyond 2**53: JSON.parse would round them. Integers that are
  // not safe become strings with their exact digits.
  const REVIVER_HAS_SOURCE = (() => {
    try {
      let ok = false;
      JSON.parse('1', (k, v, ctx) => {
        ok = !!(ctx && ctx.source === '1');
        return v;
      });
      return ok;
    } catch (e) {
      return false;
    }
  })();
  const BIG_INT = /("(?:[^"\\]|\\.)*")|(?<![\d.eE+-])(-?\d{16,})(?![\d.eE])/g;

  function parseJSON(text) {
    if (REVIVER_HAS_SOURCE) {
      return JSON.parse(text, (k, v, ctx) =>
        typeof v === 'number' && !Number.isSafeInteger(v) && ctx && /^-?\d+$/.test(ctx.source)
          ? ctx.source
          : v);
    }
    return JSON.parse(text.replace(BIG_INT, (m, str, num) =>
      str !== undefined || Number.isSafeInteger(Number(num)) ? m : `"${num}"`));
  }

  // ---- formatting ------------------------------------------------------------------------
  const isFloatType = (t) => /^(float|double|halffloat)/.test(t || '');
  const isNumericType = (t) => /^(u?int(8|16|32|64)|float|double|halffloat|decimal)/.test(t || '');

  // A value as a table shows it: float columns with 2 decimals (toFixed), integers and big
  // integers (strings) as they are, null (NaN or missing) as a dash.
  function fmt(v, type) {
    if (v === null || v === undefined) return '–';
    if (typeof v === 'number') {
      const float = type ? isFloatType(type) : !Number.isInteger(v);
      return float ? v.toFixed(2) : String(v);
    }
    return String(v);
  }
  const group = (v) => (typeof v === 'number' ? Math.round(v).toLocaleString('en-US') : fmt(v));
  const ms = (v) => (typeof v === 'number' ? v.toFixed(2) : fmt(v));
  const keyText = (k) => String(k);

  function compareKeys(a, b) {
    const ia = /^-?\d+$/.test(a);
    const ib = /^-?\d+$/.test(b);
    if (ia && ib) {
      const x = BigInt(a);
      const y = BigInt(b);
      return x < y ? -1 : x > y ? 1 : 0;
    }
    if (ia !== ib) return ia ? -1 : 1;
    return a < b ? -1 : a > b ? 1 : 0;
  }

  const ident = (name) => `"${String(name).replace(/"/g, '""')}"`;
  const literal = (v) =>
    typeof v === 'number' || /^-?\d+$/.test(v) ? String(v) : `'${String(v).replace(/'/g, "''")}'`;

  function setTick(elem, tick) {
    if (tick === null || tick === undefined) return;
    elem.textContent = String(tick);
    elem.dataset.tick = String(tick);
    noteTick(tick);
  }

  let latestTick = -1;
  function noteTick(tick) {
    if (typeof tick === 'number' && tick > latestTick) {
      latestTick = tick;
      const e = $('#now-tick');
      e.textContent = String(tick);
      e.dataset.tick = String(tick);
    }
  }

  function flash(elem) {
    if (elem.animate) {
      elem.animate([{ backgroundColor: '#fde68a' }, { backgroundColor: 'transparent' }], {
        duration: 1200,
        easing: 'ease-out',
      });
    }
  }

  let errorTimer = null;
  function showError(msg) {
    const e = $('#error');
    e.textContent = msg;
    e.title = msg;
    e.hidden = false;
    clearTimeout(errorTimer);
    errorTimer = setTimeout(() => {
      e.hidden = true;
    }, 10000);
  }

  const sleep = (t) => new Promise((resolve) => setTimeout(resolve, t));

  // ---- HTTP ------------------------------------------------------------------------------
  const REQUEST_TIMEOUT_MS = 15000; // a lost answer must not stall the refresh loop

  async function request(path, init = {}) {
    const headers = Object.assign({ Accept: 'application/json' }, init.headers || {});
    if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    let res;
    let text;
    try {
      res = await fetch(new URL(path, document.baseURI),
        Object.assign({}, init, { headers, signal: abort.signal }));
      text = await res.text();
    } catch (e) {
      throw new Error(abort.signal.aborted
        ? `${path}: no answer within ${REQUEST_TIMEOUT_MS / 1000} s`
        : `${path}: ${e.message || e}`);
    } finally {
      clearTimeout(timer);
    }
    let doc = null;
    try {
      doc = parseJSON(text);
    } catch (e) {
      // not JSON: reported below with the status
    }
    if (!res.ok) {
      let msg = (doc && doc.error) || `HTTP ${res.status}`;
      if (res.status === 401) msg += TOKEN ? ' (wrong ?token=)' : ' (open the page with ?token=...)';
      const err = new Error(`${path}: ${msg}`);
      err.status = res.status;
      throw err;
    }
    if (doc === null) throw new Error(`${path}: the answer is not JSON`);
    return doc;
  }

  const sql = (query) =>
    request('sql', { method: 'POST', headers: { 'Content-Type': 'text/plain' }, body: query });

  // ---- the schema ------------------------------------------------------------------------
  // types: name -> {key, columns: [{name, type}], state: [names], emitted: [names], links}
  // links: name -> {child, parent, childCol, parentCol}
  let schema = null;

  async function loadSchema() {
    const tables = (await request('tables')).tables;
    let live = null;
    let liveLanes = true;
    try {
      live = await request('live/schema');
    } catch (e) {
      if (e.status === 401) throw e;
      // a server without the live protocol (an older one): everything from SQL
      if (e.status === 404) liveLanes = false;
    }
    if (live && live.live === false) liveLanes = false; // served with --no-live
    const types = {};
    const links = {};
    const colsOf = (name) => tables[name] || [];
    if (live && live.types) {
      for (const [name, t] of Object.entries(live.types)) {
        types[name] = {
          key: t.key,
          columns: colsOf(name),
          state: t.columns || colsOf(name).map((c) => c.name).filter((c) => c !== t.key),
          emitted: t.emitted || [],
          links: t.links || [],
        };
      }
      for (const [name, l] of Object.entries(live.links || {})) {
        const cols = colsOf(name).map((c) => c.name);
        links[name] = {
          child: l.child,
          parent: l.parent,
          childCol: cols.find((c) => c.startsWith('child_')) || `child_${types[l.child].key}`,
          parentCol: cols.find((c) => c.startsWith('parent_')) || `parent_${types[l.parent].key}`,
        };
      }
    } else {
      const reserved = new Set(['ticks', 'metrics', 'emissions']);
      const linkTables = {};
      for (const [name, cols] of Object.entries(tables)) {
        if (cols.length === 2 && cols[0].name.startsWith('child_') && cols[1].name.startsWith('parent_')) {
          linkTables[name] = cols;
        }
      }
      for (const [name, cols] of Object.entries(tables)) {
        if (reserved.has(name) || name.startsWith('emissions_') || name in linkTables || !cols.length) continue;
        const emitted = (tables[`emissions_${name}`] || []).map((c) => c.name);
        types[name] = {
          key: cols[0].name,
          columns: cols,
          state: cols.slice(1).map((c) => c.name),
          emitted: emitted.filter((c) => c !== cols[0].name && c !== 'tick'),
          links: [],
        };
      }
      for (const [name, cols] of Object.entries(linkTables)) {
        const byKey = (col) => Object.keys(types).find((t) => col === types[t].key);
        const child = byKey(cols[0].name.slice(6));
        const parent = byKey(cols[1].name.slice(7));
        if (!child || !parent) continue;
        links[name] = { child, parent, childCol: cols[0].name, parentCol: cols[1].name };
        types[parent].links.push(name);
      }
    }
    for (const [name, t] of Object.entries(types)) {
      t.name = name;
      if (!t.emitted.length) t.emitted = t.state.slice();
      t.typeOf = Object.fromEntries(t.columns.map((c) => [c.name, c.type]));
    }
    return { types, links, liveLanes };
  }

  // ---- the WebSocket ---------------------------------------------------------------------
  class Live {
    constructor() {
      this.subs = new Map();
      this.ws = null;
      this.open = false;
      this.retry = 500;
      this.everOpened = false;
      this.failures = 0; // attempts in a row that never opened
    }

    // Lanes to subscribe to: connected, or not yet known to be unreachable.
    usable() {
      return !this.disabled && (this.open || this.everOpened || this.failures < 3);
    }

    url() {
      const u = new URL('live', document.baseURI);
      u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
      if (TOKEN) u.searchParams.set('token', TOKEN);
      return u.href;
    }

    stop() {
      this.disabled = true;
      if (this.ws) this.ws.close();
    }

    connect() {
      if (this.disabled) return;
      let ws;
      try {
        ws = new WebSocket(this.url());
      } catch (e) {
        this.again();
        return;
      }
      this.ws = ws;
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this.open = true;
        this.everOpened = true;
        this.failures = 0;
        this.retry = 500;
        setConn(true);
        for (const s of this.subs.values()) {
          s.handler({ tag: 'reset' });
          this.send({ op: 'sync', node: s.node, lane: s.lane });
        }
      };
      ws.onmessage = (ev) => {
        let msg;
        try {
          msg = parseJSON(ev.data);
        } catch (e) {
          return;
        }
        if (msg.tag === 'error') {
          showError(`live: ${msg.error}`);
          return;
        }
        const s = this.subs.get(Live.id(msg.node, msg.lane));
        if (s) s.handler(msg);
      };
      ws.onclose = () => {
        if (this.ws !== ws) return;
        this.ws = null;
        this.open = false;
        if (!opened) {
          this.failures += 1;
          if (this.failures === 3 && !this.everOpened) onLiveUnreachable();
        }
        setConn(false);
        this.again();
      };
    }

    again() {
      if (this.disabled) return;
      setTimeout(() => this.connect(), this.retry);
      this.retry = Math.min(this.retry * 2, 5000);
    }

    static id(node, lane) {
      return `${node}\n${lane}`;
    }

    send(op) {
      if (this.open && this.ws) this.ws.send(JSON.stringify(op));
    }

    sync(node, lane, handler) {
      this.subs.set(Live.id(node, lane), { node, lane, handler });
      this.send({ op: 'sync', node, lane });
    }

    unlink(node, lane) {
      if (this.subs.delete(Live.id(node, lane))) this.send({ op: 'unlink', node, lane });
    }
  }

  function setConn(on) {
    if (live.disabled) return;
    const e = $('#conn');
    e.className = `conn ${on ? 'on' : 'off'}`;
    e.textContent = on ? 'live' : 'reconnecting';
  }

  const live = new Live();

  // ---- the run's figures -----------------------------------------------------------------
  const figures = {
    lastPulse: 0,
    prevSql: null, // {events, at} of the previous SQL fallback, for events/s
    history: { events_per_s: [], tick_p99_ms: [] },
  };

  function showFigures(p, source) {
    const panel = $('#figures');
    $('.src', panel).textContent = source;
    setTick($('.tick', panel), p.tick);
    const shown = {
      events_per_s: group,
      tick_p50_ms: ms,
      tick_p99_ms: ms,
      agents: group,
      emitted: group,
      dead_letters: group,
      events: group,
      connections: group,
    };
    for (const [name, f] of Object.entries(shown)) {
      const card = $(`.card[data-fig="${name}"]`, panel);
      const v = p[name];
      $('.value', card).textContent = v === undefined ? '–' : f(v);
      card.dataset.value = JSON.stringify(v === undefined ? null : v);
    }
    const links = $('.sub[data-fig="links"]', panel);
    links.textContent = p.links === undefined ? '' : `${group(p.links)} links`;
    links.dataset.value = JSON.stringify(p.links === undefined ? null : p.links);
    const bytype = $('.bytype', panel);
    bytype.replaceChildren(
      ...Object.entries(p.agents_by_type || {}).map(([t, n]) =>
        h('span', { class: 'chip', 'data-type': t, 'data-value': JSON.stringify(n) },
          `${t} `, h('b', { text: group(n) }))));
    for (const [name, hist] of Object.entries(figures.history)) {
      if (typeof p[name] !== 'number') continue;
      hist.push(p[name]);
      if (hist.length > HISTORY) hist.shift();
      spark($(`.card[data-fig="${name}"] polyline`, panel), hist);
    }
  }

  function spark(line, values) {
    if (values.length < 2) return;
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const span = hi - lo || 1;
    const step = 100 / (HISTORY - 1);
    const x0 = 100 - step * (values.length - 1);
    line.setAttribute('points', values
      .map((v, i) => `${(x0 + i * step).toFixed(1)},${(22 - ((v - lo) / span) * 20).toFixed(1)}`)
      .join(' '));
  }

  function onPulse(msg) {
    if (msg.tag === 'event' && msg.value && typeof msg.value === 'object') {
      figures.lastPulse = Date.now();
      const p = Object.assign({}, msg.value);
      if (p.tick === undefined) p.tick = msg.tick;
      showFigures(p, 'pulse');
    }
  }

  // The figures from SQL when there is no pulse (a server without the live protocol, or a
  // dropped WebSocket): counters from `metrics`, tick quantiles from `ticks`, events/s from
  // the change of the events counter between two refreshes.
  async function figuresFromSql() {
    const m = (name) => `(SELECT value FROM metrics WHERE name = ${literal(name)}) AS ${ident(name)}`;
    const types = Object.keys(schema.types);
    const q = [
      'SELECT',
      ['tick', 'events', 'emitted', 'dead_letters', 'agents'].map(m).join(', ') + ',',
      '(SELECT quantile_cont(seconds, 0.5) FROM ticks) * 1000 AS tick_p50_ms,',
      '(SELECT quantile_cont(seconds, 0.99) FROM ticks) * 1000 AS tick_p99_ms',
      ...types.map((t) => `, (SELECT count(*) FROM ${ident(t)}) AS ${ident(`n:${t}`)}`),
    ].join(' ');
    const res = await sql(q);
    if (Date.now() - figures.lastPulse < PULSE_STALE_MS) return; // a pulse came meanwhile
    const row = Object.fromEntries(res.columns.map((c, i) => [c, res.rows[0][i]]));
    const now = performance.now();
    const p = {
      tick: res.tick,
      events: row.events,
      tick_p50_ms: row.tick_p50_ms,
      tick_p99_ms: row.tick_p99_ms,
      agents: row.agents,
      emitted: row.emitted,
      dead_letters: row.dead_letters,
      agents_by_type: Object.fromEntries(types.map((t) => [t, row[`n:${t}`]])),
    };
    const prev = figures.prevSql;
    if (prev && typeof row.events === 'number' && now > prev.at) {
      p.events_per_s = ((row.events - prev.events) * 1000) / (now - prev.at);
    }
    figures.prevSql = { events: row.events, at: now };
    showFigures(p, 'SQL');
  }

  // ---- counts by status ------------------------------------------------------------------
  const statusGroups = []; // {type, column, elem}

  function buildStatus() {
    const box = $('#status .groups');
    box.replaceChildren();
    for (const [type, t] of Object.entries(schema.types)) {
      for (const c of t.columns) {
        if (c.name === t.key || !(c.name === 'status' || c.name.endsWith('_status'))) continue;
        const elem = h('div', { class: 'group', 'data-type': type, 'data-column': c.name },
          h('h3', {}, `${type}.${c.name}`, h('small', { class: 'total' }),
            h('small', { class: 'tick', 'data-tick': '' })),
          h('div', { class: 'bar' }),
          h('table', { class: 'grid' },
            h('thead', {}, h('tr', {}, h('th', { text: c.name }), h('th', { text: 'agents' }),
              h('th', { text: 'share' }))),
            h('tbody')));
        box.append(elem);
        statusGroups.push({ type, column: c.name, elem, ctype: c.type });
      }
    }
    if (!statusGroups.length) box.append(h('p', { class: 'empty', text: 'no agent type has a status column' }));
  }

  async function refreshStatus(g) {
    const c = ident(g.column);
    const res = await sql(`SELECT ${c}, count(*) AS agents FROM ${ident(g.type)} GROUP BY 1 ORDER BY 1`);
    const total = res.rows.reduce((s, r) => s + Number(r[1]), 0);
    const bar = $('.bar', g.elem);
    const body = $('tbody', g.elem);
    const color = (v, i) => PALETTE[(Number.isInteger(v) && v >= 0 ? v : i) % PALETTE.length];
    bar.replaceChildren(...res.rows.map((r, i) => h('span', {
      style: `width:${total ? (100 * r[1]) / total : 0}%;background:${color(r[0], i)}`,
      title: `${fmt(r[0])}: ${r[1]}`,
    })));
    body.replaceChildren(...res.rows.map((r, i) => h('tr', { 'data-value': JSON.stringify(r[0]) },
      h('td', {}, h('span', { class: 'swatch', style: `background:${color(r[0], i)}` }), fmt(r[0], g.ctype)),
      h('td', { class: 'count', 'data-value': JSON.stringify(r[1]), text: fmt(r[1], res.types[1]) }),
      h('td', { text: total ? `${((100 * r[1]) / total).toFixed(1)}%` : '–' }))));
    $('.total', g.elem).textContent = `${group(total)} agents`;
    setTick($('.tick', g.elem), res.tick);
  }

  // ---- top N -----------------------------------------------------------------------------
  const top = { seq: 0 };

  function numericColumns(type) {
    const t = schema.types[type];
    return t.columns.filter((c) => c.name !== t.key && isNumericType(c.type));
  }

  function buildTop() {
    const form = $('#top form');
    const typeSel = form.elements.type;
    const colSel = form.elements.column;
    const types = Object.keys(schema.types).filter((t) => numericColumns(t).length);
    typeSel.replaceChildren(...types.map((t) => h('option', { value: t, text: t })));
    const want = params.get('top');
    if (want && types.includes(want)) typeSel.value = want;
    const fillColumns = () => {
      const cols = numericColumns(typeSel.value);
      colSel.replaceChildren(...cols.map((c) => h('option', { value: c.name, text: c.name })));
      const first = cols.find((c) => isFloatType(c.type)) || cols[0];
      if (first) colSel.value = first.name;
    };
    fillColumns();
    typeSel.addEventListener('change', () => {
      fillColumns();
      refreshTop().catch(reportError);
    });
    colSel.addEventListener('change', () => refreshTop().catch(reportError));
    form.elements.n.addEventListener('change', () => refreshTop().catch(reportError));
    form.addEventListener('submit', (ev) => ev.preventDefault());
  }

  // The query the top N shows (floats: NaN counts as missing, not as the largest value).
  function topQuery(type, column, n) {
    const t = schema.types[type];
    const k = ident(t.key);
    const c = ident(column);
    const by = isFloatType(t.typeOf[column]) ? `CASE WHEN isnan(${c}) THEN NULL ELSE ${c} END` : c;
    return `SELECT ${k}, ${c} FROM ${ident(type)} ORDER BY ${by} DESC NULLS LAST, ${k} LIMIT ${n}`;
  }

  async function refreshTop() {
    const form = $('#top form');
    const type = form.elements.type.value;
    const column = form.elements.column.value;
    if (!type || !column) return;
    const n = Math.min(Math.max(parseInt(form.elements.n.value, 10) || 10, 1), 1000);
    const seq = ++top.seq;
    const q = topQuery(type, column, n);
    const res = await sql(q);
    if (seq !== top.seq) return; // the selection changed meanwhile
    const table = $('#top table');
    table.dataset.type = type;
    table.dataset.column = column;
    table.title = q;
    $('thead', table).replaceChildren(h('tr', {}, h('th', { text: '#' }),
      h('th', { class: 'key', text: schema.types[type].key }), h('th', { text: column })));
    $('tbody', table).replaceChildren(...res.rows.map((r, i) => h('tr', { 'data-key': keyText(r[0]) },
      h('td', { text: String(i + 1) }),
      h('td', { class: 'key', text: keyText(r[0]) }),
      h('td', { class: 'v', 'data-value': JSON.stringify(r[1]), text: fmt(r[1], res.types[1]) }))));
    setTick($('#top .tick'), res.tick);
  }

  // ---- parents ---------------------------------------------------------------------------
  const parentLists = []; // {link, elem, buttons: Map key -> button, order: ''}

  function buildParents() {
    const box = $('#parents .links');
    box.replaceChildren();
    for (const [name, l] of Object.entries(schema.links)) {
      const elem = h('div', { class: 'link', 'data-link': name },
        h('h3', {}, `${l.parent} ← ${l.child}`, h('small', { text: name }),
          h('small', { class: 'count' }), h('small', { class: 'tick', 'data-tick': '' })),
        h('div', { class: 'parent-list' }));
      box.append(elem);
      parentLists.push({ link: name, elem, buttons: new Map(), order: '' });
    }
    if (!parentLists.length) box.append(h('p', { class: 'empty', text: 'no links' }));
  }

  async function refreshParents(pl) {
    const l = schema.links[pl.link];
    const p = ident(l.parentCol);
    const res = await sql(
      `SELECT key, children, count(*) OVER () AS parents FROM (SELECT ${p} AS key, count(*) AS children ` +
      `FROM ${ident(pl.link)} GROUP BY 1) ORDER BY children DESC, key LIMIT ${PARENTS_LIMIT}`);
    const list = $('.parent-list', pl.elem);
    // the top ones by children, shown in key order: buttons do not move under the mouse
    const keys = res.rows.map((r) => keyText(r[0])).sort(compareKeys);
    for (const r of res.rows) {
      const key = keyText(r[0]);
      let b = pl.buttons.get(key);
      if (!b) {
        b = h('button', { type: 'button', 'data-key': key, onclick: () => openParent(pl.link, key) },
          key, h('span', { class: 'n' }));
        pl.buttons.set(key, b);
      }
      b.classList.toggle('selected', watch !== null && watch.link === pl.link && watch.key === key);
      const n = $('.n', b);
      n.textContent = fmt(r[1]);
      n.dataset.value = JSON.stringify(r[1]);
    }
    for (const k of [...pl.buttons.keys()]) if (!keys.includes(k)) pl.buttons.delete(k);
    const order = keys.join('\n');
    if (order !== pl.order) {
      list.replaceChildren(...keys.map((k) => pl.buttons.get(k)));
      pl.order = order;
    }
    const parents = res.rows.length ? res.rows[0][2] : 0;
    $('.count', pl.elem).textContent =
      `${group(parents)} parents${parents > PARENTS_LIMIT ? `, top ${PARENTS_LIMIT} by children` : ''}`;
    setTick($('.tick', pl.elem), res.tick);
  }

  // ---- a parent's children, live ---------------------------------------------------------
  let watch = null;

  function closeWatch() {
    if (!watch) return;
    clearTimeout(watch.timer);
    live.unlink(watch.node, watch.link);
    for (const col of watch.valueLanes) live.unlink(watch.node, col);
    watch = null;
  }

  function openParent(link, key) {
    closeWatch();
    const l = schema.links[link];
    const child = schema.types[l.child];
    const parent = schema.types[l.parent];
    const node = `/${l.parent}/${encodeURIComponent(key)}`;
    const cols = child.emitted.filter((c) => c !== child.key);
    watch = {
      link,
      key,
      node,
      cols,
      child,
      drill: child.links[0] || null,
      rows: new Map(), // key -> {tr, cells}: what the table shows
      data: new Map(), // key -> {vals, changed, late}: what the lane said
      dirty: new Set(),
      structure: false,
      state: ['linking', ''],
      synced: null,
      pendingTick: null,
      timer: null,
      tick: null,
      frames: 0,
      valueLanes: parent.state.filter((c) => c !== parent.key),
      values: new Map(),
    };
    const w = watch;
    const panel = $('#children');
    panel.hidden = false;
    panel.dataset.link = link;
    panel.dataset.parent = key;
    panel.dataset.node = node;
    $('.title', panel).textContent = `${l.parent} ${key}: ${l.child} children (${link})`;
    delete panel.dataset.synced;
    panel.dataset.frames = '0';
    panel.dataset.rows = '0';
    const tickElem = $('.tick', panel);
    tickElem.textContent = '';
    tickElem.dataset.tick = '';
    setLaneState('linking', '');
    $('thead', panel).replaceChildren(h('tr', {}, h('th', { class: 'key', text: child.key }),
      ...cols.map((c) => h('th', { text: c }))));
    $('tbody', panel).replaceChildren();
    const pv = $('.parent-values', panel);
    pv.replaceChildren(...w.valueLanes.map((c) => {
      const v = h('b', { text: '–' });
      const chip = h('span', { class: 'chip', 'data-lane': c, 'data-value': 'null', 'data-tick': '' }, `${c} `, v);
      w.values.set(c, { chip, v });
      return chip;
    }));
    for (const pl of parentLists) {
      for (const [k, b] of pl.buttons) b.classList.toggle('selected', pl.link === link && k === key);
    }
    if (!live.usable()) {
      w.polled = true; // no live lanes: the refresh loop reads the children with SQL
      w.state = ['SQL, every refresh', ''];
      refreshChildrenSql(w).catch(reportError);
      return;
    }
    live.sync(node, link, (msg) => {
      if (watch === w) onChildren(w, msg);
    });
    for (const c of w.valueLanes) {
      live.sync(node, c, (msg) => {
        if (watch === w) onParentValue(w, c, msg);
      });
    }
    if (!live.open) setLaneState('waiting for the WebSocket', 'off');
  }

  // Without live lanes: the children and the parent's columns from SQL, fed to the same
  // model as lane frames (the whole set each time; unchanged values do not flash).
  async function refreshChildrenSql(w) {
    const l = schema.links[w.link];
    const child = schema.types[l.child];
    const parent = schema.types[l.parent];
    const ck = ident(child.key);
    const q = `SELECT c.${ck}, ${w.cols.map((c) => `c.${ident(c)}`).join(', ')} ` +
      `FROM ${ident(l.child)} c JOIN ${ident(w.link)} l ON l.${ident(l.childCol)} = c.${ck} ` +
      `WHERE l.${ident(l.parentCol)} = ${literal(w.key)}`;
    const res = await sql(q);
    if (watch !== w) return;
    const seen = new Set();
    const updates = res.rows.map((r) => {
      const key = keyText(r[0]);
      seen.add(key);
      return [key, Object.fromEntries(w.cols.map((c, i) => [c, r[i + 1]]))];
    });
    const removes = [...w.data.keys()].filter((k) => !seen.has(k));
    onChildren(w, { tag: 'event', tick: res.tick, updates, removes });
    const cols = w.valueLanes;
    const pres = await sql(`SELECT ${cols.map(ident).join(', ')} FROM ${ident(l.parent)} ` +
      `WHERE ${ident(parent.key)} = ${literal(w.key)}`);
    if (watch !== w || !pres.rows.length) return;
    cols.forEach((c, i) => onParentValue(w, c, { tag: 'event', tick: pres.tick, value: pres.rows[0][i] }));
  }

  // The WebSocket never opened (--no-live, a proxy without WebSockets): a parent still
  // waiting for its lanes is read with SQL instead.
  function onLiveUnreachable() {
    if (watch && !watch.polled && watch.synced === null) openParent(watch.link, watch.key);
  }

  function setLaneState(text, cls) {
    const s = $('#children .state');
    s.textContent = text;
    s.className = `state ${cls}`;
  }

  function laneTick(w, tick) {
    if (typeof tick !== 'number' || (w.tick !== null && tick < w.tick)) return;
    w.tick = tick;
    setTick($('#children .tick'), tick);
  }

  // Frames only update the model (w.data); the table is drawn from it at most every
  // RENDER_MS, all at once with its state and tick, so a busy lane costs one redraw per
  // period, not one per frame.
  const RENDER_MS = 100;

  function onChildren(w, msg) {
    if (msg.tag === 'reset') {
      w.data.clear();
      w.dirty.clear();
      w.structure = true;
      w.state = ['syncing', ''];
      w.synced = null;
    } else if (msg.tag === 'linked') {
      w.state = ['linked', ''];
    } else if (msg.tag === 'synced') {
      w.state = ['synced', 'on'];
      w.synced = msg.tick;
      w.pendingTick = Math.max(w.pendingTick ?? -1, msg.tick);
    } else if (msg.tag === 'unlinked') {
      w.state = [msg.reason ? `unlinked: ${msg.reason}` : 'unlinked', 'off'];
    } else if (msg.tag === 'event') {
      w.frames += 1;
      for (const [k, vals] of msg.updates || []) {
        const key = keyText(k);
        let d = w.data.get(key);
        if (!d) {
          d = { vals: {}, changed: new Set(), late: w.synced !== null };
          w.data.set(key, d);
          w.structure = true;
        }
        for (const c of w.cols) {
          if (!(c in vals) || (c in d.vals && Object.is(d.vals[c], vals[c]))) continue;
          d.vals[c] = vals[c];
          d.changed.add(c);
        }
        w.dirty.add(key);
      }
      for (const k of msg.removes || []) {
        if (w.data.delete(keyText(k))) w.structure = true;
      }
      if (typeof msg.tick === 'number') w.pendingTick = Math.max(w.pendingTick ?? -1, msg.tick);
    } else {
      return;
    }
    if (w.timer === null) w.timer = setTimeout(() => renderChildren(w), RENDER_MS);
  }

  function renderChildren(w) {
    w.timer = null;
    if (watch !== w) return;
    const panel = $('#children');
    for (const key of w.dirty) {
      const d = w.data.get(key);
      if (!d) continue;
      let row = w.rows.get(key);
      const fresh = !row;
      if (fresh) {
        row = childRow(w, key);
        w.rows.set(key, row);
        if (d.late) flash(row.tr); // a child that came after the sync
      }
      for (const c of d.changed) {
        const v = d.vals[c];
        const td = row.cells[c];
        td.textContent = fmt(v, w.child.typeOf[c]);
        td.dataset.value = JSON.stringify(v);
        if (!fresh) flash(td);
      }
      d.changed.clear();
    }
    w.dirty.clear();
    if (w.structure) {
      for (const [key, row] of w.rows) {
        if (!w.data.has(key)) {
          row.tr.remove();
          w.rows.delete(key);
        }
      }
      const keys = [...w.rows.keys()].sort(compareKeys);
      $('tbody', panel).replaceChildren(...keys.map((k) => w.rows.get(k).tr));
      w.structure = false;
    }
    setLaneState(...w.state);
    if (w.synced === null) delete panel.dataset.synced;
    else panel.dataset.synced = String(w.synced);
    panel.dataset.frames = String(w.frames);
    panel.dataset.rows = String(w.rows.size);
    if (w.pendingTick !== null) laneTick(w, w.pendingTick);
  }

  function childRow(w, key) {
    const cells = {};
    // a child that is a parent itself (region -> sensors): its key opens its children
    const keyCell = w.drill
      ? h('td', { class: 'key' }, h('a', {
        href: '#',
        class: 'drill',
        text: key,
        title: `${w.child.name} ${key}: ${w.drill}`,
        onclick: (ev) => {
          ev.preventDefault();
          openParent(w.drill, key);
        },
      }))
      : h('td', { class: 'key', text: key });
    const tr = h('tr', { 'data-key': key }, keyCell,
      ...w.cols.map((c) => (cells[c] = h('td', { 'data-col': c, 'data-value': 'null', text: '–' }))));
    return { tr, cells };
  }

  function onParentValue(w, col, msg) {
    const slot = w.values.get(col);
    if (!slot || msg.tag !== 'event') return;
    const v = msg.value;
    const changed = slot.chip.dataset.value !== JSON.stringify(v);
    slot.v.textContent = fmt(v, schema.types[schema.links[w.link].parent].typeOf[col]);
    slot.chip.dataset.value = JSON.stringify(v);
    slot.chip.dataset.tick = String(msg.tick);
    slot.chip.title = `tick ${msg.tick}`;
    if (changed) flash(slot.v);
  }

  // ---- the refresh loop ------------------------------------------------------------------
  function reportError(e) {
    showError(e && e.message ? e.message : String(e));
  }

  async function refreshAll() {
    const jobs = [
      ...statusGroups.map((g) => refreshStatus(g)),
      refreshTop(),
      ...parentLists.map((pl) => refreshParents(pl)),
    ];
    if (watch && watch.polled) jobs.push(refreshChildrenSql(watch));
    if (Date.now() - figures.lastPulse >= PULSE_STALE_MS) jobs.push(figuresFromSql());
    const results = await Promise.allSettled(jobs);
    const failed = results.find((r) => r.status === 'rejected');
    if (failed) reportError(failed.reason);
  }

  async function start() {
    live.sync(PULSE.node, PULSE.lane, onPulse);
    live.connect();
    for (;;) {
      try {
        schema = await loadSchema();
        break;
      } catch (e) {
        reportError(e);
        await sleep(2000);
      }
    }
    document.body.dataset.types = Object.keys(schema.types).join(',');
    if (!schema.liveLanes) {
      live.stop();
      const conn = $('#conn');
      conn.className = 'conn off';
      conn.textContent = 'SQL only';
      conn.title = 'the server has no live lanes (--no-live): figures and children come from SQL';
    }
    buildStatus();
    buildTop();
    buildParents();
    for (;;) {
      const t0 = performance.now();
      await refreshAll();
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
      await sleep(Math.max(50, REFRESH_MS - (performance.now() - t0)));
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
