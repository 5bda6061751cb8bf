// Raw mode: TGI's /generate_stream with `details` and `top_n_tokens`. The prompt goes to the model
// as it is (no chat template) and every generated token is shown on its own: hover it, or focus
// it (Tab into the tokens, then the arrow keys), for its id, logprob and probability and the
// top-n alternatives the model weighed at that step.

import { ParamError } from "./params.js";
import { AnswerClock, statsNode } from "./stats.js";

function probability(logprob) {
  if (typeof logprob !== "number" || !Number.isFinite(logprob)) return "–";
  const p = 100 * Math.exp(logprob);
  return `${p >= 10 ? p.toFixed(1) : p.toPrecision(2)}%`;
}

function logprobText(logprob) {
  return typeof logprob === "number" && Number.isFinite(logprob) ? logprob.toFixed(3) : "–";
}

// Whitespace and control characters made visible in the tooltip (a token is often " the").
function visible(text) {
  return JSON.stringify(text);
}

export class Raw {
  constructor({ api, params, elements, announce, onParamError }) {
    this.api = api;
    this.params = params;
    this.el = elements; // {form, prompt, topN, generate, stop, output, stats, notice, tip}
    this.announce = announce;
    this.onParamError = onParamError;
    this.controller = null;
    this.tokens = []; // per output span: {token, top}

    this.el.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.generate();
    });
    this.el.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        this.generate();
      }
    });
    this.el.stop.addEventListener("click", () => this.stop());
    const output = this.el.output;
    output.addEventListener("pointerover", (event) => this._showTip(event.target));
    output.addEventListener("pointerleave", () => this._hideTip());
    output.addEventListener("focusin", (event) => this._showTip(event.target));
    output.addEventListener("focusout", () => this._hideTip());
    output.addEventListener("keydown", (event) => this._move(event));
  }

  get busy() {
    return this.controller !== null;
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  _setBusy(busy) {
    this.el.generate.disabled = busy;
    this.el.stop.disabled = !busy;
    this.el.output.setAttribute("aria-busy", String(busy));
    document.body.classList.toggle("generating", busy);
  }

  setNotice(text) {
    this.el.notice.textContent = text;
    this.el.notice.hidden = !text;
  }

  async generate() {
    if (this.busy) return;
    let parameters;
    try {
      parameters = this.params.generateParameters();
    } catch (error) {
      if (!(error instanceof ParamError)) throw error;
      this.setNotice(error.message);
      this.onParamError(error.field);
      return;
    }
    const topN = this.el.topN.value.trim() === "" ? 0 : Number(this.el.topN.value);
    const body = {
      inputs: this.el.prompt.value,
      parameters: { ...parameters, details: true, ...(topN > 0 ? { top_n_tokens: topN } : {}) },
      stream: true,
    };
    this.setNotice("");
    this.tokens = [];
    this.el.output.replaceChildren();
    this.el.stats.replaceChildren();
    this._hideTip();
    const controller = new AbortController();
    this.controller = controller;
    this._setBusy(true);
    const clock = new AnswerClock();
    let details = null;
    let stopped = false;
    try {
      for await (const event of this.api.generateStream(body, controller.signal)) {
        clock.token();
        this._append(event.token, event.top_tokens || []);
        if (event.details) details = event.details;
        this._showStats(clock, details, false);
      }
    } catch (error) {
      if (error.name === "AbortError") {
        stopped = true;
      } else {
        this.setNotice(`Error: ${error.message || error}`);
        this.announce(`Error: ${error.message || error}`);
      }
    } finally {
      this.controller = null;
      this._setBusy(false);
      this._showStats(clock, details, stopped);
    }
    if (!this.el.notice.textContent) this.announce(stopped ? "Generation stopped." : "Generation complete.");
  }

  _showStats(clock, details, stopped) {
    const usage = details ? { prompt_tokens: details.input_length, completion_tokens: details.generated_tokens }
      : null;
    const stats = clock.stats(usage, stopped ? "stopped" : details?.finish_reason);
    const extra = details && details.seed !== null && details.seed !== undefined ? [["seed", `seed ${details.seed}`]]
      : [];
    this.el.stats.replaceChildren(statsNode(stats, extra));
  }

  _append(token, top) {
    const span = document.createElement("span");
    span.className = `token${token.special ? " special" : ""}${token.text.trim() ? "" : " blank"}`;
    span.textContent = token.text;
    span.dataset.index = String(this.tokens.length);
    // One tab stop for all the tokens (roving tabindex): the first, or the one last focused.
    span.tabIndex = this.tokens.length === 0 ? 0 : -1;
    span.setAttribute("aria-describedby", this.el.tip.id);
    const p = typeof token.logprob === "number" ? Math.exp(token.logprob) : 1;
    if (p < 0.5) span.classList.add(p < 0.15 ? "unlikely" : "uncertain");
    this.tokens.push({ token, top });
    this.el.output.append(span);
  }

  _move(event) {
    const span = event.target.closest?.(".token");
    if (!span) return;
    const spans = [...this.el.output.querySelectorAll(".token")];
    let next = spans.indexOf(span);
    if (event.key === "ArrowRight" || event.key === "ArrowDown") next += 1;
    else if (event.key === "ArrowLeft" || event.key === "ArrowUp") next -= 1;
    else if (event.key === "Home") next = 0;
    else if (event.key === "End") next = spans.length - 1;
    else return;
    event.preventDefault();
    const target = spans[Math.max(0, Math.min(spans.length - 1, next))];
    span.tabIndex = -1;
    target.tabIndex = 0;
    target.focus();
  }

  _showTip(target) {
    const span = target.closest?.(".token");
    if (!span) return;
    const { token, top } = this.tokens[Number(span.dataset.index)];
    const tip = this.el.tip;
    const head = document.createElement("p");
    head.className = "tip-head";
    head.textContent = `${visible(token.text)} · id ${token.id} · logprob ${logprobText(token.logprob)} · `
      + `p ${probability(token.logprob)}${token.special ? " · special" : ""}`;
    const parts = [head];
    if (top.length) {
      const table = document.createElement("table");
      const caption = document.createElement("caption");
      caption.textContent = `Top ${top.length} alternatives`;
      const headRow = document.createElement("tr");
      for (const name of ["token", "logprob", "p"]) {
        const th = document.createElement("th");
        th.scope = "col";
        th.textContent = name;
        headRow.append(th);
      }
      table.append(caption, headRow);
      for (const alternative of top) {
        const row = document.createElement("tr");
        if (alternative.id === token.id) row.className = "chosen";
        for (const text of [visible(alternative.text), logprobText(alternative.logprob),
          probability(alternative.logprob)]) {
          const td = document.createElement("td");
          td.textContent = text;
          row.append(td);
        }
        table.append(row);
      }
      parts.push(table);
    }
    tip.replaceChildren(...parts);
    tip.hidden = false;
    // Below the token, kept inside the viewport (style set through the CSSOM: the page's CSP
    // forbids inline style attributes, not this).
    const box = span.getBoundingClientRect();
    const width = tip.offsetWidth;
    const left = Math.max(4, Math.min(box.left, window.innerWidth - width - 4));
    const below = box.bottom + 6 + tip.offsetHeight < window.innerHeight;
    tip.style.left = `${left}px`; // position: fixed, so viewport coordinates
    tip.style.top = `${Math.max(4, below ? box.bottom + 6 : box.top - tip.offsetHeight - 6)}px`;
  }

  _hideTip() {
    this.el.tip.hidden = true;
  }
}
