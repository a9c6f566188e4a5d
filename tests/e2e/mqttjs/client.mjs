// A client of the Envoy end-to-end tests made with the npm `mqtt` package (MQTT.js), the client
// browser apps use for MQTT over WebSockets. One JSON argument says what to do; every event is
// printed as one JSON line: connect (CONNACK), suback (granted codes), suback-refused, published,
// message,
// error, close.
//
//   node client.mjs '{"url": "ws://127.0.0.1:8083/mqtt", "username": "lamp-01", "password": "k",
//                     "clientId": "lamp-01", "subscribe": ["devices/#"],
//                     "publish": [{"topic": "devices/lamp-01/state", "message": "on", "qos": 1}],
//                     "stay_ms": 0}'
import mqtt from "mqtt";

const opts = JSON.parse(process.argv[2]);
const out = (event) => console.log(JSON.stringify(event));

const client = mqtt.connect(opts.url, {
  username: opts.username,
  password: opts.password,
  clientId: opts.clientId,
  protocolVersion: opts.protocolVersion ?? 4,
  reconnectPeriod: 0,
  connectTimeout: 5000,
  // wss:// to the test CA's certificate.
  ca: opts.ca,
});

client.on("connect", async (connack) => {
  out({ event: "connect", code: connack.returnCode ?? connack.reasonCode ?? 0 });
  try {
    for (const topic of opts.subscribe ?? []) {
      try {
        const granted = await client.subscribeAsync(topic, { qos: 1 });
        out({ event: "suback", topic, granted: granted.map((g) => g.qos) });
      } catch (e) {
        // MQTT.js rejects a SUBACK failure code (0x80).
        out({ event: "suback-refused", topic, message: String(e.message ?? e) });
      }
    }
    out({ event: "subscribed" });
    for (const p of opts.publish ?? []) {
      await client.publishAsync(p.topic, p.message, { qos: p.qos ?? 0 });
      out({ event: "published", topic: p.topic });
    }
  } catch (e) {
    out({ event: "error", message: String(e.message ?? e) });
  }
  setTimeout(() => client.end(), opts.stay_ms ?? 0);
});
client.on("message", (topic, payload) => out({ event: "message", topic, payload: payload.toString() }));
client.on("error", (e) => {
  out({ event: "error", message: String(e.message ?? e), code: e.code ?? null });
  client.end(true);
});
client.on("close", () => out({ event: "close" }));
setTimeout(() => { out({ event: "timeout" }); process.exit(3); }, opts.timeout_ms ?? 15000).unref();
