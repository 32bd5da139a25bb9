"""A Flower ``Grid`` that delivers each message in process to the real ClientApp, through
Flower's own serialisation: Flower's message path without processes (tests only)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from ssfl.flower import client_app as client_module


class InMemoryGrid(Grid):
    """Delivers each message to the ClientApp of its node at once, through Flower's own
    serialisation (deflate/inflate), with one persistent Context per node as a SuperNode keeps."""

    def __init__(self, config_flat: dict, node_configs: list[dict]) -> None:
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=nc, state=RecordDict(),
                              run_config=dict(config_flat))
            for i, nc in enumerate(node_configs)
        }
        self.replies: dict[str, Message] = {}
        self.received: list[tuple[int, str]] = []

    def set_run(self, run):  # pragma: no cover - unused
        pass

    @property
    def run(self):  # pragma: no cover - unused
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    @staticmethod
    def _transport(message: Message) -> Message:
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
        return inflate_object_from_contents(message.object_id, contents)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            self.received.append((node, msg.metadata.message_type))
            delivered = self._transport(msg)
            delivered.metadata.__dict__["_message_id"] = msg.object_id
            reply = client_module.app(delivered, self.contexts[node])
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.replies[msg.object_id] = self._transport(reply)
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - unused
        return self.pull_messages(self.push_messages(messages))
