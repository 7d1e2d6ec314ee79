"""Importing released weights: Vchitect-2.0 checkpoints and SD3 image transformers.

Only safetensors files are read (never pickle). ``path`` may be a ``.safetensors`` file, a folder
holding ``diffusion_pytorch_model.safetensors`` (or its sharded ``…safetensors.index.json``), a
diffusers model folder with ``config.json`` next to the weights, or a pipeline folder (with
``model_index.json``, such as ``vchitect export`` writes), whose ``transformer/`` is read.

**Vchitect-2.0 mapping.** Our parameter names are the released ``VchitectXLTransformerModel``'s,
so the mapping is the identity, and loading is strict: every released key must land on a
parameter of the same shape and every parameter must be covered. The only tolerated difference
is the ``pos_embed.pos_embed`` buffer, which is recomputed when a checkpoint omits it, and the
add-ons that no released checkpoint has (``ADD_ON_PREFIXES``: the condition adapter, RepVideo's learned
gates), which keep their identity init when the model has them on and the checkpoint does not carry them.
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
# Add-on modules that no released checkpoint has (key prefixes). A model with one of them on loads
# a released checkpoint and keeps the add-on at its constructor init (identity: zero output, zero gates).
ADD_ON_PREFIXES = ("condition_adapter.", "layer_aggregation.")
# Parameters that exist only in our video block, relative to an SD3 block (name fragments).
VIDEO_ONLY = ("to_q_temp", "to_k_temp", "to_v_temp", "to_q_cross", "to_out_temporal", "to_out_context",
              "to_add_out_temporal", "norm_q_temp", "norm_k_temp", "norm_q_cross")
# Released config keys that carry no shape information for our model.
IGNORED_CONFIG_KEYS = {"tp_size", "caption_projection_dim", "_class_name", "_diffusers_version", "_name_or_path",
                       "dual_attention_layers", "qk_norm"}


class WeightImportError(ValueError):
    """A checkpoint does not fit the model; the message names the key and what was expected."""


def _transformer_folder(path: Path) -> Path:
    """A pipeline folder (``model_index.json``, e.g. `vchitect export`'s) stands for its transformer/."""
    if path.is_dir() and (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        return path / "transformer"
    return path


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) that ``path`` names, each checked to exist; reads nothing but an index.
    Cheap enough to check a ``train.init_from`` path before any rank starts."""
    path = Path(path)
    if not path.exists():
        raise WeightImportError(f"{path} does not exist; give a .safetensors file or a folder holding "
                                f"{WEIGHTS_NAME} (or {INDEX_NAME} and its shards)")
    path = _transformer_folder(path)
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
    path = _transformer_folder(path)
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


def shapes_of(state) -> dict[str, tuple[int, ...]]:
    """Key → shape of a state dict (meta tensors too)."""
    return {k: tuple(v.shape) for k, v in state.items()}


def _check_shapes(own: dict, ckpt: dict, source: str) -> None:
    for key, shape in ckpt.items():
        if key in own and own[key] != shape:
            raise WeightImportError(f"{source}: key {key!r} has shape {shape} but the model expects "
                                    f"{own[key]}; check that the model config matches the checkpoint")


def absent_add_ons(own: dict, ckpt: dict) -> set[str]:
    """Model keys of the add-ons (``ADD_ON_PREFIXES``) that the checkpoint has none of: those stay at
    their init. An add-on the checkpoint carries in part is not tolerated (its missing keys count)."""
    return {k for prefix in ADD_ON_PREFIXES if not any(c.startswith(prefix) for c in ckpt)
            for k in own if k.startswith(prefix)}


def check_vchitect2(own: dict, ckpt: dict, source: str) -> None:
    """A Vchitect-2.0 checkpoint (key → shape) must cover the model (key → shape) exactly."""
    _check_shapes(own, ckpt, source)
    missing = sorted(set(own) - set(ckpt) - OPTIONAL_BUFFERS - absent_add_ons(own, ckpt))
    unexpected = sorted(set(ckpt) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model keys missing from the checkpoint (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint keys the model does not have (first: {unexpected[:5]})")
        raise WeightImportError(f"{source} is not a Vchitect-2.0 checkpoint of this shape: " + "; ".join(parts))


def check_sd3(own: dict, ckpt: dict, source: str) -> None:
    """An SD3 checkpoint (key → shape) must cover every image-model key of the model and nothing else."""
    if any(".attn2." in k for k in ckpt):
        raise WeightImportError(f"{source} has dual-attention blocks (attn2, SD3.5-medium); they have no counterpart "
                                f"in the Vchitect block. Use an SD3-medium or SD3.5-large style checkpoint")
    _check_shapes(own, ckpt, source)
    unexpected = sorted(set(ckpt) - set(own))
    if unexpected:
        raise WeightImportError(f"{source}: {len(unexpected)} SD3 keys have no place in this model (first: "
                                f"{unexpected[:5]}); check num_layers and qk_norm against the SD3 config")
    not_loaded = sorted(set(own) - set(ckpt) - OPTIONAL_BUFFERS)
    add_ons = absent_add_ons(own, ckpt)
    stray = [k for k in not_loaded if not any(f".{part}." in k for part in VIDEO_ONLY) and k not in add_ons]
    if stray:
        raise WeightImportError(f"{source}: the SD3 checkpoint does not cover {len(stray)} image-model keys "
                                f"(first: {stray[:5]}); is it the same width and depth?")


CHECKS = {"vchitect2": check_vchitect2, "sd3": check_sd3}


def load_vchitect2(path: str | Path, model: Optional[VchitectTransformer3DModel] = None) -> VchitectTransformer3DModel:
    """Load an official Vchitect-2.0 transformer checkpoint strictly into ``model``.

    Without ``model``, the model is built from the ``config.json`` next to the weights, or else
    with the Vchitect-2.0 2B shape (our defaults).
    """
    path = Path(path)
    state = read_state_dict(path)
    if model is None:
        model = _model_from_released_config(path) or VchitectTransformer3DModel()
    check_vchitect2(shapes_of(model.state_dict()), shapes_of(state), str(path))
    model.load_state_dict(state, strict=False)
    return model


def init_from_sd3(path: str | Path, model: VchitectTransformer3DModel) -> VchitectTransformer3DModel:
    """Load an SD3 transformer into the spatial, text, embedding and MLP parts of ``model``."""
    path = Path(path)
    state = read_state_dict(path)
    check_sd3(shapes_of(model.state_dict()), shapes_of(state), str(path))
    model.load_state_dict(state, strict=False)
    return model


# ------------------------------------------------------------------ reading parts of tensors
class CheckpointSlices:
    """The tensors of a safetensors checkpoint, read box by box (meta-device init).

    Only headers are read on opening. :meth:`copy_into` copies one box of a tensor (a tuple of
    slices, one per dimension) from ``safe_open``'s memory map straight into a destination tensor:
    only the pages of that box are touched, so a rank reads just its shard, and the ranks of a node
    share the page cache (each tensor comes from disk at most once per node). Touched pages count
    in a process's resident memory while the file is mapped, so a file is closed and re-mapped
    after every ``remap_bytes`` of reads, and closed when reading moves on to another file, which
    bounds that part to about ``remap_bytes``.
    """

    def __init__(self, path: str | Path, remap_bytes: int = 64 << 20):
        from safetensors import safe_open

        self._open = lambda file: safe_open(str(file), framework="pt")
        self.source = str(path)
        self.remap_bytes = remap_bytes
        self.entries: dict[str, tuple[Path, tuple[int, ...]]] = {}  # key → (file, shape)
        for file in weight_files(path):
            with self._open(file) as f:
                for key in f.keys():
                    self.entries[key] = (file, tuple(f.get_slice(key).get_shape()))
        self._handles: dict[Path, list] = {}  # file → [handle, bytes read since it was opened]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: shape for k, (_, shape) in self.entries.items()}

    def copy_into(self, key: str, box: tuple[slice, ...], dest: torch.Tensor) -> None:
        """``dest.copy_(checkpoint[key][box])`` (cast to ``dest``'s dtype, like ``load_state_dict``)."""
        file, shape = self.entries[key]
        if dest.numel() == 0:
            return
        handle = self._handles.get(file)
        if handle is None:
            self._handles.clear()  # reads go file by file: drop the maps of the others
            handle = self._handles[file] = [self._open(file), 0]
        part = handle[0].get_slice(key)[box] if shape else handle[0].get_tensor(key)
        dest.copy_(part.reshape(dest.shape))
        handle[1] += part.numel() * part.element_size()
        del part
        if handle[1] >= self.remap_bytes:
            del self._handles[file]  # drops the map (and its resident pages)

    def close(self) -> None:
        self._handles.clear()


def open_initial_weights(kind: str, path: str | Path, model: torch.nn.Module) -> CheckpointSlices:
    """The checkpoint of ``train.init_from`` (``kind`` vchitect2 or sd3), its keys and shapes checked
    against ``model`` (which may be on the meta device) exactly as the full loaders check them."""
    slices = CheckpointSlices(path)
    CHECKS[kind](shapes_of(model.state_dict()), slices.shapes(), slices.source)
    return slices
