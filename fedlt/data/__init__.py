"""Data: sources, long-tailed subsets, client partitions, batched augmentation."""
