// notifier merchant editor: the live preview of a message and the live contrast check of
// the brand colour. Progressive: every form also works without this script.
"use strict";

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

function setText(id, value) {
  const el = document.getElementById(id);
  if (el) el.textContent = value == null ? "" : String(value);
}

function startPreview(form) {
  const textarea = form.querySelector("textarea[name=text]");
  const localeInput = form.querySelector("input[name=locale]");
  const previewLocale = document.getElementById("preview-locale");
  const collected = document.getElementById("preview-collected");
  const status = document.getElementById("preview-status");
  const error = document.getElementById("preview-error");
  let sequence = 0;

  async function update() {
    const mine = ++sequence;
    const locale = localeInput.value || previewLocale.value;
    let response;
    try {
      response = await fetch(form.dataset.previewUrl, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": form.dataset.csrf },
        body: JSON.stringify({
          milestone: form.dataset.milestone, path: form.dataset.path, locale, text: textarea.value,
          variant: form.dataset.variant || "a", collected: Boolean(collected && collected.checked),
        }),
      });
    } catch (e) {
      if (mine === sequence) { error.hidden = false; error.textContent = "The preview could not reach the service."; }
      return;
    }
    const data = await response.json();
    if (mine !== sequence) return; // a newer keystroke's preview is on its way
    if (!response.ok) {
      error.hidden = false;
      error.textContent = data.error && data.error.message ? data.error.message : (data.error || "The preview failed.");
      status.textContent = "The preview shows the last text that rendered.";
      return;
    }
    error.hidden = true;
    error.textContent = "";
    const email = data.email, sms = data.sms;
    setText("p-subject", email.subject);
    setText("p-preheader", email.preheader);
    document.getElementById("p-desktop").srcdoc = email.html;
    document.getElementById("p-mobile").srcdoc = email.html;
    setText("p-text", email.text);
    setText("p-sms", sms.body);
    setText("p-sms-chars", [...sms.body].length);
    setText("p-sms-encoding", sms.encoding);
    setText("p-sms-segments", sms.segments);
    // the words in the reader's language and direction, as a mail client or phone shows them
    for (const id of ["p-subject", "p-preheader", "p-text", "p-sms"]) {
      const node = document.getElementById(id);
      node.lang = data.lang || "";
      node.dir = data.dir || "ltr";
    }
    status.textContent = "Preview up to date (" + locale + ").";
    const tbody = document.querySelector("#variables tbody");
    if (tbody && data.variables) {
      tbody.replaceChildren(...Object.entries(data.variables).map(([name, value]) => {
        const row = document.createElement("tr");
        const th = document.createElement("th");
        th.scope = "row";
        const code = document.createElement("code");
        code.textContent = name;
        th.append(code);
        const td = document.createElement("td");
        td.textContent = value;
        row.append(th, td);
        return row;
      }));
      document.querySelectorAll("[data-preview-locale-name]").forEach((el) => { el.textContent = locale; });
    }
  }

  textarea.addEventListener("input", debounce(update, 250));
  previewLocale.addEventListener("change", update);
  if (collected) collected.addEventListener("change", update);
  update();
}

// WCAG relative luminance and contrast, as the service computes them (render/brand.py).
function luminance(hex) {
  const c = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16) / 255)
    .map((v) => (v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4));
  return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
}
function contrast(a, b) {
  const [x, y] = [luminance(a), luminance(b)].sort((p, q) => q - p);
  return (x + 0.05) / (y + 0.05);
}

function startContrast(input) {
  const report = document.getElementById(input.dataset.contrast);
  const check = () => {
    const value = input.value.trim();
    if (!/^#[0-9a-fA-F]{6}$/.test(value)) { report.textContent = "Enter a colour like #1d4ed8."; return; }
    const white = contrast(value, "#ffffff"), dark = contrast(value, "#111827");
    const best = Math.max(white, dark);
    report.textContent = "White text on it: " + white.toFixed(2) + ":1; dark text: " + dark.toFixed(2) + ":1. " +
      (best >= 4.5 ? "Passes WCAG AA (4.5:1); buttons use " + (white >= 4.5 ? "white" : "dark") + " text."
                   : "Neither reaches 4.5:1: pick a darker or a lighter colour.");
  };
  input.addEventListener("input", debounce(check, 200));
}

// A test send takes the template as typed and the preview's language (without this script:
// the template as saved, in the language the page opened with).
function startTestSend(testForm, editForm) {
  testForm.addEventListener("submit", () => {
    testForm.elements.text.value = editForm.querySelector("textarea[name=text]").value;
    const previewLocale = document.getElementById("preview-locale");
    if (previewLocale && !previewLocale.disabled) testForm.elements.preview_locale.value = previewLocale.value;
    const collected = document.getElementById("preview-collected");
    if (collected && testForm.elements.collected) testForm.elements.collected.value = collected.checked ? "1" : "";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("edit-form");
  if (form) startPreview(form);
  const testForm = document.getElementById("test-form");
  if (form && testForm) startTestSend(testForm, form);
  // what became of a test send, read out and in view as the page comes back
  const tested = document.getElementById("tested");
  if (tested) tested.focus();
  // a form that came back refused: its error summary, read out first
  const refused = document.querySelector("[data-focus]");
  if (refused && !tested) refused.focus();
  document.querySelectorAll("input[data-contrast]").forEach(startContrast);
});
