"""Small predicates over Dynamo-level FX nodes (torch IR: torch functions, Tensor methods,
operator.*), shared by the passes. Each answers one question about one node; set_fake_meta
keeps the meta of a node a pass creates true."""

from __future__ import annotations

import contextlib
import operator
import re
from typing import Any, Optional

import torch
from torch.fx import Node

LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear}
ADD_TARGETS = {operator.add, operator.iadd, torch.add}
MUL_TARGETS = {operator.mul, torch.mul}
MATMUL_TARGETS = {operator.matmul, torch.matmul}
DROPOUT_TARGETS = {torch.nn.functional.dropout}
_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type"}


def is_call(node: Any, targets: set, methods: tuple[str, ...] = ()) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function" and node.target in targets:
        return True
    return node.op == "call_method" and node.target in methods


def is_add(node: Any) -> bool:
    return is_call(node, ADD_TARGETS, ("add", "add_")) and len(node.args) == 2 and not node.kwargs


def is_mul(node: Any) -> bool:
    return is_call(node, MUL_TARGETS, ("mul",)) and len(node.args) == 2 and not node.kwargs


def is_linear(node: Any) -> bool:
    return is_call(node, LINEAR_TARGETS)


def is_matmul(node: Any) -> bool:
    return is_call(node, MATMUL_TARGETS, ("matmul",))


def is_dropout(node: Any) -> bool:
    return is_call(node, DROPOUT_TARGETS)


def is_transpose_2d(node: Any) -> bool:
    """t(), .T, .mT, transpose(0, 1) of a 2-D tensor."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_method" and node.target == "t":
        return True
    if node.op == "call_function" and node.target is torch.t:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return True
    if node.op == "call_method" and node.target == "transpose":
        dims = {d % 2 for d in node.args[1:3]} if all(isinstance(d, int) for d in node.args[1:3]) else set()
        return dims == {0, 1}
    return False


def cast_dtype(node: Any) -> Optional[torch.dtype]:
    """The dtype a pure dtype cast converts to (x.to(dtype), x.float(), ...), else None.

    A `.to` that also moves devices or copies is not a pure cast and returns None."""
    if not isinstance(node, Node) or node.op != "call_method" or node.target not in _CAST_METHODS:
        return None
    value = example_value(node)
    source = example_value(node.args[0])
    if not isinstance(value, torch.Tensor) or not isinstance(source, torch.Tensor):
        return None
    if value.device != source.device or value.shape != source.shape:
        return None
    return value.dtype


def is_cast_of(node: Any, root: Node) -> bool:
    """node is root, or root through pure dtype casts."""
    while node is not root and cast_dtype(node) is not None:
        node = node.args[0]
    return node is root


def example_value(node: Any) -> Any:
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def requires_grad(node: Any) -> bool:
    value = example_value(node)
    return isinstance(value, torch.Tensor) and value.requires_grad


def is_param_like(node: Any) -> bool:
    """A graph input or attribute: where Dynamo puts parameters and buffers."""
    return isinstance(node, Node) and node.op in ("placeholder", "get_attr")


_MODULE_PATH_CLEANUPS = [
    (re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]"), r".\1"),
    (re.compile(r"^L\['(self|fn|mod|model)'\]\.?"), ""),
    (re.compile(r"^L\['(\w+)'\]\.?"), r"\1."),
    (re.compile(r"\._modules\['([^']+)'\]"), r".\1"),
    (re.compile(r"\['([^']+)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
]


def clean_module_path(path: str) -> str:
    for pattern, replacement in _MODULE_PATH_CLEANUPS:
        path = pattern.sub(replacement, path)
    return path.strip(".") or "<root>"


def module_stack(node: Node) -> list[tuple[str, str]]:
    """[(clean module path, qualified class name)] from outermost to innermost."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        out.append((clean_module_path(path), name))
    return out


def module_path(node: Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack else "<root>"


def single_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def set_fake_meta(node: Node, like: Node) -> None:
    """Keep node.meta['example_value'/'val'] true on a node a pass creates: run it on the fake
    values of its inputs; module stack and source come from `like`, the node it stands in for."""
    if node.op not in ("call_function", "call_method") or "example_value" in node.meta:
        return
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), example_value)
    fake_modes = [v.fake_mode for v in map(example_value, node.all_input_nodes) if hasattr(v, "fake_mode")]
    with fake_modes[0] if fake_modes else contextlib.nullcontext():
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
    node.meta["example_value"] = value
    node.meta["val"] = value
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
