"""Model compression: quantize, prune and distill, each reported before and after."""
