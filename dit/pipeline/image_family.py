"""`dit generate`'s hooks for the image families: SD3 / SD3.5, CogView3-Plus and class-conditional DiT.

The hooks are the video families' (documented on DiTPipeline) read for single images: the request is one frame,
its size is checked against the folder's transformer and VAE configs before any weights load, and
`request_kwargs` turns a request into the family's call (a text prompt, or DiT's class id). `output_kind =
"image"` tells the command line to read `.images` and write one picture per request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dit.convert import read_folder_json
from dit.pipeline.base import _check_sizes
from dit.pipeline.loading import _require_family


@dataclass(frozen=True)
class ImageGeometry:
    """The sizes an image pipeline folder allows, from its transformer and VAE configs (no weights read)."""

    default: tuple[int, int]  # the transformer's sample_size x the VAE factor: diffusers' default (height, width)
    multiple: int  # VAE factor x patch size: heights and widths divide by it
    largest: int | None  # pos_embed_max_size x patch x VAE factor: the transformer's position table (SD3, CogView3-Plus)
    vae_factor: int
    patch: int
    hidden: int  # heads x head dim
    vae_width: int  # channels of the decoder's widest full-resolution map (what the memory estimate scales)


def image_geometry(folder: str | os.PathLike, transformer: str = "transformer") -> ImageGeometry:
    """Read an image pipeline folder's transformer/config.json (or another transformer's, such as the
    relay_transformer) and vae/config.json (diffusers' AutoencoderKL: 2 ** (levels - 1) is its scale factor, as
    diffusers' image pipelines compute it)."""
    folder = Path(folder)
    t = read_folder_json(folder / transformer, what="an image transformer config", required={
        "sample_size": int, "patch_size": int, "num_attention_heads": int, "attention_head_dim": int},
        optional={"pos_embed_max_size": int | None})
    v = read_folder_json(folder / "vae", what="an AutoencoderKL config", required={
        "block_out_channels": tuple[int, ...]})
    for file, key, value in ((folder / transformer / "config.json", "sample_size", t["sample_size"]),
                             (folder / transformer / "config.json", "patch_size", t["patch_size"])):
        if value < 1:
            raise ValueError(f"{str(file)!r}: {key}={value!r} must be a positive integer")
    channels = v["block_out_channels"]
    if not channels or min(channels) < 1:
        raise ValueError(f"{str(folder / 'vae' / 'config.json')!r}: block_out_channels={channels!r} must be a "
                         "non-empty list of positive integers")
    factor, patch = 2 ** (len(channels) - 1), t["patch_size"]
    default = t["sample_size"] * factor
    grid = t.get("pos_embed_max_size")
    return ImageGeometry(default=(default, default), multiple=factor * patch,
                         largest=grid * patch * factor if grid else None, vae_factor=factor, patch=patch,
                         hidden=t["num_attention_heads"] * t["attention_head_dim"], vae_width=max(channels[:2]))


class ImageFamily:
    """The `dit generate` hooks of an image family; mixed in before DiTPipeline (and diffusers' pipeline class)."""

    output_kind = "image"  # `dit generate` reads `.images` and writes one picture per request
    supports_relay = False
    requires_image = False
    fixed_size = False  # True: the pipeline generates at the transformer's sample size only (diffusers' DiT)
    text_tokens = 0  # text tokens the transformer attends to beside the image's (the memory estimate)
    generation_defaults: dict[str, Any] = {}

    @classmethod
    def check_folder_request(cls, folder: str | os.PathLike, height: int | None, width: int | None,
                             num_frames: int | None) -> tuple[int, int, int]:
        """Fill the default size and check the request from the folder's configs alone: one frame, sizes that
        divide by VAE x patch and fit the transformer's position table (or, for a fixed-size family, its size)."""
        folder = Path(folder)
        _require_family(folder, cls)
        if num_frames not in (None, 1):
            raise ValueError(f"num_frames {num_frames}: a {cls.diffusers_class_name} folder makes single images; "
                             "drop --frames (or give 1)")
        g = image_geometry(folder)
        height = g.default[0] if height is None else height
        width = g.default[1] if width is None else width
        cls._check_size(height, width, g)
        return height, width, 1

    @classmethod
    def _check_size(cls, height: int, width: int, g: ImageGeometry) -> None:
        if cls.fixed_size and (height, width) != g.default:
            raise ValueError(f"{height}x{width}: {cls.diffusers_class_name} folders generate at the transformer's "
                             f"sample size, {g.default[0]}x{g.default[1]}; drop --height and --width")
        _check_sizes(height, width, 1, g.multiple, 1)
        if g.largest is not None and max(height, width) > g.largest:
            raise ValueError(f"{height}x{width} is past the transformer's position table: height and width must be "
                             f"at most {g.largest} (pos_embed_max_size {g.largest // g.multiple} x patch {g.patch} x "
                             f"VAE {g.vae_factor})")

    @classmethod
    def check_folder_relay(cls, folder: str | os.PathLike, height: int, width: int, relay: int) -> None:
        """The relay stage's size (relay x height by relay x width) fits the position table of the transformer
        that runs it (the folder's relay_transformer, else the base one), from the configs alone."""
        folder = Path(folder)
        stage = "relay_transformer" if (folder / "relay_transformer").is_dir() else "transformer"
        largest = image_geometry(folder, stage).largest
        if largest is not None and max(height, width) * relay > largest:
            most = largest // max(height, width)
            raise ValueError(f"--relay {relay} makes {height * relay}x{width * relay}, past the {stage}'s position "
                             f"table ({largest} pixels per side); "
                             + (f"the largest relay at {height}x{width} is {most}" if most > 1 else "drop --relay"))

    @classmethod
    def memory_shape(cls, folder: str | os.PathLike):
        """What dit.estimate needs from the folder's configs (dit.estimate.image_shape)."""
        from dit.estimate import image_shape

        return image_shape(Path(folder), image_geometry(folder), text_tokens=cls.text_tokens)

    def check_request(self, prompt, negative_prompt, height: int, width: int, num_frames: int,
                      num_inference_steps: int, guidance_scale: float) -> None:
        """The families' common request check against the loaded model (`dit generate` calls it after loading)."""
        if num_frames != 1:
            raise ValueError(f"num_frames {num_frames}: a {self.diffusers_class_name} makes single images")
        self._check_image_request(prompt, height, width, num_inference_steps, 1, guidance_scale, "np")
        grid = getattr(self.transformer.config, "pos_embed_max_size", None)
        largest = grid * self.transformer.config.patch_size * self.vae_scale_factor if grid else None
        if largest is not None and max(height, width) > largest:
            raise ValueError(f"{height}x{width} is past the transformer's position table: height and width must be "
                             f"at most {largest}")

    @staticmethod
    def request_kwargs(prompt: str, negative_prompt: str | None, height: int, width: int, num_frames: int,
                       class_label: int | None = None) -> dict[str, Any]:
        """The call arguments of one `dit generate` request (besides steps, guidance, generator, output type)."""
        return {"prompt": prompt, "negative_prompt": negative_prompt, "height": height, "width": width}
