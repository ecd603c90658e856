// Starts fauxqs (a fast in-memory SQS) on 127.0.0.1 only, for bench_sqs.
//
//   node start.mjs FAUXQS_PACKAGE_DIR [PORT]
//
// fauxqs's own `startFauxqs` always listens on 0.0.0.0, which would put a
// queue anyone on the network can write to on the machine; so this builds
// its app and listens on loopback itself. PORT defaults to 0 (a free port);
// the port taken is printed as the single line `listening 127.0.0.1:PORT`.
// It stops when its standard input closes, so a bench that dies never
// leaves a server behind.

import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const HOST = "127.0.0.1";

const [packageDir, portArg = "0"] = process.argv.slice(2);
if (!packageDir) {
  console.error("usage: node start.mjs FAUXQS_PACKAGE_DIR [PORT]");
  process.exit(2);
}
const port = Number.parseInt(portArg, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`start.mjs: not a port: ${portArg}`);
  process.exit(2);
}

// The package is installed outside this folder (.ci/node), so it is loaded
// by path: its manifest names the module entry point.
const manifest = JSON.parse(await readFile(join(packageDir, "package.json"), "utf8"));
const entry = manifest.exports?.["."]?.import?.default ?? manifest.main;
const { buildApp } = await import(pathToFileURL(join(packageDir, entry)).href);

const app = buildApp({ logger: false });
const address = await app.listen({ port, host: HOST });
console.log(`listening ${HOST}:${new URL(address).port}`);

const stop = () => {
  app.close().finally(() => process.exit(0));
};
process.stdin.on("end", stop);
process.stdin.on("error", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
