// A small Socket.IO 5 / Engine.IO 4 client over WebSocket, written for lollms_fast's web UI.
// It speaks only what the UI needs: connect to the default namespace (with an optional auth
// payload), emit events, receive events, answer pings, and reconnect with back-off.
"use strict";

class MiniSocket {
  constructor(query = {}, auth = null) {
    this.query = query;
    this.auth = auth;
    this.handlers = new Map();
    this.connected = false;
    this.closedByUser = false;
    this.retryDelay = 500;
    this.outbox = [];
    this._open();
  }

  on(event, fn) {
    if (!this.handlers.has(event)) this.handlers.set(event, []);
    this.handlers.get(event).push(fn);
    return this;
  }

  emit(event, ...args) {
    const frame = "42" + JSON.stringify([event, ...args]);
    if (this.connected) this.ws.send(frame);
    else this.outbox.push(frame);
  }

  close() {
    this.closedByUser = true;
    if (this.ws) {
      try { this.ws.send("41"); } catch (e) { /* already closed */ }
      this.ws.close();
    }
  }

  _fire(event, ...args) {
    for (const fn of this.handlers.get(event) || []) {
      try { fn(...args); } catch (e) { console.error(e); }
    }
  }

  _open() {
    const params = new URLSearchParams({ ...this.query, EIO: "4", transport: "websocket" });
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.ws = new WebSocket(`${scheme}//${location.host}/socket.io/?${params}`);
    this.ws.onmessage = (msg) => this._onFrame(msg.data);
    this.ws.onclose = () => {
      const was = this.connected;
      this.connected = false;
      if (was) this._fire("disconnect");
      if (!this.closedByUser) {
        setTimeout(() => this._open(), this.retryDelay);
        this.retryDelay = Math.min(this.retryDelay * 2, 8000);
      }
    };
  }

  _onFrame(data) {
    const kind = data[0];
    if (kind === "0") {           // Engine.IO open: join the default namespace
      this.ws.send("40" + (this.auth ? JSON.stringify(this.auth) : ""));
    } else if (kind === "2") {    // ping -> pong
      this.ws.send("3");
    } else if (kind === "1") {    // server closes
      this.ws.close();
    } else if (kind === "4") {    // a Socket.IO packet
      this._onPacket(data.slice(1));
    }
  }

  _onPacket(packet) {
    const type = packet[0];
    let body = packet.slice(1);
    if (body.startsWith("/")) return;          // other namespaces: not used
    const ackMatch = body.match(/^\d+/);        // an ack id may precede the payload
    if (ackMatch) body = body.slice(ackMatch[0].length);
    if (type === "0") {                         // CONNECT accepted
      this.connected = true;
      this.retryDelay = 500;
      for (const frame of this.outbox.splice(0)) this.ws.send(frame);
      this._fire("connect");
    } else if (type === "2") {                  // EVENT
      const [event, ...args] = JSON.parse(body);
      this._fire(event, ...args);
    } else if (type === "4") {                  // CONNECT_ERROR
      this.closedByUser = true;
      this._fire("connect_error", body ? JSON.parse(body) : {});
      this.ws.close();
    } else if (type === "1") {                  // server-side namespace disconnect
      this.connected = false;
      this._fire("disconnect");
    }
  }
}

window.MiniSocket = MiniSocket;
