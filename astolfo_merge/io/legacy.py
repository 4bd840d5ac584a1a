"""Legacy `.ckpt` / `.pt` / `.pth` checkpoints: their tensors, loaded only through the weights-only unpickler.

They go only through `torch.load(weights_only=True, mmap=True)`: no arbitrary unpickling. A file it
refuses is described in our words, its pickle's globals read without unpickling it.
"""
from __future__ import annotations

import pickle
import warnings

import torch

from ..errors import CheckpointError


def legacy_state_dict(path):
    with warnings.catch_warnings():   # torch warns about pickle protocols: our message says it all
        warnings.simplefilter("ignore")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            try:  # legacy (non-zip) serialisation cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
                raise CheckpointError(path, _legacy_refusal(path, exc)) from None
        except Exception as exc:  # noqa: BLE001 - the weights-only unpickler refuses code
            raise CheckpointError(path, _legacy_refusal(path, exc)) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a pickled {type(obj).__name__}, not a state dict of tensors: not a checkpoint")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


NOT_A_CHECKPOINT = "is not a safetensors or PyTorch (.ckpt/.pt) checkpoint, or it is damaged"
SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.set", "_codecs.encode", "numpy.")


def _legacy_refusal(path, exc) -> str:
    """Our words for torch.load's failure (its own text tells the user how to bypass the safety check)."""
    if not isinstance(exc, pickle.UnpicklingError) or "weights only" not in str(exc).lower():
        return NOT_A_CHECKPOINT
    found = _pickle_globals(path)
    if found is None:
        return NOT_A_CHECKPOINT
    unsafe = [g for g in found if not g.startswith(SAFE_GLOBALS)]
    example = f" (e.g. {unsafe[0][:80]})" if unsafe else ""
    return (f"contains Python objects beyond tensors{example}; refusing to unpickle it (unsafe). "
            "Convert it with a trusted tool or use a .safetensors file")


def _pickle_globals(path):
    """The `module.name` globals a legacy checkpoint's pickle refers to, read without unpickling it
    (pickletools only decodes opcodes); None if it is no well-formed pickle (then: not a checkpoint)."""
    import pickletools
    import zipfile
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if name is None:
                    return None
                data = archive.read(name)
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)
        found, strings = [], []
        for op, arg, _pos in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return found
    except Exception:  # noqa: BLE001 - any decoding failure: not a pickle we can describe
        return None
