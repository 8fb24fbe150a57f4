"""A headless LSP client (pygls) that drives the real server over stdio, as an editor does: used by
the end-to-end tests and the latency benchmarks."""

from __future__ import annotations

import asyncio
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from lsprotocol import types
from pygls.lsp.client import LanguageClient

SERVER = [sys.executable, "-m", "ghostline", "serve"]


class Client(LanguageClient):
    def __init__(self):
        super().__init__("ghostline-test", "0")
        self.statuses: list[dict] = []
        self.logs: list[str] = []
        self.stderr = bytearray()
        self.ready = asyncio.Event()

        @self.feature("ghostline/status")
        def status(ls, params):
            p = params if isinstance(params, dict) else {k: getattr(params, k) for k in ("state", "message")}
            self.statuses.append(p)
            if p["state"] in ("ready", "error"):
                self.ready.set()

        self.progress: list = []

        @self.feature(types.WINDOW_WORK_DONE_PROGRESS_CREATE)
        def progress_create(ls, params):
            return None

        @self.feature(types.PROGRESS)
        def progress(ls, params):
            self.progress.append(params.value)

        @self.feature(types.WINDOW_LOG_MESSAGE)
        def log(ls, params):
            self.logs.append(params.message)

    async def drain(self):
        while chunk := await self._server.stderr.read(4096):
            self.stderr += chunk

    def open(self, uri: str, text: str, version: int = 1, language: str = "python"):
        self.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id=language, version=version, text=text)))

    def change(self, uri: str, version: int, start: tuple[int, int], end: tuple[int, int], text: str):
        rng = types.Range(start=types.Position(*start), end=types.Position(*end))
        self.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[types.TextDocumentContentChangePartial(range=rng, text=text)]))

    async def inline(self, uri: str, line: int, character: int, *, invoked: bool = False):
        kind = types.InlineCompletionTriggerKind.Invoked if invoked else types.InlineCompletionTriggerKind.Automatic
        return await self.text_document_inline_completion_async(types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, character),
            context=types.InlineCompletionContext(trigger_kind=kind)))

    async def inspect(self, uri: str):
        """The engine's view of a document, once every update sent before has been applied."""
        return await self.protocol.send_request_async("ghostline/inspect", {"uri": uri})

    async def context_ready(self, uri: str, *, timeout: float = 60.0) -> dict:
        """Wait until the server has sent the engine every context chunk chosen for `uri` (and read
        the workspace); its context report."""
        deadline = time.monotonic() + timeout
        while True:
            res = await self.inspect(uri)
            ctx = (res["context"] if isinstance(res, dict) else res.context) or {}
            ctx = ctx if isinstance(ctx, dict) else ctx._asdict()
            if (not ctx.get("pending") and ctx.get("scanned", True)) or time.monotonic() > deadline:
                return ctx
            await asyncio.sleep(1.0)  # over the server's quiet wait (`idle_refresh_ms`): polls must leave it idle

    async def settled(self, uri: str, *, timeout: float = 120.0) -> dict:
        """Wait until the engine has no idle work left for `uri` (`due` in its view: rows missing, a
        window to grow, a refresh, rows before where the user works to encode again); that view."""
        deadline = time.monotonic() + timeout
        while True:
            res = await self.inspect(uri)
            view = res if isinstance(res, dict) else res._asdict()
            if view.get("due") is None or time.monotonic() > deadline:
                return view
            await asyncio.sleep(1.0)  # over the server's quiet wait (`idle_refresh_ms`): polls must leave it idle

    async def engine_text(self, uri: str) -> str:
        res = await self.inspect(uri)
        return res["text"] if isinstance(res, dict) else res.text

    def change_many(self, uri: str, version: int, changes: list[dict]):
        """LSP-shaped change dicts (as in the task files) in one didChange."""
        events = []
        for ch in changes:
            r = ch["range"]
            rng = types.Range(start=types.Position(r["start"]["line"], r["start"]["character"]),
                              end=types.Position(r["end"]["line"], r["end"]["character"]))
            events.append(types.TextDocumentContentChangePartial(range=rng, text=ch["text"]))
        self.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version), content_changes=events))


@asynccontextmanager
async def running_server(*, model: str = "smollm2-135m", options: dict | None = None, encodings=("utf-16",),
                         ready_timeout: float | None = 300, engine: str = "in-process", env: dict | None = None,
                         command: list[str] | None = None, cwd: str | None = None, folder: str | None = None):
    """A started, initialised server; its model is ready unless `ready_timeout` is None (then the
    client gets it while it loads). `engine` as the `--engine` flag (in-process by default, so tests
    and benchmarks of one server measure one process); `env`, `cwd` for the server; `command` runs
    another installation's server (`[".../bin/ghostline", "serve"]`); `folder` the workspace folder
    the editor opened."""
    client = Client()
    await client.start_io(*(command or SERVER), "--model", model, "--engine", engine, env=env, cwd=cwd)
    drain = asyncio.create_task(client.drain())
    client.started_at = time.perf_counter()  # before initialize: the editor's "server started"
    caps = types.ClientCapabilities(
        general=types.GeneralClientCapabilities(position_encodings=list(encodings)),
        window=types.WindowClientCapabilities(work_done_progress=True))
    root = Path(folder).resolve().as_uri() if folder else None
    result = await client.initialize_async(types.InitializeParams(
        capabilities=caps, initialization_options=options or {}, root_uri=root,
        workspace_folders=[types.WorkspaceFolder(uri=root, name=Path(folder).name)] if root else None))
    client.initialized(types.InitializedParams())
    client.init_result = result
    client.initialized_at = time.perf_counter()
    if ready_timeout is not None:
        await asyncio.wait_for(client.ready.wait(), ready_timeout)
    try:
        yield client
    finally:
        try:
            await asyncio.wait_for(client.shutdown_async(None), 10)
            client.exit(None)
        except Exception:
            pass
        await asyncio.wait_for(client.stop(), 15)
        drain.cancel()
