// Loads each UI workflow into the real ComfyUI web page (headless Chromium driven by playwright-core) and reports,
// per workflow, the node types the frontend does not know and the model files its "Missing Models" dialog offers to
// download. Usage:
//   node load_workflows.mjs <comfyui url> <screenshot folder> <workflow.json>...
// Prints one JSON line: {"workflow": {"missing_types": [...], "missing_models": ["folder / file", ...]}}; writes
// <screenshot folder>/<name>.png for each.
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
  // The frontend's "Missing Models" dialog (offered from the nodes' properties.models): note what it offers, then
  // close it so that the screenshot shows the graph.
  const dialog = page.getByText("Missing Models", { exact: true });
  let models = [];
  if (await dialog.count()) {
    models = await page.evaluate(() => Array.from(document.querySelectorAll(".p-dialog, [role=dialog]"))
      .map((d) => d.innerText).join("\n").match(/[\w.-]+ \/ [\w.-]+\.(safetensors|ckpt|pt|bin)/g) || []);
    await page.keyboard.press("Escape");
    await page.waitForTimeout(500);
  }
  await page.mouse.click(150, 960);   // focus the canvas (an empty corner: no widget), then "." fits the graph into view
  await page.keyboard.press(".");
  await page.waitForTimeout(1000);
  await page.screenshot({ path: `${shots}/${basename(file, ".json")}.png` });
  result[basename(file, ".json")] = { missing_types: missing, missing_models: models };
}
console.log(JSON.stringify(result));
await browser.close();
