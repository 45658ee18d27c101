"""The embedded demo model's support code: the evaluator that checks generated clips against prompts."""

from dit.demo.evaluate import ClipEstimate, evaluate_clip, summarize_scores

__all__ = ["ClipEstimate", "evaluate_clip", "summarize_scores"]
