// The playground's entry point: builds the modules over the page's elements and wires the parts
// that belong to no single one of them (the API-key dialog, the panels, the conversation list,
// the mode switch, export). Loaded as a module from index.html; no inline script anywhere.

import { Api } from "./api.js";
import { Chat } from "./chat.js";
import { Params } from "./params.js";
import { Raw } from "./raw.js";
import { StatusBar } from "./status.js";
import { Store, downloadJson, newConversation, titleOf } from "./store.js";

const $ = (id) => document.getElementById(id);
const NARROW = window.matchMedia("(max-width: 760px)");
const MODE_KEY = "pytgi.playground.mode";

// The API-key dialog. Concurrent 401s share one prompt; Escape or Cancel answers null.
class KeyPrompt {
  constructor(elements) {
    this.el = elements; // {dialog, form, input, reason, cancel}
    this.pending = null;
    this.resolve = null;
    this.el.form.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = this.el.input.value.trim();
      if (key) this._finish(key);
    });
    this.el.cancel.addEventListener("click", () => this._finish(null));
    this.el.dialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      this._finish(null);
    });
  }

  ask(reason) {
    this.el.reason.textContent = reason;
    if (!this.pending) {
      this.pending = new Promise((resolve) => {
        this.resolve = resolve;
      });
      this.el.input.value = "";
      this.el.dialog.showModal();
      this.el.input.focus();
    }
    return this.pending;
  }

  _finish(key) {
    const resolve = this.resolve;
    this.pending = null;
    this.resolve = null;
    this.el.input.value = ""; // the key stays in sessionStorage only, not in the form
    this.el.dialog.close();
    if (resolve) resolve(key);
  }
}

// A polite live region: screen readers hear that an answer ended or failed, not every token.
function announcer(region) {
  return (text) => {
    region.textContent = "";
    setTimeout(() => {
      region.textContent = text;
    }, 50);
  };
}

class Panels {
  constructor(pairs) {
    this.pairs = pairs; // [[toggle button, panel], ...]
    for (const [toggle, panel] of pairs) {
      toggle.addEventListener("click", () => this.set(panel, panel.hidden));
    }
    this.reset();
    NARROW.addEventListener("change", () => this.reset());
    // On a phone a panel covers the chat: Escape closes it and gives the focus back to its button.
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape" || !NARROW.matches) return;
      for (const [toggle, panel] of this.pairs) {
        if (!panel.hidden) {
          this.set(panel, false);
          toggle.focus();
        }
      }
    });
  }

  // Wide screens show both side panels; a phone shows one at a time, over the chat, on demand,
  // just under the top bar (whose height depends on how its buttons wrap).
  reset() {
    const top = document.querySelector(".topbar").getBoundingClientRect().bottom;
    document.documentElement.style.setProperty("--panel-top", `${Math.round(top)}px`);
    for (const [, panel] of this.pairs) this.set(panel, !NARROW.matches);
  }

  set(panel, open) {
    for (const [toggle, other] of this.pairs) {
      if (other === panel) {
        other.hidden = !open;
        toggle.setAttribute("aria-expanded", String(open));
      } else if (open && NARROW.matches) {
        other.hidden = true;
        toggle.setAttribute("aria-expanded", "false");
      }
    }
  }

  closeOnPhone(panel) {
    if (NARROW.matches) this.set(panel, false);
  }
}

function main() {
  const keyPrompt = new KeyPrompt({
    dialog: $("key-dialog"), form: $("key-form"), input: $("key-input"), reason: $("key-reason"),
    cancel: $("key-cancel"),
  });
  const api = new Api((reason) => keyPrompt.ask(reason));
  const store = new Store();
  const announce = announcer($("announcer"));
  const params = new Params($("params-form"));
  const panels = new Panels([[$("toggle-conversations"), $("conversations")], [$("toggle-params"), $("params")]]);
  const showField = (field) => {
    panels.set($("params"), true);
    field.focus();
  };

  const list = $("conversation-list");
  let chat = null;
  const renderConversations = () => {
    const items = store.list().map((conversation) => {
      const item = document.createElement("li");
      const open = document.createElement("button");
      open.type = "button";
      open.className = "conv-open";
      open.textContent = titleOf(conversation);
      open.title = new Date(conversation.updated).toLocaleString();
      if (chat && chat.conversation && chat.conversation.id === conversation.id) {
        open.setAttribute("aria-current", "true");
      }
      open.addEventListener("click", () => {
        const stored = store.get(conversation.id);
        if (stored) chat.open(stored);
        renderConversations();
        panels.closeOnPhone($("conversations"));
        $("composer-input").focus();
      });
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "conv-delete small";
      remove.textContent = "Delete";
      remove.setAttribute("aria-label", `Delete conversation: ${titleOf(conversation)}`);
      remove.addEventListener("click", () => {
        if (chat.busy && chat.conversation.id === conversation.id) {
          chat.setNotice("Stop the answer before deleting its conversation.");
          return;
        }
        store.remove(conversation.id);
        if (chat.conversation.id === conversation.id) chat.open(store.list()[0] || newConversation());
        renderConversations();
      });
      item.append(open, remove);
      return item;
    });
    list.replaceChildren(...items);
    $("no-conversations").hidden = items.length > 0;
  };

  chat = new Chat({
    api, store, params, announce, onParamError: showField, onSaved: renderConversations,
    elements: {
      messages: $("messages"), form: $("composer"), input: $("composer-input"), role: $("composer-role"),
      send: $("send"), stop: $("stop"), system: $("system-prompt"), notice: $("chat-notice"),
    },
  });
  const raw = new Raw({
    api, params, announce, onParamError: showField,
    elements: {
      form: $("raw-form"), prompt: $("raw-prompt"), topN: $("raw-top-n"), generate: $("raw-generate"),
      stop: $("raw-stop"), output: $("raw-output"), stats: $("raw-stats"), notice: $("raw-notice"),
      tip: $("token-tip"),
    },
  });
  chat.open(store.list()[0] || newConversation());
  renderConversations();

  $("new-chat").addEventListener("click", () => {
    chat.open(newConversation(chat.conversation.system));
    renderConversations();
    panels.closeOnPhone($("conversations"));
    $("composer-input").focus();
  });
  const stamp = () => new Date().toISOString().replace(/[:.]/g, "-");
  $("export-chat").addEventListener("click", () => {
    downloadJson({ format: "pytgi-playground", version: 1, exported: new Date().toISOString(),
      conversations: [chat.conversation] }, `pytgi-conversation-${stamp()}.json`);
  });
  $("export-all").addEventListener("click", () => {
    downloadJson({ format: "pytgi-playground", version: 1, exported: new Date().toISOString(),
      conversations: store.list() }, `pytgi-conversations-${stamp()}.json`);
  });

  const setMode = (mode) => {
    const rawMode = mode === "raw";
    $("chat-view").hidden = rawMode;
    $("raw-view").hidden = !rawMode;
    document.body.classList.toggle("mode-raw", rawMode);
    for (const radio of document.querySelectorAll("input[name=mode]")) radio.checked = radio.value === mode;
    localStorage.setItem(MODE_KEY, mode);
  };
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => {
      if (radio.checked) setMode(radio.value);
    });
  }
  setMode(localStorage.getItem(MODE_KEY) === "raw" ? "raw" : "chat");

  $("key-button").addEventListener("click", async () => {
    const key = await keyPrompt.ask("The key is kept in this tab only (sessionStorage) and sent as a Bearer header.");
    if (key !== null) api.setKey(key);
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("key-dialog").open && (chat.busy || raw.busy)) {
      chat.stop();
      raw.stop();
    }
  });

  const status = new StatusBar(api, {
    model: $("st-model"), queue: $("st-queue"), batch: $("st-batch"), kv: $("st-kv"), prefix: $("st-prefix"),
    state: $("st-state"),
  });
  status.loadInfo();
  status.start();
  // Public routes answer without a key: this one tells whether the server wants one, and asks
  // for it now rather than at the first message.
  api.json("v1/models").catch((error) => chat.setNotice(error.message));
}

main();
