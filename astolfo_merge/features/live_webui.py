"""The WebUI's loaded model as a live-merge target (live.py), by its shape alone (no WebUI import).

A1111-shaped hosts hold the model as a `torch.nn.Module` (ldm's LatentDiffusion) with the
checkpoint it came from in `sd_checkpoint_info`; the text encoder is wrapped by the WebUI's hijack
(`cond_stage_model.wrapped.…`, `token_embedding.wrapped.weight`), whose names map back to the
checkpoint's keys by dropping `wrapped`. Forge hosts hold a `ForgeDiffusionEngine` whose weights
live in model patchers (`forge_objects`), loaded and offloaded by Forge's memory manager: writing
into them behind its back is not safe, so there the live merge is refused by name.

The mark: while a live merge is loaded, `sd_checkpoint_info` is a `MarkedCheckpointInfo` that
passes everything through to the real one but names the model "<name> [Merger] <recipe hash>"
(`name_for_extra`: the "Model:" field of every image's infotext). The WebUI replaces it with the
real info whenever it loads weights into the model, which is also how a live state notices that
the model no longer holds what it merged.
"""
from __future__ import annotations

import os

import torch

from .live_state import LiveState, LiveTarget

NOT_SUPPORTED = "not supported on this host"
_STATE_ATTR = "_astolfo_merge_live"


FORGE_REASON = (f"merging into the loaded model is {NOT_SUPPORTED}: Forge keeps the weights in its model "
                "patcher and moves them itself; merge to a file and load it instead")


def unsupported_reason(model, forge_host: bool = False) -> str | None:
    """Why `model` cannot take a live merge, or None when it can (`forge_host`: the host is a Forge)."""
    if forge_host or hasattr(model, "forge_objects"):
        return FORGE_REASON
    if model is None:
        return "no model is loaded yet: generate one image or pick a checkpoint first, then merge into it"
    if not isinstance(model, torch.nn.Module) or getattr(model, "sd_checkpoint_info", None) is None:
        return f"merging into the loaded model is {NOT_SUPPORTED}: its model is not a torch module with a checkpoint"
    if not getattr(_real_info(model), "filename", None) or not os.path.isfile(_real_info(model).filename):
        return "the loaded model's checkpoint file is gone, so a live merge could not be restored; load a checkpoint"
    return None


class MarkedCheckpointInfo:
    """The WebUI's CheckpointInfo of the loaded file, named with the live merge's label."""

    def __init__(self, info, label: str):
        self.astolfo_merge_original, self.astolfo_merge_label = info, label

    def __getattr__(self, name):
        return getattr(self.astolfo_merge_original, name)

    @property
    def name_for_extra(self) -> str:
        return f"{self.astolfo_merge_original.name_for_extra} {self.astolfo_merge_label}"


def _real_info(model):
    info = getattr(model, "sd_checkpoint_info", None)
    return getattr(info, "astolfo_merge_original", info)


class WebuiModelTarget(LiveTarget):
    """The loaded `model`; its live state is kept on the model while its info is the one we saw."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.checkpoint = os.path.abspath(_real_info(model).filename)
        self._names = None

    @property
    def state(self) -> LiveState | None:
        seen = getattr(self.model, _STATE_ATTR, None)
        if seen is None or seen[0] is not self.model.sd_checkpoint_info:
            return None          # weights loaded since (the WebUI set its own info): the file's values again
        return seen[1]

    @state.setter
    def state(self, state: LiveState):
        setattr(self.model, _STATE_ATTR, (self.model.sd_checkpoint_info, state))

    def names(self) -> dict:
        """canonical key -> the model's parameter/buffer name."""
        if self._names is None:
            own = state_dict_target_keys(self.model.state_dict(keep_vars=True))
            self._names = {key: name for name, key in own.items()}
        return self._names

    def tensors(self) -> dict:
        held = self.model.state_dict(keep_vars=True)
        return {key: held[name] for key, name in self.names().items()}

    def before_write(self, keys: list) -> None:
        names = self.names()
        release_network_backups(self.model, [names[k] for k in keys if k in names])

    def marked(self, state: LiveState) -> None:
        real = _real_info(self.model)
        self.model.sd_checkpoint_info = MarkedCheckpointInfo(real, state.label) if state.label else real
        setattr(self.model, _STATE_ATTR, (self.model.sd_checkpoint_info, state))


def live_label(model) -> str:
    """The loaded model's live-merge label ("" when it holds its checkpoint's own weights)."""
    return getattr(getattr(model, "sd_checkpoint_info", None), "astolfo_merge_label", "")


def state_dict_target_keys(names) -> dict:
    """Model parameter name -> canonical checkpoint key, for models whose modules wrap others under a
    `wrapped` attribute (the WebUI's text-encoder hijack: `cond_stage_model.wrapped.transformer…`,
    `token_embedding.wrapped.weight`)."""
    return {name: ".".join(part for part in name.split(".") if part != "wrapped") for name in names}


def release_network_backups(model: torch.nn.Module, names) -> int:
    """Make the WebUI's built-in LoRA (extensions-builtin/Lora/networks.py) forget the weights of the
    modules owning `names` (model parameter names) before a live merge writes them.

    networks.py keeps per module `network_weights_backup` / `network_bias_backup` (the weights before
    any LoRA) and `network_current_names` (the LoRAs applied now); it restores the backup whenever the
    LoRA set changes. Left alone after a live merge, that backup would undo the merge, and the merge
    would overwrite applied LoRA deltas that the module believes are still there. So each affected
    module first gets its backup back (no LoRA left in any of its tensors), then forgets backups and
    names: the next generation backs up the merged weights and applies its LoRAs once, on top.
    Returns the number of modules reset."""
    owners = {}
    for name in names:
        parts = name.split(".")
        for depth in (1, 2):     # the owner, and its parent (a MultiheadAttention owns out_proj.weight's backup)
            if len(parts) > depth:
                owners.setdefault(".".join(parts[:-depth]), None)
    count = 0
    with torch.no_grad():
        for path in owners:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if _release(module):
                count += 1
    return count


def _release(module) -> bool:
    if not any(hasattr(module, a) for a in ("network_current_names", "network_weights_backup", "network_bias_backup")):
        return False
    weights, bias = getattr(module, "network_weights_backup", None), getattr(module, "network_bias_backup", None)
    if getattr(module, "network_current_names", ()):
        if isinstance(module, torch.nn.MultiheadAttention):
            if weights is not None:
                module.in_proj_weight.copy_(weights[0])
                module.out_proj.weight.copy_(weights[1])
            if bias is not None:
                module.out_proj.bias.copy_(bias)
        else:
            if weights is not None:
                module.weight.copy_(weights)
            if bias is not None and getattr(module, "bias", None) is not None:
                module.bias.copy_(bias)
    module.network_current_names = ()
    module.network_weights_backup = None
    module.network_bias_backup = None
    return True
