"""Context beyond the prefix: chunks of the workspace's files and of the other open documents, chosen
for the text above the cursor within a token budget. Torch-free: the engine caches each document's
chosen chunks in front of it, in the same token sequence (`Engine.set_context`; a new choice is a
PIE edit of that head, `Held`); this module reads files, picks chunks and keeps the record of what the
engine holds.

A chunk is `CHUNK_LINES` lines of one file under a `# path` line. The choice scores a chunk by how
many distinct names of the lines above the cursor it holds, ties going to the regions edited last and
the files the document imports; it is deterministic, never
takes the current file (its text above the cursor is the prefix already; below it is not evidence),
and is kept while the cursor stays in one region (`Choice`), so the engine's work is not thrown away.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ghostline.context")

CHUNK_LINES = 40
QUERY_LINES = 30  # lines above the cursor the choice reads
REGION_LINES = 16  # a choice is kept while the cursor stays in the same run of this many lines
CHARS_PER_TOKEN = 3.5  # the budget's estimate (the language server has no tokenizer)
MAX_FILE_BYTES = 512 * 1024
MAX_FILES = 4000
SKIP_DIRS = {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".mypy_cache",
             ".pytest_cache", "build", "dist", "site-packages", ".eggs"}
LANGUAGES = {".py": "python", ".pyi": "python", ".js": "js", ".jsx": "js", ".ts": "js", ".tsx": "js", ".go": "go",
             ".rs": "rust", ".java": "java", ".kt": "kotlin", ".c": "c", ".h": "c", ".cc": "c", ".cpp": "c",
             ".hpp": "c", ".rb": "ruby", ".lua": "lua", ".php": "php", ".cs": "csharp", ".swift": "swift",
             ".scala": "scala", ".sh": "sh"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import\s+([\w, ()*]+)|import\s+([\w., ]+))", re.M)
_COMMON = frozenset("""self cls def class return import from None True False and not for while with else elif
    try except finally raise pass yield lambda async await print len str int dict list set tuple isinstance
    the this that const let var function new null undefined""".split())


def language_of(path: str) -> str | None:
    return LANGUAGES.get(os.path.splitext(path)[1].lower())


def identifiers(text: str) -> list[str]:
    return [w for w in _IDENT.findall(text) if w not in _COMMON]


@dataclass(frozen=True)
class Chunk:
    path: str  # shown in the header: relative to the workspace folder, or the document's uri
    first: int  # its first line (0-based) in the file
    text: str  # "# path\n" + the lines


@dataclass
class _File:
    path: str
    language: str | None
    module: str  # "pkg.mod" for pkg/mod.py
    chunks: list[Chunk]
    names: list[frozenset[str]]  # per chunk, the names it holds


def _module(path: str) -> str:
    stem = os.path.splitext(path)[0].replace("\\", "/")
    if stem.endswith("/__init__"):
        stem = stem[: -len("/__init__")]
    return stem.strip("/").replace("/", ".")


def chunk_file(path: str, text: str, *, comment: str = "#") -> list[Chunk]:
    """A file's chunks of CHUNK_LINES lines (blank-only chunks dropped)."""
    lines = text.split("\n")
    out = []
    for first in range(0, len(lines), CHUNK_LINES):
        body = "\n".join(lines[first : first + CHUNK_LINES]).rstrip()
        if body.strip():
            out.append(Chunk(path, first, f"{comment} {path}\n{body}\n"))
    return out


class Library:
    """Every file the choice may read, chunked and indexed: the workspace folders' files from disk and
    the open documents (whose editor text replaces the disk copy)."""

    def __init__(self):
        self.files: dict[str, _File] = {}  # by path
        self.chunks = 0
        self.generation = 0  # bumped on every change (a kept choice is dropped)

    def put(self, path: str, text: str) -> None:
        self.drop(path)
        lang = language_of(path)
        comment = "//" if lang in ("js", "go", "rust", "java", "kotlin", "c", "csharp", "swift", "scala", "php") else "#"
        chunks = chunk_file(path, text, comment=comment)
        names = [frozenset(identifiers(c.text)) for c in chunks]
        self.files[path] = _File(path, lang, _module(path), chunks, names)
        self.chunks += len(chunks)
        self.generation += 1

    def drop(self, path: str) -> None:
        f = self.files.pop(path, None)
        if f is None:
            return
        self.chunks -= len(f.chunks)
        self.generation += 1


@dataclass
class Options:
    budget: int = 1536  # tokens of context (estimated), the chunks nearest the prefix kept
    workspace: bool = True  # chunks of the workspace folders' files
    open_files: bool = True  # chunks of the other open documents
    edits: bool = True  # prefer the regions edited last


@dataclass
class Choice:
    chunks: list[Chunk]  # in prompt order: the best last, nearest the prefix
    region: tuple  # (uri, region, generation) it was made for


def imports(text: str) -> set[str]:
    """Module names the text imports (`a.b` of `from a.b import c` and `import a.b`; with `c` too)."""
    out = set()
    for frm, names, plain in _IMPORT.findall(text):
        if frm:
            out.add(frm)
            out.update(f"{frm}.{n.strip()}" for n in names.replace("(", "").replace(")", "").split(",") if n.strip())
        for m in plain.split(","):
            if m.strip():
                out.add(m.split(" as ")[0].strip())
    return out


def choose(lib: Library, text: str, offset: int, *, path: str, opts: Options, open_paths: set[str],
           edited: list[tuple[str, int]] = ()) -> list[tuple[float, Chunk]]:
    """Chunks for a cursor at `offset` of `text` (the document at `path`), best first, within the
    budget. A chunk's score is how many distinct names of the QUERY_LINES lines above the cursor it
    holds: code using many of the cursor's names is code like it, whose patterns a small model
    copies (BM25 over the names with a bonus for their definitions chose worse, bench/RESULTS.md).
    Ties go to the regions edited last, then to the files the document imports (a bonus under 1).
    Reads only the text before the cursor."""
    above = text[:offset]
    query = set(identifiers("\n".join(above.split("\n")[-QUERY_LINES - 1 :])))
    if not query:
        return []
    lang = language_of(path)
    wanted = imports(above)
    recent = {}
    for i, (p, line) in enumerate(edited):
        recent.setdefault(p, []).append((line, 0.5 ** i))
    scored = []
    for f in lib.files.values():
        if f.path == path or (lang and f.language and f.language != lang):
            continue
        if f.path in open_paths and not opts.open_files or f.path not in open_paths and not opts.workspace:
            continue
        imported = f.module in wanted or any(w.endswith("." + f.module.rsplit(".", 1)[-1]) and w.startswith(
            f.module.rsplit(".", 1)[0]) for w in wanted if "." in f.module)
        for chunk, names in zip(f.chunks, f.names):
            shared = len(query & names)
            if not shared:
                continue
            edits = sum(w for line, w in recent.get(f.path, ()) if chunk.first <= line < chunk.first + CHUNK_LINES)
            scored.append((shared + 0.5 * min(edits, 0.99) * opts.edits + 0.25 * imported, chunk))
    scored.sort(key=lambda sc: (-sc[0], sc[1].path, sc[1].first))
    out, left, seen = [], opts.budget * CHARS_PER_TOKEN, set()
    for s, chunk in scored:
        body = chunk.text.split("\n", 1)[1]
        if body in seen or len(chunk.text) > left:
            continue
        seen.add(body)
        out.append((s, chunk))
        left -= len(chunk.text)
    return out


def context_text(lib: Library, text: str, offset: int, *, path: str, opts: Options) -> str:
    """The context a cursor in `text` (at `path`) gets from `lib` with no document open beside it:
    the choice in prompt order (the best nearest the document), joined as the engine caches it."""
    best = choose(lib, text, offset, path=path, opts=opts, open_paths=set())
    return Held.text([c for _, c in reversed(best)])


class Chooser:
    """The choice for a document's cursor, kept while the cursor stays in one region and the library
    and edit history are unchanged; the edit history (the user's own order, newest first)."""

    def __init__(self, lib: Library, opts: Options | None = None):
        self.lib, self.opts = lib, opts or Options()
        self.edited: deque[tuple[str, int]] = deque(maxlen=16)
        self._kept: dict[str, Choice] = {}

    def edit(self, path: str, line: int) -> None:
        if not self.edited or self.edited[0] != (path, line):
            self.edited.appendleft((path, line))

    def __call__(self, uri: str, path: str, text: str, offset: int, open_paths: set[str]) -> Choice:
        line = text.count("\n", 0, offset)
        region = (uri, line // REGION_LINES, self.lib.generation, self.opts.budget)
        kept = self._kept.get(uri)
        if kept is not None and kept.region == region:
            return kept
        best = choose(self.lib, text, offset, path=path, opts=self.opts, open_paths=open_paths,
                      edited=[e for e in self.edited if e[0] != path])
        choice = Choice([c for _, c in reversed(best)], region)
        self._kept[uri] = choice
        return choice

    def forget(self, uri: str) -> None:
        self._kept.pop(uri, None)


class Held:
    """Per editor document, the context the engine caches in front of it: its chosen chunks' text,
    joined, read by its completions as one prompt would be (a context kept as a document of its own
    and attended over beside the document's cache was measured to lose the gain: the document's rows
    never read it). A new choice is an edit of that head, so the engine encodes only the chunks new in
    it and rotates the ones kept and the document's rows (PIE); the new text is taken at once and its
    rows encoded in pieces that yield to requests and resume where they stopped, then the document's
    rows before where the user works encoded again to read it (`Engine.background`)."""

    def __init__(self):
        self.held: dict[str, tuple[str, list[str]]] = {}  # owner uri -> (text sent, its chunks' names)

    @staticmethod
    def text(chunks: list[Chunk]) -> str:
        return "".join(c.text for c in chunks)

    def names(self, owner: str) -> list[str]:
        return list(self.held.get(owner, ("", []))[1])

    def current(self, owner: str, chunks: list[Chunk]) -> bool:
        return owner in self.held and self.held[owner][0] == self.text(chunks)

    def lost(self, owner: str) -> None:
        """The engine no longer holds it (re-opened, an update failed): sent again when next chosen."""
        self.held.pop(owner, None)

    def sync(self, engine, owner: str, chunks: list[Chunk], should_stop=lambda: False, *, lock=None) -> bool:
        """Make the engine cache `chunks` in front of `owner` (on the engine's thread): the text at once
        with its new rows missing, then those rows encoded (`mend`) until `should_stop()`. True when
        the engine holds it whole; stopped, the rows done are kept and `mend` goes on from there (a
        context is never encoded from scratch twice because a request cut it short). `lock` guards
        this record (not the engine calls) against readers on other threads."""
        lock = lock or threading.Lock()
        text = self.text(chunks)
        with lock:
            old = self.held.get(owner, (None, []))[0]
        if old != text:
            if should_stop():
                return False
            try:
                engine.set_context(owner, text, should_stop=should_stop)
            except Exception as exc:  # a refused update costs context, never the request
                stopped = type(exc).__name__ == "Cancelled"  # sent again when next chosen (a no-op if whole)
                if not isinstance(exc, KeyError) and not stopped:  # KeyError: the document is not open (closed meanwhile)
                    log.warning("context of %s not sent: %s", owner, exc)
                with lock:
                    self.held.pop(owner, None)
                return False
            with lock:
                self.held[owner] = (text, [f"{c.path}:{c.first + 1}" for c in chunks])
        return self.mend(engine, owner, should_stop, lock=lock)

    def mend(self, engine, owner: str, should_stop=lambda: False, *, lock=None) -> bool:
        """Encode the rows the engine still lacks of `owner` and its context, then the document's due
        work (`Engine.background`: the rows before where the user works encoded again to read the new
        context, a refresh once edits made one due), until `should_stop()`; True when none is left.
        (An engine daemon does this in its own idle time: nothing to do here.)"""
        try:
            while engine.background(owner, should_stop=should_stop) is not None:
                pass
        except Exception as exc:
            if type(exc).__name__ == "Cancelled":
                return False
            if not isinstance(exc, KeyError):  # KeyError: the engine no longer holds it
                log.warning("context of %s not encoded: %s", owner, exc)
            with lock or threading.Lock():
                self.held.pop(owner, None)  # sent again when next chosen
            return False
        return True

    def drop(self, owner: str) -> None:
        """Forget `owner`'s context (its document was closed: the context went with it)."""
        self.held.pop(owner, None)


# the workspace on disk -----------------------------------------------------------------------------


class Ignore:
    """.gitignore rules (the common subset: globs, `dir/`, leading `/`, `!` re-includes, `**`) of one
    folder and its subfolders' files."""

    def __init__(self):
        self.rules: list[tuple[str, str, bool, bool]] = []  # (base, pattern, negate, dir_only)

    def read(self, folder: Path, base: str) -> None:
        try:
            lines = (folder / ".gitignore").read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            line = line[1:] if negate else line
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            anchored = "/" in line
            self.rules.append((base, line.lstrip("/") if anchored else "**/" + line, negate, dir_only))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        out = False
        for base, pattern, negate, dir_only in self.rules:
            if dir_only and not is_dir or base and not rel.startswith(base + "/"):
                continue
            sub = rel[len(base) + 1 :] if base else rel
            if fnmatch.fnmatchcase(sub, pattern) or pattern.startswith("**/") and fnmatch.fnmatchcase(sub, pattern[3:]):
                out = not negate
        return out


def scan(root: Path, *, max_files: int = MAX_FILES, should_stop=lambda: False) -> dict[str, str]:
    """A workspace folder's source files (relative path -> text), .gitignore'd and hidden ones left
    out, files over MAX_FILE_BYTES or not UTF-8 skipped, at most `max_files`."""
    out: dict[str, str] = {}
    ignore = Ignore()
    for folder, dirs, files in os.walk(root):
        if should_stop():
            break
        here = Path(folder)
        rel_dir = "" if here == root else here.relative_to(root).as_posix()
        ignore.read(here, rel_dir)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")
                         and not ignore.ignored(f"{rel_dir}/{d}".lstrip("/"), True))
        for name in sorted(files):
            rel = f"{rel_dir}/{name}".lstrip("/")
            if language_of(name) is None or name.startswith(".") or ignore.ignored(rel, False):
                continue
            try:
                p = here / name
                if p.is_symlink() or p.stat().st_size > MAX_FILE_BYTES:
                    continue
                out[rel] = p.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if len(out) >= max_files:
                log.warning("workspace %s: more than %d source files, the rest left out", root, max_files)
                return out
    return out


def path_of(uri: str, folders: list[Path]) -> str:
    """A document's path as chunks name it: relative to the workspace folder holding it, else the uri."""
    from urllib.parse import unquote, urlparse

    u = urlparse(uri)
    if u.scheme != "file":
        return uri
    p = Path(unquote(u.path))
    for root in folders:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            continue
    return p.as_posix()


class Projects:
    """The context a file's own project gives it when no editor sends a workspace (the show gate's
    calibration, `ghostline calibrate --gate-context`): its project is its top-level package (the
    outermost folder of `__init__.py` files holding it), else the folder just under the corpus root
    that holds it, read as a workspace folder (`scan`, at most `max_files`), the choice the server's
    (`choose`, the file itself left out). A file directly under a root has none. The last `keep`
    projects stay indexed."""

    def __init__(self, roots: list[Path], opts: Options | None = None, *, max_files: int = 300, keep: int = 8):
        self.roots, self.opts, self.max_files, self.keep = [Path(r) for r in roots], opts or Options(), max_files, keep
        self._libs: OrderedDict[Path, Library] = OrderedDict()

    def project(self, path: Path) -> tuple[Path, str] | None:
        """(the project's folder, `path` relative to it), or None."""
        path = Path(path)
        for root in self.roots:
            try:
                rel = path.relative_to(root)
            except ValueError:
                continue
            if len(rel.parts) < 2:
                return None
            folder = path.parent
            if (folder / "__init__.py").is_file():
                while folder.parent != root and (folder.parent / "__init__.py").is_file():
                    folder = folder.parent
            else:
                folder = root / rel.parts[0]
            return folder, path.relative_to(folder).as_posix()
        return None

    def __call__(self, path: Path, text: str, offset: int) -> str:
        """The context text for a cursor at `offset` of `text`, the document at `path` ("" for none)."""
        found = self.project(path)
        if found is None:
            return ""
        folder, rel = found
        lib = self._libs.pop(folder, None)
        if lib is None:
            lib = Library()
            for p, t in scan(folder, max_files=self.max_files).items():
                lib.put(p, t)
        self._libs[folder] = lib
        while len(self._libs) > self.keep:
            self._libs.popitem(last=False)
        return context_text(lib, text, offset, path=rel, opts=self.opts)


class Context:
    """The language server's side of context: the library (workspace files, open documents), the
    choice per document, and the chunks the engine holds. The event loop calls `opened`, `changed`,
    `closed`, `watched`, `for_request`; the engine's thread `prepare` (after an edit) and `idle`."""

    def __init__(self, opts: Options | None = None):
        self.lib = Library()
        self.chooser = Chooser(self.lib, opts)
        self.held = Held()
        self.folders: list[Path] = []
        self.lock = threading.Lock()  # the library, the choices and `held` (the loop, the scan, the engine thread)
        self.texts: dict[str, str] = {}  # open documents' texts not yet in the library (uri -> text)
        self.wanted: dict[str, Choice] = {}  # a document's last choice with chunks the engine lacks
        self.due: Counter = Counter()  # per document, edits whose choice (`prepare`) has not run yet
        self.partial: set[str] = set()  # documents whose context the engine holds with rows still missing
        self.last: dict[str, dict] = {}  # per document, the context of its last request (inspect)
        self.scanned = threading.Event()
        self.open: set[str] = set()  # the editor's open documents

    @property
    def opts(self) -> Options:
        return self.chooser.opts

    def scan(self, folders: list[Path]) -> None:
        """Read the workspace folders into the library (call on a thread of its own)."""
        t0 = time.monotonic()
        n = 0
        try:
            for root in folders:
                files = scan(root)
                with self.lock:
                    open_paths = {path_of(u, self.folders) for u in self.texts}
                    for rel, text in files.items():
                        if rel not in open_paths:  # an open document's editor text wins over the disk
                            self.lib.put(rel, text)
                n += len(files)
            log.info("workspace: %d files, %d chunks read in %.1f s", n, self.lib.chunks, time.monotonic() - t0)
        except Exception:
            log.exception("reading the workspace failed; context comes from the open documents only")
        finally:
            self.scanned.set()

    def opened(self, uri: str, text: str) -> None:
        with self.lock:
            self.texts[uri] = text
            self.open.add(uri)

    def changed(self, uri: str, text: str, line: int) -> None:
        with self.lock:
            self.texts[uri] = text
            self.chooser.edit(path_of(uri, self.folders), line)

    def closed(self, uri: str) -> None:
        """`uri` was closed (its context goes with its engine document)."""
        with self.lock:
            self.open.discard(uri)
            self.texts.pop(uri, None)
            self.wanted.pop(uri, None)
            self.due.pop(uri, None)
            self.partial.discard(uri)
            self.last.pop(uri, None)
            self.chooser.forget(uri)
            path = path_of(uri, self.folders)
            if path == uri or not self._reread(path):
                self.lib.drop(path)
            self.held.drop(uri)

    def watched(self, uri: str, deleted: bool) -> None:
        """A workspace file changed on disk (workspace/didChangeWatchedFiles)."""
        with self.lock:
            path = path_of(uri, self.folders)
            if path == uri or uri in self.texts:
                return
            if deleted or not self._reread(path):
                self.lib.drop(path)

    def _reread(self, path: str) -> bool:
        for root in self.folders:
            p = root / path
            try:
                if language_of(path) and p.is_file() and p.stat().st_size <= MAX_FILE_BYTES:
                    self.lib.put(path, p.read_bytes().decode("utf-8"))
                    return True
            except (OSError, UnicodeDecodeError):
                continue
        return False

    def choice(self, uri: str, text: str, offset: int) -> Choice:
        """The chunks for a cursor in `uri` (the other open documents' texts taken in first; the
        document's own is not a source of its context)."""
        with self.lock:
            for other, t in list(self.texts.items()):
                if other != uri:
                    self.lib.put(path_of(other, self.folders), self.texts.pop(other))
            open_paths = {path_of(u, self.folders) for u in self.texts} | {f for f in self.lib.files if "://" in f}
            return self.chooser(uri, path_of(uri, self.folders), text, offset, open_paths)

    def want(self, uri: str, text: str, offset: int) -> Choice | None:
        """The choice for a cursor at `offset`, left for `idle` to send when the engine lacks it."""
        if self.opts.budget <= 0:
            return None
        choice = self.choice(uri, text, offset)
        with self.lock:
            if not self.held.current(uri, choice.chunks):
                self.wanted[uri] = choice
        return choice

    def for_request(self, uri: str, text: str, offset: int) -> bool:
        """Before a request at `offset`: it reads whatever context the engine caches for `uri`; a newer
        choice is left for `idle` to send (a request never waits for context). True when the engine
        should hold some."""
        choice = self.want(uri, text, offset)
        if choice is None:
            return False
        with self.lock:
            self.last[uri] = {"chosen": [f"{c.path}:{c.first + 1}" for c in choice.chunks],
                              "asked": self.held.names(uri)}
            return bool(self.held.names(uri))

    def answered(self, uri: str, asked: bool, tokens: int) -> None:
        """After a completion that read `tokens` rows of context: a context the engine should hold but
        did not read (the document re-opened, evicted; not while its rows are still encoding) is sent
        again."""
        with self.lock:
            if asked and not tokens and uri not in self.partial:
                self.held.lost(uri)
            if uri in self.last:
                self.last[uri].update(used=len(self.last[uri].get("asked", [])) if tokens else 0, tokens=tokens)

    def expect(self, uri: str) -> None:
        """An edit's `prepare` is queued for `uri`: its context is pending until that has run."""
        with self.lock:
            self.due[uri] += 1

    def prepare(self, engine, uri: str, text: str, offset: int, should_stop) -> bool:
        """On the engine's thread after an edit (`expect`ed): choose for the edit's place and send it,
        unless a completion is waiting (then `idle` sends it); no engine yet, nothing to send."""
        try:
            if self.opts.budget <= 0 or engine is None:
                return False
            return self._send(engine, uri, self.choice(uri, text, offset), should_stop)
        finally:
            with self.lock:
                if uri in self.due:
                    self.due[uri] -= 1
                    if self.due[uri] <= 0:
                        del self.due[uri]

    def idle(self, engine, should_stop) -> bool:
        """Background work: send the newest choice the engine lacks, else go on encoding a context it
        holds in part; True when there was such work."""
        with self.lock:
            todo = [(u, c) for u, c in self.wanted.items() if not self.held.current(u, c.chunks)]
            partial = sorted(self.partial)
        if todo:
            return self._send(engine, *todo[-1], should_stop)
        for uri in partial[:1]:
            done = self.held.mend(engine, uri, should_stop, lock=self.lock)
            with self.lock:
                if done or uri not in self.held.held:
                    self.partial.discard(uri)
                return uri in self.held.held
        return False

    def _send(self, engine, uri: str, choice: Choice, should_stop) -> bool:
        """Send `choice`; True when the engine now holds its text (whole, or in part: `partial`)."""
        with self.lock:
            if uri not in self.open:  # closed since the choice was made
                self.wanted.pop(uri, None)
                return False
            self.wanted[uri] = choice
        whole = self.held.sync(engine, uri, choice.chunks, should_stop, lock=self.lock)
        with self.lock:
            current = self.held.current(uri, choice.chunks)
            if current:
                if self.wanted.get(uri) is choice:
                    del self.wanted[uri]
                (self.partial.discard if whole else self.partial.add)(uri)
        return current

    def clear(self, engine) -> None:
        """Context turned off: the engine's documents lose theirs (on the engine's thread)."""
        with self.lock:
            owners = list(self.held.held)
            self.held.held.clear()
            self.wanted.clear()
            self.partial.clear()
        for uri in owners:
            try:
                engine.set_context(uri, "")
            except Exception as exc:  # closed meanwhile, or the daemon refused: nothing left to read
                log.debug("context of %s not cleared: %s", uri, exc)

    def report(self, uri: str) -> dict:
        with self.lock:
            last = dict(self.last.get(uri) or {})
            last["pending"] = int(uri in self.wanted or uri in self.due or uri in self.partial)
            last["files"], last["chunks"] = len(self.lib.files), self.lib.chunks
            last["scanned"] = self.scanned.is_set() or not self.folders
        return last
