/*
 * Junction live client: subscribe to event streams over the gateway's WebSocket and resume after a
 * drop from the last event id received (no gaps, no duplicates). Protocol: docs/STREAMING_LIVE.md.
 *
 *   const live = new JunctionLive("wss://host/gateway/v1/streams/ws", {
 *     token: async () => (await fetch(...tokens...)).json().then((t) => t.token),
 *   });
 *   live.subscribe("orders", {filter: {field: "amount", op: "gt", value: 100}}, (event) => ...);
 *   await live.publish("orders", {order_id: "o-1"});
 *
 * `token` is a string or a function returning one (a promise too): an API key, a JWT, or a stream
 * token from POST /gateway/v1/streams/tokens. It is sent in the first message, never in the URL.
 */
(function (root) {
  "use strict";

  const NO_RETRY = new Set([4001, 4009]); // unauthorized, too many connections

  class JunctionLive {
    constructor(url, options = {}) {
      this.url = url;
      this.token = options.token;
      this.onLost = options.onLost || (() => {});
      this.onStatus = options.onStatus || (() => {});
      this.onError = options.onError || (() => {});
      this.maxBackoffMs = options.maxBackoffMs || 10000;
      this.subscriptions = new Map(); // id -> {stream, filter, from, handler, lastId}
      this.pending = new Map(); // publish ref -> {resolve, reject}
      this.nextId = 1;
      this.closed = false;
      this.backoffMs = 250;
      this._connect();
    }

    subscribe(stream, options = {}, handler) {
      const id = options.id || `s${this.nextId++}`;
      const subscription = {stream, filter: options.filter, from: options.from || "latest", handler, lastId: null};
      this.subscriptions.set(id, subscription);
      if (this.ready) this._sendSubscribe(id, subscription);
      return id;
    }

    unsubscribe(id) {
      if (this.subscriptions.delete(id) && this.ready) this._send({type: "unsubscribe", id});
    }

    publish(stream, payload, options = {}) {
      const ref = `p${this.nextId++}`;
      const message = {type: "publish", ref, stream, payload};
      if (options.idempotencyKey) message.idempotency_key = options.idempotencyKey;
      return new Promise((resolve, reject) => {
        this.pending.set(ref, {resolve, reject});
        if (this.ready) this._send(message);
        else reject(new Error("not connected"));
      });
    }

    close() {
      this.closed = true;
      if (this.socket) this.socket.close(1000, "client closed");
    }

    async _connect() {
      this.ready = false;
      let token = this.token;
      try {
        if (typeof token === "function") token = await token();
      } catch (error) {
        this.onError(error);
        return this._retry();
      }
      const socket = new WebSocket(this.url);
      this.socket = socket;
      socket.onopen = () => socket.send(JSON.stringify({type: "auth", token}));
      socket.onmessage = (frame) => this._receive(JSON.parse(frame.data));
      socket.onclose = (closing) => {
        this.ready = false;
        for (const {reject} of this.pending.values()) reject(new Error("connection closed"));
        this.pending.clear();
        this.onStatus({state: "closed", code: closing.code, reason: closing.reason});
        if (!this.closed && !NO_RETRY.has(closing.code)) this._retry();
      };
    }

    _retry() {
      const wait = this.backoffMs;
      this.backoffMs = Math.min(this.backoffMs * 2, this.maxBackoffMs);
      setTimeout(() => this.closed || this._connect(), wait);
    }

    _receive(message) {
      switch (message.type) {
        case "welcome":
          this.ready = true;
          this.backoffMs = 250;
          this.onStatus({state: "open", principal: message.principal});
          for (const [id, subscription] of this.subscriptions) this._sendSubscribe(id, subscription);
          break;
        case "subscribed": {
          const subscription = this.subscriptions.get(message.id);
          // `latest` or a time resolved to an id: a reconnect resumes from there.
          if (subscription && !subscription.lastId && message.position) subscription.lastId = message.position;
          break;
        }
        case "events": {
          const subscription = this.subscriptions.get(message.sub);
          if (!subscription) break;
          for (const event of message.events) {
            subscription.lastId = event.id;
            subscription.handler({stream: message.stream, ...event});
          }
          break;
        }
        case "events_lost": {
          const subscription = this.subscriptions.get(message.sub);
          if (subscription) subscription.lastId = message.to;
          this.onLost({sub: message.sub, from: message.from, to: message.to});
          break;
        }
        case "published":
        case "error": {
          const waiting = message.ref !== undefined && this.pending.get(message.ref);
          if (waiting) {
            this.pending.delete(message.ref);
            if (message.type === "published") waiting.resolve(message);
            else waiting.reject(Object.assign(new Error(message.message), message));
          } else if (message.type === "error") {
            this.onError(message);
          }
          break;
        }
        case "ping":
          this._send({type: "pong"});
          break;
        default:
          break;
      }
    }

    _sendSubscribe(id, subscription) {
      const message = {type: "subscribe", id, stream: subscription.stream, from: subscription.lastId || subscription.from};
      if (subscription.filter) message.filter = subscription.filter;
      this._send(message);
    }

    _send(message) {
      this.socket.send(JSON.stringify(message));
    }
  }

  root.JunctionLive = JunctionLive;
  if (typeof module !== "undefined") module.exports = {JunctionLive};
})(typeof globalThis !== "undefined" ? globalThis : this);
