// A small Markdown renderer for model output, which is untrusted: it builds DOM nodes and puts
// every piece of the text in them as text (Text nodes, textContent), never as HTML, so no tag,
// entity or attribute in the input can ever become markup. Raw HTML in the input shows as the
// characters it is made of. Links are kept only for http(s) and mailto URLs.
//
// Supported: fenced code blocks (with a copy button), headings, paragraphs (single newlines kept
// as line breaks, as chat answers expect), bullet and numbered lists (nested by indentation),
// block quotes, horizontal rules, pipe tables; inline code, **bold**, *italic*, ~~strike~~ and
// [links](url). An unclosed code fence (an answer still streaming) runs to the end.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])([ \t]+|$)/;
const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;
const ESCAPABLE = /[\\`*_{}[\]()#+\-.!~|>]/;
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

export function renderMarkdown(text, doc = document) {
  const fragment = doc.createDocumentFragment();
  renderBlocks(String(text).split(/\r\n?|\n/), fragment, doc);
  return fragment;
}

function el(doc, tag, className) {
  const node = doc.createElement(tag);
  if (className) node.className = className;
  return node;
}

function startsBlock(line, next) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line)
    || isTableStart(line, next);
}

function isTableStart(line, next) {
  return line.includes("|") && next !== undefined && TABLE_RULE.test(next) && next.includes("-");
}

function renderBlocks(lines, parent, doc) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
      continue;
    }
    let match;
    if ((match = FENCE.exec(line))) {
      const fence = match[1];
      const body = [];
      i += 1;
      while (i < lines.length && !isClosingFence(lines[i], fence)) body.push(lines[i++]);
      i += 1; // the closing fence (or past the end when unclosed)
      parent.append(codeBlock(body.join("\n"), match[2], doc));
    } else if ((match = HEADING.exec(line))) {
      // The page's own headings are h1-h2: an answer's start at h3.
      const heading = el(doc, `h${Math.min(6, match[1].length + 2)}`);
      renderInline(match[2], heading, doc);
      parent.append(heading);
      i += 1;
    } else if (RULE.test(line)) {
      parent.append(el(doc, "hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ""));
      const quote = el(doc, "blockquote");
      renderBlocks(inner, quote, doc);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = renderList(lines, i, parent, doc);
    } else if (isTableStart(line, lines[i + 1])) {
      i = renderTable(lines, i, parent, doc);
    } else {
      const paragraph = el(doc, "p");
      const start = i;
      while (i < lines.length && lines[i].trim() && (i === start || !startsBlock(lines[i], lines[i + 1]))) {
        if (i > start) paragraph.append(el(doc, "br"));
        renderInline(lines[i].trim(), paragraph, doc);
        i += 1;
      }
      parent.append(paragraph);
    }
  }
}

function isClosingFence(line, fence) {
  const trimmed = line.trim();
  return trimmed.length >= fence.length && trimmed === fence[0].repeat(trimmed.length);
}

function indentOf(line) {
  return line.length - line.trimStart().length;
}

// A list: the items of one kind (bullets or numbers) at one indentation; an item's following
// lines that are indented past its marker (or continue its paragraph) belong to it, and are
// rendered as blocks of their own, which gives nested lists and code inside items.
function renderList(lines, i, parent, doc) {
  const first = ITEM.exec(lines[i]);
  const ordered = /\d/.test(first[2]);
  const list = el(doc, ordered ? "ol" : "ul");
  if (ordered) {
    const start = parseInt(first[2], 10);
    if (start !== 1) list.start = start;
  }
  const baseIndent = first[1].length;
  while (i < lines.length) {
    const match = ITEM.exec(lines[i]);
    if (!match || match[1].length !== baseIndent || /\d/.test(match[2]) !== ordered) break;
    const contentIndent = match[0].length;
    const body = [lines[i].slice(contentIndent)];
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) {
        // A blank line ends the item unless the next line is still indented into it.
        if (i + 1 < lines.length && lines[i + 1].trim() && indentOf(lines[i + 1]) > baseIndent) {
          body.push("");
          i += 1;
          continue;
        }
        break;
      }
      const indent = indentOf(line);
      if (indent > baseIndent) {
        body.push(line.slice(Math.min(indent, contentIndent)));
      } else if (!startsBlock(line, lines[i + 1]) && body[body.length - 1].trim()) {
        body.push(line.trim()); // a lazy continuation of the item's paragraph
      } else {
        break;
      }
      i += 1;
    }
    const item = el(doc, "li");
    renderBlocks(body, item, doc);
    // A one-paragraph item shows its text directly (a "tight" list).
    if (item.childNodes.length === 1 && item.firstChild.nodeName === "P") {
      item.append(...item.firstChild.childNodes);
      item.firstChild.remove();
    }
    list.append(item);
    while (i < lines.length && !lines[i].trim() && i + 1 < lines.length && ITEM.test(lines[i + 1])
           && ITEM.exec(lines[i + 1])[1].length === baseIndent) {
      i += 1; // blank lines between items of the same list
    }
  }
  parent.append(list);
  return i;
}

function tableCells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim());
}

function renderTable(lines, i, parent, doc) {
  const table = el(doc, "table");
  const head = el(doc, "thead");
  const headRow = el(doc, "tr");
  for (const cell of tableCells(lines[i])) {
    const th = el(doc, "th");
    th.scope = "col";
    renderInline(cell, th, doc);
    headRow.append(th);
  }
  head.append(headRow);
  table.append(head);
  const body = el(doc, "tbody");
  i += 2;
  while (i < lines.length && lines[i].trim() && lines[i].includes("|")) {
    const row = el(doc, "tr");
    for (const cell of tableCells(lines[i])) {
      const td = el(doc, "td");
      renderInline(cell, td, doc);
      row.append(td);
    }
    body.append(row);
    i += 1;
  }
  table.append(body);
  const wrapper = el(doc, "div", "table-scroll"); // wide tables scroll instead of widening the page
  wrapper.append(table);
  parent.append(wrapper);
  return i;
}

export function codeBlock(code, language, doc = document) {
  const block = el(doc, "div", "code-block");
  const head = el(doc, "div", "code-head");
  const label = el(doc, "span", "code-lang");
  label.textContent = language || "code";
  const copy = el(doc, "button", "copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", `Copy ${language || "code"} block`);
  const pre = el(doc, "pre");
  const codeNode = el(doc, "code");
  codeNode.textContent = code;
  if (language) codeNode.dataset.language = language;
  pre.append(codeNode);
  copy.addEventListener("click", () => copyText(code, copy));
  head.append(label, copy);
  block.append(head, pre);
  return block;
}

// navigator.clipboard exists only in secure contexts (https, localhost): elsewhere (a server on
// a LAN address over http) the older execCommand path still works.
export async function copyText(text, button) {
  let done = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      done = true;
    }
  } catch {
    done = false;
  }
  if (!done) {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    try {
      done = document.execCommand("copy");
    } catch {
      done = false;
    }
    area.remove();
  }
  if (button) {
    const label = button.textContent;
    button.textContent = done ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = label; }, 1500);
  }
  return done;
}

function safeUrl(href) {
  try {
    const url = new URL(href, window.location.href);
    return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

// The closing delimiter of an emphasis run opened at `open`: not preceded by a space, and for a
// single delimiter not part of a double one.
function findClosing(text, delimiter, from) {
  let at = from;
  while ((at = text.indexOf(delimiter, at)) !== -1) {
    const before = text[at - 1];
    const after = text[at + delimiter.length];
    const doubled = delimiter.length === 1 && (after === delimiter || before === delimiter);
    const wordInside = delimiter[0] === "_" && after !== undefined && /[\p{L}\p{N}]/u.test(after);
    if (at > from && !/\s/.test(before) && !doubled && !wordInside) return at;
    at += delimiter.length;
  }
  return -1;
}

export function renderInline(text, parent, doc = document) {
  let plain = "";
  const flush = () => {
    if (plain) parent.append(doc.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length && ESCAPABLE.test(text[i + 1])) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "`") {
      let run = 1;
      while (text[i + run] === "`") run += 1;
      const fence = "`".repeat(run);
      let close = text.indexOf(fence, i + run);
      while (close !== -1 && text[close + run] === "`") close = text.indexOf(fence, close + run + 1);
      if (close !== -1) {
        flush();
        const code = el(doc, "code");
        code.textContent = text.slice(i + run, close).replace(/^ (.*) $/, "$1");
        parent.append(code);
        i = close + run;
        continue;
      }
      plain += fence;
      i += run;
      continue;
    }
    if ((c === "*" || c === "_" || c === "~") && text[i + 1] === c && text[i + 2] && !/\s/.test(text[i + 2])) {
      const close = findClosing(text, c + c, i + 2);
      if (close !== -1) {
        flush();
        const node = el(doc, c === "~" ? "del" : "strong");
        renderInline(text.slice(i + 2, close), node, doc);
        parent.append(node);
        i = close + 2;
        continue;
      }
    }
    const wordBefore = i > 0 && /[\p{L}\p{N}]/u.test(text[i - 1]);
    if ((c === "*" || (c === "_" && !wordBefore)) && text[i + 1] && !/\s/.test(text[i + 1]) && text[i + 1] !== c) {
      const close = findClosing(text, c, i + 1);
      if (close !== -1) {
        flush();
        const node = el(doc, "em");
        renderInline(text.slice(i + 1, close), node, doc);
        parent.append(node);
        i = close + 1;
        continue;
      }
    }
    if (c === "[") {
      const match = /^\[([^\]\n]+)\]\(\s*<?([^()\s<>]+)>?(?:\s+"[^"]*")?\s*\)/.exec(text.slice(i));
      const href = match && safeUrl(match[2]);
      if (href) {
        flush();
        const link = el(doc, "a");
        link.href = href;
        link.rel = "noopener noreferrer nofollow";
        link.target = "_blank";
        renderInline(match[1], link, doc);
        parent.append(link);
        i += match[0].length;
        continue;
      }
    }
    plain += c;
    i += 1;
  }
  flush();
}
