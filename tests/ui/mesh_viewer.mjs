// Opens mesh files in the real ComfyUI web page's 3D viewer (one core Load 3D node per file, the files being in
// ComfyUI's input/3d folder) in headless Chromium with software WebGL, and screenshots each viewer. Usage:
//   node mesh_viewer.mjs <comfyui url> <screenshot folder> <model_file>...      (model_file as Load 3D lists it)
// Writes <screenshot folder>/viewer_<i>.png per file, in order; prints one JSON line: the files the viewers show.
import { createRequire } from "module";

const require = createRequire(process.env.PLAYWRIGHT_CORE_DIR ? process.env.PLAYWRIGHT_CORE_DIR + "/" : import.meta.url);
const { chromium } = require("playwright-core");

const [url, shots, ...models] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 120000 });
await page.waitForTimeout(2000);
await page.keyboard.press("Escape"); // the first-visit template dialog would cover the canvas
const shown = await page.evaluate((models) => {
  window.app.graph.clear();
  return models.map((model, i) => {
    const node = window.LiteGraph.createNode("Load3D");
    node.pos = [20 + i * 520, 20];
    node.size = [500, 760];
    window.app.graph.add(node);
    const widget = node.widgets.find((w) => w.name === "model_file");
    widget.value = model;
    if (widget.callback) widget.callback(model);  // what choosing the file in the dropdown does: load it
    return widget.value;
  });
}, models);
await page.waitForTimeout(8000); // loading and the first frames (software WebGL)
const viewers = page.locator(".comfy-load-3d canvas");
if ((await viewers.count()) !== models.length) {
  console.error(`expected ${models.length} 3D viewers, found ${await viewers.count()}`);
  process.exit(1);
}
for (let i = 0; i < models.length; i++) {
  await viewers.nth(i).screenshot({ path: `${shots}/viewer_${i}.png` });
}
console.log(JSON.stringify(shown));
await browser.close();
