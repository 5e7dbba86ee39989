"""The importer's one exception, shaped as ComfyUI's `/prompt` refusal.

ComfyUI answers an invalid prompt with `{"error": {...}, "node_errors": {node_id: {"errors":
[{"type", "message", "details", "extra_info": {"input_name", ...}}], "dependent_outputs":
[...], "class_type": ...}}}`; `ComfyImportError.response()` is that body, so a front end
that shows ComfyUI's errors shows ours.
"""

from __future__ import annotations

import math
from typing import Any


def node_error(type_: str, message: str, details: str = "", input_name: str | None = None,
               received: Any = None) -> dict:
    """One entry of a node's `errors` list, as ComfyUI writes it."""
    extra: dict[str, Any] = {}
    if input_name is not None:
        extra["input_name"] = input_name
    if isinstance(received, (str, int, float)) and not (isinstance(received, float) and not math.isfinite(received)):
        extra["received_value"] = received[:200] if isinstance(received, str) else received
    return {"type": type_, "message": message, "details": details, "extra_info": extra}


class ComfyImportError(ValueError):
    """A graph the importer refuses. `node_errors`: ComfyUI's shape, keyed by node id;
    `error`: the top-level error (`prompt_outputs_failed_validation` when nodes are at fault,
    `prompt_no_outputs`, `invalid_prompt`, ...)."""

    def __init__(self, node_errors: dict[str, dict] | None = None, error: dict | None = None):
        self.node_errors = node_errors or {}
        self.error = error or node_error("prompt_outputs_failed_validation", "Prompt outputs failed validation")
        super().__init__(self._summary())

    def response(self) -> dict:
        """The body ComfyUI's POST /prompt answers with (status 400)."""
        return {"error": self.error, "node_errors": self.node_errors}

    def _summary(self) -> str:
        lines = [self.error["message"] + (f": {self.error['details']}" if self.error.get("details") else "")]
        for node_id, entry in self.node_errors.items():
            for err in entry["errors"]:
                where = err["extra_info"].get("input_name")
                where = f" input {where!r}" if where else ""
                details = f" ({err['details']})" if err["details"] else ""
                lines.append(f"node {node_id} ({entry['class_type']}){where}: {err['type']}: {err['message']}{details}")
        return "\n".join(lines)


class Collector:
    """Node errors gathered over a pass, raised together (ComfyUI reports every node at fault)."""

    def __init__(self, graph: dict, dependents: dict[str, list[str]] | None = None):
        self.graph, self.dependents = graph, dependents or {}
        self.errors: dict[str, dict] = {}

    def add(self, node_id: str, type_: str, message: str, details: str = "", input_name: str | None = None,
            received: Any = None) -> None:
        node = self.graph.get(node_id)
        class_type = node.get("class_type", "") if isinstance(node, dict) else ""
        entry = self.errors.setdefault(node_id, {"errors": [], "dependent_outputs": list(self.dependents.get(node_id, [])),
                                                 "class_type": class_type})
        entry["errors"].append(node_error(type_, message, details, input_name, received))

    def raise_if_any(self) -> None:
        if self.errors:
            raise ComfyImportError(self.errors)

    def fail(self, node_id: str, type_: str, message: str, details: str = "", input_name: str | None = None,
             received: Any = None):
        """Add one error and raise everything gathered so far."""
        self.add(node_id, type_, message, details, input_name, received)
        raise ComfyImportError(self.errors)
