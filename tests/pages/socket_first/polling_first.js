// An Engine.IO 4 / Socket.IO 5 client that connects the way socket.io-client (the 2023
// lollms UI's client) does: handshake and namespace CONNECT over HTTP long-polling, then an
// upgrade of the same Engine.IO session to a WebSocket (probe, upgrade packet).
"use strict";

class PollingFirstSocket {
  constructor() {
    this.handlers = new Map();
    this.ready = this._connect();
  }

  on(event, fn) {
    this.handlers.set(event, fn);
  }

  emit(event, payload) {
    this.ws.send("42" + JSON.stringify([event, payload]));
  }

  _url(params) {
    return "/socket.io/?" + new URLSearchParams({ EIO: "4", transport: "polling", ...params });
  }

  async _get(params) {
    const resp = await fetch(this._url({ ...params, t: String(Date.now()) }),
                             { credentials: "same-origin" });
    if (!resp.ok) throw new Error("polling GET " + resp.status);
    return (await resp.text()).split("\x1e");   // EIO4 payload: packets joined by RS
  }

  async _post(packet) {
    const resp = await fetch(this._url({ sid: this.sid }), {
      method: "POST", body: packet, credentials: "same-origin",
      headers: { "Content-Type": "text/plain;charset=UTF-8" },
    });
    if (!resp.ok) throw new Error("polling POST " + resp.status);
  }

  async _connect() {
    const [open] = await this._get({});
    if (open[0] !== "0") throw new Error("no Engine.IO open packet: " + open);
    this.sid = JSON.parse(open.slice(1)).sid;
    await this._post("40");
    for (;;) {
      const packets = await this._get({ sid: this.sid });
      if (packets.some((p) => p.startsWith("44"))) throw new Error("connect refused");
      if (packets.some((p) => p.startsWith("40"))) break;
    }
    await this._upgrade();
  }

  _upgrade() {
    return new Promise((resolve, reject) => {
      const params = new URLSearchParams({ EIO: "4", transport: "websocket", sid: this.sid });
      const ws = new WebSocket(`ws://${location.host}/socket.io/?${params}`);
      ws.onopen = () => ws.send("2probe");
      ws.onerror = () => reject(new Error("WebSocket upgrade failed"));
      ws.onmessage = (msg) => {
        if (msg.data !== "3probe") return;
        ws.send("5");
        this.ws = ws;
        ws.onmessage = (frame) => this._onFrame(frame.data);
        resolve();
      };
    });
  }

  _onFrame(data) {
    if (data === "2") {
      this.ws.send("3");                    // ping -> pong
    } else if (data.startsWith("42")) {
      const [event, payload] = JSON.parse(data.slice(2));
      const fn = this.handlers.get(event);
      if (fn) fn(payload);
    }
  }
}

window.PollingFirstSocket = PollingFirstSocket;
