// The event stream (GET /v1/events), read with fetch rather than EventSource so that
// the token goes in the Authorization header, as on every other call, and a
// reconnection resumes with Last-Event-ID where the stream left off.
import { authorization } from './client';

export interface StrataEvent {
  id: string;
  type: string;
  // The resource's view (the same JSON as its GET), or {id} for a deletion.
  data: Record<string, unknown>;
}

export type StreamState = 'connecting' | 'live' | 'unauthorized' | 'retrying';

interface Handlers {
  onEvent(event: StrataEvent): void;
  /** The events missed are gone: reload everything. */
  onReset(): void;
  onState(state: StreamState): void;
}

/** Follows the stream until the returned function is called. */
export function follow(handlers: Handlers): () => void {
  const abort = new AbortController();
  let lastId: string | null = null;
  let delay = 500;

  const run = async () => {
    while (!abort.signal.aborted) {
      handlers.onState('connecting');
      try {
        const headers: Record<string, string> = { Accept: 'text/event-stream', ...authorization() };
        if (lastId) headers['Last-Event-ID'] = lastId;
        const response = await fetch('/v1/events', { headers, signal: abort.signal });
        if (response.status === 401 || response.status === 403) {
          handlers.onState('unauthorized');
          return;
        }
        if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
        handlers.onState('live');
        delay = 500;
        await read(response.body, (event) => {
          if (event.id) lastId = event.id;
          if (event.type === 'reset') handlers.onReset();
          else handlers.onEvent(event);
        });
      } catch (e) {
        if (abort.signal.aborted) return;
      }
      handlers.onState('retrying');
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10_000);
    }
  };
  void run();
  return () => abort.abort();
}

/** Parses Server-Sent Events (fields `id`, `event`, `data`; comments skipped). */
async function read(body: ReadableStream<Uint8Array>, dispatch: (event: StrataEvent) => void) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let id = '';
  let type = 'message';
  let data: string[] = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let newline: number;
    while ((newline = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, '');
      buffer = buffer.slice(newline + 1);
      if (line === '') {
        if (data.length > 0) {
          let parsed: Record<string, unknown> = {};
          try {
            parsed = JSON.parse(data.join('\n'));
          } catch {
            // A frame that is not JSON carries nothing the dashboard shows.
          }
          dispatch({ id, type, data: parsed });
        }
        type = 'message';
        data = [];
        continue;
      }
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
      if (field === 'id') id = text;
      else if (field === 'event') type = text;
      else if (field === 'data') data.push(text);
    }
  }
}
