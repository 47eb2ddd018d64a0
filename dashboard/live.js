// The live feed: one WebSocket per opened run (/ws/live/{run}), reconnect with
// jittered backoff (asking for the points stored meanwhile), new points appended
// to the opened run and the panels told to refresh.
'use strict';

import { liveSocketURL, askForToken, currentToken, AUTH_CLOSE_CODES } from './api.js';
import { parseSeries, lastStep, mergeSteps } from './series.js';
import { app, actions, probe, hasError } from './state.js';

const $ = (id) => document.getElementById(id);
const LIVE_TAIL_LIMIT = 200000; // points kept to merge into a refetch that raced them

const live = { socket: null, run: null, attempt: 0, timer: null, everOpened: false, firstSince: null };

function setIndicator(mode, text) {
  const indicator = $('live-indicator');
  indicator.className = `indicator indicator-${mode}`;
  $('live-text').textContent = text;
  probe.live = mode === 'live' ? 'live' : mode === 'wait' ? 'connecting' : 'disconnected';
  indicator.dataset.state = probe.live;
}

/**
 * Subscribe to `run`'s live feed. `since`: the last step of the first /series answer, so the
 * server first sends what was stored after that read and before this subscription (those
 * points would otherwise reach neither); null when nothing was read (an unknown run).
 */
export function connectLive(run, since = null) {
  clearTimeout(live.timer);
  if (live.socket) {
    const old = live.socket;
    live.socket = null;
    old.close(1000);
  }
  live.run = run;
  live.attempt = 0;
  live.everOpened = false;
  live.firstSince = Number.isFinite(since) ? since : null;
  openSocket();
}

function openSocket() {
  const run = live.run;
  setIndicator('wait', 'connecting…');
  let socket;
  try {
    // After a disconnect, ask the server for what was stored meanwhile.
    const maxStep = app.run ? app.run.maxStep : -Infinity;
    const since = live.everOpened ? (Number.isFinite(maxStep) ? maxStep : null) : live.firstSince;
    socket = new WebSocket(liveSocketURL(run, since));
  } catch {
    scheduleReconnect();
    return;
  }
  live.socket = socket;
  const tokenUsed = currentToken();
  socket.addEventListener('open', () => {
    if (socket !== live.socket) return;
    const reconnected = live.everOpened;
    live.everOpened = true;
    live.attempt = 0;
    setIndicator('live', 'live');
    if (reconnected) actions.resync();
  });
  socket.addEventListener('message', (event) => {
    if (socket !== live.socket) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (message && message.type === 'points' && (message.run === undefined || message.run === run)) {
      onLivePoints(message.data || {});
    } else if (message && message.type === 'resync' && (message.run === undefined || message.run === run)) {
      // The server dropped this socket's backlog (it fell behind): what is drawn may miss
      // points, so read the run again; new points keep coming on this socket.
      probe.resyncs = (probe.resyncs || 0) + 1;
      actions.liveResync();
    }
  });
  socket.addEventListener('close', (event) => {
    if (socket !== live.socket) return;
    live.socket = null;
    if (AUTH_CLOSE_CODES.has(event.code)) {
      if (currentToken() !== tokenUsed) { openSocket(); return; } // a token arrived meanwhile
      setIndicator('off', 'disconnected: needs read token');
      askForToken('The live feed needs the read token (gradwatch serve --read-token).').then(() => {
        if (live.run === run) openSocket();
      });
      return;
    }
    scheduleReconnect();
  });
}

function scheduleReconnect() {
  const base = Math.min(10000, 500 * 2 ** live.attempt);
  const delay = Math.round(base * (0.75 + Math.random() * 0.5));
  live.attempt += 1;
  setIndicator('off', `disconnected, retrying in ${Math.max(1, Math.round(delay / 1000))} s`);
  clearTimeout(live.timer);
  live.timer = setTimeout(() => {
    if (live.run !== null) openSocket();
  }, delay);
}

function onLivePoints(data) {
  const run = app.run;
  if (!run || run.name !== live.run) return;
  const chunk = parseSeries(data);
  if (!chunk.step.length) return;
  if (hasError('series')) { // the run did not exist when the page opened; now it does
    actions.openRun(run.name, { push: false });
    return;
  }
  probe.livePoints += chunk.step.length;
  run.maxStep = Math.max(run.maxStep, lastStep(chunk));
  run.liveTail.push(chunk);
  run.liveTailPoints += chunk.step.length;
  while (run.liveTailPoints > LIVE_TAIL_LIMIT && run.liveTail.length > 1) {
    run.liveTailPoints -= run.liveTail.shift().step.length;
  }
  const before = run.series.step.length;
  run.series = mergeSteps(run.series, chunk); // late points too, in step order
  run.appendedSinceFetch += run.series.step.length - before;
  const flagged = ['spike', 'nonfinite', 'clipped', 'skipped', 'level_shift'].some((name) => chunk[name].some(Boolean));
  actions.livePoints({ flagged });
}
