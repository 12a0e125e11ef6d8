// Loads each UI workflow into the real ComfyUI web page (headless Chromium driven by playwright-core) and reports,
// per workflow, the node types the frontend does not know. Usage:
//   node load_workflows.mjs <comfyui url> <screenshot folder> <workflow.json>...
// Prints one JSON line: {"workflow": missing-types[]}; writes <screenshot folder>/<name>.png for each.
import { createRequire } from "module";
import { readFileSync } from "fs";
import { basename } from "path";

const require = createRequire(process.env.PLAYWRIGHT_CORE_DIR ? process.env.PLAYWRIGHT_CORE_DIR + "/" : import.meta.url);
const { chromium } = require("playwright-core");

const [url, shots, ...files] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 120000 });
await page.waitForTimeout(2000);
await page.keyboard.press("Escape"); // the first-visit template dialog would cover the canvas
const result = {};
for (const file of files) {
  const workflow = JSON.parse(readFileSync(file, "utf8"));
  const missing = await page.evaluate(async (graph) => {
    await window.app.loadGraphData(graph);
    const known = window.LiteGraph.registered_node_types;
    return graph.nodes.map((n) => n.type).filter((t) => !(t in known));
  }, workflow);
  await page.waitForTimeout(1000);
  await page.mouse.click(800, 500);   // focus the canvas, then "." fits the whole graph into view
  await page.keyboard.press(".");
  await page.waitForTimeout(1000);
  await page.screenshot({ path: `${shots}/${basename(file, ".json")}.png` });
  result[basename(file, ".json")] = missing;
}
console.log(JSON.stringify(result));
await browser.close();
