"""Image edits: uploads read safely, fitted to a served size, and the edit pipelines made from the served one.

An upload is decoded only after its header passed: PNG, JPEG or WebP, each side at most the server's ``max_size``. A
decompression bomb (huge declared dimensions in a small file) is refused on its header, before any pixel is
decoded. A mismatched image is resized when the request says so, else refused; never cropped.

The edit pipelines come from ``AutoPipelineForImage2Image``/``AutoPipelineForInpainting.from_pipe``: they share the
served pipeline's UNet, so fastcache (which follows every pipeline that drives the shared UNet) serves them from the
same graphs and buffers. Without an inpainting model, masks are inpainted by the base model's inpainting pipeline
(diffusers blends the unmasked latents back at every step).
"""

from __future__ import annotations

import io
import warnings

from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting
from PIL import Image, ImageOps, UnidentifiedImageError

from .request import InvalidRequest

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
WARMUP_GRAY = 127


def read_image(data: bytes, name: str, max_size: int) -> Image.Image:
    """The uploaded file ``data`` of field ``name`` as a decoded image; ``InvalidRequest`` (HTTP 400) for a file that
    is empty, not a PNG, JPEG or WebP image, larger than ``max_size`` pixels on a side, or that fails to decode."""
    if not data:
        raise InvalidRequest(f"{name} is an empty file; send a PNG, JPEG or WebP image.", name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # bounded by max_size below
        try:
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)  # reads the header only
        except Image.DecompressionBombError as error:
            raise InvalidRequest(f"{name} declares more pixels than any served image ({error}); each side must be "
                                 f"at most {max_size} pixels.", name) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise InvalidRequest(f"{name} is not a PNG, JPEG or WebP image.", name) from None
    width, height = image.size
    if not (1 <= width <= max_size and 1 <= height <= max_size):
        raise InvalidRequest(f"{name} is {width}x{height} pixels; each side must be at most {max_size} pixels.", name)
    try:
        image.load()
        return ImageOps.exif_transpose(image)  # as viewers show it (a phone's JPEG may be stored rotated)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InvalidRequest(f"{name} could not be decoded as a {image.format} image ({error}).", name) from None


def fit(image: Image.Image, width: int, height: int, resize: bool, name: str = "image",
        resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """``image`` at ``width`` x ``height`` pixels: as it is, resized (the whole image, its aspect changed if need be)
    when ``resize``, else ``InvalidRequest``. Never cropped."""
    if image.size == (width, height):
        return image
    if not resize:
        raise InvalidRequest(f"{name} is {image.size[0]}x{image.size[1]} pixels, not the size asked for "
                             f"({width}x{height}); send resize=true to resize it, or an image of that size.", name)
    return image.resize((width, height), resample)


def fit_mask(mask: Image.Image, image: Image.Image, width: int, height: int, resize: bool) -> Image.Image:
    """The mask of ``image`` (same size as the upload, or ``InvalidRequest``), fitted as the image is."""
    if mask.size != image.size:
        raise InvalidRequest(f"mask is {mask.size[0]}x{mask.size[1]} pixels but the image is {image.size[0]}x"
                             f"{image.size[1]}: they must be the same size.", "mask")
    return fit(mask.convert("L"), width, height, resize, "mask", Image.Resampling.NEAREST)


def edit_pipeline(pipe, kind: str):
    """The ``img2img`` or ``inpaint`` pipeline of ``pipe``'s family, sharing its components (``from_pipe``)."""
    auto = {"img2img": AutoPipelineForImage2Image, "inpaint": AutoPipelineForInpainting}[kind]
    try:
        edit = auto.from_pipe(pipe)
    except (ValueError, KeyError) as error:  # a pipeline family diffusers has no such pipeline for
        raise ValueError(f"{type(pipe).__name__} has no {kind} pipeline in diffusers ({error}); serve without it "
                         f"(--edits).") from None
    edit.set_progress_bar_config(disable=True)
    return edit


def inpainting_model(pipe):
    """An inpainting model's pipeline, served beside the base model: its UNet must take 9 channels (latents, mask,
    masked-image latents), as the published inpainting checkpoints do."""
    channels = pipe.unet.config.in_channels
    if channels != 9:
        raise ValueError(f"inpaint model must be an inpainting model, whose UNet takes 9 input channels; this one "
                         f"takes {channels} (without --inpaint-model the base model inpaints).")
    return edit_pipeline(pipe, "inpaint")


def warmup_inputs(width: int, height: int) -> tuple[Image.Image, Image.Image]:
    """A gray image and a mask repainting its right half: what warm-up edits run on."""
    image = Image.new("RGB", (width, height), (WARMUP_GRAY,) * 3)
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 2, 0, width, height))
    return image, mask
