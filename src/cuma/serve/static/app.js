// cuma playground: one question, 2-4 profiles, answers streamed side by side (or option distributions as bars).
// Plain browser JavaScript, no build step and nothing loaded from elsewhere.
"use strict";

const PRESETS = [
  { name: "Egypt · 25-34 · female · Muslim",
    profile: { country: "Egypt", age_group: "25-34 years old", gender: "Female", religion: "Muslim", education: "Secondary" } },
  { name: "Sweden · 55-64 · male · no religion",
    profile: { country: "Sweden", age_group: "55-64 years old", gender: "Male", religion: "None", education: "University" } },
  { name: "Japan · 35-44 · female · Buddhist",
    profile: { country: "Japan", age_group: "35-44 years old", gender: "Female", religion: "Buddhist", education: "University" } },
  { name: "Brazil · 18-24 · male · Catholic",
    profile: { country: "Brazil", age_group: "18-24 years old", gender: "Male", religion: "Roman Catholic", education: "Secondary" } },
  { name: "United States · 45-54 · female · Protestant",
    profile: { country: "United States", age_group: "45-54 years old", gender: "Female", religion: "Protestant", education: "University" } },
  { name: "Nigeria · 25-34 · male · Muslim",
    profile: { country: "Nigeria", age_group: "25-34 years old", gender: "Male", religion: "Muslim", education: "Primary" } },
];
const SHOWN_FIELDS = ["country", "age_group", "gender", "religion", "education", "employment"];
const MIN_PROFILES = 2, MAX_PROFILES = 4;

const $ = (sel, root = document) => root.querySelector(sel);
const state = { info: null, mode: "chat", controllers: [], labels: {} };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// ------------------------------------------------------------------------------------------------------- profiles

function profileOf(card) {
  const out = {};
  for (const input of card.querySelectorAll(".fields input")) {
    const v = input.value.trim();
    if (v) out[input.dataset.field] = v;
  }
  return out;
}

function fillCard(card, profile) {
  for (const input of card.querySelectorAll(".fields input")) input.value = profile[input.dataset.field] || "";
}

function addProfile(presetIndex) {
  const cards = document.querySelectorAll(".profile-card");
  if (cards.length >= MAX_PROFILES) return;
  const card = $("#profile-template").content.firstElementChild.cloneNode(true);
  const select = $(".preset", card);
  select.add(new Option("custom", "custom"));
  PRESETS.forEach((p, i) => select.add(new Option(p.name, String(i))));
  const fields = $(".fields", card);
  for (const name of SHOWN_FIELDS) {
    const id = "f-" + Math.random().toString(36).slice(2, 9);
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = state.labels[name] || name;
    const input = document.createElement("input");
    input.id = id;
    input.dataset.field = name;
    input.addEventListener("input", () => { select.value = "custom"; });
    fields.append(label, input);
  }
  select.addEventListener("change", () => {
    if (select.value !== "custom") fillCard(card, PRESETS[Number(select.value)].profile);
  });
  $(".remove", card).addEventListener("click", () => {
    if (document.querySelectorAll(".profile-card").length > MIN_PROFILES) { card.remove(); updateButtons(); }
  });
  const index = presetIndex % PRESETS.length;
  select.value = String(index);
  fillCard(card, PRESETS[index].profile);
  $("#profiles").append(card);
  updateButtons();
}

function updateButtons() {
  const n = document.querySelectorAll(".profile-card").length;
  $("#add-profile").disabled = n >= MAX_PROFILES;
  for (const b of document.querySelectorAll(".profile-card .remove")) b.disabled = n <= MIN_PROFILES;
}

// ----------------------------------------------------------------------------------------------------------- modes

function setMode(mode) {
  state.mode = mode;
  $("#mode-chat").classList.toggle("active", mode === "chat");
  $("#mode-choice").classList.toggle("active", mode === "choice");
  $("#mode-chat").setAttribute("aria-selected", String(mode === "chat"));
  $("#mode-choice").setAttribute("aria-selected", String(mode === "choice"));
  $("#options-box").classList.toggle("hidden", mode !== "choice");
  for (const el of document.querySelectorAll(".answer-head")) el.textContent = mode === "chat" ? "Answer" : "Option distribution";
}

// ------------------------------------------------------------------------------------------------------------ chat

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return `${res.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `HTTP ${res.status}`;
}

async function streamInto(card, question, signal) {
  const answer = $(".answer", card);
  answer.textContent = "";
  answer.className = "answer streaming";
  card.dataset.state = "streaming";
  const body = {
    model: state.info.model,
    messages: [{ role: "user", content: question }],
    max_tokens: Number($("#max-tokens").value) || 96,
    temperature: Number($("#temperature").value) || 0,
    stream: true,
    profile: profileOf(card),
  };
  const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!res.ok) throw new Error(await errorMessage(res));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") { finishCard(card, "done"); return; }
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        const choice = obj.choices && obj.choices[0];
        if (choice && choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
        if (choice && choice.finish_reason) card.dataset.finish = choice.finish_reason;
      }
    }
  }
  finishCard(card, "done");
}

function finishCard(card, st) {
  const answer = $(".answer", card);
  answer.classList.remove("streaming");
  card.dataset.state = st;
  if (st === "done" && !answer.textContent.trim()) answer.textContent = "(empty answer)";
}

function failCard(card, err) {
  const answer = $(".answer", card);
  answer.className = "answer error";
  answer.textContent = err.name === "AbortError" ? (answer.textContent + " [stopped]") : String(err.message || err);
  card.dataset.state = "error";
}

// ---------------------------------------------------------------------------------------------------------- choice

function renderBars(card, options, result) {
  const answer = $(".answer", card);
  answer.className = "answer";
  answer.textContent = "";
  const bars = document.createElement("div");
  bars.className = "bars";
  result.probabilities.forEach((p, i) => {
    const row = document.createElement("div");
    row.className = "bar-row" + (i === result.answer_index ? " top" : "");
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = `${String.fromCharCode(65 + i)}. ${options[i]}`;
    label.title = options[i];
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.display = "block";
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.append(fill);
    const pct = document.createElement("span");
    pct.className = "bar-pct";
    pct.textContent = (100 * p).toFixed(1) + "%";
    row.append(label, track, pct);
    bars.append(row);
  });
  answer.append(bars);
  card.dataset.state = "done";
}

async function askChoice(cards, question, signal) {
  const options = $("#options").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (options.length < 2) throw new Error("give at least two options, one per line");
  for (const card of cards) {
    card.dataset.state = "streaming";
    $(".answer", card).className = "answer streaming";
    $(".answer", card).textContent = "";
  }
  const body = { model: state.info.model, question, options, profiles: cards.map(profileOf) };
  const res = await fetch("/v1/choice", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!res.ok) throw new Error(await errorMessage(res));
  const out = await res.json();
  out.results.forEach((r, i) => renderBars(cards[i], out.options, r));
}

// ------------------------------------------------------------------------------------------------------------- ask

async function ask() {
  const question = $("#question").value.trim();
  if (!question) { setStatus("type a question first", true); $("#question").focus(); return; }
  const cards = Array.from(document.querySelectorAll(".profile-card"));
  const controller = new AbortController();
  state.controllers = [controller];
  $("#ask").disabled = true;
  $("#stop").disabled = false;
  setStatus(state.mode === "chat" ? `asking ${cards.length} profiles…` : "scoring the options…");
  const t0 = performance.now();
  try {
    if (state.mode === "chat") {
      const results = await Promise.allSettled(cards.map((c) => streamInto(c, question, controller.signal)
        .catch((err) => { failCard(c, err); throw err; })));
      const failed = results.filter((r) => r.status === "rejected").length;
      setStatus(failed ? `${failed} of ${cards.length} answers failed` : `done in ${((performance.now() - t0) / 1000).toFixed(1)} s`, failed > 0);
    } else {
      await askChoice(cards, question, controller.signal);
      setStatus(`done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    }
  } catch (err) {
    for (const c of cards) if (c.dataset.state === "streaming") failCard(c, err);
    setStatus(String(err.message || err), true);
  } finally {
    $("#ask").disabled = false;
    $("#stop").disabled = true;
  }
}

async function init() {
  $("#mode-chat").addEventListener("click", () => setMode("chat"));
  $("#mode-choice").addEventListener("click", () => setMode("choice"));
  $("#ask").addEventListener("click", ask);
  $("#stop").addEventListener("click", () => state.controllers.forEach((c) => c.abort()));
  $("#add-profile").addEventListener("click", () => addProfile(document.querySelectorAll(".profile-card").length));
  $("#question").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask(); });
  const saved = window.localStorage && localStorage.getItem("cuma-api-key");
  if (saved) $("#api-key").value = saved;
  $("#api-key").addEventListener("change", () => localStorage.setItem("cuma-api-key", $("#api-key").value));
  try {
    const res = await fetch("/info");
    state.info = await res.json();
  } catch (err) {
    $("#model-info").textContent = "cannot reach the server";
    return;
  }
  for (const f of state.info.profile_fields || []) state.labels[f.name] = f.label;
  const i = state.info;
  const needs = i.uses_profile ? "routes on the profile" : (i.profile_in_prompt ? "profile in the prompt" : "profile ignored");
  $("#model-info").innerHTML = "";
  const b = document.createElement("b");
  b.textContent = i.model;
  $("#model-info").append(b, document.createTextNode(` · ${i.method} · ${needs} · context ${i.context_length}`));
  $("#key-label").classList.toggle("hidden", !i.auth_required);
  $("#max-tokens").max = String(i.max_tokens_limit);
  addProfile(0);
  addProfile(1);
  document.body.dataset.ready = "1";
}

init();
