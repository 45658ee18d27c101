"""Datasets: the procedural shapes source of the demo model (dit.data.shapes)."""

from dit.data.shapes import (BACKGROUND_COLOURS, COLOURS, FOREGROUND_COLOURS, MOTIONS, SHAPES, ShapeAttributes,
                             ShapesConfig, ShapesDataset, all_combinations, caption_words, heldout_combinations,
                             make_caption, render_clip, sample_attributes, split_combinations)

__all__ = ["BACKGROUND_COLOURS", "COLOURS", "FOREGROUND_COLOURS", "MOTIONS", "SHAPES", "ShapeAttributes",
           "ShapesConfig", "ShapesDataset", "all_combinations", "caption_words", "heldout_combinations",
           "make_caption", "render_clip", "sample_attributes", "split_combinations"]
