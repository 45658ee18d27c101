"""The embedded demo model's support code: the evaluator that checks generated clips against prompts."""

from dit.demo.evaluate import (ALL_ATTRIBUTES, SCORED_ATTRIBUTES, ClipEstimate, GridPrompt, evaluate_clip, prompt_grid,
                               summarize_scores)

__all__ = ["ALL_ATTRIBUTES", "SCORED_ATTRIBUTES", "ClipEstimate", "GridPrompt", "evaluate_clip", "prompt_grid", "summarize_scores"]
