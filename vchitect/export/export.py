"""DCP checkpoint → diffusers pipeline folder (``vchitect export CKPT OUT``).

What a checkpoint is (written by the trainer): ``RUN/checkpoints/step-000001000/``, a
``torch.distributed.checkpoint`` directory with a ``.metadata`` file and ``vchitect.json``
(``{"step", "config", "world_size"}``). Its state dict has top-level entries ``model`` (plain
parameter names of :class:`VchitectTransformer3DModel`), ``ema`` (trainable parameters only),
and optimizer / scheduler / data-loader / RNG state, which export never reads.

Consolidation runs in one process without a process group (``dcp.load(..., no_dist=True)``):
the metadata gives every tensor's global shape, so a checkpoint saved by any number of ranks,
sharded or not, loads the same way and gives byte-identical output files.

Output (written to ``OUT.tmp-<pid>`` and renamed when complete; every file gets the mode a new
file gets under the user's umask, safetensors' 0600 included)::

    model_index.json
    vchitect_pipeline.py + vchitect_*.py   the pipeline's code, generated from vchitect's sources
                                           (vchitect/export/remote_code.py) for trust_remote_code loading
    transformer/   config.json + diffusion_pytorch_model.safetensors (sharded + index above the cap)
                   + vchitect_transformer.py + vchitect_models_*.py (the transformer's code)
    scheduler/     FlowMatchEulerDiscreteScheduler with the training shift
    vae/ text_encoder/ tokenizer/   copied from the run config's local paths or --base DIR
    text_encoder_2/ tokenizer_2/     the optional pooled CLIP (data.encoders.pooled_encoder_path)
    text_encoder_3/ tokenizer_3/     kind sd3: text_encoder* are CLIP-L, CLIP-G and T5 (diffusers' SD3 names),
                                     from data.encoders.text_encoder_path (an SD3 pipeline folder) or
                                     clip_l_path / clip_g_path / t5_path
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

CHECKPOINT_META = "vchitect.json"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".index.json")


class ExportError(RuntimeError):
    """A problem with the checkpoint or the export options; the message says what to do."""


# ------------------------------------------------------------------ finding and reading checkpoints
def _warn(msg: str) -> None:
    import sys

    print(f"warning: {msg}", file=sys.stderr)


def find_checkpoint(path: str | Path, say=_warn) -> Path:
    """A ``step-…`` folder that verifies (vchitect.train.checkpoint.verify): ``path`` itself, or the
    newest one under ``path`` or ``path/checkpoints``, with one line through ``say`` for every newer
    folder passed over and why."""
    from vchitect.train.checkpoint import find_verified, step_folders, verify

    p = Path(path)
    if not p.exists():
        raise ExportError(f"checkpoint {p} does not exist; pass a step-… folder, a checkpoints/ folder or a run folder")
    if p.name.startswith("step-"):
        reason = verify(p)
        if reason:
            kind = "an incomplete" if p.name.endswith(".tmp") or "missing" in reason else "a damaged"
            raise ExportError(f"{p} is {kind} checkpoint: {reason}. Export another step")
        return p
    for folder in (p / "checkpoints", p):
        if step_folders(folder):
            found = find_verified(folder, say=say)
            if found is not None:
                return found
            raise ExportError(f"no checkpoint under {folder} verifies (see the lines above); export cannot use any")
    raise ExportError(f"no complete checkpoint (step-… folder with .metadata and {CHECKPOINT_META}) under {p}")


def read_meta(step_dir: Path) -> dict:
    try:
        meta = json.loads((step_dir / CHECKPOINT_META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{step_dir / CHECKPOINT_META} is unreadable ({exc}); the checkpoint is damaged") from None
    if not isinstance(meta.get("config"), dict) or not isinstance(meta["config"].get("model"), dict):
        raise ExportError(f"{step_dir / CHECKPOINT_META} has no config.model section; was it written by vchitect?")
    return meta


def load_weights(step_dir: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model's plain state dict, consolidated from ``step_dir`` in this process.

    With ``ema``, the EMA entries replace the model entries they exist for (EMA covers trainable
    parameters only; frozen ones and buffers come from ``model``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from vchitect.train import safe_dcp

    try:
        metadata = safe_dcp.read_metadata(step_dir)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable checkpoint
        raise ExportError(f"{step_dir}/.metadata cannot be read ({exc}); the checkpoint is damaged") from None
    wanted: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}}
    for key, md in metadata.state_dict_metadata.items():
        top, _, fqn = key.partition(".")
        if top in wanted and fqn and isinstance(md, TensorStorageMetadata):
            if top == "ema" and not ema:
                continue
            wanted[top][fqn] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    if not wanted["model"]:
        raise ExportError(f"{step_dir} holds no `model` entries; it is not a vchitect training checkpoint")
    if ema and not wanted["ema"]:
        raise ExportError(f"{step_dir} holds no EMA weights (train.ema_decay was 0); export without --ema")
    state = {k: v for k, v in wanted.items() if v}
    safe_dcp.load(state, step_dir, no_dist=True)
    weights = dict(state["model"])
    if ema:
        weights.update(state["ema"])
    return weights


# ------------------------------------------------------------------ components
# (pipeline component, tokenizer component, run-config key under data.encoders)
TEXT_COMPONENTS = (("text_encoder", "tokenizer", "text_encoder_path"),
                   ("text_encoder_2", "tokenizer_2", "pooled_encoder_path"),
                   ("text_encoder_3", "tokenizer_3", "t5_path"))


def _component_paths(config: dict, base: Optional[Path]) -> dict[str, Optional[Path]]:
    """Local folders of the VAE and the text encoders: --base wins, then the run config.

    ``text_encoder_2`` is the optional CLIP whose ``text_embeds`` replace the pooled vector
    (``data.encoders.pooled_encoder_path``, SD3-style); it is taken from --base only when the run
    used one."""
    enc = (config.get("data") or {}).get("encoders") or {}

    def configured(*candidates):
        for c in candidates:
            if isinstance(c, dict):
                c = c.get("path")
            if c:
                return Path(c)
        return None

    paths = {"vae": configured(config.get("vae"), enc.get("vae_path")),
             "text_encoder": configured(config.get("text_encoder"), enc.get("text_encoder_path")),
             "text_encoder_2": configured(enc.get("pooled_encoder_path"))}
    sd3 = enc.get("text_encoder_kind") == "sd3"
    if sd3:  # CLIP-L, CLIP-G, T5: a separate folder, else the SD3 pipeline folder (its text_encoder*/ subfolders)
        root = enc.get("text_encoder_path")
        for name, key in (("text_encoder", "clip_l_path"), ("text_encoder_2", "clip_g_path"),
                          ("text_encoder_3", "t5_path")):
            paths[name] = configured(enc.get(key), root)
    if base is not None:
        if not base.is_dir():
            raise ExportError(f"--base {base} is not a folder; give a diffusers pipeline folder with vae/, "
                              f"text_encoder/ and tokenizer/")
        for name in list(paths):
            if (base / name).is_dir() and (sd3 or name not in ("text_encoder_2", "text_encoder_3")
                                           or paths[name] is not None):
                paths[name] = base / name
        for _, tok, _ in TEXT_COMPONENTS:
            if (base / tok).is_dir():
                paths[tok] = base / tok
    for name, p in list(paths.items()):
        if p is not None and not p.is_dir():
            raise ExportError(f"the {name} folder {p} (from the run config) does not exist on this machine; "
                              f"pass --base DIR with a {name}/ subfolder")
    return paths


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} cannot be read as JSON ({exc}); point the config or --base at a complete "
                          f"saved model folder") from None


def _subfolder(p: Path, sub: str) -> Path:
    """``p`` or, when ``p`` is a whole pipeline folder, ``p/sub``."""
    if not (p / "config.json").is_file() and (p / sub).is_dir():
        return p / sub
    return p


def _text_sources(paths: dict, name: str, tok: str) -> Optional[tuple[Path, Path, str]]:
    """(model folder, tokenizer folder, transformers class) of text component ``name``, or None."""
    root = paths.get(name)
    if root is None:
        return None
    src = _subfolder(root, name if (root / name).is_dir() else "text_encoder")
    tok_src = paths.get(tok) or next((root / t for t in (tok, "tokenizer") if (root / t).is_dir()), src)
    arch = (_read_json(src / "config.json").get("architectures") or [None])[0]
    if arch is None:
        raise ExportError(f"{src}/config.json names no architecture; save the text encoder with "
                          f"transformers' save_pretrained")
    return src, tok_src, arch


def _copy_tree(src: Path, dst: Path, only=None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and (only is None or only(f.name)):
            shutil.copy2(f, dst / f.name)
        elif f.is_dir() and only is None:
            shutil.copytree(f, dst / f.name)


def _is_tokenizer_file(name: str) -> bool:
    return not name.endswith(WEIGHT_SUFFIXES) and name not in ("config.json", "generation_config.json")


def _copy_components(paths: dict, out: Path) -> dict:
    """Copy the VAE, text encoders and tokenizers; return their model_index entries."""
    index: dict = {"vae": [None, None]}
    if paths.get("vae") is not None:
        src = _subfolder(paths["vae"], "vae")
        cfg = _read_json(src / "config.json")
        _copy_tree(src, out / "vae")
        index["vae"] = ["diffusers", cfg.get("_class_name", "AutoencoderKL")]
    for name, tok, _ in TEXT_COMPONENTS:
        index[name] = index[tok] = [None, None]
        sources = _text_sources(paths, name, tok)
        if sources is None:
            continue
        src, tok_src, arch = sources
        _copy_tree(src, out / name)
        _copy_tree(tok_src, out / tok, only=_is_tokenizer_file)
        tok_cfg_file = out / tok / "tokenizer_config.json"
        tok_cfg = _read_json(tok_cfg_file) if tok_cfg_file.is_file() else {}
        tok_class = tok_cfg.get("tokenizer_class")
        if not tok_class or tok_class.startswith("Auto"):
            tok_class = "PreTrainedTokenizerFast"
        index[name], index[tok] = ["transformers", arch], ["transformers", tok_class]
    return index


def _default_modes(folder: Path) -> None:
    """Give every file and folder under ``folder`` the mode ``open()`` / ``mkdir()`` give under the umask:
    safetensors writes weights 0600 and ``copy2`` keeps a source's restrictive mode, but a model folder on a
    shared cluster is read by the group (umask 022 → 0644 files, 0755 folders)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for n in names:
            os.chmod(os.path.join(root, n), 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def load_transformer(step_dir: Path, config: dict, ema: bool = False, dtype: str = "fp32"):
    """A :class:`VchitectTransformer3DModel` holding the consolidated weights of ``step_dir``."""
    from vchitect.models import VchitectTransformer3DModel

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is unknown; choose bf16, fp16 or fp32")
    weights = load_weights(step_dir, ema=ema)
    model_kwargs = dict(config["model"])
    model_kwargs["attention_backend"] = "sdpa"  # optional GPU kernels stay a runtime choice
    try:
        with torch.device("meta"):
            model = VchitectTransformer3DModel(**model_kwargs)
    except TypeError as exc:
        raise ExportError(f"config.model in {step_dir / CHECKPOINT_META} does not match this vchitect version: "
                          f"{exc}") from None
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ExportError(f"{step_dir} does not match config.model: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}")
    try:
        model.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in weights.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:300])
        raise ExportError(f"the weights in {step_dir} do not fit this model config ({first}); use the config the "
                          f"run was trained with (the one recorded in {CHECKPOINT_META})") from None
    return model.eval()


def pipeline_from_checkpoint(ckpt: str | Path, base: str | Path | None = None, ema: bool = False,
                             dtype: str = "fp32", config: Optional[dict] = None):
    """A :class:`VchitectPipeline` built in memory from a training checkpoint (no export folder)."""
    import diffusers
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .pipeline import VchitectPipeline

    step_dir = find_checkpoint(ckpt)
    config = config or read_meta(step_dir)["config"]
    paths = _component_paths(config, Path(base) if base is not None else None)
    model = load_transformer(step_dir, config, ema=ema, dtype=dtype)
    diff = config.get("diffusion") or {}
    ref_tokens = int(diff.get("shift_reference_tokens", 0) or 0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=float(diff.get("shift", 1.0)),
                                                use_dynamic_shifting=ref_tokens > 0)
    vae = None
    if paths.get("vae") is not None:
        src = _subfolder(paths["vae"], "vae")
        name = _read_json(src / "config.json").get("_class_name", "AutoencoderKL")
        vae = getattr(diffusers, name).from_pretrained(src).eval()
    text: dict = {}
    for name, tok, _ in TEXT_COMPONENTS:
        sources = _text_sources(paths, name, tok)
        if sources is not None:
            src, tok_src, arch = sources
            text[name] = getattr(transformers, arch).from_pretrained(src).eval()
            text[tok] = transformers.AutoTokenizer.from_pretrained(tok_src)
    enc_cfg = (config.get("data") or {}).get("encoders") or {}
    text_cfg = (config.get("data") or {}).get("text") or {}
    return VchitectPipeline(model, scheduler, vae=vae, **text, text_encoder_kind=enc_cfg.get("text_encoder_kind", "t5"),
                            max_sequence_length=int(text_cfg.get("max_length", 77)),
                            shift_reference_tokens=ref_tokens, text_masks=text_cfg.get("masks", "masked"))


# ------------------------------------------------------------------ the export
def export(ckpt: str | Path, out: str | Path, ema: bool = False, dtype: str = "fp32", base: str | Path | None = None,
           max_shard_size: str = "5GB", overwrite: bool = False, log=print) -> Path:
    """Export the checkpoint ``ckpt`` to the pipeline folder ``out``; returns ``out``."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .remote_code import write_remote_code

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is unknown; choose bf16, fp16 or fp32")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    step_dir = find_checkpoint(ckpt)
    meta = read_meta(step_dir)
    config = meta["config"]
    paths = _component_paths(config, Path(base) if base is not None else None)

    model = load_transformer(step_dir, config, ema=ema, dtype=dtype)

    shift = float((config.get("diffusion") or {}).get("shift", 1.0))
    ref_tokens = int((config.get("diffusion") or {}).get("shift_reference_tokens", 0) or 0)
    enc_cfg = (config.get("data") or {}).get("encoders") or {}
    text_cfg = (config.get("data") or {}).get("text") or {}

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size=max_shard_size)
        FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=ref_tokens > 0).save_pretrained(
            tmp / "scheduler")
        components = _copy_components(paths, tmp)
        index = {
            **write_remote_code(tmp),  # _class_name and transformer: the code this folder carries
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            **components,
            "text_encoder_kind": enc_cfg.get("text_encoder_kind", "t5"),
            "max_sequence_length": int(text_cfg.get("max_length", 77)),
            "shift_reference_tokens": ref_tokens,
            "text_masks": text_cfg.get("masks", "masked"),
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _default_modes(tmp)
        old = None
        if out.exists():  # --overwrite (or an empty folder): swap, so OUT is never missing or partial
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if components["text_encoder"][0] is None:
        log(f"warning: no text encoder configured; {out} takes prompt_embeds only (pass --base DIR to add one)")
    log(f"exported {step_dir} ({'EMA' if ema else 'model'} weights, {dtype}, step {meta.get('step')}) to {out}")
    return out


__all__ = ["ExportError", "export", "find_checkpoint", "load_transformer", "load_weights",
           "pipeline_from_checkpoint", "read_meta"]
