"""Importing released weights: Vchitect-2.0 checkpoints and SD3 image transformers.

Only safetensors files are read (never pickle). ``path`` may be a ``.safetensors`` file, a folder
holding ``diffusion_pytorch_model.safetensors`` (or its sharded ``…safetensors.index.json``), or a
diffusers model folder with ``config.json`` next to the weights.

**Vchitect-2.0 mapping.** Our parameter names are the released ``VchitectXLTransformerModel``'s,
so the mapping is the identity, and loading is strict: every released key must land on a
parameter of the same shape and every parameter must be covered. The only tolerated difference
is the ``pos_embed.pos_embed`` buffer, which is recomputed when a checkpoint omits it.
See docs/weights.md for the table of what each key is.

**SD3 initialisation** (the Vchitect-2.0 recipe: start from an image MMDiT). SD3 keys are a
subset of ours with the same names; everything SD3 has is loaded, and what remains untouched is
exactly the new video parts — temporal q/k/v (random init) and the zero-initialised temporal
and cross-attention outputs — so the initialised model reproduces the image model per frame.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from .transformer import VchitectTransformer3DModel

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
OPTIONAL_BUFFERS = {"pos_embed.pos_embed"}
# Parameters that exist only in our video block, relative to an SD3 block (name fragments).
VIDEO_ONLY = ("to_q_temp", "to_k_temp", "to_v_temp", "to_q_cross", "to_out_temporal", "to_out_context",
              "to_add_out_temporal", "norm_q_temp", "norm_k_temp", "norm_q_cross")
# Released config keys that carry no shape information for our model.
IGNORED_CONFIG_KEYS = {"tp_size", "caption_projection_dim", "_class_name", "_diffusers_version", "_name_or_path",
                       "dual_attention_layers", "qk_norm"}


class WeightImportError(ValueError):
    """A checkpoint does not fit the model; the message names the key and what was expected."""


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) that ``path`` names, each checked to exist; reads nothing but an index.
    Cheap enough to check a ``train.init_from`` path before any rank starts."""
    path = Path(path)
    if not path.exists():
        raise WeightImportError(f"{path} does not exist; give a .safetensors file or a folder holding "
                                f"{WEIGHTS_NAME} (or {INDEX_NAME} and its shards)")
    if path.is_dir():
        index = path / INDEX_NAME
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise WeightImportError(f"{index} is not a safetensors index with a weight_map ({exc!r})") from None
            files = [path / shard for shard in shards]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise WeightImportError(f"{index} names {len(missing)} shard file(s) that are not in {path} "
                                        f"(first: {missing[0]}); copy the whole checkpoint folder")
            return files
        if (path / WEIGHTS_NAME).is_file():
            return [path / WEIGHTS_NAME]
        if (path / "diffusion_pytorch_model.bin").exists():
            raise WeightImportError(f"{path} holds only a pickle checkpoint (.bin), which is never loaded for safety; "
                                    f"convert it to safetensors first")
        raise WeightImportError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    if path.suffix != ".safetensors":
        raise WeightImportError(f"{path}: only .safetensors checkpoints are read (pickle files are never loaded)")
    return [path]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (single file or sharded folder), on CPU."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        state.update(load_file(str(file)))
    return state


def _model_from_released_config(path: Path) -> Optional[VchitectTransformer3DModel]:
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if not config_file.is_file():
        return None
    released = json.loads(config_file.read_text())
    width = released.get("num_attention_heads", 24) * released.get("attention_head_dim", 64)
    if released.get("caption_projection_dim", width) != width:
        raise WeightImportError(f"{config_file}: caption_projection_dim={released['caption_projection_dim']} differs "
                                f"from the model width {width}; such a model cannot concatenate text and video tokens")
    kwargs = {k: v for k, v in released.items() if k not in IGNORED_CONFIG_KEYS}
    return VchitectTransformer3DModel(**kwargs)


def _check_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise WeightImportError(f"{source}: key {key!r} has shape {tuple(tensor.shape)} but the model expects "
                                    f"{tuple(own[key].shape)}; check that the model config matches the checkpoint")
    return own


def load_vchitect2(path: str | Path, model: Optional[VchitectTransformer3DModel] = None) -> VchitectTransformer3DModel:
    """Load an official Vchitect-2.0 transformer checkpoint strictly into ``model``.

    Without ``model``, the model is built from the ``config.json`` next to the weights, or else
    with the Vchitect-2.0 2B shape (our defaults).
    """
    path = Path(path)
    state = read_state_dict(path)
    if model is None:
        model = _model_from_released_config(path) or VchitectTransformer3DModel()
    own = _check_shapes(model, state, str(path))
    missing = sorted(set(own) - set(state) - OPTIONAL_BUFFERS)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model keys missing from the checkpoint (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint keys the model does not have (first: {unexpected[:5]})")
        raise WeightImportError(f"{path} is not a Vchitect-2.0 checkpoint of this shape: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return model


def init_from_sd3(path: str | Path, model: VchitectTransformer3DModel) -> VchitectTransformer3DModel:
    """Load an SD3 transformer into the spatial, text, embedding and MLP parts of ``model``."""
    path = Path(path)
    state = read_state_dict(path)
    if any(".attn2." in k for k in state):
        raise WeightImportError(f"{path} has dual-attention blocks (attn2, SD3.5-medium); they have no counterpart in "
                                f"the Vchitect block. Use an SD3-medium or SD3.5-large style checkpoint")
    own = _check_shapes(model, state, str(path))
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise WeightImportError(f"{path}: {len(unexpected)} SD3 keys have no place in this model (first: "
                                f"{unexpected[:5]}); check num_layers and qk_norm against the SD3 config")
    not_loaded = sorted(set(own) - set(state) - OPTIONAL_BUFFERS)
    stray = [k for k in not_loaded if not any(f".{part}." in k for part in VIDEO_ONLY)]
    if stray:
        raise WeightImportError(f"{path}: the SD3 checkpoint does not cover {len(stray)} image-model keys "
                                f"(first: {stray[:5]}); is it the same width and depth?")
    model.load_state_dict(state, strict=False)
    return model
