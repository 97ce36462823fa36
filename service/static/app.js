// The search page: plain DOM, no build step. Server data is only ever inserted as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search-form");
const objectUrls = [];

function fmt(x, digits = 3) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–";
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function showToken() {
  // the token field: for safety=off (moderators) and for the staff panel (take-downs, adds)
  $("token-label").hidden = $("safety").value !== "off" && !$("staff").open;
  document.body.classList.toggle("staff", $("staff").open && $("token").value.trim() !== "");
}
$("safety").addEventListener("change", showToken);
$("staff").addEventListener("toggle", showToken);
$("token").addEventListener("input", showToken);

// One request to the API with the token: its JSON body, or null once the status line says what went wrong.
async function send(url, options) {
  let response;
  try {
    response = await fetch(url, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  } catch (err) {
    setStatus(`The server could not be reached (${err}).`, true);
    return null;
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || data);
    setStatus(`Error ${response.status}: ${detail}`, true);
    return null;
  }
  return data;
}

function postJson(url, body, method = "POST") {
  return send(url, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

async function addItem() {
  const file = $("add-file").files[0];
  if (!file) {
    setStatus("Choose an image to add.", true);
    return;
  }
  const body = new FormData();
  body.append("image", file);
  const caption = $("add-caption").value.trim();
  if (caption) body.append("caption", caption);
  for (const tag of $("add-tags").value.split(",").map((t) => t.trim()).filter(Boolean)) body.append("tags", tag);
  if ($("add-near").checked) body.append("allow_near_duplicate", "true");
  setStatus("Adding…");
  const item = await send("/v1/items/upload", { method: "POST", body });
  if (!item) return;
  const near = item.near_duplicate_of ? ` (a near-duplicate of taken-down item ${item.near_duplicate_of}, allowed)` : "";
  setStatus(item.created ? `Added item ${item.id}${near}.` : `Already indexed as item ${item.id}.`);
  $("add-form").reset();
}

async function takeDown(hit, node, reason) {
  const done = await postJson(`/v1/items/${encodeURIComponent(hit.id)}`, { reason }, "DELETE");
  if (!done) return;
  node.remove();
  setStatus(done.already ? `Item ${hit.id} was already taken down (by ${done.by}).` : `Took down item ${hit.id}.`);
}

function takedownControls(hit, node) {
  const box = el("div", { class: "takedown" });
  const open = el("button", { type: "button", class: "takedown-open" }, "Take down");
  const reason = el("input", { type: "text", class: "takedown-reason", maxlength: "1000", placeholder: "Reason",
                                "aria-label": "Reason for the take-down", hidden: "" });
  const confirm = el("button", { type: "button", class: "takedown-confirm", hidden: "" }, "Confirm");
  open.addEventListener("click", () => {
    open.hidden = true;
    reason.hidden = false;
    confirm.hidden = false;
    reason.focus();
  });
  confirm.addEventListener("click", () => {
    const why = reason.value.trim();
    if (!why) {
      setStatus("Give a reason for the take-down.", true);
      return;
    }
    takeDown(hit, node, why);
  });
  box.append(open, reason, confirm);
  return box;
}

async function search() {
  const file = $("image-file").files[0];
  const text = $("query").value.trim();
  const k = Math.min(Math.max(parseInt($("k").value, 10) || 12, 1), 100);
  const options = { target: $("target").value, safety: $("safety").value, k };
  if (!file && !text) {
    setStatus("Type a query or choose an image.", true);
    return;
  }
  setStatus("Searching…");
  let data;
  if (file) {
    const body = new FormData();
    body.append("image", file);
    for (const [key, value] of Object.entries(options)) body.append(key, String(value));
    data = await send("/v1/search/upload", { method: "POST", body });
  } else {
    data = await postJson("/v1/search", { text, ...options });
  }
  if (!data) return;
  render(data, file ? `image ${file.name}` : `“${text}”`);
}

function render(data, label) {
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
  const q = data.query || {};
  const notice = $("notice");
  if (q.redirected) {
    notice.textContent =
      `Your query was moved toward safe content: distance to the origin ${fmt(q.distance_to_origin)} → ` +
      `${fmt(q.distance_to_origin_after)} (unsafe above ${fmt(q.threshold)}).`;
    notice.hidden = false;
  } else {
    notice.hidden = true;
    notice.textContent = "";
  }

  const report = $("report");
  report.replaceChildren(
    el("span", { class: q.unsafe ? "badge unsafe" : "badge safe" }, q.unsafe ? "query flagged unsafe" : "query looks safe"),
    el("span", {}, ` distance to origin ${fmt(q.distance_to_origin)} · threshold ${fmt(q.threshold)}`),
  );
  report.hidden = false;

  const grid = $("results");
  grid.replaceChildren();
  for (const hit of data.results) grid.appendChild(card(hit));
  setStatus(`${data.results.length} results for ${label} in ${fmt(data.timings_ms.total, 1)} ms`);
  const idx = data.index || {};
  $("footer").textContent = `index ${idx.name} · generation ${idx.generation} · model ${String(idx.model).slice(0, 19)}`;
}

function card(hit) {
  const item = el("article", { class: "card", "data-id": hit.id, "data-kind": hit.kind, "data-unsafe": String(hit.unsafe) });
  if (hit.kind === "image") {
    const img = el("img", { alt: hit.caption || "result image", loading: "lazy" });
    if (hit.unsafe === true) {
      // only moderators receive such items; the media route wants their token, which <img> cannot send
      fetch(`/v1/media/${hit.id}`, { headers: authHeaders() })
        .then((r) => (r.ok ? r.blob() : Promise.reject(r.status)))
        .then((blob) => {
          const url = URL.createObjectURL(blob);
          objectUrls.push(url);
          img.src = url;
        })
        .catch(() => img.classList.add("broken"));
    } else {
      img.src = `/v1/media/${hit.id}`;
    }
    img.addEventListener("error", () => img.classList.add("broken"));
    item.appendChild(img);
  } else {
    item.appendChild(el("blockquote", { class: "caption-hit" }, hit.caption || "(no caption)"));
  }
  if (hit.kind === "image" && hit.caption) item.appendChild(el("p", { class: "caption" }, hit.caption));
  const badges = el("div", { class: "badges" });
  badges.appendChild(el("span", { class: "badge" }, hit.kind));
  badges.appendChild(el("span", { class: "badge" }, `d ${fmt(hit.distance)}`));
  if (hit.unsafe === true) badges.appendChild(el("span", { class: "badge unsafe" }, "unsafe"));
  else if (hit.unsafe === false) badges.appendChild(el("span", { class: "badge safe" }, "safe"));
  for (const tag of hit.tags || []) badges.appendChild(el("span", { class: "badge tag" }, tag));
  item.appendChild(badges);
  item.appendChild(takedownControls(hit, item));
  return item;
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  search();
});
$("add-form").addEventListener("submit", (event) => {
  event.preventDefault();
  addItem();
});
$("image-file").addEventListener("change", () => {
  if ($("image-file").files.length) search();
});
