"""The router's grammar compiles, in a child process that is killed when a compile overruns.

xgrammar compiles in C++ and cannot be interrupted: a thread that overruns keeps running (and
keeps its core) until it ends. So the router compiles in one child process, fed by one
dispatcher thread:
- `CompileWorker` owns the child. The child builds xgrammar's compiler once from the router's
  tokenizer (its tokenizer.json text and stop ids), says "ready", then answers one compile at a
  time. A compile gets `timeout_s` from the moment it is sent: starting the child and building
  the compiler (seconds: xgrammar imports torch) are not counted. At the deadline the child is
  killed and the compile answers "took longer than"; the next compile starts a fresh child.
  A child that dies on a grammar (a crash in the compiler) rejects that grammar the same way.
- `CompileQueue` is the dispatcher: compiles wait in a deque, at most `max_waiting` of them
  (`submit` raises QueueFull beyond), each behind a concurrent.futures.Future. A waiting compile
  whose future is cancelled (`abandon`: nobody wants it any more) is dropped without running.
Children start through a fork server that has imported xgrammar and transformers once, so a
replacement child is ready in about a second instead of ~7 s. A child never outlives the router:
it is a daemon process (terminated at interpreter exit), it exits when its pipe to the router
closes, and on Linux it asks for SIGKILL when its parent (the fork server, which itself exits
with the router) dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from pytgi_common.grammar import GrammarError, compile_grammar, tokenizer_info

log = logging.getLogger(__name__)

# Starting a child and building the compiler (not counted in a compile's deadline).
INIT_TIMEOUT_S = 300.0
# Modules the fork server imports once for every child it forks.
_PRELOAD = ["xgrammar", "transformers"]


class WorkerError(RuntimeError):
    """Grammar support cannot run: xgrammar or the tokenizer failed to load, or the worker is closed."""


class QueueFull(RuntimeError):
    """More compiles are waiting than the queue holds."""


def compile_message(compiler, grammar_type: int, text: str) -> str | None:
    """None when `text` compiles as the shards will compile it, else why not."""
    try:
        compile_grammar(compiler, grammar_type, text)
    except GrammarError as error:
        return error.message
    return None


# ----------------------------------------------------------------------------- the child


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe's EOF still ends the child
        pass


def _first_to_be_killed() -> None:
    """If a grammar makes the compile take all memory, the kernel's OOM killer should pick this
    child (then reported as a crash, which rejects the grammar), never the router or a shard."""
    try:
        with open("/proc/self/oom_score_adj", "w") as file:
            file.write("1000")
    except OSError:  # not Linux
        pass


def _build_compiler(tokenizer_json: str, stop_ids: Sequence[int]):
    import tokenizers
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer_json))
    info = tokenizer_info(wrapped, None, stop_ids)
    return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)


def _serve(conn, tokenizer_json: str, stop_ids: list[int], delay_s: float) -> None:
    """The child's main: build the compiler, then (grammar_type, text) → ("done", message)."""
    _die_with_parent()
    _first_to_be_killed()
    try:
        compiler = _build_compiler(tokenizer_json, stop_ids)
    except BaseException as error:  # reported, then the child ends
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            grammar_type, text = conn.recv()
        except (EOFError, OSError):  # the router closed the pipe or is gone
            return
        if delay_s:
            time.sleep(delay_s)  # tests: a compile that takes this long
        conn.send(("done", compile_message(compiler, grammar_type, text)))


# ---------------------------------------------------------------------------- the parent


class CompileWorker:
    """One child process at a time; `compile` is called from one thread (the dispatcher)."""

    def __init__(self, tokenizer_json: Callable[[], str], stop_ids: Sequence[int], *, timeout_s: float,
                 delay_s: float = 0.0, init_timeout_s: float = INIT_TIMEOUT_S) -> None:
        self._tokenizer_json = tokenizer_json  # called once, when the first child starts
        self._json: str | None = None
        self.stop_ids = list(stop_ids)
        self.timeout_s = timeout_s
        self.delay_s = delay_s
        self.init_timeout_s = init_timeout_s
        self._context = multiprocessing.get_context("forkserver")
        self._lock = threading.Lock()
        self._process = None
        self._conn = None
        self._closed = False
        self.started = 0  # children started (a killed child is replaced by a new one)

    @property
    def process(self):
        """The current child (a multiprocessing.Process), or None."""
        return self._process

    def start(self) -> None:
        """Start a child and wait until its compiler is built (WorkerError if it cannot be)."""
        with self._lock:
            if self._closed:
                raise WorkerError("the grammar compiler is closed")
            if self._process is not None:
                return
            if self._json is None:
                self._json = self._tokenizer_json()
            self._context.set_forkserver_preload(_PRELOAD)  # only read when the fork server starts
            parent, child = self._context.Pipe()
            process = self._context.Process(target=_serve, args=(child, self._json, self.stop_ids, self.delay_s),
                                            name="grammar-compiler", daemon=True)
            process.start()
            child.close()
            self._process, self._conn = process, parent
            self.started += 1
        ready = parent.poll(self.init_timeout_s)
        try:
            kind, detail = parent.recv() if ready else ("failed", f"not ready after {self.init_timeout_s:g} s")
        except (EOFError, OSError):
            kind, detail = "failed", "the process exited while starting"
        if kind != "ready":
            self.stop()
            raise WorkerError(f"grammar support failed to start: {detail}")
        log.info("grammar compiler ready (pid %d)", process.pid)

    def compile(self, grammar_type: int, text: str) -> str | None:
        """None if the grammar compiles; else the reason, "took longer than" included."""
        self.start()
        conn = self._conn
        try:
            conn.send((grammar_type, text))
            finished = conn.poll(self.timeout_s)
            kind, message = conn.recv() if finished else ("timeout", None)
        except (EOFError, OSError):  # the child died (or `close` killed it)
            kind, message = "crashed", None
        if kind == "done":
            return message
        self.stop()
        if self._closed:
            raise WorkerError("the grammar compiler is closed")
        if kind == "timeout":
            log.warning("grammar compile overran %g s: killed its process", self.timeout_s)
            return f"compiling the grammar took longer than {self.timeout_s:g} s"
        log.error("the grammar compiler process died while compiling a grammar")
        return "the grammar compiler crashed on this grammar"

    def stop(self) -> None:
        """Kill the child (if any) and reap it."""
        with self._lock:
            process, conn = self._process, self._conn
            self._process = self._conn = None
        if process is None:
            return
        process.kill()  # SIGKILL: a compile in C++ does not return to Python to see a SIGTERM
        process.join(10)
        conn.close()

    def kill(self) -> None:
        """Kill the child without reaping it: safe while another thread waits on it (that
        thread then sees the pipe close and reaps it with `stop`)."""
        with self._lock:
            if self._process is not None:
                self._process.kill()

    def close(self) -> None:
        """No more children; the current one is killed (a compile in progress ends now)."""
        self._closed = True
        self.kill()


class CompileQueue:
    """The dispatcher thread and its bounded queue of waiting compiles."""

    def __init__(self, worker: CompileWorker, max_waiting: int) -> None:
        self.worker = worker
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[tuple[Future, int | None, str]] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.started = self.dropped = 0  # compiles run; waiting compiles dropped (abandoned)

    def submit(self, grammar_type: int | None, text: str = "") -> Future:
        """Queue a compile (grammar_type None: only start the child). Its future's result is
        `CompileWorker.compile`'s; QueueFull when `max_waiting` compiles already wait."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise WorkerError("the grammar compiler is closed")
            if grammar_type is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} grammar compiles are waiting")
            self._waiting.append((future, grammar_type, text))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="grammar-dispatch", daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def abandon(self, future: Future) -> bool:
        """Drop a compile that has not started (True); one already running runs to its end."""
        with self._cond:
            if not future.cancel():
                return False
            self._waiting = deque(job for job in self._waiting if job[0] is not future)
            self.dropped += 1
            return True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                future, grammar_type, text = self._waiting.popleft()
                if not future.set_running_or_notify_cancel():
                    continue
                if grammar_type is not None:
                    self.started += 1
            try:
                if grammar_type is None:
                    self.worker.start()
                    result = None
                else:
                    result = self.worker.compile(grammar_type, text)
            except BaseException as error:  # WorkerError mostly; the waiter decides
                future.set_exception(error)
            else:
                future.set_result(result)

    def close(self) -> None:
        """Cancel what waits, kill the child (ending a compile in progress), stop the thread."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = self._waiting, deque()
            self._cond.notify_all()
        for future, _, _ in waiting:
            future.cancel()
        self.worker.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        self.worker.stop()  # reap the child (the dispatcher no longer uses it)
