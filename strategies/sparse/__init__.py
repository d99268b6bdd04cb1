"""Dynamic Sparse Training engine: masks, densities, scores, prune/grow, schedules, FLOPs."""
