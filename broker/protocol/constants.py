"""Protocol tag, command codes and the limits every receiver checks before decoding."""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Bumped on any incompatible change; a peer speaking another version is refused.
PROTOCOL_TAG = b"LEGO/1"


class Command(bytes, enum.Enum):
    """One command per message; the value is the command frame on the wire."""

    # peer (actor or node agent) <-> broker, on the broker's backend socket
    ACTOR_HELLO = b"AHLO"
    AGENT_HELLO = b"GHLO"
    WELCOME = b"WLCM"
    HEARTBEAT = b"HBEAT"
    CREDIT = b"CRED"
    TASKS = b"TASK"
    BATCH_DONE = b"DONE"
    BATCH_FAILED = b"BFAIL"
    FREE = b"FREE"
    DISCONNECT = b"DISC"
    SPAWN_ACTOR = b"SPWN"
    STOP_ACTOR = b"STOP"
    AGENT_EVENT = b"AEVT"
    # actor <-> actor, on the holder's data socket
    FETCH = b"FTCH"
    FETCH_REPLY = b"FRPL"
    # client <-> broker, on the broker's frontend socket
    SUBMIT = b"SUBM"
    ACCEPTED = b"ACPT"
    REJECTED = b"RJCT"
    PROGRESS = b"PROG"
    RESULT = b"RSLT"
    FAILED = b"FAIL"
    CANCEL = b"CNCL"
    LIST_WORKFLOWS = b"LSWF"
    WORKFLOWS = b"WFLS"
    GET_STATS = b"STAT"
    STATS = b"STRP"
    ADMIN_SPAWN = b"ASPN"
    ADMIN_REPLY = b"ARPL"
    ADMIN_STOP = b"ASTP"
    ADMIN_CONFIGURE = b"ACFG"
    ADMIN_DRAIN = b"ADRN"
    ADMIN_REPLICAS = b"ARPS"
    ADMIN_PAUSE = b"APAU"
    ADMIN_REGISTER = b"AREG"
    # any direction: a typed error about one message
    ERROR = b"ERR"


COMMANDS_BY_VALUE = {c.value: c for c in Command}
MAX_SEED = 2**63 - 1  # a request's seed: what torch.Generator.manual_seed takes
MAX_CREDITS = 1024  # batches one actor may ask the broker to queue for it

# Request constants. A tensor whose name starts with this prefix is the same tensor in
# every bundle of its request that holds it: the conditioning a base model's step 0
# builds from the text encoders' outputs (prompt embeddings, pooled embeddings, time
# ids) and hands on, unchanged, with every later step's latents. So an actor that has
# fetched it once for a request keeps it, and asks peers to leave it out of later
# replies (`Fetch.omit`): conditioning crosses to each actor once per request, not
# with every step. Backends must never name anything else with this prefix.
REQUEST_CONSTANT_PREFIX = "cond/"
MAX_OMITTED = 64  # names one FETCH may ask to leave out: a bundle holds a handful


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds checked on every received message before any byte is decoded."""

    max_frames: int = 4096
    max_header_bytes: int = 4 * 1024 * 1024
    # The largest tensor a peer sends whole: a 4096x4096 RGB image is 48 MiB, a latent
    # or conditioning bundle a few MiB. Sockets that receive payloads set ZeroMQ's
    # MAXMSGSIZE to this, so a larger frame is refused before it is buffered.
    max_frame_bytes: int = 256 * 1024**2
    max_payload_bytes: int = 1024**3
    # msgpack nesting/containers in a header: beyond these a peer is misbehaving.
    max_container_len: int = 100_000
    max_str_len: int = 1024 * 1024


DEFAULT_LIMITS = Limits()
