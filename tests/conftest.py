"""Shared fixtures: tiny SD-like and SDXL-like pipelines built from config with random weights (CPU, fp32); a
``fastcache serve`` process on a loopback port for the serving tests."""

import ast
import base64
import importlib.util
import io
import itertools
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from DeepCache import DeepCacheSDHelper

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter. Forced, not defaulted: with an inherited
    # TRITON_INTERPRET=0, guided_step runs its PyTorch reference on CPU tensors, and the kernel tests would compare
    # the reference with itself. Triton reads it when @triton.jit decorates a kernel, at the import of
    # fastcache_kernels, so it is set here, before anything imports them.
    os.environ["TRITON_INTERPRET"] = "1"

from fastcache import compile_pipeline
from fastcache.models import (
    build_pipeline,
    inpaint_pipeline,
    random_ip_adapter,
    random_prompt_embeds,
    refiner_pipeline,
    with_adapter,
    with_controlnet,
)
from fastcache.serving import probe
from fastcache.serving.probe import free_port  # noqa: F401 (tests import it from here)

TINY_PRESETS = ("tiny-sd", "tiny-sdxl")
ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
SIZE = 32  # pixels; latents 16x16 with the tiny VAE


def load_script(relative_path: str):
    """Import a script of bench/ or tools/ (not packages) as a module."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def deepcache_function(module: str, name: str):
    """A function of the installed DeepCache package, as the oracle for our own.

    DeepCache's pipeline modules no longer import against current diffusers, so the function is read from the
    package's own source file and run alone (numpy is all it uses); nothing of it is copied into this repository.
    """
    path = Path(importlib.util.find_spec("DeepCache").origin).parent.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"np": np}
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


class StepCountingHelper(DeepCacheSDHelper):
    """The helper with one defect fixed, its step counter, for the schedulers that repeat timesteps.

    The helper numbers a UNet evaluation ``list(pipe.scheduler.timesteps).index(t)``, the first index holding ``t``.
    PNDM's timesteps ``[t0, t1, t1, t2, ...]`` and Heun's (each step evaluates at two timesteps, and each timestep but
    the first twice) repeat, so its steps drift from the scheduler's and its full steps fall elsewhere. Here the step
    is the number of the call's UNet evaluations before this one, divided by the scheduler's ``order`` (evaluations
    per step: 2 for Heun), which is the step the scheduler is at. What is cached, reused and recomputed stays the
    helper's own code. ``extra_full``: steps that run full besides the schedule's (fastcache runs full the first step
    of a new input signature, whose feature buffer holds nothing of the call).
    """

    def __init__(self, pipe, extra_full=()):
        super().__init__(pipe=pipe)
        self.extra_full = frozenset(extra_full)

    def wrap_unet_forward(self):
        forward = self.pipe.unet.forward
        self.function_dict["unet_forward"] = forward  # what the helper's unwrap_modules puts back
        evaluations = itertools.count()

        def counted(*args, **kwargs):
            self.cur_timestep = next(evaluations) // self.pipe.scheduler.order
            return forward(*args, **kwargs)

        self.pipe.unet.forward = counted

    def is_skip_step(self, block_i, layer_i, blocktype="down"):
        skip = super().is_skip_step(block_i, layer_i, blocktype)
        return skip and self.cur_timestep not in self.extra_full


@contextmanager
def deepcache_helper(pipe, interval: int, branch: int, count_steps: bool = False, extra_full=()):
    """The oracle: a fresh ``DeepCacheSDHelper`` enabled on ``pipe``; with ``count_steps`` or ``extra_full``, a fresh
    ``StepCountingHelper`` (for schedulers that repeat timesteps, or with steps run full besides the schedule's)."""
    helper = StepCountingHelper(pipe, extra_full) if count_steps or extra_full else DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        yield helper
    finally:
        helper.disable()


def helper_run(runner, interval: int, branch: int, **kwargs) -> torch.Tensor:
    """One call of ``runner`` under a fresh DeepCache helper."""
    with deepcache_helper(runner.pipe, interval, branch):
        return runner(**kwargs)


def fastcache_run(runner, interval: int, branch: int, **kwargs) -> torch.Tensor:
    """One call of ``runner`` with a fresh eager fastcache handle."""
    handle = compile_pipeline(runner.pipe, interval, branch, compile=False)
    try:
        return runner(**kwargs)
    finally:
        handle.disable()


def against_helper(runner, handle, interval: int, branch: int, tolerance: float = 1e-5, **kwargs) -> torch.Tensor:
    """One call of ``runner`` under ``handle``, checked against one under a fresh DeepCache helper (the handle off
    meanwhile: the two cannot hook one UNet at once); returns the handle's output."""
    handle.disable()
    expected = helper_run(runner, interval, branch, **kwargs)
    handle.enable()
    got = runner(**kwargs)
    assert rel_l2(got, expected) < tolerance, kwargs
    return got


def unet_inputs(model, batch=2, size=16, seed=0) -> dict:
    """Random inputs of a UNet (or a ControlNet made from one) at ``size`` latents, SDXL's added conditions included."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(501),
                  encoder_hidden_states=torch.randn(batch, 77, model.config.cross_attention_dim, generator=g))
    if model.config.addition_embed_type == "text_time":
        pooled = model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, pooled, generator=g),
                                           time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]] * batch))
    return inputs


def rel_l2(a, b) -> float:
    """Relative L2 distance of ``a`` from ``b``: tensors, or arrays (and lists of them) as the pipelines' numpy
    output gives them."""
    a, b = (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for x in (a, b))
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Runner:
    """A tiny pipeline plus a call that returns latents for a fixed seed."""

    def __init__(self, preset: str, pipe=None):
        self.preset = preset
        self.pipe = pipe or build_pipeline(preset)
        self.embeds = random_prompt_embeds(self.pipe)

    def sharing_unet(self, scheduler_cls) -> "Runner":
        """A ``from_pipe`` pipeline of the same class, sharing this one's UNet, with a scheduler of its own."""
        scheduler = scheduler_cls.from_config(self.pipe.scheduler.config)
        return Runner(self.preset, type(self.pipe).from_pipe(self.pipe, scheduler=scheduler))

    def __call__(self, steps: int = STEPS, seed: int = 0, embeds=None, size: int = SIZE, output_type: str = "latent",
                 **kwargs) -> torch.Tensor:
        return self.pipe(num_inference_steps=steps, height=size, width=size, output_type=output_type,
                         generator=torch.Generator().manual_seed(seed), **(embeds or self.embeds), **kwargs).images


class ControlNetRunner(Runner):
    """A tiny ControlNet pipeline (``count`` > 1: a MultiControlNetModel) with fixed conditioning images."""

    make = staticmethod(with_controlnet)

    def __init__(self, preset: str, count: int = 1):
        super().__init__(preset, self.make(build_pipeline(preset), count))
        generator = torch.Generator().manual_seed(3)
        images = [torch.rand(1, 3, SIZE, SIZE, generator=generator) for _ in range(count)]
        self.image = images[0] if count == 1 else images

    def __call__(self, **kwargs) -> torch.Tensor:
        return super().__call__(image=self.image, **kwargs)


class AdapterRunner(ControlNetRunner):
    """A tiny T2I-Adapter pipeline (``count`` > 1: a MultiAdapter) with fixed conditioning images."""

    make = staticmethod(with_adapter)


def to_pil(image: torch.Tensor):
    """A (1, C, H, W) tensor in [0, 1] as a PIL image (C = 1: a mask)."""
    from PIL import Image

    array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


class InpaintRunner(Runner):
    """A tiny inpainting pipeline, with a 9-channel UNet of its own or the 4-channel one, a fixed image and a
    rectangular mask. With ``padding_mask_crop`` it takes PIL images and must decode to PIL; the call then returns the
    final latents, read from the step-end callback."""

    def __init__(self, preset: str, unet_channels: int = 9):
        super().__init__(preset, inpaint_pipeline(build_pipeline(preset), unet_channels))
        self.image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
        self.mask = torch.zeros(1, 1, SIZE, SIZE)
        self.mask[..., 8:20, 4:16] = 1.0

    def __call__(self, strength: float = 0.6, padding_mask_crop: int | None = None, **kwargs) -> torch.Tensor:
        if padding_mask_crop is None:
            return super().__call__(image=self.image, mask_image=self.mask, strength=strength, **kwargs)
        final = {}

        def keep_latents(pipe, step, timestep, tensors):
            final["latents"] = tensors["latents"]
            return tensors

        super().__call__(image=to_pil(self.image), mask_image=to_pil(self.mask), strength=strength,
                         padding_mask_crop=padding_mask_crop, output_type="pil", callback_on_step_end=keep_latents,
                         **kwargs)
        return final["latents"]


class RefinerRunner(Runner):
    """A tiny SDXL refiner (img2img with aesthetic scores, a UNet of its own) beside the tiny SDXL base it refines;
    called with an image, or with the base's latents (the base+refiner hand-off)."""

    def __init__(self):
        self.base = Runner("tiny-sdxl")
        super().__init__("tiny-sdxl-refiner", refiner_pipeline(self.base.pipe))
        self.image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))

    def __call__(self, steps: int = 20, image=None, strength: float = 0.3, seed: int = 0, **kwargs) -> torch.Tensor:
        return self.pipe(image=self.image if image is None else image, strength=strength, num_inference_steps=steps,
                         output_type="latent", generator=torch.Generator().manual_seed(seed), **self.embeds,
                         **kwargs).images

    def hand_off(self, steps: int = 20, at: float = 0.8) -> torch.Tensor:
        """The base denoises until ``at``, the refiner from there, on the base's latents."""
        latents = self.base(steps=steps, denoising_end=at)
        return self(steps=steps, image=latents, denoising_start=at, seed=1)


class Img2ImgRunner:
    """An img2img ``from_pipe`` pipeline at strength 0.6 (the call starts mid-schedule), sharing the runner's UNet
    and, unless given a scheduler class of its own (a hires-fix pass), its scheduler."""

    def __init__(self, runner: Runner, scheduler_cls=None):
        from diffusers import StableDiffusionImg2ImgPipeline

        own = {"scheduler": scheduler_cls.from_config(runner.pipe.scheduler.config)} if scheduler_cls else {}
        self.pipe = StableDiffusionImg2ImgPipeline.from_pipe(runner.pipe, **own)
        self.embeds = runner.embeds
        self.image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))

    def __call__(self) -> torch.Tensor:
        return self.pipe(image=self.image, strength=0.6, num_inference_steps=STEPS, output_type="latent",
                         generator=torch.Generator().manual_seed(0), **self.embeds).images


@pytest.fixture(params=TINY_PRESETS)
def runner(request) -> Runner:
    return Runner(request.param)


@pytest.fixture
def sd_runner() -> Runner:
    return Runner("tiny-sd")


@pytest.fixture
def kernel_only(monkeypatch):
    """``guided_step`` must launch the Triton kernel (through the interpreter on a CPU), never its PyTorch fallback:
    a test that compared the fallback's result with the reference would pass whatever the kernel computes."""
    import fastcache_kernels.guided_step as kernel

    def refuse(*args, **kwargs):
        raise AssertionError("guided_step ran its PyTorch reference instead of the Triton kernel "
                             f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} on a CPU)")

    monkeypatch.setattr(kernel, "guided_step_reference", refuse)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled tests must not see each other's dynamo caches or stance."""
    yield
    torch._dynamo.reset()


def save_tiny_clip(folder: Path) -> Path:
    """A CLIP model with random weights and a letters-only tokenizer, saved as a local folder (what --clip-model
    takes): enough to check the CLIP score's arithmetic without downloading a real one."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter], vocab[letter + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(layers, vocab_size=len(vocab), max_position_embeddings=77,
                                                     bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


# -- the command line: a bad argument is one line a person reads ------------------------------------------------------

MAX_ERROR_CHARS = 400  # one line, as a terminal shows it: a count and a few names, never every name


def one_line_error(run, capsys) -> str:
    """The error of a command line that ``run()`` must refuse: exit code 2, and on stderr exactly one line of at most
    ``MAX_ERROR_CHARS`` characters, said once (every bad-input test of the command line checks it through here)."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2, exit_info.value.code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert len(err) - 1 <= MAX_ERROR_CHARS, f"{len(err) - 1} characters: {err}"
    return err


def cli_error(argv: list[str], capsys) -> str:
    """``one_line_error`` of ``fastcache ARGV``."""
    from fastcache import cli

    return one_line_error(lambda: cli.main(argv), capsys)


# fastcache tune on the tiny preset: 32 px, 4 steps, 2 prompts, I1 and I2 at branches 0 and 1, eager, with CLIP
TINY_TUNE = ["tune", "--size", "32", "--steps", "4", "--num-prompts", "2", "--intervals", "1,2", "--branches", "0,1"]


@pytest.fixture(scope="session")
def tiny_tune(tmp_path_factory) -> tuple[Path, list[str]]:
    """One eager tune run, shared by the tests that read or resume it: its folder, and the arguments that made it
    (a test that resumes it copies the folder first)."""
    from fastcache import cli

    root = tmp_path_factory.mktemp("tiny-tune")
    args = [*TINY_TUNE, "--no-compile", "--clip-model", str(save_tiny_clip(root / "clip"))]
    assert cli.main([*args, "--out", str(root / "out")]) == 0
    torch._dynamo.reset()
    return root / "out", args


# fastcache tune on tiny-animatediff: 16 px, its 4 frames, 4 steps, 1 prompt (a video is slow on CPU), I1 and I2 at
# branches 0 and 1
TINY_VIDEO_TUNE = ["tune", "--preset", "tiny-animatediff", "--steps", "4", "--num-prompts", "1", "--intervals", "1,2",
                   "--branches", "0,1"]


@pytest.fixture(scope="session")
def tiny_video_tune(tmp_path_factory) -> tuple[Path, list[str]]:
    """One eager tune run on a video preset, with CLIP on every frame: its folder and the arguments that made it."""
    from fastcache import cli

    root = tmp_path_factory.mktemp("tiny-video-tune")
    args = [*TINY_VIDEO_TUNE, "--no-compile", "--clip-model", str(save_tiny_clip(root / "clip"))]
    assert cli.main([*args, "--out", str(root / "out")]) == 0
    return root / "out", args


# -- serving: a real server process on 127.0.0.1, every wait bounded --------------------------------------------------

HOST = "127.0.0.1"


def wait_until(check, timeout: float, what: str):
    """``probe.wait_until`` for checks made with httpx: a connection refused while a server starts is a 'not yet'."""
    import httpx

    def quiet():
        try:
            return check()
        except httpx.TransportError:
            return None

    return probe.wait_until(quiet, timeout, what, poll=0.1)


class ServerProcess:
    """``fastcache serve`` in a subprocess, bound to 127.0.0.1; ``headers`` go with its own requests (an API key)."""

    def __init__(self, *args: str, ready_timeout: float = 300, env: dict | None = None, headers: dict | None = None):

        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.headers = headers or {}
        self.log = io.BytesIO()
        self.proc = subprocess.Popen([sys.executable, "-m", "fastcache.cli", "serve", "--host", HOST, "--port",
                                      str(self.port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        threading.Thread(target=self._read_output, daemon=True).start()
        try:
            probe.wait_ready(self.url, ready_timeout, alive=lambda: self.proc.poll() is None)
        except RuntimeError as error:
            self.stop()
            raise AssertionError(f"{error}:\n{self.output()}") from None
        except BaseException:
            self.stop()
            raise

    def _read_output(self):
        for line in self.proc.stdout:
            self.log.write(line)

    def output(self) -> str:
        return self.log.getvalue().decode(errors="replace")

    def metrics(self) -> dict[str, float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", headers=self.headers).text
        return {_sample_name(sample): sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _sample_name(sample) -> str:
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "le") if sample.labels else ""
    le = sample.labels.get("le") if sample.labels else None
    return sample.name + (f"{{{labels}}}" if labels else "") + (f"[le={le}]" if le else "")


def png_array(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def assert_error(status: int, body: bytes | str, expected: int | tuple[int, ...] = None) -> dict:
    """An answer in the one error format with ``status`` (or one of ``expected``); its ``error`` object. The format is
    ``errors.ErrorResponse``: ``{"error": {"message", "type", "param", "code"}}``, a message of 1 to 400 characters
    (a list of names in it gives a few and a count)."""
    from fastcache.serving.errors import ErrorResponse

    if expected is not None:
        assert status in ((expected,) if isinstance(expected, int) else expected), (status, body)
    return ErrorResponse.model_validate_json(body).error.model_dump()


# -- what users run on top of the UNet: LoRA, IP-Adapter, PAG, and the DeepCache helper under FreeU -----------------

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def save_lora(pipe, directory, rank: int = 4, seed: int = 0) -> str:
    """A LoRA for ``pipe``'s UNet made with PEFT (random ``A`` and ``B``, so it changes the output) and saved with the
    pipeline's ``save_lora_weights``: a folder ``load_lora_weights`` reads back through diffusers' own loader."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_config(pipe.unet.config)  # LoRA weights do not depend on the base weights
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 / param.shape[-1] ** 0.5)
    path = Path(directory) / f"lora-r{rank}-s{seed}"
    type(pipe).save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    return str(path)


def ip_adapter_state_dict(unet, seed: int = 0) -> dict:
    """An IP-Adapter for ``unet`` (random weights, image embeddings of 16) for ``unet._load_ip_adapter_weights``."""
    return random_ip_adapter(unet, embed_dim=16, seed=seed)


def image_embeds(count: int = 1, embed_dim: int = 16, seed: int = 5) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` for ``count`` IP-Adapters with guidance on: negative and positive, one image."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 1, embed_dim, generator=generator) for _ in range(count)]


def pag_runner(runner: Runner, pipeline_cls, **kwargs) -> Runner:
    """``runner``'s pipeline as a PAG pipeline of ``pipeline_cls`` (``from_pipe``: same UNet), PAG on the mid block."""
    pipe = pipeline_cls.from_pipe(runner.pipe, pag_applied_layers=["mid"], **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return Runner(runner.preset, pipe)


@contextmanager
def freeu_out_of_place():
    """diffusers' ``apply_freeu`` on a copy of the hidden state, for the DeepCache helper as an oracle under FreeU.

    ``apply_freeu`` scales the hidden state in place. In a plain forward nothing else holds it, so this changes
    nothing; but the helper's cached outputs are the tensors it scales, so at a branch whose up block applies FreeU
    the helper scales its cached feature again at every skip step (b1, b1², b1³, ...). fastcache applies FreeU to a
    copy (partition._freeu); with this, the helper computes the same thing."""
    from diffusers.models.unets import unet_2d_blocks
    from diffusers.utils.torch_utils import apply_freeu

    def on_a_copy(resolution_idx, hidden_states, res_hidden_states, **values):
        return apply_freeu(resolution_idx, hidden_states.clone(), res_hidden_states, **values)

    unet_2d_blocks.apply_freeu = on_a_copy
    try:
        yield
    finally:
        unet_2d_blocks.apply_freeu = apply_freeu


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loras")


@contextmanager
def app_in_thread(app, timeout: float = 300):
    """``app`` served by uvicorn on a thread of this process (loopback, a free port), until ready: its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        probe.wait_ready(f"http://{HOST}:{server.config.port}", timeout, alive=thread.is_alive)
        yield f"http://{HOST}:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(60)


# -- video: AnimateDiff and Stable Video Diffusion, tiny, few frames and steps ----------------------------------------

FRAMES = 4
VIDEO_STEPS = 5
VIDEO_SIZE = 16  # pixels; latents 8x8 with the tiny VAEs


def motion_unet_inputs(unet, batch=2, frames=FRAMES, size=8, seed=0) -> dict:
    """Random inputs of a ``UNetMotionModel``: a ``(batch, channels, frames, h, w)`` sample and per-frame text
    embeddings, as ``AnimateDiffPipeline`` passes them (SDXL's added conditions included)."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(sample=torch.randn(batch, 4, frames, size, size, generator=g), timestep=torch.tensor(501),
                  encoder_hidden_states=torch.randn(batch * frames, 77, unet.config.cross_attention_dim, generator=g))
    if unet.config.get("addition_embed_type") == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, pooled, generator=g),
                                           time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]] * batch))
    return inputs


def svd_unet_inputs(unet, batch=2, frames=FRAMES, size=8, seed=0) -> dict:
    """Random inputs of a ``UNetSpatioTemporalConditionModel``: a ``(batch, frames, 2 * 4, h, w)`` sample (noise and
    image latents), one image embedding per video and SVD's three added time ids (fps, motion bucket, noise aug)."""
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, frames, unet.config.in_channels, size, size, generator=g),
                timestep=torch.tensor(0.7), added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * batch),
                encoder_hidden_states=torch.randn(batch, 1, unet.config.cross_attention_dim, generator=g))


class VideoRunner:
    """A tiny video pipeline plus a call that returns the final latents for a fixed seed."""

    def __init__(self, preset: str, pipe=None):
        from fastcache.video_models import build_video_pipeline

        self.preset = preset
        self.pipe = pipe or build_video_pipeline(preset)
        self.svd = preset.endswith("svd")
        if self.svd:
            from fastcache.video_models import conditioning_image

            self.inputs = dict(image=conditioning_image((VIDEO_SIZE, VIDEO_SIZE)))
        else:
            self.inputs = random_prompt_embeds(self.pipe)

    def __call__(self, steps: int = VIDEO_STEPS, seed: int = 0, frames: int = FRAMES, size: int = VIDEO_SIZE,
                 output_type: str = "latent", **kwargs) -> torch.Tensor:
        return self.pipe(num_inference_steps=steps, num_frames=frames, height=size, width=size, output_type=output_type,
                         generator=torch.Generator().manual_seed(seed), **{**self.inputs, **kwargs}).frames


# -- serving video: the tiny video presets, saved as folders for `fastcache serve --model` -------------------------

def tiny_animatediff(seed: int = 0):
    """The ``tiny-animatediff`` preset (random weights, no text encoder)."""
    return build_pipeline("tiny-animatediff", seed=seed)


def tiny_svd(seed: int = 0):
    """The ``tiny-svd`` preset (random weights)."""
    return build_pipeline("tiny-svd", seed=seed)


def decode_mp4(path) -> tuple[np.ndarray, float]:
    """An MP4's frames as uint8 RGB ``(frames, height, width, 3)`` (PyAV), and its frame rate."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate or stream.base_rate or 0)


@pytest.fixture(scope="session")
def tiny_video_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny AnimateDiff and SVD pipelines saved as local diffusers folders (what ``fastcache serve --model``
    loads): their paths by family."""
    root = tmp_path_factory.mktemp("video-models")
    folders = {"animatediff": root / "animatediff", "svd": root / "svd"}
    tiny_animatediff().save_pretrained(folders["animatediff"])
    tiny_svd().save_pretrained(folders["svd"])
    return folders


def video_model(pipe, steps: int = 2, guidance=(True,), default_frames=None, **options):
    """``pipe`` as a server serves it (``VideoModel``), without a fastcache handle (so, no cache levels), its engine
    not started: ``options`` are ``VideoOptions``' (sizes, frames, ...)."""
    from fastcache.serving.engine import Engine, EngineConfig
    from fastcache.serving.video_options import VideoOptions
    from fastcache.serving.video_pipeline import VideoModel

    engine = Engine(pipe, EngineConfig(sizes=((32, 32),), steps=steps, max_steps=50, guidance=guidance, edits=()),
                    images=False)
    return VideoModel(pipe, engine, VideoOptions(**options), default_frames)
