"""The wire protocol: the one leaf package every LegoDiffusion process imports.

It owns every command, message type, error code and limit, the node task kinds with
their typed parameters (`tasks.py`), and the codec that turns
a typed message plus raw tensor buffers into ZeroMQ frames and back. It imports
nothing else of ours (and no torch: `tensors.py` loads torch only when a torch
tensor is packed). No pickle anywhere.
"""

from broker.protocol.codec import decode, encode, undecodable_batch_id
from broker.protocol.constants import PROTOCOL_TAG, Command, Limits
from broker.protocol.errors import ErrorCode, ProtocolError
from broker.protocol.messages import *  # noqa: F403 (the message classes are the API)
from broker.protocol.messages import __all__ as _message_names
from broker.protocol.tasks import *  # noqa: F403 (task kinds and their params structs)
from broker.protocol.tasks import __all__ as _task_names

__all__ = [
    "PROTOCOL_TAG",
    "Command",
    "ErrorCode",
    "Limits",
    "ProtocolError",
    "decode",
    "encode",
    "undecodable_batch_id",
    *_message_names,
    *_task_names,
]
