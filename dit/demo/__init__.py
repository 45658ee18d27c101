"""The embedded demo model's support code: the evaluator that checks generated clips against prompts."""

from dit.demo.evaluate import ClipEstimate, GridPrompt, evaluate_clip, prompt_grid, summarize_scores

__all__ = ["ClipEstimate", "GridPrompt", "evaluate_clip", "prompt_grid", "summarize_scores"]
