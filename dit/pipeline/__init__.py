"""Diffusers-compatible pipelines on our transformers, VAE and samplers.

`DiTPipeline.from_pretrained(folder)` reads a diffusers pipeline folder (model_index.json) and returns the
pipeline for its family with our transformer (`dit.load_transformer`), our VAE for video (`vae3d.load_vae`),
the folder's text encoders and tokenizers (transformers, local files only) and our samplers driven by the
folder's scheduler config. Same seed and settings as the diffusers pipeline give the same result.
Folders we save name diffusers' pipeline class, so `diffusers.DiffusionPipeline.from_pretrained` loads them
(with our modules as components).

Modules: `loading` (model_index.json allow-list, family dispatch, components by role), `base` (DiTPipeline and
the checks every family shares), one module per family: `cogvideox`, `image` (SD3 / SD3.5, CogView3-Plus),
`wan` (text-to-video and what Wan's pipelines share), `wan_i2v`, `class_conditional` (diffusers' DiTPipeline
folders: ClassConditionalDiTPipeline); `image_family`: the `dit generate` hooks of the image families; `relay`:
the relay super-resolution stage the pipelines share.
"""

from dit.pipeline.base import DiTPipeline, DiTPipelineOutput, NonFiniteLatentsError
from dit.pipeline.class_conditional import ClassConditionalDiTPipeline
from dit.pipeline.cogvideox import CogVideoXDiTPipeline
from dit.pipeline.image import CogView3PlusDiTPipeline, SD3DiTPipeline
from dit.pipeline.loading import (COMPONENT_CLASSES, PIPELINE_FAMILIES, generate_pipeline_class, pipeline_class,
                                  video_pipeline_class)
from dit.pipeline.wan import WanDiTPipeline
from dit.pipeline.wan_i2v import WanImageToVideoDiTPipeline

__all__ = ["COMPONENT_CLASSES", "PIPELINE_FAMILIES", "ClassConditionalDiTPipeline", "CogVideoXDiTPipeline",
           "CogView3PlusDiTPipeline", "DiTPipeline", "DiTPipelineOutput", "NonFiniteLatentsError", "SD3DiTPipeline",
           "WanDiTPipeline", "WanImageToVideoDiTPipeline", "generate_pipeline_class", "pipeline_class",
           "video_pipeline_class"]
