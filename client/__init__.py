"""leanfed Flower ClientApp side: thin app, local DST trainer, data streams."""
