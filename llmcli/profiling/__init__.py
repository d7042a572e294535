"""Counting, estimating and measuring what a model costs."""
