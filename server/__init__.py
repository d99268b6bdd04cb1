"""leanfed Flower ServerApp side: thin app, validated run config, run store."""
