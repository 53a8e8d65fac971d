"""``deltakv slot``: a llama-server slot saved as a .dkv and restored from one, over the server's HTTP API.

llama-server saves and restores a slot only as a raw file in its ``--slot-save-path`` folder
(``POST /slots/{id}?action=save|restore`` with ``{"filename": ...}``). So this runs on the
server's machine, with that folder as ``--slot-dir``:

- save: the server writes ``deltakv-slot{id}-{random}.bin`` into the folder; it is converted to a
  .dkv at the output (a path, or a store URL once stores take URLs); the raw file is removed only
  after the .dkv is durably written. If anything fails, the raw file stays and the message says
  where it is.
- restore: the .dkv is rebuilt as a sequence file in the folder under a fresh name; the server
  reads it; the file is removed once the server has answered, whatever it answered.

Before any work the slot is checked: it exists, it is idle, and (restore) the session was saved
from the model the server runs now and fits the slot's context. The server's own checks (cache
types, cells) follow; when it refuses, its message is passed on.
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from deltakv_format.constants import DEFAULT_CODEC, GGUFValueType
from deltakv_format.errors import DeltaKVError
from deltakv_format.gguf_io import KeyValue
from deltakv_format.llama_state import parse_state
from deltakv_format.session_rebuild import iter_rebuilt_chunks
from deltakv_format.model_info import ModelInfo, model_file_digest
from deltakv_format.session import DkvSession, rope_for_state, session_bytes
from deltakv_format.state_model import Framing

DEFAULT_SERVER = "http://127.0.0.1:8080"

# Where the slot came from, so that restore can refuse another model before the server tries.
KEY_SERVER_MODEL = "deltakv.runtime.server.model"  # the model file's name
KEY_SERVER_MODEL_DIGEST = "deltakv.runtime.server.model_digest"  # model_info.model_file_digest
KEY_SERVER_N_CTX = "deltakv.runtime.server.n_ctx"  # the slot's context size
KEY_SERVER_SLOT = "deltakv.runtime.server.slot"


class SlotError(DeltaKVError):
    """A slot could not be saved or restored: the server, the folder or the session says why."""


class LlamaServer:
    """The few endpoints of a running llama-server that slot save and restore use."""

    def __init__(self, url: str = DEFAULT_SERVER, *, api_key: str | None = None, timeout_s: float = 600.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise SlotError(f"--server: expected an http:// or https:// URL such as {DEFAULT_SERVER}, found {url!r}")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: dict | None = None) -> dict | list:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            raise SlotError(f"llama-server at {self.url}: {method} {path} answered {e.code}: "
                            f"{_error_message(e.read())}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise SlotError(f"cannot reach llama-server at {self.url} ({reason}): expected a running server "
                            "(start it, or pass --server URL)") from None
        except json.JSONDecodeError as e:
            raise SlotError(f"llama-server at {self.url}: {method} {path}: expected JSON, found {e.doc[:80]!r}") from None

    def slots(self) -> list[dict]:
        found = self._request("GET", "/slots")
        if not isinstance(found, list):
            raise SlotError(f"llama-server at {self.url}: GET /slots: expected a list of slots, found {found!r:.80}")
        return found

    def props(self) -> dict:
        found = self._request("GET", "/props")
        return found if isinstance(found, dict) else {}

    def slot(self, slot_id: int) -> dict:
        slots = self.slots()
        for slot in slots:
            if slot.get("id") == slot_id:
                return slot
        raise SlotError(f"llama-server at {self.url}: no slot {slot_id}; it has slots "
                        f"{', '.join(str(s.get('id')) for s in slots) or 'none'}")

    def slot_action(self, slot_id: int, action: str, filename: str) -> dict:
        answer = self._request("POST", f"/slots/{slot_id}?action={action}", {"filename": filename})
        return answer if isinstance(answer, dict) else {}


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body).get("error", {})
        return error.get("message") or json.dumps(error)
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace") or "(no message)"


def _idle_slot(server: LlamaServer, slot_id: int) -> dict:
    slot = server.slot(slot_id)
    if slot.get("is_processing"):
        # The server would defer the action until the request ends: a save then holds whatever
        # the slot has by then. Say so instead of waiting an unknown time.
        raise SlotError(f"slot {slot_id} of {server.url} is busy: expected an idle slot, found one processing a "
                        "request; try again when it is done")
    return slot


def _slot_dir(slot_dir) -> Path:
    if slot_dir is None:
        raise SlotError("--slot-dir: expected the folder the server was started with as --slot-save-path, found none")
    folder = Path(slot_dir).expanduser().resolve()
    if not folder.is_dir():
        raise SlotError(f"--slot-dir {slot_dir}: expected the server's --slot-save-path folder, found "
                        f"{'a file' if folder.exists() else 'nothing'}")
    return folder


def _temp_name(slot_id: int, what: str) -> str:
    # A name fs_validate_filename accepts (no path, no leading dot) that no two runs share.
    return f"deltakv-{what}-slot{slot_id}-{os.getpid()}-{secrets.token_hex(4)}.bin"


def _server_model(server: LlamaServer) -> Path | None:
    """The server's model file, when this machine can read it (the command runs next to the server)."""
    path = server.props().get("model_path")
    if isinstance(path, str) and path and Path(path).is_file():
        return Path(path)
    return None


@dataclass
class SavedSlot:
    slot: int
    n_tokens: int
    raw_bytes: int
    dkv_bytes: int
    output: str
    rope: bool  # K coded with rotary embedding undone (the model was readable here)


def save(server: LlamaServer, slot_id: int, slot_dir, write_dkv, *, codec=None, k_codec=None, v_codec=None,
         bits=None, model_path=None, transcode=False) -> SavedSlot:
    """Save slot ``slot_id`` as a .dkv through ``write_dkv(data) -> str`` (where it went).

    ``transcode``: a quantized cache's K/V (``-ctk q8_0 -ctv q8_0``) coded through their values and
    quantized back on restore (lossy, SPEC.md 6.6); without it they are kept raw.

    ``model_path``: the model's GGUF for the rotary parameters; default: the server's model file
    if it is readable here."""
    folder = _slot_dir(slot_dir)
    slot = _idle_slot(server, slot_id)
    model_path = Path(model_path) if model_path is not None else _server_model(server)
    name = _temp_name(slot_id, "save")
    answer = server.slot_action(slot_id, "save", name)
    raw_path = folder / name
    if not raw_path.is_file():
        raise SlotError(f"llama-server saved slot {slot_id} as {name!r} in its --slot-save-path, but {folder} has no "
                        "such file: expected --slot-dir to be that folder")
    try:
        raw = raw_path.read_bytes()
        model = ModelInfo.from_gguf(model_path) if model_path is not None else None
        state = parse_state(raw, model=model)
        extra = [KeyValue(KEY_SERVER_SLOT, GGUFValueType.UINT32, slot_id),
                 KeyValue(KEY_SERVER_N_CTX, GGUFValueType.UINT32, int(slot.get("n_ctx") or 0))]
        if model_path is not None:
            extra += [KeyValue(KEY_SERVER_MODEL, GGUFValueType.STRING, model_path.name),
                      KeyValue(KEY_SERVER_MODEL_DIGEST, GGUFValueType.STRING, model_file_digest(model_path))]
        rope = rope_for_state(model, state)
        data = session_bytes(state, codec or DEFAULT_CODEC, k_codec=k_codec, v_codec=v_codec, bits=bits,
                             transcode=transcode, extra_kvs=extra, rope=rope)
        del state
        where = write_dkv(data)
    except (DeltaKVError, OSError) as e:
        raise SlotError(f"slot {slot_id}: the server's file {raw_path} was kept (not converted): {e}") from e
    raw_path.unlink()  # only now: the .dkv is durable
    return SavedSlot(slot_id, int(answer.get("n_saved", -1)), len(raw), len(data), where, rope is not None)


@dataclass
class RestoredSlot:
    slot: int
    n_tokens: int
    dkv_bytes: int
    raw_bytes: int


def restore(server: LlamaServer, slot_id: int, slot_dir, data, source: str) -> RestoredSlot:
    """Restore slot ``slot_id`` from the .dkv bytes ``data`` (``source`` names them in messages)."""
    folder = _slot_dir(slot_dir)
    slot = _idle_slot(server, slot_id)
    with DkvSession.from_buffer(data, name=source) as session:
        if session.framing != Framing.SEQUENCE_FILE:
            raise SlotError(f"{source}: expected a slot session (converted from a sequence file, ggsq), found a "
                            f"{session.framing.value} one: load it with deltakv_runtime.load or deltakv restore")
        _check_model(server, session, source)
        n_ctx = int(slot.get("n_ctx") or 0)
        cells = max(session.stream_cells, default=0)
        if n_ctx and cells > n_ctx:
            raise SlotError(f"{source} holds {cells} cells, slot {slot_id} has n_ctx {n_ctx}: expected a slot "
                            "at least as large (start the server with a larger --ctx-size)")
        name = _temp_name(slot_id, "restore")
        raw_path = folder / name
        tmp = raw_path.with_name("." + name + ".part")
        raw_bytes = 0
        try:
            with open(tmp, "wb") as f:
                # its own framing (the sequence file the server wrote, appendix included), written as
                # the tracks are decoded: a few layers held at a time, not the whole state
                for chunk in iter_rebuilt_chunks(session):
                    raw_bytes += f.write(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    try:
        os.replace(tmp, raw_path)  # the server never sees a half-written file
        answer = server.slot_action(slot_id, "restore", name)
    finally:
        for leftover in (tmp, raw_path):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
    return RestoredSlot(slot_id, int(answer.get("n_restored", -1)), len(data), raw_bytes)


def _check_model(server: LlamaServer, session: DkvSession, source: str) -> None:
    saved_digest = session.file.value(KEY_SERVER_MODEL_DIGEST, None)
    if saved_digest is None:
        return  # converted by hand from a slot file: the server's own checks decide
    model = _server_model(server)
    if model is None:
        return
    if model_file_digest(model) != saved_digest:
        saved = session.file.value(KEY_SERVER_MODEL, "another model")
        raise SlotError(f"{source} was saved from {saved}, the server at {server.url} runs {model.name} "
                        "(another file): expected the model the slot was saved from")


@dataclass
class SlotRow:
    slot: int
    n_ctx: int
    tokens: int | None
    busy: bool


def slot_rows(server: LlamaServer) -> list[SlotRow]:
    return [SlotRow(int(s.get("id", -1)), int(s.get("n_ctx") or 0), s.get("n_prompt_tokens"), bool(s.get("is_processing")))
            for s in server.slots()]


@dataclass
class StoredSession:
    name: str
    size: int
    n_tokens: int | None
    model: str | None


def stored_sessions(where) -> list[StoredSession]:
    """The .dkv sessions of a folder or store URL, with their token count and the model they were saved from."""
    from deltakv_format.stores import StoreError, open_store

    store = open_store(str(where), create=False)
    found = []
    for info in sorted(store.list(), key=lambda info: info.name):
        if not info.name.endswith(".dkv"):
            continue
        try:
            with store.get(info.name) as data, DkvSession.from_buffer(data, name=store.locate(info.name)) as s:
                tokens = s.tokens()
                found.append(StoredSession(info.name, info.size, None if tokens is None else len(tokens),
                                           s.file.value(KEY_SERVER_MODEL, None)))
        except (DeltaKVError, StoreError, OSError):
            found.append(StoredSession(info.name, info.size, None, "(unreadable)"))
    return found
