// The figures shown under each answer: TTFT, tokens/s (live while streaming, then from the
// server's token count), prompt and completion tokens, the finish reason.

// TTFT and tokens/s of one answer, from the browser's clock. Tokens are counted as the chunks
// that carry output while streaming (the server sends one per token); the usage chunk's count
// replaces that figure at the end.
export class AnswerClock {
  constructor() {
    this.sent = performance.now();
    this.first = null;
    this.last = null;
    this.tokens = 0;
  }

  token() {
    const now = performance.now();
    if (this.first === null) this.first = now;
    this.last = now;
    this.tokens += 1;
  }

  stats(usage, finishReason) {
    const stats = {};
    if (this.first !== null) stats.ttft_ms = Math.round(this.first - this.sent);
    const tokens = usage ? usage.completion_tokens : this.tokens;
    // Decode speed: the tokens after the first, over the time since the first arrived.
    const seconds = this.first === null ? 0 : (this.last - this.first) / 1000;
    if (tokens > 1 && seconds > 0) stats.tokens_per_s = (tokens - 1) / seconds;
    if (usage) {
      stats.prompt_tokens = usage.prompt_tokens;
      stats.completion_tokens = usage.completion_tokens;
    } else if (this.tokens) {
      stats.completion_tokens = this.tokens;
    }
    if (finishReason) stats.finish_reason = finishReason;
    return stats;
  }
}

export function statsNode(stats, extra = []) {
  const line = document.createElement("p");
  line.className = "stats";
  const add = (name, text, title) => {
    const span = document.createElement("span");
    span.dataset.stat = name;
    span.textContent = text;
    if (title) span.title = title;
    line.append(span);
  };
  if (stats.ttft_ms !== undefined) add("ttft", `TTFT ${stats.ttft_ms} ms`, "time to first token, as seen by the browser");
  if (stats.tokens_per_s !== undefined) add("tps", `${stats.tokens_per_s.toFixed(1)} tok/s`, "decode speed");
  if (stats.prompt_tokens !== undefined) add("prompt", `prompt ${stats.prompt_tokens} tok`);
  if (stats.completion_tokens !== undefined) add("completion", `completion ${stats.completion_tokens} tok`);
  if (stats.finish_reason) add("finish", stats.finish_reason, "finish reason");
  for (const [name, text] of extra) add(name, text);
  return line;
}
