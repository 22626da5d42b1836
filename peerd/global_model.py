"""The trained global model as a file: written by `peerd sim` and `peerd cluster` at every
evaluation, and handed to the user by `peerd export`.

At each evaluation the assembled full model that was just scored goes to OUT/model.safetensors:
its whole `state_dict` (parameters and buffers, e.g. BatchNorm running statistics), so that the
model's own class loads it with `load_state_dict(..., strict=True)` and scores exactly the
`global_acc` of that round. The header's metadata names the task and the round, and
`peerd export` refuses a file whose round is not metrics.jsonl's last evaluated one. No pickle:
safetensors holds raw tensors only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peerd.ops.report import read_jsonl

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"


class ExportError(ValueError):
    """What `peerd export` needs is missing or does not fit; the message names it."""


def save_global_model(out: Path, module: nn.Module, round_number: int,
                      figures: dict[str, float | list[float]], task: str) -> Path:
    """OUT/model.safetensors: `module`'s state_dict, replaced atomically (a reader never sees
    half a file)."""
    return write_model_file(out / MODEL_FILE, module, task, round_number,
                            figures.get("global_acc"))


def write_model_file(path: Path, module: nn.Module, task: str, round_number: int,
                     global_acc: object) -> Path:
    """`module`'s state_dict at `path` with the task, round and global_acc as metadata,
    replaced atomically."""
    # Copies: safetensors refuses tensors that share storage, and views of a larger tensor.
    state = {name: tensor.detach().clone().contiguous()
             for name, tensor in module.state_dict().items()}
    metadata = {"task": task, "round": str(round_number), "global_acc": json.dumps(global_acc)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    task: str
    round_number: int
    global_acc: float | None
    tensors: int
    values: int


def last_evaluation(run_dir: Path) -> dict:
    """metrics.jsonl's last record that evaluated the global model."""
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise ExportError(f"{run_dir} has no {METRICS_FILE}: not a `peerd sim` or "
                          f"`peerd cluster` output directory")
    evaluated = [record for record in read_jsonl(metrics, ("round", "global_acc"))
                 if record["global_acc"] is not None]
    if not evaluated:
        raise ExportError(f"{metrics} has no evaluated round yet (no global_acc)")
    return evaluated[-1]


def export_model(run_dir: Path, destination: Path) -> ExportedModel:
    """Check OUT/model.safetensors against OUT/metrics.jsonl and every tensor for finite
    values (one tensor in memory at a time), then copy it to `destination` byte for byte."""
    if not run_dir.is_dir():
        raise ExportError(f"no such directory: {run_dir}")
    record = last_evaluation(run_dir)
    source = run_dir / MODEL_FILE
    if not source.is_file():
        raise ExportError(f"{run_dir} has no {MODEL_FILE}: the run was made by a peerd that did "
                          f"not write its model; run it again")
    try:
        with safe_open(str(source), framework="pt") as model:
            metadata = model.metadata() or {}
            round_text = metadata.get("round", "")
            round_number = int(round_text) if round_text.isdigit() else -1
            if round_number != record["round"]:
                raise ExportError(
                    f"{source} holds the model of round {round_number}, but the last evaluated "
                    f"round in {run_dir / METRICS_FILE} is {record['round']} (the run stopped "
                    f"between the two writes); run it again")
            names = list(model.keys())
            values = 0
            for name in names:
                tensor = model.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ExportError(f"{source}: tensor {name} has values that are not finite")
                values += tensor.numel()
    except (OSError, SafetensorError) as error:
        raise ExportError(f"{source} is not a readable safetensors file: {error}") from None
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, destination)
    acc = record.get("global_acc")
    return ExportedModel(destination, metadata.get("task", record.get("task", "?")),
                         round_number, None if acc is None or not math.isfinite(acc) else acc,
                         len(names), values)
