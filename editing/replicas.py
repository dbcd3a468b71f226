"""Target loops spread over several devices (``z_devices``), each holding a full copy of the model.

Target loops never interact (separate rows, separate deltas), so they can run at the same time on
different GPUs: every device listed in ``z_devices`` gets a replica of the model with the current
weights (copied again at every call, since the weights change after every round), and one thread per
device runs that device's share of the loops. GPU kernels release Python's lock, so the devices work
concurrently; the values equal those of one device up to float rounding.
"""
from __future__ import annotations

import copy
import logging
import weakref
from typing import Dict, List, Sequence

import torch

from util.errors import SettingError

LOG = logging.getLogger(__name__)

# model -> {device string: replica}; replicas live as long as their model.
_REPLICAS: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[str, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def loop_devices(model: torch.nn.Module, names: Sequence[str]) -> List[torch.device]:
    """The devices of ``names`` (``z_devices``), checked against the model and the machine."""
    devices = [torch.device(name) for name in names]
    # "cuda" is the current GPU, the same device as "cuda:<its index>"
    devices = [torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None
               and torch.cuda.is_available() else d for d in devices]
    if len(devices) < 2:
        return devices
    weight_devices = {p.device for p in model.parameters()}
    if len(weight_devices) > 1:
        raise SettingError(
            f"z_devices needs the model on one device to replicate it, but its weights are on "
            f"{sorted(map(str, weight_devices))} (device_map sharding); remove z_devices from the hparams"
        )
    for device in devices:
        if device.type == "cuda":
            index = device.index if device.index is not None else 0
            if index >= torch.cuda.device_count():
                raise SettingError(
                    f"z_devices lists '{device}' but this machine has {torch.cuda.device_count()} CUDA "
                    "device(s); list devices that exist, or remove z_devices to use the model's device"
                )
    return devices


def split_for_devices(loops: Sequence[Sequence[int]], n_devices: int, splittable: bool) -> List[List[int]]:
    """With fewer loops than devices, split each loop into ``n_devices`` near-equal parts (allowed when
    every request has its own delta: a loop is then only a batch); else keep the loops as they are."""
    loops = [list(loop) for loop in loops]
    if not splittable or len(loops) >= n_devices:
        return loops
    parts = []
    for loop in loops:
        size = -(-len(loop) // n_devices)
        parts.extend(loop[start:start + size] for start in range(0, len(loop), size))
    return parts


def assign_loops(loops: Sequence[Sequence[int]], n_devices: int) -> List[List[int]]:
    """Loop indices per device, balanced by requests: largest loop first, to the least loaded device."""
    shares: List[List[int]] = [[] for _ in range(n_devices)]
    load = [0] * n_devices
    for k in sorted(range(len(loops)), key=lambda k: -len(loops[k])):
        device = min(range(n_devices), key=lambda d: (load[d], d))
        shares[device].append(k)
        load[device] += len(loops[k])
    return [sorted(share) for share in shares]


@torch.no_grad()
def replicas_for(model: torch.nn.Module, devices: Sequence[torch.device]) -> List[torch.nn.Module]:
    """One model per entry of ``devices``: the model itself for the first entry on its own device, else
    a copy on that device holding the model's current weights (kept between calls, refreshed each call).
    Every entry gets a model of its own, so that no two threads put hooks on the same modules."""
    home = next(model.parameters()).device
    own = next((i for i, device in enumerate(devices) if device == home), None)
    replicas = _REPLICAS.setdefault(model, {})
    weights = model.state_dict()
    models = []
    for i, device in enumerate(devices):
        if i == own:
            models.append(model)
            continue
        key = f"{i}:{device}"
        replica = replicas.get(key)
        if replica is None:
            LOG.info("copying the model to %s for its share of the target loops", device)
            replica = _copy_to(model, device)
            replicas[key] = replica
        else:
            mine = replica.state_dict()
            for name, tensor in weights.items():
                mine[name].copy_(tensor)
        models.append(replica)
    return models


def _copy_to(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A deep copy of ``model`` whose weights and buffers are made directly on ``device`` (never a second full
    copy on the model's own device); tied weights stay tied."""
    memo = {}
    for parameter in model.parameters():
        memo[id(parameter)] = torch.nn.Parameter(parameter.detach().to(device, copy=True),
                                                 requires_grad=parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().to(device, copy=True)
    return copy.deepcopy(model, memo)
