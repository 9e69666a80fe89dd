"""Evaluation: question sets, answer scores, LLM-as-judge, reports and run comparisons."""
