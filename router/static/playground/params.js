// The parameters form → the fields of a chat request (OpenAI names) or of a /generate_stream
// request (TGI names). An empty field is left out, so the server's own default applies; the
// server validates every value and its message is shown as it is. Values are remembered in
// localStorage between visits.

const STORAGE_KEY = "pytgi.playground.params.v1";
const ANY_OBJECT = { type: "object" }; // what the server itself uses for json_object

// [form field name, chat request field, TGI parameter, integer?]
const NUMBERS = [
  ["temperature", "temperature", "temperature", false],
  ["top_p", "top_p", "top_p", false],
  ["top_k", "top_k", "top_k", true],
  ["max_tokens", "max_tokens", "max_new_tokens", true],
  ["seed", "seed", "seed", true],
  ["repetition_penalty", "repetition_penalty", "repetition_penalty", false],
  ["frequency_penalty", "frequency_penalty", "frequency_penalty", false],
  ["presence_penalty", "presence_penalty", "presence_penalty", false],
];

export class ParamError extends Error {
  constructor(message, field) {
    super(message);
    this.name = "ParamError";
    this.field = field; // the form control to focus
  }
}

// One stop sequence per line; \n, \t and \\ spell a newline, a tab and a backslash.
export function parseStops(text) {
  return text.split("\n").filter((line) => line !== "").map((line) =>
    line.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]));
}

export class Params {
  constructor(form, storage = window.localStorage) {
    this.form = form;
    this.storage = storage;
    this._restore();
    form.addEventListener("input", () => this._save());
    form.addEventListener("change", () => {
      this._save();
      this._showFormatFields();
    });
    form.addEventListener("reset", () => {
      // After the browser has put the initial values back.
      setTimeout(() => {
        this._save();
        this._showFormatFields();
      });
    });
    this._showFormatFields();
  }

  field(name) {
    return this.form.elements.namedItem(name);
  }

  _values() {
    const values = {};
    for (const element of this.form.elements) {
      if (element.name) values[element.name] = element.value;
    }
    return values;
  }

  _save() {
    try {
      this.storage.setItem(STORAGE_KEY, JSON.stringify(this._values()));
    } catch {
      // Storage full or disabled: parameters simply are not remembered.
    }
  }

  _restore() {
    let saved = {};
    try {
      saved = JSON.parse(this.storage.getItem(STORAGE_KEY) || "{}") || {};
    } catch {
      saved = {};
    }
    for (const [name, value] of Object.entries(saved)) {
      const element = this.field(name);
      if (element && typeof value === "string") element.value = value;
    }
  }

  _showFormatFields() {
    const schema = this.form.querySelector("#p-schema-row");
    if (schema) schema.hidden = this.field("response_format").value !== "json_schema";
  }

  set(name, value) {
    this.field(name).value = value;
    this._save();
    this._showFormatFields();
  }

  _number(name, integer) {
    const element = this.field(name);
    if (element.validity.badInput) throw new ParamError(`${element.labels[0].textContent}: not a number.`, element);
    const text = element.value.trim();
    if (text === "") return undefined;
    const value = Number(text);
    if (!Number.isFinite(value) || (integer && !Number.isSafeInteger(value))) {
      throw new ParamError(`${element.labels[0].textContent}: expected ${integer ? "an integer" : "a number"}.`,
        element);
    }
    return value;
  }

  _json(name, what) {
    const element = this.field(name);
    const text = element.value.trim();
    if (!text) return undefined;
    try {
      return JSON.parse(text);
    } catch (error) {
      throw new ParamError(`${element.labels[0].textContent}: not valid JSON (${error.message}); expected ${what}.`,
        element);
    }
  }

  _schema() {
    const schema = this._json("json_schema", "a JSON schema object");
    if (schema !== undefined && (typeof schema !== "object" || Array.isArray(schema) || schema === null)) {
      throw new ParamError("JSON schema: expected an object.", this.field("json_schema"));
    }
    return schema;
  }

  format() {
    return this.field("response_format").value;
  }

  // The chat completion fields; throws ParamError for a field that cannot be read.
  chatFields() {
    const fields = {};
    for (const [name, chat, , integer] of NUMBERS) {
      const value = this._number(name, integer);
      if (value !== undefined) fields[chat] = value;
    }
    const stop = parseStops(this.field("stop").value);
    if (stop.length) fields.stop = stop;
    const format = this.format();
    if (format === "json_object") fields.response_format = { type: "json_object" };
    if (format === "json_schema") {
      fields.response_format = {
        type: "json_schema", json_schema: { name: "playground", schema: this._schema() || ANY_OBJECT, strict: true },
      };
    }
    const tools = this._json("tools", "an array of tools");
    if (tools !== undefined) {
      if (!Array.isArray(tools)) throw new ParamError("Tools: expected a JSON array.", this.field("tools"));
      if (tools.length) {
        fields.tools = tools;
        fields.tool_choice = this.field("tool_choice").value;
      }
    }
    return fields;
  }

  // TGI's parameters for /generate_stream (tools have no meaning there).
  generateParameters() {
    const parameters = {};
    for (const [name, , tgi, integer] of NUMBERS) {
      const value = this._number(name, integer);
      if (value !== undefined) parameters[tgi] = value;
    }
    const stop = parseStops(this.field("stop").value);
    if (stop.length) parameters.stop = stop;
    const format = this.format();
    if (format === "json_object") parameters.grammar = { type: "json", value: ANY_OBJECT };
    if (format === "json_schema") parameters.grammar = { type: "json", value: this._schema() || ANY_OBJECT };
    return parameters;
  }
}
