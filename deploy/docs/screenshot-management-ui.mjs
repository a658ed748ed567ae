// Takes the README's screenshot of the RabbitMQ management UI with headless Chromium (over
// the DevTools protocol, no packages needed): logs in, opens a page, saves a PNG.
//
//   node --experimental-websocket deploy/docs/screenshot-management-ui.mjs [PAGE] [OUT.png]
//   PAGE: queues (default), connections, exchanges, …   OUT: deploy/docs/management-ui.png
//
// Environment: ROTA_UI_URL (http://127.0.0.1:15672), ROTA_UI_USER / ROTA_UI_PASSWORD (guest),
// CHROMIUM (/usr/bin/chromium).
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const page = process.argv[2] ?? "queues";
const out = process.argv[3] ?? "deploy/docs/management-ui.png";
const ui = process.env.ROTA_UI_URL ?? "http://127.0.0.1:15672";
const user = process.env.ROTA_UI_USER ?? "guest";
const password = process.env.ROTA_UI_PASSWORD ?? "guest";

const profile = mkdtempSync(join(tmpdir(), "rota-ui-"));
const chromium = spawn(process.env.CHROMIUM ?? "/usr/bin/chromium", [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--window-size=1400,1000", "--remote-debugging-port=0", `--user-data-dir=${profile}`, "about:blank",
], { stdio: ["ignore", "ignore", "pipe"] });
const done = (code) => {
  chromium.once("exit", () => { rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 }); process.exit(code); });
  chromium.kill();
};

// Chromium prints "DevTools listening on ws://…" once it is up.
const browserUrl = await new Promise((resolve, reject) => {
  let err = "";
  chromium.stderr.on("data", (d) => {
    err += d;
    const m = err.match(/DevTools listening on (ws:\/\/\S+)/);
    if (m) resolve(m[1]);
  });
  chromium.on("exit", () => reject(new Error(`chromium exited: ${err}`)));
});
const http = browserUrl.replace(/^ws:\/\/([^/]+)\/.*$/, "http://$1");
const target = await (await fetch(`${http}/json/new?about:blank`, { method: "PUT" })).json();

const ws = new WebSocket(target.webSocketDebuggerUrl);
await new Promise((r) => ws.addEventListener("open", r, { once: true }));
let next = 0;
const waiting = new Map();
ws.addEventListener("message", (e) => {
  const msg = JSON.parse(e.data);
  if (msg.id && waiting.has(msg.id)) waiting.get(msg.id)(msg);
});
const send = (method, params = {}) => new Promise((resolve, reject) => {
  const id = ++next;
  waiting.set(id, (msg) => (msg.error ? reject(new Error(`${method}: ${msg.error.message}`)) : resolve(msg.result)));
  ws.send(JSON.stringify({ id, method, params }));
});
const js = async (expression) => (await send("Runtime.evaluate", { expression, awaitPromise: true, returnByValue: true })).result.value;
const until = async (expression, what) => {
  for (let i = 0; i < 200; i++) {
    // The page may be navigating (after the login): ask again.
    if (await js(expression).catch(() => false)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
};

try {
  await send("Page.navigate", { url: `${ui}/` });
  await until(`!!document.querySelector('input[name=username]')`, "the login form");
  await js(`setTimeout(() => {
    document.querySelector('input[name=username]').value = ${JSON.stringify(user)};
    document.querySelector('input[name=password]').value = ${JSON.stringify(password)};
    document.querySelector('form').dispatchEvent(new Event('submit', { cancelable: true, bubbles: true }));
    document.querySelector('input[type=submit]').click();
  })`);
  await until(`!!document.querySelector('#logout')`, "the login (wrong user or password?)");
  await send("Page.navigate", { url: `${ui}/#/${page}` });
  await until(`!!document.querySelector('#main table.list')`, `the ${page} list`);
  await until(`document.querySelectorAll('#main table.list tbody tr').length > 0`, "rows");
  const { data } = await send("Page.captureScreenshot", { format: "png" });
  writeFileSync(out, Buffer.from(data, "base64"));
  console.log(out);
  done(0);
} catch (e) {
  console.error(`screenshot-management-ui: ${e.message}`);
  done(1);
}
