// The chat: one conversation's messages, sending a turn over /v1/chat/completions (streaming,
// with stream_options.include_usage for the token counts), stopping it, regenerating an answer
// and editing a turn. The conversation is saved to the browser's store after every change.
//
// Stop aborts the fetch: the connection closes, and the server cancels the generation when it
// notices (its next write), freeing the batch slot and KV blocks.

import { codeBlock, copyText, renderMarkdown } from "./markdown.js";
import { ParamError } from "./params.js";
import { AnswerClock, statsNode } from "./stats.js";

// Streaming tool calls arrive in fragments keyed by `index`: id, type and name first, then
// pieces of the arguments string.
function mergeToolCalls(message, deltas) {
  message.tool_calls = message.tool_calls || [];
  for (const delta of deltas) {
    const index = delta.index ?? message.tool_calls.length;
    const call = message.tool_calls[index]
      || (message.tool_calls[index] = { id: "", type: "function", function: { name: "", arguments: "" } });
    if (delta.id) call.id = delta.id;
    if (delta.type) call.type = delta.type;
    if (delta.function) {
      if (delta.function.name) call.function.name += delta.function.name;
      if (delta.function.arguments) call.function.arguments += delta.function.arguments;
    }
  }
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

function button(label, onClick, extraClass = "") {
  const node = document.createElement("button");
  node.type = "button";
  node.className = `small ${extraClass}`.trim();
  node.textContent = label;
  node.addEventListener("click", onClick);
  return node;
}

const ROLE_NAMES = { user: "You", assistant: "Assistant", tool: "Tool result", system: "System" };

export class Chat {
  constructor({ api, store, params, elements, announce, onSaved, onParamError }) {
    this.api = api;
    this.store = store;
    this.params = params;
    this.el = elements; // {messages, form, input, role, send, stop, system, notice}
    this.announce = announce;
    this.onSaved = onSaved; // the conversation list changed
    this.onParamError = onParamError;
    this.conversation = null;
    this.controller = null; // the AbortController of the answer streaming now
    this.editing = null; // the index of the message being edited
    this.renderQueued = false;

    this.el.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    this.el.input.addEventListener("keydown", (event) => {
      // Enter sends, Shift+Enter is a new line (IME composition keeps its own Enter).
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.submit();
      }
    });
    this.el.stop.addEventListener("click", () => this.stop());
    this.el.system.addEventListener("input", () => {
      this.conversation.system = this.el.system.value;
      this.save();
    });
  }

  get busy() {
    return this.controller !== null;
  }

  open(conversation) {
    if (this.conversation && this.conversation.id === conversation.id) return; // already shown, maybe streaming
    this.stop(); // the answer streaming now ends "stopped", saved in its own conversation
    this.conversation = conversation;
    this.editing = null;
    this.el.system.value = conversation.system || "";
    this.setNotice("");
    this.render();
  }

  save(conversation = this.conversation) {
    try {
      this.store.save(conversation);
    } catch (error) {
      this.setNotice(`This conversation could not be saved in the browser: ${error.message}`);
    }
    this.onSaved();
  }

  setNotice(text) {
    this.el.notice.textContent = text;
    this.el.notice.hidden = !text;
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  _setBusy(busy) {
    this.el.send.disabled = busy;
    this.el.stop.disabled = !busy;
    this.el.messages.setAttribute("aria-busy", String(busy));
    document.body.classList.toggle("generating", busy);
  }

  _lastToolCallId() {
    for (let i = this.conversation.messages.length - 1; i >= 0; i -= 1) {
      const message = this.conversation.messages[i];
      if (message.role === "assistant") return message.tool_calls?.[0]?.id || null;
    }
    return null;
  }

  async submit() {
    const text = this.el.input.value;
    if (this.busy || !text.trim()) return;
    const message = { role: this.el.role.value, content: text };
    if (message.role === "tool") message.tool_call_id = this._lastToolCallId() || undefined;
    this.conversation.messages.push(message);
    this.el.input.value = "";
    this.el.role.value = "user"; // a tool result answers one call: the next turn is the user's again
    this.save();
    this.render();
    await this.generate();
  }

  // The request's messages: the system prompt, then every turn but failed, empty answers.
  requestMessages() {
    const messages = [];
    if (this.conversation.system && this.conversation.system.trim()) {
      messages.push({ role: "system", content: this.conversation.system });
    }
    for (const message of this.conversation.messages) {
      if (message.role === "assistant") {
        const calls = message.tool_calls?.length ? message.tool_calls : null;
        if (!message.content && !calls) continue;
        messages.push(calls ? { role: "assistant", content: message.content || null, tool_calls: calls }
          : { role: "assistant", content: message.content });
      } else if (message.role === "tool") {
        messages.push({ role: "tool", content: message.content, tool_call_id: message.tool_call_id });
      } else {
        messages.push({ role: message.role, content: message.content });
      }
    }
    return messages;
  }

  async generate() {
    let fields;
    try {
      fields = this.params.chatFields();
    } catch (error) {
      if (!(error instanceof ParamError)) throw error;
      this.setNotice(error.message);
      this.onParamError(error.field);
      return;
    }
    this.setNotice("");
    const body = {
      model: "tgi", messages: this.requestMessages(), stream: true, stream_options: { include_usage: true }, ...fields,
    };
    const answer = { role: "assistant", content: "", pending: true };
    if (fields.response_format) answer.format = "json";
    const conversation = this.conversation; // another may be opened meanwhile
    conversation.messages.push(answer);
    const controller = new AbortController();
    this.controller = controller;
    this._setBusy(true);
    this.render();
    const clock = new AnswerClock();
    let usage = null;
    let finish = null;
    try {
      for await (const chunk of this.api.chatStream(body, controller.signal)) {
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          let output = false;
          if (delta.content) {
            answer.content += delta.content;
            output = true;
          }
          if (delta.reasoning_content) {
            answer.reasoning = (answer.reasoning || "") + delta.reasoning_content;
            output = true;
          }
          if (delta.tool_calls && delta.tool_calls.length) {
            mergeToolCalls(answer, delta.tool_calls);
            output = true;
          }
          if (output) clock.token();
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        answer.stats = clock.stats(usage, finish);
        this._renderSoon();
      }
    } catch (error) {
      if (error.name === "AbortError") {
        answer.stopped = true;
      } else {
        answer.error = error.message || String(error);
        this.announce(`Error: ${answer.error}`);
      }
    } finally {
      delete answer.pending;
      answer.stats = clock.stats(usage, finish);
      if (answer.stopped) answer.stats.finish_reason = "stopped";
      this.controller = null;
      this._setBusy(false);
      this.save(conversation);
      if (this.conversation === conversation) this.render();
    }
    if (!answer.error) this.announce(answer.stopped ? "Answer stopped." : "Answer complete.");
  }

  regenerate(index) {
    if (this.busy) return;
    this.conversation.messages.splice(index);
    this.save();
    this.generate();
  }

  startEdit(index) {
    if (this.busy) return;
    this.editing = index;
    this.render();
    this.el.messages.querySelector(".msg-editor textarea")?.focus();
  }

  finishEdit(index, text, resend) {
    const message = this.conversation.messages[index];
    message.content = text;
    delete message.error;
    this.editing = null;
    if (resend) this.conversation.messages.splice(index + 1);
    this.save();
    this.render();
    if (resend) this.generate();
  }

  remove(index) {
    if (this.busy) return;
    this.conversation.messages.splice(index, 1);
    this.save();
    this.render();
  }

  // Streaming redraws the answer at most once per frame, however fast chunks come.
  _renderSoon() {
    if (this.renderQueued) return;
    this.renderQueued = true;
    requestAnimationFrame(() => {
      this.renderQueued = false;
      const last = this.el.messages.lastElementChild;
      const index = this.conversation.messages.length - 1;
      if (last && this.conversation.messages[index]?.pending) last.replaceWith(this.messageNode(index));
      this._stickToBottom();
    });
  }

  _stickToBottom() {
    const list = this.el.messages;
    list.scrollTop = list.scrollHeight;
  }

  render() {
    const list = this.el.messages;
    list.replaceChildren(...this.conversation.messages.map((_, index) => this.messageNode(index)));
    if (!this.conversation.messages.length) {
      const empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = "Send a message to start. Parameters apply to the next answer.";
      list.append(empty);
    }
    this._stickToBottom();
  }

  messageNode(index) {
    const message = this.conversation.messages[index];
    const item = document.createElement("li");
    item.className = `msg msg-${message.role}${message.pending ? " pending" : ""}`;
    const head = document.createElement("div");
    head.className = "msg-head";
    const role = document.createElement("span");
    role.className = "msg-role";
    role.textContent = ROLE_NAMES[message.role] || message.role;
    head.append(role);
    const actions = document.createElement("span");
    actions.className = "msg-actions";
    if (!message.pending && !this.busy && this.editing === null) {
      if (message.content) actions.append(button("Copy", (event) => copyText(message.content, event.target)));
      actions.append(button("Edit", () => this.startEdit(index)));
      if (message.role === "assistant") actions.append(button("Regenerate", () => this.regenerate(index)));
      actions.append(button("Delete", () => this.remove(index)));
    }
    head.append(actions);
    item.append(head);

    if (this.editing === index) {
      item.append(this._editor(index, message));
      return item;
    }
    if (message.reasoning) {
      const details = document.createElement("details");
      details.className = "reasoning";
      const summary = document.createElement("summary");
      summary.textContent = "Reasoning";
      const text = document.createElement("div");
      text.className = "md";
      text.append(renderMarkdown(message.reasoning));
      details.append(summary, text);
      item.append(details);
    }
    const body = document.createElement("div");
    body.className = "msg-body";
    if (message.role === "assistant" && message.format === "json" && message.content) {
      body.append(codeBlock(message.content, "json"));
    } else if (message.role === "assistant") {
      body.classList.add("md");
      body.append(renderMarkdown(message.content || ""));
    } else {
      body.classList.add("plain"); // what the user typed, shown as typed
      body.textContent = message.content;
    }
    if (message.pending && !message.content && !message.tool_calls) body.classList.add("waiting");
    item.append(body);
    for (const call of message.tool_calls || []) {
      const box = document.createElement("div");
      box.className = "tool-call";
      const title = document.createElement("p");
      title.className = "tool-call-name";
      title.textContent = `Tool call: ${call.function.name}${call.id ? ` (${call.id})` : ""}`;
      box.append(title, codeBlock(prettyJson(call.function.arguments), "arguments"));
      item.append(box);
    }
    if (message.role === "tool" && message.tool_call_id) {
      const note = document.createElement("p");
      note.className = "tool-call-name";
      note.textContent = `for ${message.tool_call_id}`;
      item.append(note);
    }
    if (message.error) {
      const error = document.createElement("p");
      error.className = "msg-error";
      error.textContent = `Error: ${message.error}`;
      item.append(error);
    }
    if (message.stats) item.append(statsNode(message.stats));
    return item;
  }

  _editor(index, message) {
    const form = document.createElement("form");
    form.className = "msg-editor";
    const label = document.createElement("label");
    const id = `edit-${index}`;
    label.htmlFor = id;
    label.className = "visually-hidden";
    label.textContent = `Edit ${ROLE_NAMES[message.role] || message.role} message`;
    const area = document.createElement("textarea");
    area.id = id;
    area.rows = Math.min(12, Math.max(3, (message.content || "").split("\n").length + 1));
    area.value = message.content || "";
    const resend = message.role !== "assistant";
    const save = document.createElement("button");
    save.type = "submit";
    save.textContent = resend ? "Save and resend" : "Save";
    const cancel = button("Cancel", () => {
      this.editing = null;
      this.render();
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.finishEdit(index, area.value, resend);
    });
    area.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.stopPropagation();
        cancel.click();
      }
    });
    const row = document.createElement("div");
    row.className = "row";
    row.append(save, cancel);
    form.append(label, area, row);
    return form;
  }
}
