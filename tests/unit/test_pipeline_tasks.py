"""Many-for-Many task inputs of VchitectPipeline (vchitect/export/task_inputs.py): every task's condition
equals the training builder's for the same clip, inputs are resized and checked, the model gets the
condition (both CFG halves) and the `#task:` prompt, known pixels are pasted back exactly, an export with
the adapter reloads and reproduces in-process task samples, and `vchitect sample --task` (a subprocess,
with and without a pseudo-terminal). Loading the export where vchitect is not installed:
tests/e2e/test_export_without_vchitect.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers_ckpt import build_model, make_encoders, run_config, write_checkpoint
from tests.helpers_run import run_cli
from vchitect.data.config import TaskOptions
from vchitect.data.pixels import condition_to_unit
from vchitect.data.tasks import TASKS, grey
from vchitect.diffusion.sampling import TextCondition
from vchitect.export import VchitectPipeline, export
from vchitect.export.task_inputs import sample_condition, task_conditions

F, H, W = 7, 8, 12
# a pixel-space model (RGB, no VAE) with the condition adapter; the adapter's output gets weights below
ADAPTER = dict(in_channels=3, condition_channels=4, condition_vae_spatial_factor=1, condition_vae_temporal_factor=1,
               condition_hidden_channels=4)
PROMPT = "a red car at night"
COMMON = dict(num_inference_steps=2, guidance_scale=3.0, height=8, width=8)


def task_model(seed: int = 0, **overrides):
    model = build_model(seed, **{**ADAPTER, **overrides})
    with torch.no_grad():
        torch.nn.init.normal_(model.condition_adapter.conv_out.weight, std=0.05,
                              generator=torch.Generator().manual_seed(seed + 2))
    return model


def hwc(pixels: np.ndarray) -> np.ndarray:  # 3×F×H×W → F×H×W×3, as a caller holds a clip
    return np.ascontiguousarray(pixels.transpose(1, 2, 3, 0))


def build(name, pixels, seed=0, side=None, **opts):
    """The training builder, as the loader calls it."""
    return TASKS[name].build(pixels, np.random.default_rng(seed), TaskOptions(**opts), side)


@pytest.fixture(scope="module")
def clip():
    return np.random.default_rng(7).integers(0, 256, (3, F, H, W), dtype=np.uint8)


def box_down(pixels, factor):  # what a caller's low-resolution clip is: each frame box-downscaled
    size = (W // factor, H // factor)
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BOX)) for f in hwc(pixels)])


# task → (the pipeline's inputs, the training builder's (condition, mask)) for the same clip
def cases(clip):
    image = clip[:, :1]
    depth = np.random.default_rng(3).integers(0, 256, (F, H, W), dtype=np.uint8)
    src = 255 - clip
    vinp, voutp = build("vinp", clip, seed=3), build("voutp", clip, seed=4)
    iinp, ioutp = build("iinp", image, seed=5), build("ioutp", image, seed=6)
    return {
        "t2v": ({}, build("t2v", clip)),
        "t2i": ({}, build("t2i", image)),
        "i2v": (dict(image=hwc(clip)[0]), build("i2v", clip)),
        "itrans": (dict(image=(hwc(clip)[0], hwc(clip)[-1])), build("itrans", clip)),
        "vexd": (dict(video=hwc(clip)[:3]), build("vexd", clip, context_frames=3)),
        "vtrans": (dict(video=(hwc(clip)[:2], hwc(clip)[-2:])), build("vtrans", clip, context_frames=2)),
        "vinp": (dict(video=hwc(clip), mask=vinp[1][0] * 255), vinp),  # the drawn holes as a 0/255 mask
        "voutp": (dict(video=hwc(clip), mask=voutp[1][0].astype(bool)), voutp),
        "iinp": (dict(image=hwc(image)[0], mask=iinp[1][0, 0]), iinp),  # H×W, 0/1
        "ioutp": (dict(image=Image.fromarray(hwc(image)[0]), mask=Image.fromarray(ioutp[1][0, 0] * 255)), ioutp),
        "vsr": (dict(video=box_down(clip, 4)), build("vsr", clip, sr_factor=4)),
        "isr": (dict(image=box_down(image, 2)[0]), build("isr", image, sr_factor=2)),
        "vcolor": (dict(video=torch.from_numpy(hwc(clip))), build("vcolor", clip)),
        "icolor": (dict(image=hwc(grey(image))[0]), build("icolor", image)),  # a grey picture stays grey
        "vedit": (dict(video=hwc(src)), build("vedit", clip, side=src)),
        "depth": (dict(depth=depth), build("depth", clip, side=np.repeat(depth[None], 3, axis=0))),
    }


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_builds_the_training_condition_from_its_inputs(clip, name):
    inputs, (want_cond, want_mask) = cases(clip)[name]
    assert set(inputs) == set(TASKS[name].given)
    frames = 1 if TASKS[name].image else F
    cond, mask = sample_condition(TASKS[name], frames, H, W, **inputs)
    assert cond.dtype == np.uint8 and mask.dtype == np.uint8
    assert np.array_equal(mask, want_mask), name
    assert np.array_equal(cond, want_cond), (name, np.abs(cond.astype(int) - want_cond).max())
    if name not in ("t2v", "t2i"):
        assert want_cond.any() and 0 < mask.sum()  # the comparison is not between blanks


def test_frame_tasks_place_the_given_frames_where_the_task_knows_them(clip):
    longer = np.random.default_rng(1).integers(0, 256, (10, H, W, 3), dtype=np.uint8)
    cond, mask = sample_condition(TASKS["vexd"], F, H, W, video=longer, context_frames=2)
    assert mask[0, :, 0, 0].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert np.array_equal(hwc(cond)[:2], longer[-2:])  # the clip continues from its end
    head, tail = longer[:4], longer[4:]
    cond, mask = sample_condition(TASKS["vtrans"], F, H, W, video=(head, tail), context_frames=3)
    assert mask[0, :, 0, 0].tolist() == [1, 1, 1, 0, 1, 1, 1]
    assert np.array_equal(hwc(cond)[:3], head[-3:]) and np.array_equal(hwc(cond)[4:], tail[:3])
    # one input for every prompt, or one per prompt (itrans: one pair, or a list of pairs)
    a, b = hwc(clip)[0], hwc(clip)[1]
    cond, _ = task_conditions(TASKS["i2v"], 2, F, H, W, image=[a, b])
    assert np.array_equal(hwc(cond[0])[0], a) and np.array_equal(hwc(cond[1])[0], b)
    cond, _ = task_conditions(TASKS["itrans"], 2, F, H, W, image=(a, b))
    assert np.array_equal(cond[0], cond[1]) and np.array_equal(hwc(cond[1])[-1], b)
    cond, _ = task_conditions(TASKS["itrans"], 2, F, H, W, image=[(a, b), (b, a)])
    assert np.array_equal(hwc(cond[1])[0], b) and np.array_equal(hwc(cond[1])[-1], a)
    # a mask with frames: each frame its own known region
    moving = np.zeros((F, H, W), bool)
    for f in range(F):
        moving[f, :, f] = True
    _, mask = sample_condition(TASKS["vinp"], F, H, W, video=hwc(clip), mask=moving)
    assert np.array_equal(mask[0], moving.astype(np.uint8))


def test_inputs_are_brought_to_the_output_size_like_the_loader_does():
    wide = np.zeros((8, 24, 3), np.uint8)
    wide[:, 8:16] = (200, 10, 30)  # a 8×24 picture: its centre third survives the centre crop
    cond, _ = sample_condition(TASKS["i2v"], 3, 8, 8, image=wide)
    assert (hwc(cond)[0] == (200, 10, 30)).all()
    big = np.full((32, 32, 3), 77, np.uint8)  # resized: a flat picture stays flat
    cond, _ = sample_condition(TASKS["i2v"], 3, 8, 8, image=big)
    assert (cond[:, 0] == 77).all()
    half = np.zeros((4, 6), np.uint8)
    half[:, :3] = 255  # the left half known, at half the output size: nearest keeps the edge sharp
    _, mask = sample_condition(TASKS["iinp"], 1, 8, 12, image=np.zeros((8, 12, 3), np.uint8), mask=half)
    assert mask[0, 0, :, :6].all() and not mask[0, 0, :, 6:].any()
    clip = np.random.default_rng(2).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    cond, _ = sample_condition(TASKS["vcolor"], 5, 8, 8, video=clip)  # the first 5 of 9 frames
    assert np.array_equal(cond, grey(clip[:5].transpose(3, 0, 1, 2)))
    floats = sample_condition(TASKS["i2v"], 3, 8, 8, image=torch.full((8, 8, 3), 0.5))[0]
    assert (floats[:, 0] == 128).all()


@pytest.mark.parametrize("name,frames,inputs,words", [
    ("vinp", F, dict(video=np.zeros((3, H, W, 3), np.uint8), mask=np.ones((H, W))),
     "video has 3 frames and the output 7; give at least 7 frames or set num_frames=3"),
    ("vexd", F, dict(video=np.zeros((7, H, W, 3), np.uint8)), "leave nothing to generate in num_frames=7"),
    ("vtrans", F, dict(video=(np.zeros((2, H, W, 3), np.uint8), np.zeros((3, H, W, 3), np.uint8))),
     "the head clip has 2 frames and the tail clip 3"),
    ("vtrans", F, dict(video=(np.zeros((4, H, W, 3), np.uint8),) * 2),
     "4 known frames at each end leave nothing to generate in num_frames=7; give num_frames ≥ 9, or context_frames ≤ 3"),
    ("itrans", 2, dict(image=(np.zeros((H, W, 3), np.uint8),) * 2), "num_frames ≥ 3"),
    ("i2v", F, dict(image=np.zeros((H, W, 5), np.uint8)), "image: shape (8, 12, 5); give H×W×3"),
    ("i2v", F, dict(image=np.full((H, W, 3), 2.0)), "float64 values out of range"),
    ("vinp", F, dict(video=np.zeros((F, H, W, 3), np.uint8), mask=np.ones((3, H, W))), "mask has 3 frames"),
    ("i2v", F, dict(image="first.png"), "image: expected a PIL image"),
])
def test_impossible_inputs_are_clear_errors(name, frames, inputs, words):
    with pytest.raises(ValueError) as exc:
        task_conditions(TASKS[name], 1, frames, H, W, **inputs)
    assert words in str(exc.value), str(exc.value)


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run folder, export folder) of the tiny adapter model with a tiny T5 text encoder."""
    root = tmp_path_factory.mktemp("tasks")
    enc = make_encoders(root / "enc")
    cfg = run_config(ADAPTER, shift=1.0, encoders={"text_encoder_path": str(enc["text_encoder"])})
    write_checkpoint(root / "run", 5, task_model(), cfg)
    return root / "run", export(root / "run", root / "export")


@pytest.fixture(scope="module")
def pipe(exported):
    p = VchitectPipeline.from_pretrained(exported[1])
    p.set_progress_bar_config(disable=True)
    return p


def recorded(pipe, monkeypatch):
    """What the text encoder and the transformer are given during one call."""
    seen = {"prompts": [], "conditions": []}
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda prompts: (seen["prompts"].append(list(prompts)),
                                                                encode(prompts))[1])
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen["conditions"].append(kwargs.get("condition")), with_kwargs=True)
    return seen, hook


def run(pipe, task=None, seed=0, **kw):
    return pipe(PROMPT, task=task, generator=torch.Generator().manual_seed(seed), **{**COMMON, **kw}).frames


def test_the_model_gets_the_training_condition_and_prompt_in_both_guidance_passes(pipe, monkeypatch):
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    seen, hook = recorded(pipe, monkeypatch)
    try:
        run(pipe, "i2v", image=img, num_frames=5)
    finally:
        hook.remove()
    assert seen["prompts"] == [[f"{PROMPT} #task: image-to-video"], [""]]  # the negative prompt has no suffix
    clip = np.zeros((3, 5, 8, 8), np.uint8)
    clip[:, 0] = img.transpose(2, 0, 1)
    want = condition_to_unit(*(torch.from_numpy(a)[None] for a in build("i2v", clip)))
    assert len(seen["conditions"]) == 2  # two steps, conditional and unconditional rows in one batch
    for c in seen["conditions"]:
        assert c.shape == (2, 4, 5, 8, 8) and torch.equal(c[:1], want) and torch.equal(c[1:], want)

    seen, hook = recorded(pipe, monkeypatch)  # t2v on a multi-task model: the zero condition, as trained
    try:
        run(pipe, "t2v", num_frames=3)
        run(pipe, None, num_frames=3)  # no task: the plain call of before (no suffix, no condition)
    finally:
        hook.remove()
    assert seen["prompts"] == [[f"{PROMPT} #task: text-to-video"], [""], [PROMPT], [""]]
    assert not seen["conditions"][0].any() and seen["conditions"][0].shape == (2, 4, 3, 8, 8)
    assert seen["conditions"][2] is None


def test_a_model_without_the_adapter_runs_only_text_tasks(pipe, monkeypatch):
    plain = VchitectPipeline(build_model(0, in_channels=3), pipe.scheduler, text_encoder=pipe.text_encoder,
                             tokenizer=pipe.tokenizer, max_sequence_length=8)
    plain.set_progress_bar_config(disable=True)
    seen, hook = recorded(plain, monkeypatch)
    try:
        run(plain, "t2v", num_frames=3)
    finally:
        hook.remove()
    assert seen["prompts"][0] == [PROMPT] and seen["conditions"][0] is None  # trained without the suffix
    with pytest.raises(ValueError, match="task='i2v' .* needs a model with a condition adapter"):
        run(plain, "i2v", image=np.zeros((8, 8, 3), np.uint8))


@pytest.mark.parametrize("kw,words", [
    (dict(task="i2v"), "task='i2v' (image-to-video) takes image=; this call lacks image"),
    (dict(task="i2v", image=np.zeros((8, 8, 3), np.uint8), mask=np.ones((8, 8))), "does not take mask"),
    (dict(image=np.zeros((8, 8, 3), np.uint8)), "image given without a task"),
    (dict(task="nope"), "task='nope' is not a task; choose one of t2v, i2v, vexd"),
    (dict(task="iinp", image=np.zeros((8, 8, 3), np.uint8), mask=np.ones((8, 8)), num_frames=3),
     "makes an image: num_frames=1"),
    (dict(task="i2v", image=np.zeros((8, 8, 3), np.uint8), num_frames=1), "makes a video"),
    (dict(task="i2v", image=np.zeros((8, 8, 3), np.uint8), context_frames=2), "context_frames is for vexd"),
])
def test_bad_task_calls_fail_before_any_work(pipe, monkeypatch, kw, words):
    monkeypatch.setattr(pipe, "encode_prompt", lambda prompts: pytest.fail("encoded before the check"))
    with pytest.raises(ValueError) as exc:
        run(pipe, **kw)
    assert words in str(exc.value), str(exc.value)


def paste_cases():
    rng = np.random.default_rng(11)
    img, last = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    video = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    hole = np.ones((8, 8), np.uint8)
    hole[2:6, 1:5] = 0
    return {"i2v": dict(image=img, num_frames=5), "itrans": dict(image=(img, last), num_frames=5),
            "vexd": dict(video=video[:2], num_frames=5), "vinp": dict(video=video, mask=hole),
            "voutp": dict(video=video, mask=1 - hole), "iinp": dict(image=img, mask=hole)}


@pytest.mark.parametrize("name", list(paste_cases()))
def test_known_pixels_are_pasted_back_exactly(pipe, name):
    kw = paste_cases()[name]
    frames = kw.get("num_frames") or (1 if TASKS[name].image else 5)
    inputs = {k: v for k, v in kw.items() if k != "num_frames"}
    cond, mask = task_conditions(TASKS[name], 1, frames, 8, 8, **inputs)
    known = mask[0, 0].astype(bool)  # F×H×W
    given = hwc(cond[0])  # F×H×W×3
    raw = run(pipe, name, **kw, paste_known=False)[0]
    pasted = run(pipe, name, **kw)[0]
    pil = np.stack([np.asarray(f) for f in run(pipe, name, **kw, output_type="pil")[0]])
    assert pasted.dtype == np.float32 and pasted.shape == given.shape
    assert np.array_equal(pasted[known], given[known].astype(np.float32) / 255)  # the given values, to the bit
    assert np.array_equal(pil[known], given[known])  # uint8: exactly the given pixels
    assert np.array_equal(pasted[~known], raw[~known])  # the rest is the model's
    assert np.array_equal(pil[~known], (raw[~known] * 255).round().astype(np.uint8))
    assert not np.array_equal((raw[known] * 255).round().astype(np.uint8), given[known])  # the model alone differs
    assert 0 < known.mean() < 1


@pytest.mark.parametrize("name,inputs", [
    ("vsr", dict(video=np.full((3, 4, 4, 3), 90, np.uint8))), ("vcolor", dict(video=np.zeros((3, 8, 8, 3), np.uint8))),
    ("vedit", dict(video=np.full((3, 8, 8, 3), 200, np.uint8))), ("depth", dict(depth=np.zeros((3, 8, 8), np.uint8)))])
def test_restoration_tasks_are_not_pasted(pipe, name, inputs):
    """Their condition is known everywhere but is not the answer (a blurred, grey, source or depth clip)."""
    pasted, raw = run(pipe, name, **inputs), run(pipe, name, **inputs, paste_known=False)
    assert pasted.shape == (1, 3, 8, 8, 3) and np.array_equal(pasted, raw)  # 3 frames: the clip's, by default


def test_latent_models_get_the_pixel_condition_at_the_output_size(exported):
    """With a VAE (÷2) the condition stays in pixels; the adapter downsamples it; paste is in pixels."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    vae = AutoencoderKL.from_pretrained(exported[0].parent / "enc" / "vae")
    model = task_model(in_channels=4, condition_vae_spatial_factor=2)
    latent = VchitectPipeline(model, FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae)
    latent.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    text = TextCondition(torch.randn(1, 4, 16, generator=g), torch.randn(1, 16, generator=g))
    img = np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    seen = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["condition"]), with_kwargs=True)
    try:
        kw = dict(prompt_embeds=text, task="i2v", image=img, num_frames=3, height=16, width=16, num_inference_steps=2,
                  guidance_scale=1.0, output_type="pil")
        out = latent(**kw, generator=torch.Generator().manual_seed(0)).frames[0]
        raw = latent(**kw, generator=torch.Generator().manual_seed(0), paste_known=False).frames[0]
    finally:
        hook.remove()
    assert seen[0].shape == (1, 4, 3, 16, 16)  # latents are 8×8: the pixel condition at 16×16
    assert np.array_equal(np.asarray(out[0]), img) and not np.array_equal(np.asarray(raw[0]), img)
    assert np.array_equal(np.asarray(out[1]), np.asarray(raw[1]))


def test_an_export_with_the_adapter_reproduces_in_process_task_samples(exported):
    from diffusers import DiffusionPipeline

    from vchitect.export.export import pipeline_from_checkpoint

    run_dir, folder = exported
    loaded = DiffusionPipeline.from_pretrained(folder)
    in_process = pipeline_from_checkpoint(run_dir)
    assert type(loaded) is VchitectPipeline and loaded.transformer.config.condition_channels == 4
    for p in (loaded, in_process):
        p.set_progress_bar_config(disable=True)
    calls = {name: paste_cases()[name] for name in ("i2v", "vinp")}
    for name, kw in calls.items():
        for paste in (True, False):
            want = run(in_process, name, seed=3, paste_known=paste, **kw)
            got = run(loaded, name, seed=3, paste_known=paste, **kw)
            assert np.array_equal(got, want), (name, paste, np.abs(got - want).max())
    # the condition matters: the same seed without it (t2v) gives another video
    assert not np.array_equal(run(loaded, "i2v", seed=3, paste_known=False, **calls["i2v"]),
                              run(loaded, "t2v", seed=3, num_frames=5))


# ------------------------------------------------------------------ vchitect sample --task
def few_colours(seed: int, shape=(8, 8)) -> np.ndarray:
    """A picture of four colours (a GIF keeps them exactly)."""
    palette = np.array([(0, 0, 0), (220, 30, 30), (30, 200, 60), (250, 250, 250)], np.uint8)
    return palette[np.random.default_rng(seed).integers(0, 4, shape)]


def gif_frames(path) -> np.ndarray:
    from vchitect.eval.cli import read_video

    return read_video(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(few_colours(0)).save(d / "first.png")
    Image.fromarray(few_colours(1)).save(d / "last.png")
    frames = [Image.fromarray(few_colours(10 + i)) for i in range(4)]
    frames[0].save(d / "clip.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)
    hole = np.full((8, 8), 255, np.uint8)
    hole[2:6, 2:6] = 0
    Image.fromarray(hole).save(d / "mask.png")
    (d / "not-an-image.png").write_text("text, not a picture\n")
    return d


def sample_args(folder, out, *task) -> list[str]:
    return ["sample", str(folder), "--prompt", PROMPT, "--height", "8", "--width", "8", "--steps", "2",
            "--guidance-scale", "3", "--out", str(out), *task]


@pytest.mark.parametrize("in_pty", [False, True], ids=["pipe", "pty"])
def test_cli_samples_a_task_in_a_subprocess(exported, files, tmp_path, in_pty):
    out = tmp_path / "v.gif"
    code, text, _ = run_cli(sample_args(exported[1], out, "--task", "i2v", "--image", str(files / "first.png"),
                                        "--frames", "3"), in_pty=in_pty)
    assert code == 0, text[-3000:]
    assert "task i2v: sampling 3 frames at 8×8" in text and f"wrote {out} (3 frames, 8×8)" in text
    frames = gif_frames(out)
    assert frames.shape == (3, 8, 8, 3) and np.array_equal(frames[0], few_colours(0))  # the given frame, pasted


@pytest.mark.parametrize("in_pty", [False, True], ids=["pipe", "pty"])
@pytest.mark.parametrize("task,words", [
    (["--task", "bogus"], "sample error: --task bogus: not a task; choose one of t2v, i2v, vexd, itrans, vtrans, "
                          "vinp, voutp, vsr, vcolor, vedit, depth, t2i, iinp, ioutp, isr, icolor (docs/tasks.md)"),
    (["--task", "i2v"], "sample error: --task i2v (image-to-video) takes --image PATH; got 0 --image"),
])
def test_cli_task_errors_are_one_line_in_a_subprocess(exported, files, tmp_path, task, words, in_pty):
    code, text, _ = run_cli(sample_args(exported[1], tmp_path / "v.gif", *task), in_pty=in_pty)
    assert code == 2 and "Traceback" not in text, text[-3000:]
    assert [line for line in text.splitlines() if line.strip()] == [words]  # one line, not wrapped at 80
    assert not (tmp_path / "v.gif").exists()


def test_cli_task_inputs_from_files(exported, files, tmp_path, capsys):
    from vchitect.cli import main

    folder = exported[1]
    gif = str(files / "clip.gif")
    # vinp: a .gif clip (its 4 frames, by default) and a .png mask; outside the hole the clip comes back
    assert main(sample_args(folder, tmp_path / "inp.gif", "--task", "vinp", "--video", gif, "--mask",
                            str(files / "mask.png"))) == 0
    got, clip = gif_frames(tmp_path / "inp.gif"), gif_frames(gif)
    known = np.ones((8, 8), bool)
    known[2:6, 2:6] = False
    assert got.shape == (4, 8, 8, 3) and np.array_equal(got[:, known], clip[:, known])
    assert main(sample_args(folder, tmp_path / "raw.gif", "--task", "vinp", "--video", gif, "--mask",
                            str(files / "mask.png"), "--no-paste")) == 0
    assert not np.array_equal(gif_frames(tmp_path / "raw.gif")[:, known], clip[:, known])
    # itrans: two --image; the first and the last frame
    assert main(sample_args(folder, tmp_path / "t.gif", "--task", "itrans", "--image", str(files / "first.png"),
                            "--image", str(files / "last.png"), "--frames", "4")) == 0
    got = gif_frames(tmp_path / "t.gif")
    assert np.array_equal(got[0], few_colours(0)) and np.array_equal(got[-1], few_colours(1))
    # vexd: the last 2 frames of the clip start the output
    assert main(sample_args(folder, tmp_path / "x.gif", "--task", "vexd", "--video", gif, "--context-frames", "2",
                            "--frames", "5")) == 0
    assert np.array_equal(gif_frames(tmp_path / "x.gif")[:2], clip[2:])
    # an image task makes one frame (a .png works for one)
    assert main(sample_args(folder, tmp_path / "i.png", "--task", "iinp", "--image", str(files / "first.png"),
                            "--mask", str(files / "mask.png"))) == 0
    with Image.open(tmp_path / "i.png") as im:
        img = np.asarray(im.convert("RGB"))
    assert img.shape == (8, 8, 3) and np.array_equal(img[known], few_colours(0)[known])
    assert "task iinp: sampling 1 frames" in capsys.readouterr().out


@pytest.mark.parametrize("task,words", [
    (["--image", "{files}/first.png"], "--image needs --task"),
    (["--task", "itrans", "--image", "{files}/first.png"], "takes --image PATH twice; got 1 --image"),
    (["--task", "vinp", "--video", "{files}/clip.gif"], "--task vinp (video inpainting) takes --video PATH, "
                                                         "--mask PATH; got 0 --mask"),
    (["--task", "i2v", "--image", "{files}/missing.png"], "--image {files}/missing.png: no such file"),
    (["--task", "i2v", "--image", "{files}/not-an-image.png"], "--image {files}/not-an-image.png: cannot read it"),
    (["--task", "i2v", "--image", "{files}/first.png", "--context-frames", "2"], "--context-frames is for"),
    (["--task", "i2v", "--image", "{files}/first.png", "--frames", "1"], "makes a video: num_frames ≥ 2"),
    (["--task", "vinp", "--video", "{files}/clip.gif", "--mask", "{files}/mask.png", "--frames", "6"],
     "video has 4 frames and the output 6"),
    (["--task", "t2v"], "a .png holds one frame"),
])
def test_cli_task_mistakes_are_one_sample_error_line(exported, files, tmp_path, capsys, task, words):
    from vchitect.cli import main

    out = tmp_path / ("v.png" if task == ["--task", "t2v"] else "v.gif")
    assert main(sample_args(exported[1], out, *[t.format(files=files) for t in task])) == 2
    text = capsys.readouterr().out
    assert text.count("\n") == 1 and text.startswith("sample error: ") and words.format(files=files) in text, text
    assert not out.exists()


def test_cli_help_names_every_task():
    from vchitect.cli import IMAGE_TASKS, WHOLE_CLIP_TASKS, build_parser
    from vchitect.export.task_inputs import WHOLE_CLIP

    sample = next(a for a in build_parser()._subparsers._group_actions[0].choices["sample"]._actions
                  if a.dest == "task")
    assert sample.help.split(";")[0].split(", ") == list(TASKS)
    assert IMAGE_TASKS == tuple(n for n, t in TASKS.items() if t.image) and WHOLE_CLIP_TASKS == WHOLE_CLIP
