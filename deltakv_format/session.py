"""A llama.cpp state stored in a .dkv container: the mapping of SPEC.md, "Session layout".

The names programs use, from the modules that hold them (one concern each):

- :mod:`.session_schema`: the key-value table, tensor names and :class:`TrackId` (SPEC.md section 3);
- :mod:`.session_writer`: ``write_session`` stores a parsed :class:`LlamaState` with a codec;
- :mod:`.session_reader`: ``DkvSession`` opens a .dkv, decodes any track or token range, and rebuilds
  the state;
- :mod:`.session_append`: ``append_session`` extends a stored session with the rows of a newer state
  of the same context, writing only the new rows (plus the re-encoded last partial keyframe chunk);
- :mod:`.session_tracks`, :mod:`.session_cells`, :mod:`.session_sizes`: tracks, cell records and
  segment ownership, size accounting.
"""

from .session_append import append_session, first_differing_cell, rewrite_session
from .session_cells import assemble_cells, cell_record_ends, owned_spans
from .session_reader import DkvSession
from .session_schema import SESSION_KEYS, TrackId
from .session_tracks import Track
from .session_writer import WrittenSession, codecs_of_roles, rope_for_state, session_bytes, write_session

__all__ = [
    "SESSION_KEYS",
    "DkvSession",
    "Track",
    "TrackId",
    "WrittenSession",
    "append_session",
    "assemble_cells",
    "cell_record_ends",
    "first_differing_cell",
    "owned_spans",
    "rewrite_session",
    "session_bytes",
    "write_session",
    "rope_for_state",
    "codecs_of_roles",
]
