"""ComfyUI graphs: the UI format converted to the API format, and the API format checked.

API format ("Save (API)"): `{node_id: {"class_type": ..., "inputs": {name: literal |
[node_id, output_index]}}}`. UI format (a saved or shared workflow): `{"nodes": [...],
"links": [[id, from_node, from_slot, to_node, to_slot, type], ...], ...}`; widget values
are mapped to input names through the per-class widget order of `nodes.NODES`, as the
front end does; `Reroute` links pass through, a `PrimitiveNode`'s value becomes the literal
of the inputs it feeds, notes and groups are dropped, muted nodes (mode 2) left out.
"""

from __future__ import annotations

import math
from typing import Any

from clients.comfy.errors import Collector, ComfyImportError, node_error
from clients.comfy.nodes import CONTROL_AFTER_GENERATE, NODES, OUTPUT_NODES

MUTED, BYPASSED = 2, 4  # LiteGraph node modes


def is_ui_format(graph: Any) -> bool:
    return isinstance(graph, dict) and isinstance(graph.get("nodes"), list) and "links" in graph


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool) \
        and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)


def to_api(graph: dict) -> dict:
    """A graph in the API format: returned as is (ids as strings) or converted from the UI format."""
    if is_ui_format(graph):
        try:
            return _ui_to_api(graph)
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
            if isinstance(exc, ComfyImportError):
                raise
            raise ComfyImportError(error=node_error("invalid_prompt", "Malformed UI-format graph",
                                                    f"{type(exc).__name__}: {exc}")) from None
    if not isinstance(graph, dict) or not graph:
        raise ComfyImportError(error=node_error("invalid_prompt", "Graph is neither ComfyUI's API format nor its UI format",
                                                "expected {node_id: {class_type, inputs}} or {nodes, links}"))
    return {str(k): v for k, v in graph.items()}


def _links(graph: dict) -> dict[int, tuple[int, int, int, int]]:
    """link id -> (origin node, origin slot, target node, target slot)."""
    out = {}
    for link in graph.get("links") or []:
        if isinstance(link, dict):
            link = [link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot")]
        if isinstance(link, list) and len(link) >= 5 and all(isinstance(v, (int, str)) for v in link[:5]):
            out[link[0]] = (link[1], link[2], link[3], link[4])
    return out


def _ui_to_api(graph: dict) -> dict:
    nodes = {node.get("id"): node for node in graph["nodes"]
             if isinstance(node, dict) and isinstance(node.get("id"), (int, str)) and not isinstance(node.get("id"), bool)}
    links = _links(graph)
    api: dict[str, dict] = {}
    errors = Collector({str(i): {"class_type": n.get("type", "")} for i, n in nodes.items()})
    missing = object()

    def origin(link_id: int, depth: int = 0):
        """The input's value: [node_id, slot] (through reroutes), a primitive's literal, or `missing`."""
        if not isinstance(link_id, (int, str)) or link_id not in links or depth > len(nodes):
            return missing
        node_id, slot, _, _ = links[link_id]
        source = nodes.get(node_id)
        if source is None:
            return [str(node_id), slot]  # a link to a node that is not there: the API check names it
        if source.get("mode") == MUTED:
            return missing
        if source.get("type") == "Reroute":
            inputs = source.get("inputs") or []
            return origin(inputs[0].get("link"), depth + 1) if inputs and inputs[0].get("link") is not None else missing
        if source.get("type") == "PrimitiveNode":
            values = source.get("widgets_values") or []
            return values[0] if values else missing
        return [str(node_id), slot]

    for node_id, node in nodes.items():
        class_type = node.get("type", "")
        if not isinstance(class_type, str):
            errors.add(str(node_id), "invalid_prompt", "Node has no type", f"type: {class_type!r:.100}")
            continue
        if class_type in ("Reroute", "PrimitiveNode", "Note", "MarkdownNote") or node.get("mode") == MUTED:
            continue
        key = str(node_id)
        if node.get("mode") == BYPASSED:
            errors.add(key, "unsupported_node", "Bypassed nodes are not supported",
                       "un-bypass the node or remove it from the graph")
            continue
        inputs: dict[str, Any] = {}
        spec = NODES.get(class_type)
        values = node.get("widgets_values")
        if spec is not None and isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in spec.inputs})
        elif spec is not None and values is not None and not isinstance(values, list):
            errors.add(key, "invalid_widgets", "widgets_values must be a list", f"widgets_values: {values!r:.100}")
            continue
        elif spec is not None and values:
            table = list(spec.widgets)
            if None in table and table.index(None) < len(values) and class_type != "LoadImage":
                at = table.index(None)  # control_after_generate: saved by the front end, but not always
                if values[at] not in CONTROL_AFTER_GENERATE:
                    table.pop(at)
            table += list(spec.extra_widgets)
            if len(values) > len(table):
                errors.add(key, "invalid_widgets", f"{len(values)} widget values, {class_type} has {len(table)} widgets",
                           f"widgets_values: {values!r}")
                continue
            inputs.update({name: value for name, value in zip(table, values, strict=False) if name is not None})
        for entry in node.get("inputs") or []:
            if not isinstance(entry, dict) or entry.get("link") is None:
                continue
            value = origin(entry["link"])
            if value is missing:
                inputs.pop(entry.get("name"), None)
            else:
                inputs[entry.get("name")] = value
        api[key] = {"class_type": class_type, "inputs": inputs}
    errors.raise_if_any()
    return api


def outputs_of(api: dict) -> list[str]:
    return [node_id for node_id, node in api.items() if isinstance(node, dict) and node.get("class_type") in OUTPUT_NODES]


def dependents(api: dict, outputs: list[str]) -> dict[str, list[str]]:
    """node id -> the output nodes whose result depends on it (ComfyUI's `dependent_outputs`)."""
    out: dict[str, list[str]] = {}
    for output in outputs:
        stack, seen = [output], set()
        while stack:
            node_id = stack.pop()
            if node_id in seen or node_id not in api:
                continue
            seen.add(node_id)
            out.setdefault(node_id, []).append(output)
            inputs = api[node_id].get("inputs") if isinstance(api[node_id], dict) else None
            for value in (inputs or {}).values():
                if is_link(value):
                    stack.append(str(value[0]))
    return out


def validate(api: dict) -> tuple[list[str], dict[str, list[str]]]:
    """Check the graph as ComfyUI's `validate_prompt` does, for the nodes the outputs need;
    returns (output node ids, dependents). Raises ComfyImportError with every node at fault."""
    collector = Collector(api)
    for node_id, node in api.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            collector.add(node_id, "invalid_prompt", "Node has no class_type", f"node {node_id}: {node!r:.200}")
        elif not isinstance(node.get("inputs", {}), dict):
            collector.add(node_id, "invalid_prompt", "Node inputs must be a map of input name to value")
    collector.raise_if_any()
    outputs = outputs_of(api)
    if not outputs:
        raise ComfyImportError(error=node_error("prompt_no_outputs", "Prompt has no outputs",
                                                "the graph needs a SaveImage or PreviewImage node"))
    deps = dependents(api, outputs)
    collector = Collector(api, deps)
    for node_id, node in api.items():
        class_type = node["class_type"]
        if class_type not in NODES:
            collector.add(node_id, "unsupported_node", f"Node type {class_type!r} is not supported",
                          f"supported: {', '.join(sorted(NODES))}")
            continue
        if node_id not in deps:
            continue  # ComfyUI runs only what an output needs
        for name, spec in NODES[class_type].inputs.items():
            inputs = node.get("inputs", {})
            if name not in inputs:
                if not spec.optional:
                    collector.add(node_id, "required_input_missing", "Required input is missing", name, name)
                continue
            _check_input(api, collector, node_id, name, spec, inputs[name])
    collector.raise_if_any()
    return outputs, deps


def _check_input(api: dict, collector: Collector, node_id: str, name: str, spec, value: Any) -> None:
    if is_link(value):
        source_id, slot = str(value[0]), value[1]
        source = api.get(source_id)
        if source is None:
            collector.add(node_id, "bad_linked_input", "Linked node does not exist",
                          f"{name}: node {source_id} is not in the graph", name, value)
            return
        source_spec = NODES.get(source["class_type"])
        if source_spec is None:
            return  # reported on that node
        if not 0 <= slot < len(source_spec.outputs):
            collector.add(node_id, "bad_linked_input", "Linked output does not exist",
                          f"{name}: {source['class_type']} (node {source_id}) has {len(source_spec.outputs)} "
                          f"outputs, index {slot} asked", name, value)
            return
        received = source_spec.outputs[slot]
        expected = spec.type if spec.is_link else {"FILE": "COMBO"}.get(spec.type, spec.type)
        if received != expected:
            collector.add(node_id, "return_type_mismatch", "Return type mismatch between linked nodes",
                          f"{name}, received_type({received}) mismatch input_type({expected})", name, value)
        return
    if spec.is_link:
        collector.add(node_id, "invalid_input_type", f"Input must be a link to a {spec.type} output",
                      f"{name}: got the literal {value!r:.100}", name, value)
        return
    kind = spec.type
    ok = {"INT": isinstance(value, int) or (isinstance(value, float) and value.is_integer()),
          "FLOAT": isinstance(value, (int, float)) and math.isfinite(value),
          "STRING": isinstance(value, str), "COMBO": isinstance(value, str), "FILE": isinstance(value, str) and value,
          "BOOLEAN": isinstance(value, bool)}[kind]
    if isinstance(value, bool) and kind != "BOOLEAN":
        ok = False
    if not ok:
        collector.add(node_id, "invalid_input_type", f"Failed to convert an input value to a {kind} value",
                      f"{name}, {value!r:.100}", name, value)
        return
    if kind == "INT" and isinstance(value, float):
        value = api[node_id]["inputs"][name] = int(value)  # as ComfyUI converts it
    if spec.min is not None and value < spec.min:
        collector.add(node_id, "value_smaller_than_min", f"Value {value} smaller than min of {spec.min}",
                      f"{name}", name, value)
    elif spec.max is not None and value > spec.max:
        collector.add(node_id, "value_bigger_than_max", f"Value {value} bigger than max of {spec.max}",
                      f"{name}", name, value)
    elif spec.choices is not None and value not in spec.choices:
        collector.add(node_id, "value_not_in_list", "Value not in list",
                      f"{name}: '{value}' not in {list(spec.choices)}", name, value)
