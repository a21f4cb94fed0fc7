"""The shared vocabulary of the stack: messages, codec, endpoints, config, logs.

supervisor, worker and learner import this package and never each other.
"""

from protocol.messages import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
