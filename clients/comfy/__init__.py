"""ComfyUI graphs imported as catalog workflows (`lego workflows import`).

`import_graph(graph, name=..., models_dir=..., catalog=...)` reads a graph in ComfyUI's
API format ("Save (API)") or UI format (a saved or shared workflow), resolves its model
files in a ComfyUI-style models folder and returns an `ImportedWorkflow`: the TOML of its
[models.*], [adapters.*] and [workflows.*] entries and the request defaults that reproduce
the graph. What the workflow cannot express is refused with a `ComfyImportError` whose
`node_errors` have ComfyUI's shape. docs/comfy.md describes the mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

from clients.comfy.compile import ImportedWorkflow, import_graph
from clients.comfy.errors import ComfyImportError, node_error
from clients.comfy.graph import is_ui_format, to_api
from clients.comfy.samplers import TABLE as SAMPLER_TABLE


def load_graph(path: str | Path) -> dict:
    """A graph file (.json, either format) as a dict; ComfyImportError if it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ComfyImportError(error=node_error("invalid_prompt", f"Cannot read the graph {path}", str(exc))) from None


__all__ = ["ComfyImportError", "ImportedWorkflow", "SAMPLER_TABLE", "import_graph", "is_ui_format", "load_graph",
           "to_api"]
