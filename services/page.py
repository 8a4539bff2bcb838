"""The page at `/`: try the sampler in a browser (plain HTML + fetch, no external assets).

Query parameters prefill the form (`sampler`, `steps`, `eta`, `n`, `seed`, and for a class-conditional model
`class` — an index, a name or `each` — and `guidance`); `run=1` samples on load, once the model info is in. The
sampler list and which samplers take η come from the sampler catalog (`diffusion.sampler_specs`); the class picker
and the guidance slider appear only when GET /v1/models lists classes. Sampling goes through the streaming endpoint,
so a progress bar follows each model call.
"""

import json

from diffusion.sampler_specs import SAMPLER_NAMES, SAMPLER_SPECS
from services.schemas import MAX_GUIDANCE_SCALE

_DEFAULT = "ddim"
_OPTIONS = "".join(f"<option{' selected' if name == _DEFAULT else ''}>{name}</option>" for name in SAMPLER_NAMES)
_TAKES_ETA = json.dumps([name for name, spec in SAMPLER_SPECS.items() if "eta" in spec.options])

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>raydiff sampler</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 24px; background: #f4f5f7; color: #1d2330; }
  h1 { margin: 0 0 4px; font-size: 22px; color: #1f4fd1; }
  #model { font-size: 13px; color: #555; margin-bottom: 16px; }
  form { display: flex; flex-wrap: wrap; gap: 12px; align-items: end; background: #fff; padding: 12px;
         border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.15); }
  label { display: flex; flex-direction: column; font-size: 12px; gap: 4px; }
  input, select { font-size: 14px; padding: 4px 6px; width: 90px; }
  button { font-size: 14px; padding: 6px 18px; background: #1f4fd1; color: #fff; border: 0; border-radius: 6px; }
  #status { margin: 4px 0 12px; font-size: 13px; min-height: 18px; }
  #bar { width: 384px; height: 6px; margin-top: 12px; accent-color: #1f4fd1; }
  #status.error { color: #b00020; }
  [hidden] { display: none !important; }
  #gs { width: 120px; padding: 0; }
  #grid { image-rendering: pixelated; width: 384px; border: 1px solid #ccc; background: #fff; display: none; }
</style>
</head>
<body>
<h1>raydiff &mdash; diffusion sampler</h1>
<div id="model">loading model info&hellip;</div>
<form id="form">
  <label>sampler <select id="sampler">@OPTIONS@</select></label>
  <label>steps <input id="steps" type="number" min="1" placeholder="default"></label>
  <label>eta <input id="eta" type="number" min="0" max="1" step="0.1" value="0"></label>
  <label>images <input id="n" type="number" min="1" value="16"></label>
  <label>seed <input id="seed" type="number" min="0" placeholder="random"></label>
  <label id="cls-field" hidden>class <select id="cls"><option value="">none</option>
    <option value="each">each (cycled)</option></select></label>
  <label id="gs-field" hidden>guidance <output id="gs-value">3</output>
    <input id="gs" type="range" min="0" max="@MAX_GUIDANCE@" step="0.5" value="3"></label>
  <button id="go" type="submit">Sample</button>
</form>
<progress id="bar" value="0" max="1"></progress>
<div id="status"></div>
<img id="grid" alt="samples">
<script>
const $ = (id) => document.getElementById(id);
const TAKES_ETA = @TAKES_ETA@;
const params = new URLSearchParams(location.search);
for (const [key, id] of [["sampler", "sampler"], ["steps", "steps"], ["eta", "eta"], ["n", "n"], ["seed", "seed"]]) {
  if (params.has(key)) $(id).value = params.get(key);
}
const base = location.pathname.replace(/\\/$/, "");
let classNames = null;  // the served model's classes (GET /v1/models); null: unconditional
function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

async function loadModel() {
  try {
    const r = await fetch(base + "/v1/models");
    const [m] = await r.json();
    $("model").textContent = `${m.name} v${m.version ?? "-"}${m.alias ? " @" + m.alias : ""} · ` +
      `${m.channels}×${m.image_size}×${m.image_size} · T=${m.num_timesteps} · ${m.schedule} · ${m.device}` +
      (m.num_classes ? ` · ${m.num_classes} classes` : "");
    if (m.num_classes) showClasses(m.class_names);
  } catch (e) { $("model").textContent = "model info unavailable: " + e; }
}

function showClasses(names) {
  classNames = names;
  for (const [k, name] of names.entries()) $("cls").add(new Option(name === String(k) ? name : `${k}: ${name}`, k));
  if (params.has("class")) {
    const want = params.get("class");
    const k = names.indexOf(want);
    $("cls").value = k >= 0 ? String(k) : want;
  }
  if (params.has("guidance")) $("gs").value = params.get("guidance");
  $("cls-field").hidden = $("gs-field").hidden = false;
  guidanceShown();
}

function guidanceShown() {
  $("gs-value").textContent = $("gs").value;
  $("gs").disabled = $("cls").value === "";
}

async function sample(event) {
  if (event) event.preventDefault();
  const body = { sampler: $("sampler").value, num_images: parseInt($("n").value, 10), format: "grid" };
  if ($("steps").value) body.steps = parseInt($("steps").value, 10);
  if (TAKES_ETA.includes(body.sampler)) body.eta = parseFloat($("eta").value || "0");
  if ($("seed").value) body.seed = parseInt($("seed").value, 10);
  if (classNames && $("cls").value !== "") {
    const each = Array.from({ length: body.num_images }, (_, k) => k % classNames.length);
    body.class_labels = $("cls").value === "each" ? each : [parseInt($("cls").value, 10)];
    body.guidance_scale = parseFloat($("gs").value);
  }
  status("sampling…");
  $("go").disabled = true;
  try {
    const r = await fetch(base + "/v1/samples/stream", { method: "POST",
                                                         headers: { "content-type": "application/json" },
                                                         body: JSON.stringify(body) });
    if (!r.ok) { const err = await r.json(); status(`error ${r.status}: ${err.message}`, true); return; }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "", out = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      for (let nl = buffer.indexOf("\\n"); nl >= 0; nl = buffer.indexOf("\\n")) {
        const event = JSON.parse(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
        if (event.event === "progress") {
          $("bar").max = event.of; $("bar").value = event.step;
          document.body.dataset.progress = `${event.step}/${event.of}`;
          status(`model call ${event.step} / ${event.of}…`);
        } else if (event.event === "error") { status("error: " + event.message, true); return; }
        else out = event;
      }
    }
    if (!out) { status("the stream ended without a result", true); return; }
    $("grid").src = "data:image/png;base64," + out.images[0];
    $("grid").style.display = "block";
    const labels = out.class_labels ? [...new Set(out.class_labels)].map((k) => classNames[k]) : null;
    const shown = !labels ? "" : labels.length > 3 ? `${labels.length} classes` : `class ${labels.join(", ")}`;
    const conditioning = labels ? `, ${shown}, guidance ${out.guidance_scale}` : "";
    status(`done: ${out.shape[0]} images, ${out.sampler} ${out.steps} steps, seed ${out.seed}${conditioning}, ` +
           `${out.timing.total_s.toFixed(2)} s (${$("bar").max} model calls)`);
    document.body.dataset.sampled = "1";
  } catch (e) { status("request failed: " + e, true); }
  finally { $("go").disabled = false; }
}

$("form").addEventListener("submit", sample);
$("cls").addEventListener("change", guidanceShown);
$("gs").addEventListener("input", guidanceShown);
loadModel().then(() => { if (params.get("run") === "1") sample(); });
</script>
</body>
</html>
""".replace("@OPTIONS@", _OPTIONS).replace("@TAKES_ETA@", _TAKES_ETA) \
    .replace("@MAX_GUIDANCE@", f"{MAX_GUIDANCE_SCALE:g}")
