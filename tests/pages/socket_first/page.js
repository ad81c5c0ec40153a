// A 2023-style page: its Socket.IO connection opens as the page loads, before any API call;
// then it creates a discussion over HTTP and prompts on the socket. Everything the page sees
// is kept in window.record for the test to read.
"use strict";

const record = { client: null, connected: false, discussionId: null, events: [], errors: [] };
window.record = record;

function fail(error) {
  record.errors.push(String(error));
}

async function afterConnect(socket) {
  if (record.connected) return;             // MiniSocket fires "connect" again on reconnects
  record.connected = true;
  const resp = await fetch("/new_discussion?title=socket%20first",
                           { credentials: "same-origin" });
  const body = await resp.json();
  record.discussionId = body.id;
  socket.emit("generate_msg", { prompt: "Say hello in five words." });
}

function start() {
  const which = new URLSearchParams(location.search).get("client") || "polling";
  record.client = which;
  const socket = which === "sio" ? new MiniSocket() : new PollingFirstSocket();
  for (const name of ["infos", "message", "final"]) {
    socket.on(name, (data) => record.events.push([name, data]));
  }
  if (which === "sio") {
    socket.on("connect", () => afterConnect(socket).catch(fail));
  } else {
    socket.ready.then(() => afterConnect(socket)).catch(fail);
  }
}

start();
