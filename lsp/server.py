"""The language server: protocol glue between LSP clients and the engine.

Handlers only translate: positions to code-point offsets, changes to engine edits, results to
items. The model runs on the engine worker thread (`engine.serving.worker`); the server keeps each document's
text (`Mirror`) so it can always resync the engine. The engine is in-process or, by default, the
shared engine daemon (`lsp.remote.RemoteEngine`, same calls): the `engine` setting chooses.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from ghostline.engine.completion import CompletionOptions
from ghostline.engine.text import Change, EditError
from ghostline.lsp.context import Context, Options as ContextOptions
from ghostline.lsp.positions import Mirror, chars_to_column, column_to_chars
from ghostline.lsp.remote import DaemonError, RemoteEngine, RemoteOptions, parse_target
from ghostline.lsp.settings import Settings, SettingsError, check_setting
from ghostline.lsp.stats import Stats, document_kind
from ghostline.engine.serving.worker import EngineWorker

if TYPE_CHECKING:
    from ghostline.engine.engine import Engine

log = logging.getLogger("ghostline.server")
VERSION = "0.1.0"
STATUS = "ghostline/status"
DID_ACCEPT = "ghostline/didAccept"
DID_REJECT = "ghostline/didReject"
INSPECT = "ghostline/inspect"


OTHER_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")  # pygls' copy also splits lines
# there (str.splitlines), where LSP does not: with one of them in the text, pygls' copy is not the check


@dataclass
class WaitingEdit:
    """An edit queued for the engine: its changes in order (later edits join them) and the text they leave."""

    changes: list[Change]
    text: str


@dataclass
class Shown:
    """The last suggestion offered for a document, reused while the user types through it."""

    offset: int
    text: str
    tail: str  # the text just before `offset` when it was shown
    drafts: tuple[str, ...] = ()  # all drafts of the request, `text` first


ANTICIPATE_MISSES = 3  # keystroke completions in a row that no request took before a document stops starting them
ANTICIPATE_CHARS = 8  # the longest insertion taken for a keystroke
CLOSED_PAIRS = ("()", "[]", "{}", '""', "''", "``")  # a typed opener the editor closed at once: the cursor sits between


@dataclass
class Ahead:
    """A completion started before its request (at a keystroke, or after an accepted suggestion), for
    the request that will follow at its end."""

    version: int | None
    offset: int
    task: asyncio.Task


class Debounce:
    """Wait a little before decoding; longer while keystrokes come fast (their gap's moving average)."""

    def __init__(self, base_ms: int):
        self.base_ms, self.gap_ms, self.last = base_ms, None, None

    def keystroke(self) -> None:
        now = time.monotonic()
        if self.last is not None:
            gap = (now - self.last) * 1e3
            self.gap_ms = gap if self.gap_ms is None else 0.7 * self.gap_ms + 0.3 * min(gap, 1000.0)
        self.last = now

    def delay_s(self) -> float:
        if self.gap_ms is None or self.gap_ms > 250:
            return self.base_ms / 1e3
        return min(4 * self.base_ms, max(self.base_ms, 0.6 * self.gap_ms)) / 1e3


class GhostlineServer(LanguageServer):
    def __init__(self, *, model: str | None = None, settings: Settings | None = None, engine: str | None = None):
        super().__init__("ghostline", VERSION)
        self.model_flag, self.engine_flag = model, engine
        self.settings = settings or Settings()
        self.engine: Engine | RemoteEngine | None = None
        self.state = ""
        self.mirrors: dict[str, Mirror] = {}
        self.languages: dict[str, str] = {}
        self.latest: dict[str, object] = {}  # newest request token per document
        self.running: dict[str, object] = {}  # newest submitted completion job per document
        self.shown: dict[str, Shown] = {}
        self.outcomes: dict[str, dict] = {}  # per document, how its last decode ended (ghostline/inspect)
        self.prefetch: dict[str, tuple[int, str]] = {}
        self.ahead: dict[str, Ahead] = {}  # per document, the completion started before its request (keystroke, accept)
        self.asking: dict[str, int] = {}  # documents the editor asks about on its own: misses since its last ask
        self.anticipated = 0  # requests answered by a completion started before them
        self.stats = Stats()
        self.debounce = Debounce(self.settings.debounce_ms)
        self.worker = EngineWorker(idle=self._idle_refresh, idle_after_s=self.settings.idle_refresh_ms / 1e3)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.errors = 0
        self.ready_message = ""
        self.status_sent: tuple[str, str] | None = None
        self.load_started = 0.0
        self.opening: dict[str, int] = {}  # documents opened and not encoded yet (count per uri)
        self.told: set[str] = set()  # causes of failed updates the editor has been shown (once each)
        self.unsynced: set[str] = set()  # documents whose resync failed: their next update re-opens them
        self.waiting_edits: dict[str, WaitingEdit] = {}  # per document, the queued edit later changes join
        self.context = Context()  # other files' chunks a request attends over (lsp/context.py)
        self.context_reading = False  # the workspace folders are being (or were) read
        self._edits_lock = threading.Lock()

    # plumbing ------------------------------------------------------------------------------------

    @property
    def encoding(self) -> str:
        try:
            enc = self.server_capabilities.position_encoding
        except AttributeError:  # before initialize
            return "utf-16"
        return str(getattr(enc, "value", enc) or "utf-16")

    def soon(self, fn, *args) -> None:
        """Run fn(*args) on the protocol's event loop (from the worker thread); a no-op once the client is gone."""
        if self.loop is None or self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the check and the call
            pass

    def notify_threadsafe(self, method: str, params) -> None:
        self.soon(self.protocol.notify, method, params)

    def set_status(self, state: str, message: str = "") -> None:
        if state in ("ready", "error") and message:
            self.ready_message = message
        elif state == "ready":
            message = self.ready_message
        if (state, message) == self.status_sent and state != "error":
            return
        self.state, self.status_sent = state, (state, message)
        source = getattr(getattr(self.engine, "loaded", None), "source", None)
        model = source.name if source is not None else self.model_name
        self.notify_threadsafe(STATUS, {"state": state, "message": message, "model": model})

    def busy_message(self) -> str:
        """`encoding <file>` while an opened document is still being encoded, else nothing."""
        uri = next(iter(self.opening), None)
        return f"encoding {uri.rsplit('/', 1)[-1]}" if uri else ""

    def settle(self) -> None:
        """After a job: ready, or busy while a document is still encoding (not while loading or failed)."""
        if self.state in ("", "loading", "error") or self.engine is None:
            return
        busy = self.busy_message()
        if busy or self.running:
            self.set_status("busy", busy)
        else:
            self.set_status("ready")

    def track_open(self, uri: str) -> None:
        """Show `busy: encoding <file>` until the worker has encoded a just-opened document."""
        self.opening[uri] = self.opening.get(uri, 0) + 1
        if self.engine is not None:
            self.set_status("busy", self.busy_message())
        self.worker.submit("update", lambda _stop: self.soon(self._encoded, uri), uri=uri)

    def _encoded(self, uri: str) -> None:
        n = self.opening.pop(uri, 0) - 1
        if n > 0:
            self.opening[uri] = n
        self.settle()

    @property
    def model_name(self) -> str:
        return self.model_flag or self.settings.model or "gemma3-270m"

    @property
    def engine_mode(self) -> str:
        return self.engine_flag or self.settings.engine

    def engine_token(self) -> str | None:
        if self.settings.engine_token_file:
            with open(self.settings.engine_token_file, encoding="utf-8") as f:
                return f.read().strip()
        return os.environ.get("GHOSTLINE_TOKEN")

    def start_engine(self) -> None:
        token = str(uuid.uuid4())
        progress = self.client_capabilities.window and self.client_capabilities.window.work_done_progress
        if progress:
            self.work_done_progress.create(token)
            self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title="Ghostline", message="loading model"))
        self.load_started = time.monotonic()
        self.set_status("loading", f"loading {self.model_name}")

        def say(message: str) -> None:
            log.info("load: %s", message)
            if progress:
                self.soon(self.work_done_progress.report, token, types.WorkDoneProgressReport(message=message))

        def load(stop):
            if self.engine_mode == "in-process":  # torch is imported here only: a daemon's server never loads it
                from ghostline.engine import allocator
                from ghostline.engine.engine import Engine, EngineOptions

                opts = EngineOptions(memory_budget_mb=self.settings.memory_budget_mb,
                                     precision=self.settings.precision, head=self.settings.head)
                engine = Engine.load(self.model_name, options=opts, progress=say)
                allocator.freeze()
                return engine
            return RemoteEngine.connect(parse_target(self.engine_mode), model=self.model_name, token=self.engine_token(),
                                        status=self.set_status, should_stop=stop, progress=say,
                                        options=RemoteOptions(memory_budget_mb=self.settings.memory_budget_mb,
                                                              precision=self.settings.precision,
                                                              head=self.settings.head))

        job = self.worker.submit("load", load)
        job.future.add_done_callback(lambda f: self._loaded(f, token if progress else None))

    def _loaded(self, future, token) -> None:
        try:
            self.engine = future.result()
            loaded = self.engine.loaded
            where = f" via {self.engine.where}" if isinstance(self.engine, RemoteEngine) else ""
            took = time.monotonic() - self.load_started  # from the request to load, imports included
            msg = f"{loaded.source.name} ready in {took:.1f}s ({'cached' if loaded.from_cache else 'first start'}){where}"
            state = "ready"
        except Exception as exc:  # a bad model path, no daemon: say so, keep serving (without completions)
            msg, state = f"engine failed to start: {exc}", "error"
        (log.info if state == "ready" else log.error)(msg)
        if token is not None:  # end the progress before the status, so a client sees them in that order
            self.soon(self.work_done_progress.end, token, types.WorkDoneProgressEnd(message=state))
        if state == "ready" and self.opening:  # ready once the documents opened meanwhile are encoded
            self.ready_message = msg
            self.set_status("busy", self.busy_message())
        else:
            self.set_status(state, msg)

    def leave_engine(self) -> None:
        """The editor is gone: leave the engine daemon (it frees our documents), and never start another."""
        if isinstance(self.engine, RemoteEngine):
            self.engine.disconnect()

    def submit_edit(self, uri: str, changes: list[Change]) -> None:
        """Queue an edit. While it waits, later edits of the document join it: they reach the engine
        as one update (one diff, one encode of the changed spans), so a storm of keystrokes costs
        what its net change costs."""
        text = self.mirrors[uri].text
        with self._edits_lock:
            waiting = self.waiting_edits.get(uri)
            if waiting is not None:
                waiting.changes.extend(changes)
                waiting.text = text
                return
            waiting = self.waiting_edits[uri] = WaitingEdit(list(changes), text)

        def take() -> str:  # from here on the changes are final: later edits queue a new update
            with self._edits_lock:
                if self.waiting_edits.get(uri) is waiting:
                    del self.waiting_edits[uri]
            return waiting.text

        # the new rows are encoded by the completion that reads them, or when idle; a completion
        # waiting ends the wait for an engine daemon busy with an earlier open, so that it can stop it
        self.submit_update(uri, lambda engine: engine.edit(uri, waiting.changes, encode=False,
                                                           should_stop=self.asked), take=take)

    def submit_update(self, uri: str, fn, *, take=None) -> None:
        """Run a document update on the engine thread. If it fails, whatever the cause, the document
        is re-opened with the text this update leaves (`take()`, called when it starts; by default
        the mirror's text now): never a silent divergence (`update_failed`)."""
        if take is None:
            with self._edits_lock:
                self.waiting_edits.pop(uri, None)  # later edits queue behind this update, not before it
            mirror = self.mirrors.get(uri)
            now = mirror.text if mirror is not None else None
            take = lambda: now  # noqa: E731

        def run(_stop):
            text = take()
            if self.engine is None:
                return None
            resend = uri in self.unsynced and text is not None  # an earlier resync failed: send all of it
            self.unsynced.discard(uri)
            try:
                return self.engine.open(uri, text) if resend else fn(self.engine)
            except Exception as exc:
                self.update_failed(uri, text, exc)

        self.worker.submit("update", run, uri=uri)

    def asked(self) -> bool:
        """A completion waits for the engine thread: long or blocking work before it should stop."""
        return self.worker.waiting("complete")

    def open_in(self, engine, uri: str, text: str):
        """Open a document in the engine; a completion that arrives while a long file encodes stops
        that encode: the rows not encoded yet stay missing, the completion encodes those it reads
        (within `mend_ms`), idle work the rest. The first suggestion in a file just opened does not
        wait for all of it."""
        try:
            return engine.open(uri, text, should_stop=self.asked)
        except Exception as exc:  # the engine's Cancelled (torch is not imported here): the rows done are kept
            if type(exc).__name__ != "Cancelled":
                raise
            log.info("%s: opened, encoding left to the completion waiting and to idle work (%s)", uri, exc)
            return None

    def update_failed(self, uri: str, text: str | None, exc: Exception) -> None:
        """An update of `uri` failed in the engine: log it, resync the document from `text` (None:
        it was closed), and tell the editor once per cause."""
        self.errors += 1
        cause = f"{type(exc).__name__}:{getattr(exc, 'code', '')}"
        log.error("update of %s failed (%s: %s); resyncing from the editor's text", uri, type(exc).__name__, exc,
                  exc_info=not isinstance(exc, (EditError, DaemonError)))
        name = uri.rsplit("/", 1)[-1] or uri
        if text is None:
            self.tell(cause, f"Ghostline: the engine failed to update {name}: {exc}")
            return
        try:
            self.engine.open(uri, text)
        except Exception as again:
            self.unsynced.add(uri)
            log.error("resync of %s failed too (%s: %s); its next update re-opens it", uri, type(again).__name__, again)
            self.tell(f"{cause}:resync", f"Ghostline: the engine failed to update {name} ({exc}) and to resync "
                                         "it; suggestions there may be off until its next edit")
            return
        self.tell(cause, f"Ghostline: the engine failed to update {name} ({exc}); resynced from the editor's text")

    def tell(self, cause: str, message: str) -> None:
        """A warning for the editor (window/showMessage), once per cause for the server's life; the
        log has every occurrence."""
        if cause in self.told:
            return
        self.told.add(cause)
        self.soon(self.window_show_message, types.ShowMessageParams(type=types.MessageType.Warning, message=message))

    def _idle_refresh(self, should_stop) -> bool:
        """Background work when quiet: send the context chunks a recent choice lacks, then the first
        document's that is due (`Engine.background`)."""
        if self.engine is None:
            return False
        if self.settings.context and self.context.idle(self.engine, should_stop):
            return True
        for uri in list(self.engine.docs):
            from ghostline.engine.engine import Cancelled

            try:
                stats = self.engine.background(uri, should_stop=should_stop)
            except Cancelled:
                return False
            if stats is not None:
                log.log(logging.INFO if stats.strategy == "refresh" else logging.DEBUG,  # mends follow most edits
                        "%s %s: %d tokens in %.0f ms", stats.strategy, uri, stats.encoded, stats.ms)
                return True
        return False

    def resync(self, uri: str, why: str) -> None:
        """Take the text pygls holds for the document as the truth and re-open it in the engine."""
        self.errors += 1
        doc = self.workspace.get_text_document(uri)
        log.error("%s: %s; resyncing from the client's text", uri, why)
        mirror = self.mirrors.get(uri)
        if mirror is None:
            self.mirrors[uri] = mirror = Mirror(doc.source, doc.version)
        else:
            mirror.set(doc.source, doc.version)
        text = mirror.text
        self.submit_update(uri, lambda e: e.open(uri, text))

    # completion ----------------------------------------------------------------------------------

    def options_for(self, mirror: Mirror, offset: int, uri: str = "") -> CompletionOptions:
        line_start = mirror.text.rfind("\n", 0, offset) + 1
        before = mirror.text[line_start:offset]
        multiline = self.settings.multiline == "always"
        if self.settings.multiline == "auto":
            if before.rstrip().endswith(":") and not mirror.text[offset:].split("\n", 1)[0].strip():
                multiline = True  # at the end of a block header
            elif not before.strip():
                prev = mirror.text[:line_start].rstrip().rsplit("\n", 1)[-1]
                multiline = prev.rstrip().endswith(":")  # first line of a block body
        return CompletionOptions(
            multiline=multiline,
            max_tokens=self.settings.max_tokens_multiline if multiline else self.settings.max_tokens,
            time_cap_ms=self.settings.time_cap_ms,
            drafts=self.settings.drafts,
            decoder=self.settings.decoder_multiline if multiline else self.settings.decoder,
            halt=self.settings.halt,
            halt_threshold=self.settings.halt_threshold,
            exit=self.settings.exit,
            exit_threshold=self.settings.exit_threshold,
            gate=self.settings.gate,
            gate_strength=self.settings.gate_strength,
            gate_record=self.stats.record(self.languages.get(uri), document_kind(uri)),
            infill=self.settings.fim,
        )

    def context_options(self) -> ContextOptions:
        s = self.settings
        return ContextOptions(budget=s.context_budget if s.context else 0, workspace=s.context_workspace,
                              open_files=s.context_open_files, edits=s.context_edits)

    def read_workspace(self) -> None:
        """Once context from the workspace is wanted: read its folders on a thread of their own and
        ask the editor to report changes to its files."""
        s = self.settings
        if self.context_reading or not (s.context and s.context_workspace and self.context.folders):
            return
        self.context_reading = True
        threading.Thread(target=self.context.scan, args=(list(self.context.folders),), name="ghostline-workspace",
                         daemon=True).start()
        watch_files(self)

    def prepare_context(self, uri: str, offset: int) -> None:
        """After an edit: choose context for its place and send the engine what it lacks, in a job
        that yields to any completion queued behind it (the rest is sent when idle)."""
        mirror = self.mirrors.get(uri)
        if not self.settings.context or mirror is None:
            return
        text = mirror.text
        self.context.expect(uri)

        def run(stop):
            return self.context.prepare(self.engine, uri, text, offset, lambda: stop() or self.asked())

        self.worker.submit("update", run, uri=uri)


    def type_through(self, uri: str, mirror: Mirror, offset: int) -> list[str] | None:
        """The rest of the shown drafts the user typed the beginning of (no new decode); at the shown
        offset itself (an editor cycling through drafts asks again there) every draft."""
        shown = self.shown.get(uri)
        if shown is None or offset < shown.offset:
            return None
        if mirror.text[shown.offset - len(shown.tail) : shown.offset] != shown.tail:
            return None
        typed = mirror.text[shown.offset : offset]
        drafts = dict.fromkeys((shown.text, *shown.drafts))
        rests = [d[len(typed) :] for d in drafts if d.startswith(typed) and d[len(typed) :].strip()]
        return rests or None

    async def wait_for_engine(self) -> None:
        """While the engine loads, wait for it up to the time cap (for a request the user asked for)."""
        cap_s = (self.settings.time_cap_ms or 1500) / 1e3
        deadline = time.monotonic() + cap_s
        while self.engine is None and self.state in ("", "loading") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def complete_at(self, uri: str, mirror: Mirror, offset: int, *, invoked: bool = False):
        """The engine's completion at `offset` of the document as it is now (None when an edit came
        first); cancelling the awaiting task cancels the decode."""
        version, opts = mirror.version, self.options_for(mirror, offset, uri)
        if invoked:
            opts.gate = False  # asked for explicitly: the user wants a suggestion, not silence
        asked = self.settings.context and self.context.for_request(uri, mirror.text, offset)

        def run(should_stop):
            if mirror.version != version:  # an edit arrived after the request: its offset is stale
                return None
            return self.engine.complete(uri, offset, opts, should_stop=should_stop)

        self.set_status("busy", self.busy_message())
        job = self.worker.submit("complete", run, uri=uri)
        self.running[uri] = job
        try:
            out = await asyncio.wrap_future(job.future)
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            job.cancel()
            raise asyncio.CancelledError()
        finally:
            if self.running.get(uri) is job:
                del self.running[uri]
            self.settle()
        if out is not None and self.settings.context:
            self.context.answered(uri, asked, getattr(out, "context_tokens", 0))
        if out is not None:
            self.outcomes[uri] = {"stop_reason": out.stop_reason, "confidence": getattr(out, "confidence", None),
                                  "withheld": getattr(out, "withheld", "")}
            if out.stop_reason == "gated":
                log.info("withheld a suggestion in %s (P(kept) %.2f): %r", uri, out.confidence or 0.0, out.withheld[:80])
        return out

    def anticipate(self, uri: str, mirror: Mirror, changes: list[Change]) -> None:
        """A keystroke (one short insertion) in a document the editor asks about while the user types:
        start the completion at its end now, after the usual debounce. The editor's request for that
        spot, which comes after its own debounce and a trip through its processes, takes it over
        (`suggest`); the next change cancels it. A document whose editor asked about none of the last
        ANTICIPATE_MISSES keystrokes (suggestions off there, or typing faster than it asks) starts
        none until it asks again. An opener the editor closed at once (`()` in one insertion) starts it
        between the two. With the `context` setting on, the request that takes it over asks for the
        context its own moment would choose (`suggest`), as a request not started ahead does."""
        old = self.ahead.pop(uri, None)
        if old is not None:  # the editor did not ask about the last keystroke
            old.task.cancel()
            self.asking[uri] = self.asking.get(uri, 0) + 1
        if self.engine is None or self.loop is None or len(changes) != 1:
            return
        c = changes[0]
        if c.start != c.end or not 0 < len(c.text) <= ANTICIPATE_CHARS:
            return
        if self.asking.get(uri, ANTICIPATE_MISSES) >= ANTICIPATE_MISSES:
            return
        offset, version = c.start + len(c.text) - (c.text in CLOSED_PAIRS), mirror.version
        if self.type_through(uri, mirror, offset) is not None:
            return

        async def start():
            await asyncio.sleep(self.debounce.delay_s())
            if mirror.version != version:
                return None
            return await self.complete_at(uri, mirror, offset)

        self.ahead[uri] = Ahead(version, offset, self.loop.create_task(start()))

    async def suggest(self, uri: str, position: types.Position, *, invoked: bool = False) -> list[str] | None:
        """Suggestions at a position, or None (unknown document, superseded, cancelled, not ready).
        `invoked`: the user asked explicitly; during the model's load such a request waits for it
        (bounded by the time cap) where an automatic one answers nothing at once."""
        mirror = self.mirrors.get(uri)
        if mirror is None:
            log.warning("completion for a document that is not open: %s", uri)
            return None
        try:
            offset = mirror.offset(position.line, position.character, self.encoding)
        except EditError as exc:
            log.warning("completion position %s:%s outside %s: %s", position.line, position.character, uri, exc)
            return None
        rests = self.type_through(uri, mirror, offset)
        if rests is not None:
            return rests
        if self.engine is None and invoked:
            await self.wait_for_engine()
        if self.engine is None:
            return None
        token = object()
        self.latest[uri] = token
        ahead = self.ahead.pop(uri, None)
        if not invoked:
            self.asking[uri] = 0
        if ahead is not None and not invoked and (ahead.version, ahead.offset) == (mirror.version, offset):
            if self.settings.context:  # the workspace may have changed since: a newer choice is sent when idle
                self.context.want(uri, mirror.text, offset)
            out = await ahead.task  # started before the request: the editor's debounce and the trip here are hidden
            self.anticipated += out is not None
            log.debug("%s:%d: the completion started ahead answers the request", uri, offset)
        else:
            if ahead is not None:
                ahead.task.cancel()
            previous = self.running.pop(uri, None)
            if previous is not None:
                previous.cancel()  # cancel-previous: the newest request wins
            await asyncio.sleep(self.debounce.delay_s())
            if self.latest.get(uri) is not token:
                return None
            out = await self.complete_at(uri, mirror, offset, invoked=invoked)
        if out is None or out.stop_reason == "cancelled":
            return None
        before = mirror.text[mirror.text.rfind("\n", 0, offset) + 1 : offset]
        texts = [t for t in dict.fromkeys(usable(d, before) for d in [out.text, *(out.drafts or ())]) if t]
        if not texts:
            return None
        tail = mirror.text[max(0, offset - 200) : offset]
        self.shown[uri] = Shown(offset, texts[0], tail, tuple(texts))
        self.stats.count("shown", self.languages.get(uri))
        return texts


    def after_change(self, uri: str, mirror: Mirror) -> None:
        """After an accepted suggestion lands in the text, start the next one at its end at once, for
        the request that follows there (`suggest` takes it over, as a keystroke's)."""
        pending = self.prefetch.pop(uri, None)
        if pending is None or self.engine is None or self.loop is None:
            return
        start, text = pending
        end = start + len(text)
        if mirror.text[start:end] != text:
            return
        keystroke = self.ahead.pop(uri, None)
        if keystroke is not None:  # the same spot: this one, without the debounce
            keystroke.task.cancel()
        self.ahead[uri] = Ahead(mirror.version, end, self.loop.create_task(self.complete_at(uri, mirror, end)))


    def inline_item(self, uri: str, position: types.Position, text: str) -> types.InlineCompletionItem:
        """An inline item at `position` whose range also covers what its end repeats of the line's rest."""
        mirror, end = self.mirrors.get(uri), position
        line = mirror.line(position.line) if mirror is not None else ""
        try:
            col = column_to_chars(line, position.character, self.encoding)
        except EditError:  # the document changed while decoding
            col = None
        k = overlap(line[:col], text, line[col:]) if col is not None else 0
        if k:
            end = types.Position(position.line, chars_to_column(line, col + k, self.encoding))
        return types.InlineCompletionItem(insert_text=text, range=types.Range(start=position, end=end))

    def reported(self, params) -> tuple[str, Mirror, int, str] | None:
        """(uri, document, offset, text) of a suggestion an editor reports on, None if it names no open
        document, no valid position or no text."""
        uri, text, pos = _get(params, "uri"), _get(params, "text"), _get(params, "position")
        mirror = self.mirrors.get(uri)
        if mirror is None or not isinstance(text, str) or not pos:
            return None
        try:
            line, ch = (pos["line"], pos["character"]) if isinstance(pos, dict) else (pos.line, pos.character)
            return uri, mirror, mirror.offset(int(line), int(ch), self.encoding), text
        except (AttributeError, EditError, KeyError, TypeError, ValueError):
            return None

    def accepted(self, params) -> None:
        self.shown.pop(_get(params, "uri"), None)
        if (found := self.reported(params)) is None:
            return
        uri, mirror, start, text = found
        self.prefetch[uri] = (start, text)
        if mirror.text[start : start + len(text)] == text:  # the insertion already arrived
            self.after_change(uri, mirror)

    def typed_through(self, params) -> bool:
        """Whether the user wrote at least a word of a suggestion that was not taken, by typing it: the
        line from where it was shown keeps some of it by EVAL.md's accept model (`engine.gate.accepted`).
        The gate's calibration counts such a suggestion as kept; its learned strength must too, or a
        user who types instead of pressing Tab would make it ever stricter."""
        from ghostline.engine.gate import accepted

        if (found := self.reported(params)) is None:
            return False
        _, mirror, start, text = found
        end = mirror.text.find("\n", start)
        return bool(accepted(text, mirror.text[start : None if end < 0 else end]))


def _range_at(position: types.Position) -> types.Range:
    return types.Range(start=position, end=position)


def usable(text: str, before: str) -> str | None:
    """A draft as it may be shown after `before` (the line left of the cursor), or None: never one
    that starts with a carriage return or is only whitespace; a leading tab after code and a space
    (where the line has no tab) is dropped."""
    if text.startswith("\r") or not text.strip():
        return None
    if text.startswith("\t") and before.strip() and before.endswith(" ") and "\t" not in before:
        text = text.lstrip("\t")
    return text if text.strip() else None


_PAIRS = {")": "(", "]": "[", "}": "{"}


def _closes_all(text: str) -> bool:
    """No bracket left open in `text` (a rough count: strings and comments are not told apart)."""
    stack: list[str] = []
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in _PAIRS and stack and stack[-1] == _PAIRS[ch]:
            stack.pop()
    return not stack


def overlap(before: str, text: str, after: str) -> int:
    """How many characters at the start of `after` (the line right of the cursor) the suggestion's end
    already holds, such as a bracket the editor closed itself: accepting replaces them instead of
    doubling them. Only where the suggestion closes every bracket of its line, so they are the same."""
    for k in range(min(len(after), len(text)), 0, -1):
        end = after[:k]
        if text.endswith(end) and end.strip():
            quotes_even = all((before + text).count(q) % 2 == 0 for q in "\"'`" if q in end)
            return k if quotes_even and _closes_all(before + text) else 0
    return 0


def build_server(*, model: str | None = None, engine: str | None = None) -> GhostlineServer:
    server = GhostlineServer(model=model, engine=engine)

    @server.feature(types.INITIALIZE)
    def initialize(ls: GhostlineServer, params: types.InitializeParams):
        ls.loop = asyncio.get_running_loop()
        try:
            ls.settings = ls.settings.merged(params.initialization_options)
        except SettingsError as exc:
            log.error("initializationOptions rejected: %s", exc)
        ls.context.chooser.opts = ls.context_options()
        ls.context.folders = workspace_folders(params)
        ls.debounce.base_ms = ls.settings.debounce_ms
        if ls.settings.completion_items:  # advertised only then: the suggest widget would repeat the ghost text
            ls.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", "(", " "]))(completion)

    @server.feature(types.INITIALIZED)
    def initialized(ls: GhostlineServer, params):
        ls.worker.start()
        ls.start_engine()
        ls.read_workspace()

    @server.feature(types.SHUTDOWN)
    def shutdown(ls: GhostlineServer, params):
        ls.leave_engine()
        ls.worker.stop()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: GhostlineServer, params: types.DidChangeConfigurationParams):
        engine, had_context = ls.engine_mode, ls.context.opts.budget > 0
        try:
            ls.settings = ls.settings.merged(params.settings)
        except SettingsError as exc:
            log.error("settings rejected: %s", exc)
            ls.window_show_message(types.ShowMessageParams(type=types.MessageType.Error, message=f"Ghostline: {exc}"))
            return
        ls.debounce.base_ms = ls.settings.debounce_ms
        ls.context.chooser.opts = ls.context_options()
        ls.read_workspace()
        if had_context and ls.context.opts.budget <= 0:  # turned off: the engine drops what it holds
            ls.worker.submit("update", lambda _stop: ls.engine is not None and ls.context.clear(ls.engine))
        if ls.engine_mode != engine:
            log.warning("engine setting %s takes effect when the server restarts", ls.settings.engine)
        if ls.engine is not None:
            ls.engine.options.memory_budget_mb = ls.settings.memory_budget_mb

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: GhostlineServer, params: types.DidOpenTextDocumentParams):
        doc = params.text_document
        ls.mirrors[doc.uri] = Mirror(doc.text, doc.version)
        ls.languages[doc.uri] = doc.language_id
        text = doc.text
        ls.submit_update(doc.uri, lambda e: ls.open_in(e, doc.uri, text))
        ls.track_open(doc.uri)
        ls.context.opened(doc.uri, text)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: GhostlineServer, params: types.DidChangeTextDocumentParams):
        uri, version = params.text_document.uri, params.text_document.version
        ls.debounce.keystroke()
        mirror = ls.mirrors.get(uri)
        if mirror is None:
            return ls.resync(uri, "change to a document that was never opened")
        if version is not None and mirror.version is not None and version <= mirror.version:
            return ls.resync(uri, f"version {version} after {mirror.version}")
        changes, text = [], mirror.text
        try:
            for ev in params.content_changes:
                if isinstance(ev, types.TextDocumentContentChangeWholeDocument) or getattr(ev, "range", None) is None:
                    c = Change(0, len(text), ev.text)
                else:
                    m = Mirror(text, None)
                    r = ev.range
                    a = m.offset(r.start.line, r.start.character, ls.encoding)
                    b = m.offset(r.end.line, r.end.character, ls.encoding)
                    if b < a:
                        raise EditError("range end before its start")
                    c = Change(a, b, ev.text)
                text = text[: c.start] + c.text + text[c.end :]
                changes.append(c)
        except EditError as exc:
            return ls.resync(uri, f"bad change ({exc})")
        mirror.set(text, version)
        if not OTHER_BREAKS.search(text) and ls.workspace.get_text_document(uri).source != text:
            return ls.resync(uri, "text differs from the client's after the change")
        ls.submit_edit(uri, changes)
        running = ls.running.pop(uri, None)
        if running is not None:  # its answer is for a text that is gone: free the engine for the next
            running.cancel()
        ls.anticipate(uri, mirror, changes)
        ls.after_change(uri, mirror)
        end = changes[-1].start + len(changes[-1].text) if changes else 0
        ls.context.changed(uri, text, text.count("\n", 0, end))
        ls.prepare_context(uri, end)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: GhostlineServer, params: types.DidCloseTextDocumentParams):
        uri = params.text_document.uri
        for table in (ls.mirrors, ls.shown, ls.languages, ls.prefetch, ls.outcomes, ls.asking):
            table.pop(uri, None)
        if (ahead := ls.ahead.pop(uri, None)) is not None:
            ahead.task.cancel()
        ls.submit_update(uri, lambda e: e.close(uri))
        ls.context.closed(uri)

    @server.feature(types.WORKSPACE_DID_CHANGE_WATCHED_FILES)
    def did_change_watched_files(ls: GhostlineServer, params: types.DidChangeWatchedFilesParams):
        for ev in params.changes:
            ls.context.watched(ev.uri, ev.type == types.FileChangeType.Deleted)

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: GhostlineServer, params: types.InlineCompletionParams):
        invoked = params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
        uri, position = params.text_document.uri, params.position
        texts = await ls.suggest(uri, position, invoked=invoked)
        if not texts:
            return types.InlineCompletionList(items=[])
        return types.InlineCompletionList(items=[ls.inline_item(uri, position, t) for t in texts])

    async def completion(ls: GhostlineServer, params: types.CompletionParams):
        """Suggest-widget items (only with the `completion_items` setting: ghost text already shows them)."""
        if not ls.settings.completion_items:
            return types.CompletionList(is_incomplete=True, items=[])
        texts = await ls.suggest(params.text_document.uri, params.position) or []
        items = [
            types.CompletionItem(
                label=t.split("\n", 1)[0].strip() or t.strip(),
                kind=types.CompletionItemKind.Text,
                detail="ghostline",
                text_edit=types.TextEdit(range=_range_at(params.position), new_text=t),
                sort_text=f"{i:02d}",
            )
            for i, t in enumerate(texts)
        ]
        return types.CompletionList(is_incomplete=True, items=items)

    @server.feature(DID_ACCEPT)
    def did_accept(ls: GhostlineServer, params):
        uri = _get(params, "uri")
        ls.stats.count("accepted", ls.languages.get(uri), document_kind(uri))
        ls.accepted(params)

    @server.feature(DID_REJECT)
    def did_reject(ls: GhostlineServer, params):
        uri = _get(params, "uri")
        ls.stats.count("typed" if ls.typed_through(params) else "rejected", ls.languages.get(uri), document_kind(uri))
        ls.shown.pop(uri, None)

    @server.feature(INSPECT)
    async def inspect(ls: GhostlineServer, params):
        """The engine's view of a document (after every queued update): for tests and bug reports."""
        uri = _get(params, "uri")

        def run(_stop):
            if ls.engine is None:
                return None
            doc = ls.engine.describe(uri)
            if doc is None:
                return None
            return {**doc, "errors": ls.errors, "cancelled_decodes": ls.worker.cancelled_decodes,
                    "anticipated": ls.anticipated, "last_completion": ls.outcomes.get(uri), "context": ls.context.report(uri)}

        with ls._edits_lock:
            ls.waiting_edits.pop(uri, None)  # later edits queue behind this request: it sees the text as of now
        return await asyncio.wrap_future(ls.worker.submit("update", run, uri=uri).future)

    return server


def workspace_folders(params: types.InitializeParams) -> list[Path]:
    """The local folders of `workspaceFolders`, else `rootUri`/`rootPath`."""
    from urllib.parse import unquote, urlparse

    uris = [f.uri for f in params.workspace_folders or ()] or ([params.root_uri] if params.root_uri else [])
    folders = [Path(unquote(urlparse(u).path)) for u in uris if urlparse(u).scheme == "file"]
    if not folders and params.root_path:
        folders = [Path(params.root_path)]
    return [f for f in folders if f.is_dir()]


def watch_files(ls: GhostlineServer) -> None:
    """Ask the client to report changes to the workspace's files, where it can register watchers."""
    caps = ls.client_capabilities.workspace
    watched = getattr(caps, "did_change_watched_files", None) if caps else None
    if not getattr(watched, "dynamic_registration", False):
        return
    options = types.DidChangeWatchedFilesRegistrationOptions(watchers=[types.FileSystemWatcher(glob_pattern="**/*")])
    reg = types.Registration(id="ghostline-watch", method=types.WORKSPACE_DID_CHANGE_WATCHED_FILES,
                             register_options=options)
    ls.client_register_capability(types.RegistrationParams(registrations=[reg]))


def _get(params, key: str):
    if isinstance(params, dict):
        return params.get(key)
    return getattr(params, key, None)


class ClientLogHandler(logging.Handler):
    """Mirror warnings and errors to the client's log (window/logMessage)."""

    def __init__(self, server: GhostlineServer):
        super().__init__(logging.INFO)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        if self.server.loop is None or not record.name.startswith("ghostline"):
            return
        kind = types.MessageType.Error if record.levelno >= logging.ERROR else (
            types.MessageType.Warning if record.levelno >= logging.WARNING else types.MessageType.Log)
        params = types.LogMessageParams(type=kind, message=self.format(record))
        self.server.soon(self.server.window_log_message, params)


def serve(args) -> int:
    logging.getLogger("pygls").setLevel(max(logging.WARNING, logging.getLogger().level))
    server = build_server(model=args.model, engine=args.engine)
    logging.getLogger().addHandler(ClientLogHandler(server))
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        server.start_tcp(host or "127.0.0.1", int(port))
    else:
        server.start_io()
    server.leave_engine()
    server.worker.stop(timeout=30.0)  # the client is gone: let a model load or a decode step finish
    if server.worker.alive:
        log.warning("engine worker still busy at exit; leaving without waiting")
        os._exit(0)  # a daemon thread inside torch must not meet interpreter teardown
    return 0


def engine_choice(value: str) -> str:
    try:
        return check_setting("engine", value)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the language server (stdio, or --tcp HOST:PORT)")
    s.add_argument("--model", default=None, help="gemma3-270m (default), smollm2-135m, a .gguf or a HF folder")
    s.add_argument("--tcp", default=None, metavar="HOST:PORT", help="listen on TCP instead of stdio")
    s.add_argument("--engine", default=None, type=engine_choice, metavar="daemon|in-process|tcp://HOST:PORT",
                   help="where the engine runs (wins over the `engine` setting; default: the shared local daemon)")
    s.set_defaults(func=serve)
