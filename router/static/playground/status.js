// The status bar: the served model (from /info, once) and the server's live state (from
// /metrics, every few seconds while the tab is visible): requests queued, requests in the
// running batch, KV-cache blocks in use, and the prefix cache's hit rate over prompt tokens.
// Both routes are public; the figures are read by name from the Prometheus text.

const POLL_MS = 2000;

// Unlabelled samples only (`name value`), by name.
export function parseMetrics(text) {
  const values = new Map();
  for (const line of text.split("\n")) {
    const match = /^([A-Za-z_:][A-Za-z0-9_:]*) ([-+0-9.eE]+|NaN|[+-]Inf)$/.exec(line.trim());
    if (match) values.set(match[1], Number(match[2]));
  }
  return values;
}

// A counter is exposed as `name_total` by Prometheus clients: either spelling.
function counter(values, name) {
  return values.get(`${name}_total`) ?? values.get(name);
}

function percent(part, whole) {
  return whole > 0 ? `${((100 * part) / whole).toFixed(part === whole || part === 0 ? 0 : 1)}%` : "–";
}

export function statusFigures(values) {
  const used = values.get("pytgi_kv_blocks_used");
  const free = values.get("pytgi_kv_blocks_free");
  const hitTokens = counter(values, "pytgi_prefix_cache_hit_tokens");
  const queryTokens = counter(values, "pytgi_prefix_cache_query_tokens");
  const show = (value) => (value === undefined ? "–" : String(value));
  return {
    queue: show(values.get("tgi_queue_size")),
    batch: show(values.get("tgi_batch_current_size")),
    kv: used === undefined || free === undefined ? "–" : percent(used, used + free),
    prefix: hitTokens === undefined || queryTokens === undefined ? "–" : percent(hitTokens, queryTokens),
  };
}

export class StatusBar {
  constructor(api, elements) {
    this.api = api;
    this.el = elements; // {model, queue, batch, kv, prefix, state}
    this.timer = null;
    this.info = null;
    document.addEventListener("visibilitychange", () => (document.hidden ? this.stop() : this.start()));
  }

  async loadInfo() {
    try {
      this.info = await this.api.json("info");
      this.el.model.textContent = this.info.model_id;
      this.el.model.title = [
        `max input ${this.info.max_input_tokens} tokens`, `max total ${this.info.max_total_tokens} tokens`,
        `version ${this.info.version}`,
      ].join(", ");
    } catch (error) {
      this.el.model.textContent = "unavailable";
      this.el.model.title = error.message;
    }
    return this.info;
  }

  start() {
    if (this.timer === null) {
      this.poll();
      this.timer = setInterval(() => this.poll(), POLL_MS);
    }
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async poll() {
    try {
      const figures = statusFigures(parseMetrics(await this.api.text("metrics")));
      for (const name of ["queue", "batch", "kv", "prefix"]) this.el[name].textContent = figures[name];
      this.el.state.textContent = "";
      this.el.state.classList.remove("down");
    } catch (error) {
      this.el.state.textContent = "server unreachable";
      this.el.state.title = error.message;
      this.el.state.classList.add("down");
    }
  }
}
