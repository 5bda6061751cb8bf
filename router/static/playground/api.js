// Every call the page makes to the server. URLs are relative (the page may be served behind a
// path prefix). With --api-key, the key the user typed is sent as `Authorization: Bearer` on
// every call; it is kept in sessionStorage (this tab only, gone when it closes), never in the
// page or in localStorage. A 401 asks the user again (the key was missing, wrong or rotated) and
// retries; the server's two error envelopes (TGI's and OpenAI's) become one ApiError.

import { sseData } from "./sse.js";

const KEY_STORAGE = "pytgi.playground.apiKey";

export class ApiError extends Error {
  constructor(message, status = 0, type = "") {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
  }
}

// TGI: {"error": "…", "error_type": "…"}; OpenAI: {"error": {"message", "type", "param", "code"}}.
export function errorFromBody(body, status = 0) {
  const error = body && typeof body === "object" ? body.error : undefined;
  if (error && typeof error === "object") {
    const where = error.param ? ` (${error.param})` : "";
    return new ApiError(`${error.message}${where}`, status, error.type || "");
  }
  if (typeof error === "string") return new ApiError(error, status, body.error_type || "");
  return null;
}

export class Api {
  // askKey(reason) resolves to the key the user typed, or null when they cancelled.
  constructor(askKey, storage = window.sessionStorage) {
    this.askKey = askKey;
    this.storage = storage;
  }

  get key() {
    return this.storage.getItem(KEY_STORAGE) || "";
  }

  setKey(key) {
    if (key) this.storage.setItem(KEY_STORAGE, key);
    else this.storage.removeItem(KEY_STORAGE);
  }

  async fetch(path, init = {}) {
    for (;;) {
      const headers = { ...(init.headers || {}) };
      if (this.key) headers.Authorization = `Bearer ${this.key}`;
      const response = await fetch(path, { ...init, headers, cache: "no-store" });
      if (response.status !== 401) return response;
      const reason = this.key ? "The server did not accept this API key." : "This server needs an API key.";
      const key = await this.askKey(reason);
      if (key === null) throw new ApiError("The server needs an API key (cancelled).", 401, "authentication");
      this.setKey(key);
    }
  }

  async errorOf(response) {
    const text = await response.text();
    let body = null;
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
    return errorFromBody(body, response.status)
      || new ApiError(`HTTP ${response.status} ${response.statusText}: ${text.slice(0, 500)}`, response.status);
  }

  async json(path) {
    const response = await this.fetch(path);
    if (!response.ok) throw await this.errorOf(response);
    return response.json();
  }

  async text(path) {
    const response = await this.fetch(path);
    if (!response.ok) throw await this.errorOf(response);
    return response.text();
  }

  async postStream(path, body, signal) {
    const response = await this.fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal,
    });
    if (!response.ok) throw await this.errorOf(response);
    return response.body;
  }

  // /v1/chat/completions with stream: true: its chunks, until `data: [DONE]`. An error the
  // server sends mid-stream (`data: {"error": …}`) is thrown.
  async* chatStream(body, signal) {
    const stream = await this.postStream("v1/chat/completions", body, signal);
    for await (const data of sseData(stream)) {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      const error = errorFromBody(chunk);
      if (error) throw error;
      yield chunk;
    }
    throw new ApiError("The stream ended before [DONE]: the server may have stopped.");
  }

  // TGI's /generate_stream: its events ({"token", "top_tokens", "generated_text", "details"}).
  async* generateStream(body, signal) {
    const stream = await this.postStream("generate_stream", body, signal);
    for await (const data of sseData(stream)) {
      const event = JSON.parse(data);
      const error = errorFromBody(event);
      if (error) throw error;
      yield event;
      if (event.generated_text !== null && event.generated_text !== undefined) return;
    }
    throw new ApiError("The stream ended before its last token: the server may have stopped.");
  }
}
