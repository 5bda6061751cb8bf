// Server-Sent Events read from a fetch() response body. EventSource cannot POST a body nor send
// an Authorization header, so the page reads the stream itself: this yields the `data` of each
// event as a string, skipping comments (the server's keep-alive `:` frames) and other fields.
// Aborting the fetch (its AbortController) rejects the pending read: the caller sees AbortError.

export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = eventEnd(buffer)) !== null) {
        const data = eventData(buffer.slice(0, end.start));
        buffer = buffer.slice(end.next);
        if (data !== null) yield data;
      }
    }
    const data = eventData(buffer); // a last event without its blank line
    if (data !== null) yield data;
  } finally {
    // A consumer that stops early (an error event) closes the connection: the server then
    // cancels the generation. After the end, or an abort, this does nothing.
    reader.cancel().catch(() => {});
  }
}

// Where the first complete event ends: a blank line, in any of the three line-end spellings.
function eventEnd(buffer) {
  const match = /\r\n\r\n|\n\n|\r\r/.exec(buffer);
  return match ? { start: match.index, next: match.index + match[0].length } : null;
}

function eventData(block) {
  const data = [];
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (line.startsWith("data:")) data.push(line.slice(line[5] === " " ? 6 : 5));
  }
  return data.length ? data.join("\n") : null;
}
