"""Dataset commands: import raw sources into the dataset folder, split, synthesize, describe."""
