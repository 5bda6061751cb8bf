// Conversations kept in this browser (localStorage): they survive reloads and never leave the
// machine except through "Export as JSON". One JSON document under one key, read and written
// whole: a few hundred conversations of chat text stay far below the storage quota, and a
// failed write (quota) is reported, not silently lost.

const STORAGE_KEY = "pytgi.playground.conversations.v1";
const TITLE_LENGTH = 48;

export function newId() {
  // crypto.randomUUID exists only in secure contexts (https, localhost), not on a LAN address.
  if (window.crypto && crypto.randomUUID && window.isSecureContext) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

export function newConversation(system = "") {
  const now = Date.now();
  return { id: newId(), title: "", created: now, updated: now, system, messages: [] };
}

export function titleOf(conversation) {
  if (conversation.title) return conversation.title;
  const first = conversation.messages.find((message) => message.role === "user" && message.content);
  if (!first) return "New chat";
  const text = first.content.replace(/\s+/g, " ").trim();
  return text.length > TITLE_LENGTH ? `${text.slice(0, TITLE_LENGTH - 1)}…` : text;
}

export class Store {
  constructor(storage = window.localStorage) {
    this.storage = storage;
  }

  _read() {
    try {
      const parsed = JSON.parse(this.storage.getItem(STORAGE_KEY) || "[]");
      return Array.isArray(parsed) ? parsed.filter((c) => c && c.id && Array.isArray(c.messages)) : [];
    } catch {
      return []; // a corrupt entry (edited by hand): start over rather than break the page
    }
  }

  _write(conversations) {
    this.storage.setItem(STORAGE_KEY, JSON.stringify(conversations)); // throws on quota: the caller reports it
  }

  // Most recently updated first.
  list() {
    return this._read().sort((a, b) => b.updated - a.updated);
  }

  get(id) {
    return this._read().find((conversation) => conversation.id === id) || null;
  }

  save(conversation) {
    conversation.updated = Date.now();
    const others = this._read().filter((c) => c.id !== conversation.id);
    this._write([conversation, ...others]);
  }

  remove(id) {
    this._write(this._read().filter((conversation) => conversation.id !== id));
  }
}

// A download of `value` as a .json file, made in the page (no server round trip).
export function downloadJson(value, filename) {
  const blob = new Blob([JSON.stringify(value, null, 2)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
